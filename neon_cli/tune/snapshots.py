"""Several self-trained snapshots searched in order, the best (snapshot, w[, gamma]) winning, with
early abandonment of hopeless ones. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from neon_cli.tune.brent import BrentResult, brent_search
from neon_cli.tune.common import BRENT_DEFAULT_EVALS, REFINE_DEFAULT, Evaluation, StopFn
from neon_cli.tune.joint import JointOptions, joint_search
from neon_cli.tune.quadratic import QuadraticOptions, QuadraticResult, quadratic_search


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


@dataclass(frozen=True)
class SnapshotSearchOptions:
    """The settings of :func:`search_snapshots` (each documented there): the w interval ``bounds``,
    the gamma box ``gamma_bounds`` (None: w only), ``xtol`` (w units), ``max_evals`` (per
    snapshot), ``rounds``, ``refine``, ``gamma_scale``, ``abandon_margin`` (relative; None: never),
    ``abandon_after`` (evaluations), ``joint`` (``"design"``/``"line"``), ``gamma0`` (the line's gamma)."""

    bounds: tuple[float, float] = (0.0, 3.0)
    gamma_bounds: tuple[float, float] | None = None
    xtol: float = 0.05
    max_evals: int | None = None
    rounds: int = 1
    refine: int = REFINE_DEFAULT
    gamma_scale: str = "auto"
    abandon_margin: float | None = 0.02
    abandon_after: int = 3
    joint: str = "design"
    gamma0: float | None = None


def search_snapshots(objective: Callable[[int, float, float | None], float], n: int,
                     options: SnapshotSearchOptions | None = None, **settings: Any) -> SnapshotSearch:
    """Tune every snapshot in order and pick the best (snapshot, w[, gamma]).

    ``options`` (default :class:`SnapshotSearchOptions`), with any of its fields overridden by
    keyword (``bounds=(0, 2)``; TypeError for an unknown one).
    Snapshot i is searched with :func:`brent_search` over ``bounds`` (objective
    ``objective(i, w, None)``) or, with ``gamma_bounds``, over (w, gamma) (``objective(i, w,
    gamma)``): ``joint="line"`` with :func:`neon_cli.tune.joint.joint_search` (w at ``gamma0``
    first), ``joint="design"`` with :func:`quadratic_search` (``rounds``, ``refine`` and
    ``gamma_scale`` are passed on). ``max_evals`` is the budget *per snapshot* (default: 12 for
    Brent, 7 per round + ``refine`` for the design, the joint search's own default for the line). From the second snapshot on, :func:`abandonment_rule` with
    ``abandon_margin`` against the best value of the snapshots already searched ends hopeless
    searches early; ``abandon_margin=None`` disables abandonment. Ties keep the earlier snapshot.

    Raises:
        ValueError: ``n < 1`` or invalid search parameters (see the two searches).
    """
    import dataclasses

    o = dataclasses.replace(options or SnapshotSearchOptions(), **settings)
    bounds, gamma_bounds, xtol, max_evals, joint, gamma0 = o.bounds, o.gamma_bounds, o.xtol, o.max_evals, o.joint, o.gamma0
    rounds, refine, gamma_scale, abandon_margin, abandon_after = o.rounds, o.refine, o.gamma_scale, o.abandon_margin, o.abandon_after
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
        elif joint == "line":
            if gamma0 is None:
                raise ValueError("joint='line' needs gamma0, the default gamma")
            res = joint_search(lambda w, g, i=i: objective(i, w, g), bounds, gamma_bounds,
                               JointOptions(gamma0=gamma0, gamma_scale=gamma_scale, max_evals=max_evals, should_stop=rule))
        else:
            res = quadratic_search(lambda w, g, i=i: objective(i, w, g), bounds, gamma_bounds,
                                   QuadraticOptions(rounds=rounds, refine=refine, gamma_scale=gamma_scale, max_evals=max_evals,
                                                    should_stop=rule))
        outcomes.append(SnapshotOutcome(i, res))
        if best_i is None or res.value < outcomes[best_i].result.value:
            best_i = i
    assert best_i is not None
    return SnapshotSearch(outcomes, best_i)

