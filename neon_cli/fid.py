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


def _fid_uncertainty(side_a: "_Side", side_b: "_Side") -> dict[str, Any]:
    """``fid_se`` and ``fid_bias_corrected``: the delete-a-group jackknife (10 contiguous groups,
    :func:`neon_cli.metrics.frechet_replicates`) of each image side against the other side's
    statistics, the variances added (independent samples); a statistics-only side has none. The
    groups are contiguous in the source's order: class-balanced for a ``neon synth`` folder (seed
    order) whenever N/10 is a multiple of the number of classes (N = 10k or 50k with 10 or 1,000
    classes). ``fid_se`` is None when neither side is images."""
    from neon_cli.metrics import balanced_groups, frechet_replicates, jackknife

    var, corr, used = 0.0, 0.0, False
    full = 0.0
    for mine, other in ((side_a, side_b), (side_b, side_a)):
        if mine.source is None or mine.features is None:
            continue
        groups = balanced_groups(len(mine.features), 0)
        if not groups:
            continue
        full, reps = frechet_replicates(mine.features, other.mu, other.sigma, groups)
        jk = jackknife(full, reps)
        var += jk["se"] ** 2
        corr += jk["bias_corrected"] - full  # each side's own c/N term
        used = True
    if not used:
        return {"fid_se": None, "fid_bias_corrected": None}
    return {"fid_se": var ** 0.5, "fid_bias_corrected": full + corr}


def fid(request: Any, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """``neon fid A B``: the FID of A against B, optionally precision/recall/density/coverage.

    ``request``: a :class:`~neon_cli.requests.FidRequest`, validated first
    (:meth:`~neon_cli.requests.FidRequest.validate`). Its fields:

        a, b: each an image source or a statistics file (module docstring); A is the generated
            set, B the reference (the order matters only for precision/recall).
        scoring.detector: ``--detector`` (None: ``$NEON_INCEPTION``); not needed when both sides are statistics.
        batch: images per detector call (does not change the result beyond float rounding).
        num_images: use this many images of each image side, chosen as EDM ``fid.py --num`` does
            (a seeded random subset, :func:`neon_cli.inception.subset`); None: all of them.
        seed: the subset's seed (EDM ``--seed``, default 0).
        prdc: also precision, recall, density, coverage with k = 5 (:func:`neon_cli.metrics.prdc`,
            real = B, fake = A); needs features of both sides.
        device: torch device (default cuda if available, else cpu).
        trust.pickle: let a pickled detector without a TorchScript archive inside run the code
            stored in it (``--trust-pickle``; :func:`neon_cli.inception.load_detector`).

    Returns (also ``report.results``): ``fid`` (float), ``fid_se`` (its standard error: a
    delete-a-group jackknife over 10 contiguous groups of each image side, see
    :func:`_fid_uncertainty`; None with two statistics files) and ``fid_bias_corrected``
    (Quenouille's correction of the c/N term; label it so wherever it is shown), with ``prdc`` also ``precision``,
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
    from neon_cli.inception import _dist, detector_path, load_detector

    req = request.validate()
    paths = {"A": Path(req.a), "B": Path(req.b)}
    report.check_outputs({**paths, "--detector": detector_path(req.scoring.detector)}, {})
    sides = [_Side(flag, p, req.num_images, req.seed, req.prdc) for flag, p in paths.items()]

    det = None
    if any(s.source is not None for s in sides):
        det = load_detector(req.scoring.detector, req.device, trust_pickle=req.trust.pickle)
    _, rank, world = _dist()
    if rank == 0:
        for s in sides:
            report.add_input(s.flag.lower(), s.path)
        if det is not None:
            report.add_input("detector", det.path, sha256=det.sha256)
    _side_features(sides, det, req.batch, progress)
    results = _fid_results(req, sides, det, world)
    report.results.update(results)
    return results


def _side_features(sides: list["_Side"], det: Any, batch: int, progress: ProgressFn) -> None:
    """Features (and their mean and covariance) of each image side, with the detector ``det``."""
    from neon_cli.inception import compute_features
    from neon_cli.metrics import feature_stats

    for s in sides:
        if s.source is None:
            continue
        task = f"features {s.flag}"

        def side_progress(_task: str, done: float, total: float | None = None, _label: str = task, **info: Any) -> None:
            progress(_label, done, total, **info)

        assert det is not None
        # the features are kept (N x 2,048 float32: 80 MiB at 10k) for the jackknife's standard error
        s.features = compute_features(det, s.source, batch=batch, progress=side_progress)
        s.mu, s.sigma = feature_stats(s.features)


def _fid_results(req: Any, sides: list["_Side"], det: Any, world: int) -> dict[str, Any]:
    """The FID of side A against side B, its uncertainty and (``req.prdc``) PRDC: :func:`fid`'s results."""
    from neon_cli.metrics import frechet_distance
    from neon_cli.metrics import prdc as prdc_fn

    side_a, side_b = sides
    if side_a.mu.shape != side_b.mu.shape:
        raise DataError(f"A and B have features of different dimension ({side_a.mu.shape[0]} in {side_a.path}, "
                        f"{side_b.mu.shape[0]} in {side_b.path}): statistics of another detector?")
    results: dict[str, Any] = {"fid": frechet_distance(side_a.mu, side_a.sigma, side_b.mu, side_b.sigma)}
    results.update(_fid_uncertainty(side_a, side_b))
    if req.prdc:
        results.update(prdc_fn(side_b.features, side_a.features, k=PRDC_K))
        results["k"] = PRDC_K
    results.update(
        a=side_a.describe(),
        b=side_b.describe(),
        feature_dim=int(side_a.mu.shape[0]),
        detector_sha256=det.sha256 if det is not None else None,
        num_images_limit=req.num_images,
        seed=req.seed,
        world_size=world,
    )
    return results
