"""``neon demo``: Neon end to end on the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from neon_cli.commands._common import JsonOpt, QuietOpt, ReportOpt, complete_family, run


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("neon-demo"), "--out", "-o", help="Working directory (S, theta_s, neon.safetensors).", file_okay=False),
        family: str = typer.Option("digits", "--family", help="Family whose embedded default model to use.", autocompletion=complete_family),
        num_synthetic: int = typer.Option(4000, "--num-synthetic", help="|S|, synthetic images."),
        budget: Optional[int] = typer.Option(None, "--budget", help="Fine-tuning budget in images (default: --budget-fraction of the base's)."),
        budget_fraction: float = typer.Option(0.03, "--budget-fraction", help="Budget as a fraction of the base training budget."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Fine-tuning learning rate (default: the family's recipe)."),
        max_evals: int = typer.Option(10, "--max-evals", help="Brent evaluations of w."),
        num_samples: int = typer.Option(2000, "--num-samples", help="Images per search evaluation."),
        confirm_samples: int = typer.Option(5000, "--confirm-samples", help="Images for the final base-vs-Neon comparison (disjoint seeds)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the synthetic set and fine-tuning."),
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
    ) -> None:
        """Run the whole pipeline (synth -> finetune -> tune-w -> merge) on the embedded default.

        Prints base vs Neon metrics on a disjoint confirmation seed range, the chosen w, |S| and
        the self-training budget as a share of the base model's training budget. Rerunning
        reuses what a previous (even interrupted) run finished.

        Example:

        \b
            neon demo --report demo.json
        """
        from neon_cli.demo import demo as demo_fn

        run(
            "demo",
            lambda report, progress: demo_fn(family_name=family, out_dir=out, num_synthetic=num_synthetic, budget=budget,
                                             budget_fraction=budget_fraction, lr=lr, max_evals=max_evals,
                                             num_samples=num_samples, confirm_samples=confirm_samples, seed=seed,
                                             report=report, progress=progress),
            settings=dict(out=out, family=family, num_synthetic=num_synthetic, budget=budget, budget_fraction=budget_fraction,
                          lr=lr, max_evals=max_evals, num_samples=num_samples, confirm_samples=confirm_samples, seed=seed),
            report=report, json_out=json_out, quiet=quiet, show=_show,
        )


def _show(r, console) -> None:
    from rich.table import Table

    t = Table("metric", "base (w=0)", "Neon", title=f"Neon on the embedded default ({r['confirm_samples']} samples, disjoint seeds)")
    for k in ("fid", "pixel_fid", "precision", "recall", "density", "coverage", "class_accuracy"):
        if k in r["base"] and k in r["neon"]:
            t.add_row(k, f"{r['base'][k]:.4g}", f"{r['neon'][k]:.4g}")
    console.print(t)
    frac = r["budget_fraction"]
    console.print(
        f"w = {r['w']:.3f}   |S| = {r['num_synthetic']}   self-training budget = {r['budget_images']} images"
        + (f" = {100 * frac:.2f}% of the base's {r['base_train_images']}" if frac else "")
    )
    if r.get("improvement") is not None:
        imp = r["improvement"]
        word = "lower" if imp >= 0 else "HIGHER"
        console.print(f"FID {r['base_fid']:.4g} -> {r['neon_fid']:.4g}: {100 * abs(imp):.1f}% {word} with Neon")
    console.print(f"Neon model: {r['paths']['neon']}")
