"""``neon synth``: sample the synthetic set S."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from neon_cli.commands._common import DryRunOpt, JsonOpt, LabelsOpt, QuietOpt, ReportOpt, SetOpt, TrustOpt, complete_family, run
from neon_cli.requests import SeedPlan, SynthRequest, Trust


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth(
        family: str = typer.Argument(..., help="Family name (see 'neon plugins').", autocompletion=complete_family),
        model: Optional[Path] = typer.Option(None, "--model", help="Base checkpoint theta_r (default: the family's embedded one)."),
        num: int = typer.Option(..., "--num-images", "-n", help="Number of synthetic images |S|."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (shards + manifest.json).", file_okay=False),
        seed: int = typer.Option(0, "--seed", help="First seed; image i uses seed+i."),
        set_: Optional[List[str]] = SetOpt,
        shard_size: int = typer.Option(1000, "--shard-size", help="Images per shard (the unit of resume)."),
        batch: int = typer.Option(500, "--batch", help="Sampling batch size."),
        labels: str = LabelsOpt,
        trust_pickle: bool = TrustOpt,
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Sample the synthetic set S from theta_r with its inference settings (paper Alg. 1, step 1).

        Image i depends only on its seed (seed+i) and label ((seed+i) % classes, or the --labels
        protocol's). Rerunning the same command after an interruption makes only the missing shards.

        Example:

        \b
            neon synth digits --num-images 4000 --set guidance=2 -o runs/S --report synth.json
        """
        req = SynthRequest(family, model, out, SeedPlan(seed=seed, num=num), tuple(set_ or ()), shard_size, batch, labels,
                           Trust(pickle=trust_pickle), report)

        def fn(report: Any, progress: Any) -> Any:
            from neon_cli.synth import run_synth

            return run_synth(req, report=report, progress=progress)

        run("synth", fn, settings=req.settings(), report=report, json_out=json_out, quiet=quiet, dry_run=dry_run, plan=req.plan,
            show=lambda r, c: c.print(f"synthetic set: {r['num']} images in {len(r['shards'])} shards -> {out}/manifest.json"))
