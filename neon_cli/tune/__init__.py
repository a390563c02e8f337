"""``neon tune-w``: choose the merge weight w (and the guidance scale gamma) in a handful of evaluations.

Each evaluation of a candidate (snapshot, w, gamma) samples ``num_samples`` images and computes
the family's metric (FID for images): it is the dominant cost of Neon. Paper App. C ("Practical
Note on Efficient Hyperparameter Search"): the metric versus w is strongly unimodal and locally
quadratic, so

* over w alone, Brent's method (Brent 1973; ``scipy.optimize.minimize_scalar(method="bounded")``)
  reaches the optimum in about 6-10 evaluations instead of a 0.25-step grid and a refinement;
* over (w, gamma) jointly, a quadratic surface fitted to six well-distributed points locates a
  near-optimal configuration. Here the surface is fitted in (w, ln gamma); the default search
  (:func:`joint_search`) first runs w alone at the default gamma and fits the surface around
  that line's optimum, so it never ends worse than the w-only search; the 6-point pentagon
  design (:func:`quadratic_search`) remains as ``--joint design`` (``benchmarks/tune.py``
  compares them with dense grids).

Every candidate is scored on the same seeds and labels (common random numbers, see
:class:`neon_cli.evaluate.Evaluator`), so differences between candidates are not sampling noise.

The package, each module readable alone:

* pure algorithms, independent of torch and of families, testable on known functions:
  :mod:`~neon_cli.tune.brent` (:func:`brent_search`, :func:`parabola_minimum`),
  :mod:`~neon_cli.tune.quadratic` (:func:`design_points`, :func:`fit_quadratic`,
  :func:`minimize_quadratic`, :func:`quadratic_search`), :mod:`~neon_cli.tune.joint`
  (:func:`joint_search`, the default over (w, gamma)), :mod:`~neon_cli.tune.snapshots`
  (:func:`search_snapshots`), :mod:`~neon_cli.tune.baseline` (:func:`tune_guidance`: the base's
  own best gamma);
* the evaluation cache and its keys: :mod:`~neon_cli.tune.cache` (:class:`EvalCache`);
* the orchestration behind the command, as named steps: :mod:`~neon_cli.tune.run`
  (:func:`run_tune_w`), over :mod:`~neon_cli.tune.plan` (flags), :mod:`~neon_cli.tune.scorer`
  (measuring a candidate) and :mod:`~neon_cli.tune.baseline` (the base and the real-data control);
* :mod:`~neon_cli.tune.plot` (``--plot``) and :mod:`~neon_cli.tune.recorded` (the settings a
  tuned model carries in its metadata).

Conventions: the objective is *minimised*. Metrics where higher is better
(:data:`HIGHER_IS_BETTER`: precision, recall, ...) are maximised by minimising their negation;
the report always shows the metric's own value.
"""

from neon_cli.tune.baseline import GuidanceResult, measure_baselines, real_control, tune_guidance, write_real_set
from neon_cli.tune.brent import BrentResult, brent_search, parabola_minimum
from neon_cli.tune.cache import EvalCache, _canon, evaluation_key, static_key
from neon_cli.tune.common import (
    BRENT_DEFAULT_EVALS,
    CONVERGED_TOL,
    DESIGN_RADIUS,
    EVALS_PER_ROUND,
    GAMMA_SCALES,
    HIGHER_IS_BETTER,
    REFINE_DEFAULT,
    Evaluation,
    StopFn,
    _finite,
    _rkey,
    _Stop,
    default_fit_budget,
)
from neon_cli.tune.joint import JOINT_METHODS, default_joint_budget, joint_search
from neon_cli.tune.plot import plot_search
from neon_cli.tune.quadratic import (
    COEF_NAMES,
    UNIT_DESIGN,
    FitRound,
    FitSpace,
    QuadraticFit,
    QuadraticMinimum,
    QuadraticResult,
    design_points,
    fit_quadratic,
    minimize_quadratic,
    quadratic_features,
    quadratic_search,
    resolve_gamma_scale,
)
from neon_cli.tune.recorded import apply_recorded, model_settings, recorded_settings
from neon_cli.tune.run import expand_checkpoints, run_tune_w, tune_w
from neon_cli.tune.snapshots import SnapshotOutcome, SnapshotSearch, abandonment_rule, search_snapshots

__all__ = [name for name in dir() if not name.startswith("__")]
