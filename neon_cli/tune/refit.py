"""Stage 2's local refit over w (issue 23, item 2). Torch-free.

Stage 1 (the search) locates w on a few cheap samples per evaluation; what then decides the regret is
the *tilt* its seed block gives the whole curve (every candidate shares the seeds, so the common
offset cancels but the slope error does not; ``benchmarks/tune_regret.py``). Re-scoring only the
search's best few points on fresh seeds cannot move the choice off the tilted block's region, so
stage 2 measures three probes ``w1 - width, w1, w1 + width`` on blocks of fresh seeds and takes
the vertex of the parabola fitted to every block (paper App. C: the metric is locally quadratic in
w; with a gamma box, six probes and a quadratic surface in (w, ln gamma)). Each block keeps its own
offset and gradient, so its tilt cancels into a mean over blocks; after :data:`REFIT_FULL_BLOCKS`
blocks of every probe, a block scores half of them (:func:`block_probes`). The caller
centres each block's probes on the latest vertex (over (w, s): on a clipped one). The vertex's covariance is a delete-a-group jackknife over
every (block, group) of the probes' class-balanced jackknife replicates (the formula of
:func:`neon_cli.metrics.jackknife`), and its expected regret ``tr(H cov) / (2 |f|)``
(:func:`expected_regret`; ``f`` the fitted minimum with the jackknife's bias correction,
:func:`bias_shift`) is what stage 2 stops on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

#: ``neon tune-w``'s default probe half-width (w units), set from ``benchmarks/tune_regret.py``'s
#: stage-2 design study (README, "Tuning w and gamma": 0.2 gave the lowest regret of 0.1-0.3).
REFIT_WIDTH_DEFAULT = 0.2

#: ``neon tune-w --refit-gamma``'s default with a gamma box: the surface refit's probe half-width in
#: ln gamma (about 10 % in gamma), set from ``benchmarks/tune_regret.py`` on digits (README).
REFIT_GAMMA_DEFAULT = 0.1

#: ``neon tune-w --target-regret``'s default: stage 2 stops adding blocks once the refit's expected
#: regret (:func:`expected_regret`, a fraction) is at most this. Half the issue's 1 % mean target, as the
#: expected regret is itself estimated from the blocks scored so far (README, "Tuning w and gamma").
TARGET_REGRET_DEFAULT = 0.005

#: how far from the centre probe the vertex may go, in probe widths (beyond it the parabola is extrapolated)
REFIT_REACH = 2.0

#: stage-2 blocks that score every probe (and the bases, the kept candidates and the vertex); later
#: blocks score half the probes (:func:`block_probes`). A block's error is a *tilt* shared by its
#: probes: on digits (39 runs, 117 blocks of six probes) two disjoint 3-probe gradients of one block
#: differ by 0.03 % in regret units while one block's gradient varies by 2.2 % between blocks, so a
#: block's second half adds almost nothing, and half-blocks give twice the blocks per image.
REFIT_FULL_BLOCKS = 2


@dataclass(frozen=True)
class Refit:
    """The parabola through the probes' pooled means.

    Attributes:
        ws: the three probe abscissae (w), ascending.
        means: their pooled metric means (metric units), in ``ws`` order.
        curvature: the parabola's second-order coefficient (metric units / w^2; ``sign``-adjusted, so
            > 0 means a minimum of the objective exists).
        vertex: the chosen w: the vertex clipped to ``[ws[1] - REFIT_REACH * width, ws[1] + REFIT_REACH * width]``
            and the bounds, or the best probe when the parabola is not convex.
        vertex_se: the jackknife standard error of ``vertex`` (w units; nan without replicates).
        clipped: True when the vertex hit the reach or the bounds (the optimum may lie further out).
        convex: False when the fitted parabola opens the wrong way (the best probe is used).
        value: the fitted metric at ``vertex`` (metric units; block offsets averaged).
        expected_regret: :func:`expected_regret` of the vertex (a fraction: ``curvature * vertex_se^2
            / |value_bias_corrected|``); nan when clipped, not convex or without an SE.
        value_bias_corrected: ``value`` plus the probes' mean jackknife bias correction
            (:func:`bias_shift`; labelled: comparable with values taken at other N, e.g. a large-N
            truth); ``value`` itself when the probes have no replicates (:func:`_regret_scale`).
    """

    ws: tuple[float, float, float]
    means: tuple[float, float, float]
    curvature: float
    vertex: float
    vertex_se: float
    clipped: bool
    convex: bool
    value: float = math.nan
    expected_regret: float = math.nan
    value_bias_corrected: float = math.nan

    def as_json(self) -> dict:
        return {"ws": list(self.ws), "means": list(self.means), "curvature": self.curvature, "vertex": self.vertex,
                "vertex_se": _num(self.vertex_se), "clipped": self.clipped, "convex": self.convex,
                "value": _num(self.value), "value_bias_corrected": _num(self.value_bias_corrected),
                "expected_regret": _num(self.expected_regret)}


def _num(x: float) -> float | None:
    """A float for a JSON report: None for nan."""
    return None if math.isnan(x) else float(x)


def probes(w1: float, width: float, bounds: tuple[float, float]) -> tuple[float, float, float]:
    """Three probe abscissae ``width`` apart centred on ``w1``, shifted (not shrunk) to lie inside
    ``bounds`` (lo, hi); the spacing shrinks only when the bounds are narrower than ``2 width``.

    Raises:
        ValueError: ``width`` not positive and finite, or ``bounds`` not lo < hi.
    """
    lo, hi = bounds
    if not (math.isfinite(width) and width > 0):
        raise ValueError(f"probe width must be positive and finite, got {width!r}")
    if not lo < hi:
        raise ValueError(f"bounds must be lo < hi, got {bounds!r}")
    width = min(width, (hi - lo) / 2)
    c = min(max(w1, lo + width), hi - width)
    return (c - width, c, c + width)


def _deletion_cov(y: np.ndarray, blocks: Sequence[int], replicates: Sequence[Sequence[float] | None], sign: float,
                  vertex_of: Callable[[np.ndarray], Sequence[float]]) -> np.ndarray:
    """Jackknife covariance (d x d) of a refit's vertex coordinates: delete one group of one block at
    a time (that block's points take their replicate ``g``; ``y`` holds ``sign * value``), recompute
    the vertex with ``vertex_of``, and take ``(n - 1) / n * sum (v - v_bar)(v - v_bar)'`` over the
    ``n = sum_j G`` deletions (the delete-a-group formula of :func:`neon_cli.metrics.jackknife`, whose
    SE its diagonal's square root is). Every replicate list ``[]``: an exact metric, zeros; any None
    or empty (or fewer than 2 deletions): nan."""
    dims = len(vertex_of(y))
    if all(r is not None and len(r) == 0 for r in replicates):
        return np.zeros((dims, dims))
    if any(r is None or len(r) == 0 for r in replicates):
        return np.full((dims, dims), math.nan)
    outs = []
    for blk in sorted(set(blocks)):
        rows = [i for i, b in enumerate(blocks) if b == blk]
        for g in range(min(len(replicates[i]) for i in rows)):
            yy = y.copy()
            for i in rows:
                yy[i] = sign * float(replicates[i][g])
            outs.append(vertex_of(yy))
    v = np.asarray(outs, dtype=np.float64).reshape(len(outs), dims)
    n = v.shape[0]
    if n < 2:
        return np.full((dims, dims), math.nan)
    if not np.isfinite(v).all():
        return np.full((dims, dims), math.inf)
    d = v - v.mean(axis=0)
    return (n - 1) / n * (d.T @ d)


class _BlockDesign:
    """The least-squares design of a refit with one offset *and one gradient* per block and a shared
    curvature: ``y = a_j + b_j.d + q(d)`` (``d`` = probe - centre [n, k]; ``q`` the k(k+1)/2 shared
    quadratic terms). A block's error is a tilt shared by its probes (:data:`REFIT_FULL_BLOCKS`), so each
    block's own gradient ``b_j`` absorbs it exactly and the fitted gradient is their plain mean: every
    block counts once, whatever its design. (One gradient shared by all blocks would weigh a block by its
    design's spread, and let the tilts leak into the curvature.) A block with fewer than ``k + 1``
    distinct probes keeps its offset only and has no gradient of its own.

    Raises:
        ValueError: the blocks cannot fix the curvature (no block, or too few, with more probes than
            its offset and gradient).
    """

    def __init__(self, block_of: Sequence[int], d: np.ndarray):
        d = np.asarray(d, dtype=np.float64).reshape(len(block_of), -1)
        k = d.shape[1]
        quad = [d[:, i] * d[:, j] for i in range(k) for j in range(i, k)]
        blk = np.asarray(block_of)
        cols: list[np.ndarray] = []
        self.offset_cols: list[int] = []
        self.grad_cols: list[list[int]] = []
        for b in sorted(set(block_of)):
            on = (blk == b).astype(np.float64)
            self.offset_cols.append(len(cols))
            cols.append(on)
            if len({tuple(r) for r in d[blk == b]}) >= k + 1:
                self.grad_cols.append(list(range(len(cols), len(cols) + k)))
                cols += [on * d[:, i] for i in range(k)]
        self.X = np.stack(cols + quad, 1)
        self.k = k
        if not self.grad_cols or np.linalg.matrix_rank(self.X) < self.X.shape[1]:
            raise ValueError("the refit's blocks cannot fix the curvature: a block needs more distinct probes "
                             "than its offset and gradient")

    def solve(self, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """``(mean offset, mean gradient [k], shared quadratic coefficients)`` for values ``y`` [n]."""
        coef = np.linalg.lstsq(self.X, y, rcond=None)[0]
        grad = np.mean([coef[g] for g in self.grad_cols], axis=0)
        nq = self.k * (self.k + 1) // 2
        return float(np.mean(coef[self.offset_cols])), grad, coef[-nq:]


def expected_regret(hessian: np.ndarray, cov: np.ndarray, value: float) -> float:
    """The relative regret a vertex with covariance ``cov`` is expected to have on a quadratic with
    Hessian ``hessian`` (both in the refit's coordinates; ``sign``-adjusted, positive definite) and
    minimum ``value`` (metric units): ``E[f(x_hat) - f(x*)] / |f(x*)| = tr(H cov) / (2 |value|)``
    (x_hat ~ (x*, cov); a second-order expansion, exact for a quadratic). A fraction (0.01 = 1 %);
    nan when ``cov`` is nan or ``value`` is 0."""
    h, c = np.atleast_2d(np.asarray(hessian, dtype=np.float64)), np.atleast_2d(np.asarray(cov, dtype=np.float64))
    if not (np.isfinite(c).all() and np.isfinite(h).all()) or value == 0 or not math.isfinite(value):
        return math.nan
    return float(np.trace(h @ c)) / (2.0 * abs(value))


def bias_shift(replicates: Sequence[Sequence[float] | None], values: Sequence[float]) -> float:
    """The mean jackknife bias correction of the probes, in metric units: ``bias_corrected - value`` of
    :func:`neon_cli.metrics.jackknife` (``(G - 1) (v_i - mean_g r_ig)``) averaged over the points (a
    Fréchet distance at N samples exceeds its N -> inf limit by about c / N, nearly the same over a
    refit's probe box: issue 23). 0.0 for an exact metric (every list ``[]``); nan when a point has no
    replicates (None), fewer than two, or a non-finite one."""
    from neon_cli.metrics import jackknife

    if all(r is not None and len(r) == 0 for r in replicates):
        return 0.0
    if any(r is None for r in replicates):
        return math.nan
    return float(np.mean([jackknife(float(v), r)["bias_corrected"] - float(v) for r, v in zip(replicates, values)]))


def _regret_scale(value: float, shift: float) -> float:
    """The denominator of a refit's expected regret: the bias-corrected fitted value ``value + shift``
    (the regret is relative to the metric's large-N value, which the truth in
    ``benchmarks/tune_regret.py`` measures; the N-sample value is inflated by the estimator's bias: on
    digits at N = 2,000 by 1.3-1.9x, which made the expected regret 0.60 % against 0.98 % with this
    denominator and 1.11 % realised). The raw ``value`` when the shift is unknown (nan, no replicates);
    nan when the correction changes the value's sign (the relative regret is then undefined)."""
    if not math.isfinite(shift):
        return value
    corrected = value + shift
    return corrected if corrected * value > 0 else math.nan


def refit_points(points: Sequence[tuple[int, float, float, Sequence[float] | None]], *, center: float, width: float,
                 sign: float = 1.0, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Refit:
    """The vertex of ``y = a_j + b_j w + c w^2`` fitted to probes measured on several blocks ``j``.

    Each block has its own offset ``a_j`` and slope ``b_j`` (every probe of a block shares its seeds:
    the block's error is an offset and a tilt common to its probes, which cancel as in a paired
    comparison), so probes may move between blocks (stage 2 re-centres them) and still pool into one
    curvature ``c``; the vertex uses the mean slope ``b = mean_j b_j``, every block counting once
    (:class:`_BlockDesign`; least squares by ``numpy.linalg.lstsq``). A block with one probe keeps
    only its offset.

    Args:
        points: ``(block, w, value, replicates)``: a probe's metric on a block and its G
            leave-one-group-out values (None: no SE, nan; ``[]`` on every point: an exact metric, SE 0).
            At least three distinct w.
        center, width: the latest probes' centre and spacing; the vertex is clipped to
            ``center +- REFIT_REACH * width`` and to ``bounds``.
        sign: +1 for a minimised metric, -1 for a maximised one.

    The SE deletes one group of one block at a time (that block's points take their replicates),
    refits, and takes ``(n - 1) / n * sum (v - v_bar)^2`` over the ``n = sum_j G`` deletions.
    ``means``/``ws`` of the result: the latest three probes and their fitted values (the block
    offsets averaged).

    Raises:
        ValueError: fewer than three distinct w, or no block with three (nothing fixes the curvature).
    """
    if len({float(p[1]) for p in points}) < 3:
        raise ValueError(f"the refit needs three distinct probes, got {sorted({float(p[1]) for p in points})!r}")
    ws = np.array([float(p[1]) for p in points])
    y = sign * np.array([float(p[2]) for p in points])
    design = _BlockDesign([int(p[0]) for p in points], ws - center)  # centred: a well-conditioned fit
    lo = max(bounds[0], center - REFIT_REACH * width)
    hi = min(bounds[1], center + REFIT_REACH * width)

    def vertex(yv: np.ndarray) -> tuple[float, float, float, bool, bool, float]:
        off, grad, quad = design.solve(yv)
        b, c = float(grad[0]), float(quad[0])
        if not (np.isfinite(c) and c > 0):  # not convex: the best fitted probe
            fitted = b * (ws - center) + c * (ws - center) ** 2
            return float(ws[int(np.argmin(fitted))]), b, c, False, False, off
        v = center - b / (2 * c)
        return float(min(max(v, lo), hi)), b, c, not (lo <= v <= hi), True, off

    v, b, c, clipped, convex, off = vertex(y)
    cov = _deletion_cov(y, [int(p[0]) for p in points], [p[3] for p in points], sign, lambda yy: (vertex(yy)[0],))
    se = math.sqrt(cov[0, 0]) if cov[0, 0] >= 0 else math.nan
    latest = probes(center, width, bounds) if math.isfinite(width) and width > 0 else tuple(sorted(set(ws.tolist()))[:3])

    def fitted(x: float) -> float:
        return sign * (off + b * (x - center) + c * (x - center) ** 2)

    value = fitted(v)
    scale = _regret_scale(value, bias_shift([p[3] for p in points], [float(p[2]) for p in points]))
    er = expected_regret(np.array([[2 * c]]), cov, scale) if convex and not clipped else math.nan
    return Refit(ws=tuple(float(x) for x in latest), means=tuple(fitted(x) for x in latest), curvature=c, vertex=v,
                 vertex_se=se, clipped=clipped, convex=convex, value=value, value_bias_corrected=scale, expected_regret=er)


def refit(ws: Sequence[float], blocks: Sequence[Sequence[float]], replicates: Sequence[Sequence[Sequence[float]]] | None,
          *, sign: float = 1.0, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Refit:
    """:func:`refit_points` for the same three probes ``ws`` on every block: ``blocks[j][i]`` is probe
    ``i``'s metric on block ``j``, ``replicates[j][i]`` its G leave-one-group-out values (None: no SE).
    With one set of probes the block offsets cancel exactly, so the vertex is that of the parabola
    through the probes' block means.

    Raises:
        ValueError: not exactly three distinct probes, or blocks of the wrong shape.
    """
    x = sorted(float(w) for w in ws)
    if len(x) != 3 or len(set(x)) != 3:
        raise ValueError(f"the refit needs three distinct probes, got {list(ws)!r}")
    vals = np.asarray(blocks, dtype=float)
    if vals.ndim != 2 or vals.shape[1] != 3 or vals.shape[0] < 1:
        raise ValueError(f"blocks must be k x 3 values, got shape {vals.shape}")
    pts = [(j, float(ws[i]), float(vals[j, i]), None if replicates is None else list(replicates[j][i]))
           for j in range(vals.shape[0]) for i in range(3)]
    return refit_points(pts, center=x[1], width=x[1] - x[0], sign=sign, bounds=bounds)


#: the 2-D refit's probe design in units of (W, V): the centre, +-1 on each axis and (+1, +1) for the cross term
STAR6 = ((0.0, 0.0), (-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0), (1.0, 1.0))

#: the halves of the designs that blocks after :data:`REFIT_FULL_BLOCKS` score, alternately: indices
#: into ``probes(...)`` (w) and :data:`STAR6` (w, s). Each fixes the block's offset and gradient: over
#: w the outer pair ``c -+ W`` (its slope at ``c`` is free of the curvature); over (w, s) that pair and
#: ``s +- V`` in turn, so an error in the fitted curvature biases the s-gradients of successive halves
#: in opposite directions
HALVES_1D = ((0, 2),)
HALVES_2D = ((1, 2, 4), (1, 2, 3))


def block_probes(block: int, center, width, *, bounds: tuple[float, float] = (-math.inf, math.inf),
                 box: tuple[tuple[float, float], tuple[float, float]] | None = None) -> tuple:
    """The probes stage-2 block ``block`` (0-based) scores: every probe of :func:`probes` (w;
    ``center``, ``width`` floats) or :func:`probes2` ((w, s); ``center``, ``width`` pairs and ``box``
    given) for the first :data:`REFIT_FULL_BLOCKS` blocks, then alternately the halves
    :data:`HALVES_1D` / :data:`HALVES_2D` (see :data:`REFIT_FULL_BLOCKS` for why).

    Raises:
        ValueError: as :func:`probes`.
    """
    full = probes2(center, width, box) if box is not None else probes(center, width, bounds)
    if block < REFIT_FULL_BLOCKS:
        return tuple(full)
    halves = HALVES_2D if box is not None else HALVES_1D
    half = halves[(block - REFIT_FULL_BLOCKS) % len(halves)]
    return tuple(full[i] for i in half)


@dataclass(frozen=True)
class Refit2:
    """The quadratic surface in (w, s) (s = ln gamma or gamma) fitted to the 2-D probes.

    Attributes:
        probes: the latest six probes ``(w, s)``.
        vertex: the chosen ``(w, s)``: the surface's minimum clipped to ``centre +- REFIT_REACH * (W, V)``
            and the box, or the best fitted probe when the Hessian is not positive definite.
        vertex_se: jackknife standard errors of the two coordinates (nan without replicates).
        hessian: the fitted Hessian (``sign``-adjusted: positive definite at a minimum).
        clipped, convex: as :class:`Refit`.
        vertex_cov: the jackknife covariance of ``vertex`` (2 x 2; ``vertex_se`` is its diagonal's root).
        value, value_bias_corrected, expected_regret: as :class:`Refit` (``tr(H vertex_cov) / (2
            |value_bias_corrected|)``).
    """

    probes: tuple[tuple[float, float], ...]
    vertex: tuple[float, float]
    vertex_se: tuple[float, float]
    hessian: tuple[tuple[float, float], tuple[float, float]]
    clipped: bool
    convex: bool
    vertex_cov: tuple[tuple[float, float], tuple[float, float]] = ((math.nan, math.nan), (math.nan, math.nan))
    value: float = math.nan
    expected_regret: float = math.nan
    value_bias_corrected: float = math.nan

    def as_json(self) -> dict:
        return {"probes": [list(p) for p in self.probes], "vertex": list(self.vertex),
                "vertex_se": [_num(x) for x in self.vertex_se], "vertex_cov": [[_num(x) for x in r] for r in self.vertex_cov],
                "hessian": [list(r) for r in self.hessian], "clipped": self.clipped, "convex": self.convex,
                "value": _num(self.value), "value_bias_corrected": _num(self.value_bias_corrected),
                "expected_regret": _num(self.expected_regret)}


def probes2(center: tuple[float, float], width: tuple[float, float], box: tuple[tuple[float, float], tuple[float, float]]
            ) -> tuple[tuple[float, float], ...]:
    """The six probes of :data:`STAR6` around ``center`` (w, s), the centre shifted so that every
    probe lies in ``box`` ((w lo, w hi), (s lo, s hi)); a width shrinks only for a box narrower than
    two widths."""
    out_c, out_w = [], []
    for c, wd, (lo, hi) in zip(center, width, box):
        wd = min(wd, (hi - lo) / 2)
        out_c.append(min(max(c, lo + wd), hi - wd))
        out_w.append(wd)
    return tuple((out_c[0] + a * out_w[0], out_c[1] + b * out_w[1]) for a, b in STAR6)


def refit_surface(points: Sequence[tuple[int, float, float, float, Sequence[float] | None]], *, center: tuple[float, float],
                  width: tuple[float, float], sign: float = 1.0,
                  box: tuple[tuple[float, float], tuple[float, float]] = ((-math.inf, math.inf), (-math.inf, math.inf))) -> Refit2:
    """The minimum of ``y = a_j + b_j.x + x'Cx`` (x = (w, s) - centre; one offset and one gradient
    per block ``j``, their mean ``b`` in the vertex ``-H^-1 b``) fitted by least squares to probes
    ``(block, w, s, value, replicates)`` from several blocks, as :func:`refit_points` in two
    dimensions (paper App. C: the metric is locally quadratic in (w, gamma)); jackknife SEs of both
    coordinates over every (block, group) deletion.

    Raises:
        ValueError: fewer than six distinct probes, or blocks that cannot fix the curvature (a block
            needs four or more probes, not on one line, beyond its offset and gradient's three).
    """
    if len({(float(p[1]), float(p[2])) for p in points}) < 6:
        raise ValueError("the surface refit needs six distinct probes")
    pts = np.array([[float(p[1]), float(p[2])] for p in points])
    d = pts - np.asarray(center)
    design = _BlockDesign([int(p[0]) for p in points], d)
    lo = [max(box[i][0], center[i] - REFIT_REACH * width[i]) for i in range(2)]
    hi = [min(box[i][1], center[i] + REFIT_REACH * width[i]) for i in range(2)]

    def vertex(yv):
        off, grad, (c11, c12, c22) = design.solve(yv)
        H = np.array([[2 * c11, c12], [c12, 2 * c22]])
        if not (np.all(np.isfinite(H)) and np.all(np.linalg.eigvalsh(H) > 0)):
            fitted = d @ grad + c11 * d[:, 0] ** 2 + c22 * d[:, 1] ** 2 + c12 * d[:, 0] * d[:, 1]
            k = int(np.argmin(fitted))
            return (float(pts[k, 0]), float(pts[k, 1])), H, False, False, (off, grad)
        x = -np.linalg.solve(H, grad) + np.asarray(center)
        v = tuple(float(min(max(x[i], lo[i]), hi[i])) for i in range(2))
        return v, H, any(not (lo[i] <= x[i] <= hi[i]) for i in range(2)), True, (off, grad)

    y = sign * np.array([float(p[3]) for p in points])
    v, H, clipped, convex, (off, grad) = vertex(y)
    cov = _deletion_cov(y, [int(p[0]) for p in points], [p[4] for p in points], sign, lambda yy: vertex(yy)[0])
    se = tuple(math.sqrt(cov[i, i]) if cov[i, i] >= 0 else math.nan for i in range(2))
    dv = np.asarray(v) - np.asarray(center)
    value = sign * float(off + grad @ dv + 0.5 * dv @ H @ dv)
    scale = _regret_scale(value, bias_shift([p[4] for p in points], [float(p[3]) for p in points]))
    er = expected_regret(H, cov, scale) if convex and not clipped else math.nan
    return Refit2(probes=probes2(center, width, box), vertex=v, vertex_se=se,
                  hessian=((float(H[0, 0]), float(H[0, 1])), (float(H[1, 0]), float(H[1, 1]))), clipped=clipped,
                  convex=convex, vertex_cov=((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
                  value=value, value_bias_corrected=scale, expected_regret=er)
