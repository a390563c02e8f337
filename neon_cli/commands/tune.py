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
        base: Optional[Path] = typer.Option(None, "--base", help="Base checkpoint theta_r (default: the family's embedded one)."),
        selftrained: Optional[List[str]] = typer.Option(
            None, "--selftrained", "-s",
            help="Self-trained checkpoint theta_s, or a quoted glob pattern such as 'ft/*.safetensors' (repeatable)."),
        bounds: Tuple[float, float] = typer.Option((0.0, 3.0), "--bounds", metavar="LO HI", help="Search interval of w (negative LO allowed)."),
        gamma: Optional[Tuple[float, float]] = typer.Option(
            None, "--gamma", metavar="LO HI", help="Also search the guidance scale gamma in [LO, HI] (6-point quadratic fit)."),
        xtol: float = typer.Option(0.05, "--xtol", help="Brent's absolute tolerance on w."),
        max_evals: Optional[int] = typer.Option(
            None, "--max-evals", help="Evaluation budget per snapshot (default: 12 for w; 7 per round + --refine for (w, gamma))."),
        rounds: int = typer.Option(1, "--rounds", help="Rounds of the (w, gamma) fit; each next round on a box half as large."),
        refine: int = typer.Option(
            2, "--refine", help="Trust-region steps after the last (w, gamma) round, 1 evaluation each: refit the 6 points "
                                "nearest the best, evaluate its minimum in a box half as large."),
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
        plot: Optional[Path] = typer.Option(None, "--plot", dir_okay=False, help="PNG of the metric vs w (needs matplotlib)."),
        detector: Optional[Path] = DetectorOpt,
        ref_stats: Optional[Path] = RefStatsOpt,
        trust_pickle: bool = TrustOpt,
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
    ) -> None:
        """Choose the merge weight w (and gamma) for theta_r - w (theta_s - theta_r) by the family's metric.

        Over w: Brent's method (scipy, bounded), about 6-10 evaluations.

        With --gamma: a quadratic surface fitted to 6 design points in the (w, ln gamma) box, one evaluation at its minimum (paper App. C), then --refine trust-region steps: 9 evaluations by default.

        Every candidate is scored on the same seeds (common random numbers); --cache makes reruns free and resumes an interrupted search.

        Several snapshots (--selftrained repeated, a quoted glob, or extra arguments) are each tuned; the best (snapshot, w, gamma) wins, hopeless snapshots are dropped early.

        Example:

        \b
            neon tune-w digits --selftrained runs/ft/theta_s-000200000.safetensors -o neon.safetensors --report tune.json
            neon tune-w digits --selftrained 'runs/ft/*.safetensors' --gamma 1 4 --cache tune.jsonl --confirm-samples 10000
        """
        items = list(selftrained or []) + list(extra or [])
        from neon_cli.tune import run_tune_w

        margin = None if abandon_margin == float("inf") else abandon_margin
        run(
            "tune-w",
            lambda report, progress: run_tune_w(
                family, base, items, bounds=tuple(bounds), gamma=tuple(gamma) if gamma else None, xtol=xtol,
                max_evals=max_evals, rounds=rounds, refine=refine, gamma_scale=gamma_scale, metric=metric,
                num_samples=num_samples, seed=seed,
                confirm_samples=confirm_samples, set_pairs=set_ or [], batch=batch, cache=cache, output=out, plot=plot,
                abandon_margin=margin, trust_pickle=trust_pickle, detector=detector, ref_stats=ref_stats,
                report=report, progress=progress),
            settings=dict(family=family, base=base, selftrained=items, bounds=list(bounds), gamma=list(gamma) if gamma else None,
                          xtol=xtol, max_evals=max_evals, rounds=rounds, refine=refine, gamma_scale=gamma_scale,
                          metric=metric, num_samples=num_samples, seed=seed,
                          confirm_samples=confirm_samples, set=set_ or [], batch=batch, abandon_margin=abandon_margin,
                          cache=cache, out=out, plot=plot, detector=detector, ref_stats=ref_stats,
                          trust_pickle=trust_pickle),
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
