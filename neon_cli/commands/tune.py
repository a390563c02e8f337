"""``neon tune-w``: choose w (and gamma) over one or several self-trained snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from neon_cli.commands._common import DetectorOpt, JsonOpt, QuietOpt, RefStatsOpt, ReportOpt, SetOpt, TrustOpt, complete_family, run


def register(app: typer.Typer) -> None:
    @app.command("tune-w")
    def tune_w(
        family: str = typer.Argument(..., help="Family name (see 'neon plugins').", autocompletion=complete_family),
        extra: Optional[List[str]] = typer.Argument(
            None, metavar="SELFTRAINED",
            help="More self-trained checkpoints (what an unquoted shell glob after --selftrained expands to)."),
        base: Optional[Path] = typer.Option(None, "--base", "-m", help="Base checkpoint theta_r (default: the family's embedded one)."),
        selftrained: Optional[List[str]] = typer.Option(
            None, "--selftrained", "-s",
            help="Self-trained checkpoint theta_s, or a quoted glob pattern such as 'ft/*.safetensors' (repeatable)."),
        bounds: Tuple[float, float] = typer.Option((0.0, 3.0), "--bounds", metavar="LO HI", help="Search interval of w (negative LO allowed)."),
        gamma: Optional[Tuple[float, float]] = typer.Option(
            None, "--gamma", metavar="LO HI",
            help="Also search the guidance scale gamma in [LO, HI]: w at the default gamma first, then a quadratic surface."),
        base_gamma: Optional[Tuple[float, float]] = typer.Option(
            None, "--base-gamma", metavar="LO HI",
            help="Search the base's own best gamma in [LO, HI] first (default: the --gamma box), same budget and seeds."),
        tune_base: bool = typer.Option(
            True, "--tune-base/--no-tune-base",
            help="Measure Neon against the base at its own best gamma (needs --gamma or --base-gamma)."),
        joint: str = typer.Option(
            "line", "--joint", help="(w, gamma) search: 'line' (w at the default gamma, then the surface around it) "
                                   "or 'design' (the 6-point pentagon design over the box).",
            autocompletion=lambda: ["line", "design"]),
        xtol: float = typer.Option(0.05, "--xtol", help="Brent's absolute tolerance on w."),
        max_evals: Optional[int] = typer.Option(
            None, "--max-evals",
            help="Evaluation budget per snapshot (default: 12 for w; for (w, gamma) 15 with --joint line, which stops at 9 "
                 "once the fit says the optimum is resolved; 7 per round + --refine with --joint design)."),
        rounds: int = typer.Option(1, "--rounds", help="--joint design: rounds of the fit, each next on a box half as large."),
        refine: int = typer.Option(
            2, "--refine", help="--joint design: trust-region steps after the last round, 1 evaluation each: refit the 6 "
                                "points nearest the best, evaluate its minimum in a box half as large."),
        gamma_scale: str = typer.Option(
            "auto", "--gamma-scale", help="Fit in (w, ln gamma) ('log') or (w, gamma) ('linear'); 'auto': log when gamma > 0.",
            autocompletion=lambda: ["auto", "log", "linear"]),
        metric: Optional[str] = typer.Option(None, "--metric", help="Metric to optimise (default: the family's first, e.g. fid)."),
        num_samples: int = typer.Option(2000, "--num-samples", "-n", help="Images per evaluation (the same seeds for every candidate)."),
        seed: int = typer.Option(10_000_000, "--seed", help="First seed of the evaluation seed plan (default: disjoint from synth's default seeds 0, 1, ...)."),
        confirm_samples: int = typer.Option(
            0, "--confirm-samples", help="Re-score the winner and the base (w = 0) on this many new, disjoint seeds."),
        set_: Optional[List[str]] = SetOpt,
        batch: int = typer.Option(1000, "--batch", help="Sampling batch size (does not change the images)."),
        abandon_margin: float = typer.Option(
            0.02, "--abandon-margin",
            help="Drop a snapshot whose best is this fraction worse than the best so far and whose quadratic "
                 "prediction cannot beat it ('inf' never drops)."),
        cache: Optional[Path] = typer.Option(
            None, "--cache", dir_okay=False, help="JSON-lines evaluation cache: reruns reuse it, an interrupted search resumes."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", dir_okay=False, help="Write the merged best checkpoint here."),
        write_anyway: bool = typer.Option(
            False, "--write-anyway", help="Write -o even when no candidate beats the base (the exit code is still 3)."),
        plot: Optional[Path] = typer.Option(
            None, "--plot", dir_okay=False,
            help="PNG: fid, precision and recall vs w at the chosen gamma (paper Fig. 4) and the search (needs matplotlib)."),
        plot_points: int = typer.Option(9, "--plot-points", help="Evaluations along w at the chosen gamma for --plot."),
        control: Optional[str] = typer.Option(
            None, "--control", help="'real': also fine-tune the base on the family's real data with the chosen snapshot's "
                                    "budget and recipe, and score it the same way (is it just more training?).",
            autocompletion=lambda: ["real"]),
        control_samples: Optional[int] = typer.Option(
            None, "--control-samples", help="Real samples for --control (default: |S| from the snapshot's finetune.json)."),
        detector: Optional[Path] = DetectorOpt,
        ref_stats: Optional[Path] = RefStatsOpt,
        trust_pickle: bool = TrustOpt,
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
    ) -> None:
        """Choose the merge weight w (and gamma) for theta_r - w (theta_s - theta_r) by the family's metric.

        Over w: Brent's method (scipy, bounded), about 6-10 evaluations.

        With --gamma: w at the default gamma first (so never worse than the w-only search), then a quadratic surface in (w, ln gamma) around it (paper App. C), refined until the fit says the optimum is resolved: 9 evaluations, up to 15 when it is not.

        The base is measured at its default settings and, with --gamma or --base-gamma, at its own best gamma (same search budget and seeds); gains are given against both, the headline against the best. When no candidate beats the base, no -o is written (unless --write-anyway) and the exit code is 3.

        Every candidate is scored on the same seeds (common random numbers); --cache makes reruns free and resumes an interrupted search. The chosen settings (gamma, ...) are recorded in -o's metadata, and eval / synth / demo sample with them.

        Several snapshots (--selftrained repeated, a quoted glob, or extra arguments) are each tuned; the best (snapshot, w, gamma) wins, hopeless snapshots are dropped early.

        Example:

        \b
            neon tune-w digits --selftrained runs/ft/theta_s-000200000.safetensors -o neon.safetensors --report tune.json
            neon tune-w digits --selftrained 'runs/ft/*.safetensors' --gamma 1 4 --cache tune.jsonl --confirm-samples 10000
            neon tune-w digits --selftrained runs/ft/theta_s-000031457.safetensors --gamma 1 4 --control real --plot tune.png
        """
        items = list(selftrained or []) + list(extra or [])
        from neon_cli.tune import run_tune_w

        margin = None if abandon_margin == float("inf") else abandon_margin
        report_file = report
        run(
            "tune-w",
            lambda report, progress: run_tune_w(
                family, base, items, bounds=tuple(bounds), gamma=tuple(gamma) if gamma else None,
                base_gamma=tuple(base_gamma) if base_gamma else None, tune_base=tune_base, joint=joint, xtol=xtol,
                max_evals=max_evals, rounds=rounds, refine=refine, gamma_scale=gamma_scale, metric=metric,
                num_samples=num_samples, seed=seed, confirm_samples=confirm_samples, set_pairs=set_ or [], batch=batch,
                cache=cache, output=out, plot=plot, plot_points=plot_points, abandon_margin=margin, control=control,
                control_samples=control_samples, write_anyway=write_anyway, trust_pickle=trust_pickle,
                detector=detector, ref_stats=ref_stats, report_path=report_file, report=report, progress=progress),
            settings=dict(family=family, base=base, selftrained=items, bounds=list(bounds), gamma=list(gamma) if gamma else None,
                          base_gamma=list(base_gamma) if base_gamma else None, tune_base=tune_base, joint=joint,
                          xtol=xtol, max_evals=max_evals, rounds=rounds, refine=refine, gamma_scale=gamma_scale,
                          metric=metric, num_samples=num_samples, seed=seed,
                          confirm_samples=confirm_samples, set=set_ or [], batch=batch, abandon_margin=abandon_margin,
                          cache=cache, out=out, plot=plot, plot_points=plot_points, control=control,
                          control_samples=control_samples, write_anyway=write_anyway, detector=detector,
                          ref_stats=ref_stats, trust_pickle=trust_pickle),
            report=report, json_out=json_out, quiet=quiet,
            show=_show,
        )


def _f(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _show(results, console) -> None:
    """Final summary: one row per snapshot, the chosen point, the fit and the confirmation."""
    from rich.table import Table

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
    console.print(f"chosen: {Path(chosen['path']).name}, w = {chosen['w']:.4g}{g}: {metric} = {chosen['value']:.5g}")
    if "base" in results:
        console.print(f"base (w = 0) on the same seeds: {metric} = {results['base']['value']:.5g}"
                      + ("" if results.get("beats_base") else "  [bold red]-- the search found no w that beats the base model"))
    win = next(s for s in results["snapshots"] if s["index"] == chosen["snapshot"])
    for r in win.get("rounds", []):
        if r.get("predicted") is not None:
            what = "refinement step" if r.get("kind") == "refine" else "round"
            console.print(f"{what} {r['round']} fit: optimum ({r['optimum']['kind']}) w = {r['optimum']['w']:.4g}, "
                          f"gamma = {r['optimum']['gamma']:.4g}; predicted {metric} {r['predicted']:.5g}, "
                          f"measured {_f(r['measured'], 5)}")
    conf = results.get("confirmation")
    if conf:
        ct = Table(title=f"confirmation on {conf['num_samples']} new seeds ({conf['seeds'][0]}..{conf['seeds'][1]})")
        ct.add_column("model")
        ct.add_column(metric)
        ct.add_row("base (w = 0)", _f(conf["base"][metric], 5))
        ct.add_row("neon", _f(conf["neon"][metric], 5))
        console.print(ct)
        if conf.get("relative_improvement") is not None:
            console.print(f"relative improvement: {100 * conf['relative_improvement']:.1f}%")
