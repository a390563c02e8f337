"""``neon fid``: Fréchet Inception distance between two sets of images, or images and statistics.

Like ``python -m pytorch_fid A B`` or clean-fid's ``compute_fid(A, B)``, with the detector and
resizing conventions of EDM's ``fid.py`` (and StyleGAN2-ADA's metrics): images go to the
TorchScript ``inception-2015-12-05.pt`` as **uint8** ``[N, 3, H, W]`` (grayscale repeated to 3
channels) and the detector does its own resize to 299x299 (:mod:`neon_cli.inception`); statistics
are the mean and unbiased covariance of the 2048-d pool features in float64, and the distance is
``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b))`` (:func:`neon_cli.metrics.frechet_distance`,
Heusel et al. 2017). This is clean-fid's ``mode="legacy_tensorflow"``, not its default ``"clean"``
(PIL bicubic resize before the network), so numbers match EDM / StyleGAN papers, not clean-fid's.

Each side is one of:

* images: a folder of image files (Pillow), an EDM-style ``.zip`` (``dataset_tool.py``'s PNGs,
  optional ``dataset.json``), a ``.npy`` / ``.npz`` uint8 array (NHWC, NCHW or NHW; ADM sample
  batches' ``arr_0``), or a ``neon synth`` directory;
* statistics: an ``.npz`` holding ``mu`` and ``sigma`` (EDM ``fid.py ref``, pytorch-fid
  ``--save-stats``, clean-fid, ADM reference batches, ``neon ref-stats``) or torch-fidelity's
  ``.pt`` cache; an ``.npz`` with ``mu``/``sigma`` *and* images (ADM's ``VIRTUAL_*.npz``) counts
  as statistics.

Precision, recall, density and coverage (k = 5; Kynkäänniemi et al. 2019, Naeem et al. 2020, the
``prdc`` package's formulas) are computed on request from the features of both sides, with A as
the generated set and B as the reference; a statistics-only side cannot give them (its
``features`` array from ``neon ref-stats --keep-features`` can).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from neon_cli.errors import DataError, UsageError
from neon_cli.progress import ProgressFn, null_progress

#: Neighbourhood size of precision/recall/density/coverage (Naeem et al. 2020; the Neon paper).
PRDC_K = 5


def is_stats_file(path: str | os.PathLike[str]) -> bool:
    """True for a statistics file: ``.pt``/``.pth`` (torch-fidelity), or an ``.npz`` with both
    ``mu`` and ``sigma`` members (its header is read, not its arrays)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth"):
        return True
    if suffix != ".npz" or not p.is_file():
        return False
    import zipfile

    try:
        with zipfile.ZipFile(p) as zf:
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        return False
    return {"mu", "sigma"} <= names


def _stats_has_features(path: Path) -> bool:
    if path.suffix.lower() != ".npz":
        return False
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return "features.npy" in zf.namelist()


class _Side:
    """One side of the comparison: statistics (``mu``, ``sigma``, maybe ``features``) or images."""

    def __init__(self, flag: str, path: Path, num_images: int | None, seed: int, need_features: bool):
        from neon_cli.inception import open_images, subset
        from neon_cli.metrics import load_features, load_stats

        self.flag, self.path = flag, path
        self.source: Any = None
        self.mu = self.sigma = self.features = None
        if is_stats_file(path):
            self.kind = "stats"
            self.mu, self.sigma = load_stats(path)
            if need_features:
                if not _stats_has_features(path):
                    raise UsageError(f"--prdc: {flag} {path} holds statistics (mu, sigma) only; precision/recall need the "
                                     f"features of both sides: give the images, or statistics written by 'neon ref-stats --keep-features'")
                self.features = load_features(path)
            self.num = int(self.features.shape[0]) if self.features is not None else None
        else:
            source = open_images(path, flag=flag)
            self.kind = source.kind
            if num_images is not None:
                source = subset(source, num_images, seed, where=f"{flag} {path}")
            if len(source) < 2:
                raise DataError(f"{flag} {path}: need at least 2 images for a covariance, found {len(source)}")
            self.source = source
            self.num = len(source)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "num_images": self.num}


def fid(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    detector: str | os.PathLike[str] | None = None,
    batch: int = 64,
    num_images: int | None = None,
    seed: int = 0,
    prdc: bool = False,
    device: str | None = None,
    trust_pickle: bool = False,
    report: Any,
    progress: ProgressFn = null_progress,
) -> dict[str, Any]:
    """``neon fid A B``: the FID of A against B, optionally precision/recall/density/coverage.

    Args:
        a, b: each an image source or a statistics file (module docstring); A is the generated
            set, B the reference (the order matters only for precision/recall).
        detector: ``--detector`` (None: ``$NEON_INCEPTION``); not needed when both sides are statistics.
        batch: images per detector call (does not change the result beyond float rounding).
        num_images: use this many images of each image side, chosen as EDM ``fid.py --num`` does
            (a seeded random subset, :func:`neon_cli.inception.subset`); None: all of them.
        seed: the subset's seed (EDM ``--seed``, default 0).
        prdc: also precision, recall, density, coverage with k = 5 (:func:`neon_cli.metrics.prdc`,
            real = B, fake = A); needs features of both sides.
        device: torch device (default cuda if available, else cpu).
        trust_pickle: let a pickled detector without a TorchScript archive inside run the code
            stored in it (``--trust-pickle``; :func:`neon_cli.inception.load_detector`).

    Returns (also ``report.results``): ``fid`` (float), with ``prdc`` also ``precision``,
    ``recall``, ``density``, ``coverage`` and ``k``; ``a`` / ``b`` (``path``, ``kind``,
    ``num_images``), ``feature_dim``, ``detector_sha256`` (None without a detector),
    ``world_size``. Under torchrun each rank extracts a slice of each image side and every rank
    returns the same numbers. Report inputs: ``a``, ``b``, ``detector`` with their sha256.

    Raises:
        UsageError: a missing path, bad numbers, no detector where one is needed (the message
        names the file, ``--detector`` and ``NEON_INCEPTION``), ``--prdc`` with a statistics-only
        side. DataError: unreadable images or statistics, fewer images than ``--num-images``,
        feature dimensions that differ. CheckpointError: an unloadable detector.
    """
    from neon_cli import validate
    from neon_cli.inception import _dist, compute_features, compute_stats, detector_path, load_detector
    from neon_cli.metrics import feature_stats, frechet_distance
    from neon_cli.metrics import prdc as prdc_fn

    batch = validate.positive_int("--batch", batch)
    if num_images is not None:
        num_images = validate.integer("--num-images", num_images, low=2)
    seed = validate.integer("--seed", seed, low=0)
    paths = {"A": Path(a), "B": Path(b)}
    for flag, p in paths.items():
        if not p.exists():
            raise UsageError(f"{flag}: {p} does not exist")
    report.check_outputs({**paths, "--detector": detector_path(detector)}, {})
    sides = [_Side(flag, p, num_images, seed, prdc) for flag, p in paths.items()]

    det = None
    if any(s.source is not None for s in sides):
        det = load_detector(detector, device, trust_pickle=trust_pickle)
    _, rank, world = _dist()
    if rank == 0:
        for s in sides:
            report.add_input(s.flag.lower(), s.path)
        if det is not None:
            report.add_input("detector", det.path, sha256=det.sha256)

    for s in sides:
        if s.source is None:
            continue
        task = f"features {s.flag}"

        def side_progress(_task: str, done: float, total: float | None = None, _label: str = task, **info: Any) -> None:
            progress(_label, done, total, **info)

        assert det is not None
        if prdc:
            s.features = compute_features(det, s.source, batch=batch, progress=side_progress)
            s.mu, s.sigma = feature_stats(s.features)
        else:
            s.mu, s.sigma, _ = compute_stats(det, s.source, batch=batch, progress=side_progress)

    side_a, side_b = sides
    if side_a.mu.shape != side_b.mu.shape:
        raise DataError(f"A and B have features of different dimension ({side_a.mu.shape[0]} in {side_a.path}, "
                        f"{side_b.mu.shape[0]} in {side_b.path}): statistics of another detector?")
    results: dict[str, Any] = {"fid": frechet_distance(side_a.mu, side_a.sigma, side_b.mu, side_b.sigma)}
    if prdc:
        results.update(prdc_fn(side_b.features, side_a.features, k=PRDC_K))
        results["k"] = PRDC_K
    results.update(
        a=side_a.describe(),
        b=side_b.describe(),
        feature_dim=int(side_a.mu.shape[0]),
        detector_sha256=det.sha256 if det is not None else None,
        num_images_limit=num_images,
        seed=seed,
        world_size=world,
    )
    report.results.update(results)
    return results
