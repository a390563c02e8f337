"""Nothing lost (issue 12) for synth, finetune, eval, align and ref-stats: no output flag touches an
input, one writer per output folder, a failed run does not block its fix, one error boundary,
resume only of the same run."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, safe_open
from typer.testing import CliRunner

from neon_cli.commands import app

runner = CliRunner()


def _invoke(*args: str, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def _one_error_line(res, cmd: str) -> str:
    assert not res.stderr.startswith("\n"), repr(res.stderr[:200])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"neon {cmd}: error: "), lines[0]
    assert "Traceback" not in res.stderr
    return lines[0]


def _bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


@pytest.fixture
def S(toyfam, toy_base, tmp_path):
    """A small complete toy synthetic set."""
    out = tmp_path / "S"
    res = _invoke("synth", "toy", "--model", toy_base, "-n", "48", "--shard-size", "16", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    return out


# ----------------------------------------------------------------------------------------------
# 1. no output flag can touch an input


def _spellings(target: Path, tmp_path: Path, monkeypatch) -> dict[str, str]:
    """The same file named four ways: itself, a symlink, a hard link, ./name from its folder."""
    link = tmp_path / "link-to-input"
    link.symlink_to(target)
    hard = tmp_path / "hard-link-to-input"
    os.link(target, hard)
    monkeypatch.chdir(target.parent)
    return {"same": str(target), "symlink": str(link), "hardlink": str(hard), "dot": f"./{target.name}"}


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dot"])
def test_synth_report_cannot_replace_the_model(how, toyfam, toy_base, tmp_path, monkeypatch):
    before = _bytes(toy_base)
    report = _spellings(toy_base, tmp_path, monkeypatch)[how]
    res = _invoke("synth", "toy", "--model", toy_base.name if how == "dot" else toy_base, "-n", "8",
                  "-o", tmp_path / "S", "--report", report)
    assert res.exit_code == 2
    assert "--report" in _one_error_line(res, "synth")
    assert _bytes(toy_base) == before  # not even the error report went there
    assert not (tmp_path / "S").exists()


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dot"])
def test_eval_report_cannot_replace_model_detector_or_ref_stats(how, toyfam, toy_base, tmp_path, monkeypatch):
    before = _bytes(toy_base)
    report = _spellings(toy_base, tmp_path, monkeypatch)[how]
    res = _invoke("eval", "toy", "--model", toy_base, "--num-samples", "8", "--report", report)
    assert res.exit_code == 2 and "--report" in _one_error_line(res, "eval")
    assert _bytes(toy_base) == before
    for flag in ("--detector", "--ref-stats"):
        other = tmp_path / f"input{flag}.bin"
        other.write_bytes(b"not to be replaced")
        res = _invoke("eval", "toy", "--model", toy_base, "--num-samples", "8", flag, other, "--report", other)
        assert res.exit_code == 2 and flag in _one_error_line(res, "eval")
        assert other.read_bytes() == b"not to be replaced"


def test_eval_report_cannot_replace_the_default_model(digits, tmp_path, monkeypatch):
    """The embedded default is an input too, though no flag names it (a copy stands in for it, so a
    regression cannot damage the shipped file)."""
    default = tmp_path / "base.safetensors"
    default.write_bytes(_bytes(Path(digits.default_model)))
    monkeypatch.setattr(type(digits), "default_model", property(lambda self: str(default)))
    link = tmp_path / "r.json"
    link.symlink_to(default)
    before = _bytes(default)
    res = _invoke("eval", "digits", "--num-samples", "8", "--set", "steps=1", "--report", link)
    assert res.exit_code == 2 and "--report" in _one_error_line(res, "eval")
    assert _bytes(default) == before


def test_finetune_outputs_cannot_touch_model_or_data(toyfam, toy_base, S, tmp_path):
    manifest = _bytes(S / "manifest.json")
    base = _bytes(toy_base)
    common = ["finetune", "toy", "--model", toy_base, "--data", S, "--budget", "32", "-q"]
    for extra, flag in ((["-o", S], "-o"), (["-o", S / "ft"], "-o"), (["-o", tmp_path / "ft", "--report", S / "manifest.json"], "--report"),
                        (["-o", tmp_path / "ft", "--report", toy_base], "--report")):
        res = _invoke(*common, *extra)
        assert res.exit_code == 2, res.output
        assert _one_error_line(res, "finetune").split("error: ")[1].startswith(flag)
    assert _bytes(S / "manifest.json") == manifest and _bytes(toy_base) == base
    assert not (S / "ft").exists() and not (tmp_path / "ft").exists()
    assert sorted(p.name for p in S.iterdir() if not p.name.startswith(".")) == ["manifest.json", "plan.json",
                                                                                 "shard-00000.safetensors", "shard-00001.safetensors",
                                                                                 "shard-00002.safetensors"]


def test_synth_out_cannot_be_the_model(toyfam, toy_base, tmp_path):
    before = _bytes(toy_base)
    res = _invoke("synth", "toy", "--model", toy_base, "-n", "8", "-o", toy_base)
    assert res.exit_code == 2 and "'--out' / '-o'" in res.stderr  # click's own check: -o must be a folder
    assert _bytes(toy_base) == before


def test_align_report_cannot_replace_an_input(toyfam, toy_base, tmp_path):
    ts = tmp_path / "ts.safetensors"
    ts.write_bytes(_bytes(toy_base))
    res = _invoke("align", "toy", "--base", toy_base, "--selftrained", ts, "--real", tmp_path, "--report", ts)
    assert res.exit_code == 2 and "--report" in _one_error_line(res, "align")
    assert _bytes(ts) == _bytes(toy_base)


def test_ref_stats_outputs_cannot_replace_images_or_detector(tmp_path):
    images = tmp_path / "real.npz"
    np.savez(images, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    det = tmp_path / "det.pt"
    det.write_bytes(b"PK\x03\x04 stand-in")
    before = (_bytes(images), _bytes(det))
    for extra, flag in ((["-o", images], "-o"), (["-o", tmp_path / "o.npz", "--report", det], "--report"),
                        (["-o", tmp_path / "o.npz", "--report", images], "--report")):
        res = _invoke("ref-stats", "--images", images, "--detector", det, *extra)
        assert res.exit_code == 2 and flag in _one_error_line(res, "ref-stats"), res.stderr
    assert (_bytes(images), _bytes(det)) == before


# ----------------------------------------------------------------------------------------------
# 3. one writer per output folder


def test_synth_and_finetune_refuse_a_locked_output(toyfam, toy_base, S, tmp_path):
    from neon_cli.fsutil import exclusive_lock

    with exclusive_lock(tmp_path / "S2", folder=True):
        res = _invoke("synth", "toy", "--model", toy_base, "-n", "8", "-o", tmp_path / "S2")
        assert res.exit_code == 2 and "is being written by another neon run" in _one_error_line(res, "synth")
    assert not (tmp_path / "S2" / "plan.json").exists()
    with exclusive_lock(tmp_path / "ft", folder=True):
        res = _invoke("finetune", "toy", "--model", toy_base, "--data", S, "--budget", "32", "-o", tmp_path / "ft")
        assert res.exit_code == 2 and "is being written by another neon run" in _one_error_line(res, "finetune")
    assert list((tmp_path / "ft").iterdir()) == []  # the refused run wrote nothing; the holder removed its lock
    res = _invoke("finetune", "toy", "--model", toy_base, "--data", S, "--budget", "32", "-o", tmp_path / "ft", "-q")
    assert res.exit_code == 0, res.output  # released with its holder


def _neon(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("neon")
    return [str(exe) if exe.exists() else "neon", *map(str, args)]


@pytest.mark.slow
def test_two_concurrent_synth_runs_cannot_mix_a_set(tmp_path):
    """The second run, with other settings, on the folder the first is writing: refused in one line
    (exit 2), and every shard on disk is the first run's."""
    S = tmp_path / "S"
    # long enough that it is still running when the second one has started (it is killed then)
    first = subprocess.Popen(_neon("synth", "digits", "-n", "400000", "--shard-size", "100", "--batch", "100",
                                   "--set", "steps=4", "-o", S, "-q"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        t0 = time.time()
        while not (S / "plan.json").exists():  # the first run holds the lock and has loaded its model
            assert first.poll() is None, first.stderr.read()
            assert time.time() - t0 < 120
            time.sleep(0.02)
        second = subprocess.run(_neon("synth", "digits", "-n", "400000", "--shard-size", "100", "--batch", "100",
                                      "--set", "steps=5", "-o", S, "-q"), capture_output=True, text=True)
        assert first.poll() is None, "the first run finished before the second started; make it longer"
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is being written by another neon run (pid" in lines[0], second.stderr
    assert json.loads((S / "plan.json").read_text())["settings"]["steps"] == 4
    for f in S.glob("shard-*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            assert json.loads(json.loads(fh.metadata()["neon"])["settings"])["steps"] == 4


# ----------------------------------------------------------------------------------------------
# 4. a failed run does not block its fix


def test_synth_with_an_unloadable_model_leaves_no_plan(toyfam, toy_base, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    S = tmp_path / "S"
    res = _invoke("synth", "toy", "--model", bad, "-n", "8", "-o", S)
    assert res.exit_code != 0
    _one_error_line(res, "synth")
    assert not (S / "plan.json").exists()
    res = _invoke("synth", "toy", "--model", toy_base, "-n", "8", "-o", S, "-q")
    assert res.exit_code == 0, res.output


def test_synth_replaces_a_plan_that_made_no_shard_and_cleans_stale_tmp(toyfam, toy_base, tmp_path):
    S = tmp_path / "S"
    S.mkdir()
    (S / "plan.json").write_text(json.dumps({"family": "toy", "model": {"sha256": "0" * 64}, "settings": {}, "seed": 0,
                                             "num": 8, "shard_size": 1000}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = S / f".shard-00000.safetensors.tmp-{dead.pid}"
    stale.write_bytes(b"partial shard of a killed run")
    res = _invoke("synth", "toy", "--model", toy_base, "-n", "8", "-o", S, "-q")
    assert res.exit_code == 0, res.output
    assert not stale.exists()
    assert json.loads((S / "plan.json").read_text())["settings"] == {"temperature": 0.8}
    # a plan whose shards exist is still protected
    res = _invoke("synth", "toy", "--model", toy_base, "-n", "8", "--set", "temperature=1", "-o", S)
    assert res.exit_code == 2 and "another settings" in _one_error_line(res, "synth")


# ----------------------------------------------------------------------------------------------
# 6. one error boundary


def _fail_save(exc):
    def save_file(*a, **k):
        raise exc
    return save_file


@pytest.mark.parametrize("code,exc,text", [
    (3, OSError(errno.ENOSPC, "No space left on device", "S/shard"), "No space left on device"),
    (3, OSError(errno.EROFS, "Read-only file system", "S/shard"), "Read-only file system"),
    (3, PermissionError(errno.EACCES, "Permission denied", "S/shard"), "Permission denied"),
    (4, RuntimeError("boom\nsecond line of a torch message"), "RuntimeError: boom"),
    (4, KeyError("ema"), "KeyError: 'ema'"),
])
def test_any_exception_is_one_line_with_an_exit_code_and_an_error_report(code, exc, text, toyfam, toy_base, tmp_path,
                                                                          monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _fail_save(exc))
    rep = tmp_path / "r.json"
    res = _invoke("synth", "toy", "--model", toy_base, "-n", "8", "-o", tmp_path / "S", "--report", rep, "-q")
    assert res.exit_code == code
    line = _one_error_line(res, "synth")
    assert text in line and "second line" not in line
    data = json.loads(rep.read_text())
    assert data["status"] == "error" and text in data["error"]
    assert not list((tmp_path / "S").glob("shard-*")) and not list((tmp_path / "S").glob(".shard-*"))


def test_neon_debug_shows_the_traceback(toyfam, toy_base, tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _fail_save(RuntimeError("boom")))
    res = _invoke("synth", "toy", "--model", toy_base, "-n", "8", "-o", tmp_path / "S", env={"NEON_DEBUG": "1"})
    assert isinstance(res.exception, RuntimeError)


def test_a_bad_value_error_does_not_start_with_a_blank_line(tmp_path):
    # progress bars on (no -q): no display was started, so the error is the first and only line
    res = _invoke("eval", "digits", "--model", tmp_path / "missing.safetensors")
    assert res.exit_code == 2 and "--model" in _one_error_line(res, "eval")


@pytest.mark.parametrize("content", [b"not a torch file", "pickle"])
def test_a_refused_train_state_is_one_line(content, toyfam, toy_base, S, tmp_path):
    ft = tmp_path / "ft"
    ft.mkdir()
    if content == "pickle":  # a full pickle that torch.load(weights_only=True) refuses
        import collections

        torch.save({"model": collections.Counter(a=1), "x": Path("/")}, ft / "train_state.pt")
    else:
        (ft / "train_state.pt").write_bytes(content)
    res = _invoke("finetune", "toy", "--model", toy_base, "--data", S, "--budget", "32", "-o", ft)
    assert res.exit_code == 2
    line = _one_error_line(res, "finetune")
    assert "train_state.pt: not a neon training state" in line


# ----------------------------------------------------------------------------------------------
# 7. resume only what is the same run


def _finetune(toy_base, S, out, budget=32, **extra):
    args = ["finetune", "toy", "--model", toy_base, "--data", S, "--budget", str(budget), "--save-every", "16", "-o", out, "-q"]
    for k, v in extra.items():
        args += [k, str(v)]
    return _invoke(*args)


def test_resume_refuses_a_state_of_another_base_or_set(toyfam, toy_base, S, tmp_path):
    ft = tmp_path / "ft"
    assert _finetune(toy_base, S, ft).exit_code == 0
    other_base = tmp_path / "other.safetensors"
    m = toyfam.load(str(toy_base))
    with torch.no_grad():
        m.mu.add_(0.1)
    toyfam.save(m, str(other_base), {"train_images": "1000"})
    res = _finetune(other_base, S, ft, budget=64)
    assert res.exit_code == 2
    line = _one_error_line(res, "finetune")
    assert "train_state.pt" in line and "base_sha256" in line
    S2 = tmp_path / "S2"
    assert _invoke("synth", "toy", "--model", toy_base, "-n", "48", "--set", "temperature=0.7", "-o", S2, "-q").exit_code == 0
    res = _finetune(toy_base, S2, ft, budget=64)
    assert res.exit_code == 2
    line = _one_error_line(res, "finetune")
    assert "train_state.pt" in line and "synthetic_set_sha256" in line
    res = _finetune(toy_base, S, ft, budget=64, **{"--lr": 0.01})
    assert res.exit_code == 2 and "lr 0.05 != 0.01" in _one_error_line(res, "finetune")
    # the same run continues
    res = _finetune(toy_base, S, ft, budget=64)
    assert res.exit_code == 0, res.output
    assert [s["images_seen"] for s in json.loads((ft / "finetune.json").read_text())["snapshots"]] == [16, 32, 48, 64]


def test_a_state_without_provenance_is_not_resumed(toyfam, toy_base, S, tmp_path):
    ft = tmp_path / "ft"
    assert _finetune(toy_base, S, ft).exit_code == 0
    state = torch.load(ft / "train_state.pt", weights_only=True)
    del state["provenance"]
    torch.save(state, ft / "train_state.pt")
    res = _finetune(toy_base, S, ft, budget=64)
    assert res.exit_code == 2 and "without a recorded base_sha256" in _one_error_line(res, "finetune")


def test_stale_snapshots_of_another_run_are_not_listed(toyfam, toy_base, S, tmp_path):
    ft = tmp_path / "ft"
    ft.mkdir()
    stale = ft / "theta_s-000000008.safetensors"  # another run's snapshot (another interval)
    toyfam.save(toyfam.new(), str(stale), {"neon_role": "selftrained"})
    rep = tmp_path / "r.json"
    res = _invoke("finetune", "toy", "--model", toy_base, "--data", S, "--budget", "32", "--save-every", "16", "-o", ft,
                  "--report", rep, "--json", "-q")
    assert res.exit_code == 0, res.output
    snaps = json.loads(res.stdout)["snapshots"]
    assert [Path(s["path"]).name for s in snaps] == ["theta_s-000000016.safetensors", "theta_s-000000032.safetensors"]
    assert [o["path"] for o in json.loads(rep.read_text())["outputs"]] == [s["path"] for s in snaps]
    for s in snaps:
        assert s["sha256"] == __import__("neon_cli.fsutil", fromlist=["x"]).sha256_path(s["path"])
    # a rerun of the finished run lists the same, from the ledger in train_state.pt
    res = _invoke("finetune", "toy", "--model", toy_base, "--data", S, "--budget", "32", "--save-every", "16", "-o", ft,
                  "--json", "-q")
    assert json.loads(res.stdout)["snapshots"] == snaps
    assert load_file(str(stale))  # left alone, just not listed
