"""CLI behaviour: help examples, one-line errors and exit codes, reports, no torch at import,
completion scripts up to date."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neon_cli.commands import app

from cli_helpers import run_guarded

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["synth", "finetune", "merge", "inspect", "tune-w", "eval", "fid", "demo", "align", "ref-stats", "plugins"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_shows_an_example(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example" in res.stdout and f"neon {cmd}" in res.stdout


def test_version():
    from neon_cli import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"neon {__version__}"


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, neon_cli.commands, neon_cli.family; print(sorted(m for m in ('torch','scipy','numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_unknown_family_is_a_one_line_error_exit_2(tmp_path):
    res = runner.invoke(app, ["synth", "nofam", "--num-images", "4", "-o", str(tmp_path / "S")])
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown family 'nofam'" in lines[0] and lines[0].startswith("neon synth: error:")


def test_missing_model_names_the_flag_and_writes_error_report(tmp_path):
    rep = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "digits", "--model", str(tmp_path / "x.safetensors"), "--report", str(rep)])
    assert res.exit_code == 2 and "--model" in res.stderr
    data = json.loads(rep.read_text())
    assert data["status"] == "error" and "--model" in data["error"] and data["schema"] == "neon.report/1"


def test_bad_set_key_names_it(tmp_path):
    res = runner.invoke(app, ["eval", "digits", "--set", "temperature=1"])
    assert res.exit_code == 2 and "--set temperature" in res.stderr


def test_eval_threshold_exit_1_and_report(tmp_path):
    rep = tmp_path / "eval.json"
    args = ["eval", "digits", "--num-samples", "200", "--set", "steps=4", "--report", str(rep), "--json"]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    fd = json.loads(ok.stdout)["metrics"]["fd_digits"]
    data = json.loads(rep.read_text())
    assert set(data) >= {"schema", "command", "argv", "versions", "inputs", "outputs", "settings", "results", "wall_seconds", "status"}
    assert data["versions"]["torch"] and data["versions"]["neon"]
    assert len(data["inputs"][0]["sha256"]) == 64
    bad = runner.invoke(app, args + ["--max-metric", f"fd_digits={fd * 0.5}"])
    assert bad.exit_code == 1
    assert json.loads(rep.read_text())["status"] == "threshold_exceeded"
    good = runner.invoke(app, args + ["--max-metric", f"fd_digits={fd * 2}"])
    assert good.exit_code == 0


def test_digits_fid_is_a_deprecated_alias_of_fd_digits(tmp_path):
    """digits called its classifier-feature distance 'fid' up to 0.1: --max-fid / --max-metric fid=
    still gate on fd_digits for one release, with a one-line note; results carry only the new name."""
    rep = tmp_path / "eval.json"
    args = ["eval", "digits", "--num-samples", "64", "--set", "steps=2", "--report", str(rep), "--log-format", "plain"]
    bad = runner.invoke(app, args + ["--max-fid", "1e-9"])
    assert bad.exit_code == 1, bad.output
    assert "--max-fid: metric 'fid' of family 'digits' is now 'fd_digits' (deprecated alias" in bad.stderr
    assert "fd_digits = " in bad.stderr and "exceeds --max-fid 1e-09" in bad.stderr
    data = json.loads(rep.read_text())["results"]
    assert "fid" not in data["metrics"] and set(data["exceeded"]) == {"fd_digits"}
    good = runner.invoke(app, args + ["--max-metric", "fid=1e9"])
    assert good.exit_code == 0 and "--max-metric fid: metric 'fid'" in good.stderr
    # a family without the alias (Inception FID not configured) refuses the name before sampling
    res = runner.invoke(app, ["eval", "gaussian", "--max-fid", "1"])
    assert res.exit_code == 2 and "reports no metric 'fid'" in res.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_up_to_date(shell):
    env = dict(os.environ, _NEON_COMPLETE=f"source_{shell}")
    code = "from neon_cli.commands import main; main()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    assert out.strip(), "no completion script generated"
    shipped = (ROOT / "completions" / f"neon.{shell}").read_text()
    assert out == shipped, f"completions/neon.{shell} is stale: regenerate with `_NEON_COMPLETE=source_{shell} neon > completions/neon.{shell}`"


# ----------------------------------------------------------------------------------------------
# every command: --report, --log-format, no <bool> placeholder; --set completion (issue 17)


def _all_commands() -> dict:
    import typer

    return typer.main.get_command(app).commands


def _failing_argv(name: str, command) -> list[str]:
    """The command with every required parameter filled by a value that fails fast: an unknown
    family, else "1" (a number, or a path that does not exist in the empty working directory),
    and --family nofam where it is optional."""
    argv = [name]
    for p in command.params:
        opts = [o for o in p.opts if o.startswith("--")] or list(p.opts)
        if p.name == "family" and p.param_type_name == "option" and not p.required:
            argv += [opts[0], "nofam"]
            continue
        if not p.required:
            continue
        value = "nofam" if p.name == "family" else "1"
        argv += [value] if p.param_type_name == "argument" else [opts[0], value]
    return argv


def test_every_command_takes_report_and_writes_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = _all_commands()
    assert {"synth", "finetune", "merge", "inspect", "tune-w", "eval", "fid", "demo", "align", "ref-stats", "plugins"} <= set(commands)
    for name, command in commands.items():
        rep = tmp_path / f"{name}.json"
        argv = _failing_argv(name, command) + ["--report", str(rep)]
        res = runner.invoke(app, argv)
        assert res.exit_code in (0, 2), (argv, res.exit_code, res.output)
        assert "No such option" not in res.output and "Usage:" not in res.output, (argv, res.output)
        data = json.loads(rep.read_text())
        assert data["schema"] == "neon.report/1" and data["command"] == name, argv
        assert data["status"] == ("ok" if res.exit_code == 0 else "error"), (argv, data["status"])
    data = json.loads((tmp_path / "plugins.json").read_text())
    assert "digits" in {f["name"] for f in data["results"]["families"]}


def test_help_has_log_format_and_no_bool_placeholder():
    for name in [None, *_all_commands()]:
        res = runner.invoke(app, [name, "--help"] if name else ["--help"])
        assert res.exit_code == 0, res.output
        assert "<bool>" not in res.stdout, name
        if name:
            assert "--log-format" in res.stdout and "NEON_LOG_FORMAT" in res.stdout, name


def test_eval_refuses_an_unknown_metric_before_sampling(digits, monkeypatch):
    def sample(*a, **k):
        raise AssertionError("sampled before the threshold's metric was checked")

    monkeypatch.setattr(digits, "sample", sample)
    monkeypatch.setattr(digits, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    res = runner.invoke(app, ["eval", "digits", "--max-metric", "fd=0.5", "-q"])
    assert res.exit_code == 2, res.output
    assert "--max-metric fd" in res.stderr and "reports no metric 'fd'" in res.stderr and "pixel_fid" in res.stderr


def _complete(shell: str, line: str) -> tuple[str, str]:
    """What `neon` prints for TAB at the end of ``line`` (bash, zsh or fish protocol), and the
    torch modules imported while it answered."""
    env = dict(os.environ, _NEON_COMPLETE=f"complete_{shell}")
    if shell == "bash":
        words = line.split()
        env.update(COMP_WORDS=line, COMP_CWORD=str(len(words) if line.endswith(" ") else len(words) - 1))
    else:
        env.update(_TYPER_COMPLETE_ARGS=line, _TYPER_COMPLETE_FISH_ACTION="get-args")
    code = ("import sys\nfrom neon_cli.commands import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write('TORCH' if 'torch' in sys.modules else 'NOTORCH')")
    res = run_guarded([sys.executable, "-c", code], f"shell completion of {line!r}", capture_output=True, text=True, env=env)
    return res.stdout, res.stderr


def test_set_key_completion_from_the_family_without_torch():
    out, err = _complete("bash", "neon synth digits --set ")
    assert out.split() == ["guidance=", "steps=", "rho=", "sigma_min=", "sigma_max="] and err.endswith("NOTORCH"), (out, err)
    out, err = _complete("bash", "neon eval digits --num-samples 10 --set st")
    assert out.split() == ["steps="], out
    out, _ = _complete("zsh", "neon tune-w --base x.pt flow --set ")
    assert '"solver=":' in out and '"steps=":' in out, out
    out, _ = _complete("fish", "neon synth flow --set solver=")
    assert [ln.split("\t")[0] for ln in out.splitlines()] == ["solver=euler", "solver=dopri5"], out
    out, err = _complete("bash", "neon finetune imm --data S --set ")  # train_settings of a repo-backed family too
    assert "num_steps=" in out.split() and "vae=" in out.split() and err.endswith("NOTORCH"), (out, err)
    from neon_imm import family as imm

    assert {s.name for s in imm.train_settings} <= {w.rstrip("=") for w in out.split()}
    out, _ = _complete("bash", "neon synth nofam --set ")
    assert out.strip() == ""
