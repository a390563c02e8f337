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

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["synth", "finetune", "merge", "tune-w", "eval", "demo", "align", "ref-stats", "plugins"]


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
    fid = json.loads(ok.stdout)["metrics"]["fid"]
    data = json.loads(rep.read_text())
    assert set(data) >= {"schema", "command", "argv", "versions", "inputs", "outputs", "settings", "results", "wall_seconds", "status"}
    assert data["versions"]["torch"] and data["versions"]["neon"]
    assert len(data["inputs"][0]["sha256"]) == 64
    bad = runner.invoke(app, args + ["--max-fid", str(fid * 0.5)])
    assert bad.exit_code == 1
    assert json.loads(rep.read_text())["status"] == "threshold_exceeded"
    good = runner.invoke(app, args + ["--max-fid", str(fid * 2)])
    assert good.exit_code == 0


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_up_to_date(shell):
    env = dict(os.environ, _NEON_COMPLETE=f"source_{shell}")
    code = "from neon_cli.commands import main; main()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    assert out.strip(), "no completion script generated"
    shipped = (ROOT / "completions" / f"neon.{shell}").read_text()
    assert out == shipped, f"completions/neon.{shell} is stale: regenerate with `_NEON_COMPLETE=source_{shell} neon > completions/neon.{shell}`"
