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


def test_main_rank_lock_is_one_decision_for_every_rank(tmp_path, monkeypatch):
    """Rank 0 alone tries the lock and broadcasts the outcome: when another run holds it, rank 0
    and rank 1 raise the same one-line error (neither waits in a collective for the other)."""
    from neon_cli.errors import UsageError
    from neon_cli.fsutil import exclusive_lock

    sent = []

    def bcast_from_rank0(obj, src=0):
        sent.append(obj)
        return obj

    monkeypatch.setattr(D, "broadcast_object", bcast_from_rank0)
    monkeypatch.setattr(D, "rank_world", lambda: (0, 2))
    with exclusive_lock(tmp_path / "S", folder=True):
        with pytest.raises(UsageError, match="being written by another neon run") as on_rank0:
            with D.main_rank_lock(tmp_path / "S", "-o", folder=True):
                pytest.fail("entered a locked folder")
    assert sent == [str(on_rank0.value)]
    # rank 1 never touches the lock file; it raises what rank 0 sent
    monkeypatch.setattr(D, "rank_world", lambda: (1, 2))
    monkeypatch.setattr(D, "broadcast_object", lambda obj, src=0: sent[0])
    with pytest.raises(UsageError) as on_rank1:
        with D.main_rank_lock(tmp_path / "other", "-o", folder=True):
            pytest.fail("entered")
    assert str(on_rank1.value) == str(on_rank0.value) and not (tmp_path / "other").exists()
    # free: both enter
    monkeypatch.setattr(D, "broadcast_object", lambda obj, src=0: None)
    with D.main_rank_lock(tmp_path / "S", "-o", folder=True):
        pass
