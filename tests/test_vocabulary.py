"""One metric vocabulary and one option vocabulary (issue 17, items 2 and 3).

Metrics: every built-in family declares what each of its metric names means (``metric_info``), and
``fid`` is only ever the Fréchet Inception distance of the standard detector against named
reference statistics (digits' classifier-feature distance is ``fd_digits``). ``neon plugins
--json`` lists the definitions beside the training defaults and the inference settings.

Options: the checkpoint scored or sampled is ``--model``, the pair theta_r / theta_s is
``--base`` / ``--selftrained``, an output is ``-o/--out``; no ``-m`` short (torchrun's module flag).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import click
import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from neon_cli.commands import app
from neon_cli.family import NO_DEFINITION, Metric, get_family, metric_definitions, resolve_metric
from neon_cli.tune.common import HIGHER_IS_BETTER

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _builtin_families() -> list[str]:
    """The families pyproject.toml registers (the ones under plugins/)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(data["project"]["entry-points"]["neon.families"])


BUILTIN = _builtin_families()
#: families scored by neon_diffusers.scoring.ImageScorer (Inception FID with a detector, else pixel_fid)
IMAGE_FAMILIES = {"diffusers", "flow", "edm", "xar", "imm"}


def test_builtin_families_are_the_expected_ones():
    assert {"digits", "autoregressive", "gaussian", "gaussian-ddpm"} | IMAGE_FAMILIES <= set(BUILTIN)


@pytest.mark.parametrize("detector", [False, True], ids=["no detector", "detector configured"])
@pytest.mark.parametrize("name", BUILTIN)
def test_every_metric_name_is_declared_with_a_definition(name, detector, monkeypatch, tmp_path):
    if detector:
        monkeypatch.setenv("NEON_INCEPTION", str(tmp_path / "inception-2015-12-05.pt"))  # read when scoring only
    else:
        monkeypatch.delenv("NEON_INCEPTION", raising=False)
    fam = get_family(name)
    info = dict(fam.metric_info)
    assert list(fam.metrics), name
    for m in fam.metrics:
        assert m in info, f"{name}: metric {m!r} has no definition in metric_info"
    for m, entry in info.items():
        assert isinstance(entry, Metric) and entry.definition.strip() and "\n" not in entry.definition, (name, m)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", m), (name, m)
        if entry.higher_is_better is not None:  # tune-w's direction must be the declared one
            assert entry.higher_is_better == (m in HIGHER_IS_BETTER), (name, m)
        if m == "fid":  # the one meaning of the name
            assert "Inception" in entry.definition and "inception-2015-12-05.pt" in entry.definition, name
            assert "REF_STATS" in entry.definition or "ref-stats" in entry.definition, name
    rows = metric_definitions(fam)
    assert [r["name"] for r in rows if r["active"]] == list(fam.metrics)


def test_digits_classifier_distance_is_fd_digits_not_fid():
    """The digits families report the classifier-feature distance as fd_digits, computed as the
    Fréchet distance of the classifier's features (the closed form on the same arrays)."""
    import torch

    from neon_cli.metrics import feature_stats, frechet_distance
    from neon_digits.model import real_digits

    for name in ("digits", "autoregressive"):
        fam = get_family(name)
        assert "fid" not in fam.metrics and fam.metrics[0] == "fd_digits"
        assert fam.metric_aliases == {"fid": "fd_digits"}
        assert "not Inception FID" in fam.metric_info["fd_digits"].definition
    fam = get_family("digits")
    real, labels = real_digits()
    images = real[::7]
    got = fam.score(images, labels[::7])
    scorer = fam._scorer
    assert set(got) == set(fam.metric_info)  # every name score returns is declared, and nothing else
    with torch.no_grad():
        feats = scorer.net(images)[0].double().numpy()
    want = frechet_distance(*feature_stats(feats), *scorer.real_stats)
    assert got["fd_digits"] == pytest.approx(want, rel=1e-12)


def test_gaussian_and_image_score_keys_are_declared(monkeypatch, tmp_path):
    import torch

    g = get_family("gaussian")
    m = g.score_model(g.load(g.default_model), {"temperature": 0.9})
    assert set(m) <= set(g.metric_info)
    d = get_family("gaussian-ddpm")
    m = d.score(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), None)
    assert set(m) <= set(d.metric_info) and d.metric_info["trace_ratio"].higher_is_better is None
    # the image families share one scorer: pixel_fid without a detector
    from neon_diffusers.scoring import METRIC_INFO, write_pixel_stats

    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "real.npy", real)
    write_pixel_stats(tmp_path / "real.npy", tmp_path / "pixels.npz")
    monkeypatch.delenv("NEON_INCEPTION", raising=False)
    monkeypatch.setenv("NEON_REF_STATS", str(tmp_path / "pixels.npz"))
    for name in sorted(IMAGE_FAMILIES):
        fam = get_family(name)
        assert fam.metric_info is METRIC_INFO
        got = fam.score(torch.from_numpy(real[:20]).permute(0, 3, 1, 2).contiguous(), None)
        assert set(got) == set(fam.metrics) == {"pixel_fid"}


def test_plugins_json_lists_metrics_train_defaults_and_settings(toyfam):
    res = runner.invoke(app, ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    infos = {i["name"]: i for i in json.loads(res.stdout)}
    digits = infos["digits"]
    fam = get_family("digits")
    fd = {m["name"]: m for m in digits["metric_info"]}["fd_digits"]
    assert fd["definition"] == fam.metric_info["fd_digits"].definition and fd["active"]
    assert fd["higher_is_better"] is False and fd["direction"] == "lower is better"
    prec = {m["name"]: m for m in digits["metric_info"]}["precision"]
    assert prec["direction"] == "higher is better"
    assert digits["train_defaults"] == dict(fam.train_defaults)
    assert set(digits["train_defaults"]) >= {"lr", "batch", "ema_halflife_images", "warmup_images"}
    assert [s["name"] for s in digits["settings"]] == [s.name for s in fam.settings]
    assert digits["metric_aliases"] == {"fid": "fd_digits"}
    # EDM: train.py's recipe and its training-only settings
    edm = get_family("edm")
    assert infos["edm"]["train_defaults"] == dict(edm.train_defaults)
    assert [s["name"] for s in infos["edm"]["train_settings"]] == [s.name for s in edm.train_settings]
    # image families without a detector: pixel_fid active, fid declared but not active
    rows = {m["name"]: m for m in infos["diffusers"]["metric_info"]}
    assert rows["pixel_fid"]["active"] and not rows["fid"]["active"]
    # a third-party family without metric_info still lists its metrics, marked as undefined
    toy = infos["toy"]
    assert [(m["name"], m["definition"], m["direction"]) for m in toy["metric_info"]] == [("frechet", NO_DEFINITION, "lower is better")]
    # the table's short form
    table = runner.invoke(app, ["plugins"], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "fd_digits↓" in table.stdout and "precision↑" in table.stdout


def test_resolve_metric_notes_the_deprecated_name():
    notes = []
    fam = get_family("digits")
    assert resolve_metric(fam, "fid", "--metric", lambda *a, **k: notes.append(k["message"])) == "fd_digits"
    assert notes == ["--metric: metric 'fid' of family 'digits' is now 'fd_digits' (deprecated alias, removed in the next release)"]
    assert resolve_metric(fam, "pixel_fid", "--metric", lambda *a, **k: notes.append(k)) == "pixel_fid" and len(notes) == 1
    assert resolve_metric(get_family("gaussian"), "fid", "--metric") == "fid"  # no alias: refused later by name


def test_tune_w_metric_fid_on_digits_is_fd_digits(tmp_path):
    """--metric fid is accepted for digits (with the note) and checked past the metric; an unknown
    name is refused naming --metric."""
    base = get_family("digits").default_model
    res = runner.invoke(app, ["tune-w", "digits", "--selftrained", base, "--metric", "fid", "--gamma", "1", "30",
                              "--log-format", "plain"])
    assert res.exit_code == 2
    assert "--metric: metric 'fid' of family 'digits' is now 'fd_digits'" in res.stderr and "--gamma" in res.stderr
    res = runner.invoke(app, ["tune-w", "digits", "--selftrained", base, "--metric", "inception_fid"])
    assert res.exit_code == 2 and "--metric inception_fid" in res.stderr and "fd_digits" in res.stderr


# -- options -------------------------------------------------------------------------------------
def _commands() -> dict[str, click.Command]:
    return dict(typer.main.get_command(app).commands)


def _names(cmd: click.Command) -> dict[str, click.Parameter]:
    out = {}
    for p in cmd.params:
        for o in list(p.opts) + list(p.secondary_opts):
            if o.startswith("-"):
                out[o] = p
    return out


#: role -> the one option name for it; the other spellings are refused everywhere
ONE_NAME = {"--model": ("--checkpoint", "--ckpt", "--theta-r", "--theta_r"),
            "--base": ("--theta-r", "--base-model", "--reference"),
            "--selftrained": ("--self-trained", "--theta-s", "--theta_s", "--finetuned"),
            "--out": ("--output", "--output-dir", "--outdir")}


def test_option_vocabulary():
    cmds = _commands()
    assert len(cmds) >= 12
    for name, cmd in cmds.items():
        opts = _names(cmd)
        assert "-m" not in opts, f"neon {name}: -m is torchrun's module flag; no short for it"
        assert not ({"--model", "--base"} <= set(opts)), f"neon {name}: --model and --base name the same role"
        for canonical, others in ONE_NAME.items():
            assert not (set(others) & set(opts)), f"neon {name}: use {canonical}, not {set(others) & set(opts)}"
        if "--base" in opts:
            assert "theta_r" in (opts["--base"].help or ""), f"neon {name} --base: help must say theta_r"
        if "--selftrained" in opts:
            assert "theta_s" in (opts["--selftrained"].help or ""), f"neon {name} --selftrained: help must say theta_s"
        if "-o" in opts:
            assert "--out" in opts, f"neon {name}: -o is --out"
    # the pair is --base/--selftrained wherever both are options; the sampled/scored checkpoint --model
    for name in ("tune-w", "align"):
        assert {"--base", "--selftrained"} <= set(_names(cmds[name]))
    assert "--base" in _names(cmds["demo"])
    for name in ("synth", "finetune", "eval"):
        assert "--model" in _names(cmds[name])
    # finetune fine-tunes theta_r: its --model says so (no --base alias: one name per role)
    assert "theta_r" in _names(cmds["finetune"])["--model"].help
    # merge's positional pair is named the same way
    merge_args = {p.name: p for p in cmds["merge"].params}
    assert {"base", "selftrained"} <= set(merge_args)
