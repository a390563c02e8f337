"""Metrics of the image families (``diffusers``, ``flow``): Inception FID when configured, else pixel FID.

Which metric a family reports depends on the environment, read at every call:

* ``NEON_INCEPTION`` names the TorchScript detector ``inception-2015-12-05.pt`` (see
  :mod:`neon_cli.inception`) **and** ``NEON_REF_STATS`` names reference statistics of the same
  detector (``neon ref-stats --images REAL -o ref.npz``; EDM / pytorch-fid / clean-fid ``.npz`` with
  ``mu`` [2048], ``sigma`` [2048, 2048]): metrics ``fid`` (Fréchet Inception Distance, Heusel et al.
  2017, via :class:`neon_cli.inception.InceptionFID`), plus ``precision``, ``recall``, ``density``,
  ``coverage`` (k = 5) when the file also holds ``features`` (``--keep-features``).
* no detector: metric ``pixel_fid``, the Fréchet distance of the raw pixel vectors (C*H*W values
  in [0, 1], channel-major as the images' NCHW layout) against ``NEON_REF_STATS`` holding *pixel*
  statistics (``mu`` [C*H*W], ``sigma`` [C*H*W, C*H*W]) written by :func:`write_pixel_stats`. This
  keeps ``neon eval`` / ``neon tune-w`` usable without Inception weights (tests, CPU machines). It
  is **not** comparable with any published FID: pixel space is not a perceptual feature space.

The first metric name is the default objective of ``neon tune-w`` (``fid`` or ``pixel_fid``).
Both distances are computed in float64 by :func:`neon_cli.metrics.frechet_distance` (scipy sqrtm).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from neon_cli.errors import DataError, UsageError
from neon_cli.family import Metric

#: Environment variable naming the reference statistics file (.npz with mu/sigma).
REF_ENV = "NEON_REF_STATS"
INCEPTION_METRICS = ("fid", "precision", "recall", "density", "coverage")
PIXEL_METRICS = ("pixel_fid",)

_PRDC = "k = 5 {} ({}) on Inception-v3 pool features vs the features in $NEON_REF_STATS (needs --keep-features statistics)"
#: What the image families' metrics are (``metric_info`` of diffusers, flow, edm, xar, imm).
METRIC_INFO = {
    "fid": Metric("Fréchet Inception distance (Heusel et al. 2017) of the TorchScript inception-2015-12-05.pt pool "
                  "features (--detector / $NEON_INCEPTION) vs the statistics --ref-stats / $NEON_REF_STATS"),
    "precision": Metric(_PRDC.format("precision", "Kynkäänniemi et al. 2019"), higher_is_better=True),
    "recall": Metric(_PRDC.format("recall", "Kynkäänniemi et al. 2019"), higher_is_better=True),
    "density": Metric(_PRDC.format("density", "Naeem et al. 2020"), higher_is_better=True),
    "coverage": Metric(_PRDC.format("coverage", "Naeem et al. 2020"), higher_is_better=True),
    "pixel_fid": Metric("Fréchet distance of raw pixel vectors (C*H*W values in [0, 1]) vs pixel statistics in "
                        "$NEON_REF_STATS; without a detector only; not an FID, not comparable with published numbers"),
}


#: neon_cli.inception.ENV_VAR, repeated so that listing metrics (``neon plugins``) imports no numpy.
DETECTOR_ENV = "NEON_INCEPTION"


def detector_configured() -> bool:
    """True when ``$NEON_INCEPTION`` names a detector (the file is checked when scoring)."""
    return bool(os.environ.get(DETECTOR_ENV, ""))


def metric_names() -> tuple[str, ...]:
    """``("fid", "precision", ...)`` with a detector configured, else ``("pixel_fid",)``."""
    return INCEPTION_METRICS if detector_configured() else PIXEL_METRICS


def ref_stats_path() -> Path:
    """``$NEON_REF_STATS`` as a Path; UsageError naming the variable when unset or missing."""
    raw = os.environ.get(REF_ENV, "")
    if not raw:
        kind = ("Inception statistics ('neon ref-stats --images REAL -o ref.npz')" if detector_configured()
                else "pixel statistics (neon_diffusers.scoring.write_pixel_stats)")
        raise UsageError(f"{REF_ENV}: set it to the reference {kind} to score this family")
    path = Path(raw)
    if not path.is_file():
        raise UsageError(f"{REF_ENV}: {path} does not exist")
    return path


def pixel_features(images: Any) -> Any:
    """uint8 images [N, C, H, W] (tensor or array) -> float64 numpy [N, C*H*W] in [0, 1]."""
    import numpy as np

    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise DataError(f"images: expected uint8 [N, C, H, W], got {arr.dtype} {tuple(arr.shape)}")
    return arr.reshape(arr.shape[0], -1).astype(np.float64) / 255.0


def write_pixel_stats(images: str | os.PathLike[str], out: str | os.PathLike[str], batch: int = 1000) -> dict[str, Any]:
    """Write the pixel statistics that ``pixel_fid`` compares against.

    Args:
        images: anything :func:`neon_cli.inception.open_images` reads: a folder of PNG/JPEG files,
            a ``.npy``/``.npz`` uint8 array (NHWC, NCHW or NHW), or a ``neon synth`` directory.
        out: the ``.npz`` to write (keys ``mu`` float64 [D], ``sigma`` float64 [D, D], D = C*H*W),
            atomically. Channel-major pixel order (NCHW flattened), values in [0, 1].
        batch: images read per step (streamed: memory is O(D^2), not O(N D)).

    Returns ``{"path", "num_images", "dim"}``. Raises DataError (fewer than 2 images, unreadable
    input) or UsageError (as ``open_images``).
    """
    from neon_cli.inception import open_images
    from neon_cli.metrics import StatsAccumulator, save_stats

    source = open_images(images)
    n = len(source)
    if n < 2:
        raise DataError(f"{images}: need at least 2 images for a covariance, found {n}")
    acc = StatsAccumulator()
    for start in range(0, n, batch):
        acc.update(pixel_features(source.read(start, min(n, start + batch))))
    mu, sigma = acc.finalize()
    path = save_stats(out, mu, sigma)
    return {"path": str(path), "num_images": n, "dim": int(mu.shape[0])}


class ImageScorer:
    """Scores uint8 samples [N, C, H, W] with the metric configured by the environment (module doc).

    Reference statistics (and the detector) are loaded once per (NEON_INCEPTION, NEON_REF_STATS)
    pair and cached on the object. ``provenance`` holds the detector/statistics paths and sha256
    of the last call.
    """

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._scorer: Any = None
        self.provenance: dict[str, Any] = {}

    def __call__(self, images: Any, labels: Any = None) -> dict[str, float]:
        """``{"fid", ...}`` or ``{"pixel_fid"}`` of ``images`` (labels are not used)."""
        from neon_cli.inception import detector_path

        det = detector_path()
        ref = ref_stats_path()
        key = (str(det or ""), str(ref))
        if key != self._key:
            self._scorer, self._key = self._make(det, ref), key
        return self._scorer(images)

    def _make(self, det: Path | None, ref: Path) -> Any:
        from neon_cli.fsutil import sha256_file
        from neon_cli.metrics import feature_stats, frechet_distance, load_stats

        if det is not None:
            from neon_cli.inception import InceptionFID

            fid = InceptionFID(ref_stats=ref)
            self.provenance = fid.provenance()

            def inception(images: Any) -> dict[str, float]:
                return {k: float(v) for k, v in fid.score(images).items()}

            return inception

        mu, sigma = load_stats(ref)
        self.provenance = {"metric": "pixel_fid", "ref_stats": str(ref), "ref_stats_sha256": sha256_file(ref)}

        def pixels(images: Any) -> dict[str, float]:
            feats = pixel_features(images)
            if feats.shape[1] != mu.shape[0]:
                hint = " (Inception statistics? set NEON_INCEPTION to the detector)" if mu.shape[0] == 2048 else ""
                raise DataError(f"{REF_ENV}: {ref} holds {mu.shape[0]}-d statistics but the images have "
                                f"{feats.shape[1]} pixel values{hint}")
            return {"pixel_fid": float(frechet_distance(*feature_stats(feats), mu, sigma))}

        return pixels


class ImageScoring:
    """Family mixin for the image families (diffusers, flow, edm, xar, imm, var): their metrics,
    definitions and ``score``, one :class:`ImageScorer` per family object, made on first use.

    ``metrics``: ``fid`` first (+ precision/recall/density/coverage, k = 5) when an Inception detector
    is configured, else ``pixel_fid`` (:func:`metric_names`); ``metric_info``: :data:`METRIC_INFO`.
    """

    _scorer: Any = None
    #: the scoring commands' --detector / --ref-stats reach this family (neon_cli.scoring)
    scoring_files = ("detector", "ref_stats")

    def check_scoring(self) -> None:
        """Before the first sample (``neon eval`` / ``tune-w``): the reference statistics are named
        and readable (``$NEON_REF_STATS`` / ``--ref-stats``), the detector, when configured, exists,
        and Inception statistics are 2048-d. Raises UsageError / DataError naming the file."""
        from neon_cli.inception import detector_path, require_detector_path
        from neon_cli.metrics import load_stats

        ref = ref_stats_path()
        det = require_detector_path() if detector_path() is not None else None
        mu, _ = load_stats(ref)
        if det is not None and mu.shape[0] != 2048:
            raise DataError(f"{REF_ENV}: {ref} holds {mu.shape[0]}-d statistics; the Inception detector's are 2048-d "
                            "(pixel statistics? leave out --detector / NEON_INCEPTION)")

    @property
    def metrics(self) -> tuple[str, ...]:
        return metric_names()

    @property
    def metric_info(self) -> dict[str, Any]:
        return METRIC_INFO

    def score(self, images: Any, labels: Any) -> dict[str, float]:
        """``fid`` (+ P/R/D/C) with an Inception detector, else ``pixel_fid`` (:class:`ImageScorer`)."""
        if self._scorer is None:
            self._scorer = ImageScorer()
        return self._scorer(images, labels)
