"""``neon eval``: metrics of one checkpoint, with regression thresholds for CI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from neon_cli.commands._common import (DetectorOpt, DryRunOpt, JsonOpt, LabelsOpt, QuietOpt, RefStatsOpt, ReportOpt, SetOpt,
                                       TrustOpt, complete_family, run)
from neon_cli.requests import EvalGates, EvalRequest, Scoring, SeedPlan, Trust


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        family: str = typer.Argument(..., help="Family name (see 'neon plugins').", autocompletion=complete_family),
        model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint to score (default: the family's embedded one)."),
        set_: Optional[List[str]] = SetOpt,
        num_samples: int = typer.Option(2000, "--num-samples", "-n", help="Images sampled and scored."),
        seed: int = typer.Option(20_000_000, "--seed", help="First seed of the evaluation seed plan (default: disjoint from synth's default seeds 0, 1, ... and from every seed a default tune-w run samples, so a check after tuning uses fresh seeds)."),
        batch: int = typer.Option(1000, "--batch", help="Sampling batch size."),
        labels: str = LabelsOpt,
        max_fid: Optional[float] = typer.Option(None, "--max-fid", help="Exit 1 if fid (Inception FID) exceeds this; same as --max-metric fid=X. For digits, a deprecated alias of --max-metric fd_digits=X."),
        max_metric: Optional[List[str]] = typer.Option(
            None, "--max-metric", metavar="METRIC=X", help="Exit 1 if METRIC exceeds X (repeatable), e.g. --max-metric pixel_fid=0.1."),
        min_metric: Optional[List[str]] = typer.Option(
            None, "--min-metric", metavar="METRIC=X", help="Exit 1 if METRIC is below X (repeatable; for higher-is-better metrics), e.g. --min-metric precision=0.9."),
        gate_se: float = typer.Option(0.0, "--gate-se", metavar="K", help="Fail a threshold only when it is passed by more than K standard errors (0: on the value alone)."),
        detector: Optional[Path] = DetectorOpt,
        ref_stats: Optional[Path] = RefStatsOpt,
        trust_pickle: bool = TrustOpt,
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Score a checkpoint with its family's metrics (FID, precision/recall k=5, ...).

        Every metric comes with its standard error (<metric>_se: a class-balanced jackknife over 10 seed blocks). Exits 1 when a threshold is exceeded (every one passed is named), so CI can gate on it; --gate-se K fails only beyond K standard errors. Each family's metric names, with a one-line definition and direction, are listed by 'neon plugins --json'.

        Example:

        \b
            neon eval digits --model neon.safetensors --num-samples 5000 --max-metric fd_digits=2.0 --json
        """
        req = EvalRequest(family, model, SeedPlan(seed=seed, num=num_samples), tuple(set_ or ()), batch, labels,
                          EvalGates(max_fid, tuple(max_metric or ()), tuple(min_metric or ()), gate_se),
                          Scoring(detector, ref_stats), Trust(pickle=trust_pickle), report)

        def fn(report: Any, progress: Any) -> Any:
            from neon_cli.evaluate import evaluate

            return evaluate(req, report=report, progress=progress)

        run("eval", fn, settings=req.settings(), report=report, json_out=json_out, quiet=quiet, dry_run=dry_run, plan=req.plan,
            show=_show)


def _show(metrics, console) -> None:
    from rich.table import Table

    t = Table("metric", "value", "± SE")
    for k, v in metrics.items():
        if k.endswith("_se"):
            continue
        se = metrics.get(f"{k}_se")
        t.add_row(k, f"{v:.5g}", "" if se is None else f"{se:.2g}")
    console.print(t)
