"""Exit codes and output streams as documented (issue 22 items 3, 4, 5, 7; issue 24 item 6):
malformed inputs are exit 2 naming the file, a full disk or read-only output exit 3 naming the
path, a full stdout one line and exit 3, non-finite merges and fine-tunes refused, SIGTERM handled
like Ctrl-C (exit 143, report ``interrupted``), warnings on stderr, ``--json`` errors as a JSON
object on stdout, tables whole in a pipe, no lock file left behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from neon_cli.commands import app
from cli_helpers import hang_guard, run_guarded

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _error(res, cmd: str, code: int) -> str:
    """The one error line of a failed run, after checking its exit code and that it is alone."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln[:4].isdigit()]  # progress lines are timestamped
    assert len(lines) == 1 and lines[0].startswith(f"neon {cmd}: error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    """Temporary or lock files in ``folder`` (recursively)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock"))


@pytest.fixture
def pair(tmp_path):
    torch.manual_seed(0)
    r = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    s = {k: v + 0.1 * torch.randn_like(v) for k, v in r.items()}
    save_file(r, str(tmp_path / "r.safetensors"))
    save_file(s, str(tmp_path / "s.safetensors"))
    return tmp_path / "r.safetensors", tmp_path / "s.safetensors"


# ----------------------------------------------------------------------------------------------
# malformed input files: exit 2, the file and what is wrong


def _deep_header(path: Path, depth: int = 100_000) -> None:
    head = b'{"a":' * depth + b"1" + b"}" * depth
    path.write_bytes(struct.pack("<Q", len(head)) + head)


@pytest.mark.parametrize("case,why", [
    ("empty", "empty file, 0 bytes"),
    ("truncated", "truncated or corrupt"),
    ("deep", "nested too deep"),
    ("folder", "folder"),
])
def test_a_malformed_checkpoint_is_exit_2_naming_it(case, why, pair, tmp_path):
    r, s = pair
    bad = tmp_path / f"{case}.safetensors"
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "truncated":
        bad.write_bytes(r.read_bytes()[:-20])
    elif case == "deep":
        _deep_header(bad)
    else:
        bad = tmp_path / "folder"
        bad.mkdir()
    for args in ((bad, s), (r, bad)):
        line = _error(_invoke("merge", *args, "--w", "1", "-o", tmp_path / "o.safetensors"), "merge", 2)
        assert str(bad) in line and why in line
    assert not (tmp_path / "o.safetensors").exists() and _leftovers(tmp_path) == []


def test_a_folder_as_model_is_exit_2_naming_it(toyfam, tmp_path):
    S = tmp_path / "S"
    S.mkdir()
    line = _error(_invoke("synth", "toy", "--model", S, "-n", "4", "-o", tmp_path / "S2"), "synth", 2)
    assert f"{S}: is a folder" in line


@pytest.fixture
def toyS(toyfam, toy_base, tmp_path):
    out = tmp_path / "S"
    res = _invoke("synth", "toy", "--model", toy_base, "-n", "48", "--shard-size", "16", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    return out


def test_an_empty_or_too_deep_manifest_is_exit_2_naming_it(toyS, toy_base, tmp_path):
    mf = toyS / "manifest.json"
    for content, why in ((b"", "empty file, 0 bytes"), (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deep")):
        mf.write_bytes(content)
        line = _error(_invoke("finetune", "toy", "--model", toy_base, "--data", toyS, "--budget", "16", "-o", tmp_path / "ft"),
                      "finetune", 2)
        assert f"{mf}: unreadable ({why})" in line
        line = _error(_invoke("export", toyS, "-o", tmp_path / "S.zip"), "export", 2)
        assert str(mf) in line and "not a readable neon synth manifest" in line
        line = _error(_invoke("export", toyS, "--format", "imagefolder", "-o", tmp_path / "F"), "export", 2)  # one reader
        assert str(mf) in line and "not a readable neon synth manifest" in line
    assert not (tmp_path / "S.zip").exists() and not (tmp_path / "F").exists()


def test_a_set_of_another_family_is_refused_by_name(toyS, toy_base, tmp_path):
    mf = toyS / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["family"] = "gaussian"
    mf.write_text(json.dumps(manifest))
    line = _error(_invoke("finetune", "toy", "--model", toy_base, "--data", toyS, "--budget", "16", "-o", tmp_path / "ft"),
                  "finetune", 2)
    assert f"--data: {toyS} is a synthetic set of family 'gaussian'" in line and "not of 'toy'" in line
    assert not (tmp_path / "ft").exists()  # refused before the output folder is made


# ----------------------------------------------------------------------------------------------
# the machine refused: exit 3, naming the path


def test_from_os_error_classes():
    from neon_cli.errors import CheckpointError, ResourceError, UsageError, from_os_error

    for num in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        err = from_os_error(OSError(num, os.strerror(num)), "out.safetensors: cannot write")
        assert isinstance(err, ResourceError) and err.exit_code == 3
        assert str(err) == f"out.safetensors: cannot write ({os.strerror(num)})"
    assert type(from_os_error(OSError(errno.ENOTDIR, "Not a directory"), "x")) is CheckpointError
    assert type(from_os_error(OSError(errno.EISDIR, "Is a directory"), "x", UsageError)) is UsageError


@pytest.mark.parametrize("num", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_merge_on_a_full_or_read_only_disk_is_exit_3_naming_the_output(num, pair, tmp_path, monkeypatch):
    import neon_cli.fsutil as fsutil

    real = os.replace

    def refuse(src, dst, *a, **k):
        if str(dst).endswith("o.safetensors"):
            raise OSError(num, os.strerror(num), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(fsutil.os, "replace", refuse)
    line = _error(_invoke("merge", *pair, "--w", "1", "-o", tmp_path / "o.safetensors"), "merge", 3)
    assert f"{tmp_path / 'o.safetensors'}: cannot write ({os.strerror(num)})" in line
    assert not (tmp_path / "o.safetensors").exists() and _leftovers(tmp_path) == []


def test_a_writer_on_a_full_disk_is_a_resource_error(tmp_path, monkeypatch):
    from neon_cli.checkpoint.safetensors_io import SafetensorsWriter
    from neon_cli.checkpoint.core import TensorSpec
    from neon_cli.errors import ResourceError

    wr = SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", "float32", (4,))], {})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wr, "_put", full)
    with pytest.raises(ResourceError, match=r"x\.safetensors: cannot write \(No space left on device\)"):
        wr.write("a", np.zeros(4, np.float32))
    wr.abort()


@pytest.mark.parametrize("how,args,reason", [
    ("full", ["plugins"], "No space left on device"),
    ("full", ["merge", "{r}", "{s}", "--w", "1", "-o", "{o}", "--json", "-q"], "No space left on device"),
    ("closed", ["merge", "{r}", "{s}", "--w", "1", "-o", "{o}", "-q"], "stdout is closed"),
])
def test_a_full_or_closed_stdout_is_one_line_and_exit_3(how, args, reason, pair, tmp_path):
    if how == "full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    r, s = pair
    argv = [a.format(r=r, s=s, o=tmp_path / "o.safetensors") for a in args]
    cmd = [sys.executable, "-m", "neon_cli", *argv, "--report", str(tmp_path / "rep.json")]
    if how == "closed":  # the shell starts neon with file descriptor 1 closed (`>&-`)
        p = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *cmd], stderr=subprocess.PIPE, text=True, timeout=hang_guard(3600.0))
    else:
        with open("/dev/full", "w") as full:
            p = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, timeout=hang_guard(3600.0))
    assert p.returncode == 3, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [f"neon {argv[0]}: error: cannot write the results to stdout ({reason})"], p.stderr
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["status"] == "error" and "stdout" in rep["error"]


# ----------------------------------------------------------------------------------------------
# no silent non-finite models


def test_merge_refuses_a_half_precision_overflow_and_names_float32(tmp_path):
    from neon_cli.errors import UsageError
    from neon_cli.merge import merge_checkpoints
    from neon_cli.report import Report

    r = torch.tensor([60000.0, 1.0, 30000.0], dtype=torch.float16)
    s = torch.tensor([50000.0, 1.5, 29984.0], dtype=torch.float16)
    save_file({"a_ok": torch.ones(3, dtype=torch.float16), "x": r}, str(tmp_path / "r.safetensors"))
    save_file({"a_ok": torch.ones(3, dtype=torch.float16) * 2, "x": s}, str(tmp_path / "s.safetensors"))
    out = tmp_path / "o.safetensors"
    # fp32 arithmetic: 60000 + 1.6 * 10000 = 76000 > 65504, the largest float16
    with pytest.raises(UsageError, match=r"tensor 'x': .* at w=1.6 gives 1 non-finite .*overflow float16.*--dtype float32"):
        merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [1.6], [out], report=Report("merge"))
    assert not out.exists() and _leftovers(tmp_path) == []
    # the hint is right: in float32 the same merge is finite and equals the formula
    merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [1.6], [out], dtype="float32", report=Report("merge"))
    got = load_file(str(out))["x"]
    rf, sf = r.float(), s.float()
    assert torch.isfinite(got).all() and torch.equal(got, (rf - sf) * torch.tensor(1.6) + rf)  # fp32, the merge's order


def test_merge_refuses_an_arithmetic_overflow_without_a_useless_dtype_hint(pair, tmp_path):
    rep = tmp_path / "rep.json"
    line = _error(_invoke("merge", *pair, "--w", "1e39", "-o", tmp_path / "o.safetensors", "--report", rep), "merge", 2)
    assert "at w=1e+39 gives" in line and "no output dtype helps" in line and "--dtype" not in line
    assert "--allow-nonfinite" in line and not (tmp_path / "o.safetensors").exists()
    assert json.loads(rep.read_text())["status"] == "error"
    res = _invoke("merge", *pair, "--w", "1e39", "-o", tmp_path / "o.safetensors", "--allow-nonfinite", "--json")
    assert res.exit_code == 0, res.output
    assert not torch.isfinite(load_file(str(tmp_path / "o.safetensors"))["w"]).any()
    assert json.loads(res.stdout)["nonfinite_results"][0]["tensors"] == {"b": 4, "w": 16}


def test_non_finite_inputs_kept_from_the_base_are_not_refused(tmp_path):
    from neon_cli.merge import merge_checkpoints
    from neon_cli.report import Report

    r = torch.tensor([float("inf"), 1.0, float("nan"), 2.0])
    s = torch.tensor([1.0, 1.5, 3.0, float("-inf")])
    save_file({"x": r}, str(tmp_path / "r.safetensors"))
    save_file({"x": s}, str(tmp_path / "s.safetensors"))
    res = merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [1.0], [tmp_path / "o.safetensors"],
                            report=Report("merge"))
    o = load_file(str(tmp_path / "o.safetensors"))["x"]
    assert o[0].item() == float("inf") and o[1].item() == 0.5 and o[2].isnan() and o[3].item() == 2.0
    assert res["nonfinite_kept"] == {"x": 3} and res["nonfinite_results"] == [{"w": 1.0, "tensors": {}}]


def test_finetune_stops_at_the_first_non_finite_loss_keeping_the_last_finite_snapshot(toyS, toy_base, tmp_path):
    import re

    ft = tmp_path / "ft"
    # lr ramps from 0 over 64 images: the first steps stay finite, then the weights explode
    rep = tmp_path / "rep.json"
    line = _error(_invoke("finetune", "toy", "--model", toy_base, "--data", toyS, "--budget", "64", "--batch", "8",
                          "--save-every", "8", "--warmup", "64", "--lr", "1e30", "-o", ft, "--report", rep), "finetune", 2)
    m = re.search(r"non-finite \((inf|-inf|nan)\) at step (\d+) \((\d+) images seen\); --lr 1e\+30 is most likely too high", line)
    assert m, line
    seen = int(m.group(3))
    snaps = sorted(ft.glob("theta_s-*.safetensors"))
    assert snaps and all(int(p.stem.split("-")[1]) < seen for p in snaps)  # nothing of the failing step
    assert f"the last snapshot, {snaps[-1].name}, is kept" in line
    for p in snaps:
        assert all(torch.isfinite(v).all() for v in load_file(str(p)).values()), p
    state = torch.load(ft / "train_state.pt", weights_only=True)
    assert state["images_seen"] == int(snaps[-1].stem.split("-")[1])
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert json.loads(rep.read_text())["status"] == "error" and not (ft / "finetune.json").exists()
    # a loss already non-finite after the first step: nothing written at all
    line = _error(_invoke("finetune", "toy", "--model", toy_base, "--data", toyS, "--budget", "64", "--batch", "8",
                          "--lr", "1e30", "-o", tmp_path / "ft2"), "finetune", 2)
    assert "non-finite" in line and "images seen" in line and "no snapshot was written" in line
    assert list((tmp_path / "ft2").iterdir()) == []


def test_a_non_finite_weight_is_never_snapshotted():
    """The check before each snapshot and training state: any inf/NaN parameter of the model or
    its EMA is refused by name, with the images seen and --lr."""
    from neon_cli.errors import UsageError
    from neon_cli.train import TrainConfig, _check_finite_weights

    net = torch.nn.Linear(2, 2)
    cfg = TrainConfig(budget=64, lr=0.5, batch=8)
    _check_finite_weights(net, None, 8, cfg, [])
    ema = torch.nn.Linear(2, 2)
    with torch.no_grad():
        ema.bias[1] = float("nan")
    with pytest.raises(UsageError, match=r"weight 'bias' became non-finite at 16 images seen; --lr 0.5 .*"
                                         r"the last snapshot, a\.pt, is kept"):
        _check_finite_weights(net, ema, 16, cfg, [{"file": "a.pt"}])


# ----------------------------------------------------------------------------------------------
# SIGTERM = Ctrl-C: temporaries cleaned, resumable, exit 143, report "interrupted"


def test_sigterm_is_handled_like_ctrl_c(toyS, toy_base, tmp_path):
    ft, rep = tmp_path / "ft", tmp_path / "rep.json"
    cmd = [sys.executable, "-m", "neon_cli", "finetune", "toy", "--model", str(toy_base), "--data", str(toyS),
           "--batch", "16", "--save-every", "128", "-o", str(ft), "--report", str(rep), "-q"]
    p = subprocess.Popen([*cmd, "--budget", "4000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not (ft / "train_state.pt").exists():  # hang guard only: a run normally gets here in seconds
            assert p.poll() is None and time.monotonic() - t0 < hang_guard(3600.0), "finetune ended or never wrote a training state (hang guard: NEON_TEST_TIMEOUT)"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=hang_guard(3600.0))
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == "neon finetune: terminated; outputs written so far are complete, rerun to resume"
    assert "Traceback" not in err
    report = json.loads(rep.read_text())
    assert report["status"] == "interrupted" and report["error"] == "terminated (SIGTERM)"
    assert _leftovers(ft) == []
    seen = torch.load(ft / "train_state.pt", weights_only=True)["images_seen"]
    assert seen >= 128
    # resumable: the same run continued (a budget a little past the state) starts from the state
    done = _invoke(*cmd[3:-1], "--budget", seen + 16, "--log-format", "plain")  # in-process: one torch start-up less
    assert done.exit_code == 0, done.output
    assert f"resuming from train_state.pt at {seen} images" in done.stderr
    assert json.loads(rep.read_text())["status"] == "ok" and _leftovers(ft) == []


# ----------------------------------------------------------------------------------------------
# stdout holds the results only; errors as JSON with --json; tables whole in a pipe; no lock files


def test_warnings_go_to_stderr_and_results_to_stdout(tmp_path):
    torch.manual_seed(0)
    sd = {"w": torch.randn(3, 3)}
    torch.save({"ema": sd, "model": {"w": torch.zeros(3, 3)}, "step": 5}, tmp_path / "r.pt")
    torch.save({"ema": {"w": sd["w"] + 1}, "model": {"w": torch.zeros(3, 3)}, "step": 6}, tmp_path / "s.pt")
    for extra in ([], ["--json"]):
        res = _invoke("merge", tmp_path / "r.pt", tmp_path / "s.pt", "--w", "1", "-o", tmp_path / "o.safetensors", "-q", *extra)
        assert res.exit_code == 0, res.output
        assert "neon merge: warning" not in res.stdout
        assert "neon merge: warning: base: merged the state dict at 'ema'" in res.stderr
        if extra:
            assert json.loads(res.stdout)["warnings"]


def test_json_errors_are_an_object_on_stdout(pair, tmp_path):
    res = _invoke("merge", tmp_path / "nosuch.safetensors", pair[1], "--w", "1", "-o", tmp_path / "o.safetensors", "--json")
    line = _error(res, "merge", 2)
    assert json.loads(res.stdout) == {"status": "error", "exit_code": 2, "error": line.split("error: ", 1)[1]}
    res = _invoke("synth", "toy", "-n", "abc", "-o", tmp_path / "S", "--json")  # refused by the flag parser itself
    assert res.exit_code == 2 and json.loads(res.stdout)["error"].startswith("Invalid value for '--num-images'")
    res = _invoke("merge", *pair, "--w", "nan", "-o", tmp_path / "o.safetensors")  # without --json: stdout stays empty
    assert res.exit_code == 2 and res.stdout == ""


def test_tables_are_not_cut_in_a_pipe(pair, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "neon-merged-output-w1.safetensors"
    res = _invoke("merge", *pair, "--w", "1", "-o", deep, "-q")
    assert res.exit_code == 0, res.output
    assert len(str(deep)) > 120 and any(str(deep) in ln for ln in res.stdout.splitlines())
    res = _invoke("plugins")
    assert res.exit_code == 0 and "…" not in res.stdout


def test_no_lock_file_is_left_after_a_clean_or_failed_run(toyS, toy_base, pair, tmp_path):
    assert _leftovers(toyS) == []  # synth
    ft = tmp_path / "ft"
    assert _invoke("finetune", "toy", "--model", toy_base, "--data", toyS, "--budget", "16", "-o", ft, "-q").exit_code == 0
    assert _leftovers(ft) == []
    _error(_invoke("finetune", "toy", "--model", toy_base, "--data", toyS, "--budget", "8", "-o", ft), "finetune", 2)
    assert _leftovers(ft) == []  # a refused resume (state past the budget) removes its lock too
    assert _invoke("merge", *pair, "--w", "1", "-o", tmp_path / "m.safetensors", "-q").exit_code == 0
    assert _leftovers(tmp_path) == []


def test_a_lock_removed_by_its_holder_is_never_shared(tmp_path, monkeypatch):
    """A run that locked the lock file just as its holder removed it does not keep a lock on the
    removed file: it locks the path's new file, so a third run is refused."""
    import fcntl

    from neon_cli.errors import UsageError
    from neon_cli.fsutil import exclusive_lock, lock_path

    lp = lock_path(tmp_path / "S", folder=True)
    real, calls = fcntl.flock, []

    def flock_then_removed(fd, op):
        real(fd, op)
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:
            os.unlink(lp)  # the previous holder removes its file right after we locked it

    monkeypatch.setattr(fcntl, "flock", flock_then_removed)
    with exclusive_lock(tmp_path / "S", folder=True) as held:
        assert len(calls) == 2 and os.stat(held).st_ino == calls[1]  # started over on the path's new file
        monkeypatch.setattr(fcntl, "flock", real)
        with pytest.raises(UsageError, match="being written by another neon run"):
            with exclusive_lock(tmp_path / "S", folder=True):
                pass
        assert held.exists()  # the refused run did not remove the holder's lock
    assert not lp.exists()


def test_a_write_failing_on_a_full_disk_is_a_resource_error_naming_the_output(tmp_path, monkeypatch):
    """Libraries that do not raise OSError on a full disk (safetensors: "... (os error 28)";
    torch.save: "unexpected pos ...") still give exit 3 naming the output, not the temporary."""
    import shutil

    from neon_cli.errors import ResourceError
    from neon_cli.fsutil import atomic_path

    out = tmp_path / "shard-00003.safetensors"
    with pytest.raises(ResourceError, match=rf"^{out}: cannot write \(No space left on device\)$"):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    # a message that says nothing, on a file system with (nearly) nothing free
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(ResourceError, match=rf"^{out}: cannot write \(No space left on device: 100 B free\)$"):
        with atomic_path(out) as tmp:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    # the same message with free space left is a bug, not the disk
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 0, 10**9))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with atomic_path(out) as tmp:
            raise RuntimeError("unexpected pos 576 vs 534")
    assert list(tmp_path.iterdir()) == []
