"""``neon align``: the first-order test of whether Neon (w > 0) or interpolation (w < 0) helps."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from neon_cli.commands._common import DryRunOpt, JsonOpt, QuietOpt, ReportOpt, SetOpt, TrustOpt, complete_family, run
from neon_cli.requests import AlignOptions, AlignRequest, SeedPlan, Trust


def register(app: typer.Typer) -> None:
    @app.command("align")
    def align(
        family: str = typer.Argument(..., help="Family name (see 'neon plugins').", autocompletion=complete_family),
        base: Optional[Path] = typer.Option(None, "--base", help="Base checkpoint theta_r (default: the family's embedded one)."),
        selftrained: Optional[Path] = typer.Option(
            None, "--selftrained", "-s", help="Self-trained checkpoint theta_s: gives dR/dw along the Neon line and its curvature."),
        synthetic: Optional[Path] = typer.Option(
            None, "--synthetic", help="Synthetic set S (a 'neon synth' directory): gives s = <r_d, P r_s>."),
        real: Optional[Path] = typer.Option(
            None, "--real", help="Held-out real samples in 'neon synth' format (default: the family's real_samples)."),
        num_real: int = typer.Option(10_000, "--num-real", help="Real samples drawn from the family's real_samples."),
        real_seed: int = typer.Option(0, "--real-seed", help="Seed of the family's real_samples."),
        precond: str = typer.Option("identity", "--precond", help="P for s: 'identity' or 'adam' (Adam's second moment of real gradients)."),
        batch: Optional[int] = typer.Option(None, "--batch", help="Samples per gradient batch (default: the family's training batch)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the loss noise (the same for every gradient pass)."),
        curvature_step: float = typer.Option(0.1, "--curvature-step", help="h of the central difference for d2R/dw2 (0: skip)."),
        set_: Optional[List[str]] = SetOpt,
        trust_pickle: bool = TrustOpt,
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Estimate the alignment s = <r_d, P r_s> of the real and synthetic gradients (paper Eq. 4, App. B.11).

        r_d is the gradient of the family's training loss on held-out real data at theta_r. With --selftrained, the displacement theta_r - theta_s stands for P r_s: dR/dw at w = 0 along theta_r - w (theta_s - theta_r) has the sign of s, and its curvature gives the quadratic-proxy optimum w. With --synthetic, r_s is the loss gradient on S and P is the identity or Adam's preconditioner.

        s < 0: "Neon (w > 0) expected to help"; s > 0: "interpolate (w < 0)".

        Example:

        \b
            neon align gaussian --base base.safetensors --selftrained ft/theta_s-000010000.safetensors
            neon align gaussian-ddpm --selftrained ft/theta_s-000050000.safetensors --synthetic S --precond adam --json
        """
        req = AlignRequest(family, base, selftrained, synthetic, real, SeedPlan(seed=real_seed, num=num_real),
                           AlignOptions(precond=precond, batch=batch, seed=seed, curvature_step=curvature_step),
                           tuple(set_ or ()), Trust(pickle=trust_pickle), report)

        def fn(report: Any, progress: Any) -> dict[str, Any]:
            from neon_cli.align import run_align

            return run_align(req, report=report, progress=progress)

        run("align", fn, settings=req.settings(), report=report, json_out=json_out, quiet=quiet, dry_run=dry_run,
            plan=req.plan, show=_show)


def _show(results, console) -> None:
    from neon_cli.align import summary_lines

    for line in summary_lines(results):
        console.print(line, highlight=False)
