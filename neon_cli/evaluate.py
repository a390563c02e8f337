"""Scoring a family's models on a fixed seed plan (common random numbers) and ``neon eval``.

Every candidate model scored by one :class:`Evaluator` sees the same seeds and the same class
labels, so differences between candidates (w, gamma, snapshots) are not sampling noise.

Seed plan: image i of an evaluation uses seed ``seed + i`` and, for a class-conditional family,
label ``(seed + i) % num_classes`` (balanced classes, determined by the seed alone), or the seed and
label of another ``--labels`` protocol (:mod:`neon_cli.labels`: EDM's, VAR's, xAR's own).
"""

from __future__ import annotations

import copy
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


def parse_thresholds(max_fid: float | None = None, max_metric: list[str] | tuple[str, ...] = ()) -> dict[str, tuple[float, str]]:
    """``--max-fid X`` and ``--max-metric METRIC=X`` as ``{metric: (X, flag)}``; every X must be finite.

    Raises UsageError naming the flag (``--max-fid: must be a finite number, got nan``; a gate at
    NaN or infinity could never fail).
    """
    from neon_cli import validate

    out: dict[str, tuple[float, str]] = {}
    if max_fid is not None:
        out["fid"] = (validate.finite("--max-fid", max_fid), "--max-fid")
    for item in max_metric or ():
        name, sep, value = str(item).partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--max-metric {item!r}: expected METRIC=NUMBER")
        out[name] = (validate.finite(f"--max-metric {name}", value.strip()), f"--max-metric {name}")
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
        new = resolve_metric(family, old, limits[old][1], progress, "eval")
        if new != old:
            limits[new] = limits.pop(old)
    names = list(getattr(family, "metrics", None) or [])
    if not names:
        return
    known = set(names) | {"seconds"}
    for name, (_, flag) in limits.items():
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

    def _plan_labels(self, model: Any) -> None:
        """``--labels edm``: the labels drawn from each seed's generator on the model's device, once."""
        if self._draw_labels:
            from neon_cli.labels import plan_tensors

            self.seeds, self.labels = plan_tensors(self.label_plan, self.family, model)
            self._draw_labels = False

    def score_model(self, model: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Metrics of ``model`` (``family.score``) plus ``seconds``; ``overrides`` updates settings (e.g. gamma).

        A family with the optional method ``score_model(model, settings) -> dict`` (exact metrics
        computed from the model itself, e.g. the ``gaussian`` family's closed forms) is scored by it
        instead of sampling the seed plan: no sampling noise, and the seed plan is unused.
        """
        t0 = time.perf_counter()
        settings = {**self.settings, **(overrides or {})}
        if hasattr(model, "to"):
            from neon_cli.dist import device

            model = model.to(device())
        exact = getattr(self.family, "score_model", None)
        if callable(exact):  # deterministic, so every rank computes the same values itself
            metrics = {k: float(v) for k, v in exact(model, settings).items()}
            metrics["seconds"] = round(time.perf_counter() - t0, 3)
            return metrics
        from neon_cli.labels import active

        self._plan_labels(model)
        with active(self.label_plan):
            images = sample_batched(self.family, model, self.seeds, self.labels, settings, self.batch, self.progress, "sample")
        from neon_cli.dist import broadcast_object

        # every rank holds all the images and calls score, so a scorer that splits its own work across
        # ranks (the Inception detector's all-gather) has every rank taking part; rank 0's numbers are
        # broadcast, so every rank takes the same decisions from identical values
        metrics = broadcast_object({k: float(v) for k, v in self.family.score(images, self.labels).items()})
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        return metrics

    def score_merge(self, model: Any, base_sd: Mapping[str, Any], selftrained_sd: Mapping[str, Any], w: float,
                    overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Score theta_r - w (theta_s - theta_r) merged in memory into a copy of ``model``'s structure."""
        from neon_cli.merge import merge_state_dicts

        merged = merge_state_dicts(base_sd, selftrained_sd, w)
        candidate = copy.deepcopy(model)
        candidate.load_state_dict(merged)
        candidate.eval()
        return self.score_model(candidate, overrides)


def evaluate(family_name: str, model_path: Path | None, *, set_pairs: list[str], num_samples: int, seed: int,
             batch: int, thresholds: Mapping[str, Any] | None = None, report: Any, progress: ProgressFn = null_progress,
             trust_pickle: bool = False, detector: Path | None = None, ref_stats: Path | None = None,
             max_fid: float | None = None, max_metric: list[str] | tuple[str, ...] = (),
             labels: str | None = None) -> dict[str, float]:
    """``neon eval``: metrics of one checkpoint on the seed plan; raises ThresholdExceeded past a threshold.

    Thresholds: ``max_fid`` (``--max-fid``), ``max_metric`` (``--max-metric METRIC=X``, see
    :func:`parse_thresholds`) and ``thresholds`` (a mapping metric -> maximum, for library use); a
    metric above its maximum raises :class:`ThresholdExceeded` (exit 1) after the results are
    recorded in ``report``. Numbers are checked before any file is read (:func:`check_plan_numbers`,
    finite thresholds), threshold metric names before the model is loaded
    (:func:`check_metric_names`), and ``--report`` may not be an input. ``model_path`` None means the family's
    embedded default checkpoint. ``detector`` / ``ref_stats`` (``--detector`` / ``--ref-stats``)
    override ``$NEON_INCEPTION`` / ``$NEON_REF_STATS`` for families scored with Inception FID
    (:mod:`neon_cli.scoring`); their sha256 go to ``report.results["scoring"]``. ``labels``: the
    class-label protocol of the seed plan (``--labels``, :mod:`neon_cli.labels`; None: ``balanced``),
    recorded as ``report.results["labels"]``.
    """
    from neon_cli import validate
    from neon_cli.family import get_family, load_model, model_path as resolve_model, plugin_version, resolve_settings
    from neon_cli.labels import check as check_labels
    from neon_cli.scoring import check_family_scoring, scoring_files
    from neon_cli.tune.recorded import apply_recorded

    check_plan_numbers(num_samples, seed, batch)
    protocol = check_labels(labels, 0, 0).protocol
    limits = parse_thresholds(max_fid, max_metric)
    for name, value in (thresholds or {}).items():
        limits[name] = (validate.finite(f"--max-metric {name}", value), f"--max-metric {name}")
    family = get_family(family_name)
    report.family = plugin_version(family_name)
    path = resolve_model(family, model_path)
    report.check_outputs({"--model": path, "--detector": detector, "--ref-stats": ref_stats}, {})
    settings = apply_recorded(family, path, set_pairs, report, progress, "sample")  # tune-w's choice, then --set
    report.settings.update(resolved_settings=settings)
    report.add_input("model", path)
    with scoring_files(detector, ref_stats) as scoring:
        check_metric_names(family, family_name, limits, progress)  # inside: a family's metrics may depend on the detector
        check_family_scoring(family, family_name, detector, ref_stats)  # before the model loads or a sample is drawn
        model = load_model(family, path, settings=settings, trust_pickle=trust_pickle)
        ev = Evaluator(family, settings, num_samples, seed, batch, progress, num_classes=classes_of(family, path, settings),
                       labels=protocol)
        metrics = ev.score_model(model)
    report.results.update(metrics=metrics, num_samples=num_samples, seed=seed, scoring=scoring, labels=protocol)
    for name, (limit, flag) in limits.items():
        if name not in metrics:
            raise UsageError(f"{flag}: family {family_name!r} reports no metric {name!r}")
        if metrics[name] > limit:
            report.results["exceeded"] = {name: {"value": metrics[name], "max": limit}}
            raise ThresholdExceeded(f"{name} = {metrics[name]:.4g} exceeds {flag} {limit:g}")
    return metrics
