"""``neon tune-w`` as a few named steps over the pure searches.

:func:`tune_w` (a :class:`neon_cli.requests.TuneRequest`) = :func:`check_flags` -> :func:`prepare` -> (under the output locks)
:func:`measure_baselines` (the base at its default and, asked, at its own best gamma) ->
:func:`search` (every snapshot) -> :func:`summarize` -> :func:`confirm` (disjoint seeds) ->
:func:`control` (``--control real``) -> :func:`verdict` (does Neon beat the base?) ->
:func:`write_outputs` (``-o`` only when it does, ``--plot``) -> :class:`NoImprovement` when not.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from neon_cli.errors import NoImprovement, UsageError
from neon_cli.progress import ProgressFn, null_progress
from neon_cli.tune.baseline import measure_baselines, real_control, snapshot_recipe
from neon_cli.tune.brent import BrentResult
from neon_cli.tune.common import REFINE_DEFAULT, _rkey
from neon_cli.tune.plan import Plan
from neon_cli.tune.quadratic import QuadraticResult
from neon_cli.tune.scorer import Context, Scorer
from neon_cli.tune.snapshots import SnapshotSearch, SnapshotSearchOptions, search_snapshots


#: ``neon tune-w``'s default stage-2 budget (``--max-images``), in units of ``--num-samples``, for the
#: refit over w alone: the refit's blocks, the vertex's evaluations included; the expected-regret rule
#: (``--target-regret``) ends stage 2 earlier where the noise allows. Set from
#: ``benchmarks/tune_regret.py`` on gaussian-ddpm (5 theta_s x 5 draws, a 50,000-seed truth): 30 gave
#: mean / 90th-percentile regret 0.38 % / 1.11 % (5 of 5 theta_s meet issue 23's target) at 0.57 of the
#: paper protocol's images, 60 gave 0.35 % / 0.95 % at 0.73 (README).
STAGE2_IMAGES_FACTOR = 30

#: the same for the surface refit over (w, ln gamma) (``--gamma`` with ``--refit-gamma`` > 0), whose
#: vertex has two coordinates' noise. Set from ``benchmarks/tune_regret.py`` on 8 digits theta_s x 5
#: draws against a 60,000-seed truth: 60 (up to 16 blocks) gave 0.72 % / 1.40 %, the target on 8 of 8
#: theta_s, at 0.13 of the paper protocol's images; 30 gave 1.12 % / 2.48 %, 4 of 8, at 0.098 (README).
STAGE2_IMAGES_FACTOR_SURFACE = 60


def default_max_images(num_samples: int, *, surface: bool) -> int:
    """``--max-images``'s default (images): :data:`STAGE2_IMAGES_FACTOR_SURFACE` x ``num_samples`` when
    stage 2 refits a surface over (w, gamma) (``surface``), else :data:`STAGE2_IMAGES_FACTOR` x it."""
    return (STAGE2_IMAGES_FACTOR_SURFACE if surface else STAGE2_IMAGES_FACTOR) * int(num_samples)


def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def expand_checkpoints(items: Iterable[str | os.PathLike[str]], flag: str = "--selftrained") -> list[Path]:
    """Paths from ``items``: an existing path is kept; a glob pattern (``*``, ``?``, ``[``) is
    expanded and its matches sorted naturally (``ft/2000.pt`` before ``ft/10000.pt``).
    Duplicates are dropped, the first occurrence keeps its place.

    Raises:
        UsageError: a path that does not exist or a pattern that matches nothing (names ``flag``).
    """
    out: list[Path] = []
    for item in items:
        s = str(item)
        p = Path(s)
        if p.exists():
            found = [p]
        elif any(ch in s for ch in "*?["):
            found = sorted((Path(m) for m in glob.glob(os.path.expanduser(s))), key=_natural_key)
            if not found:
                raise UsageError(f"{flag} {s!r}: the pattern matches no file")
        else:
            raise UsageError(f"{flag} {s}: no such file or directory")
        for f in found:
            if f not in out:
                out.append(f)
    if not out:
        raise UsageError(f"{flag}: give at least one self-trained checkpoint")
    return out


def _check_plot_available(plot: Path | None) -> None:
    if plot is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"--plot {plot}: matplotlib is not installed; pip install '.[plot]' from the neon clone (or matplotlib)") from None


def run_tune_w(family_name: str, base: Path | None, selftrained: Sequence[str | os.PathLike[str]] | None, *, report: Any,
               progress: ProgressFn = null_progress, **options: Any) -> dict[str, Any]:
    """:func:`tune_w` with the request's fields as keywords (the library's long-standing call form,
    kept for scripts, tests and benchmarks): :meth:`neon_cli.requests.TuneRequest.from_keywords`
    maps ``output``, ``cache``, ``plot``, ``report_path``, ``detector``, ``ref_stats``,
    ``trust_pickle`` to its shared parts; every other keyword is a :class:`~neon_cli.requests.TuneRequest`
    field (TypeError for an unknown one)."""
    from neon_cli.requests import TuneRequest

    return tune_w(TuneRequest.from_keywords(family_name, base, selftrained, **options), report=report, progress=progress)


def tune_w(request: Any, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """``neon tune-w``: the best (snapshot, w[, gamma]) for theta_Neon = theta_r - w (theta_s - theta_r).

    Each candidate is merged in memory (``neon_cli.merge.merge_state_dicts``, float32) and scored
    on one seed plan (seeds ``seed .. seed + num_samples - 1``: common random numbers). Over w
    alone: :func:`neon_cli.tune.brent_search`; with ``gamma``: over (w, gamma), ``joint="line"``
    (:func:`neon_cli.tune.joint.joint_search`: w at the default gamma first, so never worse than
    the w-only search; the default) or ``"design"`` (:func:`neon_cli.tune.quadratic_search`).

    ``request``: a :class:`neon_cli.requests.TuneRequest` (validated here; its fields):

        family, base, selftrained: the family; theta_r (None: the family's embedded default);
            theta_s checkpoints or glob patterns (natural order).
        bounds, gamma: the w interval; the gamma box (None: w only, at the settings' gamma).
        base_gamma, tune_base: the box of the base's own gamma search (default: ``gamma``);
            ``tune_base=False`` skips it (the base is then measured at its default settings only).
        joint, xtol, max_evals, rounds, refine, gamma_scale: search parameters (per snapshot).
        line_gamma: the gamma of the joint search's w line (default: the settings' gamma; ``neon
            demo`` passes the gamma S was synthesized at).
        metric: one of ``family.metrics`` (default the first); higher-is-better names are maximised.
        num_samples, seed, confirm_samples: the seed plans: the search on ``seed ..``; stage 2
            (:func:`confirm`) on blocks of ``confirm_samples`` fresh seeds after them (0: no stage 2,
            the verdict is taken on the search seeds).
        keep, max_images: stage 2 re-scores the search's ``keep`` best candidates and the base, adding
            blocks until the choice is resolved or ``max_images`` (stage 2's images) would be passed;
            None: one block.
        set_pairs: ``--set KEY=VALUE``; on top of the settings recorded in ``base``'s metadata.
        batch: sampling batch size. outputs.cache: JSON-lines evaluation cache. outputs.out: merged
            best (only when it beats the base, or ``write_anyway``). outputs.plot, plot_points: PNG;
            evaluations along w at the chosen gamma for its FID / precision / recall panels.
        abandon_margin: early abandonment of snapshots (None: never).
        control, control_samples: ``"real"``: also fine-tune theta_r on real data (the family's
            ``real_samples``) with the chosen snapshot's budget and recipe, scored the same way;
            a path: score that checkpoint as the control (e.g. one ``neon demo`` trained).
        require_improvement: raise :class:`NoImprovement` (exit 5) when Neon does not beat the base.
        scoring: Inception files (:func:`neon_cli.scoring.scoring_files`); trust.pickle: ``--trust-pickle``.
        outputs.report: the ``--report`` file, checked against the inputs like every output.
        labels: the class-label protocol of the seed plans (``--labels``, :mod:`neon_cli.labels`;
            None: ``balanced``), recorded in the report and in every cache key.

    ``report``, ``progress``: the :class:`neon_cli.report.Report` (results documented in README) and callback.
    Returns ``report.results``. Raises UsageError / FamilyError / CheckpointError for bad input
    (before any evaluation), NoImprovement after recording everything in the report.
    """
    from neon_cli.scoring import scoring_files

    plan = request.search_plan()
    report.results["labels"] = plan.labels
    o, sc = request.outputs, request.scoring
    outputs = {"-o": o.out, "--cache": o.cache, "--plot": o.plot, "--report": o.report}
    with scoring_files(sc.detector, sc.ref_stats) as scoring:
        report.results["scoring"] = scoring
        ctx = prepare(request, plan, outputs, {"--detector": sc.detector, "--ref-stats": sc.ref_stats,
                                               "--control": _control_path(request.control)},
                      scoring, report, progress)
        ctx.line_gamma = request.line_gamma
        with _locks(o.cache, o.out):
            results = _steps(ctx, o.out, o.plot, o.cache, request.write_anyway)
    if not results["improved"] and request.require_improvement:
        raise NoImprovement(_no_improvement_message(ctx, results, o.out, request.write_anyway))
    return results


def _control_path(control: str | None) -> Path | None:
    return None if control in (None, "real") else Path(control)


def tune_base_gamma(request: Any, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """The base alone at its default settings and at its own best gamma in ``request.gamma``
    (:func:`neon_cli.tune.baseline.measure_baselines`), with the same plan, keys and cache as
    :func:`tune_w` given the same request (so a later tune-w run finds these evaluations in
    the cache). Of the :class:`neon_cli.requests.TuneRequest` it uses ``family``, ``base``,
    ``gamma``, ``max_evals`` (default: the per-snapshot budget of a (w, gamma) search with
    ``joint``), ``joint``, ``num_samples``, ``seed``, ``set_pairs``, ``batch``, ``metric``,
    ``outputs.cache``, ``trust``, ``scoring``, ``labels``. Returns (and puts in ``report.results``)
    ``{"default": ..., "best": ...}``."""
    import dataclasses

    from neon_cli.scoring import scoring_files

    request = dataclasses.replace(request, selftrained=None, bounds=(0.0, 1.0), base_gamma=request.gamma, tune_base=None,
                                  xtol=0.05, rounds=1, refine=REFINE_DEFAULT, gamma_scale="auto", confirm_samples=0,
                                  abandon_margin=None, plot_points=0, control=None, control_samples=None, keep=3,
                                  max_images=None)
    plan = request.search_plan()
    cache, sc = request.outputs.cache, request.scoring
    with scoring_files(sc.detector, sc.ref_stats) as scoring:
        ctx = prepare(request, plan, {"--cache": cache}, {"--detector": sc.detector, "--ref-stats": sc.ref_stats},
                      scoring, report, progress)
        with _locks(cache, None):
            baselines = measure_baselines(ctx, Scorer(ctx, total=plan.per_snapshot + 1))
    report.results.update(baselines=baselines, metric=ctx.metric, num_samples=request.num_samples, seed=request.seed,
                          scoring=scoring, labels=plan.labels)
    return baselines


@contextlib.contextmanager
def _locks(cache: Path | None, output: Path | None):
    """Exclusive locks on ``--cache`` and ``-o`` (rank 0 only: the other ranks write neither)."""
    from neon_cli.dist import is_main
    from neon_cli.fsutil import exclusive_lock

    with contextlib.ExitStack() as stack:
        if is_main():
            if cache is not None:
                stack.enter_context(exclusive_lock(cache, "--cache"))
            if output is not None:
                stack.enter_context(exclusive_lock(output, "-o"))
        yield


def _steps(ctx: Context, output: Path | None, plot: Path | None, cache: Path | None, write_anyway: bool) -> dict[str, Any]:
    plan = ctx.plan
    n_models = 1 + (1 if plan.control else 0)
    scorer = Scorer(ctx, total=plan.per_snapshot * (len(ctx.snaps) + n_models) + ((plan.keep + 2) if plan.confirm_samples else 0))
    results = ctx.report.results
    results["baselines"] = measure_baselines(ctx, scorer)
    found = search(ctx, scorer)
    summarize(ctx, scorer, found, results)
    confirm(ctx, scorer, found, results)
    if plan.control:
        control(ctx, scorer, found, results)
    verdict(ctx, results)
    write_outputs(ctx, scorer, found, results, output, plot, write_anyway)
    log = scorer.log
    results["images"] = images_by_stage(log)
    results.update(evaluations=log, n_evals=len(log), n_cached=sum(r["cached"] for r in log),
                   eval_seconds=round(sum(r["seconds"] for r in log if not r["cached"]), 3),
                   cache={"path": str(cache), "records": len(ctx.store), "skipped_lines": ctx.store.skipped_lines}
                   if cache else None)
    ctx.progress("tune-w", len(log), len(log))
    return results


def images_by_stage(log: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Images each stage's evaluations stand for (a cached evaluation counts: it was sampled once),
    by phase group: ``search`` (the merges' searches), ``base`` (the base and its gamma search),
    ``confirmation`` (stage 2, with its bases), ``control``, ``plot``; ``total``; and
    ``sampled_now`` (not from the cache)."""
    out = {"search": 0, "base": 0, "confirmation": 0, "control": 0, "plot": 0}
    for r in log:
        ph = r["phase"]
        key = ("confirmation" if ph.startswith("confirm") and ph != "confirm-control" else "control" if "control" in ph
               else "base" if ph.startswith("base") else "plot" if ph == "plot" else "search")
        out[key] += int(r["num_samples"])
    out["total"] = sum(out.values())
    out["sampled_now"] = sum(int(r["num_samples"]) for r in log if not r["cached"])
    return out


def prepare(request: Any, plan: Plan, outputs: Mapping[str, Any], extra_inputs: Mapping[str, Any],
            scoring: Mapping[str, Any], report: Any, progress: ProgressFn) -> Context:
    """Resolve the family, paths, settings and metric of a :class:`neon_cli.requests.TuneRequest`,
    check ``outputs`` (flag -> path) against the inputs (and ``extra_inputs``), load theta_r.
    ``request.selftrained`` None: the base alone (:func:`tune_base_gamma`)."""
    from neon_cli.dist import is_main
    from neon_cli.evaluate import classes_of
    from neon_cli.family import get_family, load_model, model_path, plugin_version, resolve_metric
    from neon_cli.fsutil import check_outputs
    from neon_cli.scoring import check_family_scoring
    from neon_cli.tune.cache import EvalCache, static_key
    from neon_cli.tune.recorded import apply_recorded

    family_name, base, selftrained, metric = request.family, request.base, request.selftrained, request.metric
    set_pairs, cache, trust_pickle = request.set_pairs, request.outputs.cache, request.trust.pickle
    snaps = [] if selftrained is None else expand_checkpoints(selftrained)
    _check_plot_available(outputs.get("--plot"))
    family = get_family(family_name)
    report.family = plugin_version(family_name)
    base = model_path(family, base, "--base")
    check_outputs({"--base": base, "--selftrained": snaps, **extra_inputs}, outputs)
    check_family_scoring(family, family_name, extra_inputs.get("--detector"), extra_inputs.get("--ref-stats"))
    metric = resolve_metric(family, metric, "--metric", progress, "tune-w") if metric else metric  # deprecated names
    metric = metric or (list(family.metrics)[0] if family.metrics else None)
    if metric is None or metric not in list(family.metrics):
        raise UsageError(f"--metric {metric}: family {family_name!r} reports {', '.join(family.metrics) or 'no metrics'}")
    settings = apply_recorded(family, base, list(set_pairs), report, progress, "tune-w")
    guidance = getattr(family, "guidance", None)
    _check_gamma_boxes(family, family_name, guidance, plan)
    if plan.control == "real":
        _check_control(family, family_name, snaps, plan)
    report.settings.update(resolved_settings=settings, metric=metric)
    base_sha = report.add_input("base", base)
    snap_shas = [report.add_input("selftrained", s) for s in snaps]
    from neon_cli.mismatch import pickle_mismatch

    warnings = [f"{Path(s).name}: {m}" for s in snaps for m in pickle_mismatch(base, s)]  # EDM/IMM pickles
    report.results.setdefault("warnings", []).extend(warnings)
    for msg in warnings:
        progress("tune-w", 0, None, message=f"warning: {msg}")
    model = load_model(family, base, settings=settings, trust_pickle=trust_pickle)
    fam_version = report.family.get("version") if isinstance(report.family, dict) else None
    ctx = Context(family=family, family_name=family_name, plan=plan, base=base, snaps=snaps, base_sha=base_sha,
                  snap_shas=snap_shas, settings=settings, guidance=guidance, metric=metric, model=model,
                  base_sd=model.state_dict(), num_classes=classes_of(family, base, settings),
                  static=static_key(family, fam_version, batch=plan.batch, scoring=scoring, labels=plan.labels),
                  store=EvalCache(cache if is_main() else None), trust_pickle=trust_pickle, report=report,
                  progress=progress)
    ctx.evaluator = ctx.evaluator_for(plan.num_samples, plan.seed)
    if plan.confirm_samples:  # the confirmation's plan too, before any evaluation
        from neon_cli.labels import check as check_labels

        check_labels(plan.labels, plan.confirm_samples, ctx.num_classes, family, num_flag="--confirm-samples")
    return ctx


def _check_gamma_boxes(family: Any, family_name: str, guidance: str | None, plan: Plan) -> None:
    for flag, box in (("--gamma", plan.gamma), ("--base-gamma", plan.base_gamma)):
        if box is None:
            continue
        if not guidance:
            raise UsageError(f"{flag}: family {family_name!r} has no guidance setting to search")
        spec = {s.name: s for s in family.settings}[guidance]
        for g in box:
            try:
                spec.check(g)
            except Exception as exc:
                raise UsageError(f"{flag}: {exc}") from None


def _check_control(family: Any, family_name: str, snaps: list[Path], plan: Plan) -> None:
    from neon_cli.dist import env_world

    if env_world()[1] > 1:  # it trains in a temporary folder of its own, which other nodes cannot see
        raise UsageError("--control real: not under torchrun; run it in one process, or train the control with "
                         "'neon finetune' and give it as --control CHECKPOINT")
    if not callable(getattr(family, "real_samples", None)):
        raise UsageError(f"--control real: family {family_name!r} provides no real data (no real_samples method)")
    for s in snaps:
        recipe = snapshot_recipe(family, s, "--control real")
        if plan.control_samples is None and not recipe.get("num_synthetic"):
            raise UsageError(f"--control-samples: {s} has no finetune.json beside it giving |S|; "
                             "give the number of real samples to fine-tune on")


def search(ctx: Context, scorer: Scorer) -> SnapshotSearch:
    """Every snapshot's search (:func:`neon_cli.tune.search_snapshots`) on the search seeds, then the
    phases of the pure searches written back onto the log rows."""
    plan = ctx.plan

    def objective(i: int, w: float, g: float | None) -> float:
        return ctx.sign * float(scorer(i, w, g, ctx.evaluator, "search")[ctx.metric])

    options = SnapshotSearchOptions(bounds=plan.bounds, gamma_bounds=plan.gamma, xtol=plan.xtol, max_evals=plan.max_evals,
                                    rounds=plan.rounds, refine=plan.refine, gamma_scale=plan.gamma_scale,
                                    abandon_margin=plan.abandon_margin, joint=plan.joint,
                                    gamma0=ctx.line_gamma if ctx.line_gamma is not None else ctx.default_gamma)
    found = search_snapshots(objective, len(ctx.snaps), options)
    phases = {}
    for oc in found.outcomes:
        for e in oc.result.evaluations:
            phases[(str(ctx.snaps[oc.index]), _rkey(e.w), _rkey(e.gamma) if plan.gamma else None)] = e
    for row in scorer.rows("search"):
        e = phases.get((row["snapshot"], _rkey(row["w"]), _rkey(row["gamma"]) if plan.gamma else None))
        if e is not None:
            row["phase"], row["round"] = e.phase, e.round
    return found


def _rounds_json(ctx: Context, r: QuadraticResult) -> list[dict[str, Any]]:
    """The fit rounds of a (w, gamma) search with values and coefficients of the metric itself
    (not of its negation); the Hessian flags describe those reported coefficients."""
    out = []
    for fr in r.rounds:
        fj = fr.to_json()
        fj["values"] = [ctx.sign * v for v in fr.values]
        if fr.fit is not None:
            coef = {k: ctx.sign * v for k, v in fj["coefficients"].items()}
            d, e, h = coef["d"], coef["e"], coef["h"]
            fj["coefficients"] = coef
            fj["hessian_positive_definite"] = bool(d > 0 and 4 * d * e - h * h > 0)
            fj["hessian_negative_definite"] = bool(d < 0 and 4 * d * e - h * h > 0)
            if fr.optimum is not None:
                fj["predicted"] = ctx.sign * fr.optimum.predicted
                fj["measured"] = None if fr.measured is None else ctx.sign * fr.measured
        out.append(fj)
    return out


def summarize(ctx: Context, scorer: Scorer, found: SnapshotSearch, results: dict[str, Any]) -> None:
    """Per-snapshot outcomes, the chosen candidate, ``base`` (w = 0 at its best gamma, or at the
    chosen gamma without a base gamma search) and ``beats_base`` (against every base measured)."""
    plan, sign = ctx.plan, ctx.sign
    snapshots_out = []
    for oc in found.outcomes:
        r = oc.result
        entry: dict[str, Any] = {
            "index": oc.index, "path": str(ctx.snaps[oc.index]), "sha256": ctx.snap_shas[oc.index], "n_evals": r.n_evals,
            "stopped": r.stopped, "abandoned": oc.abandoned,
            "best": {"w": r.w, "gamma": r.gamma if isinstance(r, QuadraticResult) else ctx.default_gamma,
                     "value": sign * r.value},
        }
        if isinstance(r, BrentResult):
            entry["message"] = r.message
        else:
            entry["rounds"] = _rounds_json(ctx, r)
        snapshots_out.append(entry)
    win = found.winner
    win_gamma = win.gamma if isinstance(win, QuadraticResult) else ctx.default_gamma
    win_metrics = scorer(found.best, win.w, win_gamma, ctx.evaluator, "search")  # measured: from memory
    results.update(
        metric=ctx.metric, direction="max" if sign < 0 else "min", mode=plan.mode,
        joint=plan.joint if plan.gamma else None, bounds=list(plan.bounds),
        gamma_bounds=list(plan.gamma) if plan.gamma else None, xtol=plan.xtol, max_evals_per_snapshot=plan.per_snapshot,
        rounds=plan.rounds if plan.gamma else None, refine=plan.refine if plan.gamma else None,
        gamma_scale=plan.gamma_scale if plan.gamma else None, num_samples=plan.num_samples, seed=plan.seed,
        abandon_margin=plan.abandon_margin, snapshots=snapshots_out,
        chosen={"snapshot": found.best, "path": str(ctx.snaps[found.best]), "sha256": ctx.snap_shas[found.best],
                "w": win.w, "gamma": win_gamma, "value": sign * win.value, "metrics": win_metrics},
    )
    # the pure searches never ask for w = 0: the base at its best gamma when it was searched, else
    # at the chosen gamma, on the same seeds
    best = results["baselines"].get("best")
    base_gamma = best["gamma"] if best else win_gamma
    base_metrics = best["metrics"] if best else scorer("base", 0.0, win_gamma, ctx.evaluator, "base")
    results["base"] = {"w": 0.0, "gamma": base_gamma, "value": float(base_metrics[ctx.metric]), "metrics": base_metrics}
    bases = scorer.rows("base", "base-gamma")
    best_base = min(bases, key=lambda row: sign * row["value"])
    results["best_base"] = {"gamma": best_base["gamma"], "value": best_base["value"],
                            "searched": results["baselines"].get("best") is not None}
    results["beats_base"] = ctx.better(results["chosen"]["value"], best_base["value"])
    win_row = scorer.measure(found.best, win.w, win_gamma, ctx.evaluator, "search")  # from memory
    results["search_vs_base"] = _paired_over(ctx, {0: [win_row], 1: [best_base]}, 0, 1)
    for out, row in ((results["chosen"], win_row), (results["best_base"], best_base)):
        out.update(_uncertainty(ctx, row))
    results["gain"] = _gains(ctx, results["chosen"]["value"], results["baselines"])


def _uncertainty(ctx: Context, row: Mapping[str, Any]) -> dict[str, Any]:
    """``se`` and ``bias_corrected`` (jackknife; labelled: for comparing values taken at different N)
    of a log row's objective, on its own seeds; None where the row has no replicates."""
    from neon_cli.metrics import jackknife

    v = float(row["metrics"][ctx.metric])
    if not row.get("jackknife"):
        return {"se": row["metrics"].get(f"{ctx.metric}_se"), "bias_corrected": None}
    jk = jackknife(v, row["jackknife"])
    return {"se": jk["se"], "bias_corrected": jk["bias_corrected"]}


def _relative(ctx: Context, base_value: float, neon_value: float) -> float | None:
    return ctx.sign * (base_value - neon_value) / abs(base_value) if base_value else None


def _gains(ctx: Context, neon_value: float, baselines: Mapping[str, Any]) -> dict[str, Any]:
    """Relative gains of ``neon_value`` over the base at default and at its best settings."""
    best = baselines.get("best")
    return {"vs_default": _relative(ctx, baselines["default"]["value"], neon_value),
            "vs_best": _relative(ctx, best["value"], neon_value) if best else None}


def _candidates(ctx: Context, scorer: Scorer, results: Mapping[str, Any]) -> list[tuple[Any, float, float | None]]:
    """The confirmation's candidates: the search's ``plan.keep`` best distinct (snapshot, w, gamma),
    best first (the chosen one first), then the base at its best gamma (without a base gamma
    search: at the chosen gamma) and at its default settings."""
    sign, ch = ctx.sign, results["chosen"]
    index = {str(p): i for i, p in enumerate(ctx.snaps)}
    ev = ctx.evaluator
    rows = sorted((r for r in scorer.log if r["model"] == "neon" and r["seed"] == ev.seed and r["num_samples"] == ev.num_samples
                   and r["phase"] != "plot"), key=lambda r: sign * r["value"])
    out: list[tuple[Any, float, float | None]] = [(ch["snapshot"], float(ch["w"]), ch["gamma"])]
    for r in rows:
        if len(out) >= ctx.plan.keep:
            break
        c = (index[r["snapshot"]], float(r["w"]), r["gamma"] if ctx.plan.gamma else ch["gamma"])
        if all((c[0], _rkey(c[1]), _rkey(c[2])) != (o[0], _rkey(o[1]), _rkey(o[2])) for o in out):
            out.append(c)
    best = results["baselines"].get("best")
    for g in dict.fromkeys([best["gamma"] if best else ch["gamma"], ctx.default_gamma]):
        out.append(("base", 0.0, g))
    return out


def _label(ctx: Context, c: tuple[Any, float, float | None]) -> str:
    who, w, g = c
    name = "base" if who == "base" else f"{ctx.snaps[who].name} w={w:.4g}"
    return name + (f" gamma={g:.4g}" if g is not None else "")


def _pair(a: Mapping[str, Any], b: Mapping[str, Any], metric: str) -> tuple[float, float]:
    """(a - b, its SE) of two log rows on the same seeds: the jackknife of the difference; exact
    metrics (no replicates) give SE 0."""
    from neon_cli.metrics import paired_difference

    va, vb = float(a["metrics"][metric]), float(b["metrics"][metric])
    if not a.get("jackknife") or not b.get("jackknife"):
        return va - vb, 0.0 if f"{metric}_se" in a["metrics"] and not a["metrics"][f"{metric}_se"] else float("nan")
    d = paired_difference(va, a["jackknife"], vb, b["jackknife"])
    return d["diff"], d["se"]


def _confirm_blocks(ctx: Context, scorer: Scorer, cands: list[tuple[Any, float, float | None]], B: int,
                    cseed: int) -> tuple[dict[int, list[dict[str, Any]]], dict[int, dict[str, Any]], dict[int, dict[str, Any]], int, int]:
    """Stage 2's blocks (see :func:`confirm`): ``(rows, dropped, comparisons, images, blocks)``:
    each candidate's log rows per block, the self-trained candidates dropped (resolved worse than
    the leader) and the last comparisons with the leader, images sampled, blocks scored."""
    from neon_cli.metrics import combine_differences

    sign, m = ctx.sign, ctx.metric
    alive = list(range(len(cands)))
    rows: dict[int, list[dict[str, Any]]] = {i: [] for i in alive}
    dropped: dict[int, dict[str, Any]] = {}
    images, blocks = 0, 0
    budget = ctx.plan.max_images
    comparisons: dict[int, dict[str, Any]] = {}
    leader = 0
    while True:
        ev = ctx.evaluator_for(B, cseed + blocks * B)
        for i in alive:
            who, w, g = cands[i]
            phase = "confirm" if who != "base" else "confirm-base"
            rows[i].append(scorer.measure(who, w, g, ev, phase))
            images += B
        blocks += 1

        def mean(i: int) -> float:
            return sum(float(r["metrics"][m]) for r in rows[i]) / len(rows[i])

        leader = min(alive, key=lambda i: sign * mean(i))
        comparisons = {}
        for i in alive:
            if i == leader:
                continue
            k = len(rows[i])  # every alive candidate has every block so far
            per = [_pair(rows[i][j], rows[leader][j], m) for j in range(k)]
            comparisons[i] = {**combine_differences(per), "against": _label(ctx, cands[i])}
        for i, c in list(comparisons.items()):
            if cands[i][0] != "base" and c["resolved"]:
                alive.remove(i)
                dropped[i] = {**c, "after_blocks": blocks}
        unresolved = [i for i, c in comparisons.items() if not c["resolved"] and i in alive]
        nxt = len(alive) * B
        if not unresolved or budget is None or images + nxt > budget:
            break
    return rows, dropped, comparisons, images, blocks


def _summary(ctx: Context, cands: list[tuple[Any, float, float | None]], rows: Mapping[int, list[dict[str, Any]]],
             dropped: Mapping[int, Any], i: int) -> dict[str, Any]:
    """Candidate ``i`` over its stage-2 blocks: mean value, SE, bias-corrected mean, blocks, dropped."""
    from neon_cli.metrics import jackknife

    m = ctx.metric
    r = rows[i]
    vals = [float(x["metrics"][m]) for x in r]
    ses = [float(x["metrics"].get(f"{m}_se", float("nan"))) for x in r]
    bcs = [jackknife(float(x["metrics"][m]), x["jackknife"])["bias_corrected"] if x.get("jackknife") else float(x["metrics"][m])
           for x in r]
    who, w, g = cands[i]
    return {"model": "base" if who == "base" else "neon", "snapshot": None if who == "base" else str(ctx.snaps[who]),
            "w": w, "gamma": g, "value": sum(vals) / len(vals), "se": (sum(x * x for x in ses) ** 0.5) / len(ses),
            "bias_corrected": sum(bcs) / len(bcs), "blocks": len(r), "dropped": i in dropped}


def _mean_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Every metric's mean over the blocks (``*_se``: the SE of that mean, root of the summed squares / blocks)."""
    keys = rows[0]["metrics"].keys()
    out = {k: sum(float(x["metrics"][k]) for x in rows) / len(rows) for k in keys if not k.endswith("_se")}
    for k in keys:
        if k.endswith("_se"):
            out[k] = (sum(float(x["metrics"][k]) ** 2 for x in rows) ** 0.5) / len(rows)
    return out


def confirm(ctx: Context, scorer: Scorer, found: SnapshotSearch, results: dict[str, Any]) -> None:
    """Stage 2 (issue 23): re-score the search's best ``plan.keep`` candidates and the base (at its
    best gamma, or at the chosen gamma without a base gamma search, and at its default settings) on
    blocks of ``confirm_samples`` fresh seeds after the search's (block j: seeds ``seed +
    num_samples + j*B ..``), and choose on those.

    After each block, each candidate's value is its mean over the blocks it was scored on; the
    leader is the best mean; every other candidate is compared with it *paired* (same seeds: the
    mean of the per-block differences, each with its jackknife SE, :func:`neon_cli.metrics.combine_differences`)
    and "resolved" when the 95 % interval of the difference excludes 0. A self-trained candidate
    resolved worse is dropped; blocks are added until the leader is resolved against every
    candidate left (the runner-up and the bases) or the next block would pass ``plan.max_images``
    (None: one block). ``results["chosen"]`` becomes the leader when it is a merge; a base leader,
    or a leader not resolved against the strongest base, is "no improvement" (exit 5).
    """
    from neon_cli.metrics import Z95

    plan, sign, m = ctx.plan, ctx.sign, ctx.metric
    if not plan.confirm_samples:
        results["confirmation"] = None
        return
    B, cseed = plan.confirm_samples, plan.seed + plan.num_samples
    cands = _candidates(ctx, scorer, results)
    if plan.refit_width:
        cands, rows, comparisons, images, blocks, fit = _refit_blocks(ctx, scorer, cands, B, cseed)
        dropped: dict[int, dict[str, Any]] = {}
    else:
        rows, dropped, comparisons, images, blocks = _confirm_blocks(ctx, scorer, cands, B, cseed)
        fit = None
    comparisons.update(dropped)

    def summary(i: int) -> dict[str, Any]:
        return _summary(ctx, cands, rows, dropped, i)

    def mean_metrics(i: int) -> dict[str, float]:
        return _mean_metrics(rows[i])

    base_idx = [i for i, c in enumerate(cands) if c[0] == "base"]
    neon_idx = [i for i, c in enumerate(cands) if c[0] != "base"]
    strongest = min(base_idx, key=lambda i: sign * summary(i)["value"])
    live = [i for i in neon_idx if i not in dropped] or neon_idx  # all dropped: a base led, resolved
    best_neon = _stage2_choice(ctx, rows, fit, min(live, key=lambda i: sign * summary(i)["value"]))
    vs_base = _paired_over(ctx, rows, best_neon, strongest)
    runners = [i for i in neon_idx if i != best_neon]
    runner = min(runners, key=lambda i: sign * summary(i)["value"]) if runners else None
    vs_runner = _paired_over(ctx, rows, runner, best_neon) if runner is not None else (fit or {}).get("vs_best_probe")
    neon_wins = bool(sign * vs_base["diff"] < 0)
    best = results["baselines"].get("best")
    g_best = best["gamma"] if best else results["chosen"]["gamma"]
    by_gamma = {cands[i][2]: i for i in base_idx}
    who, w, g = cands[best_neon]
    ch = results["chosen"]
    if (who, _rkey(w), _rkey(g)) != (ch["snapshot"], _rkey(float(ch["w"])), _rkey(ch["gamma"])):  # stage 2 chose another
        row = scorer.measure(who, w, g, ctx.evaluator, "search")  # measured in the search: from memory
        results["search_choice"] = dict(results["chosen"])
        results["chosen"] = {"snapshot": who, "path": str(ctx.snaps[who]), "sha256": ctx.snap_shas[who], "w": w,
                             "gamma": g, "value": float(row["metrics"][m]), "metrics": row["metrics"]}
        results["gain"] = _gains(ctx, results["chosen"]["value"], results["baselines"])
    # "value"/"metrics": on the search seeds (comparable with "baselines"); stage 2's mean beside them
    results["chosen"].update(chosen_on="stage 2" , confirmed_value=summary(best_neon)["value"],
                             confirmed_se=summary(best_neon)["se"])
    results["confirmation"] = {
        "seed": cseed, "num_samples": B, "seeds": [cseed, cseed + blocks * B - 1], "blocks": blocks, "images": images,
        "max_images": plan.max_images, "keep": plan.keep, "z": Z95, "refit": fit,
        "candidates": [summary(i) for i in range(len(cands))],
        "comparisons": [{"candidate": _label(ctx, cands[i]), **c} for i, c in sorted(comparisons.items())],
        "vs_base": vs_base, "vs_runner_up": vs_runner,
        "resolved_vs_base": bool(vs_base["resolved"]) and neon_wins,
        "resolved_vs_runner_up": None if vs_runner is None else bool(vs_runner["resolved"]) and sign * vs_runner["diff"] > 0,
        "neon": mean_metrics(best_neon), "base": mean_metrics(by_gamma[g_best]),
        "base_default": mean_metrics(by_gamma[ctx.default_gamma]),
        "base_best": mean_metrics(by_gamma[best["gamma"]]) if best else None,
        "base_strongest": mean_metrics(strongest),
        "relative_improvement": _relative(ctx, summary(strongest)["value"], summary(best_neon)["value"]),
        "relative_improvement_vs_default": _relative(ctx, summary(by_gamma[ctx.default_gamma])["value"],
                                                     summary(best_neon)["value"]),
        "strongest_base_is_searched": best is not None,
        "contradicts": not neon_wins,
    }


def _refit_blocks(ctx: Context, scorer: Scorer, cands: list[tuple[Any, float, float | None]], B: int, cseed: int
                  ) -> tuple[list[tuple[Any, float, float | None]], dict[int, list[dict[str, Any]]], dict[int, dict[str, Any]],
                             int, int, dict[str, Any]]:
    """Stage 2 with the refit (:mod:`neon_cli.tune.refit`).

    Block j (seeds ``cseed + j*B ..``) scores probes around the centre (at first the search's choice):
    over w, ``c - W, c, c + W`` (W = ``--refit-width``); with ``--refit-gamma V`` and a gamma box, the
    six of :data:`~neon_cli.tune.refit.STAR6` in (w, s), s = ln gamma (or gamma). The first
    :data:`~neon_cli.tune.refit.REFIT_FULL_BLOCKS` blocks score every probe, the other kept candidates
    and the bases; later blocks half the probes (:func:`~neon_cli.tune.refit.block_probes`: a block's
    error is a tilt its probes share). After each block every probe so far is fitted with one offset
    and gradient per block and a shared curvature (:func:`~neon_cli.tune.refit.refit_points`,
    :func:`~neon_cli.tune.refit.refit_surface`). Over w the vertex (clipped at the centre +- 2 widths)
    is the next block's centre: probes left on one side of an asymmetric valley bend the parabola
    toward it (``benchmarks/tune_regret.py``, gaussian-ddpm G5: 9.4 % regret when only a clipped
    vertex moved them, 2.4 % following it). Over (w, s) only a clipped vertex moves them: along an
    elongated valley the vertex is poorly determined and probes that follow it wander (digits H3:
    9.4 % following, 0.75 % staying). Blocks are added until the vertex is inside that reach with an
    expected regret (:func:`~neon_cli.tune.refit.expected_regret`) <= ``--target-regret`` (after two
    blocks, unless the metric is exact), or the next block and the vertex's evaluations would pass
    ``--max-images`` (None: one block). The vertex, scored on the full blocks, is the first candidate
    unless a probe is resolved better than it (paired): then that probe (``fallback``). Returns
    ``(cands, rows, comparisons, images, blocks, refit JSON)``: the candidates (vertex, kept, bases),
    each one's rows per full block, each compared paired with the vertex.
    """
    from neon_cli.metrics import combine_differences
    from neon_cli.tune.refit import REFIT_FULL_BLOCKS, refit_points, refit_surface

    plan, m = ctx.plan, ctx.metric
    who, w1, g = cands[0]
    two = bool(plan.refit_gamma) and plan.gamma is not None and g is not None
    to_s, from_s = (math.log, math.exp) if plan.gamma_scale == "log" else (float, float)
    box = (plan.bounds, (to_s(plan.gamma[0]), to_s(plan.gamma[1]))) if two else None
    width = (plan.refit_width, plan.refit_gamma) if two else plan.refit_width
    rest = cands[1:]  # the search's other kept candidates and the bases: every block
    rows: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(rest))}
    points: list[tuple] = []
    probe_rows: dict[tuple[float, Any], dict[int, dict[str, Any]]] = {}
    center: Any = (w1, to_s(g)) if two else w1
    images, blocks, fit = 0, 0, None
    while True:
        ev = ctx.evaluator_for(B, cseed + blocks * B)
        extra = rest if blocks < REFIT_FULL_BLOCKS else []  # the bases and kept candidates: full blocks only
        grid = _stage2_grid(blocks, center, width, box, plan.bounds)  # later blocks: half the probes
        for w, sv in grid:
            gp = from_s(sv) if two else g
            row = scorer.measure(who, w, gp, ev, "confirm")
            probe_rows.setdefault((w, gp), {})[blocks] = row
            points.append((blocks, w, sv, float(row["metrics"][m]), row["jackknife"]) if two else
                          (blocks, w, float(row["metrics"][m]), row["jackknife"]))
        for i, (cw, ww, gg) in enumerate(extra):
            rows[i].append(scorer.measure(cw, ww, gg, ev, "confirm" if cw != "base" else "confirm-base"))
        images += (len(grid) + len(extra)) * B
        blocks += 1
        fit = (refit_surface(points, center=center, width=width, sign=ctx.sign, box=box) if two else
               refit_points(points, center=center, width=width, sign=ctx.sign, bounds=plan.bounds))
        # nan (no SE): never; an SE from one block's jackknife is itself noisy (10 groups), so a metric
        # with replicates needs two blocks before it may stop (an exact metric, SE 0, stops at once)
        tight = fit.expected_regret <= plan.target_regret and (blocks >= 2 or fit.expected_regret == 0)
        if fit.clipped or not two:  # see the docstring: over w every block follows the vertex; over (w, s) only
            center = fit.vertex    # a clipped one moves the probes
        nxt = (len(_stage2_grid(blocks, center, width, box, plan.bounds)) + (len(rest) if blocks < REFIT_FULL_BLOCKS else 0)
               + min(blocks + 1, REFIT_FULL_BLOCKS)) * B  # the next block, then the vertex on the full blocks
        if (fit.convex and not fit.clipped and tight) or plan.max_images is None or images + nxt > plan.max_images:
            break
    vw, vg, vrows, n, fallback, runner = _score_vertex(ctx, scorer, who, (fit.vertex[0], from_s(fit.vertex[1])) if two
                                                       else (fit.vertex, g), probe_rows, B, cseed,
                                                       min(blocks, REFIT_FULL_BLOCKS))
    images += n
    out = [(who, vw, vg)] + list(rest)
    all_rows = {0: vrows, **{i + 1: r for i, r in rows.items()}}
    comparisons = {i: {**combine_differences([_pair(all_rows[i][j], vrows[j], m) for j in range(len(vrows))]),
                       "against": _label(ctx, out[i])} for i in range(1, len(out))}
    doc = {**fit.as_json(), "vs_best_probe": runner,
           "fallback": None if fallback is None else {k: fallback[k] for k in ("w", "gamma", "diff", "se", "ci")},
           "width": plan.refit_width, "gamma_width": plan.refit_gamma if two else None,
           "space": ["w", "ln_gamma" if plan.gamma_scale == "log" else "gamma"] if two else ["w"],
           "chosen": {"w": vw, "gamma": vg}, "candidate": 0,
           "points": [{"block": p[0], "w": p[1], **({"gamma": from_s(p[2])} if two else {}), "value": p[-2]} for p in points]}
    return out, all_rows, comparisons, images, blocks, doc


def _stage2_grid(j: int, center: Any, width: Any, box: Any, bounds: tuple[float, float]) -> list[tuple[float, Any]]:
    """Stage-2 block ``j``'s probes as ``(w, s)`` (s None over w alone, ``box`` None):
    :func:`neon_cli.tune.refit.block_probes`."""
    from neon_cli.tune.refit import block_probes

    if box is not None:
        return list(block_probes(j, center, width, box=box))
    return [(w, None) for w in block_probes(j, center, width, bounds=bounds)]


def _score_vertex(ctx: Context, scorer: Scorer, who: Any, vertex: tuple[float, Any],
                  probe_rows: Mapping[tuple[float, Any], Mapping[int, dict[str, Any]]], B: int, cseed: int, blocks: int
                  ) -> tuple[float, Any, list[dict[str, Any]], int, dict[str, Any] | None, dict[str, Any] | None]:
    """The refit's vertex ``(w, gamma)`` scored on the first ``blocks`` stage-2 blocks (the full ones,
    where the bases were scored; a probe's blocks from memory); when a
    probe is resolved better than it (paired, 95 %: the quadratic misled, e.g. a valley far from a
    parabola or an extrapolated vertex), that probe instead. Returns ``(w, gamma, rows per block,
    images sampled, the fallback probe's comparison or None, the best probe's comparison with the
    choice (its runner-up))``."""
    def on_every_block(w: float, gg: Any) -> tuple[list[dict[str, Any]], int]:
        have = probe_rows.get((w, gg), {})
        got = [have[j] if j in have else scorer.measure(who, w, gg, ctx.evaluator_for(B, cseed + j * B), "confirm")
               for j in range(blocks)]
        return got, B * sum(j not in have for j in range(blocks))

    vw, vg = vertex
    vrows, images = on_every_block(vw, vg)
    fallback = _vs_best_probe(ctx, who, probe_rows, vrows)
    if fallback is None or not (fallback["resolved"] and ctx.sign * fallback["diff"] < 0):
        return vw, vg, vrows, images, None, fallback
    vrows, n = on_every_block(fallback["w"], fallback["gamma"])
    return (fallback["w"], fallback["gamma"], vrows, images + n, fallback,
            _vs_best_probe(ctx, who, probe_rows, vrows))


def _vs_best_probe(ctx: Context, who: Any, probe_rows: Mapping[tuple[float, Any], Mapping[int, dict[str, Any]]],
                   vrows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The refit's runner-up: the probe whose paired difference with the vertex (probe - vertex, over
    the blocks the probe was scored on) is the most in its favour; None when the vertex is a probe."""
    from neon_cli.metrics import combine_differences

    best = None
    for (w, g), by_block in probe_rows.items():
        if _rkey(w) == _rkey(float(vrows[0]["w"])) and _rkey(g) == _rkey(vrows[0]["gamma"]):
            continue
        common = [j for j in sorted(by_block) if j < len(vrows)]  # the vertex: on the full blocks only
        if not common:
            continue
        d = combine_differences([_pair(by_block[j], vrows[j], ctx.metric) for j in common])
        if best is None or ctx.sign * d["diff"] < ctx.sign * best["diff"]:
            best = {**d, "against": _label(ctx, (who, w, g)), "blocks": len(common), "w": w, "gamma": g}
    return best


def _stage2_choice(ctx: Context, rows: Mapping[int, list[dict[str, Any]]], fit: Mapping[str, Any] | None, leader: int) -> int:
    """The refit's vertex when the parabola is convex and the vertex is not resolved worse than the
    best-measured candidate (paired, 95 %); otherwise that candidate. The vertex pools all three
    probes (its error is the block's tilt alone), where picking the best-measured point adds the
    noise of a selection among close values."""
    if not fit or not fit["convex"]:
        return leader
    v = int(fit["candidate"])
    if v == leader:
        return v
    d = _paired_over(ctx, rows, v, leader)
    return leader if (d["resolved"] and ctx.sign * d["diff"] > 0) else v


def _paired_over(ctx: Context, rows: Mapping[int, list[dict[str, Any]]], a: int, b: int) -> dict[str, Any]:
    """``a - b`` (metric units; negative: a is better for a minimised metric) over the blocks both
    were scored on, paired per block (:func:`_pair`, :func:`neon_cli.metrics.combine_differences`)."""
    from neon_cli.metrics import combine_differences

    k = min(len(rows[a]), len(rows[b]))
    return combine_differences([_pair(rows[a][j], rows[b][j], ctx.metric) for j in range(k)])


def control(ctx: Context, scorer: Scorer, found: SnapshotSearch, results: dict[str, Any]) -> None:
    """``--control real``: theta_r fine-tuned on real data with the chosen snapshot's budget and
    recipe (:func:`neon_cli.tune.baseline.real_control`, in a temporary folder), measured like the
    base: at the default gamma, at its own best gamma, and on the confirmation seeds."""
    import tempfile

    from neon_cli.family import load_model
    from neon_cli.fsutil import sha256_path

    plan = ctx.plan

    def load(path: Any) -> tuple[str, Any]:
        return sha256_path(path), load_model(ctx.family, path, settings=ctx.settings, trust_pickle=ctx.trust_pickle)

    if plan.control == "real":
        recipe = snapshot_recipe(ctx.family, ctx.snaps[found.best], "--control real")
        n = plan.control_samples or int(recipe["num_synthetic"])
        with tempfile.TemporaryDirectory(prefix="neon-control-") as work:
            info = real_control(ctx.family_name, ctx.family, ctx.base, ctx.model, recipe, Path(work), n, ctx.progress)
            ctx.models["control"] = load(info.pop("path"))
    else:  # a checkpoint given as the control
        ctx.models["control"] = load(plan.control)
        info = {"path": str(plan.control), "sha256": ctx.models["control"][0]}
    measured = measure_baselines(ctx, scorer, who="control")
    out = {"kind": "real" if plan.control == "real" else "checkpoint", **info, **measured}
    if results.get("confirmation"):
        conf = results["confirmation"]
        pick = measured["best"] or measured["default"]
        cev = ctx.evaluator_for(plan.confirm_samples, conf["seed"])
        out["confirmation"] = scorer("control", 0.0, pick["gamma"], cev, "confirm-control")
    results["control"] = out


def verdict(ctx: Context, results: dict[str, Any]) -> None:
    """``improved``: with a confirmation, the candidate chosen on the fresh seeds is a merge whose
    paired difference from the strongest base there is resolved (its 95 % interval excludes 0) in
    Neon's favour; without one, the search's winner beats every base measured on the search seeds
    and its paired difference from the best of them is resolved. An improvement inside the noise
    is no improvement (exit 5). ``resolved``: what was decided, in words, for the report."""
    conf = results.get("confirmation")
    if conf:
        results["improved"] = bool(conf["resolved_vs_base"])
        where = f"on {conf['blocks']} block(s) of {conf['num_samples']} fresh seeds"
        d = conf["vs_base"]
    else:
        d = results["search_vs_base"]
        results["improved"] = bool(results["beats_base"] and d["resolved"])
        where = "on the search seeds (no confirmation: --confirm-samples 0)"
    results["resolution"] = {"where": where, "vs_base": d, "improved": results["improved"],
                             "inside_noise": bool(not d["resolved"])}


def _no_improvement_message(ctx: Context, results: Mapping[str, Any], output: Path | None, write_anyway: bool) -> str:
    m, ch, bb = ctx.metric, results["chosen"], results["best_base"]
    g = f", gamma = {ch['gamma']:.4g}" if ch.get("gamma") is not None else ""
    conf = results.get("confirmation")
    d = (conf or {}).get("vs_base") or results.get("search_vs_base") or {}
    if conf and not conf["contradicts"] and not conf["resolved_vs_base"] or (not conf and results["beats_base"] and not d.get("resolved", True)):
        what = (f"the improvement over the base is inside the noise: {m} difference {d['diff']:.4g} +- {d['se']:.2g} (SE), "
                f"95% interval [{d['ci'][0]:.4g}, {d['ci'][1]:.4g}] includes 0 "
                + (f"on {conf['blocks']} block(s) of {conf['num_samples']} fresh seeds (--max-images {conf['max_images']})"
                   if conf else "on the search seeds"))
    elif not results["beats_base"] and not conf:
        what = (f"no candidate beats the base: the best, w = {ch['w']:.4g}{g}, has {m} {ch['value']:.5g} against the "
                f"base's {bb['value']:.5g}" + (f" (gamma = {bb['gamma']:.4g})" if bb.get("gamma") is not None else "")
                + " on the search seeds")
    else:
        c = results["confirmation"]
        what = (f"the confirmation on {c['blocks']} block(s) of {c['num_samples']} fresh seeds contradicts the search: "
                f"no candidate beats the base there (neon {m} {c['neon'][m]:.5g}, base {c['base_strongest'][m]:.5g})")
    tail = f"; {output} written anyway (--write-anyway)" if output and write_anyway else \
        ("; no -o written (--write-anyway writes it)" if output else "")
    return what + tail


def _metadata(ctx: Context, results: Mapping[str, Any]) -> dict[str, str]:
    """The -o file's metadata: theta_r's own (minus an earlier merge's provenance), the merge
    provenance, what tune-w chose it by, and the settings to sample it with (``neon.settings``)."""
    import json

    from neon_cli.tune.recorded import SEARCHED_KEY, SETTINGS_KEY, recordable

    ch = results["chosen"]
    try:
        md = {str(k): str(v) for k, v in (ctx.family.read_metadata(str(ctx.base)) or {}).items()
              if not str(k).startswith("neon.")}
    except Exception:  # metadata is informative only
        md = {}
    settings = recordable(ctx.family, ctx.settings)
    if ctx.guidance and ch["gamma"] is not None:
        settings[ctx.guidance] = float(ch["gamma"])
        md[f"neon.{ctx.guidance}"] = repr(float(ch["gamma"]))
    plan = ctx.plan
    md.update({
        "neon.formula": "theta_r - w * (theta_s - theta_r)", "neon.w": repr(float(ch["w"])),
        "neon.base": ctx.base.name, "neon.base_sha256": ctx.base_sha,
        "neon.selftrained": Path(ch["path"]).name, "neon.selftrained_sha256": ch["sha256"],
        "neon.tune_metric": ctx.metric, "neon.tune_value": repr(float(ch["value"])),
        "neon.tune_seeds": f"{plan.seed}..{plan.seed + plan.num_samples - 1}",
        SETTINGS_KEY: json.dumps(settings, sort_keys=True),
        SEARCHED_KEY: json.dumps(["w"] + ([ctx.guidance] if plan.gamma and ctx.guidance else [])),
    })
    return md


def write_outputs(ctx: Context, scorer: Scorer, found: SnapshotSearch, results: dict[str, Any], output: Path | None,
                  plot: Path | None, write_anyway: bool) -> None:
    """``-o`` (the merged winner, when ``improved`` or ``write_anyway``; rank 0 writes) and ``--plot``
    (after ``plot_points`` evaluations along w at the chosen gamma: the Figure 4 panels)."""
    import copy

    from neon_cli.dist import barrier, is_main
    from neon_cli.fsutil import atomic_path

    results["written"] = False
    if output is not None and (results["improved"] or write_anyway):
        from neon_cli.merge import merge_state_dicts

        best_model = copy.deepcopy(ctx.model)
        best_model.load_state_dict(merge_state_dicts(ctx.base_sd, ctx.selftrained_sd(results["chosen"]["snapshot"]),
                                                     results["chosen"]["w"]))
        best_model.eval()
        md = _metadata(ctx, results)
        if is_main():  # every rank chose the same point (metrics are broadcast from rank 0); one writes
            with atomic_path(output) as tmp:
                ctx.family.save(best_model, str(tmp), md)
            ctx.report.add_output("merged", output)
        results["written"] = True
        barrier()
    if plot is not None:
        from neon_cli.tune.plot import plot_search

        lo, hi = ctx.plan.bounds
        n = ctx.plan.plot_points
        ch = results["chosen"]
        for k in range(n):  # every rank samples (collectives); rank 0 draws
            scorer(ch["snapshot"], lo + (hi - lo) * k / max(n - 1, 1), ch["gamma"], ctx.evaluator, "plot")
        results["evaluations"] = scorer.log
        if is_main():
            plot_search(plot, results)
            ctx.report.add_output("plot", plot)
