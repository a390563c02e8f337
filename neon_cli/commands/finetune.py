"""``neon finetune``: theta_s from theta_r and S."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from neon_cli.commands._common import DryRunOpt, JsonOpt, QuietOpt, ReportOpt, SetOpt, TrustOpt, complete_family, complete_setting, run


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune(
        family: str = typer.Argument(..., help="Family name (see 'neon plugins').", autocompletion=complete_family),
        model: Optional[Path] = typer.Option(None, "--model", help="Base checkpoint theta_r (default: the family's embedded one)."),
        data: Path = typer.Option(..., "--data", "-d", help="Synthetic set directory made by 'neon synth'."),
        budget: int = typer.Option(..., "--budget", "-b", help="Fine-tuning budget B in images seen."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the family's recipe)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory for theta_s snapshots.", file_okay=False),
        warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear learning-rate warm-up, in images."),
        batch: Optional[int] = typer.Option(None, "--batch", help="Images per optimiser step (default: family recipe)."),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="Snapshot + training state every this many images."),
        ema_halflife: Optional[int] = typer.Option(
            None, "--ema-halflife", help="EMA half-life in images (default: family recipe; 0: no EMA)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the data order and training noise."),
        set_: Optional[List[str]] = typer.Option(
            None, "--set", metavar="KEY=VALUE", autocompletion=complete_setting,
            help="Setting of the family, inference or training recipe (repeatable); see 'neon plugins'."),
        trust_pickle: bool = TrustOpt,
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Briefly fine-tune theta_r on S with the family's recipe (paper Alg. 1, step 2).

        Writes theta_s-<images seen>.safetensors snapshots and a training state; rerunning the same command after an interruption (Ctrl-C, SIGTERM) resumes from the last state. A loss or weight that becomes inf/NaN stops the run (exit 2, naming the images seen and --lr) before anything of that step is written.

        Example:

        \b
            neon finetune digits --data runs/S --budget 200000 --lr 2e-4 --save-every 50000 -o runs/ft
        """
        from neon_cli.finetune import finetune as finetune_fn
        from neon_cli.plan import finetune_plan

        run(
            "finetune",
            lambda report, progress: finetune_fn(family, model, data, budget=budget, lr=lr, out_dir=out, batch=batch,
                                                 warmup=warmup, save_every=save_every, ema_halflife=ema_halflife,
                                                 seed=seed, set_pairs=set_ or [], trust_pickle=trust_pickle,
                                                 report=report, progress=progress),
            settings=dict(family=family, model=model, data=data, budget=budget, lr=lr, out=out, warmup=warmup, batch=batch,
                          save_every=save_every, ema_halflife=ema_halflife, seed=seed, set=set_ or [],
                          trust_pickle=trust_pickle),
            report=report, json_out=json_out, quiet=quiet, dry_run=dry_run,
            plan=lambda: finetune_plan(family=family, model=model, data=data, out=out, set_pairs=set_ or [], report=report),
            show=lambda r, c: c.print(f"theta_s: {r['final']} ({len(r['snapshots'])} snapshots)"),
        )
