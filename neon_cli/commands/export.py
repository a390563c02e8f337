"""``neon export``: a synthetic set in another tool's dataset layout (EDM's dataset_tool.py zip)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from neon_cli.commands._common import DryRunOpt, JsonOpt, QuietOpt, ReportOpt, run
from neon_cli.requests import ExportRequest


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_(
        data: Path = typer.Argument(..., help="Synthetic set directory made by 'neon synth'.", file_okay=False),
        fmt: str = typer.Option("edm-zip", "--format", "-f", help="Layout: edm-zip (EDM/StyleGAN dataset_tool.py: PNGs + dataset.json) or imagefolder (PNGs + metadata.jsonl with prompts, and kohya .txt captions)."),
        out: Path = typer.Option(..., "--out", "-o", help="File to write (.zip), or the folder (imagefolder; must not exist).", dir_okay=False),
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Write a synthetic set S for another trainer: edm-zip is the uncompressed zip of PNGs plus
        dataset.json (class labels) that EDM's train.py --data reads.

        Image i (seed+i) becomes 00000/img0000000i.png as dataset_tool.py names it; labels are
        neon's, so a class-conditional set needs no separate labelling step.

        Example:

        \b
            neon synth edm --model edm-cifar10-32x32-cond-vp.pkl -n 6000 --trust-pickle -o S
            neon export S --format edm-zip -o S.zip
            torchrun --nproc_per_node=8 train.py --data S.zip --cond=1 --transfer edm-cifar10-32x32-cond-vp.pkl ...
            neon export S_sd --format imagefolder -o S_sd_folder   # t2i: train_text_to_image.py --train_data_dir S_sd_folder
        """
        req = ExportRequest(data, out, fmt, report)

        def fn(report: Any, progress: Any) -> dict[str, Any]:
            from neon_cli.export import export

            return export(req, report=report, progress=progress)

        run("export", fn, settings=req.settings(), report=report, json_out=json_out, quiet=quiet, dry_run=dry_run,
            plan=req.plan, show=lambda r, c: c.print(f"wrote {r['path']}: {r['num_images']} images ({r['format']}, "
                                                     f"{'with' if r['labels'] else 'no'} labels)"))
