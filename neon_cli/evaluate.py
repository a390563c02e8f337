"""Scoring a family's models on a fixed seed plan (common random numbers) and ``neon eval``.

Every candidate model scored by one :class:`Evaluator` sees the same seeds and the same class
labels, so differences between candidates (w, gamma, snapshots) are not sampling noise.

Seed plan: image i of an evaluation uses seed ``seed + i`` and, for a class-conditional family,
label ``(seed + i) % num_classes`` (balanced classes, determined by the seed alone), or the seed and
label of another ``--labels`` protocol (:mod:`neon_cli.labels`: EDM's, VAR's, xAR's own).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Mapping

from neon_cli.errors import ThresholdExceeded, UsageError
from neon_cli.progress import ProgressFn, null_progress


def classes_of(family: Any, path: Any = None, settings: Mapping[str, Any] | None = None) -> int:
    """Number of classes of the model at ``path``: the family's optional ``model_num_classes(path)``
    (families whose models differ, e.g. diffusers UNets with or without class embeddings), else
    ``family.num_classes``. A ``model_num_classes`` that declares the keyword ``settings`` gets the
    command's resolved settings (the ``t2i`` family: the number of prompts of ``--set prompts=FILE``,
    labels being prompt indices)."""
    fn = getattr(family, "model_num_classes", None)
    if fn is not None and path is not None:
        import inspect

        try:
            takes = "settings" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes = False
        return int(fn(str(path), settings=dict(settings or {})) if takes else fn(str(path)))
    return int(family.num_classes or 0)


def seed_plan(family: Any, seed: int, num: int, num_classes: int | None = None):
    """Seeds (int64 [num]: seed, seed+1, ...) and labels (int64 [num] or None) of a plan.

    ``num_classes`` defaults to ``family.num_classes``; labels are ``seed % num_classes``.
    """
    import torch

    nc = family.num_classes if num_classes is None else num_classes
    seeds = torch.arange(seed, seed + num, dtype=torch.int64)
    labels = seeds % nc if nc else None
    return seeds, labels


def sample_batched(family: Any, model: Any, seeds, labels, settings: Mapping[str, Any], batch: int,
                   progress: ProgressFn = null_progress, task: str = "sample"):
    """``family.sample`` over ``seeds`` in batches of ``batch``; uint8 [N, C, H, W] (or the family's sample tensor).

    The batches are fixed by (N, batch) alone. Under torchrun, rank r samples a contiguous run of
    batches (ceil split, so rank 0 always has one) and the images are all-gathered in order: every
    rank returns the same tensor, identical to a single process's.
    """
    import torch

    from neon_cli.dist import broadcast_object, gather_cat, rank_world

    n = len(seeds)
    chunks = [(i, min(i + batch, n)) for i in range(0, n, batch)]
    rank, world = rank_world()
    k = len(chunks)
    bounds = [-(-k * r // world) for r in range(world + 1)]  # ceil(k r / world)
    mine = chunks[bounds[rank]:bounds[rank + 1]]
    out = []
    done = 0
    with torch.inference_mode():
        for a, b in mine:
            lab = labels[a:b] if labels is not None else None
            out.append(family.sample(model, seeds[a:b], lab, settings).cpu())
            done += b - a
            progress(task, done * world if world > 1 else done, n, unit="img")
    if world == 1:
        return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)
    shape, dtype = broadcast_object((tuple(out[0].shape[1:]), out[0].dtype) if rank == 0 else None)
    local = torch.cat(out) if out else torch.empty((0,) + shape, dtype=dtype)
    sizes = [sum(b - a for a, b in chunks[bounds[r]:bounds[r + 1]]) for r in range(world)]
    return gather_cat(local, sizes)


def check_plan_numbers(num_samples: Any, seed: Any, batch: Any, *, samples_flag: str = "--num-samples") -> tuple[int, int, int]:
    """``(num_samples, seed, batch)`` checked by name: at least 2 samples (a covariance), a batch
    >= 1, seeds ``seed .. seed + num_samples - 1`` within 0 .. 2**63 - 1. Raises UsageError."""
    from neon_cli import validate

    n = validate.integer(samples_flag, num_samples, low=2)
    return n, validate.seed("--seed", seed, count=n), validate.positive_int("--batch", batch)


def parse_thresholds(max_fid: float | None = None, max_metric: list[str] | tuple[str, ...] = (),
                     min_metric: list[str] | tuple[str, ...] = ()) -> dict[str, tuple[float, str]]:
    """``--max-fid X``, ``--max-metric METRIC=X`` and ``--min-metric METRIC=X`` as ``{metric: (X, flag)}``
    (the flag says the side: a ``--min-metric`` gate fails below X); every X must be finite.
    One metric may carry both a minimum and a maximum: the minimum is then keyed ``METRIC`` under
    ``(X, "--min-metric METRIC")`` in a second entry named ``METRIC<min``.

    Raises UsageError naming the flag (``--max-fid: must be a finite number, got nan``; a gate at
    NaN or infinity could never fail).
    """
    from neon_cli import validate

    out: dict[str, tuple[float, str]] = {}
    if max_fid is not None:
        out["fid"] = (validate.finite("--max-fid", max_fid), "--max-fid")
    for opt, items in (("--max-metric", max_metric), ("--min-metric", min_metric)):
        for item in items or ():
            name, sep, value = str(item).partition("=")
            name = name.strip()
            if not sep or not name:
                raise UsageError(f"{opt} {item!r}: expected METRIC=NUMBER")
            key = name if opt == "--max-metric" else f"{name}<min"
            out[key] = (validate.finite(f"{opt} {name}", value.strip()), f"{opt} {name}")
    return out


def _metric_of(key: str) -> str:
    return key[:-4] if key.endswith("<min") else key


def check_thresholds(metrics: Mapping[str, float], limits: Mapping[str, tuple[float, str]], gate_se: float = 0.0
                     ) -> dict[str, dict[str, Any]]:
    """Every threshold of ``limits`` (:func:`parse_thresholds`) that ``metrics`` exceed.

    ``--max-metric M=X`` is exceeded when ``M - gate_se * M_se > X``; ``--min-metric M=X`` when
    ``M + gate_se * M_se < X`` (``gate_se`` = ``--gate-se K``: fail only when the threshold is passed
    by more than K standard errors; 0: on the value alone). A metric without an SE is gated on its value.
    Returns ``{metric: {"value", "se", "max" | "min", "flag"}}`` (empty: all pass).
    """
    out: dict[str, dict[str, Any]] = {}
    for key, (limit, flag) in limits.items():
        name = _metric_of(key)
        value = float(metrics[name])
        se = metrics.get(f"{name}_se")
        margin = gate_se * float(se) if gate_se and se is not None and math.isfinite(float(se)) else 0.0
        if key.endswith("<min"):
            if value + margin < limit:
                out.setdefault(name, {"value": value, "se": se, "flag": flag})["min"] = limit
        elif value - margin > limit:
            entry = out.setdefault(name, {"value": value, "se": se, "flag": flag})
            entry["max"], entry["flag"] = limit, flag
    return out


def check_metric_names(family: Any, family_name: str, limits: dict[str, tuple[float, str]],
                       progress: ProgressFn | None = None) -> None:
    """Refuse, before any sampling, a threshold on a metric the family does not report.

    The names are the family's ``metrics`` (read now: image families list ``fid`` only when an
    Inception detector is configured) plus ``seconds``; a family that lists no metrics is not
    checked here (the check after scoring still applies). A deprecated name of the family's
    ``metric_aliases`` (digits: ``fid`` for ``fd_digits``) is replaced in ``limits`` by the
    current one, with a one-line note through ``progress`` (:func:`neon_cli.family.resolve_metric`).
    Raises UsageError naming the flag and the metrics there are.
    """
    from neon_cli.family import resolve_metric

    for old in list(limits):
        base, suffix = _metric_of(old), old[len(_metric_of(old)):]
        new = resolve_metric(family, base, limits[old][1], progress, "eval")
        if new != base:
            limits[new + suffix] = limits.pop(old)
    names = list(getattr(family, "metrics", None) or [])
    if not names:
        return
    known = set(names)
    for key, (_, flag) in limits.items():
        name = _metric_of(key)
        if name not in known:
            raise UsageError(f"{flag}: family {family_name!r} reports no metric {name!r} (its metrics: {', '.join(names)})")


class Evaluator:
    """Samples ``num_samples`` images per candidate on a fixed seed plan and scores them.

    Args:
        family: a loaded family plugin object.
        settings: the resolved inference settings kappa (see :func:`neon_cli.family.resolve_settings`).
        num_samples: images per evaluation.
        seed: first seed of the plan.
        batch: sampling batch size (does not change the images: image i depends only on its seed).
        progress: progress callback.
        num_classes: classes of the models scored (default ``family.num_classes``; see :func:`classes_of`).
        labels: the class-label protocol (:mod:`neon_cli.labels`; None: ``balanced``); checked here
            (UsageError naming ``--labels`` / ``samples_flag``); ``edm``'s labels are drawn at the first
            :meth:`score_model`, from the model on its device.
    """

    def __init__(self, family: Any, settings: Mapping[str, Any], num_samples: int, seed: int = 0,
                 batch: int = 1000, progress: ProgressFn = null_progress, num_classes: int | None = None,
                 labels: str | None = None, samples_flag: str = "--num-samples"):
        from neon_cli import labels as label_protocols

        num_samples, seed, batch = check_plan_numbers(num_samples, seed, batch)
        self.family = family
        self.settings = dict(settings)
        self.num_samples = num_samples
        self.seed = seed
        self.batch = batch
        self.progress = progress
        nc = family.num_classes if num_classes is None else num_classes
        self.label_plan = label_protocols.check(labels, num_samples, int(nc or 0), family, seed=seed, num_flag=samples_flag)
        self.seeds, self.labels = label_protocols.plan_tensors(self.label_plan, family, None)  # edm: labels drawn later
        self._draw_labels = self.label_plan.protocol == "edm" and bool(nc)
        self.num_classes = int(nc or 0) if (self.labels is not None or self._draw_labels) else 0

    def _plan_labels(self, model: Any) -> None:
        """``--labels edm``: the labels drawn from each seed's generator on the model's device, once."""
        if self._draw_labels:
            from neon_cli.labels import plan_tensors

            self.seeds, self.labels = plan_tensors(self.label_plan, self.family, model)
            self._draw_labels = False

    def score_model(self, model: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Metrics of ``model`` (``family.score``), each with ``<name>_se`` (its standard error,
        :meth:`score_model_jk`), plus ``seconds``; ``overrides`` updates settings (e.g. gamma)."""
        metrics, _ = self.score_model_jk(model, overrides)
        return metrics

    def score_model_jk(self, model: Any, overrides: Mapping[str, Any] | None = None
                       ) -> tuple[dict[str, float], dict[str, list[float]] | None]:
        """``(metrics, replicates)``: the family's metrics with ``<name>_se`` and ``seconds``, and
        each metric's jackknife replicates (``{name: [G values]}``, None for exact metrics).

        The standard error is the class-balanced delete-a-group jackknife
        (:func:`neon_cli.metrics.balanced_groups`, :func:`neon_cli.metrics.jackknife`): G = 10
        contiguous seed blocks, each a multiple of the number of classes. The family's optional
        ``score_jackknife(images, labels, groups)`` computes the replicates from one feature pass;
        otherwise ``family.score`` runs once per group (:func:`neon_cli.metrics.score_with_jackknife`).
        Paired comparisons of two candidates on the same seeds use the replicates
        (:func:`neon_cli.metrics.paired_difference`).

        A family with the optional method ``score_model(model, settings) -> dict`` (exact metrics
        computed from the model itself, e.g. the ``gaussian`` family's closed forms) is scored by it
        instead of sampling the seed plan: no sampling noise (every SE is 0), and the seed plan is unused.
        """
        from neon_cli.metrics import balanced_groups, score_with_jackknife, stratified_groups, with_uncertainty

        t0 = time.perf_counter()
        settings = {**self.settings, **(overrides or {})}
        if hasattr(model, "to"):
            from neon_cli.dist import device

            model = model.to(device())
        exact = getattr(self.family, "score_model", None)
        if callable(exact):  # deterministic, so every rank computes the same values itself
            metrics, _ = with_uncertainty({k: float(v) for k, v in exact(model, settings).items()}, None)
            metrics["seconds"] = round(time.perf_counter() - t0, 3)
            return metrics, None
        from neon_cli.labels import active

        self._plan_labels(model)
        with active(self.label_plan):
            images = sample_batched(self.family, model, self.seeds, self.labels, settings, self.batch, self.progress, "sample")
        from neon_cli.dist import broadcast_object

        # every rank holds all the images and calls score, so a scorer that splits its own work across
        # ranks (the Inception detector's all-gather) has every rank taking part; rank 0's numbers are
        # broadcast, so every rank takes the same decisions from identical values
        if self.label_plan.protocol == "balanced" or self.labels is None:
            groups = balanced_groups(self.num_samples, self.num_classes)
        else:  # a paper system's label order (edm: drawn; var/xar: sorted by class): stratify on the labels
            groups = stratified_groups(self.labels.tolist())
        fast = getattr(self.family, "score_jackknife", None)
        if not groups:
            full, reps = {k: float(v) for k, v in self.family.score(images, self.labels).items()}, {}
        elif callable(fast):
            full, reps = fast(images, self.labels, groups)
        else:
            full, reps = score_with_jackknife(self.family.score, images, self.labels, groups)
        full, reps = broadcast_object(({k: float(v) for k, v in full.items()},
                                       {k: [float(x) for x in v] for k, v in reps.items()}))
        metrics, _ = with_uncertainty(full, reps)
        for k in full:  # no groups (too few images): the SE is unknown, not 0
            metrics.setdefault(f"{k}_se", float("nan"))
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        return metrics, reps

    def score_merge(self, model: Any, base_sd: Mapping[str, Any], selftrained_sd: Mapping[str, Any], w: float,
                    overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Score theta_r - w (theta_s - theta_r) merged in memory into a copy of ``model``'s structure."""
        return self.score_merge_jk(model, base_sd, selftrained_sd, w, overrides)[0]

    def score_merge_jk(self, model: Any, base_sd: Mapping[str, Any], selftrained_sd: Mapping[str, Any], w: float,
                       overrides: Mapping[str, Any] | None = None) -> tuple[dict[str, float], dict[str, list[float]] | None]:
        """:meth:`score_merge` with the jackknife replicates (as :meth:`score_model_jk`)."""
        from neon_cli.merge import merge_state_dicts

        merged = merge_state_dicts(base_sd, selftrained_sd, w)
        candidate = copy.deepcopy(model)
        candidate.load_state_dict(merged)
        candidate.eval()
        return self.score_model_jk(candidate, overrides)


#: ``neon eval``'s default first seed: disjoint from synth's (0, 1, ...) and from every seed a
#: default ``neon tune-w`` run samples (10,000,000 onwards: search, then the confirmation blocks),
#: so a check after tuning scores fresh seeds, not the ones the choice was made on.
EVAL_SEED = 20_000_000


def evaluate(request: Any, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, float]:
    """``neon eval``: metrics of one checkpoint on the seed plan, each with its standard error;
    raises ThresholdExceeded past a threshold.

    Metrics: the family's, plus ``<name>_se`` for each (class-balanced delete-a-group jackknife,
    :meth:`Evaluator.score_model_jk`); ``report.results["bias_corrected"]`` holds the jackknife's
    bias-corrected values (Quenouille; for comparing numbers taken at different N) and
    ``report.results["seconds"]`` the time (timings are not metrics).

    ``request``: an :class:`~neon_cli.requests.EvalRequest` (family, model, seed plan ``draw``,
    ``set_pairs``, ``batch``, ``labels``, ``gates``, ``scoring``, ``trust``), validated first.

    Thresholds (``request.gates``): ``max_fid`` (``--max-fid``), ``max_metric`` (``--max-metric METRIC=X``: fail above X),
    ``min_metric`` (``--min-metric METRIC=X``: fail below X, for higher-is-better metrics such as
    precision), see :func:`parse_thresholds`, and ``thresholds`` (a mapping metric -> maximum, for
    library use). ``gate_se`` (``--gate-se K``, >= 0): fail only when a threshold is passed by more
    than K standard errors (:func:`check_thresholds`). Every threshold passed is named in the
    :class:`ThresholdExceeded` message (exit 1) and in ``report.results["exceeded"]``, after the
    results are recorded. Numbers are checked before any file is read (:func:`check_plan_numbers`,
    finite thresholds), threshold metric names before the model is loaded
    (:func:`check_metric_names`), and ``--report`` may not be an input. ``model`` None means the family's
    embedded default checkpoint. ``scoring.detector`` / ``scoring.ref_stats`` (``--detector`` / ``--ref-stats``)
    override ``$NEON_INCEPTION`` / ``$NEON_REF_STATS`` for families scored with Inception FID
    (:mod:`neon_cli.scoring`); their sha256 go to ``report.results["scoring"]``. ``labels``: the
    class-label protocol of the seed plan (``--labels``, :mod:`neon_cli.labels`; None: ``balanced``),
    recorded as ``report.results["labels"]``.
    """
    from neon_cli.family import get_family, load_model, model_path as resolve_model, plugin_version
    from neon_cli.labels import check as check_labels
    from neon_cli.metrics import with_uncertainty
    from neon_cli.scoring import check_family_scoring, scoring_files
    from neon_cli.tune.recorded import apply_recorded

    req = request.validate()
    protocol = check_labels(req.labels, 0, 0).protocol
    limits = req.gates.limits()
    num_samples, seed, family_name = req.draw.num, req.draw.seed, req.family
    detector, ref_stats = req.scoring.detector, req.scoring.ref_stats
    family = get_family(family_name)
    report.family = plugin_version(family_name)
    path = resolve_model(family, req.model)
    report.check_outputs({"--model": path, "--detector": detector, "--ref-stats": ref_stats}, {})
    settings = apply_recorded(family, path, list(req.set_pairs), report, progress, "sample")  # tune-w's choice, then --set
    report.settings.update(resolved_settings=settings)
    report.add_input("model", path)
    with scoring_files(detector, ref_stats) as scoring:
        check_metric_names(family, family_name, limits, progress)  # inside: a family's metrics may depend on the detector
        check_family_scoring(family, family_name, detector, ref_stats)  # before the model loads or a sample is drawn
        model = load_model(family, path, settings=settings, trust_pickle=req.trust.pickle)
        ev = Evaluator(family, settings, num_samples, seed, req.batch, progress, num_classes=classes_of(family, path, settings),
                       labels=protocol)
        metrics, reps = ev.score_model_jk(model)
    seconds = metrics.pop("seconds", None)
    _, corrected = with_uncertainty({k: v for k, v in metrics.items() if not k.endswith("_se")}, reps)
    report.results.update(metrics=metrics, num_samples=num_samples, seed=seed, seeds=[seed, seed + num_samples - 1],
                          bias_corrected=corrected if reps else None, seconds=seconds, scoring=scoring, labels=protocol,
                          uncertainty="class-balanced delete-a-group jackknife, 10 groups" if reps else "exact (no sampling)")
    for key, (_, flag) in limits.items():
        if _metric_of(key) not in metrics:
            raise UsageError(f"{flag}: family {family_name!r} reports no metric {_metric_of(key)!r}")
    _gate(metrics, limits, req.gates.gate_se, report)
    return metrics


def _gate(metrics: Mapping[str, float], limits: dict[str, tuple[float, str]], gate_se: float, report: Any) -> None:
    """Raise :class:`ThresholdExceeded` naming every threshold ``metrics`` pass (recorded first in
    ``report.results["exceeded"]``); nothing when none is passed."""
    exceeded = check_thresholds(metrics, limits, gate_se)
    if exceeded:
        report.results["exceeded"] = exceeded
        parts = []
        for name, e in exceeded.items():
            se = f" +- {e['se']:.2g}" if e.get("se") is not None and gate_se else ""
            sides = ([f"exceeds --max-metric {name} {e['max']:g}"] if "max" in e else []) + \
                ([f"is below --min-metric {name} {e['min']:g}"] if "min" in e else [])
            if "max" in e and e["flag"] == "--max-fid":
                sides[0] = f"exceeds --max-fid {e['max']:g}"
            parts.append(f"{name} = {e['value']:.4g}{se} {' and '.join(sides)}")
        tail = f" by more than {gate_se:g} standard errors" if gate_se else ""
        raise ThresholdExceeded("; ".join(parts) + tail)
