"""The default joint (w, gamma) search: w alone at the default gamma first, then a quadratic
surface around that line's optimum, refined until the fit says the optimum is resolved.

Why this shape (issue 16, items 3 and 7):

* it starts with :func:`neon_cli.tune.brent_search` over w at the default gamma (the gamma the
  model is sampled with, e.g. the one S was synthesized at), with the w-only search's own
  tolerance, so its first :data:`LINE_EVALS` points are those of ``tune-w`` without ``--gamma``;
  if at the end that line's parabola still predicts a value below the best point found, the
  line's Brent search is run to completion (its points are then all measured), so the joint
  search does not end worse than the w-only search on the same seeds;
* the line's points fix the surface's w terms; three points off the line (gamma above and
  below at the line's best w, one more shifted in w) fix the gamma and cross terms, so a full
  quadratic in (w, ln gamma) is determined after ``line_evals + 3`` evaluations;
* then trust-region steps (:func:`neon_cli.tune.quadratic.refine_step`: refit the 6 evaluated
  points nearest the best, evaluate the fit's minimum in a box that halves each step) until the
  fit's predicted gain over the best measured point is below :data:`RESOLVED_TOL` (relative) or
  ``max_evals`` is spent. ``min_evals`` steps are always taken; the adaptive part only adds
  evaluations while the fit still predicts a gain, and the report gives the count.

Torch-free; works on plain callables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from neon_cli.tune.brent import brent_search, parabola_minimum
from neon_cli.tune.common import BRENT_DEFAULT_EVALS, StopFn
from neon_cli.tune.quadratic import FitRound, FitSpace, QuadraticResult, _check_box, refine_step

#: ``--joint``: ``"line"`` (this module, the default) or ``"design"`` (the 6-point pentagon design
#: of :func:`neon_cli.tune.quadratic_search`).
JOINT_METHODS = ("line", "design")

#: Evaluations of the w line at the default gamma (Brent, stopped after this many).
LINE_EVALS = 4
#: Evaluations the joint search always spends (line + 3 off-line points + refinement steps).
MIN_EVALS = 9
#: The most evaluations it may spend while the fit says the optimum is not resolved.
MAX_EVALS = 15
#: The optimum counts as resolved when the fit predicts less than this relative gain.
RESOLVED_TOL = 0.005
#: Offset of the off-line points, as a fraction of the box's half-width in ln gamma (or gamma).
GAMMA_STEP = 0.25
#: Their shift in w, as a fraction of the box's half-width in w.
W_STEP = 0.3


def default_joint_budget() -> int:
    """The most evaluations of the default joint search (:data:`MAX_EVALS`)."""
    return MAX_EVALS


@dataclass(frozen=True)
class JointOptions:
    """The settings of :func:`joint_search` (each documented there); a keyword of that name overrides a field."""

    gamma0: float | None = None
    gamma_scale: str = "auto"
    line_evals: int = LINE_EVALS
    min_evals: int = MIN_EVALS
    max_evals: int | None = None
    xtol: float = 0.05
    line_max_evals: int = BRENT_DEFAULT_EVALS
    resolved_tol: float = RESOLVED_TOL
    shrink: float = 0.5
    gamma_step: float = GAMMA_STEP
    w_step: float = W_STEP
    should_stop: StopFn | None = None


def joint_search(f: Callable[[float, float], float], w_bounds: tuple[float, float], g_bounds: tuple[float, float],
                 options: JointOptions | None = None, **settings: Any) -> QuadraticResult:
    """Minimise ``f(w, gamma)`` over the box: a w line at ``gamma0``, then a refined quadratic.

    The settings below are the fields of ``options`` (default :class:`JointOptions`), each overridable by keyword.

    Args:
        f: objective of (w, gamma), minimised; non-finite counts as +inf.
        w_bounds, g_bounds: the box (finite, lo < hi).
        gamma0: the default gamma (clipped into ``g_bounds``); the line search runs there.
        gamma_scale: ``"auto"``, ``"log"`` or ``"linear"`` (the fit's second coordinate).
        line_evals: Brent evaluations on the line (>= 3).
        min_evals: evaluations always spent (when the search does not converge sooner).
        max_evals: the most evaluations of the line and the surface (default :data:`MAX_EVALS`);
            ``max_evals <= min_evals`` disables the adaptive part. Completing the line (see the
            module docstring) may add up to ``line_max_evals - line_evals`` more.
        xtol, line_max_evals: Brent's tolerance and budget on the line (those of the w-only search).
        resolved_tol: stop once the fit's predicted gain is below this fraction of the best value.
        shrink: trust-region box scale per step, in (0, 1).
        gamma_step, w_step: offsets of the off-line points (:data:`GAMMA_STEP`, :data:`W_STEP`).
        should_stop: early abandonment, asked after the line with its parabola's minimum.

    Returns:
        :class:`QuadraticResult` (the best measured point; ``rounds`` holds the surface's fits,
        ``kind`` ``"line"``, ``"design"`` or ``"refine"``). ``stopped``: ``"resolved"``,
        ``"converged"``, ``"budget"``, ``"abandoned"``, ``"singular"`` or ``"non-finite"``.

    Raises:
        ValueError: a bad box, ``line_evals < 3``, ``max_evals < line_evals + 3`` or shrink
            outside (0, 1).
    """
    import dataclasses as _dc

    o = _dc.replace(options or JointOptions(), **settings)
    if o.gamma0 is None:
        raise TypeError("joint_search() missing required keyword argument: 'gamma0'")
    gamma0, gamma_scale, line_evals, min_evals = o.gamma0, o.gamma_scale, o.line_evals, o.min_evals
    max_evals, xtol, line_max_evals, resolved_tol = o.max_evals, o.xtol, o.line_max_evals, o.resolved_tol
    shrink, gamma_step, w_step, should_stop = o.shrink, o.gamma_step, o.w_step, o.should_stop
    _check_box(w_bounds, g_bounds)
    budget = MAX_EVALS if max_evals is None else int(max_evals)
    if line_evals < 3:
        raise ValueError(f"line_evals must be >= 3, got {line_evals}")
    if budget < line_evals + 3:
        raise ValueError(f"max_evals must be >= {line_evals + 3} for the joint search, got {budget}")
    if not 0 < shrink < 1:
        raise ValueError(f"shrink must be in (0, 1), got {shrink}")
    space = FitSpace(f, w_bounds, g_bounds, gamma_scale)
    g0 = min(max(float(gamma0), float(g_bounds[0])), float(g_bounds[1]))

    def on_line(w: float) -> float:
        return space(w, space.to_s(g0), "line", 1)

    stopped = _line(space, on_line, g0, line_evals, xtol, should_stop)
    if stopped is not None:
        return space.result(stopped)
    _off_line(space, gamma_step, w_step)
    stopped = _surface(space, budget, min_evals, resolved_tol, shrink)
    if _line_may_beat_best(space, g0):
        brent_search(on_line, space.outer[0], xtol=xtol, max_evals=line_max_evals)
        stopped = f"{stopped}+line"
    return space.result(stopped)


def _surface(space: FitSpace, budget: int, min_evals: int, resolved_tol: float, shrink: float) -> str:
    """Trust-region steps until resolved (the fit's predicted gain below ``resolved_tol``, after
    ``min_evals``), converged, singular or out of budget; returns ``stopped``."""
    box: Any = space.outer
    stopped: str | None = None
    rnd = 2
    while stopped is None:
        if len(space.evals) >= budget:
            stopped = "budget"
            break
        fits_before = len(space.rounds)
        box, stop = refine_step(space, box, rnd, shrink, evaluate=False)
        if stop is not None:
            stopped = stop
            break
        fr = space.rounds[fits_before]
        best = min(e.value for e in space.evals)
        gain = best - fr.optimum.predicted if fr.optimum is not None else 0.0
        if len(space.evals) >= min(min_evals, budget) and gain <= resolved_tol * abs(best):
            stopped = "resolved"
            break
        fr.measured = space(fr.optimum.w, space.to_s(fr.optimum.gamma), "refine", rnd)
        rnd += 1
    return stopped


def _line_may_beat_best(space: FitSpace, g0: float) -> bool:
    """True when the parabola through the line's three lowest points predicts a value below the
    best measured point (the line's own optimum may then be better than what was found)."""
    s0 = space.to_s(g0)
    line = [(e.w, e.value) for e, (_, s) in zip(space.evals, space.coords) if s == s0]
    pred = parabola_minimum([w for w, _ in line], [v for _, v in line], space.outer[0])
    return pred is not None and pred < min(e.value for e in space.evals)


def _line(space: FitSpace, on_line: Callable[[float], float], g0: float, line_evals: int, xtol: float,
          should_stop: StopFn | None) -> str | None:
    """Brent over w at ``g0`` (tolerance ``xtol``) for ``line_evals`` evaluations, recorded in ``space``."""
    line = brent_search(on_line, space.outer[0], xtol=xtol, max_evals=line_evals, should_stop=should_stop)
    space.rounds.append(FitRound(1, space.gamma_box(space.outer), [[e.w, g0] for e in line.evaluations],
                                 [e.value for e in line.evaluations], "line", space.scale))
    if line.stopped == "abandoned":
        return "abandoned"
    if not any(math.isfinite(e.value) for e in space.evals):
        return "non-finite"
    return None


def _off_line(space: FitSpace, gamma_step: float, w_step: float) -> None:
    """Three points off the line: gamma up and down at the line's best w, one more shifted in w."""
    b = space.best_index()
    wb, s0 = space.coords[b]
    (w_lo, w_hi), (s_lo, s_hi) = space.outer
    ds = gamma_step * (s_hi - s_lo) / 2
    dw = w_step * (w_hi - w_lo) / 2
    up, down = min(s0 + ds, s_hi), max(s0 - ds, s_lo)
    if up - s0 < ds / 2:  # g0 at the top edge: both off-line levels below it
        up = max(s0 - 2 * ds, s_lo)
    if s0 - down < ds / 2:
        down = min(s0 + 2 * ds, s_hi)
    w_shift = wb + dw if wb + dw <= w_hi else wb - dw
    for w, s in ((wb, up), (wb, down), (w_shift, up)):
        space(w, s, "design", 1)
