"""Standard errors of metric values (issue 23, item 1): the class-balanced delete-a-group jackknife
against the spread of the metric over independent seed blocks, and the paired difference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tune_fakes import fam  # noqa: F401  (the fake family fixture)

from neon_cli.metrics import (balanced_groups, combine_differences, feature_stats, frechet_distance,
                              frechet_replicates, jackknife, paired_difference)

K = 10

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest single-threaded


def _balanced_features(rng, n, shift=0.0, d=6):
    """Features of a class-balanced plan: row i belongs to class i % K, classes far apart (so an
    unbalanced subset would change the statistics a lot)."""
    centres = np.random.default_rng(123).normal(0, 3.0, size=(K, d))
    labels = np.arange(n) % K
    return centres[labels] + rng.normal(0, 1.0 + shift, size=(n, d))


def test_groups_are_balanced_and_contiguous():
    groups = balanced_groups(1000, K)
    assert len(groups) == 10 and all(len(g) == 100 for g in groups)
    assert np.array_equal(np.concatenate(groups), np.arange(1000))
    for g in balanced_groups(1234, K):  # remainder joins the last group
        assert np.all(np.bincount(g[: len(g) // K * K] % K, minlength=K) == len(g) // K)
    assert balanced_groups(15, K) == []  # fewer than two balanced groups: no jackknife


def test_replicates_equal_frechet_distance_on_the_subsets():
    rng = np.random.default_rng(0)
    x = _balanced_features(rng, 300)
    ref = feature_stats(_balanced_features(rng, 2000))
    groups = balanced_groups(300, K)
    full, reps = frechet_replicates(x, *ref, groups)
    assert full == pytest.approx(frechet_distance(*feature_stats(x), *ref), rel=1e-12)
    for g, r in zip(groups, reps):
        keep = np.setdiff1d(np.arange(300), g)
        assert r == pytest.approx(frechet_distance(*feature_stats(x[keep]), *ref), rel=1e-8, abs=1e-10)


def test_jackknife_formula():
    out = jackknife(2.0, [1.0, 2.0, 3.0])
    assert out["se"] == pytest.approx(np.sqrt(2 / 3 * 2.0))
    assert out["bias_corrected"] == pytest.approx(3 * 2.0 - 2 * 2.0)


def test_fd_se_matches_the_spread_over_independent_seed_blocks():
    """The SE of one block (n = 500) is within 25 % of the std of FD over 60 independent blocks,
    and the paired difference's SE within 25 % of the std of the difference. The candidates differ
    from the reference well beyond FD's noise floor, as a generator does: at FD ~ its own c/N
    bias the jackknife is conservative (Efron-Stein), up to ~1.5x here at FD = 0.05."""
    rng = np.random.default_rng(1)
    ref = feature_stats(_balanced_features(rng, 20000))
    groups = balanced_groups(500, K)
    fds, ses, diffs, dses = [], [], [], []
    for _ in range(60):
        noise = rng.normal(size=(500, 6))  # common random numbers: both candidates share the noise
        centres = np.random.default_rng(123).normal(0, 3.0, size=(K, 6))
        lab = np.arange(500) % K
        xa, xb = centres[lab] + 0.2 + 1.2 * noise, centres[lab] + 0.25 + 1.3 * noise
        fa, ra = frechet_replicates(xa, *ref, groups)
        fb, rb = frechet_replicates(xb, *ref, groups)
        fds.append(fa)
        ses.append(jackknife(fa, ra)["se"])
        p = paired_difference(fa, ra, fb, rb)
        diffs.append(p["diff"])
        dses.append(p["se"])
    assert np.mean(ses) == pytest.approx(np.std(fds, ddof=1), rel=0.25)
    assert np.mean(dses) == pytest.approx(np.std(diffs, ddof=1), rel=0.25)
    assert np.mean(dses) < 0.5 * np.sqrt(2) * np.mean(ses)  # pairing cancels the shared noise


def test_evaluator_se_matches_spread_gaussian_ddpm():
    """Through the Evaluator on a real family (gaussian-ddpm, sampled): SE within 25 % of the std
    of w2 over 24 disjoint seed blocks of 300 samples (digits at N = 1,000 over 24 blocks: README)."""
    from neon_cli.evaluate import Evaluator
    from neon_cli.family import get_family

    fam = get_family("gaussian-ddpm")
    model = fam.load(fam.default_model)
    settings = {s.name: s.default for s in fam.settings}
    vals, ses = [], []
    for b in range(24):
        m = Evaluator(fam, settings, 300, seed=50_000_000 + 300 * b, batch=300).score_model(model)
        vals.append(m["w2"])
        ses.append(m["w2_se"])
    assert np.mean(ses) == pytest.approx(np.std(vals, ddof=1), rel=0.25)


def test_combined_blocks_and_resolution():
    c = combine_differences([(1.0, 0.3), (0.6, 0.4)])
    assert c["diff"] == pytest.approx(0.8) and c["se"] == pytest.approx(0.25)
    assert c["resolved"] and c["ci"][0] == pytest.approx(0.8 - 1.959963984540054 * 0.25)
    assert not combine_differences([(0.1, 0.3)])["resolved"]


def test_eval_reports_se_gates_on_min_max_and_se(tmp_path):
    import json

    from typer.testing import CliRunner

    from neon_cli.commands import app

    def invoke(a):
        return CliRunner().invoke(app, [str(x) for x in a])

    args = ["eval", "gaussian-ddpm", "--num-samples", "400", "--batch", "400"]
    ok = invoke(args + ["--json"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout)
    m = out["metrics"]
    assert {"w2", "w2_se", "frechet", "frechet_se"} <= set(m) and "seconds" not in m and out["seconds"] >= 0
    assert out["seed"] == 20_000_000 and m["w2_se"] > 0 and set(out["bias_corrected"]) >= {"w2", "frechet"}
    w2, se = m["w2"], m["w2_se"]
    both = invoke(args + ["--max-metric", f"w2={w2 / 2}", "--max-metric", f"frechet={m['frechet'] / 2}",
                          "--min-metric", f"w2={w2 * 1.5}", "--report", str(tmp_path / "r.json")])
    assert both.exit_code == 1
    assert "w2 = " in both.stderr and "frechet = " in both.stderr and "is below --min-metric w2" in both.stderr
    exceeded = json.loads((tmp_path / "r.json").read_text())["results"]["exceeded"]
    assert set(exceeded) == {"w2", "frechet"} and exceeded["w2"]["min"] == w2 * 1.5 and exceeded["w2"]["max"] == w2 / 2
    assert invoke(args + ["--min-metric", f"w2={w2 * 0.5}"]).exit_code == 0
    near = ["--max-metric", f"w2={w2 - 0.5 * se}"]
    assert invoke(args + near).exit_code == 1  # passed on the value ...
    assert invoke(args + near + ["--gate-se", "1"]).exit_code == 0  # ... but within one standard error
    assert invoke(args + ["--max-metric", f"w2={w2 - 3 * se}", "--gate-se", "2"]).exit_code == 1


# ------------------------------------------------------------------------------------------------
# tune-w's stage 2 on the fake family (issue 23, item 2)
# ------------------------------------------------------------------------------------------------


def test_stage2_extends_until_budget_and_noise_is_exit_5(fam, monkeypatch):
    """On the fresh seeds every merge is 0.1 % better than the base, but the jackknife replicates
    are noisy (SE ~ 100x the difference): nothing is resolved, so stage 2 adds blocks of fresh seeds
    until --max-images, then says 'inside the noise' (NoImprovement, exit 5), with the images of
    every stage counted."""
    import itertools

    import torch

    from neon_cli.errors import NoImprovement
    from neon_cli.report import Report
    from neon_cli.tune import run_tune_w
    from tune_fakes import THETA_R

    real, calls = fam.score, itertools.count()

    def score(images, labels):
        if len(images) > 32:  # the search (64 seeds) and its replicates: the real metric
            return real(images, labels)
        z = images.reshape(len(images), 24).contiguous().view(torch.float64)
        base = bool(torch.allclose(z.mean(0)[:2], torch.tensor(THETA_R, dtype=torch.float64), atol=0.05))
        dist = 1.0 if base else 0.999
        if len(images) < 32:  # a replicate
            dist += 0.05 * float(np.random.default_rng(next(calls)).normal())
        return {"dist": dist, "recall": math.exp(-dist)}

    monkeypatch.setattr(fam, "score", score)
    rep = Report("t", argv=[])
    with pytest.raises(NoImprovement, match="inside the noise"):
        run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], num_samples=64, seed=0, confirm_samples=32,
                   keep=2, max_images=300, refit_width=0.0, report=rep)
    conf = rep.results["confirmation"]
    assert conf["blocks"] == 3 and conf["images"] == 3 * 3 * 32  # 2 candidates + the base; 3 blocks of 96 fit in 300
    assert conf["seeds"] == [64, 64 + 3 * 32 - 1] and not conf["resolved_vs_base"] and not conf["contradicts"]
    assert conf["vs_base"]["diff"] == pytest.approx(-0.001) and conf["vs_base"]["se"] > 0.01
    assert rep.results["improved"] is False and rep.results["resolution"]["inside_noise"] is True
    img = rep.results["images"]
    assert img["confirmation"] == 288 and img["total"] == img["search"] + img["base"] + 288


def test_refit_adds_blocks_until_the_expected_regret_meets_the_target(fam, monkeypatch):
    """Stage 2's stopping rule: the fake metric is exact on stage 2's blocks but its jackknife
    replicates are noisy, so the vertex has an SE and an expected regret (curvature * SE^2 /
    bias-corrected value, as reported). A target below it adds blocks until --max-images; a target above it stops after
    the second (one block's jackknife SE is too noisy to stop on)."""
    import itertools

    import torch

    from neon_cli.report import Report
    from neon_cli.tune import run_tune_w

    real, calls = fam.score, itertools.count()

    def score(images, labels):
        out = real(images, labels)
        if len(images) < 32:  # a replicate of a stage-2 block (blocks of 32; the search's are 64)
            out["dist"] += 0.002 * float(np.random.default_rng(next(calls)).normal())
        return out

    monkeypatch.setattr(fam, "score", score)
    blocks = {}
    for target in (1e-12, 10.0):
        rep = Report("t", argv=[])
        res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], num_samples=64, seed=0, confirm_samples=32,
                         max_images=1000, target_regret=target, require_improvement=False, report=rep)
        fit, conf = res["confirmation"]["refit"], res["confirmation"]
        assert fit["convex"] and not fit["clipped"] and fit["vertex_se"] > 0
        # relative to the bias-corrected value: the noisy replicates shift the jackknife's correction
        assert fit["value_bias_corrected"] != fit["value"]
        assert fit["expected_regret"] == pytest.approx(fit["curvature"] * fit["vertex_se"] ** 2
                                                       / abs(fit["value_bias_corrected"]))
        assert conf["images"] <= 1000
        blocks[target] = conf["blocks"]
        if target > 1:
            assert fit["expected_regret"] < target
        else:  # never met: blocks until the next (a half-block: 2 probes, 64 images) and the vertex's
            # (on the two full blocks, 64) would pass 1000; the full blocks also score the base
            per = [sum(p["block"] == b for p in fit["points"]) for b in range(conf["blocks"])]
            assert per == [3, 3] + [2] * (conf["blocks"] - 2)
            assert sum(e["phase"] == "confirm-base" for e in res["evaluations"]) == 2
            assert conf["images"] == (2 * 4 + 2 * (conf["blocks"] - 2) + 2) * 32  # the vertex: not a probe
            assert conf["images"] <= 1000 < conf["images"] + 2 * 32
    assert blocks[10.0] == 2 and blocks[1e-12] == 12


def test_image_families_replicates_equal_the_generic_jackknife(tmp_path, monkeypatch):
    """The image families' one-pass jackknife (pixel_fid here; Inception FID takes the same
    frechet_replicates path) equals scoring every leave-one-group-out subset again."""
    import torch

    from neon_cli.metrics import save_stats, score_with_jackknife
    from neon_diffusers.scoring import ImageScorer, pixel_features

    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.integers(0, 256, (200, 3, 4, 4), dtype=np.uint8))
    save_stats(tmp_path / "ref.npz", *feature_stats(pixel_features(ref)))
    monkeypatch.setenv("NEON_REF_STATS", str(tmp_path / "ref.npz"))
    monkeypatch.delenv("NEON_INCEPTION", raising=False)
    images = torch.from_numpy(rng.integers(0, 200, (120, 3, 4, 4), dtype=np.uint8))
    groups = balanced_groups(120, 10)
    scorer = ImageScorer()
    fast_full, fast = scorer.jackknife(images, None, groups)
    slow_full, slow = score_with_jackknife(scorer, images, None, groups)
    assert fast_full["pixel_fid"] == pytest.approx(slow_full["pixel_fid"], rel=1e-12)
    assert np.allclose(fast["pixel_fid"], slow["pixel_fid"], rtol=1e-8)


@pytest.mark.parametrize("extra, factor", [((), 30), (("--gamma", "1", "4"), 60), (("--gamma", "1", "4", "--refit-gamma", "0"), 30),
                                           (("--gamma", "1", "4", "--max-images", "777"), None)])
def test_max_images_default_is_60x_for_the_surface_refit_and_30x_over_w(tmp_path, monkeypatch, extra, factor):
    """``--max-images``'s default is STAGE2_IMAGES_FACTOR (30) x --num-samples for the refit over w and
    STAGE2_IMAGES_FACTOR_SURFACE (60) x for the surface over (w, ln gamma), the factors measured by
    benchmarks/tune_regret.py (README); a typed value is kept. The library call is replaced by a stand-in
    that records the request the CLI built."""
    import neon_cli.tune.run as run
    from cli_helpers import invoke
    from neon_cli.errors import DataError

    assert (run.STAGE2_IMAGES_FACTOR, run.STAGE2_IMAGES_FACTOR_SURFACE) == (30, 60)
    seen = []

    def stand_in(req, report=None, progress=None):
        seen.append(req)
        raise DataError("stand-in: recorded the request")

    monkeypatch.setattr(run, "tune_w", stand_in)
    snap = tmp_path / "theta_s.safetensors"
    snap.write_bytes(b"")  # never opened: the stand-in replaces the run
    res = invoke("tune-w", "digits", "-s", snap, "-n", 100, *extra, code=tuple(range(1, 256)))
    assert "stand-in" in res.output
    assert seen[0].max_images == (777 if factor is None else factor * 100)
