"""``neon finetune``: theta_s from theta_r and S."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from neon_cli.commands._common import DryRunOpt, JsonOpt, QuietOpt, ReportOpt, SetOpt, TrustOpt, complete_family, complete_setting, run
from neon_cli.requests import FinetuneOptions, FinetuneRequest, Trust


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
        recipe: str = typer.Option(
            "default", "--recipe",
            help="Fine-tuning recipe: 'default' (the family's), 'paper' (the Neon paper's own scripts), or a named one "
                 "(see 'neon plugins FAMILY'); --lr/--batch/--warmup/--ema-halflife/--set override its values."),
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
        req = FinetuneRequest(family, model, data, out,
                              FinetuneOptions(budget, lr, batch, warmup, save_every, ema_halflife, seed, recipe),
                              tuple(set_ or ()), Trust(pickle=trust_pickle), report)

        def fn(report: Any, progress: Any) -> Any:
            from neon_cli.finetune import run_finetune

            return run_finetune(req, report=report, progress=progress)

        run("finetune", fn, settings=req.settings(), report=report, json_out=json_out, quiet=quiet, dry_run=dry_run,
            plan=req.plan, show=_show)


def _show(r: dict, console: object) -> None:
    for msg in r.get("warnings") or []:
        console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)
    console.print(f"theta_s: {r['final']} ({len(r['snapshots'])} snapshots, recipe {r.get('recipe', 'default')})")
