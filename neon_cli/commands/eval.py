"""``neon eval``: metrics of one checkpoint, with regression thresholds for CI."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from neon_cli.commands._common import (DetectorOpt, DryRunOpt, JsonOpt, LabelsOpt, QuietOpt, RefStatsOpt, ReportOpt, SetOpt,
                                       TrustOpt, complete_family, run)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        family: str = typer.Argument(..., help="Family name (see 'neon plugins').", autocompletion=complete_family),
        model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint to score (default: the family's embedded one)."),
        set_: Optional[List[str]] = SetOpt,
        num_samples: int = typer.Option(2000, "--num-samples", "-n", help="Images sampled and scored."),
        seed: int = typer.Option(10_000_000, "--seed", help="First seed of the evaluation seed plan (default: disjoint from synth's default seeds 0, 1, ...)."),
        batch: int = typer.Option(1000, "--batch", help="Sampling batch size."),
        labels: str = LabelsOpt,
        max_fid: Optional[float] = typer.Option(None, "--max-fid", help="Exit 1 if fid (Inception FID) exceeds this; same as --max-metric fid=X. For digits, a deprecated alias of --max-metric fd_digits=X."),
        max_metric: Optional[List[str]] = typer.Option(
            None, "--max-metric", metavar="METRIC=X", help="Exit 1 if METRIC exceeds X (repeatable), e.g. --max-metric pixel_fid=0.1."),
        detector: Optional[Path] = DetectorOpt,
        ref_stats: Optional[Path] = RefStatsOpt,
        trust_pickle: bool = TrustOpt,
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Score a checkpoint with its family's metrics (FID, precision/recall k=5, ...).

        Exits 1 when a threshold is exceeded, so CI can gate on it. Each family's metric names, with a one-line definition and direction, are listed by 'neon plugins --json'.

        Example:

        \b
            neon eval digits --model neon.safetensors --num-samples 5000 --max-metric fd_digits=2.0 --json
        """
        from neon_cli.evaluate import evaluate
        from neon_cli.plan import eval_plan

        run(
            "eval",
            lambda report, progress: evaluate(family, model, set_pairs=set_ or [], num_samples=num_samples, seed=seed,
                                              batch=batch, max_fid=max_fid, max_metric=max_metric or [],
                                              trust_pickle=trust_pickle, detector=detector, ref_stats=ref_stats,
                                              labels=labels, report=report, progress=progress),
            settings=dict(family=family, model=model, set=set_ or [], num_samples=num_samples, seed=seed, batch=batch, labels=labels,
                          max_fid=max_fid, max_metric=max_metric or [], detector=detector, ref_stats=ref_stats,
                          trust_pickle=trust_pickle),
            report=report, json_out=json_out, quiet=quiet, dry_run=dry_run,
            plan=lambda: eval_plan(family=family, model=model, detector=detector, ref_stats=ref_stats, set_pairs=set_ or [],
                                   report=report),
            show=_show,
        )


def _show(metrics, console) -> None:
    from rich.table import Table

    t = Table("metric", "value")
    for k, v in metrics.items():
        t.add_row(k, f"{v:.5g}")
    console.print(t)
