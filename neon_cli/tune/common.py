"""What every search of :mod:`neon_cli.tune` shares: the evaluation record, the stop rule type,
the constants and the rounding of w and gamma in memo and cache keys. Torch-free."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

#: Metric names where higher is better; tune-w maximises these (minimises their negation).
HIGHER_IS_BETTER = frozenset({"precision", "recall", "density", "coverage", "class_accuracy", "accuracy", "is", "inception_score", "clip_score"})

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

