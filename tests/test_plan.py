"""The output plan (neon_cli.plan): no run writes over what it reads or writes, whatever the spelling;
nothing blocks on a FIFO; the failure report obeys the same plan (issue 22 items 1, 2 and 8).

Two layers:

* the cases of issue 22, run as a careless user would (most without ``--dry-run``: the refusal
  must come before any work, and the refused file's bytes must be unchanged, report included);
* an enumeration: every command x every output-ish flag (found in the typer app, so a new path
  flag fails ``test_every_path_option_is_classified`` until it is listed here) x every input, every
  file inside an input folder and every file inside an output folder, with ``--dry-run`` so it
  stays fast. Each case: exit 2, one line ``neon CMD: error: FLAG: ...``, the target's sha256 unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from neon_cli.commands import app
from neon_cli.errors import UsageError
from neon_cli.plan import Entry, Plan, check_plan, report_problem

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_click_group():
    """Build the click group of ``app`` once for this module's hundreds of invocations (typer's
    CliRunner rebuilds it from the signatures on every call, half of each refused run's time)."""
    import typer.testing

    group = typer.main.get_command(app)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(typer.testing, "_get_command", lambda a: group if a is app else typer.main.get_command(a))
        yield


def _sha(p: Path) -> str:
    """sha256 of a file's bytes (of a folder: of its files, neon_cli.fsutil.sha256_path)."""
    from neon_cli.fsutil import sha256_path

    return sha256_path(p) if Path(p).is_dir() else hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _neon(*args, fifo: Path | None = None):
    """Run ``neon ARGS`` in-process. ``fifo``: a watchdog opens it for writing after 20 s, so a run
    that blocks reading it gets EOF and fails its assertions instead of hanging the suite."""
    timer = None
    if fifo is not None:
        def unblock():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        timer = threading.Timer(20.0, unblock)
        timer.start()
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        if timer is not None:
            timer.cancel()


def _refused(res, cmd: str, flag: str) -> str:
    """Assert exit 2 and one error line naming ``flag``; returns the line."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"neon {cmd}: error: "), lines[0]
    assert flag in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# fixtures: folders shaped like the real thing (bytes need not load: every case is refused first)


def _files(root: Path, names: dict[str, bytes]) -> Path:
    for name, data in names.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


@pytest.fixture
def tree(tmp_path):
    t = {
        "CK": _files(tmp_path / "ck", {"model.safetensors.index.json": b'{"weight_map": {}}',
                                        "model-00001-of-00002.safetensors": b"shard1",
                                        "model-00002-of-00002.safetensors": b"shard2"}),
        "CK2": _files(tmp_path / "ck2", {"model.safetensors": b"theta_s"}),
        "PIPE": _files(tmp_path / "pipe", {"model_index.json": b"{}", "unet/config.json": b"{}",
                                            "unet/diffusion_pytorch_model.safetensors": b"unet"}),
        "S": _files(tmp_path / "S", {"manifest.json": b"{}", "plan.json": b"{}", "shard-00000.safetensors": b"imgs"}),
        "OUTDIR": _files(tmp_path / "out", {"manifest.json": b"{}", "shard-00000.safetensors": b"imgs",
                                            "theta_s-000000032.safetensors": b"snap", "finetune.json": b"{}",
                                            "train_state.pt": b"state", "model.safetensors.index.json": b"{}"}),
        "DET": _files(tmp_path, {"det.pt": b"detector"}) / "det.pt",
        "REF": _files(tmp_path, {"ref.npz": b"stats"}) / "ref.npz",
        "OUTFILE": tmp_path / "o.safetensors",
        "CACHE": tmp_path / "cache.jsonl",
        "PLOT": tmp_path / "plot.png",
        "REPORT": tmp_path / "report.json",
    }
    return t


# ---------------------------------------------------------------------------------------------
# the check itself, on plans built by hand


def test_same_file_in_every_spelling_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _files(tmp_path / "A", {"x.safetensors": b"x"})
    target = folder / "x.safetensors"
    os.symlink(target, tmp_path / "link.json")
    os.link(target, tmp_path / "hard.json")
    for spelling in (target, Path("A/x.safetensors"), tmp_path / "A" / ".." / "A" / "x.safetensors",
                     tmp_path / "link.json", tmp_path / "hard.json"):
        plan = Plan("t", reads=(Entry("--base", target),), writes=(Entry("--report", spelling),))
        with pytest.raises(UsageError, match=r"^--report: .* is also the input --base"):
            check_plan(plan)
        assert report_problem(plan) is not None
    # inside an input folder; the same plan without the overlap passes
    with pytest.raises(UsageError, match=r"^--report: .* is inside the input --base"):
        check_plan(Plan("t", reads=(Entry("--base", folder),), writes=(Entry("--report", folder / "new.json"),)))
    check_plan(Plan("t", reads=(Entry("--base", target),), writes=(Entry("--report", tmp_path / "r.json"),)))
    assert _sha(target) == hashlib.sha256(b"x").hexdigest()


def test_writes_inside_an_output_folder_must_be_its_own_files(tmp_path):
    out = tmp_path / "S2"
    own = Entry("-o member", out / "manifest.json", member_of="-o")
    ok = Plan("t", writes=(Entry("-o", out, folder=True), own, Entry("--report", tmp_path / "r.json")))
    check_plan(ok)
    for bad in (out / "manifest.json", out / "report.json"):
        plan = Plan("t", writes=(Entry("-o", out, folder=True), own, Entry("--report", bad)))
        with pytest.raises(UsageError, match="^--report: "):
            check_plan(plan)
        assert "--report" in (report_problem(plan) or "")
    # a problem that does not involve the report leaves the failure report allowed
    plan = Plan("t", reads=(Entry("base", tmp_path / "b"),), writes=(Entry("-o", tmp_path / "b"), Entry("--report", tmp_path / "r.json")))
    with pytest.raises(UsageError, match="^-o: .* is also the input base"):
        check_plan(plan)
    assert report_problem(plan) is None


def test_special_files_are_refused_as_outputs_and_inputs(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.symlink("/dev/null", tmp_path / "null-link")
    for target, what in ((Path("/dev/null"), "character device"), (tmp_path / "null-link", "character device"), (fifo, "FIFO")):
        with pytest.raises(UsageError, match=f"^--plot: .* is a {what}"):
            check_plan(Plan("t", writes=(Entry("--plot", target),)))
    with pytest.raises(UsageError, match="^base: .*fifo is a FIFO"):
        check_plan(Plan("t", reads=(Entry("base", fifo),)))
    (tmp_path / "S").mkdir()
    os.mkfifo(tmp_path / "S" / "manifest.json")
    with pytest.raises(UsageError, match="^--data: .*manifest.json is a FIFO"):  # a member is named by its folder's flag
        check_plan(Plan("t", reads=(Entry("--data member", tmp_path / "S" / "manifest.json", member_of="--data"),)))


# ---------------------------------------------------------------------------------------------
# issue 22's cases, end to end


def test_merge_report_over_an_input_index_is_refused_and_not_written(tree):
    index = tree["CK"] / "model.safetensors.index.json"
    before = _sha(index)
    for w in ("1", "nan"):  # also after an earlier usage error
        res = _neon("merge", tree["CK"], tree["CK2"], "--w", w, "-o", tree["OUTDIR"].parent / "N", "--report", index)
        line = _refused(res, "merge", "--report")
        assert "no report written" in line
        assert _sha(index) == before
    assert not (tree["OUTDIR"].parent / "N").exists()


@pytest.mark.parametrize("member", ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"])
def test_merge_report_over_a_pipeline_file_is_refused(tree, member):
    target = tree["PIPE"] / member
    before = _sha(target)
    res = _neon("merge", tree["PIPE"], tree["PIPE"], "--w", "1", "-o", tree["OUTDIR"].parent / "N", "--report", target)
    _refused(res, "merge", "--report")
    assert _sha(target) == before


def test_report_inside_the_own_output_is_refused(tree, tmp_path):
    out = tree["OUTDIR"]
    cases = [
        (["synth", "digits", "-n", "8", "-o", out], "manifest.json"),
        (["synth", "digits", "-n", "8", "-o", out], "shard-00000.safetensors"),
        (["finetune", "digits", "--data", tree["S"], "--budget", "64", "-o", out], "theta_s-000000032.safetensors"),
        (["finetune", "digits", "--data", tree["S"], "--budget", "64", "-o", out], "finetune.json"),
        (["merge", tree["CK"], tree["CK2"], "--w", "1", "-o", out], "model.safetensors.index.json"),
    ]
    for args, name in cases:
        before = _sha(out / name)
        res = _neon(*args, "--report", out / name, "-q")
        _refused(res, args[0], "--report")
        assert _sha(out / name) == before, (args[0], name)


def test_export_refuses_its_report_before_writing_the_zip(tree, tmp_path):
    zip_path = tmp_path / "S.zip"
    before = _sha(tree["S"] / "manifest.json")
    res = _neon("export", tree["S"], "-o", zip_path, "--report", tree["S"] / "manifest.json")
    _refused(res, "export", "--report")
    assert not zip_path.exists()
    assert _sha(tree["S"] / "manifest.json") == before


def test_report_on_a_device_or_a_link_to_one_gets_no_report(tmp_path):
    os.symlink("/dev/null", tmp_path / "null")
    for target in ("/dev/null", tmp_path / "null"):
        res = _neon("plugins", "--report", target)
        line = _refused(res, "plugins", "--report")
        assert "character device" in line and "no report written" in line
    assert os.path.islink(tmp_path / "null") and Path("/dev/null").is_char_device()


@pytest.fixture
def shipped(digits):
    """The digits family's shipped files, restored byte for byte after the test whatever happens."""
    from neon_cli.family import files_read

    paths = [Path(digits.default_model)] + [p for _, p in files_read(digits, {})]
    saved = {p: p.read_bytes() for p in paths}
    yield paths
    for p, data in saved.items():
        if p.read_bytes() != data:
            p.write_bytes(data)


def test_files_a_family_loads_unnamed_are_protected(shipped, tmp_path):
    base, classifier = shipped
    assert classifier.name == "classifier.safetensors"
    for cmd in (["eval", "digits", "--num-samples", "8"], ["synth", "digits", "-n", "8", "-o", tmp_path / "S"]):
        for target in (base, classifier):
            before = _sha(target)
            _refused(_neon(*cmd, "--report", target, "-q"), cmd[0], "--report")
            assert _sha(target) == before
    assert not (tmp_path / "S").exists()


def test_a_glob_match_is_protected(tree):
    snap = tree["CK2"] / "model.safetensors"
    before = _sha(snap)
    res = _neon("tune-w", "digits", "--selftrained", str(tree["CK2"] / "*.safetensors"), "--cache", snap, "-q")
    _refused(res, "tune-w", "--cache")
    assert _sha(snap) == before


def test_fifo_inputs_are_refused_by_name_before_opening(tree, tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    shard_fifo = tree["CK"] / "model-00003-of-00003.safetensors"
    os.mkfifo(shard_fifo)
    manifest = tree["S"] / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    cases = [
        (("merge", fifo, tree["CK2"], "--w", "1", "-o", tmp_path / "n.safetensors"), "base", fifo),
        (("merge", tree["CK"], tree["CK2"], "--w", "1", "-o", tmp_path / "n.safetensors"), "base", shard_fifo),
        (("inspect", fifo), "CHECKPOINT", fifo),
        (("eval", "digits", "--model", fifo, "-n", "8"), "--model", fifo),
        (("tune-w", "digits", "-s", fifo), "--selftrained", fifo),
        (("finetune", "digits", "--data", tree["S"], "--budget", "64", "-o", tmp_path / "ft"), "--data", manifest),
    ]
    for args, flag, f in cases:
        line = _refused(_neon(*args, "-q", fifo=f), args[0], flag)
        assert "FIFO" in line and Path(f).name in line
    assert not (tmp_path / "ft").exists() and not (tmp_path / "n.safetensors").exists()


@pytest.mark.parametrize("args", [
    ["synth", "digits", "-n", "8", "-o", ""],
    ["finetune", "digits", "--data", "S", "--budget", "64", "-o", ""],
    ["demo", "-o", ""],
    ["export", "S", "-o", ""],
    ["ref-stats", "--images", "S", "-o", ""],
    ["merge", "a", "b", "--w", "1", "-o", ""],
    ["tune-w", "digits", "-s", "x", "--cache", ""],
])
def test_empty_output_path_is_refused_everywhere(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _neon(*args, "-q")
    flag = "-o" if "-o" in args else "--cache"
    if "Usage:" in res.stderr:  # a file-only option: click itself refuses '' (exit 2) before neon runs
        assert res.exit_code == 2 and flag in res.stderr and "''" in res.stderr
    else:
        assert "empty path" in _refused(res, args[0], flag)
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_the_plan_for_every_command_and_does_nothing(tree, tmp_path):
    for cmd, args in _templates(tree).items():
        if cmd == "merge":  # its dry run validates the checkpoints' headers: real files below
            continue
        res = _neon(*args, "--report", tree["REPORT"], "--dry-run", "--json", "-q" if cmd != "plugins" else "--json")
        assert res.exit_code == 0, (cmd, res.output)
        plan = json.loads(res.stdout)["plan"]
        assert plan["command"] == cmd
        assert {"role": "--report", "path": str(tree["REPORT"])} in plan["writes"]
        for flag, key in INPUTS.get(cmd, {}).items():
            assert any(e["role"] == flag and e["path"] == str(tree[key]) for e in plan["reads"]), (cmd, flag, plan["reads"])
        tree["REPORT"].unlink()  # the report of a dry run is written (as merge's always was); nothing else
    assert not tree["OUTFILE"].exists() and not tree["CACHE"].exists() and not tree["PLOT"].exists()
    assert sorted(p.name for p in tree["OUTDIR"].iterdir()) == sorted(
        ["manifest.json", "shard-00000.safetensors", "theta_s-000000032.safetensors", "finetune.json", "train_state.pt",
         "model.safetensors.index.json"])
    # merge keeps its own dry-run fields beside the plan (real checkpoints: it validates headers)
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.ones(3, np.float32)}, str(tmp_path / "r.safetensors"))
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "s.safetensors"))
    res = _neon("merge", tmp_path / "r.safetensors", tmp_path / "s.safetensors", "--w", "1", "-o", tmp_path / "n.safetensors",
                "--dry-run", "--json", "-q")
    data = json.loads(res.stdout)
    assert data["dry_run"] is True and data["tensors_total"] == 1 and data["plan"]["writes"][0]["role"] == "-o"
    assert not (tmp_path / "n.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# the enumeration

#: every path-like parameter of every command: "out" (written), "in" (read) or "other".
PATH_PARAMS: dict[tuple[str, str], str] = {
    ("synth", "--model"): "in", ("synth", "--out"): "out", ("synth", "--report"): "out",
    ("finetune", "--model"): "in", ("finetune", "--data"): "in", ("finetune", "--out"): "out", ("finetune", "--report"): "out",
    ("merge", "BASE"): "in", ("merge", "SELFTRAINED"): "in", ("merge", "--out"): "out", ("merge", "--report"): "out",
    ("inspect", "CHECKPOINT"): "in", ("inspect", "--report"): "out",
    ("tune-w", "--base"): "in", ("tune-w", "--selftrained"): "in", ("tune-w", "SELFTRAINED"): "in",
    ("tune-w", "--cache"): "out", ("tune-w", "--out"): "out", ("tune-w", "--plot"): "out", ("tune-w", "--control"): "in",
    ("tune-w", "--detector"): "in", ("tune-w", "--ref-stats"): "in", ("tune-w", "--report"): "out",
    ("eval", "--model"): "in", ("eval", "--detector"): "in", ("eval", "--ref-stats"): "in", ("eval", "--report"): "out",
    ("fid", "A"): "in", ("fid", "B"): "in", ("fid", "--detector"): "in", ("fid", "--report"): "out",
    ("export", "DATA"): "in", ("export", "--out"): "out", ("export", "--report"): "out",
    ("demo", "--out"): "out", ("demo", "--base"): "in", ("demo", "--report"): "out",
    ("align", "--base"): "in", ("align", "--selftrained"): "in", ("align", "--synthetic"): "in", ("align", "--real"): "in",
    ("align", "--report"): "out",
    ("ref-stats", "--images"): "in", ("ref-stats", "--out"): "out", ("ref-stats", "--detector"): "in", ("ref-stats", "--report"): "out",
    ("plugins", "--report"): "out",
}

#: names that make an option path-like even when typed as str (merge -o, tune-w -s, --detector).
_PATHY = {"SELFTRAINED", "--out", "--report", "--cache", "--plot", "--detector", "--ref-stats", "--selftrained", "--control", "--base",
          "--model", "--data", "--images", "--synthetic", "--real"}


def path_params() -> set[tuple[str, str]]:
    group = typer.main.get_command(app)
    out = set()
    for name, cmd in group.commands.items():
        for p in cmd.params:
            desc = getattr(p, "type_descriptor", None)
            ann = getattr(desc, "annotation", None)
            label = max(p.opts, key=len) if p.param_type_name == "option" else (p.metavar or p.name.upper())
            if ann is Path or (label in _PATHY and ann is not bool):
                out.add((name, label))
    return out


def test_every_path_option_is_classified():
    found = path_params()
    assert found - set(PATH_PARAMS) == set(), "classify these path options in PATH_PARAMS (and give their plan an entry)"
    assert set(PATH_PARAMS) - found == set()


#: the value each command's output-ish flags get in the enumeration (the flag itself is the key).
OUT_VALUE = {"--out": "OUTFILE", "--cache": "CACHE", "--plot": "PLOT", "--report": "REPORT"}
FOLDER_OUT = {"synth", "finetune", "demo"}  # -o is a folder (the existing OUTDIR with its files)

#: the inputs each template names (flag or role in the plan -> tree key)
INPUTS = {
    "synth": {"--model": "CK"}, "finetune": {"--model": "CK", "--data": "S"}, "merge": {"base": "CK", "selftrained": "CK2"},
    "inspect": {"CHECKPOINT": "PIPE"}, "tune-w": {"--base": "CK", "--selftrained": "CK2", "--detector": "DET", "--ref-stats": "REF"},
    "eval": {"--model": "CK", "--detector": "DET", "--ref-stats": "REF"}, "fid": {"A": "PIPE", "B": "REF", "--detector": "DET"},
    "export": {"DATA": "S"}, "demo": {"--base": "CK"},
    "align": {"--base": "CK", "--selftrained": "CK2", "--synthetic": "S", "--real": "PIPE"},
    "ref-stats": {"--images": "PIPE", "--detector": "DET"}, "plugins": {},
}


def _templates(t: dict[str, Path]) -> dict[str, list]:
    """Each command with every input named (the outputs come from OUT_VALUE / FOLDER_OUT)."""
    return {
        "synth": ["synth", "digits", "--model", t["CK"], "-n", "8", "-o", t["OUTDIR"]],
        "finetune": ["finetune", "digits", "--model", t["CK"], "--data", t["S"], "--budget", "64", "-o", t["OUTDIR"]],
        "merge": ["merge", t["CK"], t["CK2"], "--w", "1", "-o", t["OUTFILE"]],
        "inspect": ["inspect", t["PIPE"]],
        "tune-w": ["tune-w", "digits", "--base", t["CK"], "-s", t["CK2"], "--detector", t["DET"], "--ref-stats", t["REF"],
                   "-o", t["OUTFILE"], "--cache", t["CACHE"], "--plot", t["PLOT"]],
        "eval": ["eval", "digits", "--model", t["CK"], "--detector", t["DET"], "--ref-stats", t["REF"]],
        "fid": ["fid", t["PIPE"], t["REF"], "--detector", t["DET"]],
        "export": ["export", t["S"], "-o", t["OUTFILE"]],
        "demo": ["demo", "--base", t["CK"], "-o", t["OUTDIR"]],
        "align": ["align", "digits", "--base", t["CK"], "-s", t["CK2"], "--synthetic", t["S"], "--real", t["PIPE"]],
        "ref-stats": ["ref-stats", "--images", t["PIPE"], "--detector", t["DET"], "-o", t["OUTFILE"]],
        "plugins": ["plugins"],
    }


def _with(args: list, flag: str, value) -> list:
    """``args`` with ``flag`` set to ``value`` (replacing its value, or appended)."""
    names = {"--out": ("-o", "--out"), "--selftrained": ("-s", "--selftrained")}.get(flag, (flag,))
    out = list(args)
    for i, a in enumerate(out):
        if a in names:
            out[i + 1] = value
            return out
    return out + [flag, value]


def _every_file(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_every_output_flag_against_every_input_and_output_file(tree):
    """Every command x every output-ish flag x every file it reads (named, or inside an input
    folder) and every file of its output folder: refused with --dry-run, by the flag, bytes unchanged."""
    templates = _templates(tree)
    outs = sorted(k for k, v in PATH_PARAMS.items() if v == "out")
    n = 0
    for cmd, flag in outs:
        args = templates[cmd]
        targets: list[Path] = []
        for key in INPUTS[cmd].values():
            p = tree[key]
            targets += [p] if p.is_file() else _every_file(p)
        if cmd in FOLDER_OUT and flag == "--out":  # a folder option: click itself refuses a file; every input folder
            folders = [tree[k] for k in INPUTS[cmd].values() if tree[k].is_dir()]
            targets = folders + [d for f in folders for d in f.rglob("*") if d.is_dir()] + [f / "new" for f in folders]
        elif cmd in FOLDER_OUT:
            targets += _every_file(tree["OUTDIR"])
        for other in ("--out", "--cache", "--plot"):  # the command's other file outputs
            if other != flag and (cmd, other) in PATH_PARAMS and not (other == "--out" and cmd in FOLDER_OUT):
                targets.append(tree[OUT_VALUE[other]])
        for target in targets:
            existed = target.exists()
            before = _sha(target) if existed else None
            if flag == "--report" and target == tree["REPORT"]:
                continue
            res = _neon(*_with(args, flag, target), "--dry-run", "-q" if cmd != "plugins" else "--dry-run")
            shown = "-o" if flag == "--out" else flag
            line = _refused(res, cmd, shown)
            assert line.split("error: ", 1)[1].startswith(shown) or shown in line, line
            assert (_sha(target) if existed else None) == before, (cmd, flag, target)
            assert target.exists() == existed, (cmd, flag, target)
            n += 1
    print(f"{n} cases")
    assert n > 100  # the enumeration really ran (12 commands, their inputs and output files)


def test_a_family_file_named_by_a_setting_or_the_environment_is_protected(tmp_path, monkeypatch):
    vae = _files(tmp_path, {"kl16.ckpt": b"vae"}) / "kl16.ckpt"
    before = _sha(vae)
    res = _neon("eval", "xar", "--model", tmp_path / "m.pth", "--set", f"vae={vae}", "--report", vae, "--dry-run", "-q")
    assert "family file (vae)" in _refused(res, "eval", "--report")
    monkeypatch.setenv("NEON_XAR_VAE", str(vae))
    res = _neon("synth", "xar", "--model", tmp_path / "m.pth", "-n", "8", "-o", tmp_path / "S", "--report", vae, "--dry-run", "-q")
    _refused(res, "synth", "--report")
    assert _sha(vae) == before and not (tmp_path / "S").exists()


def test_tune_control_reads_the_recipe_beside_the_snapshot(tree):
    ft = _files(tree["OUTDIR"].parent / "ft", {"theta_s-000000064.safetensors": b"snap", "finetune.json": b'{"config": {}}'})
    before = _sha(ft / "finetune.json")
    res = _neon("tune-w", "digits", "-s", ft / "theta_s-000000064.safetensors", "--control", "real", "--report", ft / "finetune.json",
                "-q")
    assert "recipe" in _refused(res, "tune-w", "--report")
    assert _sha(ft / "finetune.json") == before


def test_every_output_flag_against_the_embedded_default_and_family_files_and_devices(shipped, tree):
    """The family commands with --base/--model left out: every output-ish flag on the embedded
    default and the family's classifier (a folder -o on the folder holding them), and every file
    output on /dev/null and a symlink to it: refused by the flag, bytes unchanged."""
    os.symlink("/dev/null", tree["OUTDIR"].parent / "null")
    devices = [Path("/dev/null"), tree["OUTDIR"].parent / "null"]
    templates = _templates(tree)
    drop = {"--model", "--base"}
    n = 0
    for (cmd, flag), kind in sorted(PATH_PARAMS.items()):
        if kind != "out" or cmd not in ("synth", "finetune", "tune-w", "eval", "demo", "align"):
            continue
        args = templates[cmd]
        args = [a for i, a in enumerate(args) if a not in drop and (i == 0 or args[i - 1] not in drop)]
        folder = cmd in FOLDER_OUT and flag == "--out"
        targets = [shipped[0].parent] if folder else [*shipped, *devices]
        for target in targets:
            before = _sha(target)
            res = _neon(*_with(args, flag, target), "--dry-run", "-q")
            _refused(res, cmd, "-o" if flag == "--out" else flag)
            assert _sha(target) == before, (cmd, flag, target)
            n += 1
    assert Path("/dev/null").is_char_device() and os.path.islink(devices[1])
    assert n > 30  # 6 commands, their output flags, 4 targets each (1 for a folder -o)


def test_an_allowed_report_still_records_the_refusal_of_another_output(tree):
    before = _sha(tree["CK"])
    res = _neon("merge", tree["CK"], tree["CK2"], "--w", "1", "-o", tree["CK"] / "x.safetensors", "--report", tree["REPORT"], "-q")
    line = _refused(res, "merge", "-o")
    assert "inside the input base" in line and "no report written" not in line
    data = json.loads(tree["REPORT"].read_text())
    assert data["status"] == "error" and data["error"].startswith("-o: ")
    assert _sha(tree["CK"]) == before and not (tree["CK"] / "x.safetensors").exists()


def test_finetune_plan_lists_the_encoding_cache_of_an_encoding_family(tree):
    """Issue 22 (1): a VAR-style family's encoding cache (neon_cli.dataset.encoded_set writes
    ``encoded-<key>/`` inside --data) is in finetune's plan: the ``encoded-*`` pattern and every
    file of an existing cache are writes that the run may make inside its input, and ``--report`` on
    one of them (or a new file there) gets no report; a family without an encode hook lists none."""
    from neon_cli.plan import finetune_plan

    S, out = tree["S"], tree["OUTDIR"]
    _files(S, {"encoded-var-abc/shard-00000.safetensors": b"tokens", "encoded-var-abc/encoded.json": b"{}"})
    plan = finetune_plan(family="var", model=None, data=S, out=out)
    check_plan(plan)  # the cache inside --data is not a conflict with the input
    caches = {str(e.path) for e in plan.writes if e.role.startswith("--data encoding cache")}
    assert caches == {str(S / "encoded-*"), str(S / "encoded-var-abc" / "shard-00000.safetensors"),
                      str(S / "encoded-var-abc" / "encoded.json")}
    for rep in (S / "encoded-var-abc" / "encoded.json", S / "encoded-var-abc" / "report.json"):
        assert "--report" in (report_problem(finetune_plan(family="var", model=None, data=S, out=out, report=rep)) or "")
    assert not any("encoding cache" in e.role for e in finetune_plan(family="digits", model=None, data=S, out=out).writes)
    # S not writable: encoded_set falls back to -o, and the plan says so
    with pytest.MonkeyPatch.context() as mp:  # (chmod would not stop root)
        mp.setattr(os, "access", lambda p, mode: Path(p) != S)
        roles = {e.role: str(e.path) for e in finetune_plan(family="var", model=None, data=S, out=out).writes}
    assert roles["-o encoding cache"] == str(out / "encoded-*") and "--data encoding cache" not in roles
    res = _neon("finetune", "var", "--data", S, "-o", out, "-b", "32", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    assert {"role": "--data encoding cache", "path": str(S / "encoded-*")} in json.loads(res.stdout)["plan"]["writes"]
