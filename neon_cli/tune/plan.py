"""The validated flags of one ``neon tune-w`` run (issue 12, item 5: every number refused by name,
before any work). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neon_cli import validate
from neon_cli.errors import UsageError
from neon_cli.tune.common import BRENT_DEFAULT_EVALS, EVALS_PER_ROUND, GAMMA_SCALES, default_fit_budget
from neon_cli.tune.joint import JOINT_METHODS, default_joint_budget
from neon_cli.tune.quadratic import resolve_gamma_scale

#: What ``--control`` accepts besides a checkpoint path: ``"real"``, fine-tune theta_r on the
#: family's real data with theta_s's budget and recipe.
CONTROLS = ("real",)


@dataclass(frozen=True)
class Plan:
    """tune-w's search parameters after validation (see :func:`neon_cli.tune.run_tune_w`).

    ``gamma`` / ``base_gamma``: (lo, hi) boxes or None; ``gamma_scale`` is resolved
    (``"log"``/``"linear"``) when a gamma box exists; ``per_snapshot``: the evaluation budget of
    one snapshot's search (also the budget of the base's own gamma search).
    """

    bounds: tuple[float, float]
    gamma: tuple[float, float] | None
    base_gamma: tuple[float, float] | None
    xtol: float
    max_evals: int | None
    rounds: int
    refine: int
    gamma_scale: str
    base_gamma_scale: str
    joint: str
    num_samples: int
    seed: int
    confirm_samples: int
    batch: int
    abandon_margin: float | None
    plot_points: int
    control: str | None
    control_samples: int | None
    labels: str = "balanced"
    keep: int = 1
    max_images: int | None = None
    refit_width: float = 0.0
    refit_gamma: float = 0.0
    target_regret: float = 0.0

    @property
    def per_snapshot(self) -> int:
        if self.max_evals is not None:
            return self.max_evals
        if self.gamma is None:
            return BRENT_DEFAULT_EVALS
        return default_fit_budget(self.rounds, self.refine) if self.joint == "design" else default_joint_budget()

    @property
    def mode(self) -> str:
        return "brent" if self.gamma is None else "quadratic"


def _box(flag: str, box: Any) -> tuple[float, float]:
    lo, hi = (validate.finite(flag, x) for x in box)
    if not lo < hi:
        raise UsageError(f"{flag} {lo:g} {hi:g}: need finite LO < HI")
    return lo, hi


def _base_box(gamma: Any, base_gamma: Any, tune_base: bool | None) -> Any:
    """The base's own gamma box: ``base_gamma``, else ``gamma``; None with ``tune_base=False``."""
    if tune_base is False:
        return None
    return base_gamma if base_gamma is not None else gamma


def check_flags(request: Any) -> Plan:
    """Every tune-w number and choice of a :class:`neon_cli.requests.TuneRequest` checked, each
    error naming its flag (UsageError); the base's gamma box is ``base_gamma`` (default ``gamma``;
    none with ``tune_base=False``)."""
    from neon_cli.labels import check as check_labels

    r = request
    bounds, gamma, xtol, max_evals, rounds, refine = r.bounds, r.gamma, r.xtol, r.max_evals, r.rounds, r.refine
    gamma_scale, joint, num_samples, seed, confirm_samples, batch = (r.gamma_scale, r.joint, r.num_samples, r.seed,
                                                                     r.confirm_samples, r.batch)
    abandon_margin, plot_points, control, control_samples = r.abandon_margin, r.plot_points, r.control, r.control_samples
    keep, max_images = r.keep, r.max_images
    refit_width = validate.finite("--refit-width", getattr(r, "refit_width", 0.0), low=0.0)
    refit_gamma = validate.finite("--refit-gamma", getattr(r, "refit_gamma", 0.0), low=0.0)
    target_regret = validate.finite("--target-regret", getattr(r, "target_regret", 0.0), low=0.0)
    if not refit_width:  # --refit-width 0: no refit at all (the first stage 2), --refit-gamma with it
        refit_gamma = 0.0
    base_gamma = _base_box(gamma, r.base_gamma, r.tune_base)
    labels = check_labels(r.labels, 0, 0).protocol  # the name here; per model (classes, -n) when the Evaluator is built
    w_box = _box("--bounds", bounds)
    g_box = _box("--gamma", gamma) if gamma is not None else None
    bg_box = _box("--base-gamma", base_gamma) if base_gamma is not None else None
    xtol = validate.positive("--xtol", xtol)
    rounds = validate.positive_int("--rounds", rounds)
    refine = validate.integer("--refine", refine, low=0)
    if gamma_scale not in GAMMA_SCALES:
        raise UsageError(f"--gamma-scale {gamma_scale}: must be one of {', '.join(GAMMA_SCALES)}")
    if joint not in JOINT_METHODS:
        raise UsageError(f"--joint {joint}: must be one of {', '.join(JOINT_METHODS)}")
    num_samples = validate.integer("--num-samples", num_samples, low=2)
    confirm_samples = validate.integer("--confirm-samples", confirm_samples, low=0)
    if confirm_samples == 1:
        raise UsageError("--confirm-samples: must be 0 (no confirmation) or >= 2 (a Fréchet distance needs 2), got 1")
    keep = validate.positive_int("--keep", keep)
    if max_images is not None:
        max_images = validate.integer("--max-images", max_images, low=0)
    # the confirmation samples blocks of fresh seeds after the search's, up to its image budget
    span = confirm_samples * max(1, (max_images or 0) // max(confirm_samples, 1)) if confirm_samples else 0
    seed = validate.seed("--seed", seed, num_samples + span)
    batch = validate.positive_int("--batch", batch)
    plot_points = validate.integer("--plot-points", plot_points, low=0)
    if abandon_margin is not None:
        abandon_margin = validate.finite("--abandon-margin", abandon_margin, low=0.0)
    if max_evals is not None:
        max_evals = validate.positive_int("--max-evals", max_evals)
        if g_box is not None and joint == "design" and max_evals < EVALS_PER_ROUND * rounds:
            raise UsageError(f"--max-evals {max_evals}: the (w, gamma) fit needs {EVALS_PER_ROUND} evaluations per round, "
                             f"{EVALS_PER_ROUND * rounds} for --rounds {rounds}")
        if g_box is not None and joint == "line" and max_evals < EVALS_PER_ROUND:
            raise UsageError(f"--max-evals {max_evals}: the (w, gamma) search needs at least {EVALS_PER_ROUND} evaluations")
    if control is not None and control not in CONTROLS and not Path(control).exists():
        raise UsageError(f"--control {control}: neither {' nor '.join(repr(c) for c in CONTROLS)} nor an existing checkpoint")
    if control_samples is not None:
        control_samples = validate.positive_int("--control-samples", control_samples)
    scales = {}
    for flag, box in (("--gamma", g_box), ("--base-gamma", bg_box)):
        if box is not None:
            try:
                scales[flag] = resolve_gamma_scale(gamma_scale, box)
            except ValueError:
                raise UsageError(f"--gamma-scale log: needs a positive {flag} box, got {box[0]:g} {box[1]:g} "
                                 "(use --gamma-scale linear)") from None
    return Plan(bounds=w_box, gamma=g_box, base_gamma=bg_box, xtol=xtol, max_evals=max_evals, rounds=rounds,
                refine=refine, gamma_scale=scales.get("--gamma", gamma_scale),
                base_gamma_scale=scales.get("--base-gamma", gamma_scale), joint=joint, num_samples=num_samples, seed=seed,
                confirm_samples=confirm_samples, batch=batch, abandon_margin=abandon_margin, plot_points=plot_points,
                control=control, control_samples=control_samples, keep=keep, max_images=max_images, labels=labels,
                refit_width=refit_width, refit_gamma=refit_gamma, target_regret=target_regret)
