"""``neon tune-w``: Brent over w, the 6-point (w, gamma) fit, snapshots, cache/resume, report, CLI.

The algorithms are checked on functions whose optimum is known in closed form. ``run_tune_w`` and
the CLI run on a tiny fake family registered in-process through the real entry-point lookup: its
"model" is a parameter vector theta in R^2 and its metric is the squared distance between the mean
of seed-dependent features and a target, so the best (w, gamma) is a least-squares problem solved
in closed form here, including the sampling noise of the seed plan (common random numbers).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import types
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from neon_cli import tune
from neon_cli.errors import UsageError
from neon_cli.family import ENTRY_POINT_GROUP, Setting
from neon_cli.report import Report
from tune_fakes import SIGMA, TARGET, THETA_BAD, THETA_R, THETA_S, FakeFamily, closed_form, fam  # noqa: F401
from neon_cli.tune import (
    EvalCache,
    abandonment_rule,
    brent_search,
    design_points,
    expand_checkpoints,
    fit_quadratic,
    minimize_quadratic,
    parabola_minimum,
    quadratic_features,
    quadratic_search,
    run_tune_w,
    search_snapshots,
)

# ------------------------------------------------------------------------------------------------
# Brent over w
# ------------------------------------------------------------------------------------------------


def counted(f):
    calls = []

    def g(*x):
        calls.append(x)
        return f(*x)

    g.calls = calls
    return g


def test_brent_finds_minimum_of_known_function_within_xtol_and_budget():
    f = counted(lambda w: (w - 1.3) ** 2 + 2)
    r = brent_search(f, (0.0, 3.0), xtol=0.05, max_evals=12)
    assert abs(r.w - 1.3) <= 0.05
    assert r.value == pytest.approx(2.0, abs=0.05**2)
    assert r.stopped == "converged"
    assert r.n_evals == len(f.calls) <= 12
    # every evaluation recorded, in order, with its value
    assert [e.w for e in r.evaluations] == [c[0] for c in f.calls]
    assert all(e.value == (e.w - 1.3) ** 2 + 2 for e in r.evaluations)


def test_brent_asymmetric_non_quadratic_and_negative_bounds():
    # a diversity-seeking family: optimum at w = -0.4 in (-1, 0)
    f = counted(lambda w: math.exp(w + 0.4) - (w + 0.4))  # minimum 1 at w = -0.4
    r = brent_search(f, (-1.0, 0.5), xtol=0.01, max_evals=20)
    assert abs(r.w + 0.4) <= 0.01
    assert r.stopped == "converged" and len(f.calls) <= 20


def test_brent_respects_budget_and_returns_best_seen():
    f = counted(lambda w: (w - 2.9) ** 2)  # needs many golden steps to walk to the edge
    r = brent_search(f, (0.0, 3.0), xtol=1e-4, max_evals=4)
    assert len(f.calls) == 4 and r.n_evals == 4
    assert r.stopped == "budget"
    best = min(f.calls, key=lambda c: (c[0] - 2.9) ** 2)[0]
    assert r.w == best and r.value == (best - 2.9) ** 2


def test_brent_non_finite_values_do_not_break_the_search():
    # a model that diverges for w > 2 (NaN metric) still gives the optimum at 1.8
    r = brent_search(lambda w: float("nan") if w > 2 else (w - 1.8) ** 2, (0.0, 3.0), xtol=0.02, max_evals=15)
    assert abs(r.w - 1.8) <= 0.02
    assert any(math.isinf(e.value) for e in r.evaluations)


def test_brent_bad_arguments():
    with pytest.raises(ValueError):
        brent_search(lambda w: w, (1.0, 1.0))
    with pytest.raises(ValueError):
        brent_search(lambda w: w, (0.0, 1.0), max_evals=0)


def test_crn_noise_keeps_argmin_stable_where_independent_noise_does_not():
    """Metric = smooth quadratic + sampling noise. With common random numbers the noise is one
    fixed smooth function of the seed set (here sigma (z0 + z1 w)), so every candidate sees the
    same offset and the argmin moves only by the known -sigma z1 / 2; with fresh seeds per
    evaluation the noise differs between candidates and the argmin scatters."""
    sigma, xtol = 0.05, 0.02
    rng = np.random.default_rng(123)
    crn_err, indep_err = [], []
    for _ in range(12):
        z0, z1 = rng.normal(size=2)  # the seed set's fixed noise
        r = brent_search(lambda w: (w - 1.3) ** 2 + 2 + sigma * (z0 + z1 * w), (0.0, 3.0), xtol=xtol, max_evals=12)
        w_true = 1.3 - sigma * z1 / 2  # argmin of the noisy-but-common objective
        assert abs(r.w - w_true) <= xtol
        crn_err.append(abs(r.w - 1.3))
        fresh = np.random.default_rng(int(rng.integers(1 << 30)))
        r2 = brent_search(lambda w: (w - 1.3) ** 2 + 2 + sigma * fresh.normal(), (0.0, 3.0), xtol=xtol, max_evals=12)
        indep_err.append(abs(r2.w - 1.3))
    assert max(crn_err) <= sigma * 3 / 2 + xtol
    assert np.mean(indep_err) > 3 * np.mean(crn_err)


# ------------------------------------------------------------------------------------------------
# The 6-point quadratic fit
# ------------------------------------------------------------------------------------------------


def quad(coef):
    return lambda w, g: float(quadratic_features(np.array([w]), np.array([g]))[0] @ coef)


def test_design_is_nonsingular_and_other_layouts_are_singular():
    for radius in (tune.DESIGN_RADIUS, 1.0):
        P = design_points((0.0, 3.0), (1.0, 5.0), radius=radius)
        assert P.shape == (6, 2)
        assert np.all((P[:, 0] >= 0) & (P[:, 0] <= 3) & (P[:, 1] >= 1) & (P[:, 1] <= 5))
        u, v = (P[:, 0] - 1.5) / (1.5 * radius), (P[:, 1] - 3) / (2 * radius)  # pentagon of radius 1
        np.testing.assert_allclose(np.hypot(u[1:], v[1:]), 1.0)
        assert (u[0], v[0]) == (0.0, 0.0) and (u[1], v[1]) == pytest.approx((0.0, 1.0))  # centre, top vertex
        X = quadratic_features(u, v)
        assert np.linalg.matrix_rank(X) == 6
        assert np.linalg.cond(X) < 6  # documented: 5.2
    with pytest.raises(ValueError, match="radius"):
        design_points((0.0, 3.0), (1.0, 5.0), radius=0.0)
    grid32 = np.array([[w, g] for w in (0.0, 1.5, 3.0) for g in (1.0, 5.0)])
    hexagon = np.c_[1.5 + np.cos(np.arange(6) * np.pi / 3), 3 + np.sin(np.arange(6) * np.pi / 3)]
    for bad in (grid32, hexagon):
        with pytest.raises(ValueError, match="singular"):
            fit_quadratic(bad, np.arange(6.0))


def test_fit_recovers_known_quadratic_coefficients_and_optimum_exactly():
    rng = np.random.default_rng(7)
    for _ in range(5):
        a, b, c = rng.normal(size=3)
        # a positive definite Hessian with its stationary point inside the box
        L = rng.normal(size=(2, 2))
        Hs = L @ L.T + 0.5 * np.eye(2)
        x_star = np.array([rng.uniform(0.5, 2.5), rng.uniform(1.5, 4.5)])
        grad0 = -Hs @ x_star  # f = const + grad0 . x + 1/2 x^T Hs x
        coef = np.array([a, grad0[0], grad0[1], Hs[0, 0] / 2, Hs[1, 1] / 2, Hs[0, 1]])
        P = design_points((0.0, 3.0), (1.0, 5.0))
        fit = fit_quadratic(P, [quad(coef)(w, g) for w, g in P])
        np.testing.assert_allclose(fit.coef, coef, rtol=0, atol=1e-9)
        m = minimize_quadratic(fit, (0.0, 3.0), (1.0, 5.0))
        assert m.kind == "stationary"
        np.testing.assert_allclose([m.w, m.gamma], x_star, atol=1e-9)
        assert m.predicted == pytest.approx(quad(coef)(*x_star), abs=1e-9)


def test_fit_with_more_points_is_least_squares():
    coef = np.array([1.0, -0.5, 0.3, 0.8, 0.4, 0.1])
    rng = np.random.default_rng(1)
    P = rng.uniform([0, 1], [3, 5], size=(20, 2))
    y = np.array([quad(coef)(w, g) for w, g in P]) + 0.01 * rng.normal(size=20)
    fit = fit_quadratic(P, y)
    ref = np.linalg.lstsq(quadratic_features(P[:, 0], P[:, 1]), y, rcond=None)[0]
    np.testing.assert_allclose(fit.coef, ref, atol=1e-9)


def _reference_box_min(coef, wb, gb):
    """scipy.optimize.minimize (L-BFGS-B) from a 5 x 5 grid of starts: the best local minimum."""
    f = quad(coef)
    best = None
    for w0 in np.linspace(*wb, 5):
        for g0 in np.linspace(*gb, 5):
            r = minimize(lambda x: f(*x), [w0, g0], method="L-BFGS-B", bounds=[wb, gb], options={"ftol": 1e-15, "gtol": 1e-12})
            if best is None or r.fun < best.fun:
                best = r
    return best


@pytest.mark.parametrize("coef", [
    [0.0, -8.0, 0.0, 1.0, 1.0, 0.0],      # convex, stationary point (4, 0) outside the box: corner (3, 1)
    [22.25, -8.0, -5.0, 1.0, 1.0, 0.0],   # convex, stationary point (4, 2.5): inside the edge w = 3
    [4.0, 3.0, -5.0, -1.0, 1.0, 0.0],     # saddle: minimum inside the edges w = 0 and w = 3 at gamma 2.5
    [0.0, -8.0, -12.0, 1.0, 1.0, 0.5],    # convex, optimum beyond a corner
    [1.0, 0.3, -0.2, 1.0, -0.7, 0.4],     # indefinite (saddle): minimum on the boundary
    [2.0, 0.5, 0.5, -1.0, -0.3, 0.0],     # concave: minimum at a corner
    [0.0, 0.0, -1.0, 0.5, 0.0, 0.0],      # singular PSD Hessian (flat in gamma)
])
def test_box_constrained_minimum_matches_scipy(coef):
    coef = np.array(coef)
    wb, gb = (0.0, 3.0), (1.0, 4.0)
    fit = tune.QuadraticFit(coef)
    m = minimize_quadratic(fit, wb, gb)
    ref = _reference_box_min(coef, wb, gb)
    assert m.kind == "boundary"
    assert m.predicted == pytest.approx(ref.fun, abs=1e-9)
    assert m.predicted <= ref.fun + 1e-12
    assert wb[0] <= m.w <= wb[1] and gb[0] <= m.gamma <= gb[1]
    assert quad(coef)(m.w, m.gamma) == pytest.approx(m.predicted, abs=1e-12)


def test_quadratic_search_exact_on_a_quadratic_in_seven_evaluations():
    coef = np.array([3.0, -2.4, -2.0, 1.0, 0.5, -0.2])  # stationary point inside [0,3]x[1,4]
    x_star = np.linalg.solve([[2 * coef[3], coef[5]], [coef[5], 2 * coef[4]]], -coef[1:3])
    f = counted(quad(coef))
    r = quadratic_search(f, (0.0, 3.0), (1.0, 4.0), gamma_scale="linear")
    # the refinement step refits an exact quadratic, lands on the same point and stops: no 8th evaluation
    assert len(f.calls) == 7 and r.n_evals == 7 and r.stopped == "converged"
    np.testing.assert_allclose([r.w, r.gamma], x_star, atol=1e-9)
    fr = r.rounds[0]
    assert fr.kind == "design" and fr.optimum.kind == "stationary"
    assert fr.measured == pytest.approx(fr.optimum.predicted, abs=1e-12)
    np.testing.assert_allclose(fr.fit.coef, coef, atol=1e-9)
    assert [e.phase for e in r.evaluations] == ["design"] * 6 + ["fit-optimum"]
    assert [x.kind for x in r.rounds] == ["design", "refine"] and r.rounds[1].round == 2
    np.testing.assert_allclose([r.rounds[1].optimum.w, r.rounds[1].optimum.gamma], x_star, atol=1e-9)


def test_quadratic_search_log_gamma_is_exact_on_a_quadratic_in_ln_gamma():
    # f = a + b w + c s + d w^2 + e s^2 + h w s with s = ln gamma: the default (log) scale fits it exactly
    coef = np.array([2.0, -1.6, -1.0, 1.0, 2.0, -0.8])
    w_star, s_star = np.linalg.solve([[2 * coef[3], coef[5]], [coef[5], 2 * coef[4]]], -coef[1:3])
    f = counted(lambda w, g: quad(coef)(w, math.log(g)))
    r = quadratic_search(f, (0.0, 3.0), (1.0, 4.0))
    assert r.gamma_scale == "log" and r.n_evals == 7 and r.stopped == "converged"
    assert r.w == pytest.approx(w_star, abs=1e-9) and r.gamma == pytest.approx(math.exp(s_star), abs=1e-9)
    fr = r.rounds[0]
    np.testing.assert_allclose(fr.fit.coef, coef, atol=1e-9)
    # the design is the pentagon in (w, ln gamma): the centre is the geometric mean of the gamma bounds
    assert fr.points[0] == pytest.approx([1.5, 2.0])
    assert fr.to_json()["fit_variables"] == ["w", "ln_gamma"] and fr.box == ((0.0, 3.0), (1.0, 4.0))
    # the same function in linear gamma is not a quadratic: that fit misses in 7 evaluations
    lin = quadratic_search(f, (0.0, 3.0), (1.0, 4.0), gamma_scale="linear", refine=0)
    assert lin.value > r.value + 1e-3


def test_quadratic_search_refinement_steps():
    # a curved valley (w* = 0.25 gamma^2 at each gamma) with a quartic wall: not quadratic in
    # (w, gamma) nor in (w, ln gamma)
    def g_fn(w, g):
        return (w - 0.25 * g * g) ** 2 + 0.5 * (w - 0.25 * g * g) ** 4 + 0.3 * (g - 2.2) ** 2

    ref = minimize(lambda x: g_fn(*x), [1.0, 2.0], method="L-BFGS-B", bounds=[(0, 3), (1, 4)]).fun
    f0, f2 = counted(g_fn), counted(g_fn)
    r0 = quadratic_search(f0, (0.0, 3.0), (1.0, 4.0), refine=0)
    r2 = quadratic_search(f2, (0.0, 3.0), (1.0, 4.0))
    assert r0.n_evals == 7 and r2.n_evals == len(f2.calls) == 9 and r2.stopped == "done"
    assert [e.phase for e in r2.evaluations][-2:] == ["refine", "refine"]
    assert r2.value < r0.value and r2.value - ref < 0.2 * (r0.value - ref)
    steps = [x for x in r2.rounds if x.kind == "refine"]
    assert [x.round for x in steps] == [2, 3]
    for k, st in enumerate(steps):
        (w0, w1), (g0, g1) = st.box
        assert w1 - w0 == pytest.approx(3.0 * 0.5 ** (k + 1))                # halved each step ...
        assert math.log(g1 / g0) == pytest.approx(math.log(4.0) * 0.5 ** (k + 1))  # ... in ln gamma too
        assert 0.0 <= w0 and w1 <= 3.0 and 1.0 <= g0 and g1 <= 4.0
        assert len(st.points) == 6 and st.measured is not None
        assert w0 - 1e-12 <= st.optimum.w <= w1 + 1e-12 and g0 - 1e-12 <= st.optimum.gamma <= g1 + 1e-12
    # a budget of 8 leaves one step
    r1 = quadratic_search(counted(g_fn), (0.0, 3.0), (1.0, 4.0), max_evals=8)
    assert r1.n_evals == 8 and r1.stopped == "budget" and [x.kind for x in r1.rounds] == ["design", "refine"]


def test_gamma_scale_resolution():
    assert tune.resolve_gamma_scale("auto", (1.0, 4.0)) == "log"
    assert tune.resolve_gamma_scale("auto", (0.0, 4.0)) == "linear"  # e.g. VAR's g, where 0 is no guidance
    assert tune.resolve_gamma_scale("linear", (1.0, 4.0)) == "linear"
    with pytest.raises(ValueError, match="log"):
        tune.resolve_gamma_scale("log", (0.0, 4.0))
    with pytest.raises(ValueError, match="gamma_scale"):
        tune.resolve_gamma_scale("sqrt", (1.0, 4.0))
    r = quadratic_search(lambda w, g: (w - 1) ** 2 + (g - 1) ** 2, (0.0, 3.0), (0.0, 4.0))
    assert r.gamma_scale == "linear" and r.w == pytest.approx(1.0) and r.gamma == pytest.approx(1.0)


def test_quadratic_search_second_round_on_shrunken_box():
    # not quadratic: quartic in w, so round 2 on a smaller box improves on round 1
    f = counted(lambda w, g: (w - 1.2) ** 2 + 0.6 * (w - 1.2) ** 4 + (g - 2.0 - 0.3 * w) ** 2)
    r1 = quadratic_search(f, (0.0, 3.0), (1.0, 4.0), rounds=1, refine=0, gamma_scale="linear")
    f.calls.clear()
    r2 = quadratic_search(f, (0.0, 3.0), (1.0, 4.0), rounds=2, refine=0, gamma_scale="linear")
    assert len(r2.rounds) == 2
    (w0, w1), (g0, g1) = r2.rounds[1].box
    assert w1 - w0 == pytest.approx(1.5) and g1 - g0 == pytest.approx(1.5)
    # the round-2 box is centred on round 1's best point (inside the outer box here): its centre is reused
    assert r2.n_evals == len(f.calls) == 13
    assert r2.value <= r1.value
    assert abs(r2.w - 1.2) < abs(r1.w - 1.2) + 1e-12
    assert abs(r2.w - 1.2) < 0.05 and abs(r2.gamma - 2.36) < 0.05


def test_quadratic_search_budget_and_non_finite():
    f = counted(lambda w, g: (w - 1) ** 2 + (g - 2) ** 2)
    r = quadratic_search(f, (0.0, 3.0), (1.0, 4.0), rounds=2, max_evals=10)
    assert r.stopped == "budget" and len(r.rounds) == 1 and len(f.calls) == 7
    with pytest.raises(ValueError):
        quadratic_search(f, (0.0, 3.0), (1.0, 4.0), max_evals=6)
    r = quadratic_search(lambda w, g: float("nan") if w > 2.0 else w + g, (0.0, 3.0), (1.0, 4.0))
    assert r.stopped == "non-finite" and r.rounds[0].fit is None and r.n_evals == 6
    assert r.value == min(e.value for e in r.evaluations)


# ------------------------------------------------------------------------------------------------
# Snapshots and early abandonment
# ------------------------------------------------------------------------------------------------


def test_parabola_minimum():
    # three lowest points of a parabola: exact vertex, clipped to the bounds
    assert parabola_minimum([0.5, 1.0, 2.0, 2.9], [(x - 1.3) ** 2 + 2 for x in (0.5, 1.0, 2.0, 2.9)], (0, 3)) == pytest.approx(2.0)
    assert parabola_minimum([0.5, 1.0, 2.0], [(x - 4) ** 2 for x in (0.5, 1.0, 2.0)], (0, 3)) == pytest.approx(1.0)
    assert parabola_minimum([0.5, 1.0], [1.0, 2.0], (0, 3)) is None


def test_snapshot_selection_and_early_abandonment():
    fs = [lambda w: (w - 1) ** 2 + 1,          # first: the reference
          lambda w: (w - 1) ** 2 + 3,          # hopeless: abandoned after 3 evaluations
          lambda w: 4 * (w - 2.6) ** 2 + 0.2,  # starts far worse, but its parabola predicts a deeper minimum
          lambda w: (w - 1.5) ** 2 + 0.1]       # the best, though its first point is worse than 0.2
    calls = {i: 0 for i in range(len(fs))}

    def objective(i, w, g):
        assert g is None
        calls[i] += 1
        return fs[i](w)

    s = search_snapshots(objective, len(fs), bounds=(0.0, 3.0), xtol=0.02, max_evals=12, abandon_margin=0.02)
    out = s.outcomes
    assert out[1].abandoned and calls[1] == 3 and out[1].result.stopped == "abandoned"
    assert not out[2].abandoned and calls[2] > 3
    assert out[2].result.value == pytest.approx(0.2, abs=1e-3)
    assert out[3].result.evaluations[0].value > 0.2 * 1.02  # worse than the best at first...
    assert not out[3].abandoned and abs(out[3].result.w - 1.5) <= 0.02
    assert s.best == 3 and s.winner.value == pytest.approx(0.1, abs=1e-3)
    # without abandonment the hopeless snapshot is searched to convergence
    calls = {i: 0 for i in range(len(fs))}
    s2 = search_snapshots(objective, len(fs), bounds=(0.0, 3.0), xtol=0.02, max_evals=12, abandon_margin=None)
    assert calls[1] > 3 and not s2.outcomes[1].abandoned and s2.best == 3


def test_abandonment_rule_needs_both_conditions():
    ev = [tune.Evaluation(w, None, v, "brent") for w, v in [(1, 2.0), (2, 2.1), (0.5, 2.2)]]
    assert abandonment_rule(1.0, 0.02)(ev, 1.5)           # worse by 100 % and cannot beat 1.0
    assert not abandonment_rule(1.0, 0.02)(ev, 0.9)       # predicted to beat the best: keep
    assert not abandonment_rule(1.99, 0.02)(ev, 1.995)    # within the margin: keep
    assert not abandonment_rule(1.0, 0.02)(ev[:2], 1.5)   # too few evaluations
    assert not abandonment_rule(1.0, 0.02)(ev, None)      # no prediction: keep


def test_snapshot_search_over_w_and_gamma():
    opt = [(1.0, 2.0, 1.0), (1.4, 2.5, 0.3)]  # (w*, g*, min) per snapshot

    def objective(i, w, g):
        w0, g0, m = opt[i]
        return (w - w0) ** 2 + 0.5 * (g - g0) ** 2 + 0.2 * (w - w0) * (g - g0) + m

    s = search_snapshots(objective, 2, bounds=(0.0, 3.0), gamma_bounds=(1.0, 4.0), gamma_scale="linear")
    assert s.best == 1
    assert s.winner.w == pytest.approx(1.4, abs=1e-9) and s.winner.gamma == pytest.approx(2.5, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# The evaluation cache
# ------------------------------------------------------------------------------------------------


def test_cache_roundtrip_torn_last_line_and_append_after_it(tmp_path):
    p = tmp_path / "c.jsonl"
    c = EvalCache(p)
    k1 = {"base": "aa", "w": 0.5, "settings": {"guidance": 2.0, "steps": 4}, "seed": 0, "num_samples": 10}
    c.put(k1, {"fid": 1.5}, 0.25)
    with open(p, "ab") as fh:  # a process killed mid-write
        fh.write(b'{"key": {"base": "aa", "w": 0.7')
    c2 = EvalCache(p)
    assert c2.skipped_lines == 1 and len(c2) == 1
    # key order does not matter; values do
    assert c2.get({"num_samples": 10, "seed": 0, "settings": {"steps": 4, "guidance": 2.0}, "w": 0.5, "base": "aa"})["metrics"] == {"fid": 1.5}
    assert c2.get({**k1, "seed": 1}) is None
    k2 = {**k1, "w": 0.7}
    c2.put(k2, {"fid": 1.2}, 0.3)  # must not be glued to the torn fragment
    c3 = EvalCache(p)
    assert c3.skipped_lines == 1 and len(c3) == 2 and c3.get(k2)["metrics"]["fid"] == 1.2
    assert p.read_bytes().endswith(b"\n")


# ------------------------------------------------------------------------------------------------
# run_tune_w on a fake family
# ------------------------------------------------------------------------------------------------


def test_run_tune_w_brent_recovers_closed_form_optimum_and_fills_report(fam, tmp_path):
    rep = Report("tune-w", argv=["neon", "tune-w"])
    rows = []
    out = tmp_path / "best.safetensors"
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], bounds=(0.0, 3.0), xtol=0.01, num_samples=64,
                     seed=0, confirm_samples=128, output=out, report=rep,
                     progress=lambda task, done, total=None, **info: rows.append((task, done, total, info.get("row"))))
    w_star, _ = closed_form(THETA_S, 0, 64)
    assert abs(res["search_choice"]["w"] - w_star) <= 0.01  # Brent on the search seeds
    # stage 2's refit: "dist" is exactly quadratic in w, so the parabola through the probes w1 +- 0.2 on
    # the fresh seeds 64..191 has its vertex at those seeds' exact optimum, and that is chosen
    w2_star, _ = closed_form(THETA_S, 64, 128)
    assert abs(w2_star - w_star) > 1e-3  # the fresh seeds' optimum really differs from the search's
    assert res["chosen"]["w"] == pytest.approx(w2_star, abs=1e-6)  # float32 merge
    fit = res["confirmation"]["refit"]
    assert fit["convex"] and not fit["clipped"] and fit["vertex"] == res["chosen"]["w"]
    assert fit["ws"] == pytest.approx([res["search_choice"]["w"] + d for d in (-0.2, 0.0, 0.2)])
    # the runner-up of a refit: the probe closest in value, paired with the vertex on its block
    ru = res["confirmation"]["vs_runner_up"]
    assert ru["blocks"] == 1 and ru["diff"] > 0 and "w=" in ru["against"]
    assert res["mode"] == "brent" and res["metric"] == "dist" and res["direction"] == "min"
    ev = res["evaluations"]
    n_search = res["snapshots"][0]["n_evals"]
    # + the base on the search seeds, + stage 2 (one block here): the search's best, its two probes and the
    # base, then the vertex; the vertex once more on the search seeds (comparable with the baselines)
    assert n_search <= 12 and len(ev) == n_search + 1 + 3 + 1 + 1 + 1 and res["n_evals"] == len(ev)
    assert res["images"]["confirmation"] == 5 * 128 and res["images"]["search"] == (n_search + 1) * 64
    # theta_r itself (w = 0) is scored first on the search seeds, and the chosen w beats it
    assert res["base"]["w"] == 0.0 and res["base"]["value"] == ev[0]["value"]
    assert res["baselines"]["default"]["value"] == ev[0]["value"] and res["baselines"]["best"] is None  # no gamma box
    assert res["beats_base"] is True and res["improved"] is True and res["chosen"]["value"] < res["base"]["value"]
    assert res["gain"]["vs_default"] == pytest.approx(1 - res["chosen"]["value"] / res["base"]["value"])
    for e in ev:
        assert {"w", "gamma", "snapshot", "metrics", "seconds", "cached", "phase", "value", "seed", "num_samples"} <= set(e)
        assert e["cached"] is False and e["value"] == e["metrics"]["dist"]
        assert e["gamma"] == 1.8  # the family's default guidance, held fixed
    assert [e["phase"] for e in ev] == ["base"] + ["brent"] * n_search + ["confirm"] * 3 + ["confirm-base", "confirm", "search"]
    # every search evaluation used the same seeds (common random numbers)
    search_calls = fam.seen[1:n_search + 1]
    assert all(torch.equal(s[0], torch.arange(0, 64)) for s in fam.seen[:n_search + 1])  # base and search: same seeds
    assert torch.equal(fam.seen[0][1], torch.tensor(THETA_R, dtype=torch.float64))  # the base is theta_r
    # each measured value is the formula at the merged theta
    for e, (seeds, th, g) in zip(ev[1:], search_calls):
        th_expect = torch.tensor(THETA_R) - torch.tensor(e["w"], dtype=torch.float32) * (torch.tensor(THETA_S) - torch.tensor(THETA_R))
        assert torch.allclose(th.float(), th_expect, atol=1e-6)
    # confirmation: disjoint, larger seed range; the base is scored at w = 0
    conf = res["confirmation"]
    assert conf["seeds"] == [64, 64 + 128 - 1]
    for seeds, th, g in fam.seen[n_search + 1:-1]:
        assert torch.equal(seeds, torch.arange(64, 192))
    assert torch.equal(fam.seen[-1][0], torch.arange(0, 64))  # the vertex on the search seeds
    assert torch.equal(fam.seen[-3][1], torch.tensor(THETA_R, dtype=torch.float64))  # the base on stage 2's
    assert conf["neon"]["dist"] < conf["base"]["dist"]
    assert conf["relative_improvement"] == pytest.approx((conf["base"]["dist"] - conf["neon"]["dist"]) / conf["base"]["dist"])
    # the merged best checkpoint: the formula at the chosen w, buffers from theta_r, provenance metadata
    best = fam.load(str(out))
    w = res["chosen"]["w"]
    expect = torch.tensor(THETA_R) - w * (torch.tensor(THETA_S) - torch.tensor(THETA_R))
    assert torch.allclose(best.theta.detach(), expect, atol=1e-6)
    assert int(best.images_seen) == 1234
    md = fam.read_metadata(str(out))
    assert float(md["neon.w"]) == w and md["train_images"] == "1000" and md["neon.base_sha256"] == rep.inputs[0]["sha256"]
    assert [o["role"] for o in rep.outputs] == ["merged"]
    assert [i["role"] for i in rep.inputs] == ["base", "selftrained"]
    assert not list(tmp_path.glob(".best.safetensors.tmp-*"))
    # live table: one row per evaluation
    tune_rows = [r for r in rows if r[0] == "tune-w" and r[3]]
    assert len(tune_rows) == len(ev) and tune_rows[0][3]["dist"] == ev[0]["value"]
    json.dumps(rep.to_dict(), default=str)  # the report is JSON


def test_stage2_surface_refit_moves_w_and_gamma_to_the_fresh_seeds_optimum(fam):
    """--refit-gamma: the fake metric is exactly quadratic in (w, gamma), so the surface fitted to the
    six probes on the fresh seeds (one block) has its minimum at those seeds' exact joint optimum."""
    rep = Report("tune-w", argv=[])
    res = run_tune_w("fake-tune", fam.paths["base"], [str(fam.paths["good"])], bounds=(0.0, 3.0), gamma=(1.0, 4.0),
                     gamma_scale="linear", tune_base=False, num_samples=32, seed=5, confirm_samples=64,
                     refit_gamma=0.2, report=rep)
    w2, g2 = closed_form(THETA_S, 5 + 32, 64, gamma=True)
    w1, g1 = closed_form(THETA_S, 5, 32, gamma=True)
    assert abs(w2 - w1) > 1e-3 and abs(g2 - g1) > 5e-4  # the fresh seeds' optimum differs from the search's
    fit = res["confirmation"]["refit"]
    assert fit["convex"] and not fit["clipped"] and fit["space"] == ["w", "gamma"] and len(fit["points"]) == 6
    assert res["chosen"]["w"] == pytest.approx(w2, abs=1e-5) and res["chosen"]["gamma"] == pytest.approx(g2, abs=1e-5)
    assert res["search_choice"]["w"] == pytest.approx(w1, abs=1e-4)
    # six probes, the base at the chosen and at the default gamma (no base gamma search), the vertex
    assert res["images"]["confirmation"] == (6 + 2 + 1) * 64


def test_run_tune_w_gamma_fit_is_exact_and_reports_fit(fam):
    rep = Report("tune-w", argv=[])
    res = run_tune_w("fake-tune", fam.paths["base"], [str(fam.paths["good"])], bounds=(0.0, 3.0), gamma=(1.0, 4.0),
                     gamma_scale="linear", joint="design", tune_base=False, num_samples=64, seed=5, report=rep)
    w_star, g_star = closed_form(THETA_S, 5, 64, gamma=True)
    ch = res["chosen"]
    # the metric is exactly quadratic in (w, gamma): the fitted optimum is the optimum
    assert ch["w"] == pytest.approx(w_star, abs=1e-4) and ch["gamma"] == pytest.approx(g_star, abs=1e-4)
    # the base at its default gamma, 6 design points, the fitted optimum, the base at the chosen gamma; the
    # refinement step lands on the optimum again (no evaluation)
    assert res["mode"] == "quadratic" and res["joint"] == "design" and res["n_evals"] == 1 + 7 + 1
    assert res["gamma_scale"] == "linear" and res["refine"] == 2 and res["snapshots"][0]["stopped"] == "converged"
    assert [r["kind"] for r in res["snapshots"][0]["rounds"]] == ["design", "refine"]
    rnd = res["snapshots"][0]["rounds"][0]
    assert set(rnd["coefficients"]) == {"a", "b", "c", "d", "e", "h"}
    # analytic coefficients of dist(w, g): d = |jw|^2, e = 1, h = 2 jw . jg = 2 * (-(0.5 + 0.5)/2) = -1
    assert rnd["coefficients"]["d"] == pytest.approx(0.25 + 0.25 + 0.25, abs=1e-5)
    assert rnd["coefficients"]["e"] == pytest.approx(1.0, abs=1e-5)
    assert rnd["coefficients"]["h"] == pytest.approx(-1.0, abs=1e-5)
    assert rnd["hessian_positive_definite"] is True and rnd["optimum"]["kind"] == "stationary"
    assert rnd["measured"] == pytest.approx(rnd["predicted"], abs=1e-6)
    assert [e["phase"] for e in res["evaluations"]] == ["base"] + ["design"] * 6 + ["fit-optimum", "base"]
    assert sorted({e["gamma"] for e in res["evaluations"][1:7]}) != [1.8]  # gamma really varied
    assert {round(s[2], 9) for s in fam.seen} == {round(e["gamma"], 9) for e in res["evaluations"]}


def test_run_tune_w_maximises_higher_is_better_metric(fam):
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], xtol=0.01, num_samples=64, metric="recall",
                     report=Report("tune-w", argv=[]))
    assert res["direction"] == "max"
    assert abs(res["chosen"]["w"] - closed_form(THETA_S, 0, 64)[0]) <= 0.01  # argmax exp(-dist) = argmin dist
    assert res["chosen"]["value"] == max(e["value"] for e in res["evaluations"])


def test_run_tune_w_snapshot_selection_with_abandonment(fam):
    rep = Report("tune-w", argv=[])
    res = run_tune_w("fake-tune", fam.paths["base"], [str(fam.paths["good"].parent / "*.safetensors")], xtol=0.02,
                     num_samples=32, report=rep)
    snaps = res["snapshots"]
    assert [Path(s["path"]).name for s in snaps] == ["theta_s-000002000.safetensors", "theta_s-000010000.safetensors"]
    assert res["chosen"]["snapshot"] == 0 and res["chosen"]["path"] == str(fam.paths["good"])
    assert snaps[1]["abandoned"] is True and snaps[1]["n_evals"] == 3 and snaps[1]["stopped"] == "abandoned"
    assert snaps[1]["best"]["value"] > 0.3 > snaps[0]["best"]["value"]
    assert [i["role"] for i in rep.inputs] == ["base", "selftrained", "selftrained"]


def test_run_tune_w_cache_reuse_and_resume_after_interruption(fam, tmp_path):
    kw = dict(bounds=(-0.5, 3.0), gamma=None, xtol=0.01, num_samples=32, seed=3)
    reference = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], report=Report("t", argv=[]), **kw)
    n = reference["n_evals"]
    cache = tmp_path / "cache.jsonl"
    # interrupted after 3 evaluations, then killed while writing a line
    fam.fail_after = fam.sample_calls + 3
    with pytest.raises(KeyboardInterrupt):
        run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], cache=cache, report=Report("t", argv=[]), **kw)
    assert len(cache.read_text().splitlines()) == 3
    with open(cache, "ab") as fh:
        fh.write(b'{"key": {"family": "fake-tu')
    fam.fail_after = None
    before = fam.sample_calls
    resumed = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], cache=cache, report=Report("t", argv=[]), **kw)
    assert fam.sample_calls - before == n - 3
    assert resumed["n_cached"] == 3 and resumed["n_evals"] == n
    assert resumed["chosen"]["w"] == reference["chosen"]["w"] and resumed["chosen"]["value"] == reference["chosen"]["value"]
    assert resumed["cache"]["skipped_lines"] == 1
    # a plain rerun: zero new objective calls, identical result
    before = fam.sample_calls
    again = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], cache=cache, report=Report("t", argv=[]), **kw)
    assert fam.sample_calls == before
    assert again["n_cached"] == again["n_evals"] == n and again["chosen"] == reference["chosen"]
    assert EvalCache(cache).skipped_lines == 1 and len(EvalCache(cache)) == n
    # another seed plan is another key: measured again
    run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], cache=cache, report=Report("t", argv=[]), **{**kw, "seed": 4})
    assert fam.sample_calls > before


def test_run_tune_w_bad_input(fam, tmp_path):
    base, good = fam.paths["base"], fam.paths["good"]
    rep = Report("t", argv=[])
    cases = [
        (dict(bounds=(2.0, 1.0)), "--bounds"),
        (dict(gamma=(3.0, 3.0)), "--gamma"),
        (dict(gamma=(-1.0, 3.0)), "--gamma"),
        (dict(gamma=(1.0, 3.0), max_evals=6), "--max-evals"),
        (dict(gamma=(1.0, 3.0), rounds=2, max_evals=10, joint="design"), "--max-evals"),
        (dict(gamma=(1.0, 3.0), joint="grid"), "--joint grid"),
        (dict(gamma=(0.0, 3.0), gamma_scale="log"), "--gamma-scale log: needs a positive --gamma box"),
        (dict(gamma=(1.0, 3.0), gamma_scale="cubic"), "--gamma-scale cubic"),
        (dict(gamma=(1.0, 3.0), refine=-1), "--refine"),
        (dict(metric="fid"), "--metric"),
        (dict(output=base), "-o"),
    ]
    for kw, flag in cases:
        with pytest.raises(UsageError, match=flag):
            run_tune_w("fake-tune", base, [good], num_samples=8, report=rep, **kw)
    with pytest.raises(UsageError, match="--selftrained"):
        run_tune_w("fake-tune", base, [str(tmp_path / "nothing-*.pt")], report=rep)
    with pytest.raises(UsageError, match="--base"):
        run_tune_w("fake-tune", tmp_path / "missing.safetensors", [good], report=rep)
    with pytest.raises(UsageError, match="--base"):
        run_tune_w("fake-tune", None, [good], report=rep)  # the fake family has no embedded default
    assert fam.sample_calls == 0


def test_expand_checkpoints_natural_order(tmp_path):
    for n in (100000, 50000, 2000):
        (tmp_path / f"theta_s-{n}.pt").write_bytes(b"x")
    got = expand_checkpoints([str(tmp_path / "*.pt"), str(tmp_path / "theta_s-2000.pt")])
    assert [p.name for p in got] == ["theta_s-2000.pt", "theta_s-50000.pt", "theta_s-100000.pt"]


def test_plot_missing_matplotlib_is_a_clear_error(fam, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UsageError, match=r"--plot .*matplotlib is not installed"):
        run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], plot=tmp_path / "p.png", report=Report("t", argv=[]))
    assert fam.sample_calls == 0  # checked before any evaluation


def test_plot_written_when_matplotlib_installed(fam, tmp_path):
    pytest.importorskip("matplotlib")  # optional extra 'plot'
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], gamma=(1.0, 4.0), num_samples=16,
                     plot=tmp_path / "p.png", report=Report("t", argv=[]))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["chosen"]["gamma"] is not None


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def cli():
    from typer.testing import CliRunner

    from neon_cli.commands import app

    return CliRunner(), app


def test_cli_tune_w_json_report_and_glob(fam, cli, tmp_path):
    runner, app = cli
    rep = tmp_path / "r.json"
    r = runner.invoke(app, ["tune-w", "fake-tune", "--base", str(fam.paths["base"]), "--selftrained",
                            str(tmp_path / "ft" / "*.safetensors"), "--gamma", "1", "4", "--num-samples", "32",
                            "--gamma-scale", "linear", "--bounds", "-0.5", "3", "-o", str(tmp_path / "best.safetensors"),
                            "--report", str(rep), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    w_star, g_star = closed_form(THETA_S, 10_000_000, 32, gamma=True)  # the CLI default seed
    search = res["search_choice"]  # the joint fit on the search seeds; stage 2 then refits w at its gamma
    assert search["w"] == pytest.approx(w_star, abs=1e-4) and search["gamma"] == pytest.approx(g_star, abs=1e-4)
    refit = res["confirmation"]["refit"]  # the surface refit (--refit-gamma 0.1 by default with --gamma)
    assert refit["space"] == ["w", "gamma"] and (res["chosen"]["w"], res["chosen"]["gamma"]) == (refit["chosen"]["w"], refit["chosen"]["gamma"])
    assert res["bounds"] == [-0.5, 3.0] and len(res["snapshots"]) == 2
    report = json.loads(rep.read_text())
    assert report["status"] == "ok" and report["command"] == "tune-w"
    assert report["results"]["chosen"] == res["chosen"] and report["outputs"][0]["role"] == "merged"
    assert report["settings"]["gamma"] == [1.0, 4.0] and report["settings"]["resolved_settings"]["steps"] == 4


def test_cli_tune_w_shell_expanded_paths_and_summary(fam, cli):
    runner, app = cli
    good, bad = fam.paths["good"], fam.paths["bad"]
    # what the shell passes for an unquoted 'ft/*.safetensors' after --selftrained
    r = runner.invoke(app, ["tune-w", "fake-tune", "--base", str(fam.paths["base"]), "--selftrained", str(good), str(bad),
                            "--num-samples", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "chosen: theta_s-000002000.safetensors" in r.stdout
    assert "abandoned" in r.stdout


def test_cli_tune_w_bad_input_exit_2(fam, cli):
    runner, app = cli
    r = runner.invoke(app, ["tune-w", "fake-tune", "--base", str(fam.paths["base"]), "--selftrained", str(fam.paths["good"]),
                            "--bounds", "2", "1"])
    assert r.exit_code == 2
    assert "--bounds 2 1: need finite LO < HI" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["tune-w", "fake-tune", "--base", str(fam.paths["base"])])
    assert r.exit_code == 2 and "--selftrained" in r.stderr


def test_cli_help_has_example(cli):
    runner, app = cli
    r = runner.invoke(app, ["tune-w", "--help"])
    assert r.exit_code == 0 and "Example" in r.stdout and "--selftrained" in r.stdout and "--gamma" in r.stdout


def test_refit_falls_back_to_a_probe_resolved_better_than_the_vertex(fam, monkeypatch):
    """A metric far from quadratic on stage 2's seeds: |w - k| with its kink between two probes.
    The parabola through the probes c - 0.2, c, c + 0.2 puts the vertex 0.3 right of c, where the
    metric is worse than at the probe c + 0.2; the paired comparison resolves it (exact metric: SE
    0), so the probe is chosen and the report says so."""
    w_star, _ = closed_form(THETA_S, 0, 64)
    k = w_star + 0.15
    real = fam.score

    def score(images, labels):
        if len(images) > 32:  # the search's 64 seeds (and their replicates): the quadratic metric
            return real(images, labels)
        w = 2 * float(fam.seen[-1][1][1])  # theta(w) = (1 - w/2, w/2): the w just sampled
        return {"dist": abs(w - k), "recall": math.exp(-abs(w - k))}

    monkeypatch.setattr(fam, "score", score)
    rep = Report("tune-w", argv=[])
    res = run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], bounds=(0.0, 3.0), num_samples=64, seed=0,
                     confirm_samples=32, max_images=1000, require_improvement=False, report=rep)
    fit = res["confirmation"]["refit"]
    c = fit["ws"][1]
    assert fit["convex"] and not fit["clipped"] and fit["vertex"] == pytest.approx(c + 0.3, abs=0.02)
    assert fit["fallback"] is not None and fit["fallback"]["diff"] < 0
    assert res["chosen"]["w"] == pytest.approx(c + 0.2) and fit["chosen"]["w"] == res["chosen"]["w"]
    assert res["confirmation"]["blocks"] == 1  # exact metric: expected regret 0 after one block

