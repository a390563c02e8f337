"""Brent's method over w (paper App. C: the metric against w is strongly unimodal and locally
quadratic, so Brent reaches its minimum in about 6-10 evaluations). Torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from neon_cli.tune.common import BRENT_DEFAULT_EVALS, Evaluation, StopFn, _finite, _rkey, _Stop


@dataclass
class BrentResult:
    """Outcome of :func:`brent_search`.

    Attributes:
        w, value: the best evaluated point (not scipy's last iterate) and its objective.
        evaluations: every distinct point asked, in order.
        stopped: ``"converged"`` (scipy's xatol criterion met), ``"budget"`` (``max_evals`` spent
            before convergence) or ``"abandoned"`` (``should_stop`` returned True).
        message: scipy's message, or why the search stopped.
    """

    w: float
    value: float
    evaluations: list[Evaluation]
    stopped: str
    message: str

    @property
    def n_evals(self) -> int:
        return len(self.evaluations)


def parabola_minimum(ws: Sequence[float], values: Sequence[float], bounds: tuple[float, float]) -> float | None:
    """Minimum over ``bounds`` of the parabola through the three lowest finite points.

    A cheap estimate of how low a locally quadratic, unimodal curve (paper App. C) can go: for a
    convex parabola, its vertex clipped to the bounds; otherwise the lower of its values at the two
    bounds. Returns None with fewer than three distinct finite points.

    Args:
        ws: abscissae (w), any order.
        values: objective at ``ws``.
        bounds: (lo, hi) of w.
    """
    pts = sorted({(float(w), float(v)) for w, v in zip(ws, values) if math.isfinite(v)}, key=lambda p: p[1])
    uniq: dict[float, float] = {}
    for w, v in pts:
        uniq.setdefault(w, v)
    if len(uniq) < 3:
        return None
    low3 = list(uniq.items())[:3]
    x = np.array([p[0] for p in low3])
    y = np.array([p[1] for p in low3])
    try:
        c2, c1, c0 = np.linalg.solve(np.vander(x, 3), y)
    except np.linalg.LinAlgError:
        return None
    lo, hi = bounds
    cands = [lo, hi]
    if c2 > 0:
        cands.append(min(max(-c1 / (2 * c2), lo), hi))
    return float(min(c0 + c1 * t + c2 * t * t for t in cands))


def brent_search(
    f: Callable[[float], float],
    bounds: tuple[float, float],
    *,
    xtol: float = 0.05,
    max_evals: int = BRENT_DEFAULT_EVALS,
    should_stop: StopFn | None = None,
) -> BrentResult:
    """Minimise ``f(w)`` over ``bounds`` with Brent's method within ``max_evals`` evaluations.

    ``scipy.optimize.minimize_scalar(method="bounded", bounds=bounds, options={"xatol": xtol,
    "maxiter": max_evals + 1})`` (Brent 1973: golden section + successive parabolic
    interpolation; the bounds themselves are never evaluated). The objective is wrapped so that

    * every distinct point is evaluated once and recorded (a repeated point is answered from memory
      and not counted);
    * the ``max_evals + 1``-th distinct request ends the search cleanly (``stopped="budget"``),
      returning the best point seen so far;
    * a non-finite value (a diverged model) is treated as ``+inf``;
    * ``should_stop(evaluations, predicted)`` is asked after each evaluation, with ``predicted``
      the :func:`parabola_minimum` of the points so far (None before three points).

    Args:
        f: objective of w (float -> float); minimised.
        bounds: (lo, hi), finite, lo < hi; negative values allowed (diversity-seeking samplers
            have their optimum at -1 < w < 0).
        xtol: absolute tolerance on w (scipy's ``xatol``): the final bracket is about ``4/3 xtol``
            wide.
        max_evals: the most distinct evaluations (>= 1).
        should_stop: optional early-abandonment rule (:data:`StopFn`).

    Returns:
        :class:`BrentResult` with the best evaluated point.

    Raises:
        ValueError: bad bounds, ``xtol <= 0`` or ``max_evals < 1``.
    """
    from scipy.optimize import minimize_scalar

    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds must be finite with lo < hi, got ({lo}, {hi})")
    if not xtol > 0:
        raise ValueError(f"xtol must be > 0, got {xtol}")
    if max_evals < 1:
        raise ValueError(f"max_evals must be >= 1, got {max_evals}")
    evals: list[Evaluation] = []
    memo: dict[float | None, float] = {}

    def wrapped(x: float) -> float:
        x = float(x)
        k = _rkey(x)
        if k in memo:
            return memo[k]
        if len(evals) >= max_evals:
            raise _Stop("budget")
        v = _finite(f(x))
        memo[k] = v
        evals.append(Evaluation(w=x, gamma=None, value=v, phase="brent"))
        if should_stop is not None:
            pred = parabola_minimum([e.w for e in evals], [e.value for e in evals], (lo, hi))
            if should_stop(evals, pred):
                raise _Stop("abandoned")
        return v

    try:
        res = minimize_scalar(wrapped, method="bounded", bounds=(lo, hi),
                              options={"xatol": xtol, "maxiter": max_evals + 1})
        stopped = "converged" if res.success else "budget"
        message = str(res.message)
    except _Stop as stop:
        stopped = stop.reason
        message = {"budget": f"evaluation budget of {max_evals} spent before convergence",
                   "abandoned": "abandoned: cannot beat the best snapshot"}[stop.reason]
    best = min(evals, key=lambda e: e.value)
    return BrentResult(w=best.w, value=best.value, evaluations=evals, stopped=stopped, message=message)

