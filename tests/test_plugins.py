"""Family discovery through the entry-point group, and every subcommand on a third-party family."""

from __future__ import annotations

import json
import math

import torch
from typer.testing import CliRunner

from neon_cli.commands import app
from neon_cli.family import discover, family_names, get_family, resolve_settings
from neon_cli.errors import FamilyError

runner = CliRunner()


def test_builtin_digits_registers_through_the_entry_point_group():
    info = discover()["digits"]
    assert info.error is None
    assert info.value == "neon_digits:family"
    assert info.distribution == "neon-cli"


def test_third_party_family_is_discovered_and_listed(toyfam):
    assert "toy" in family_names()
    res = runner.invoke(app, ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["toy"]["distribution"] == "neon-toyfam"
    assert rows["toy"]["version"] == "0.0.1"
    assert rows["toy"]["settings"][0] == {
        "name": "temperature", "type": "float", "default": 0.8, "low": 0.0, "high": 5.0, "choices": None, "help": "noise scale"}
    assert rows["digits"]["guidance"] == "guidance"
    assert {s["name"] for s in rows["digits"]["settings"]} >= {"guidance", "steps", "rho"}


def test_allow_list_env_var_hides_families(toyfam, monkeypatch):
    monkeypatch.setenv("NEON_FAMILIES", "toy")
    assert family_names() == ["toy"]
    monkeypatch.setenv("NEON_FAMILIES", "")
    assert family_names() == []


def test_unknown_family_error_lists_installed():
    try:
        get_family("nope")
    except FamilyError as exc:
        assert "unknown family 'nope'" in str(exc) and "digits" in str(exc)
    else:
        raise AssertionError("no error")


def test_settings_parse_and_range_errors(digits):
    s = resolve_settings(digits, ["guidance=3.5", "steps=7"])
    assert s["guidance"] == 3.5 and s["steps"] == 7 and s["rho"] == 7.0
    for bad, needle in [(["guidance=abc"], "--set guidance: expected float"), (["steps=0"], "below the minimum"),
                        (["nokey=1"], "has no setting 'nokey'"), (["guidance"], "expected KEY=VALUE")]:
        try:
            resolve_settings(digits, bad)
        except FamilyError as exc:
            assert needle in str(exc)
        else:
            raise AssertionError(bad)


def test_every_subcommand_runs_on_the_third_party_family(toyfam, toy_base, tmp_path):
    S, ft = tmp_path / "S", tmp_path / "ft"
    r = runner.invoke(app, ["synth", "toy", "--model", str(toy_base), "--num-images", "64", "--shard-size", "16", "-o", str(S), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["finetune", "toy", "--model", str(toy_base), "--data", str(S), "--budget", "320",
                            "--save-every", "160", "-o", str(ft), "-q", "--report", str(tmp_path / "ft.json")])
    assert r.exit_code == 0, r.output
    ftrep = json.loads((tmp_path / "ft.json").read_text())
    assert [s["images_seen"] for s in ftrep["results"]["snapshots"]] == [160, 320]
    theta_s = ft / "theta_s-000000320.safetensors"
    # fine-tuning on samples drawn at temperature 0.8 shrinks sigma (the degradation Neon reverses)
    assert toyfam.load(str(theta_s)).log_sigma.mean() < toyfam.load(str(toy_base)).log_sigma.mean()
    best = tmp_path / "best.safetensors"
    r = runner.invoke(app, ["tune-w", "toy", "--base", str(toy_base), "--selftrained", str(theta_s), "--bounds", "-0.5", "3",
                            "--num-samples", "400", "--max-evals", "8", "-o", str(best), "--report", str(tmp_path / "tune.json"), "-q"])
    assert r.exit_code == 0, r.output
    tune = json.loads((tmp_path / "tune.json").read_text())["results"]
    assert tune["chosen"]["w"] > 0
    merged = tmp_path / "merged.safetensors"
    w = tune["chosen"]["w"]
    r = runner.invoke(app, ["merge", str(toy_base), str(theta_s), "--w", repr(w), "-o", str(merged), "-q"])
    assert r.exit_code == 0, r.output
    a, b, m = (toyfam.load(str(p)) for p in (toy_base, theta_s, merged))
    torch.testing.assert_close(m.mu, a.mu - w * (b.mu - a.mu))
    torch.testing.assert_close(toyfam.load(str(best)).mu, m.mu)
    # tune-w's search seeds (eval's own default, 20,000,000, is disjoint from them on purpose)
    r = runner.invoke(app, ["eval", "toy", "--model", str(merged), "--num-samples", "400", "--seed", "10000000", "--json"])
    assert r.exit_code == 0, r.output
    fid_neon = json.loads(r.stdout)["metrics"]["frechet"]
    r = runner.invoke(app, ["eval", "toy", "--model", str(toy_base), "--num-samples", "400", "--seed", "10000000", "--json"])
    fid_base = json.loads(r.stdout)["metrics"]["frechet"]
    assert math.isfinite(fid_neon) and fid_neon < fid_base
    assert abs(fid_neon - tune["chosen"]["metrics"]["frechet"]) < 1e-9  # same seeds, same model -> same number


def test_plugins_json_error_is_a_json_object_on_stdout(tmp_path):
    """Issue 22 (7): with --json a failure is {"status", "exit_code", "error"} on stdout, as for every command;
    success still prints the list of families itself."""
    res = runner.invoke(app, ["plugins", "--json", "--report", str(tmp_path)])  # a folder: refused before any work
    assert res.exit_code == 2, res.output
    obj = json.loads(res.stdout)
    assert obj["status"] == "error" and obj["exit_code"] == 2 and "--report" in obj["error"]
    ok = runner.invoke(app, ["plugins", "--json"])
    assert ok.exit_code == 0 and isinstance(json.loads(ok.stdout), list)
