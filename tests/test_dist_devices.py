"""Collectives are staged on the device the backend moves: NCCL has no CPU transport ("No backend
type associated with device type cpu"), so under NCCL every gathered or broadcast tensor must be on
cuda:LOCAL_RANK; under gloo on the CPU. No GPU here: the process group is faked and the staging
device recorded (``benchmarks/gpu_check.sh`` runs the real thing on GPUs)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from neon_cli import dist as D


class _Stop(Exception):
    pass


@pytest.fixture
def fake_group(monkeypatch):
    state = {"backend": "nccl", "seen": []}
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: state["backend"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)

    def all_gather(parts, tensor, *a, **k):
        state["seen"].append(tensor.device)
        raise _Stop

    def broadcast_object_list(box, src=0, group=None, device=None, **k):
        state["seen"].append(device)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    return state


def test_backend_device(fake_group):
    assert D.backend_device() == torch.device("cuda", 1)
    fake_group["backend"] = "gloo"
    assert D.backend_device() == torch.device("cpu")


def test_broadcast_object_stages_on_the_backend_device(fake_group):
    D.broadcast_object({"fid": 1.0})
    fake_group["backend"] = "gloo"
    D.broadcast_object({"fid": 1.0})
    assert fake_group["seen"] == [torch.device("cuda", 1), torch.device("cpu")]


def test_gather_cat_stages_on_the_backend_device(fake_group, monkeypatch):
    # the staging device under NCCL is cuda:<current>; "meta" stands in for it on a CPU-only machine
    monkeypatch.setattr(D, "backend_device", lambda: torch.device("meta"))
    with pytest.raises(_Stop):
        D.gather_cat(torch.ones(3, 2, dtype=torch.uint8), [3, 2])
    assert fake_group["seen"] == [torch.device("meta")]


def test_inception_rows_gather_stages_on_the_backend_device(fake_group, monkeypatch):
    from neon_cli import inception as I

    monkeypatch.setattr(D, "backend_device", lambda: torch.device("meta"))
    with pytest.raises(_Stop):
        I._all_gather_rows(dist, torch.ones(3, 4), 2)
    assert fake_group["seen"] == [torch.device("meta")]
