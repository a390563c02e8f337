"""synth: per-seed determinism and resume; finetune: resume equals an uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from neon_cli.errors import DataError, UsageError
from neon_cli.evaluate import seed_plan
from neon_cli.finetune import finetune
from neon_cli.report import Report
from neon_cli.synth import load_synthetic, synthesize


def _synth(out, model, num=40, shard=16, batch=8, pairs=(), family="toy"):
    rep = Report("synth")
    synthesize(family, model, num=num, out_dir=out, shard_size=shard, batch=batch, set_pairs=list(pairs), report=rep)
    return rep


def test_image_depends_only_on_its_seed_digits(digits):
    model = digits.load(digits.default_model)
    settings = {s.name: s.default for s in digits.settings} | {"steps": 4}
    seeds, labels = seed_plan(digits, 100, 12)
    all_at_once = digits.sample(model, seeds, labels, settings)
    one_by_one = torch.cat([digits.sample(model, seeds[i:i + 1], labels[i:i + 1], settings) for i in range(12)])
    # float rounding may differ between batch shapes in the last ulp; after uint8 quantisation at most 1 level
    assert (all_at_once.int() - one_by_one.int()).abs().max() <= 1
    assert (all_at_once == one_by_one).float().mean() > 0.99
    other = digits.sample(model, seeds + 1000, labels, settings)
    assert (other != all_at_once).any()


def test_synth_layout_labels_and_seeds(toyfam, toy_base, tmp_path):
    rep = _synth(tmp_path / "S", toy_base)
    manifest = json.loads((tmp_path / "S" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["settings"] == {"temperature": 0.8}
    images, labels, _ = load_synthetic(tmp_path / "S")
    assert images.shape == (40, 1, 4, 4) and images.dtype == torch.uint8 and labels is None
    seeds = torch.cat([load_file(str(tmp_path / "S" / s["file"]))["seeds"] for s in manifest["shards"]])
    assert seeds.tolist() == list(range(40))
    direct = toyfam.sample(toyfam.load(str(toy_base)), torch.arange(40), None, {"temperature": 0.8})
    assert torch.equal(images, direct)
    assert rep.results["shards_made"] == 3 and rep.inputs[0]["role"] == "model"


def test_synth_resume_makes_only_missing_shards(toyfam, toy_base, tmp_path):
    S = tmp_path / "S"
    _synth(S, toy_base)
    full = load_synthetic(S)[0].clone()
    keep = S / "shard-00000.safetensors"
    stat0 = os.stat(keep)
    (S / "shard-00001.safetensors").unlink()
    (S / "manifest.json").unlink()
    with pytest.raises(DataError, match="unfinished"):
        load_synthetic(S)
    rep = _synth(S, toy_base)
    assert rep.results["shards_made"] == 1 and rep.results["shards_present"] == 2
    assert os.stat(keep).st_mtime_ns == stat0.st_mtime_ns  # untouched
    assert torch.equal(load_synthetic(S)[0], full)


def test_synth_refuses_to_mix_plans(toyfam, toy_base, tmp_path):
    _synth(tmp_path / "S", toy_base)
    with pytest.raises(DataError, match="another settings"):
        _synth(tmp_path / "S", toy_base, pairs=["temperature=1.0"])


def test_synth_bad_numbers(toyfam, toy_base, tmp_path):
    with pytest.raises(UsageError, match="--num"):
        _synth(tmp_path / "S", toy_base, num=0)
    with pytest.raises(UsageError, match="--model"):
        _synth(tmp_path / "S", tmp_path / "missing.safetensors")


def _ft(toy_base, S, out, progress=None, **kw):
    rep = Report("finetune")
    args = dict(budget=160, lr=0.05, out_dir=out, batch=16, save_every=48, report=rep)
    args.update(kw)
    if progress:
        args["progress"] = progress
    return finetune("toy", toy_base, S, **args), rep


def test_finetune_resume_equals_uninterrupted(toyfam, toy_base, tmp_path):
    S = tmp_path / "S"
    _synth(S, toy_base)
    res, rep = _ft(toy_base, S, tmp_path / "a")
    assert [s["images_seen"] for s in res["snapshots"]] == [48, 96, 144, 160]
    assert rep.results["budget_fraction"] == 160 / 1000

    class Kill(Exception):
        pass

    def killer(task, done, total=None, **info):
        if task == "finetune" and done >= 112:  # after the 96-image state, before the 144 one
            raise Kill

    with pytest.raises(Kill):
        _ft(toy_base, S, tmp_path / "b", progress=killer)
    assert not (tmp_path / "b" / "theta_s-000000144.safetensors").exists()
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert state["images_seen"] == 96
    res_b, _ = _ft(toy_base, S, tmp_path / "b")
    a = load_file(res["final"])
    b = load_file(res_b["final"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [s["images_seen"] for s in res_b["snapshots"]] == [48, 96, 144, 160]


def test_finetune_errors(toyfam, toy_base, tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        _ft(toy_base, tmp_path / "empty", tmp_path / "o")
    _synth(tmp_path / "S", toy_base)
    with pytest.raises(UsageError, match="--budget"):
        _ft(toy_base, tmp_path / "S", tmp_path / "o", budget=0)
    with pytest.raises(UsageError, match="--lr"):
        _ft(toy_base, tmp_path / "S", tmp_path / "o", lr=-1.0)
    _ft(toy_base, tmp_path / "S", tmp_path / "o2", budget=32, save_every=16)
    with pytest.raises(UsageError, match="other settings"):
        _ft(toy_base, tmp_path / "S", tmp_path / "o2", budget=64, save_every=16, lr=0.01)


def test_finetune_longer_run_continues_the_shorter_one(toyfam, toy_base, tmp_path):
    _synth(tmp_path / "S", toy_base)
    short, _ = _ft(toy_base, tmp_path / "S", tmp_path / "o", budget=48, save_every=48)
    longer, _ = _ft(toy_base, tmp_path / "S", tmp_path / "o", budget=160, save_every=48)
    direct, _ = _ft(toy_base, tmp_path / "S", tmp_path / "d", budget=160, save_every=48)
    assert [s["images_seen"] for s in longer["snapshots"]] == [48, 96, 144, 160]
    a, b = load_file(longer["final"]), load_file(direct["final"])
    assert all(torch.equal(a[k], b[k]) for k in a)
