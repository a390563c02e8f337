"""torchrun with 2 CPU ranks (gloo): world-size invariance, DDP = single process, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import hang_guard, run_guarded

pytestmark = pytest.mark.slow


def _neon(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("neon")
    return [str(exe) if exe.exists() else "neon", *args]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    # '--' ends torchrun's own options: without it torchrun takes '--num' for its '--numa-binding'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "neon_cli", "--", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _shards(d: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(str(f)) for f in sorted(d.glob("shard-*.safetensors"))}


def test_synth_is_identical_with_one_and_two_ranks(tmp_path):
    args = ["synth", "digits", "--num-images", "500", "--shard-size", "100", "--batch", "50", "--set", "steps=6", "-q"]
    subprocess.run(_neon(*args, "-o", str(tmp_path / "one")), check=True, capture_output=True)
    _torchrun(*args, "-o", str(tmp_path / "two"), "--report", str(tmp_path / "two.json"))
    one, two = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 5
    for name in one:
        for k in ("images", "labels", "seeds"):
            assert torch.equal(one[name][k], two[name][k]), (name, k)
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert json.loads((tmp_path / "two.json").read_text())["status"] == "ok"  # rank 0 wrote the report


def test_ddp_finetune_matches_single_process(toyfam, toy_base, tmp_path):
    S = tmp_path / "S"
    subprocess.run(_neon("synth", "toy", "--model", str(toy_base), "--num-images", "96", "--shard-size", "32", "-o", str(S), "-q"), check=True)
    common = ["finetune", "toy", "--model", str(toy_base), "--data", str(S), "--budget", "200", "--batch", "16", "--lr", "0.05", "-q"]
    subprocess.run(_neon(*common, "-o", str(tmp_path / "one")), check=True, capture_output=True)
    _torchrun(*common, "-o", str(tmp_path / "two"))
    a = load_file(str(tmp_path / "one" / "theta_s-000000200.safetensors"))
    b = load_file(str(tmp_path / "two" / "theta_s-000000200.safetensors"))
    assert not torch.equal(a["mu"], toyfam.load(str(toy_base)).mu.detach())  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _kill_when(cmd: list[str], path: Path) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, limit = time.time(), hang_guard()
    while not path.exists():
        assert proc.poll() is None, "finished before it could be killed"
        if time.time() - t0 > limit:
            proc.kill()
            pytest.fail(f"{path} not written within the hang guard of {limit:.0f} s (NEON_TEST_TIMEOUT raises it)")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_synth_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    args = ["synth", "digits", "--num-images", "2000", "--shard-size", "100", "--batch", "100", "--set", "steps=4", "-q"]
    _kill_when(_neon(*args, "-o", str(tmp_path / "k")), tmp_path / "k" / "shard-00002.safetensors")
    assert not (tmp_path / "k" / "manifest.json").exists()
    made_before = len(list((tmp_path / "k").glob("shard-*.safetensors")))
    assert 3 <= made_before < 20
    subprocess.run(_neon(*args, "-o", str(tmp_path / "k"), "--report", str(tmp_path / "r.json")), check=True)
    assert json.loads((tmp_path / "r.json").read_text())["results"]["shards_made"] == 20 - made_before
    subprocess.run(_neon(*args, "-o", str(tmp_path / "u")), check=True)
    k, u = _shards(tmp_path / "k"), _shards(tmp_path / "u")
    assert all(torch.equal(k[n]["images"], u[n]["images"]) for n in u)
    assert not list((tmp_path / "k").glob(".*tmp*"))  # no temporary file mistaken for, or left beside, a shard


def test_finetune_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    S = tmp_path / "S"
    subprocess.run(_neon("synth", "digits", "--num-images", "600", "--set", "steps=4", "-o", str(S), "-q"), check=True)
    args = ["finetune", "digits", "--data", str(S), "--budget", "7680", "--save-every", "1280", "-q"]
    _kill_when(_neon(*args, "-o", str(tmp_path / "k")), tmp_path / "k" / "train_state.pt")
    assert not (tmp_path / "k" / "theta_s-000007680.safetensors").exists()
    subprocess.run(_neon(*args, "-o", str(tmp_path / "k")), check=True)
    subprocess.run(_neon(*args, "-o", str(tmp_path / "u")), check=True)
    a = load_file(str(tmp_path / "k" / "theta_s-000007680.safetensors"))
    b = load_file(str(tmp_path / "u" / "theta_s-000007680.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_eval_metrics_equal_with_one_and_two_ranks(tmp_path):
    args = ["eval", "digits", "--num-samples", "300", "--batch", "100", "--set", "steps=4"]
    one = subprocess.run(_neon(*args, "--report", str(tmp_path / "one.json"), "-q"), check=True, capture_output=True)
    _torchrun(*args, "--report", str(tmp_path / "two.json"), "-q")
    m1 = json.loads((tmp_path / "one.json").read_text())["results"]["metrics"]
    m2 = json.loads((tmp_path / "two.json").read_text())["results"]["metrics"]
    for k in m1:
        if k != "seconds":
            assert m1[k] == m2[k], k


def test_tune_w_two_ranks_take_the_same_decisions_as_one(toyfam, toy_base, tmp_path):
    S, ft = tmp_path / "S", tmp_path / "ft"
    subprocess.run(_neon("synth", "toy", "--model", str(toy_base), "--num-images", "64", "-o", str(S), "-q"), check=True)
    subprocess.run(_neon("finetune", "toy", "--model", str(toy_base), "--data", str(S), "--budget", "160", "-o", str(ft), "-q"), check=True)
    snap = str(ft / "theta_s-000000160.safetensors")
    args = ["tune-w", "toy", "--base", str(toy_base), "--selftrained", snap, "--num-samples", "300", "--batch", "100",
            "--max-evals", "6", "-q"]
    subprocess.run(_neon(*args, "--report", str(tmp_path / "one.json"), "--cache", str(tmp_path / "one.jsonl")), check=True)
    _torchrun(*args, "--report", str(tmp_path / "two.json"), "--cache", str(tmp_path / "two.jsonl"), "-o", str(tmp_path / "best.safetensors"))
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    assert [e["w"] for e in one["evaluations"]] == [e["w"] for e in two["evaluations"]]
    assert [e["value"] for e in one["evaluations"]] == [e["value"] for e in two["evaluations"]]
    # rank 0 alone wrote the cache: one line per evaluation, not two
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == len(two["evaluations"])
    assert (tmp_path / "best.safetensors").exists()


INCEPTION_FAMILY = Path(__file__).resolve().parent / "fixtures" / "inception_family.py"


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
def test_eval_of_an_inception_scored_family_on_two_ranks_equals_one(tmp_path):
    """A family whose metric runs the Inception detector (as diffusers/flow do) under torchrun: every
    rank takes part in the detector's all-gather (it used to be rank 0 alone: a hang), and the FID
    is over all the images, equal to one process's."""
    import numpy as np

    from test_inception import TinyDetector  # the suite's stand-in for the TorchScript inception-2015-12-05.pt

    from neon_cli import inception as I
    from neon_cli.metrics import save_stats

    det = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(TinyDetector()).save(str(det))
    real = np.random.default_rng(1).integers(0, 256, (64, 3, 8, 8), dtype=np.uint8)
    mu, sigma, _ = I.compute_stats(I.load_detector(det, "cpu"), real, batch=32)
    save_stats(tmp_path / "ref.npz", mu, sigma)
    spec = f"{INCEPTION_FAMILY}:family"
    fam = __import__("importlib").import_module("neon_cli.family").get_family(spec)
    fam.save(fam.new(), str(tmp_path / "m.safetensors"), {})
    args = ["eval", spec, "--model", str(tmp_path / "m.safetensors"), "--num-samples", "90", "--batch", "20",
            "--detector", str(det), "--ref-stats", str(tmp_path / "ref.npz"), "-q"]
    run_guarded(_neon(*args, "--report", str(tmp_path / "one.json")), "neon eval (one process)", check=True,
                capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "neon_cli", *args,
           "--report", str(tmp_path / "two.json")]
    # a hang here is the bug this test is for (rank 0 scoring alone while the detector waits for rank 1)
    res = run_guarded(cmd, "eval under torchrun (2 ranks)", default=1200.0, capture_output=True, text=True,
                      env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    assert one["metrics"]["fid"] > 0
    assert two["metrics"]["fid"] == pytest.approx(one["metrics"]["fid"], rel=1e-6)
    # the FID is over all 90 images: scoring only one rank's half gives another value
    images = fam.sample(fam.load(str(tmp_path / "m.safetensors")), torch.arange(10_000_000, 10_000_045), None, {})
    from neon_cli.metrics import feature_stats, frechet_distance

    half = frechet_distance(*feature_stats(I.compute_features(I.load_detector(det, "cpu"), images.numpy())), mu, sigma)
    assert abs(half - two["metrics"]["fid"]) > 1e-6 * one["metrics"]["fid"]
