"""``neon tune-w``: choose w (and gamma) over one or several self-trained snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from neon_cli.commands._common import (DetectorOpt, DryRunOpt, JsonOpt, LabelsOpt, QuietOpt, RefStatsOpt, ReportOpt, SetOpt,
                                       TrustOpt, complete_family, run)
from neon_cli.requests import TuneRequest


GammaOpt = typer.Option(
    None, "--gamma", metavar="LO HI",
    help="Also search the guidance scale gamma in [LO, HI]: w at the default gamma first, then a quadratic surface.")
BaseGammaOpt = typer.Option(
    None, "--base-gamma", metavar="LO HI",
    help="Search the base's own best gamma in [LO, HI] first (default: the --gamma box), same budget and seeds.")
TuneBaseOpt = typer.Option(
    True, "--tune-base/--no-tune-base", help="Measure Neon against the base at its own best gamma (needs --gamma or --base-gamma).")
JointOpt = typer.Option(
    "line", "--joint", autocompletion=lambda: ["line", "design"],
    help="(w, gamma) search: 'line' (w at the default gamma, then the surface around it) or 'design' (the 6-point "
         "pentagon design over the box).")
MaxEvalsOpt = typer.Option(
    None, "--max-evals",
    help="Evaluation budget per snapshot (default: 12 for w; for (w, gamma) 15 with --joint line, which stops at 9 "
         "once the fit says the optimum is resolved; 7 per round + --refine with --joint design).")
RoundsOpt = typer.Option(1, "--rounds", help="--joint design: rounds of the fit, each next on a box half as large.")
RefineOpt = typer.Option(
    2, "--refine", help="--joint design: trust-region steps after the last round, 1 evaluation each: refit the 6 "
                        "points nearest the best, evaluate its minimum in a box half as large.")
GammaScaleOpt = typer.Option(
    "auto", "--gamma-scale", autocompletion=lambda: ["auto", "log", "linear"],
    help="Fit in (w, ln gamma) ('log') or (w, gamma) ('linear'); 'auto': log when gamma > 0.")
SeedOpt = typer.Option(
    10_000_000, "--seed", help="First seed of the evaluation seed plan (default: disjoint from synth's default seeds 0, 1, ...).")
ConfirmOpt = typer.Option(
    None, "--confirm-samples", show_default="--num-samples",
    help="Stage 2: re-score the search's --keep best candidates and the base on blocks of this many fresh seeds, adding "
         "blocks until the winner is resolved (95% interval of the paired difference excludes 0) or --max-images is "
         "spent, and choose on those (0: no stage 2; the verdict is then taken on the search seeds).")
KeepOpt = typer.Option(1, "--keep", help="Candidates of the search re-scored in stage 2 (best first; the base is added; with the refit, the ones after the first).")
RefitOpt = typer.Option(
    0.2, "--refit-width",
    help="Stage 2: score w-W, w, w+W (w units) at the chosen gamma on blocks of fresh seeds (after the first two blocks "
         "w-W and w+W only) and choose the vertex of the parabola fitted to them (one offset and slope per block, one "
         "curvature; the next block's probes centred on it), until its expected regret <= --target-regret or --max-images "
         "is spent (0: no refit, re-score the --keep best instead).")
TargetRegretOpt = typer.Option(
    0.005, "--target-regret",
    help="Stage 2 stops adding blocks once the refit's expected regret, tr(H cov)/(2 f) from the fitted curvature H, "
         "the vertex's jackknife covariance and f the fitted minimum with the jackknife's bias correction (a fraction: "
         "0.005 = 0.5 % worse than the true optimum, on average), is this small (or --max-images is spent).")
RefitGammaOpt = typer.Option(
    0.1, "--refit-gamma",
    help="With --gamma: the refit also moves gamma: six probes around (w, s) with s = ln gamma (or gamma with --gamma-scale "
         "linear) this far apart in s, and the minimum of the fitted quadratic surface (0: w only; --refit-width 0: no refit).")
MaxImagesOpt = typer.Option(
    None, "--max-images", show_default="30 x --num-samples; 60 x with --gamma's surface refit",
    help="Most images stage 2 samples (whole blocks, the refit's vertex included; at least one block is scored).")
AbandonOpt = typer.Option(
    0.02, "--abandon-margin",
    help="Drop a snapshot whose best is this fraction worse than the best so far and whose quadratic prediction cannot "
         "beat it ('inf' never drops).")
CacheOpt = typer.Option(
    None, "--cache", dir_okay=False, help="JSON-lines evaluation cache: reruns reuse it, an interrupted search resumes.")
WriteAnywayOpt = typer.Option(
    False, "--write-anyway", help="Write -o even when no candidate beats the base (the exit code is still 5).")
PlotOpt = typer.Option(
    None, "--plot", dir_okay=False,
    help="PNG: the metric, precision and recall vs w at the chosen gamma (paper Fig. 4) and the search (needs matplotlib).")
ControlOpt = typer.Option(
    None, "--control", autocompletion=lambda: ["real"],
    help="'real': also fine-tune the base on the family's real data with the chosen snapshot's budget and recipe, and "
         "score it the same way (is it just more training?); or a checkpoint to score as the control.")
ControlSamplesOpt = typer.Option(
    None, "--control-samples", help="Real samples for --control real (default: |S| from the snapshot's finetune.json).")
SelftrainedOpt = typer.Option(
    None, "--selftrained", "-s",
    help="Self-trained checkpoint theta_s, or a quoted glob pattern such as 'ft/*.safetensors' (repeatable).")
ExtraArg = typer.Argument(
    None, metavar="SELFTRAINED", help="More self-trained checkpoints (what an unquoted shell glob after --selftrained expands to).")


def register(app: typer.Typer) -> None:
    @app.command("tune-w")
    def tune_w(
        family: str = typer.Argument(..., help="Family name (see 'neon plugins').", autocompletion=complete_family),
        extra: Optional[List[str]] = ExtraArg,
        base: Optional[Path] = typer.Option(None, "--base", help="Base checkpoint theta_r (default: the family's embedded one)."),
        selftrained: Optional[List[str]] = SelftrainedOpt,
        bounds: Tuple[float, float] = typer.Option((0.0, 3.0), "--bounds", metavar="LO HI", help="Search interval of w (negative LO allowed)."),
        gamma: Optional[Tuple[float, float]] = GammaOpt,
        base_gamma: Optional[Tuple[float, float]] = BaseGammaOpt,
        tune_base: bool = TuneBaseOpt,
        joint: str = JointOpt,
        xtol: float = typer.Option(0.05, "--xtol", help="Brent's absolute tolerance on w."),
        max_evals: Optional[int] = MaxEvalsOpt,
        rounds: int = RoundsOpt,
        refine: int = RefineOpt,
        gamma_scale: str = GammaScaleOpt,
        metric: Optional[str] = typer.Option(None, "--metric", help="Metric to optimise (default: the family's first: fd_digits for digits, fid for image families given a detector; see 'neon plugins --json')."),
        num_samples: int = typer.Option(2000, "--num-samples", "-n", help="Images per evaluation (the same seeds for every candidate)."),
        seed: int = SeedOpt,
        confirm_samples: Optional[int] = ConfirmOpt,
        keep: int = KeepOpt,
        refit_width: float = RefitOpt,
        refit_gamma: float = RefitGammaOpt,
        target_regret: float = TargetRegretOpt,
        max_images: Optional[int] = MaxImagesOpt,
        set_: Optional[List[str]] = SetOpt,
        batch: int = typer.Option(1000, "--batch", help="Sampling batch size (does not change the images)."),
        abandon_margin: float = AbandonOpt,
        cache: Optional[Path] = CacheOpt,
        out: Optional[Path] = typer.Option(None, "--out", "-o", dir_okay=False, help="Write the merged best checkpoint here."),
        write_anyway: bool = WriteAnywayOpt,
        plot: Optional[Path] = PlotOpt,
        plot_points: int = typer.Option(9, "--plot-points", help="Evaluations along w at the chosen gamma for --plot."),
        control: Optional[str] = ControlOpt,
        control_samples: Optional[int] = ControlSamplesOpt,
        detector: Optional[Path] = DetectorOpt,
        ref_stats: Optional[Path] = RefStatsOpt,
        labels: str = LabelsOpt,
        trust_pickle: bool = TrustOpt,
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Choose the merge weight w (and gamma) for theta_r - w (theta_s - theta_r) by the family's metric.

        Over w: Brent's method (scipy, bounded), about 6-10 evaluations.

        With --gamma: w at the default gamma first (so never worse than the w-only search), then a quadratic surface in (w, ln gamma) around it (paper App. C), refined until the fit says the optimum is resolved: 9 evaluations, up to 15 when it is not.

        The base is measured at its default settings and, with --gamma or --base-gamma, at its own best gamma (same search budget and seeds); gains are given against both, the headline against the best. Stage 2 (default on) re-scores the search's --keep best candidates and the base on blocks of fresh seeds, paired (the same seeds), until the winner is resolved (95% interval of the difference excludes 0) or --max-images is spent, and chooses on those; every value has a standard error (<metric>_se). When no candidate beats the base beyond the noise, no -o is written (unless --write-anyway) and the exit code is 5.

        Every candidate is scored on the same seeds (common random numbers); --cache makes reruns free and resumes an interrupted search. The chosen settings (gamma, ...) are recorded in -o's metadata, and eval / synth / demo sample with them.

        Several snapshots (--selftrained repeated, a quoted glob, or extra arguments) are each tuned; the best (snapshot, w, gamma) wins, hopeless snapshots are dropped early.

        A snapshot may be a LoRA on the base (theta_s = theta_r + s B A; diffusers, peft or kohya .safetensors): a family with the load_with_lora hook (diffusers, t2i) scores each w with the adapter re-scaled to -w, others merge theta_r + s B A; -o is theta_r - w s B A either way.

        Example:

        \b
            neon tune-w digits --selftrained runs/ft/theta_s-000200000.safetensors -o neon.safetensors --report tune.json
            neon tune-w digits --selftrained 'runs/ft/*.safetensors' --gamma 1 4 --cache tune.jsonl --confirm-samples 10000
            neon tune-w digits --selftrained runs/ft/theta_s-000031457.safetensors --gamma 1 4 --control real --plot tune.png
        """
        items = list(selftrained or []) + list(extra or [])
        from neon_cli.tune.run import default_max_images, tune_w as tune_fn

        confirm_samples = num_samples if confirm_samples is None else confirm_samples
        if max_images is None and isinstance(num_samples, int):
            max_images = default_max_images(num_samples, surface=bool(gamma) and refit_gamma > 0 and refit_width > 0)

        opts = dict(bounds=tuple(bounds), gamma=tuple(gamma) if gamma else None, base_gamma=tuple(base_gamma) if base_gamma else None,
                    tune_base=tune_base, joint=joint, xtol=xtol, max_evals=max_evals, rounds=rounds, refine=refine,
                    gamma_scale=gamma_scale, metric=metric, num_samples=num_samples, seed=seed, confirm_samples=confirm_samples, keep=keep, max_images=max_images, refit_width=refit_width, refit_gamma=refit_gamma,
                    target_regret=target_regret,
                    set_pairs=set_ or [], batch=batch, cache=cache, output=out, plot=plot, plot_points=plot_points,
                    control=control, control_samples=control_samples, write_anyway=write_anyway, trust_pickle=trust_pickle,
                    detector=detector, ref_stats=ref_stats, labels=labels)
        req = TuneRequest.from_flags(family, base, items, abandon_margin, report, **opts)
        run("tune-w", lambda report, progress: tune_fn(req, report=report, progress=progress), settings=req.settings(),
            report=report, json_out=json_out, quiet=quiet, show=_show, dry_run=dry_run, plan=req.plan)


def _f(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _show(results, console) -> None:
    """Final summary: one row per snapshot, the chosen point, the fit and the confirmation."""
    from rich.table import Table

    for msg in results.get("warnings") or []:
        console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)
    metric = results["metric"]
    t = Table(title=f"neon tune-w ({results['mode']}, {results['n_evals']} evaluations, {results['n_cached']} cached)")
    for col in ("snapshot", "evals", "w", "gamma", metric, "status"):
        t.add_column(col)
    chosen = results["chosen"]
    for s in results["snapshots"]:
        b = s["best"]
        status = "[bold green]chosen" if s["index"] == chosen["snapshot"] else ("abandoned" if s["abandoned"] else s["stopped"])
        t.add_row(Path(s["path"]).name, str(s["n_evals"]), _f(b["w"]), _f(b["gamma"]), _f(b["value"], 5), status)
    console.print(t)
    g = f", gamma = {chosen['gamma']:.4g}" if chosen.get("gamma") is not None else ""
    unc = (f" ± {chosen['se']:.2g}" if isinstance(chosen.get("se"), float) else "") + \
        (f" (bias-corrected {chosen['bias_corrected']:.4g})" if isinstance(chosen.get("bias_corrected"), float) else "")
    console.print(f"chosen: {Path(chosen['path']).name}, w = {chosen['w']:.4g}{g}: {metric} = {chosen['value']:.5g}{unc} "
                  f"on the search seeds ({results.get('num_samples')} per evaluation)")
    bl, gain = results.get("baselines") or {}, results.get("gain") or {}
    for key, what in (("default", "at its default settings"), ("best", "at its own best gamma")):
        b = bl.get(key)
        if b is not None:
            at = f" (gamma = {b['gamma']:.4g})" if b.get("gamma") is not None else ""
            rel = gain.get(f"vs_{key}")
            console.print(f"base {what}{at}: {metric} = {b['value']:.5g}"
                          + ("" if rel is None else f"; neon {100 * abs(rel):.1f}% {'better' if rel > 0 else 'WORSE'}"))
    if not results.get("beats_base", True):
        console.print("[bold red]the search found no candidate that beats the base model; -o not written unless --write-anyway")
    ctl = results.get("control")
    if ctl:
        b = ctl.get("best") or ctl["default"]
        console.print(f"control ({ctl['kind']}{', ' + str(ctl.get('budget')) + ' images' if ctl.get('budget') else ''}): "
                      f"{metric} = {b['value']:.5g} at gamma {_f(b['gamma'])}")
    win = next(s for s in results["snapshots"] if s["index"] == chosen["snapshot"])
    for r in win.get("rounds", []):
        if r.get("predicted") is not None:
            what = "refinement step" if r.get("kind") == "refine" else "round"
            console.print(f"{what} {r['round']} fit: optimum ({r['optimum']['kind']}) w = {r['optimum']['w']:.4g}, "
                          f"gamma = {r['optimum']['gamma']:.4g}; predicted {metric} {r['predicted']:.5g}, "
                          f"measured {_f(r['measured'], 5)}")
    conf = results.get("confirmation")
    if conf:
        ct = Table(title=f"stage 2: {conf['blocks']} block(s) of {conf['num_samples']} fresh seeds "
                         f"({conf['seeds'][0]}..{conf['seeds'][1]}), {conf['images']} images")
        for col in ("candidate", f"{metric} (mean)", "± SE", "bias-corrected", "blocks"):
            ct.add_column(col)
        for c in conf["candidates"]:
            name = "base" if c["model"] == "base" else f"{Path(c['snapshot']).name} w={_f(c['w'])}"
            name += f" gamma={_f(c['gamma'])}" if c.get("gamma") is not None else ""
            ct.add_row(name + (" (dropped)" if c["dropped"] else ""), _f(c["value"], 5), _f(c["se"], 2),
                       _f(c["bias_corrected"], 5), str(c["blocks"]))
        if (results.get("control") or {}).get("confirmation"):
            ct.add_row("control (first block)", _f(results["control"]["confirmation"][metric], 5), "", "", "1")
        console.print(ct)
        fit = conf.get("refit")
        er = f"; expected regret {100 * fit['expected_regret']:.2g}%" if fit and fit.get("expected_regret") is not None else ""
        if fit and fit.get("probes"):
            ch = fit["chosen"]
            console.print(f"refit over (w, gamma): vertex w = {_f(ch['w'])}, gamma = {_f(ch['gamma'])}"
                          + (" (clipped: the optimum may lie further out)" if fit["clipped"] else "")
                          + ("" if fit["convex"] else " (not convex: the best probe)") + er)
        elif fit:
            console.print(f"refit over w: probes {', '.join(_f(x) for x in fit['ws'])} -> "
                          + (f"vertex w = {_f(fit['vertex'])}" + (f" ± {fit['vertex_se']:.2g}" if fit.get("vertex_se") else "")
                             + (" (clipped: the optimum may lie further out)" if fit["clipped"] else "")
                             if fit["convex"] else "not convex: the best probe") + er)
        d = conf["vs_base"]
        what = "the best base (its own best gamma)" if conf.get("strongest_base_is_searched") else \
            "the base (no base gamma search: at the chosen and default gamma, not its best)"
        console.print(f"neon - base: {d['diff']:.4g} ± {d['se']:.2g} (95% [{d['ci'][0]:.4g}, {d['ci'][1]:.4g}]): "
                      + ("resolved" if conf["resolved_vs_base"] else "NOT resolved (inside the noise)")
                      + (f"; vs runner-up: {'resolved' if conf['resolved_vs_runner_up'] else 'not resolved'}"
                         if conf.get("resolved_vs_runner_up") is not None else ""))
        if conf.get("relative_improvement") is not None:
            console.print(f"relative improvement over {what}: {100 * conf['relative_improvement']:.1f}% "
                          f"(over the base at its default settings: {100 * conf['relative_improvement_vs_default']:.1f}%)")
    images = results.get("images")
    if images:
        console.print(f"images sampled: search {images['search']}, base {images['base']}, stage 2 {images['confirmation']}"
                      + (f", control {images['control']}" if images.get("control") else "") + f"; total {images['total']}")
