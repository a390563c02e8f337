"""``neon ref-stats``: Inception reference statistics (mu, sigma) of a set of images, EDM-style .npz."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from neon_cli.commands._common import DetectorTrustOpt, DryRunOpt, JsonOpt, QuietOpt, ReportOpt, run
from neon_cli.requests import RefStatsRequest, Scoring, Trust


def register(app: typer.Typer) -> None:
    @app.command("ref-stats")
    def ref_stats_(
        images: Path = typer.Option(
            ..., "--images", "-i",
            help="Images: a folder of image files (PNG/JPEG, read with Pillow, which must be installed), "
                 "a 'neon synth' directory, or a .npy/.npz uint8 array [N,H,W,C], [N,C,H,W] or [N,H,W] "
                 "(.npz member arr_0 as in ADM batches).",
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Statistics file to write (.npz with mu, sigma).", dir_okay=False),
        detector: Optional[str] = typer.Option(
            None, "--detector", envvar="NEON_INCEPTION", show_envvar=True,
            help="TorchScript inception-2015-12-05.pt (the EDM/StyleGAN/clean-fid detector), or the .pkl EDM loads (see --trust-pickle); never downloaded.",
        ),
        batch: int = typer.Option(64, "--batch", help="Images per detector call."),
        device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu)."),
        keep_features: bool = typer.Option(False, "--keep-features", help="Also store the features [N, 2048] (float32) for precision/recall."),
        pixels: bool = typer.Option(False, "--pixels", help="Statistics of the raw pixels (C*H*W values in [0, 1]) instead of Inception features: the reference of pixel_fid; no detector. Refused when the (C*H*W)^2 float64 covariance would not fit in memory."),
        trust_pickle: bool = DetectorTrustOpt,
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Compute FID reference statistics (mu, sigma of 2048-d Inception pool features) of a set of images.

        The .npz has the keys of EDM's fid.py ref (mu, sigma), also read by pytorch-fid, clean-fid and the torch-fidelity fork. Features are extracted in batches, split across ranks under torchrun. The report records the sha256 of the detector and of the statistics: FIDs are comparable only with the same detector and reference.

        Example:

        \b
            export NEON_INCEPTION=~/models/inception-2015-12-05.pt
            neon ref-stats --images cifar10.npz -o cifar10-32x32.npz
            neon ref-stats --images synth/ -o s.npz --keep-features
            neon ref-stats --images cifar10.npz -o cifar10-pixels.npz --pixels
        """
        req = RefStatsRequest(images, out, Scoring(detector=detector), batch, device, keep_features, pixels,
                              Trust(pickle=trust_pickle), report)

        def fn(report: Any, progress: Any) -> Any:
            from neon_cli.inception import ref_stats

            return ref_stats(req, report=report, progress=progress)

        run("ref-stats", fn, settings=req.settings(), report=report, json_out=json_out, quiet=quiet, dry_run=dry_run,
            plan=req.plan, show=_show)


def _show(results, console) -> None:
    if results.get("kind") == "pixels":
        console.print(f"wrote {results['stats']}: {results['num_images']} images, {results['feature_dim']} pixel values each")
        return
    console.print(
        f"wrote {results['stats']}: {results['num_images']} images, {results['feature_dim']}-d features "
        f"(detector sha256 {results['detector_sha256'][:12]}...)"
    )
