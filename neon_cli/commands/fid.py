"""``neon fid``: Fréchet Inception distance of images (or statistics) against images or statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from neon_cli.commands._common import DetectorTrustOpt, DryRunOpt, JsonOpt, QuietOpt, ReportOpt, run
from neon_cli.requests import FidRequest, Scoring, Trust


def register(app: typer.Typer) -> None:
    @app.command("fid")
    def fid_(
        a: Path = typer.Argument(..., metavar="A", show_default=False,
                                 help="Generated images: a folder of image files, an EDM-style .zip, a .npy/.npz uint8 array, "
                                      "a 'neon synth' directory; or statistics (.npz with mu, sigma)."),
        b: Path = typer.Argument(..., metavar="B", show_default=False,
                                 help="Reference: the same kinds, usually statistics (EDM/ADM/pytorch-fid/clean-fid .npz, "
                                      "torch-fidelity .pt, 'neon ref-stats' output)."),
        detector: Optional[str] = typer.Option(
            None, "--detector", envvar="NEON_INCEPTION", show_envvar=True,
            help="TorchScript inception-2015-12-05.pt (StyleGAN2-ADA's, as clean-fid), or EDM's / StyleGAN3's inception-2015-12-05.pkl (see --trust-pickle); never downloaded."),
        prdc: bool = typer.Option(False, "--prdc", help="Also precision, recall, density, coverage (k=5; B is the real set); needs features of both sides."),
        num_images: Optional[int] = typer.Option(
            None, "--num-images", help="Use this many images of each image side, a random subset seeded by --seed as EDM fid.py --num (default: all)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the --num-images subset (EDM fid.py --seed)."),
        batch: int = typer.Option(64, "--batch", help="Images per detector call."),
        device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu)."),
        trust_pickle: bool = DetectorTrustOpt,
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Fréchet Inception distance between A and B, as pytorch-fid / clean-fid / EDM fid.py compute it.

        uint8 images go to the TorchScript Inception-v3 detector, which resizes them itself (EDM's and StyleGAN2-ADA's convention; clean-fid's mode legacy_tensorflow). Either side may be reference statistics; with both statistics no detector is needed. Runs under torchrun (each rank extracts a slice of each side). The report records the sha256 of A, B and the detector: FIDs are comparable only with the same detector and reference.

        Example:

        \b
            export NEON_INCEPTION=~/models/inception-2015-12-05.pt
            neon fid runs/S cifar10-32x32.npz
            neon fid samples.zip real-images/ --prdc --json
            neon fid fid-tmp/ ref.npz --num-images 50000 --report fid.json
            torchrun --standalone --nproc_per_node=8 -m neon_cli fid samples/ ref.npz
        """
        req = FidRequest(a, b, Scoring(detector=detector), prdc, num_images, seed, batch, device, Trust(pickle=trust_pickle),
                         report)

        def fn(report: Any, progress: Any) -> Any:
            from neon_cli.fid import fid

            return fid(req, report=report, progress=progress)

        run("fid", fn, settings=req.settings(), report=report, json_out=json_out, quiet=quiet, dry_run=dry_run, plan=req.plan,
            show=_show)


def _show(results: dict[str, Any], console: Any) -> None:
    def side(s: dict[str, Any]) -> str:
        if s["kind"] == "stats":
            return f"statistics {s['path']}"
        return f"{s['num_images']} images ({s['kind']}) {s['path']}"

    se = results.get("fid_se")
    pm = f" ± {se:.2g} (SE)" if se is not None else ""
    console.print(f"FID {results['fid']:.6g}{pm}   A: {side(results['a'])}   B: {side(results['b'])}", highlight=False, markup=False,
                  soft_wrap=True)
    if "precision" in results:
        console.print("  ".join(f"{k} {results[k]:.4f}" for k in ("precision", "recall", "density", "coverage"))
                      + f"   (k={results['k']})", highlight=False, soft_wrap=True)
