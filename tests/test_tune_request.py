"""TuneRequest and DemoRequest (issue 25 item 1): built from flags or in code, validated once with the
flag named, carrying the plan; the pure searches take one options dataclass (item 3)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from neon_cli.errors import UsageError
from neon_cli.requests import DemoRequest, Outputs, Scoring, TuneRequest


def test_tune_request_from_flags_equals_the_one_built_in_code(tmp_path):
    o, c, r = tmp_path / "neon.safetensors", tmp_path / "c.jsonl", tmp_path / "r.json"
    flags = TuneRequest.from_flags("digits", None, ["ft/a.safetensors"], float("inf"), r, num_samples=64, output=o, cache=c,
                                   plot=None, detector=None, ref_stats=tmp_path / "ref.npz", trust_pickle=False,
                                   set_pairs=["num_steps=4"])
    code = TuneRequest("digits", None, ("ft/a.safetensors",), num_samples=64, abandon_margin=None, set_pairs=("num_steps=4",),
                       outputs=Outputs(out=o, cache=c, report=r), scoring=Scoring(ref_stats=tmp_path / "ref.npz"))
    assert flags == code
    s = flags.settings()  # the flags as typed: abandon_margin inf (never), not the None the search gets
    assert math.isinf(s["abandon_margin"]) and s["selftrained"] == ["ft/a.safetensors"] and s["output"] == o
    assert list(s)[:4] == ["family", "base", "selftrained", "abandon_margin"]
    assert {"-o", "--cache", "--report"} <= {role.split(" ")[0] for role in code.plan().roles()}
    with pytest.raises(dataclasses.FrozenInstanceError):
        code.w = 1.0  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        TuneRequest.from_keywords("digits", None, ["a"], outptu=o)  # a misspelt keyword is not ignored


@pytest.mark.parametrize("change, flag", [
    (dict(num_samples=1), "--num-samples"), (dict(confirm_samples=1), "--confirm-samples"),
    (dict(gamma=(4.0, 1.0)), "--gamma"), (dict(bounds=(0.0, math.nan)), "--bounds"), (dict(joint="grid"), "--joint"),
    (dict(keep=0), "--keep"), (dict(base_gamma=(2.0, 2.0), gamma=(1.0, 4.0)), "--base-gamma"),
])
def test_tune_request_validate_names_the_flag(change, flag):
    with pytest.raises(UsageError, match=flag):
        TuneRequest("digits", None, ("x",), **change).validate()


def test_tune_request_base_gamma_box_defaults_to_gamma_unless_tune_base_is_off():
    req = TuneRequest("digits", None, ("x",), gamma=(1.0, 4.0))
    assert req.search_plan().base_gamma == (1.0, 4.0)
    assert dataclasses.replace(req, base_gamma=(1.5, 3.0)).search_plan().base_gamma == (1.5, 3.0)
    assert dataclasses.replace(req, tune_base=False).search_plan().base_gamma is None


@pytest.mark.parametrize("change, flag", [
    (dict(num_synthetic=0), "--num-synthetic"), (dict(num_samples=1), "--num-samples"),
    (dict(confirm_samples=1), "--confirm-samples"), (dict(budget_fraction=0.0), "--budget-fraction"),
    (dict(lr=0.0), "--lr"), (dict(gamma=(3.0, 1.0)), "--gamma"), (dict(seed=2**63), "--seed"),
])
def test_demo_request_validate_names_the_flag(change, flag):
    with pytest.raises(UsageError, match=flag):
        DemoRequest(**change).validate()


def test_demo_request_settings_and_plan(tmp_path):
    req = DemoRequest(out=tmp_path / "d", gamma=(1.0, 4.0), report=tmp_path / "demo.json").validate()
    assert req.settings()["gamma"] == [1.0, 4.0] and req.settings()["out"] == tmp_path / "d"
    assert {"-o", "--report"} <= {role.split(" ")[0] for role in req.plan().roles()}


def test_search_options_give_the_same_search_as_keywords():
    from neon_cli.tune.snapshots import SnapshotSearchOptions, search_snapshots

    def f(i, w, g):  # snapshot 1 is better everywhere; minimum at w = 1.3
        return (w - 1.3) ** 2 + (0.5 if i == 0 else 0.0)

    a = search_snapshots(f, 2, SnapshotSearchOptions(bounds=(0.0, 2.0), abandon_margin=None))
    b = search_snapshots(f, 2, bounds=(0.0, 2.0), abandon_margin=None)
    c = search_snapshots(f, 2, SnapshotSearchOptions(bounds=(0.0, 1.0)), bounds=(0.0, 2.0), abandon_margin=None)
    assert a.best == b.best == c.best == 1
    assert a.winner.w == b.winner.w == c.winner.w == pytest.approx(1.3, abs=0.05)
    with pytest.raises(TypeError):
        search_snapshots(f, 1, bound=(0.0, 2.0))
