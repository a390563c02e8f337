"""``neon demo``: Neon end to end on the embedded default, by the paper's protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Tuple

import typer

from neon_cli.commands._common import DryRunOpt, JsonOpt, QuietOpt, ReportOpt, complete_family, run
from neon_cli.requests import DemoRequest


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("neon-demo"), "--out", "-o", help="Working directory (S, theta_s, neon.safetensors).", file_okay=False),
        family: str = typer.Option("digits", "--family", help="Family whose embedded default model to use.", autocompletion=complete_family),
        base: Optional[Path] = typer.Option(
            None, "--base", help="Base checkpoint theta_r (default: the family's embedded one; settings recorded in it apply)."),
        num_synthetic: int = typer.Option(4000, "--num-synthetic", help="|S|, synthetic images."),
        budget: Optional[int] = typer.Option(None, "--budget", help="Fine-tuning budget in images (default: --budget-fraction of the base's)."),
        budget_fraction: float = typer.Option(0.03, "--budget-fraction", help="Budget as a fraction of the base training budget."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Fine-tuning learning rate (default: the family's recipe)."),
        gamma: Tuple[float, float] = typer.Option(
            (1.0, 4.0), "--gamma", metavar="LO HI", help="Guidance box searched for the base, the control and Neon."),
        control: bool = typer.Option(
            True, "--control/--no-control", help="Also fine-tune the base on real data with the same budget and recipe."),
        num_samples: int = typer.Option(2000, "--num-samples", help="Images per search evaluation."),
        max_evals: Optional[int] = typer.Option(
            None, "--max-evals", help="Evaluations per search (default: each search's own; at least 7)."),
        confirm_samples: int = typer.Option(5000, "--confirm-samples", help="Images for the final comparison (disjoint seeds)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the synthetic set and fine-tuning."),
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Run Neon end to end on the embedded default, by the paper's protocol.

        Finds the base's best gamma by the family's first metric (digits: fd_digits), synthesizes S
        there, fine-tunes (theta_s), fine-tunes the base on real data with the same budget (the
        "more training" control), searches (w, gamma) jointly, merges, and prints the base at its default gamma, the base at its best gamma, the
        control and Neon on a disjoint confirmation seed range. The headline gain is against the
        base at its best. Rerunning reuses what a previous (even interrupted) run finished.

        Example:

        \b
            neon demo --report demo.json
        """
        req = DemoRequest(family, base, out, num_synthetic, budget, budget_fraction, lr, gamma=tuple(gamma),
                          max_evals=max_evals, num_samples=num_samples, confirm_samples=confirm_samples, control=control,
                          seed=seed, report=report)

        def fn(report: Any, progress: Any) -> dict[str, Any]:
            from neon_cli.demo import demo as demo_fn

            return demo_fn(req, report=report, progress=progress)

        run("demo", fn, settings=req.settings(), report=report, json_out=json_out, quiet=quiet, show=_show, dry_run=dry_run,
            plan=req.plan)


def _g(v) -> str:
    return "" if v is None else f" {v:.3g}"


def _show(r, console) -> None:
    from rich.table import Table

    cols = [("base_default", f"base, default γ{_g(r['gamma_default'])}"), ("base_best", f"base, its best γ{_g(r['gamma_base_best'])}")]
    if r.get("control"):
        cols.append(("control", f"real-data control, γ{_g(r['gamma_control'])}"))
    cols.append(("neon", f"Neon w {r['w']:.3g}, γ{_g(r['gamma'])}"))
    from rich.table import Column

    names = [k for k in r["neon"] if k != "seconds" and not k.endswith("_se")
             and all(k in (r[c[0]] or {}) for c in cols)]  # the family's order
    metric = Column("metric", no_wrap=True, min_width=max([len("metric"), *map(len, names)]))  # never "class_accura…"
    t = Table(metric, *[c[1] for c in cols], title=f"Neon on the embedded default ({r['confirm_samples']} samples, disjoint seeds)")
    for k in names:
        t.add_row(k, *[f"{r[c[0]][k]:.4g}" for c in cols])
    console.print(t)
    frac = r["budget_fraction"]
    console.print(
        f"|S| = {r['num_synthetic']} at γ{_g(r['gamma_S'])}   self-training budget = {r['budget_images']} images"
        + (f" = {100 * frac:.2f}% of the base's {r['base_train_images']}" if frac else "")
    )
    m = r["metric"]

    def gain(key: str, against: str) -> str:
        v = r.get(key)
        return "" if v is None else f"{100 * abs(v):.1f}% {'lower' if v >= 0 else 'HIGHER'} than {against}"

    def pm(row: str) -> str:
        se = (r.get(row) or {}).get(f"{m}_se")
        return "" if se is None else f" ± {se:.2g}"

    console.print(f"Neon {m} {r['neon'][m]:.4g}{pm('neon')}: {gain('gain_vs_best', 'the base at its best γ')} "
                  f"({r['base_best'][m]:.4g}{pm('base_best')}; the headline), {gain('gain_vs_default', 'the base at its default γ')} "
                  f"({r['base_default'][m]:.4g})")
    d = r.get("vs_base")
    if d:
        console.print(f"paired on the same seeds: Neon - base at its best γ = {d['diff']:.3g} ± {d['se']:.2g} (SE), 95% "
                      f"[{d['ci'][0]:.3g}, {d['ci'][1]:.3g}]: " + ("resolved" if r.get("resolved") else "NOT resolved (inside the noise)"))
    if r.get("control"):
        console.print(f"the same budget on {r['num_real']} real images: {m} {r['control'][m]:.4g} "
                      f"({gain('gain_control_vs_best', 'the base at its best γ')})")
    if not r.get("improved"):
        console.print("[bold red]Neon did not beat the base at its best settings beyond the noise (search seeds or confirmation)")
    console.print(f"Neon model: {r['paths']['neon']}")
