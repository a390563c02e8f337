"""Stage 2's local refit over w (issue 23, item 2). Torch-free.

Stage 1 (the search) locates w on a few cheap samples per evaluation; what then decides the regret is
the *tilt* its seed block gives the whole curve (every candidate shares the seeds, so the common
offset cancels but the slope error does not; ``benchmarks/tune_regret.py``). Re-scoring only the
search's best few points on fresh seeds cannot move the choice off the tilted block's region, so
stage 2 measures three probes ``w1 - width, w1, w1 + width`` on blocks of fresh seeds and takes
the vertex of the parabola through their pooled means (paper App. C: the metric is locally
quadratic in w). The vertex's standard error is a delete-a-group jackknife over every (block,
group) of the probes' class-balanced jackknife replicates (:func:`neon_cli.metrics.jackknife`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: ``neon tune-w``'s default probe half-width (w units), set from ``benchmarks/tune_regret.py``'s
#: stage-2 design study (README, "Tuning w and gamma": 0.2 gave the lowest regret of 0.1-0.3).
REFIT_WIDTH_DEFAULT = 0.2

#: how far from the centre probe the vertex may go, in probe widths (beyond it the parabola is extrapolated)
REFIT_REACH = 2.0


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
    """

    ws: tuple[float, float, float]
    means: tuple[float, float, float]
    curvature: float
    vertex: float
    vertex_se: float
    clipped: bool
    convex: bool

    def as_json(self) -> dict:
        return {"ws": list(self.ws), "means": list(self.means), "curvature": self.curvature, "vertex": self.vertex,
                "vertex_se": None if math.isnan(self.vertex_se) else self.vertex_se, "clipped": self.clipped,
                "convex": self.convex}


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


def _vertex(ws: Sequence[float], ys: Sequence[float], sign: float, bounds: tuple[float, float],
            width: float) -> tuple[float, float, bool, bool]:
    """(vertex, curvature, clipped, convex) of the parabola through three points of ``sign * y``."""
    x = np.asarray(ws, dtype=float)
    y = sign * np.asarray(ys, dtype=float)
    c2, c1, _ = np.polyfit(x, y, 2)
    lo = max(bounds[0], x[1] - REFIT_REACH * width)
    hi = min(bounds[1], x[1] + REFIT_REACH * width)
    if not (np.isfinite(c2) and c2 > 0):
        return float(x[int(np.argmin(y))]), float(c2), False, False
    v = -c1 / (2 * c2)
    clipped = not (lo <= v <= hi)
    return float(min(max(v, lo), hi)), float(c2), clipped, True


def refit(ws: Sequence[float], blocks: Sequence[Sequence[float]], replicates: Sequence[Sequence[Sequence[float]]] | None,
          *, sign: float = 1.0, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Refit:
    """The vertex of the parabola through the probes' block-pooled means, with its jackknife SE.

    Args:
        ws: the three probes (w), any order.
        blocks: ``blocks[j][i]``: the metric of probe ``i`` on stage-2 block ``j`` (all probes scored on
            the same seeds in a block: common random numbers). k >= 1 blocks.
        replicates: ``replicates[j][i]``: probe ``i``'s G leave-one-group-out values on block ``j``
            (:meth:`neon_cli.evaluate.Evaluator.score_model_jk`); None: no SE (nan).
        sign: +1 for a minimised metric, -1 for a maximised one.
        bounds: the search's w bounds (the vertex is clipped to them).

    The pooled mean of probe i is the mean over blocks. Deleting group g of block j replaces that
    block's value by its replicate, so the pooled replicate is ``mean + (rep - value) / k``; the
    vertex is recomputed for each of the ``k * G`` deletions and the jackknife variance is
    ``(n - 1) / n * sum (v_(j,g) - v_bar)^2`` with ``n = k * G`` (Efron & Stein 1981; the groups are
    class-balanced, as for every other SE in neon).

    Raises:
        ValueError: not exactly three distinct probes, or blocks of the wrong shape.
    """
    order = np.argsort(np.asarray(ws, dtype=float))
    x = np.asarray(ws, dtype=float)[order]
    if len(x) != 3 or len(set(x.tolist())) != 3:
        raise ValueError(f"the refit needs three distinct probes, got {list(ws)!r}")
    vals = np.asarray(blocks, dtype=float)
    if vals.ndim != 2 or vals.shape[1] != 3 or vals.shape[0] < 1:
        raise ValueError(f"blocks must be k x 3 values, got shape {vals.shape}")
    vals = vals[:, order]
    k = vals.shape[0]
    means = vals.mean(axis=0)
    width = float(x[1] - x[0])
    v, c2, clipped, convex = _vertex(x, means, sign, bounds, width)
    se = math.nan
    if replicates is not None:
        reps = np.asarray(replicates, dtype=float)[:, order, :]  # k x 3 x G
        outs = []
        for j in range(k):
            for g in range(reps.shape[2]):
                m = means + (reps[j, :, g] - vals[j]) / k
                outs.append(_vertex(x, m, sign, bounds, width)[0])
        n = len(outs)
        if n > 1:
            arr = np.asarray(outs)
            se = float(math.sqrt((n - 1) / n * float(((arr - arr.mean()) ** 2).sum())))
    return Refit(ws=(float(x[0]), float(x[1]), float(x[2])), means=tuple(float(m) for m in means), curvature=c2,
                 vertex=v, vertex_se=se, clipped=clipped, convex=convex)
