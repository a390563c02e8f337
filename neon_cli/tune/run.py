"""``neon tune-w`` as a few named steps over the pure searches.

:func:`run_tune_w` = :func:`check_flags` -> :func:`prepare` -> (under the output locks)
:func:`measure_baselines` (the base at its default and, asked, at its own best gamma) ->
:func:`search` (every snapshot) -> :func:`summarize` -> :func:`confirm` (disjoint seeds) ->
:func:`control` (``--control real``) -> :func:`verdict` (does Neon beat the base?) ->
:func:`write_outputs` (``-o`` only when it does, ``--plot``) -> :class:`NoImprovement` when not.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from neon_cli.errors import NoImprovement, UsageError
from neon_cli.progress import ProgressFn, null_progress
from neon_cli.tune.baseline import measure_baselines, real_control, snapshot_recipe
from neon_cli.tune.brent import BrentResult
from neon_cli.tune.common import REFINE_DEFAULT, _rkey
from neon_cli.tune.plan import Plan, check_flags
from neon_cli.tune.quadratic import QuadraticResult
from neon_cli.tune.scorer import Context, Scorer
from neon_cli.tune.snapshots import SnapshotSearch, search_snapshots


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


def run_tune_w(
    family_name: str, base: Path | None, selftrained: Sequence[str | os.PathLike[str]], *,
    bounds: tuple[float, float] = (0.0, 3.0), gamma: tuple[float, float] | None = None,
    base_gamma: tuple[float, float] | None = None, tune_base: bool | None = None, joint: str = "line",
    line_gamma: float | None = None, xtol: float = 0.05, max_evals: int | None = None, rounds: int = 1,
    refine: int = REFINE_DEFAULT, gamma_scale: str = "auto", metric: str | None = None, num_samples: int = 2000,
    seed: int = 10_000_000, confirm_samples: int = 0, set_pairs: Sequence[str] = (), batch: int = 1000,
    cache: Path | None = None, output: Path | None = None, plot: Path | None = None, plot_points: int = 9,
    abandon_margin: float | None = 0.02, control: str | None = None, control_samples: int | None = None,
    write_anyway: bool = False, require_improvement: bool = True, trust_pickle: bool = False,
    detector: Path | None = None, ref_stats: Path | None = None, report_path: Path | None = None,
    labels: str | None = None, report: Any, progress: ProgressFn = null_progress,
) -> dict[str, Any]:
    """``neon tune-w``: the best (snapshot, w[, gamma]) for theta_Neon = theta_r - w (theta_s - theta_r).

    Each candidate is merged in memory (``neon_cli.merge.merge_state_dicts``, float32) and scored
    on one seed plan (seeds ``seed .. seed + num_samples - 1``: common random numbers). Over w
    alone: :func:`neon_cli.tune.brent_search`; with ``gamma``: over (w, gamma), ``joint="line"``
    (:func:`neon_cli.tune.joint.joint_search`: w at the default gamma first, so never worse than
    the w-only search; the default) or ``"design"`` (:func:`neon_cli.tune.quadratic_search`).

    Args:
        family_name, base, selftrained: the family; theta_r (None: the family's embedded default);
            theta_s checkpoints or glob patterns (natural order).
        bounds, gamma: the w interval; the gamma box (None: w only, at the settings' gamma).
        base_gamma, tune_base: the box of the base's own gamma search (default: ``gamma``);
            ``tune_base=False`` skips it (the base is then measured at its default settings only).
        joint, xtol, max_evals, rounds, refine, gamma_scale: search parameters (per snapshot).
        line_gamma: the gamma of the joint search's w line (default: the settings' gamma; ``neon
            demo`` passes the gamma S was synthesized at).
        metric: one of ``family.metrics`` (default the first); higher-is-better names are maximised.
        num_samples, seed, confirm_samples: the seed plans (confirmation on the next, disjoint seeds).
        set_pairs: ``--set KEY=VALUE``; on top of the settings recorded in ``base``'s metadata.
        batch: sampling batch size. cache: JSON-lines evaluation cache. output: merged best (only
            when it beats the base, or ``write_anyway``). plot, plot_points: PNG; evaluations along w
            at the chosen gamma for its FID / precision / recall panels.
        abandon_margin: early abandonment of snapshots (None: never).
        control, control_samples: ``"real"``: also fine-tune theta_r on real data (the family's
            ``real_samples``) with the chosen snapshot's budget and recipe, scored the same way;
            a path: score that checkpoint as the control (e.g. one ``neon demo`` trained).
        require_improvement: raise :class:`NoImprovement` (exit 5) when Neon does not beat the base.
        detector, ref_stats: Inception files (:func:`neon_cli.scoring.scoring_files`).
        report_path: the ``--report`` file, checked against the inputs like every output.
        labels: the class-label protocol of the seed plans (``--labels``, :mod:`neon_cli.labels`;
            None: ``balanced``), recorded in the report and in every cache key.
        report, progress: the :class:`neon_cli.report.Report` (results documented in README) and callback.

    Returns ``report.results``. Raises UsageError / FamilyError / CheckpointError for bad input
    (before any evaluation), NoImprovement after recording everything in the report.
    """
    from neon_cli.scoring import scoring_files

    plan = check_flags(bounds=bounds, gamma=gamma, base_gamma=_base_box(gamma, base_gamma, tune_base), xtol=xtol,
                       max_evals=max_evals, rounds=rounds, refine=refine, gamma_scale=gamma_scale, joint=joint,
                       num_samples=num_samples, seed=seed, confirm_samples=confirm_samples, batch=batch,
                       abandon_margin=abandon_margin, plot_points=plot_points, control=control,
                       control_samples=control_samples, labels=labels)
    report.results["labels"] = plan.labels
    outputs = {"-o": output, "--cache": cache, "--plot": plot, "--report": report_path}
    with scoring_files(detector, ref_stats) as scoring:
        report.results["scoring"] = scoring
        ctx = prepare(family_name, base, selftrained, plan, metric=metric, set_pairs=set_pairs, cache=cache,
                      outputs=outputs, extra_inputs={"--detector": detector, "--ref-stats": ref_stats,
                                                     "--control": _control_path(control)},
                      trust_pickle=trust_pickle, scoring=scoring, report=report, progress=progress)
        ctx.line_gamma = line_gamma
        with _locks(cache, output):
            results = _steps(ctx, output, plot, cache, write_anyway)
    if not results["improved"] and require_improvement:
        raise NoImprovement(_no_improvement_message(ctx, results, output, write_anyway))
    return results


def _control_path(control: str | None) -> Path | None:
    return None if control in (None, "real") else Path(control)


def tune_base_gamma(family_name: str, base: Path | None, gamma: tuple[float, float], *, max_evals: int | None = None,
                    joint: str = "line", num_samples: int = 2000, seed: int = 10_000_000, set_pairs: Sequence[str] = (),
                    batch: int = 1000, metric: str | None = None, cache: Path | None = None, trust_pickle: bool = False,
                    detector: Path | None = None, ref_stats: Path | None = None, labels: str | None = None,
                    report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """The base alone at its default settings and at its own best gamma in ``gamma``
    (:func:`neon_cli.tune.baseline.measure_baselines`), with the same plan, keys and cache as
    :func:`run_tune_w` given the same arguments (so a later tune-w run finds these evaluations in
    the cache). ``max_evals`` defaults to the per-snapshot budget of a (w, gamma) search with
    ``joint``. Returns (and puts in ``report.results``) ``{"default": ..., "best": ...}``."""
    from neon_cli.scoring import scoring_files

    plan = check_flags(bounds=(0.0, 1.0), gamma=gamma, base_gamma=gamma, xtol=0.05, max_evals=max_evals, rounds=1,
                       refine=REFINE_DEFAULT, gamma_scale="auto", joint=joint, num_samples=num_samples, seed=seed,
                       confirm_samples=0, batch=batch, abandon_margin=None, plot_points=0, control=None,
                       control_samples=None, labels=labels)
    with scoring_files(detector, ref_stats) as scoring:
        ctx = prepare(family_name, base, None, plan, metric=metric, set_pairs=set_pairs, cache=cache,
                      outputs={"--cache": cache}, extra_inputs={"--detector": detector, "--ref-stats": ref_stats},
                      trust_pickle=trust_pickle, scoring=scoring, report=report, progress=progress)
        with _locks(cache, None):
            baselines = measure_baselines(ctx, Scorer(ctx, total=plan.per_snapshot + 1))
    report.results.update(baselines=baselines, metric=ctx.metric, num_samples=num_samples, seed=seed, scoring=scoring,
                          labels=plan.labels)
    return baselines


def _base_box(gamma: Any, base_gamma: Any, tune_base: bool | None) -> Any:
    if tune_base is False:
        return None
    return base_gamma if base_gamma is not None else gamma


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
    scorer = Scorer(ctx, total=plan.per_snapshot * (len(ctx.snaps) + n_models) + (3 if plan.confirm_samples else 0))
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
    results.update(evaluations=log, n_evals=len(log), n_cached=sum(r["cached"] for r in log),
                   eval_seconds=round(sum(r["seconds"] for r in log if not r["cached"]), 3),
                   cache={"path": str(cache), "records": len(ctx.store), "skipped_lines": ctx.store.skipped_lines}
                   if cache else None)
    ctx.progress("tune-w", len(log), len(log))
    return results


def prepare(family_name: str, base: Path | None, selftrained: Sequence[Any] | None, plan: Plan, *, metric: str | None,
            set_pairs: Sequence[str], cache: Path | None, outputs: Mapping[str, Any], extra_inputs: Mapping[str, Any],
            trust_pickle: bool, scoring: Mapping[str, Any], report: Any, progress: ProgressFn) -> Context:
    """Resolve the family, paths, settings and metric, check outputs against inputs, load theta_r.
    ``selftrained`` None: the base alone (:func:`tune_base_gamma`)."""
    from neon_cli.dist import is_main
    from neon_cli.evaluate import classes_of
    from neon_cli.family import get_family, load_model, model_path, plugin_version, resolve_metric
    from neon_cli.fsutil import check_outputs
    from neon_cli.scoring import check_family_scoring
    from neon_cli.tune.cache import EvalCache, static_key
    from neon_cli.tune.recorded import apply_recorded

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

    found = search_snapshots(objective, len(ctx.snaps), bounds=plan.bounds, gamma_bounds=plan.gamma, xtol=plan.xtol,
                             max_evals=plan.max_evals, rounds=plan.rounds, refine=plan.refine,
                             gamma_scale=plan.gamma_scale, abandon_margin=plan.abandon_margin, joint=plan.joint,
                             gamma0=ctx.line_gamma if ctx.line_gamma is not None else ctx.default_gamma)
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
    results["best_base"] = {"gamma": best_base["gamma"], "value": best_base["value"]}
    results["beats_base"] = ctx.better(results["chosen"]["value"], best_base["value"])
    results["gain"] = _gains(ctx, results["chosen"]["value"], results["baselines"])


def _relative(ctx: Context, base_value: float, neon_value: float) -> float | None:
    return ctx.sign * (base_value - neon_value) / abs(base_value) if base_value else None


def _gains(ctx: Context, neon_value: float, baselines: Mapping[str, Any]) -> dict[str, Any]:
    """Relative gains of ``neon_value`` over the base at default and at its best settings."""
    best = baselines.get("best")
    return {"vs_default": _relative(ctx, baselines["default"]["value"], neon_value),
            "vs_best": _relative(ctx, best["value"], neon_value) if best else None}


def confirm(ctx: Context, scorer: Scorer, found: SnapshotSearch, results: dict[str, Any]) -> None:
    """Re-score the winner and the base (at its default and at its best gamma, or without a base
    gamma search at the chosen gamma) on ``confirm_samples`` new seeds; ``relative_improvement``
    is against the better of those bases (``base_strongest``)."""
    plan = ctx.plan
    if not plan.confirm_samples:
        results["confirmation"] = None
        return
    cseed = plan.seed + plan.num_samples
    cev = ctx.evaluator_for(plan.confirm_samples, cseed)
    ch = results["chosen"]
    neon_m = scorer(found.best, ch["w"], ch["gamma"], cev, "confirm")
    best = results["baselines"].get("best")
    gammas = list(dict.fromkeys([best["gamma"] if best else ch["gamma"], ctx.default_gamma]))
    base_m = {g: scorer("base", 0.0, g, cev, "confirm-base") for g in gammas}
    strongest = min(base_m.values(), key=lambda m: ctx.sign * m[ctx.metric])
    m = ctx.metric
    results["confirmation"] = {
        "seed": cseed, "num_samples": plan.confirm_samples, "seeds": [cseed, cseed + plan.confirm_samples - 1],
        "neon": neon_m, "base": base_m[gammas[0]], "base_default": base_m[ctx.default_gamma],
        "base_best": base_m[best["gamma"]] if best else None, "base_strongest": strongest,
        "relative_improvement": _relative(ctx, strongest[m], neon_m[m]),
        "relative_improvement_vs_default": _relative(ctx, base_m[ctx.default_gamma][m], neon_m[m]),
        "contradicts": not ctx.better(neon_m[m], strongest[m]),
    }


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
    """``improved``: Neon beats every base measured on the search seeds and the confirmation (if
    any) agrees."""
    conf = results.get("confirmation")
    results["improved"] = bool(results["beats_base"] and not (conf and conf["contradicts"]))


def _no_improvement_message(ctx: Context, results: Mapping[str, Any], output: Path | None, write_anyway: bool) -> str:
    m, ch, bb = ctx.metric, results["chosen"], results["best_base"]
    g = f", gamma = {ch['gamma']:.4g}" if ch.get("gamma") is not None else ""
    if not results["beats_base"]:
        what = (f"no candidate beats the base: the best, w = {ch['w']:.4g}{g}, has {m} {ch['value']:.5g} against the "
                f"base's {bb['value']:.5g}" + (f" (gamma = {bb['gamma']:.4g})" if bb.get("gamma") is not None else "")
                + " on the search seeds")
    else:
        c = results["confirmation"]
        what = (f"the confirmation on {c['num_samples']} new seeds contradicts the search: neon {m} "
                f"{c['neon'][m]:.5g}, base {c['base_strongest'][m]:.5g}")
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
        best_model.load_state_dict(merge_state_dicts(ctx.base_sd, ctx.selftrained_sd(found.best), results["chosen"]["w"]))
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
            scorer(found.best, lo + (hi - lo) * k / max(n - 1, 1), ch["gamma"], ctx.evaluator, "plot")
        results["evaluations"] = scorer.log
        if is_main():
            plot_search(plot, results)
            ctx.report.add_output("plot", plot)
