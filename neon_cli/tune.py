"""``neon tune-w``: choose the merge weight w (and the guidance scale gamma) in a handful of evaluations.

Each evaluation of a candidate (snapshot, w, gamma) samples ``num_samples`` images and computes
the family's metric (FID for images): it is the dominant cost of Neon. Paper App. C ("Practical
Note on Efficient Hyperparameter Search"): the metric versus w is strongly unimodal and locally
quadratic, so

* over w alone, Brent's method (Brent 1973; ``scipy.optimize.minimize_scalar(method="bounded")``)
  reaches the optimum in about 6-10 evaluations instead of a 0.25-step grid and a refinement;
* over (w, gamma) jointly, a quadratic surface fitted to six well-distributed points locates a
  near-optimal configuration; one more evaluation measures it. Here the surface is fitted in
  (w, ln gamma) by default, and two trust-region refinement steps (one evaluation each) follow:
  9 evaluations reach within 2 % of a dense grid's best on the digits family
  (``benchmarks/tune.py``), where the one-shot fit over the whole box missed by 32 %.

Every candidate is scored on the same seeds and labels (common random numbers, see
:class:`neon_cli.evaluate.Evaluator`), so differences between candidates are not sampling noise.

Layers in this module:

* pure algorithms, independent of torch and of families, testable on known functions:
  :func:`brent_search`, :func:`design_points`, :func:`fit_quadratic`, :func:`minimize_quadratic`,
  :func:`quadratic_search`, :func:`parabola_minimum`, :func:`search_snapshots`, :class:`EvalCache`;
* the orchestration behind the command: :func:`run_tune_w`.

Conventions: the objective is *minimised*. Metrics where higher is better
(:data:`HIGHER_IS_BETTER`: precision, recall, ...) are maximised by minimising their negation;
the report always shows the metric's own value.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from neon_cli.errors import UsageError
from neon_cli.progress import ProgressFn, null_progress

#: Metric names where higher is better; tune-w maximises these (minimises their negation).
HIGHER_IS_BETTER = frozenset({"precision", "recall", "density", "coverage", "class_accuracy", "accuracy", "is", "inception_score"})

#: Evaluations per round of the (w, gamma) fit: 6 design points + 1 at the fitted optimum.
EVALS_PER_ROUND = 7

#: Default number of trust-region refinement steps after the last round of the (w, gamma) fit
#: (one evaluation each): 7 + 2 = 9 evaluations by default (issue 4's budget).
REFINE_DEFAULT = 2

#: A refinement step whose fitted optimum lies within this fraction of the box half-widths (on
#: each axis) of an evaluated point ends the (w, gamma) search as "converged", unevaluated.
CONVERGED_TOL = 1e-3

#: Radius of the design pentagon, as a fraction of the box's half-widths (see :func:`design_points`).
DESIGN_RADIUS = 0.5

#: Coordinates the (w, gamma) fit works in: ``"log"`` fits the quadratic in (w, ln gamma),
#: ``"linear"`` in (w, gamma); ``"auto"`` is ``"log"`` when the gamma box is positive.
GAMMA_SCALES = ("auto", "log", "linear")

#: Default evaluation budget of Brent's method per snapshot.
BRENT_DEFAULT_EVALS = 12

_KEY_DIGITS = 12  # w and gamma are rounded to 12 decimals in memo and cache keys


def default_fit_budget(rounds: int, refine: int) -> int:
    """Default evaluation budget of the (w, gamma) fit: 7 per round + one per refinement step."""
    return EVALS_PER_ROUND * rounds + refine


# --------------------------------------------------------------------------------------------
# Records shared by the searches
# --------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """One point asked by a search.

    Attributes:
        w: merge weight (dimensionless).
        gamma: guidance scale, or None when the search is over w only.
        value: the objective (minimised); ``inf`` for a non-finite metric (diverged model).
        phase: ``"brent"``, ``"design"`` (a 6-point design point), ``"fit-optimum"`` or
            ``"refine"`` (a trust-region refinement step of the (w, gamma) fit).
        round: round of the (w, gamma) fit (1-based; refinement step k after R rounds: R + k);
            0 for Brent.
    """

    w: float
    gamma: float | None
    value: float
    phase: str
    round: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Stop(Exception):
    """Raised inside an objective wrapper to end a search cleanly (budget spent or abandoned)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _rkey(x: float | None) -> float | None:
    return None if x is None else round(float(x), _KEY_DIGITS)


def _finite(v: float) -> float:
    v = float(v)
    return v if math.isfinite(v) else math.inf


#: ``should_stop(evaluations, predicted_min) -> bool``: asked by a search after its evaluations
#: (Brent: after each one; the (w, gamma) fit: after the 6 design points of round 1) with the
#: quadratic model's predicted minimum (None when none is available). True ends the search
#: ("abandoned"). Used by :func:`search_snapshots` for early abandonment.
StopFn = Callable[[list[Evaluation], "float | None"], bool]


# --------------------------------------------------------------------------------------------
# Brent over w
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The 6-point quadratic surface over (w, gamma)
# --------------------------------------------------------------------------------------------

#: The design in normalised coordinates (u, v) in [-1, 1]^2: the centre and a regular pentagon
#: of radius 1 with a vertex on the +v axis. Shape [6, 2].
UNIT_DESIGN = np.vstack([
    [[0.0, 0.0]],
    np.stack([np.cos(np.pi / 2 + 2 * np.pi * np.arange(5) / 5), np.sin(np.pi / 2 + 2 * np.pi * np.arange(5) / 5)], 1),
])

COEF_NAMES = ("a", "b", "c", "d", "e", "h")  # f = a + b w + c g + d w^2 + e g^2 + h w g


def _centre_scale(w_bounds: tuple[float, float], g_bounds: tuple[float, float]) -> tuple[float, float, float, float]:
    (w0, w1), (g0, g1) = w_bounds, g_bounds
    return (w0 + w1) / 2, (w1 - w0) / 2, (g0 + g1) / 2, (g1 - g0) / 2


def _check_box(w_bounds: tuple[float, float], g_bounds: tuple[float, float]) -> None:
    for name, (lo, hi) in (("w", w_bounds), ("gamma", g_bounds)):
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"{name} bounds must be finite with lo < hi, got ({lo}, {hi})")


def design_points(w_bounds: tuple[float, float], g_bounds: tuple[float, float],
                  radius: float = DESIGN_RADIUS) -> np.ndarray:
    """The six (w, gamma) points of the quadratic design in the box ``w_bounds x g_bounds``.

    Design: the box centre and the five vertices of a regular pentagon centred on it, of radius
    ``radius`` times the box's half-width on each axis, one vertex straight above the centre (at
    the centre w), i.e. ``radius *`` :data:`UNIT_DESIGN` mapped from [-1, 1]^2 to the box. The box
    is in the coordinates the fit works in (for ``gamma_scale="log"`` the gamma axis is ln gamma,
    see :func:`quadratic_search`). Returns float64 [6, 2] (columns w, gamma-coordinate).

    Why this design:

    * *well-posed*: the 6 x 6 matrix of rows [1, w, g, w^2, g^2, w g] is nonsingular exactly when
      no conic passes through all six points; the pentagon fixes one conic (its circumscribed
      ellipse) and the centre is not on it. Its condition number, in coordinates where the
      pentagon has radius 1, is 5.2 (centre + 4 axis points + 1 corner: 8.1). Layouts that
      look natural are singular: a 3 x 2 grid has only two gamma values, so g^2 is a combination
      of 1 and g (rank 5), and a regular hexagon lies on one ellipse (rank 5);
    * *rotatable*: a regular n-gon (n >= 5) plus the centre is a rotatable second-order design
      (Box & Hunter 1957): the fit's prediction variance depends only on the distance from the
      centre;
    * *local* (``radius`` 0.5, the default): the paper observes the metric is *locally*
      quadratic (App. C); over a whole box such as [0, 3] x [1, 4] it is not (FID grows faster
      than quadratically away from the optimum and the (w, gamma) valley is curved), so points
      at the box's edges bend the fit away from the optimum. On the digits family's measured
      (w, gamma) surfaces (fid, pixel_fid, coverage; 13 boxes; ``benchmarks/tune.py``) radius
      0.5 put the fitted optimum closer to the best than radius 1 (the inscribed ellipse);
      the refinement steps of :func:`quadratic_search` then correct the extrapolation when the
      optimum lies outside the pentagon.

    Raises:
        ValueError: bounds not finite or lo >= hi, or radius not in (0, 1].
    """
    _check_box(w_bounds, g_bounds)
    if not 0 < radius <= 1:
        raise ValueError(f"radius must be in (0, 1], got {radius}")
    cw, sw, cg, sg = _centre_scale(w_bounds, g_bounds)
    return np.stack([cw + radius * sw * UNIT_DESIGN[:, 0], cg + radius * sg * UNIT_DESIGN[:, 1]], 1)


def quadratic_features(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Rows [1, w, g, w^2, g^2, w g]; float64 [n, 6] for w, g of shape [n]."""
    w = np.asarray(w, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    return np.stack([np.ones_like(w), w, g, w * w, g * g, w * g], -1)


def _to_unit(coef: np.ndarray, cw: float, sw: float, cg: float, sg: float) -> np.ndarray:
    """Coefficients in (w, g) -> coefficients in (u, v) with w = cw + sw u, g = cg + sg v."""
    a, b, c, d, e, h = coef
    return np.array([
        a + b * cw + c * cg + d * cw * cw + e * cg * cg + h * cw * cg,
        b * sw + 2 * d * cw * sw + h * sw * cg,
        c * sg + 2 * e * cg * sg + h * cw * sg,
        d * sw * sw,
        e * sg * sg,
        h * sw * sg,
    ])


def _from_unit(coef: np.ndarray, cw: float, sw: float, cg: float, sg: float) -> np.ndarray:
    """Inverse of :func:`_to_unit` (u = (w - cw) / sw, v = (g - cg) / sg)."""
    A, B, C, D, E, H = coef
    d, e, h = D / sw**2, E / sg**2, H / (sw * sg)
    b = B / sw - 2 * d * cw - h * cg
    c = C / sg - 2 * e * cg - h * cw
    a = A - B * cw / sw - C * cg / sg + d * cw * cw + e * cg * cg + h * cw * cg
    return np.array([a, b, c, d, e, h])


@dataclass
class QuadraticFit:
    """f(w, g) = a + b w + c g + d w^2 + e g^2 + h w g (``coef`` = [a, b, c, d, e, h], float64)."""

    coef: np.ndarray

    def __call__(self, w: Any, g: Any) -> Any:
        return quadratic_features(np.asarray(w), np.asarray(g)) @ self.coef

    @property
    def hessian(self) -> np.ndarray:
        """[[2d, h], [h, 2e]] (float64 [2, 2])."""
        _, _, _, d, e, h = self.coef
        return np.array([[2 * d, h], [h, 2 * e]])

    @property
    def positive_definite(self) -> bool:
        _, _, _, d, e, h = self.coef
        return bool(d > 0 and 4 * d * e - h * h > 0)

    def to_json(self) -> dict[str, float]:
        return {k: float(v) for k, v in zip(COEF_NAMES, self.coef)}


def fit_quadratic(points: np.ndarray, values: Sequence[float]) -> QuadraticFit:
    """Fit f = a + b w + c g + d w^2 + e g^2 + h w g to ``values`` at ``points``.

    Six points: the exact interpolant, ``numpy.linalg.solve`` of the 6 x 6 system; more: least
    squares (``numpy.linalg.lstsq``). The system is solved in coordinates normalised to the
    points' bounding box ([-1, 1] on each axis, for conditioning) and the coefficients are mapped
    back exactly to (w, g).

    Args:
        points: float [n, 2] (w, gamma), n >= 6.
        values: float [n], finite.

    Raises:
        ValueError: fewer than 6 points, non-finite values, or a singular design (points on one
            conic, e.g. only two distinct gamma values).
    """
    P = np.asarray(points, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] != 2 or P.shape[0] < 6 or y.shape != (P.shape[0],):
        raise ValueError(f"need points [n >= 6, 2] and values [n], got {P.shape} and {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("cannot fit a quadratic to non-finite values")
    lo, hi = P.min(0), P.max(0)
    if np.any(hi <= lo):
        raise ValueError("singular design: all points share one w or one gamma")
    cw, cg = (lo + hi) / 2
    sw, sg = (hi - lo) / 2
    X = quadratic_features((P[:, 0] - cw) / sw, (P[:, 1] - cg) / sg)
    if np.linalg.matrix_rank(X) < 6:
        raise ValueError("singular design: the points lie on one conic, the quadratic is not determined")
    if P.shape[0] == 6:
        unit = np.linalg.solve(X, y)
    else:
        unit = np.linalg.lstsq(X, y, rcond=None)[0]
    return QuadraticFit(_from_unit(unit, cw, sw, cg, sg))


@dataclass
class QuadraticMinimum:
    """The minimum of a fitted quadratic over a box.

    ``kind``: ``"stationary"`` (Hessian positive definite, stationary point inside the box) or
    ``"boundary"`` (the box-constrained minimum lies on an edge or a corner).
    """

    w: float
    gamma: float
    predicted: float
    kind: str


def minimize_quadratic(fit: QuadraticFit, w_bounds: tuple[float, float], g_bounds: tuple[float, float]) -> QuadraticMinimum:
    """Exact minimum of ``fit`` over the box ``w_bounds x g_bounds``.

    If the Hessian [[2d, h], [h, 2e]] is positive definite and its stationary point (solution of
    Hessian x = -[b, c]) lies in the box, that point. Otherwise the minimum of a quadratic over a
    box lies on its boundary: each edge is a 1-D quadratic minimised analytically (its vertex when
    convex and inside the edge, and the two corners), and the lowest candidate wins. Works in
    normalised coordinates, so it is exact up to rounding for any box.

    Raises:
        ValueError: bounds not finite or lo >= hi.
    """
    _check_box(w_bounds, g_bounds)
    cw, sw, cg, sg = _centre_scale(w_bounds, g_bounds)
    A, B, C, D, E, H = _to_unit(fit.coef, cw, sw, cg, sg)

    def fu(u: float, v: float) -> float:
        return float(A + B * u + C * v + D * u * u + E * v * v + H * u * v)

    def back(u: float, v: float, kind: str) -> QuadraticMinimum:
        return QuadraticMinimum(float(cw + sw * u), float(cg + sg * v), fu(u, v), kind)

    if D > 0 and 4 * D * E - H * H > 0:
        u, v = np.linalg.solve(np.array([[2 * D, H], [H, 2 * E]]), -np.array([B, C]))
        if abs(u) <= 1 + 1e-12 and abs(v) <= 1 + 1e-12:
            return back(float(np.clip(u, -1, 1)), float(np.clip(v, -1, 1)), "stationary")
    cands: list[tuple[float, float]] = [(s, t) for s in (-1.0, 1.0) for t in (-1.0, 1.0)]
    for s in (-1.0, 1.0):
        if E > 0:  # edge u = s: f = const + (C + H s) v + E v^2
            cands.append((s, float(np.clip(-(C + H * s) / (2 * E), -1, 1))))
        if D > 0:  # edge v = s: f = const + (B + H s) u + D u^2
            cands.append((float(np.clip(-(B + H * s) / (2 * D), -1, 1)), s))
    u, v = min(cands, key=lambda p: fu(*p))
    return back(u, v, "boundary")


@dataclass
class FitRound:
    """One round (or one refinement step) of the (w, gamma) fit, as reported.

    Attributes:
        round: 1-based; refinement step k after R rounds is round R + k.
        box: ((w_lo, w_hi), (g_lo, g_hi)) of this round, gamma in its own units.
        points: the fitted points [[w, gamma], ...] (a round: its six design points; a refinement
            step: the evaluated points nearest the best so far); values: the objective there.
        kind: ``"design"`` (a round) or ``"refine"`` (a trust-region refinement step).
        gamma_scale: ``"log"`` (the fit's second variable is ln gamma) or ``"linear"`` (gamma).
        fit: the fitted quadratic in (w, ln gamma) or (w, gamma) (None if a design value was
            non-finite).
        optimum: the fitted box minimum, gamma in its own units (None without a fit).
        measured: the objective measured at ``optimum`` (None when not evaluated).
    """

    round: int
    box: tuple[tuple[float, float], tuple[float, float]]
    points: list[list[float]]
    values: list[float]
    kind: str = "design"
    gamma_scale: str = "linear"
    fit: QuadraticFit | None = None
    optimum: QuadraticMinimum | None = None
    measured: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round": self.round,
            "kind": self.kind,
            "box": {"w": list(self.box[0]), "gamma": list(self.box[1])},
            "points": self.points,
            "values": self.values,
            "gamma_scale": self.gamma_scale,
            "fit_variables": ["w", "ln_gamma" if self.gamma_scale == "log" else "gamma"],
            "coefficients": self.fit.to_json() if self.fit else None,
            "hessian_positive_definite": self.fit.positive_definite if self.fit else None,
        }
        if self.optimum is not None:
            out.update(optimum={"w": self.optimum.w, "gamma": self.optimum.gamma, "kind": self.optimum.kind},
                       predicted=self.optimum.predicted, measured=self.measured)
        return out


@dataclass
class QuadraticResult:
    """Outcome of :func:`quadratic_search`: the best evaluated point, every evaluation, each round.

    ``rounds`` holds the design rounds followed by the refinement steps (``kind`` tells them
    apart). ``stopped``: ``"done"``, ``"converged"`` (a refinement step's fitted optimum was at an
    already evaluated point; that step has ``measured`` None), ``"budget"`` (a requested round or step did not fit in
    ``max_evals``), ``"abandoned"``, ``"non-finite"`` (a design value was not finite; no fit) or
    ``"singular"`` (no well-posed set of evaluated points to refine with).
    """

    w: float
    gamma: float
    value: float
    evaluations: list[Evaluation]
    rounds: list[FitRound]
    stopped: str
    gamma_scale: str = "linear"

    @property
    def n_evals(self) -> int:
        return len(self.evaluations)


def _shrunken_box(centre: tuple[float, float], box: tuple[tuple[float, float], tuple[float, float]],
                  outer: tuple[tuple[float, float], tuple[float, float]], shrink: float):
    """A box ``shrink`` times the size of ``box``, centred at ``centre``, shifted inside ``outer``."""
    out = []
    for c, (lo, hi), (olo, ohi) in zip(centre, box, outer):
        half = shrink * (hi - lo) / 2
        nlo, nhi = c - half, c + half
        if nlo < olo:
            nlo, nhi = olo, olo + 2 * half
        if nhi > ohi:
            nlo, nhi = ohi - 2 * half, ohi
        out.append((float(nlo), float(nhi)))
    return tuple(out)


def resolve_gamma_scale(gamma_scale: str, g_bounds: tuple[float, float]) -> str:
    """``"auto"`` -> ``"log"`` when the gamma box is positive (lo > 0), else ``"linear"``.

    Raises:
        ValueError: unknown name, or ``"log"`` with lo <= 0.
    """
    if gamma_scale not in GAMMA_SCALES:
        raise ValueError(f"gamma_scale must be one of {', '.join(GAMMA_SCALES)}, got {gamma_scale!r}")
    if gamma_scale == "auto":
        return "log" if g_bounds[0] > 0 else "linear"
    if gamma_scale == "log" and not g_bounds[0] > 0:
        raise ValueError(f"gamma_scale 'log' needs gamma > 0, got the box ({g_bounds[0]:g}, {g_bounds[1]:g})")
    return gamma_scale


def _nearest_fit(pts: np.ndarray, vals: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> tuple[QuadraticFit, list[int]] | None:
    """The quadratic through the 6 finite points nearest ``centre`` (distance in units of ``scale``);
    if those lie on one conic, least squares on the 7, 8, ... nearest. None if no subset is
    well-posed."""
    finite = np.flatnonzero(np.isfinite(vals))
    order = finite[np.argsort(np.linalg.norm((pts[finite] - centre) / scale, axis=1), kind="stable")]
    for n in range(6, len(order) + 1):
        sel = order[:n]
        try:
            return fit_quadratic(pts[sel], vals[sel]), [int(i) for i in sel]
        except ValueError:
            continue
    return None


def quadratic_search(
    f: Callable[[float, float], float],
    w_bounds: tuple[float, float],
    g_bounds: tuple[float, float],
    *,
    rounds: int = 1,
    refine: int = REFINE_DEFAULT,
    shrink: float = 0.5,
    radius: float = DESIGN_RADIUS,
    gamma_scale: str = "auto",
    max_evals: int | None = None,
    should_stop: StopFn | None = None,
) -> QuadraticResult:
    """Minimise ``f(w, gamma)`` with the 6-point quadratic surface fit (paper App. C).

    The fit works in coordinates (w, s) with s = ln gamma (``gamma_scale="log"``, the default for
    a positive gamma box) or s = gamma (``"linear"``): f = a + b w + c s + d w^2 + e s^2 + h w s.
    Guidance acts multiplicatively (CFG sharpens p(x | c) roughly like a power gamma), and on
    the digits family's measured surfaces the (w, gamma) valley is close to straight in ln gamma
    while strongly curved in gamma (``benchmarks/tune.py``; see ``docs/theory.md``).

    Round r: evaluate ``f`` at the :func:`design_points` of the current box, fit the exact
    quadratic (:func:`fit_quadratic`), take its box minimum (:func:`minimize_quadratic`: the
    stationary point when the Hessian is positive definite and inside the box, else the
    box-constrained minimum) and evaluate ``f`` there. Round r + 1 uses a box ``shrink`` times as
    large, centred at the best point measured so far (shifted to stay inside the original box);
    its centre is an already evaluated point, answered from memory.

    Then ``refine`` trust-region steps, one evaluation each (a model-based step in the manner of
    Powell's UOBYQA, which also interpolates a full quadratic through (n + 1)(n + 2) / 2 = 6
    points in two dimensions): the box shrinks by ``shrink`` around the best point measured so
    far; the quadratic through the 6 evaluated points nearest it (distance in units of the outer
    box; least squares on 7, 8, ... if those 6 lie on one conic) is minimised over that box and
    evaluated there. A step whose optimum lies within :data:`CONVERGED_TOL` of the box
    half-widths of an evaluated point ends the search unevaluated (``"converged"``). The result
    is the best *measured* point.

    Budget: distinct evaluations; a round starts only if its new design points plus one fit
    optimum fit in what is left of ``max_evals`` (default: 7 per round + ``refine``), a
    refinement step only if one evaluation is left; otherwise the search stops with
    ``stopped="budget"``. ``should_stop(evaluations, predicted)`` is asked once, after the design
    of round 1, with the fitted box minimum; True skips the rest ("abandoned").

    Args:
        f: objective of (w, gamma); minimised; a non-finite value counts as +inf.
        w_bounds, g_bounds: the box (finite, lo < hi each), gamma in its own units.
        rounds: number of design rounds (>= 1).
        refine: trust-region refinement steps after the last round (>= 0).
        shrink: box scale between rounds and between refinement steps, in (0, 1).
        radius: design pentagon radius, fraction of the box half-widths (:func:`design_points`).
        gamma_scale: ``"auto"``, ``"log"`` or ``"linear"`` (:func:`resolve_gamma_scale`).
        max_evals: the most distinct evaluations (default ``7 * rounds + refine``).
        should_stop: optional early-abandonment rule.

    Raises:
        ValueError: bad bounds, ``rounds < 1``, ``refine < 0``, shrink outside (0, 1), radius
            outside (0, 1], ``max_evals < 7``, or a bad ``gamma_scale``.
    """
    _check_box(w_bounds, g_bounds)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    if not 0 < shrink < 1:
        raise ValueError(f"shrink must be in (0, 1), got {shrink}")
    scale = resolve_gamma_scale(gamma_scale, (float(g_bounds[0]), float(g_bounds[1])))
    budget = default_fit_budget(rounds, refine) if max_evals is None else int(max_evals)
    if budget < EVALS_PER_ROUND:
        raise ValueError(f"max_evals must be >= {EVALS_PER_ROUND} for the (w, gamma) fit, got {budget}")
    to_s: Callable[[float], float] = math.log if scale == "log" else float
    to_g: Callable[[float], float] = math.exp if scale == "log" else float

    evals: list[Evaluation] = []
    memo: dict[tuple[float | None, float | None], float] = {}
    coords: list[tuple[float, float]] = []  # (w, s) of each evaluation, in order

    def key(w: float, s: float) -> tuple[float | None, float | None]:
        return (_rkey(w), _rkey(to_g(s)))

    def ask(w: float, s: float, phase: str, rnd: int) -> float:
        k = key(w, s)
        if k not in memo:
            g = to_g(float(s))
            v = _finite(f(float(w), g))
            memo[k] = v
            evals.append(Evaluation(w=float(w), gamma=g, value=v, phase=phase, round=rnd))
            coords.append((float(w), float(s)))
        return memo[k]

    def to_gamma_box(box):
        return (box[0], (to_g(box[1][0]), to_g(box[1][1])))

    def to_gamma_min(m: QuadraticMinimum) -> QuadraticMinimum:
        return QuadraticMinimum(m.w, to_g(m.gamma), m.predicted, m.kind)

    outer = ((float(w_bounds[0]), float(w_bounds[1])), (to_s(float(g_bounds[0])), to_s(float(g_bounds[1]))))
    box = outer
    done: list[FitRound] = []
    stopped = "done"
    for rnd in range(1, rounds + 1):
        P = design_points(*box, radius=radius)
        new = sum(key(w, s) not in memo for w, s in P)
        if len(evals) + new + 1 > budget:
            stopped = "budget"
            break
        vals = [ask(w, s, "design", rnd) for w, s in P]
        fr = FitRound(rnd, to_gamma_box(box), [[float(w), to_g(s)] for w, s in P], vals, "design", scale)
        done.append(fr)
        if not all(math.isfinite(v) for v in vals):
            stopped = "non-finite"
            break
        fr.fit = fit_quadratic(P, vals)
        opt = minimize_quadratic(fr.fit, *box)
        fr.optimum = to_gamma_min(opt)
        if rnd == 1 and should_stop is not None and should_stop(evals, opt.predicted):
            stopped = "abandoned"
            break
        fr.measured = ask(opt.w, opt.gamma, "fit-optimum", rnd)
        if rnd < rounds:
            b = int(np.argmin([e.value for e in evals]))
            box = _shrunken_box(coords[b], box, outer, shrink)
    if stopped == "done":
        unit = np.array([outer[0][1] - outer[0][0], outer[1][1] - outer[1][0]]) / 2
        for step in range(1, refine + 1):
            if len(evals) + 1 > budget:
                stopped = "budget"
                break
            pts, vals_arr = np.array(coords), np.array([e.value for e in evals])
            b = int(np.argmin(vals_arr))
            box = _shrunken_box(coords[b], box, outer, shrink)
            got = _nearest_fit(pts, vals_arr, pts[b], unit)
            if got is None:
                stopped = "singular"
                break
            fit, sel = got
            opt = minimize_quadratic(fit, *box)
            fr = FitRound(rounds + step, to_gamma_box(box), [[evals[i].w, float(evals[i].gamma)] for i in sel],
                          [evals[i].value for i in sel], "refine", scale, fit, to_gamma_min(opt))
            done.append(fr)
            near = np.abs((pts - np.array([opt.w, opt.gamma])) / unit).max(1).min()
            if near <= CONVERGED_TOL:  # nothing new to learn there: the model agrees with what was measured
                stopped = "converged"
                break
            fr.measured = ask(opt.w, opt.gamma, "refine", rounds + step)
    best = min(evals, key=lambda e: e.value)
    return QuadraticResult(w=best.w, gamma=float(best.gamma), value=best.value, evaluations=evals,
                           rounds=done, stopped=stopped, gamma_scale=scale)


# --------------------------------------------------------------------------------------------
# Several self-trained snapshots, with early abandonment
# --------------------------------------------------------------------------------------------


@dataclass
class SnapshotOutcome:
    """The search of one snapshot: ``result`` is a BrentResult or a QuadraticResult."""

    index: int
    result: BrentResult | QuadraticResult

    @property
    def abandoned(self) -> bool:
        return self.result.stopped == "abandoned"


@dataclass
class SnapshotSearch:
    """All snapshots' searches and the winner (index into ``outcomes``; lowest measured value)."""

    outcomes: list[SnapshotOutcome]
    best: int

    @property
    def winner(self) -> BrentResult | QuadraticResult:
        return self.outcomes[self.best].result


def abandonment_rule(best_overall: float, margin: float, min_evals: int = 3) -> StopFn:
    """The early-abandonment rule of :func:`search_snapshots`.

    A snapshot's search is abandoned when, after at least ``min_evals`` evaluations, both

    * its best value so far is worse than the best value of the snapshots already searched by more
      than ``margin`` (relative: ``best_snapshot > best_overall + margin * |best_overall|``), and
    * the quadratic model's predicted minimum (Brent: :func:`parabola_minimum` of its three lowest
      points over the bounds; the (w, gamma) fit: the fitted box minimum after the six design
      points) is also above ``best_overall``: even the locally quadratic extrapolation that the
      paper's observation (App. C) supports cannot beat the best so far.

    No prediction available (fewer than three distinct points) never abandons. This generalises the
    paper's scripts, which stopped a sweep once FID rose 0.03 above the best so far.
    """

    def rule(evals: list[Evaluation], predicted: float | None) -> bool:
        if len(evals) < min_evals or predicted is None:
            return False
        mine = min(e.value for e in evals)
        return mine > best_overall + margin * abs(best_overall) and predicted > best_overall

    return rule


def search_snapshots(
    objective: Callable[[int, float, float | None], float],
    n: int,
    *,
    bounds: tuple[float, float] = (0.0, 3.0),
    gamma_bounds: tuple[float, float] | None = None,
    xtol: float = 0.05,
    max_evals: int | None = None,
    rounds: int = 1,
    refine: int = REFINE_DEFAULT,
    gamma_scale: str = "auto",
    abandon_margin: float | None = 0.02,
    abandon_after: int = 3,
) -> SnapshotSearch:
    """Tune every snapshot in order and pick the best (snapshot, w[, gamma]).

    Snapshot i is searched with :func:`brent_search` over ``bounds`` (objective
    ``objective(i, w, None)``) or, with ``gamma_bounds``, with :func:`quadratic_search`
    (``objective(i, w, gamma)``; ``rounds``, ``refine`` and ``gamma_scale`` are passed on).
    ``max_evals`` is the budget *per snapshot* (default: 12 for Brent, 7 per round + ``refine``
    for the fit). From the second snapshot on, :func:`abandonment_rule` with
    ``abandon_margin`` against the best value of the snapshots already searched ends hopeless
    searches early; ``abandon_margin=None`` disables abandonment. Ties keep the earlier snapshot.

    Raises:
        ValueError: ``n < 1`` or invalid search parameters (see the two searches).
    """
    if n < 1:
        raise ValueError("need at least one snapshot")
    outcomes: list[SnapshotOutcome] = []
    best_i: int | None = None
    for i in range(n):
        rule = None
        if best_i is not None and abandon_margin is not None:
            rule = abandonment_rule(outcomes[best_i].result.value, abandon_margin, abandon_after)
        res: BrentResult | QuadraticResult
        if gamma_bounds is None:
            res = brent_search(lambda w, i=i: objective(i, w, None), bounds, xtol=xtol,
                               max_evals=BRENT_DEFAULT_EVALS if max_evals is None else max_evals, should_stop=rule)
        else:
            res = quadratic_search(lambda w, g, i=i: objective(i, w, g), bounds, gamma_bounds, rounds=rounds,
                                   refine=refine, gamma_scale=gamma_scale, max_evals=max_evals, should_stop=rule)
        outcomes.append(SnapshotOutcome(i, res))
        if best_i is None or res.value < outcomes[best_i].result.value:
            best_i = i
    assert best_i is not None
    return SnapshotSearch(outcomes, best_i)


# --------------------------------------------------------------------------------------------
# The evaluation cache (JSON lines)
# --------------------------------------------------------------------------------------------


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class EvalCache:
    """A JSON-lines file of evaluations: reruns reuse them and an interrupted search resumes.

    One line per evaluation: ``{"key": {...}, "metrics": {...}, "seconds": float, "at": ISO
    time}``. The key (a dict; compared as canonical JSON) names everything that determines the
    result: family and its version, checkpoint sha256s, w, gamma, the resolved settings, and the
    seed plan (first seed and number of samples). The metric being optimised is not part of the
    key: ``metrics`` holds every metric the family returns, so a search on another metric reuses
    the same lines.

    Each line is written with one ``write``, flushed and fsynced. A torn last line (the process was
    killed mid-write) is ignored on read and counted in ``skipped_lines``; before the first append
    a missing final newline is restored, so the torn fragment never swallows a new record.
    ``path=None``: an in-memory cache only.
    """

    def __init__(self, path: str | os.PathLike[str] | None):
        self.path = Path(path) if path is not None else None
        self._records: dict[str, dict[str, Any]] = {}
        self.skipped_lines = 0
        self._checked_tail = False
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        with open(self.path, "rb") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    if not (isinstance(rec, dict) and isinstance(rec.get("key"), dict) and isinstance(rec.get("metrics"), dict)):
                        raise ValueError("not a cache record")
                except (ValueError, UnicodeDecodeError):
                    self.skipped_lines += 1
                    continue
                self._records[_canon(rec["key"])] = rec

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The record for ``key`` (with ``metrics`` and ``seconds``), or None."""
        return self._records.get(_canon(dict(key)))

    def put(self, key: Mapping[str, Any], metrics: Mapping[str, float], seconds: float) -> dict[str, Any]:
        """Record an evaluation (appended to the file at once when there is one)."""
        import datetime as _dt

        rec = {"key": dict(key), "metrics": {k: float(v) for k, v in metrics.items()}, "seconds": float(seconds),
               "at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        self._records[_canon(rec["key"])] = rec
        from neon_cli.dist import is_main

        if self.path is not None and is_main():  # under torchrun only rank 0 appends; all ranks hold the record
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as fh:
                if not self._checked_tail:
                    self._checked_tail = True
                    if fh.tell() > 0:
                        with open(self.path, "rb") as rd:
                            rd.seek(-1, os.SEEK_END)
                            if rd.read(1) != b"\n":
                                fh.write(b"\n")
                fh.write((json.dumps(rec, sort_keys=True, default=str) + "\n").encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
        return rec


# --------------------------------------------------------------------------------------------
# Orchestration: neon tune-w
# --------------------------------------------------------------------------------------------


def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def expand_checkpoints(items: Iterable[str | os.PathLike[str]], flag: str = "--selftrained") -> list[Path]:
    """Paths from ``items``: an existing path is kept; a glob pattern (``*``, ``?``, ``[``) is
    expanded and its matches sorted naturally (``ft/2000.pt`` before ``ft/10000.pt``).
    Duplicates are dropped, the first occurrence keeps its place.

    Raises:
        UsageError: a path that does not exist or a pattern that matches nothing (names ``flag``).
    """
    out: list[Path] = []
    for item in items:
        s = str(item)
        p = Path(s)
        if p.exists():
            found = [p]
        elif any(ch in s for ch in "*?["):
            found = sorted((Path(m) for m in glob.glob(os.path.expanduser(s))), key=_natural_key)
            if not found:
                raise UsageError(f"{flag} {s!r}: the pattern matches no file")
        else:
            raise UsageError(f"{flag} {s}: no such file or directory")
        for f in found:
            if f not in out:
                out.append(f)
    if not out:
        raise UsageError(f"{flag}: give at least one self-trained checkpoint")
    return out


def _check_plot_available(plot: Path | None) -> None:
    if plot is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"--plot {plot}: matplotlib is not installed; pip install 'neon-cli[plot]' (or matplotlib)") from None


def run_tune_w(
    family_name: str,
    base: Path | None,
    selftrained: Sequence[str | os.PathLike[str]],
    *,
    bounds: tuple[float, float] = (0.0, 3.0),
    gamma: tuple[float, float] | None = None,
    xtol: float = 0.05,
    max_evals: int | None = None,
    rounds: int = 1,
    refine: int = REFINE_DEFAULT,
    gamma_scale: str = "auto",
    metric: str | None = None,
    num_samples: int = 2000,
    seed: int = 10_000_000,
    confirm_samples: int = 0,
    set_pairs: Sequence[str] = (),
    batch: int = 1000,
    cache: Path | None = None,
    output: Path | None = None,
    plot: Path | None = None,
    abandon_margin: float | None = 0.02,
    trust_pickle: bool = False,
    detector: Path | None = None,
    ref_stats: Path | None = None,
    report: Any,
    progress: ProgressFn = null_progress,
) -> dict[str, Any]:
    """``neon tune-w``: :func:`_tune_w` with ``--detector`` / ``--ref-stats`` in effect
    (:func:`neon_cli.scoring.scoring_files`); see there. ``trust_pickle`` reaches the family's
    ``load`` (:func:`neon_cli.family.load_model`)."""
    from neon_cli.scoring import scoring_files

    with scoring_files(detector, ref_stats) as scoring:
        report.results["scoring"] = scoring
        return _tune_w(family_name, base, selftrained, bounds=bounds, gamma=gamma, xtol=xtol, max_evals=max_evals,
                       rounds=rounds, refine=refine, gamma_scale=gamma_scale, metric=metric, num_samples=num_samples,
                       seed=seed, confirm_samples=confirm_samples, set_pairs=set_pairs, batch=batch, cache=cache,
                       output=output, plot=plot, abandon_margin=abandon_margin, trust_pickle=trust_pickle,
                       scoring=scoring, report=report, progress=progress)


def _tune_w(
    family_name: str,
    base: Path | None,
    selftrained: Sequence[str | os.PathLike[str]],
    *,
    bounds: tuple[float, float],
    gamma: tuple[float, float] | None,
    xtol: float,
    max_evals: int | None,
    rounds: int,
    refine: int,
    gamma_scale: str,
    metric: str | None,
    num_samples: int,
    seed: int,
    confirm_samples: int,
    set_pairs: Sequence[str],
    batch: int,
    cache: Path | None,
    output: Path | None,
    plot: Path | None,
    abandon_margin: float | None,
    trust_pickle: bool,
    scoring: Mapping[str, Any],
    report: Any,
    progress: ProgressFn,
) -> dict[str, Any]:
    """``neon tune-w``: the best (snapshot, w[, gamma]) for theta_Neon = theta_r - w (theta_s - theta_r).

    For each self-trained checkpoint (snapshot) theta_s, candidates are merged in memory
    (``neon_cli.merge.merge_state_dicts``, float32 arithmetic) and scored by
    :meth:`neon_cli.evaluate.Evaluator.score_merge` on one seed plan (seeds ``seed ..
    seed + num_samples - 1``; common random numbers). Over w alone: :func:`brent_search`; with
    ``gamma``: :func:`quadratic_search` over (w, gamma), gamma being passed to the family as its
    guidance setting. Snapshots are searched in order with early abandonment
    (:func:`abandonment_rule`). With ``confirm_samples`` N > 0 the winner and the base model
    (w = 0, at the winner's gamma and settings) are re-scored on the disjoint seeds
    ``seed + num_samples .. seed + num_samples + N - 1``.

    Args:
        family_name: a ``neon.families`` entry point.
        base: theta_r checkpoint (the family's format); None: the family's embedded default.
        selftrained: theta_s checkpoints or glob patterns (expanded here, natural order).
        bounds: (lo, hi) of w; negative values allowed.
        gamma: (lo, hi) of the guidance scale; None searches w only at the settings' gamma.
        xtol: Brent's absolute tolerance on w.
        max_evals: evaluation budget per snapshot (default 12 for Brent, 7 x rounds + refine for
            the fit).
        rounds: rounds of the (w, gamma) fit (each on a box half as large).
        refine: trust-region refinement steps after the last round (:func:`quadratic_search`).
        gamma_scale: ``"auto"`` (``"log"`` for a positive gamma box), ``"log"`` (fit in
            (w, ln gamma)) or ``"linear"`` (fit in (w, gamma)).
        metric: the objective, one of ``family.metrics`` (default the first, e.g. ``fid``);
            :data:`HIGHER_IS_BETTER` names are maximised.
        num_samples: images per search evaluation; seed: first seed of the plan.
        confirm_samples: images per confirmation evaluation (0: none).
        set_pairs: ``KEY=VALUE`` inference settings (``--set``).
        batch: sampling batch size (does not change the images).
        cache: JSON-lines evaluation cache (:class:`EvalCache`); None: no file.
        output: write the merged best checkpoint there (``family.save``, atomic rename).
        plot: write a PNG of the metric against w (and the fitted surface) there; needs matplotlib.
        abandon_margin: relative margin of :func:`abandonment_rule`; None disables abandonment.
        report: a :class:`neon_cli.report.Report`; ``results`` gets ``metric``, ``direction``,
            ``mode`` (``"brent"`` or ``"quadratic"``), ``evaluations`` (each: index, snapshot,
            w, gamma, phase, round, value, metrics, seconds, cached, seed, num_samples),
            ``snapshots`` (per snapshot: path, sha256, n_evals, stopped, best; Brent message or
            the fit rounds with coefficients a..h, Hessian definiteness, fitted optimum,
            predicted vs measured, the refinement steps with ``kind`` "refine"), ``chosen`` (snapshot, path, w, gamma, value, metrics),
            ``n_evals``, ``n_cached``, ``eval_seconds``, ``confirmation``, ``base`` (theta_r itself,
            w = 0, on the search seeds at the chosen gamma) and ``beats_base``.
        progress: called as ``progress("tune-w", done, total, row={...})`` after each evaluation.

    Returns:
        ``report.results``.

    Raises:
        UsageError: bad bounds, flags or paths; FamilyError: unknown family or setting;
        CheckpointError: unreadable checkpoints (from the family).
    """
    from neon_cli.evaluate import Evaluator
    from neon_cli.family import get_family, load_model, model_path, plugin_version, resolve_settings
    from neon_cli.fsutil import atomic_path

    # ---- validate flags (before any expensive work) ----
    lo, hi = (float(x) for x in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UsageError(f"--bounds {lo:g} {hi:g}: need finite LO < HI")
    if not xtol > 0:
        raise UsageError(f"--xtol {xtol}: must be > 0")
    if rounds < 1:
        raise UsageError(f"--rounds {rounds}: must be >= 1")
    if refine < 0:
        raise UsageError(f"--refine {refine}: must be >= 0")
    if gamma_scale not in GAMMA_SCALES:
        raise UsageError(f"--gamma-scale {gamma_scale}: must be one of {', '.join(GAMMA_SCALES)}")
    if confirm_samples < 0:
        raise UsageError(f"--confirm-samples {confirm_samples}: must be >= 0")
    if max_evals is not None:
        if gamma is not None and max_evals < EVALS_PER_ROUND * rounds:
            raise UsageError(f"--max-evals {max_evals}: the (w, gamma) fit needs {EVALS_PER_ROUND} evaluations per round, "
                             f"{EVALS_PER_ROUND * rounds} for --rounds {rounds}")
        if max_evals < 1:
            raise UsageError(f"--max-evals {max_evals}: must be >= 1")
    if gamma is not None:
        g_lo, g_hi = (float(x) for x in gamma)
        if not (math.isfinite(g_lo) and math.isfinite(g_hi) and g_lo < g_hi):
            raise UsageError(f"--gamma {g_lo:g} {g_hi:g}: need finite LO < HI")
        gamma = (g_lo, g_hi)
        try:
            gamma_scale = resolve_gamma_scale(gamma_scale, gamma)
        except ValueError:
            raise UsageError(f"--gamma-scale log: needs a positive --gamma box, got {g_lo:g} {g_hi:g} "
                             "(use --gamma-scale linear)") from None
    snaps = expand_checkpoints(selftrained)
    _check_plot_available(plot)

    family = get_family(family_name)
    report.family = plugin_version(family_name)
    base = model_path(family, base, "--base")
    if output is not None:
        out_res = Path(output).resolve()
        if out_res in {base.resolve(), *(s.resolve() for s in snaps)}:
            raise UsageError(f"-o {output}: would overwrite an input checkpoint")
    metric = metric or (list(family.metrics)[0] if family.metrics else None)
    if metric is None or metric not in list(family.metrics):
        raise UsageError(f"--metric {metric}: family {family_name!r} reports {', '.join(family.metrics) or 'no metrics'}")
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    settings = resolve_settings(family, list(set_pairs))
    guidance = getattr(family, "guidance", None)
    if gamma is not None:
        if not guidance:
            raise UsageError(f"--gamma: family {family_name!r} has no guidance setting to search")
        spec = {s.name: s for s in family.settings}[guidance]
        for g in gamma:
            try:
                spec.check(g)
            except Exception as exc:
                raise UsageError(f"--gamma: {exc}") from None
    report.settings.update(resolved_settings=settings, metric=metric)

    # ---- inputs ----
    base_sha = report.add_input("base", base)
    snap_shas = [report.add_input("selftrained", s) for s in snaps]
    model = load_model(family, base, settings=settings, trust_pickle=trust_pickle)
    base_sd = model.state_dict()
    from neon_cli.evaluate import classes_of

    num_classes = classes_of(family, base)
    evaluator = Evaluator(family, settings, num_samples, seed, batch, progress, num_classes=num_classes)
    store = EvalCache(cache)
    fam_version = report.family.get("version") if isinstance(report.family, dict) else None

    if gamma is None:
        per_snap = BRENT_DEFAULT_EVALS if max_evals is None else max_evals
    else:
        per_snap = default_fit_budget(rounds, refine) if max_evals is None else max_evals
    total = per_snap * len(snaps) + (2 if confirm_samples else 0)
    log: list[dict[str, Any]] = []
    loaded: dict[str, Any] = {"index": None, "sd": None}

    def selftrained_sd(i: int) -> Any:
        if loaded["index"] != i:
            loaded["sd"] = None  # free the previous snapshot first
            loaded["sd"] = load_model(family, snaps[i], settings=settings, trust_pickle=trust_pickle).state_dict()
            loaded["index"] = i
        return loaded["sd"]

    def evaluate(snap: int | None, w: float, g: float | None, ev: Any, phase: str) -> dict[str, float]:
        """Metrics of one candidate (snap None: the base model itself), from the cache or measured."""
        cand_settings = dict(settings)
        overrides = {}
        if guidance and g is not None:
            overrides[guidance] = float(g)
            cand_settings[guidance] = float(g)
        key = {
            "family": family.name, "family_version": fam_version,
            "base": base_sha, "selftrained": None if snap is None else snap_shas[snap],
            "w": _rkey(w), "gamma": _rkey(cand_settings.get(guidance)) if guidance else None,
            "settings": cand_settings, "seed": ev.seed, "num_samples": ev.num_samples,
        }
        if any(scoring.values()):  # FIDs of different detectors / references are different numbers
            key["scoring"] = {k: (v or {}).get("sha256") for k, v in scoring.items()}
        hit = store.get(key)
        if hit is not None:
            metrics, seconds, cached = dict(hit["metrics"]), float(hit.get("seconds", 0.0)), True
        else:
            if snap is None:
                metrics = ev.score_model(model, overrides)
            else:
                metrics = ev.score_merge(model, base_sd, selftrained_sd(snap), w, overrides)
            seconds = float(metrics.pop("seconds", 0.0))
            if metric not in metrics:
                raise UsageError(f"--metric {metric}: family {family_name!r} returned only {', '.join(metrics)}")
            store.put(key, metrics, seconds)
            cached = False
        row = {
            "index": len(log), "snapshot": None if snap is None else str(snaps[snap]), "w": float(w),
            "gamma": key["gamma"], "phase": phase, "round": 0, "value": float(metrics[metric]),
            "metrics": metrics, "seconds": seconds, "cached": cached, "seed": ev.seed, "num_samples": ev.num_samples,
        }
        log.append(row)
        progress("tune-w", len(log), total, row={
            "#": len(log), "snapshot": "base" if snap is None else snaps[snap].name, "w": round(float(w), 4),
            **({"gamma": round(float(key["gamma"]), 4)} if key["gamma"] is not None else {}),
            metric: float(metrics[metric]), "s": round(seconds, 2), **({"cached": True} if cached else {}),
        })
        return metrics

    def objective(i: int, w: float, g: float | None) -> float:
        return sign * float(evaluate(i, w, g, evaluator, "search")[metric])

    search = search_snapshots(objective, len(snaps), bounds=(lo, hi), gamma_bounds=gamma, xtol=xtol,
                              max_evals=max_evals, rounds=rounds, refine=refine, gamma_scale=gamma_scale,
                              abandon_margin=abandon_margin)

    # ---- phases from the pure searches back onto the log ----
    phases: dict[tuple[int, float | None, float | None], Evaluation] = {}
    for oc in search.outcomes:
        for e in oc.result.evaluations:
            phases[(oc.index, _rkey(e.w), _rkey(e.gamma))] = e
    for row in log:
        i = snaps.index(Path(row["snapshot"]))
        e = phases.get((i, _rkey(row["w"]), _rkey(row["gamma"]) if gamma is not None else None))
        if e is not None:
            row["phase"], row["round"] = e.phase, e.round

    default_gamma = settings.get(guidance) if guidance else None
    snapshots_out = []
    for oc in search.outcomes:
        r = oc.result
        entry: dict[str, Any] = {
            "index": oc.index, "path": str(snaps[oc.index]), "sha256": snap_shas[oc.index], "n_evals": r.n_evals,
            "stopped": r.stopped, "abandoned": oc.abandoned,
            "best": {"w": r.w, "gamma": r.gamma if isinstance(r, QuadraticResult) else default_gamma, "value": sign * r.value},
        }
        if isinstance(r, BrentResult):
            entry["message"] = r.message
        else:
            rounds_json = []
            for fr in r.rounds:
                fj = fr.to_json()
                fj["values"] = [sign * v for v in fr.values]
                if fr.fit is not None:  # report the fit of the metric itself (not of its negation)
                    fj["coefficients"] = {k: sign * v for k, v in fj["coefficients"].items()}
                    if fr.optimum is not None:
                        fj["predicted"] = sign * fr.optimum.predicted
                        fj["measured"] = None if fr.measured is None else sign * fr.measured
                rounds_json.append(fj)
            entry["rounds"] = rounds_json
        snapshots_out.append(entry)

    win = search.winner
    win_gamma = win.gamma if isinstance(win, QuadraticResult) else default_gamma
    win_path = snaps[search.best]
    win_metrics = next(row["metrics"] for row in log
                       if row["snapshot"] == str(win_path) and _rkey(row["w"]) == _rkey(win.w)
                       and (gamma is None or _rkey(row["gamma"]) == _rkey(win_gamma)))
    results = report.results
    results.update(
        metric=metric, direction="max" if sign < 0 else "min", mode="brent" if gamma is None else "quadratic",
        bounds=[lo, hi], gamma_bounds=list(gamma) if gamma else None, xtol=xtol, max_evals_per_snapshot=per_snap,
        rounds=rounds if gamma else None, refine=refine if gamma else None,
        gamma_scale=gamma_scale if gamma else None, num_samples=num_samples, seed=seed, abandon_margin=abandon_margin,
        evaluations=log, snapshots=snapshots_out,
        chosen={"snapshot": search.best, "path": str(win_path), "sha256": snap_shas[search.best], "w": win.w,
                "gamma": win_gamma, "value": sign * win.value, "metrics": win_metrics},
    )
    # Brent and the fit never ask for w = 0 itself: score the base on the same seeds so a search
    # whose best point is worse than not merging at all says so (beats_base false).
    base_metrics = evaluate(None, 0.0, win_gamma, evaluator, "base")
    results["base"] = {"w": 0.0, "gamma": win_gamma, "value": float(base_metrics[metric]), "metrics": base_metrics}
    results["beats_base"] = bool(sign * results["chosen"]["value"] < sign * float(base_metrics[metric]))

    # ---- confirmation on a larger, disjoint seed range ----
    if confirm_samples:
        cseed = seed + num_samples
        cev = Evaluator(family, settings, confirm_samples, cseed, batch, progress, num_classes=num_classes)
        neon_m = evaluate(search.best, win.w, win_gamma, cev, "confirm")
        base_m = evaluate(None, 0.0, win_gamma, cev, "confirm-base")
        b, n_ = base_m[metric], neon_m[metric]
        results["confirmation"] = {
            "seed": cseed, "num_samples": confirm_samples, "seeds": [cseed, cseed + confirm_samples - 1],
            "neon": neon_m, "base": base_m,
            "relative_improvement": (sign * (b - n_) / abs(b)) if b else None,
        }
    else:
        results["confirmation"] = None
    results.update(n_evals=len(log), n_cached=sum(r["cached"] for r in log),
                   eval_seconds=round(sum(r["seconds"] for r in log if not r["cached"]), 3),
                   cache={"path": str(cache), "records": len(store), "skipped_lines": store.skipped_lines} if cache else None)
    progress("tune-w", len(log), len(log))

    # ---- outputs ----
    from neon_cli.dist import barrier, is_main

    if output is not None:
        from neon_cli.merge import merge_state_dicts

        merged = merge_state_dicts(base_sd, selftrained_sd(search.best), win.w)
        best_model = copy.deepcopy(model)
        best_model.load_state_dict(merged)
        best_model.eval()
        try:  # the base's own metadata (e.g. train_images), minus provenance of an earlier merge
            md = {str(k): str(v) for k, v in (family.read_metadata(str(base)) or {}).items() if not str(k).startswith("neon.")}
        except Exception:  # metadata is informative only
            md = {}
        md.update({  # the provenance keys of 'neon merge', plus what tune-w chose it by
            "neon.formula": "theta_r - w * (theta_s - theta_r)", "neon.w": repr(float(win.w)),
            "neon.base": base.name, "neon.base_sha256": base_sha,
            "neon.selftrained": win_path.name, "neon.selftrained_sha256": snap_shas[search.best],
            "neon.tune_metric": metric, "neon.tune_value": repr(float(sign * win.value)),
            "neon.tune_seeds": f"{seed}..{seed + num_samples - 1}",
        })
        if guidance and win_gamma is not None:
            md[f"neon.{guidance}"] = repr(float(win_gamma))
        if is_main():  # every rank chose the same point (metrics are broadcast from rank 0); one writes
            with atomic_path(output) as tmp:
                family.save(best_model, str(tmp), md)
            report.add_output("merged", output)
        barrier()
    if plot is not None and is_main():
        plot_search(plot, results)
        report.add_output("plot", plot)
    return results


def plot_search(path: str | os.PathLike[str], results: Mapping[str, Any]) -> Path:
    """Draw the metric against w (per snapshot) and, for a (w, gamma) search, the winner's fitted
    surface with its design points; PNG written atomically at ``path``.

    ``results`` is :func:`run_tune_w`'s ``report.results``. Needs matplotlib (optional extra
    ``plot``); raises :class:`UsageError` when it is missing.
    """
    _check_plot_available(Path(path))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neon_cli.fsutil import atomic_path

    metric = results["metric"]
    evals = [e for e in results["evaluations"] if e["snapshot"] is not None and not str(e["phase"]).startswith("confirm")]
    quad = results["mode"] == "quadratic"
    fig, axes = plt.subplots(1, 2 if quad else 1, figsize=(11 if quad else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    for k, snap in enumerate(dict.fromkeys(e["snapshot"] for e in evals)):
        own = [e for e in evals if e["snapshot"] == snap]
        if quad:  # points of the (w, gamma) search, coloured by gamma
            sc = ax.scatter([e["w"] for e in own], [e["value"] for e in own], c=[e["gamma"] for e in own], cmap="coolwarm",
                            marker="osD^v<>"[k % 7], s=28, label=Path(snap).name)
        else:
            pts = sorted((e["w"], e["value"]) for e in own)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, lw=1, label=Path(snap).name)
    if quad and evals:
        fig.colorbar(sc, ax=ax, label="gamma")
    ch = results["chosen"]
    ax.plot([ch["w"]], [ch["value"]], "r*", ms=14, label=f"chosen w={ch['w']:.3g}")
    ax.set_xlabel("w")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs w (same seeds for every candidate)")
    ax.legend(fontsize=7)
    if quad:
        ax2 = axes[0][1]
        snap = next(s for s in results["snapshots"] if s["index"] == ch["snapshot"])
        fitted = [r for r in snap.get("rounds", []) if r.get("coefficients") and r.get("kind", "design") == "design"]
        if fitted:  # the last design round's fit, drawn over its box (it says nothing outside)
            last = fitted[-1]
            c = last["coefficients"]
            (w0, w1), (g0, g1) = last["box"]["w"], last["box"]["gamma"]
            W, G = np.meshgrid(np.linspace(w0, w1, 120), np.linspace(g0, g1, 120))
            S = np.log(G) if last.get("gamma_scale") == "log" else G  # the fit's second variable
            Z = c["a"] + c["b"] * W + c["c"] * S + c["d"] * W**2 + c["e"] * S**2 + c["h"] * W * S
            cs = ax2.contourf(W, G, Z, levels=20, cmap="viridis")
            fig.colorbar(cs, ax=ax2, label=f"fitted {metric} (round {last['round']})")
        for r in snap.get("rounds", []):  # design boxes dashed, refinement trust regions dotted
            (w0, w1), (g0, g1) = r["box"]["w"], r["box"]["gamma"]
            ax2.plot([w0, w1, w1, w0, w0], [g0, g0, g1, g1, g0], "k--" if r.get("kind", "design") == "design" else "k:", lw=0.8)
        ax2.set_xlim(*results["bounds"])
        ax2.set_ylim(*results["gamma_bounds"])
        own = [e for e in evals if e["snapshot"] == ch["path"]]
        ax2.scatter([e["w"] for e in own], [e["gamma"] for e in own], c="white", edgecolors="k", s=30, label="evaluated")
        ax2.plot([ch["w"]], [ch["gamma"]], "r*", ms=14, label="chosen")
        ax2.set_xlabel("w")
        ax2.set_ylabel("gamma")
        if results.get("gamma_scale") == "log":  # the fit's coordinates; plain tick labels, not 2x10^0
            from matplotlib.ticker import ScalarFormatter

            ax2.set_yscale("log")
            ax2.yaxis.set_major_formatter(ScalarFormatter())
            ax2.yaxis.set_minor_formatter(ScalarFormatter())
        ax2.set_title("quadratic surface fit")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
