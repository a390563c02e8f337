"""Issue 16 on the fake family: the base at its own best gamma, the joint search that starts from the
w line, exit 3 when nothing beats the base, the settings a tuned model carries, the Figure 4 plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from neon_cli.errors import NoImprovement, UsageError
from neon_cli.report import Report
from neon_cli.tune import brent_search, joint_search, run_tune_w, tune_guidance
from tune_fakes import SIGMA, TARGET, THETA_R, THETA_S, _eps, closed_form, fam  # noqa: F401


def base_best_gamma(seed: int, n: int) -> float:
    """The fake base's exact best gamma on seeds seed..seed+n-1: dist(0, g) is a parabola in g."""
    e = SIGMA * _eps(torch.arange(seed, seed + n)).mean(0)
    r = torch.tensor(THETA_R, dtype=torch.float64)
    return float(TARGET[2] - ((r[0] - r[1]) / 2 + e[2]))


# ------------------------------------------------------------------------------------------------
# the base at its own best settings (item 1)
# ------------------------------------------------------------------------------------------------


def test_tune_guidance_brent_in_log_gamma():
    res = tune_guidance(lambda g: (math.log(g) - math.log(2.2)) ** 2, (1.0, 4.0), max_evals=12)
    assert res.gamma == pytest.approx(2.2, rel=0.02) and len(res.evaluations) <= 12
    assert all(1.0 <= e.gamma <= 4.0 and e.w == 0.0 for e in res.evaluations)
    lin = tune_guidance(lambda g: (g - 0.5) ** 2, (0.0, 4.0), gamma_scale="linear")
    assert lin.gamma == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="log"):
        tune_guidance(lambda g: g, (0.0, 4.0), gamma_scale="log")


def test_neon_against_the_base_at_default_and_at_its_best_gamma(fam):
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], gamma=(1.0, 4.0), num_samples=64, seed=0,
                     confirm_samples=128, report=Report("t", argv=[]))
    bl = res["baselines"]
    # the default is the family's gamma 1.8; the best is the parabola's vertex (Brent in ln gamma, xtol 0.02)
    assert bl["default"]["gamma"] == 1.8
    assert bl["best"]["gamma"] == pytest.approx(base_best_gamma(0, 64), rel=0.02)
    assert bl["best"]["value"] <= bl["default"]["value"] and bl["best"]["n_evals"] <= res["max_evals_per_snapshot"]
    # the base's search ran first, on the search seeds, at w = 0 (theta_r itself)
    rows = [e for e in res["evaluations"] if e["phase"] in ("base", "base-gamma")]
    assert res["evaluations"][0]["phase"] == "base" and all(e["snapshot"] is None and e["w"] == 0.0 for e in rows)
    n_base = sum(e["phase"] in ("base", "base-gamma") for e in res["evaluations"][:bl["best"]["n_evals"] + 1])
    assert n_base == bl["best"]["n_evals"] + 1
    for seeds, theta, _ in fam.seen[:n_base]:
        assert torch.equal(seeds, torch.arange(0, 64)) and torch.equal(theta, torch.tensor(THETA_R, dtype=torch.float64))
    # gains against both, the headline against the best (the closed-form optimum is far below both)
    ch = res["chosen"]["value"]
    assert res["gain"]["vs_best"] == pytest.approx((bl["best"]["value"] - ch) / bl["best"]["value"])
    assert res["gain"]["vs_default"] == pytest.approx((bl["default"]["value"] - ch) / bl["default"]["value"])
    assert res["gain"]["vs_best"] < res["gain"]["vs_default"]
    conf = res["confirmation"]
    strongest = min(conf["base"]["dist"], conf["base_default"]["dist"], conf["base_best"]["dist"])
    assert conf["base_strongest"]["dist"] == strongest
    assert conf["relative_improvement"] == pytest.approx((strongest - conf["neon"]["dist"]) / strongest)
    assert conf["contradicts"] is False and res["improved"] is True


def test_no_tune_base_measures_the_default_only(fam):
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], gamma=(1.0, 4.0), tune_base=False,
                     num_samples=32, report=Report("t", argv=[]))
    assert res["baselines"]["best"] is None and res["gain"]["vs_best"] is None
    assert not any(e["phase"] == "base-gamma" for e in res["evaluations"])


def test_base_gamma_box_without_a_neon_gamma_search(fam):
    """--base-gamma with a w-only search: Neon at the default gamma against the base at its best."""
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], base_gamma=(1.0, 4.0), num_samples=64, seed=0,
                     require_improvement=False, report=Report("t", argv=[]))
    assert res["mode"] == "brent" and res["chosen"]["gamma"] == 1.8
    assert res["baselines"]["best"]["gamma"] == pytest.approx(base_best_gamma(0, 64), rel=0.02)
    # Neon restricted to gamma 1.8 (closed form) cannot beat the base at its own best gamma here
    w_star, _ = closed_form(THETA_S, 0, 64)
    assert abs(res["chosen"]["w"] - w_star) < 0.05
    assert res["beats_base"] is (res["chosen"]["value"] < res["baselines"]["best"]["value"])


# ------------------------------------------------------------------------------------------------
# the joint search (items 3 and 7)
# ------------------------------------------------------------------------------------------------


def _valley(w, g):
    """Curved, non-quadratic valley: w* = 0.8 ln(g) + 0.2, optimum at gamma 2.6 (FID-like growth)."""
    s = math.log(g)
    return 0.2 + math.expm1(abs(w - (0.8 * s + 0.2)) * 1.5) ** 2 + 0.6 * (s - math.log(2.6)) ** 2 + 0.05 * w


@pytest.mark.parametrize("gamma0", [1.2, 2.0, 2.6, 3.5])
def test_joint_search_never_ends_worse_than_w_alone_at_the_default_gamma(gamma0):
    w_only = brent_search(lambda w: _valley(w, gamma0), (0.0, 3.0), xtol=0.05, max_evals=12)
    res = joint_search(_valley, (0.0, 3.0), (1.0, 4.0), gamma0=gamma0)
    assert res.value <= w_only.value + 1e-12
    assert res.value == min(e.value for e in res.evaluations)  # the best point it measured
    # the line's first points are the w-only search's own (same tolerance, same order)
    line = [(e.w, e.gamma) for e in res.evaluations if e.phase == "line"]
    assert [w for w, _ in line[:4]] == pytest.approx([e.w for e in w_only.evaluations[:4]])
    assert all(g == pytest.approx(gamma0) for _, g in line)


def test_joint_search_line_completed_when_its_parabola_predicts_better():
    """Optimum on the line itself: the surface finds nothing better, so the line's Brent is finished."""
    f = lambda w, g: (w - 1.37) ** 2 + 4 * (math.log(g) - math.log(2.0)) ** 2 + 0.3 * abs(w - 1.37) ** 3  # noqa: E731
    w_only = brent_search(lambda w: f(w, 2.0), (0.0, 3.0), xtol=0.05, max_evals=12)
    res = joint_search(f, (0.0, 3.0), (1.0, 4.0), gamma0=2.0)
    assert res.value <= w_only.value
    assert res.w == pytest.approx(1.37, abs=0.05) and res.gamma == pytest.approx(2.0, rel=0.02)


def test_joint_search_exact_on_a_quadratic_and_resolved_in_nine():
    f = lambda w, g: 0.3 + (w - 0.9) ** 2 + 2 * (math.log(g) - 0.5) ** 2 - 0.8 * (w - 0.9) * (math.log(g) - 0.5)  # noqa: E731
    res = joint_search(f, (0.0, 3.0), (1.0, 4.0), gamma0=2.0)
    assert res.w == pytest.approx(0.9, abs=1e-6) and res.gamma == pytest.approx(math.exp(0.5), rel=1e-6)
    assert res.n_evals <= 9 and res.stopped in ("resolved", "converged")
    kinds = [r.kind for r in res.rounds]
    assert kinds[0] == "line" and "refine" in kinds


def test_joint_search_spends_more_only_while_unresolved():
    from neon_cli.tune.joint import RESOLVED_TOL

    res = joint_search(_valley, (0.0, 3.0), (1.0, 4.0), gamma0=1.2, line_max_evals=4)
    capped = joint_search(_valley, (0.0, 3.0), (1.0, 4.0), gamma0=1.2, max_evals=9, line_max_evals=4)
    assert capped.n_evals == 9 and capped.stopped == "budget"  # the fit still predicted a gain at 9
    assert 9 < res.n_evals <= 15 and res.value < capped.value
    if res.stopped == "resolved":  # its last fit, unevaluated, predicts less than the tolerance
        last = res.rounds[-1]
        assert last.measured is None and res.value - last.optimum.predicted <= RESOLVED_TOL * res.value
    with pytest.raises(ValueError, match="max_evals"):
        joint_search(_valley, (0.0, 3.0), (1.0, 4.0), gamma0=2.0, max_evals=6)


def test_run_tune_w_joint_default_is_the_line_search(fam):
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], gamma=(1.0, 4.0), num_samples=64, seed=5,
                     gamma_scale="linear", report=Report("t", argv=[]))
    w_star, g_star = closed_form(THETA_S, 5, 64, gamma=True)  # exactly quadratic in (w, gamma): found exactly
    assert res["joint"] == "line" and res["max_evals_per_snapshot"] == 15
    assert res["chosen"]["w"] == pytest.approx(w_star, abs=1e-4) and res["chosen"]["gamma"] == pytest.approx(g_star, abs=1e-4)
    phases = [e["phase"] for e in res["evaluations"] if e["snapshot"]]
    assert phases[:4] == ["line"] * 4 and phases[4:7] == ["design"] * 3 and set(phases[7:]) <= {"refine"}
    assert all(e["gamma"] == 1.8 for e in res["evaluations"] if e["phase"] == "line")  # the settings' gamma
    assert res["snapshots"][0]["n_evals"] <= 9


def test_hessian_flags_describe_the_reported_coefficients_of_a_maximised_metric(fam):
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], gamma=(1.0, 4.0), metric="recall",
                     joint="design", gamma_scale="linear", num_samples=64, report=Report("t", argv=[]))
    rnd = res["snapshots"][0]["rounds"][0]
    c = rnd["coefficients"]  # of recall itself, which is maximised: a concave fit near its maximum
    assert res["direction"] == "max" and c["d"] < 0 and 4 * c["d"] * c["e"] - c["h"] ** 2 > 0
    assert rnd["hessian_negative_definite"] is True and rnd["hessian_positive_definite"] is False
    assert rnd["predicted"] > rnd["values"][0]  # the fitted maximum lies above the centre's recall


# ------------------------------------------------------------------------------------------------
# never ship a model worse than the base (item 7)
# ------------------------------------------------------------------------------------------------


def test_no_candidate_beats_the_base_raises_exit_5_and_writes_no_output(fam, tmp_path):
    out = tmp_path / "best.safetensors"
    rep = Report("t", argv=[])
    with pytest.raises(NoImprovement, match="no candidate beats the base.*no -o written") as err:
        run_tune_w("fake-tune", fam.paths["base"], [fam.paths["worse"]], num_samples=32, output=out, report=rep)
    assert err.value.exit_code == 5 and "\n" not in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".best.safetensors*tmp*"))
    r = rep.results
    assert r["beats_base"] is False and r["improved"] is False and r["written"] is False
    assert r["chosen"]["value"] >= r["best_base"]["value"]
    # --write-anyway writes it, and still says so (exit 5)
    with pytest.raises(NoImprovement, match="written anyway"):
        run_tune_w("fake-tune", fam.paths["base"], [fam.paths["worse"]], num_samples=32, output=out, write_anyway=True,
                   report=Report("t", argv=[]))
    assert out.exists()


def test_cli_exit_code_5_and_error_report(fam, tmp_path):
    from typer.testing import CliRunner

    from neon_cli.commands import app

    rep = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["tune-w", "fake-tune", "--base", str(fam.paths["base"]), "--selftrained",
                                 str(fam.paths["worse"]), "--num-samples", "16", "-o", str(tmp_path / "o.safetensors"),
                                 "--report", str(rep), "-q"])
    assert r.exit_code == 5 and "no candidate beats the base" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    report = json.loads(rep.read_text())
    assert report["status"] != "ok" and report["results"]["beats_base"] is False
    assert not (tmp_path / "o.safetensors").exists()


def test_confirmation_contradicting_the_search_is_no_improvement(fam, monkeypatch):
    """A base that looks worse on the search seeds but better on the confirmation seeds."""
    real_score = fam.score

    def score(images, labels):
        out = real_score(images, labels)
        z = images.reshape(len(images), 24).contiguous().view(torch.float64)
        is_base = bool(torch.allclose(z.mean(0)[:2], torch.tensor(THETA_R, dtype=torch.float64), atol=0.05))
        if len(images) == 96 and is_base:  # confirmation seeds: the base suddenly scores perfectly
            out["dist"] = 0.0
        return out

    monkeypatch.setattr(fam, "score", score)
    rep = Report("t", argv=[])
    with pytest.raises(NoImprovement, match="confirmation on 1 block.s. of 96 fresh seeds contradicts the search"):
        run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], num_samples=32, confirm_samples=96, report=rep)
    assert rep.results["beats_base"] is True and rep.results["confirmation"]["contradicts"] is True


# ------------------------------------------------------------------------------------------------
# the chosen settings travel with the model (item 6)
# ------------------------------------------------------------------------------------------------


def test_output_records_the_chosen_settings_and_eval_synth_use_them(fam, tmp_path):
    from typer.testing import CliRunner

    from neon_cli.commands import app
    from neon_cli.tune.recorded import recorded_settings

    out = tmp_path / "best.safetensors"
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], gamma=(1.0, 4.0), set_pairs=["steps=7"],
                     num_samples=64, output=out, report=Report("t", argv=[]))
    g = res["chosen"]["gamma"]
    md = fam.read_metadata(str(out))
    assert json.loads(md["neon.settings"]) == {"guidance": g, "steps": 7}
    assert json.loads(md["neon.searched"]) == ["w", "guidance"] and float(md["neon.guidance"]) == g
    assert recorded_settings(fam, out) == {"guidance": g, "steps": 7}
    runner = CliRunner()
    n_before = len(fam.seen)
    r = runner.invoke(app, ["eval", "fake-tune", "--model", str(out), "--num-samples", "8"])
    assert r.exit_code == 0, r.output
    assert [s[2] for s in fam.seen[n_before:]] == [g]  # sampled at the recorded gamma
    said = " ".join(r.stderr.split())
    assert f"sampling with the settings recorded in best.safetensors: guidance={g:.6g}, steps=7 (--set" in said
    n_before = len(fam.seen)
    r = runner.invoke(app, ["eval", "fake-tune", "--model", str(out), "--num-samples", "8", "--set", "guidance=3"])
    assert r.exit_code == 0 and [s[2] for s in fam.seen[n_before:]] == [3.0]  # --set overrides
    assert "guidance=" not in r.stderr and "steps=7" in r.stderr
    r = runner.invoke(app, ["synth", "fake-tune", "--model", str(out), "--num-images", "4", "-o", str(tmp_path / "S")])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "S" / "plan.json").read_text())
    assert plan["settings"] == {"guidance": g, "steps": 7}
    # the plain base records nothing: defaults, no line
    r = runner.invoke(app, ["eval", "fake-tune", "--model", str(fam.paths["base"]), "--num-samples", "8"])
    assert r.exit_code == 0 and "recorded" not in r.stderr


def test_recorded_settings_ignore_what_the_family_refuses(fam, tmp_path):
    from neon_cli.tune.recorded import model_settings, recorded_settings

    m = fam.load(str(fam.paths["base"]))
    p = tmp_path / "m.safetensors"
    fam.save(m, str(p), {"neon.settings": json.dumps({"guidance": float("nan"), "steps": 5, "nope": 1})})
    assert recorded_settings(fam, p) == {"steps": 5}
    fam.save(m, str(p), {"neon.settings": "{not json"})
    assert recorded_settings(fam, p) == {}
    fam.save(m, str(p), {"neon.settings": json.dumps({"guidance": 99.0})})  # above the setting's maximum 10
    assert recorded_settings(fam, p) == {}
    fam.save(m, str(p), {"neon.settings": json.dumps({"guidance": 2.5})})
    assert model_settings(fam, p, ["steps=9"]) == ({"guidance": 2.5, "steps": 9}, {"guidance": 2.5})


# ------------------------------------------------------------------------------------------------
# --plot: the paper's Figure 4 panels at the chosen gamma (item 4)
# ------------------------------------------------------------------------------------------------


def test_plot_draws_metrics_along_w_at_the_chosen_gamma(fam, tmp_path):
    pytest.importorskip("matplotlib")
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], gamma=(1.0, 4.0), num_samples=16,
                     plot=tmp_path / "p.png", plot_points=5, report=Report("t", argv=[]))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = [e for e in res["evaluations"] if e["phase"] == "plot"]
    g = res["chosen"]["gamma"]
    assert 1 <= len(sweep) <= 5 and all(e["gamma"] == pytest.approx(g) for e in sweep)
    at_g = {round(e["w"], 9) for e in res["evaluations"] if e["snapshot"] and e["gamma"] == pytest.approx(g)}
    assert {round(float(w), 9) for w in np.linspace(0, 3, 5)} <= at_g  # the Figure 4 curve, w = 0 .. 3


# ------------------------------------------------------------------------------------------------
# the "more training" control (item 2)
# ------------------------------------------------------------------------------------------------


def test_control_real_is_the_same_budget_and_recipe_on_real_data(tmp_path):
    """--control real on the Gaussian toy (exact metrics): theta_r fine-tuned on the family's real
    samples with theta_s's budget, lr, batch and seed, scored like the base."""
    from neon_cli.finetune import finetune
    from neon_cli.synth import synthesize
    from neon_cli.tune import write_real_set
    from neon_gaussian import family as gauss
    from neon_gaussian import mle as M

    base = tmp_path / "base.safetensors"
    M.save(M.make_base(10, 100, 0), str(base), {"train_images": "100"})
    synthesize("gaussian", base, num=3000, out_dir=tmp_path / "S", seed=10**6, set_pairs=["temperature=0.8"],
               report=Report("synth"))
    snap = finetune("gaussian", base, tmp_path / "S", budget=3000, lr=None, out_dir=tmp_path / "ft",
                    report=Report("finetune"))["final"]
    res = run_tune_w("gaussian", base, [snap], bounds=(-3.0, 3.0), num_samples=2, control="real",
                     report=Report("t", argv=[]))
    ctl = res["control"]
    assert ctl["kind"] == "real" and ctl["budget"] == 3000 and ctl["num_real"] == 3000  # |S| from finetune.json
    recipe = json.loads((tmp_path / "ft" / "finetune.json").read_text())["config"]
    assert ctl["lr"] == recipe["lr"] and ctl["batch"] == recipe["batch"]
    # the same run by hand: real samples in a set, the same finetune call
    data = write_real_set(gauss, gauss.load(str(base)), tmp_path / "R", 3000, recipe["seed"])
    images, _ = gauss.real_samples(gauss.load(str(base)), 3000, recipe["seed"])
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(data / "shard-00000.safetensors"))["images"], images)
    by_hand = finetune("gaussian", base, data, budget=3000, lr=recipe["lr"], batch=recipe["batch"], seed=recipe["seed"],
                       out_dir=tmp_path / "ft-real", report=Report("finetune"))["final"]
    exact = M.score_model(M.load(by_hand), {"temperature": 1.0})
    assert ctl["default"]["value"] == pytest.approx(exact["nll"], rel=1e-12)
    base_nll = res["baselines"]["default"]["value"]
    assert ctl["default"]["value"] < base_nll  # more real data helps the 100-sample MLE, as expected
    assert res["chosen"]["value"] < base_nll


def test_control_needs_real_data_and_a_budget(fam, tmp_path):
    with pytest.raises(UsageError, match="--control real: family 'fake-tune' provides no real data"):
        run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], control="real", report=Report("t", argv=[]))
    with pytest.raises(UsageError, match="--control nope"):
        run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], control="nope", report=Report("t", argv=[]))
    assert fam.sample_calls == 0


def test_locations_are_not_recorded_settings():
    """A tuned file records inference settings only: a checkout path (``repo``, default None) is
    where code lives on one machine, and a None value is no setting at all (the EDM family's
    eval of a tune-w output once read the recorded repo=None as --set repo=None)."""
    import json
    from types import SimpleNamespace

    from neon_cli.family import Setting
    from neon_cli.tune.recorded import SETTINGS_KEY, recordable, recorded_settings

    fam = SimpleNamespace(settings=(Setting("guidance", 2.0, float, low=0.0), Setting("repo", None, str),
                                    Setting("sampler", "heun", str)))
    assert recordable(fam, {"guidance": 1.5, "repo": "/home/me/edm", "sampler": "euler", "x": None}) == \
        {"guidance": 1.5, "sampler": "euler"}
    fam.read_metadata = lambda path: {SETTINGS_KEY: json.dumps({"guidance": 1.5, "repo": None, "sampler": "euler"})}
    assert recorded_settings(fam, "f.safetensors") == {"guidance": 1.5, "sampler": "euler"}
    fam.read_metadata = lambda path: {SETTINGS_KEY: json.dumps({"repo": "/elsewhere"})}
    assert recorded_settings(fam, "f.safetensors") == {}
