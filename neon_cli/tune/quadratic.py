"""The 6-point quadratic surface over (w, gamma) (paper App. C: "fitting a 2D quadratic surface,
which we found requires only six well-distributed points"), with trust-region refinement.
Torch-free; every function works on plain callables and numpy arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from neon_cli.tune.common import (
    CONVERGED_TOL,
    DESIGN_RADIUS,
    EVALS_PER_ROUND,
    GAMMA_SCALES,
    REFINE_DEFAULT,
    Evaluation,
    StopFn,
    _finite,
    _rkey,
    default_fit_budget,
)

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
      (w, gamma) surfaces (fd_digits, pixel_fid, coverage; 13 boxes; ``benchmarks/tune.py``) radius
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


@dataclass(frozen=True)
class QuadraticOptions:
    """The settings of :func:`quadratic_search` (each documented there); a keyword of that name overrides a field."""

    rounds: int = 1
    refine: int = REFINE_DEFAULT
    shrink: float = 0.5
    radius: float = DESIGN_RADIUS
    gamma_scale: str = "auto"
    max_evals: int | None = None
    should_stop: StopFn | None = None


def quadratic_search(f: Callable[[float, float], float], w_bounds: tuple[float, float], g_bounds: tuple[float, float],
                     options: QuadraticOptions | None = None, **settings: Any) -> QuadraticResult:
    """Minimise ``f(w, gamma)`` with the 6-point quadratic surface fit (paper App. C).

    The settings below are the fields of ``options`` (default :class:`QuadraticOptions`), each overridable by keyword.

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
    import dataclasses as _dc

    o = _dc.replace(options or QuadraticOptions(), **settings)
    rounds, refine, shrink, radius = o.rounds, o.refine, o.shrink, o.radius
    gamma_scale, max_evals, should_stop = o.gamma_scale, o.max_evals, o.should_stop
    _check_box(w_bounds, g_bounds)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    if not 0 < shrink < 1:
        raise ValueError(f"shrink must be in (0, 1), got {shrink}")
    budget = default_fit_budget(rounds, refine) if max_evals is None else int(max_evals)
    if budget < EVALS_PER_ROUND:
        raise ValueError(f"max_evals must be >= {EVALS_PER_ROUND} for the (w, gamma) fit, got {budget}")
    ask = FitSpace(f, w_bounds, g_bounds, gamma_scale)
    box, stopped = _design_rounds(ask, rounds, radius, shrink, budget, should_stop)
    if stopped == "done":
        stopped = refine_steps(ask, box, rounds, refine, shrink, budget)
    return ask.result(stopped)


class FitSpace:
    """The objective in the coordinates the fit works in, (w, s) with s = ln gamma or gamma.

    Calling ``space(w, s, phase, round)`` evaluates ``f(w, gamma(s))`` once per distinct point
    (later calls are answered from memory and not counted), recording an :class:`Evaluation`
    (gamma in its own units) and the point's (w, s). ``rounds`` collects the :class:`FitRound`
    records of the search. ``outer`` is the search box in (w, s); ``unit`` its half-widths.
    """

    def __init__(self, f: Callable[[float, float], float], w_bounds: tuple[float, float],
                 g_bounds: tuple[float, float], gamma_scale: str = "auto"):
        _check_box(w_bounds, g_bounds)
        self.f = f
        self.scale = resolve_gamma_scale(gamma_scale, (float(g_bounds[0]), float(g_bounds[1])))
        self.evals: list[Evaluation] = []
        self.coords: list[tuple[float, float]] = []
        self.rounds: list[FitRound] = []
        self._memo: dict[tuple[float | None, float | None], float] = {}
        self.outer = ((float(w_bounds[0]), float(w_bounds[1])),
                      (self.to_s(float(g_bounds[0])), self.to_s(float(g_bounds[1]))))
        self.unit = np.array([self.outer[0][1] - self.outer[0][0], self.outer[1][1] - self.outer[1][0]]) / 2

    def to_s(self, g: float) -> float:
        return math.log(g) if self.scale == "log" else float(g)

    def to_g(self, s: float) -> float:
        return math.exp(s) if self.scale == "log" else float(s)

    def known(self, w: float, s: float) -> bool:
        return (_rkey(w), _rkey(self.to_g(s))) in self._memo

    def __call__(self, w: float, s: float, phase: str, rnd: int) -> float:
        k = (_rkey(w), _rkey(self.to_g(s)))
        if k not in self._memo:
            g = self.to_g(float(s))
            v = _finite(self.f(float(w), g))
            self._memo[k] = v
            self.evals.append(Evaluation(w=float(w), gamma=g, value=v, phase=phase, round=rnd))
            self.coords.append((float(w), float(s)))
        return self._memo[k]

    def add(self, w: float, g: float, value: float, phase: str, rnd: int = 0) -> None:
        """Record a point measured elsewhere (e.g. by a line search) as if asked here."""
        k = (_rkey(w), _rkey(g))
        if k not in self._memo:
            self._memo[k] = _finite(value)
            self.evals.append(Evaluation(w=float(w), gamma=float(g), value=_finite(value), phase=phase, round=rnd))
            self.coords.append((float(w), self.to_s(float(g))))

    def best_index(self) -> int:
        return int(np.argmin([e.value for e in self.evals]))

    def gamma_box(self, box: Any) -> tuple[tuple[float, float], tuple[float, float]]:
        return (tuple(box[0]), (self.to_g(box[1][0]), self.to_g(box[1][1])))

    def gamma_min(self, m: "QuadraticMinimum") -> "QuadraticMinimum":
        return QuadraticMinimum(m.w, self.to_g(m.gamma), m.predicted, m.kind)

    def result(self, stopped: str) -> "QuadraticResult":
        best = min(self.evals, key=lambda e: e.value)
        return QuadraticResult(w=best.w, gamma=float(best.gamma), value=best.value, evaluations=list(self.evals),
                               rounds=list(self.rounds), stopped=stopped, gamma_scale=self.scale)


def _design_rounds(ask: FitSpace, rounds: int, radius: float, shrink: float, budget: int,
                   should_stop: StopFn | None) -> tuple[Any, str]:
    """The design rounds of :func:`quadratic_search`; returns (last box, stopped)."""
    box = ask.outer
    for rnd in range(1, rounds + 1):
        P = design_points(*box, radius=radius)
        new = sum(not ask.known(w, s) for w, s in P)
        if len(ask.evals) + new + 1 > budget:
            return box, "budget"
        vals = [ask(w, s, "design", rnd) for w, s in P]
        fr = FitRound(rnd, ask.gamma_box(box), [[float(w), ask.to_g(s)] for w, s in P], vals, "design", ask.scale)
        ask.rounds.append(fr)
        if not all(math.isfinite(v) for v in vals):
            return box, "non-finite"
        fr.fit = fit_quadratic(P, vals)
        opt = minimize_quadratic(fr.fit, *box)
        fr.optimum = ask.gamma_min(opt)
        if rnd == 1 and should_stop is not None and should_stop(ask.evals, opt.predicted):
            return box, "abandoned"
        fr.measured = ask(opt.w, opt.gamma, "fit-optimum", rnd)
        if rnd < rounds:
            box = _shrunken_box(ask.coords[ask.best_index()], box, ask.outer, shrink)
    return box, "done"


def refine_step(ask: FitSpace, box: Any, rnd: int, shrink: float, evaluate: bool = True) -> tuple[Any, str | None]:
    """One trust-region step: shrink ``box`` by ``shrink`` around the best measured point, fit the
    6 evaluated points nearest it (:func:`_nearest_fit`), evaluate the fit's minimum in the box.

    Returns (new box, None) after an evaluation, or (box, ``"converged"``) when the minimum lies
    within :data:`CONVERGED_TOL` box half-widths of an evaluated point (not evaluated), or
    (box, ``"singular"``) when no well-posed set of points exists. ``evaluate=False`` appends the
    step's :class:`FitRound` (``ask.rounds[-1]``) without measuring its optimum.
    """
    pts, vals = np.array(ask.coords), np.array([e.value for e in ask.evals])
    b = ask.best_index()
    box = _shrunken_box(ask.coords[b], box, ask.outer, shrink)
    got = _nearest_fit(pts, vals, pts[b], ask.unit)
    if got is None:
        return box, "singular"
    fit, sel = got
    opt = minimize_quadratic(fit, *box)
    fr = FitRound(rnd, ask.gamma_box(box), [[ask.evals[i].w, float(ask.evals[i].gamma)] for i in sel],
                  [ask.evals[i].value for i in sel], "refine", ask.scale, fit, ask.gamma_min(opt))
    ask.rounds.append(fr)
    near = np.abs((pts - np.array([opt.w, opt.gamma])) / ask.unit).max(1).min()
    if near <= CONVERGED_TOL:  # nothing new to learn there: the model agrees with what was measured
        return box, "converged"
    if evaluate:
        fr.measured = ask(opt.w, opt.gamma, "refine", rnd)
    return box, None


def refine_steps(ask: FitSpace, box: Any, rounds_done: int, refine: int, shrink: float, budget: int) -> str:
    """Up to ``refine`` :func:`refine_step` calls within ``budget`` evaluations; returns ``stopped``."""
    for step in range(1, refine + 1):
        if len(ask.evals) + 1 > budget:
            return "budget"
        box, stop = refine_step(ask, box, rounds_done + step, shrink)
        if stop is not None:
            return stop
    return "done"
