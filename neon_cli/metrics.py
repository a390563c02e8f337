"""Distribution metrics on feature vectors: Fréchet distance (FID), precision/recall/density/coverage.

Everything here works on plain feature matrices ``[N, D]`` (numpy arrays or torch tensors) and
returns Python floats / float64 numpy arrays; it imports numpy and scipy only (never torch), so
any family (digits classifier features, Inception pool features, raw pixels) can use it.

Sources followed:

* Fréchet distance: Heusel et al. 2017 (TTUR ``fid.py``) as kept by pytorch-fid
  ``calculate_frechet_distance`` and EDM ``fid.py``: ``||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))``
  with ``scipy.linalg.sqrtm``; if the square root is not finite, ``eps * I`` is added to both
  covariances (pytorch-fid / ADM evaluator); a negligible imaginary part is dropped, a large one
  is an error.
* Statistics: ``mu = mean``, ``sigma = np.cov(rowvar=False)`` (unbiased, ``N - 1``), as pytorch-fid,
  EDM ``fid.py``, torch-fidelity and the ADM evaluator.
* Precision/recall: Kynkäänniemi et al. 2019 (k-NN manifolds); density/coverage: Naeem et al.
  2020; formulas exactly as the ``prdc`` package 0.2 (``compute_prdc``), which the tests use as the
  reference. Distances are computed in float64 in row blocks so 10k x 10k never materialises.
* Statistics files: EDM / pytorch-fid / clean-fid / LTH14 torch-fidelity fork / ADM reference
  batches all store ``mu`` and ``sigma`` in an ``.npz``; torch-fidelity's own cache is a
  ``torch.save``'d dict ``{"mu": ndarray, "sigma": ndarray}`` (``*-stat-fid-*.pt``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from neon_cli.errors import DataError, UsageError

__all__ = [
    "StatsAccumulator",
    "feature_stats",
    "frechet_distance",
    "fid_from_features",
    "prdc",
    "load_stats",
    "save_stats",
    "load_features",
]

#: Number of float64 elements in one block of the pairwise-distance matrix (128 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 24

#: pytorch-fid / ADM tolerance on the imaginary part of the diagonal of sqrtm(S1 S2).
IMAG_ATOL = 1e-3


def _as_float64(features: Any, name: str = "features") -> np.ndarray:
    """A 2-D float64 numpy copy/view of a numpy array or torch tensor ``[N, D]``."""
    if hasattr(features, "detach"):  # torch tensor, without importing torch
        features = features.detach().cpu().double().numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array [N, D], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{name}: empty feature matrix of shape {tuple(arr.shape)}")
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise DataError(f"{name}: {bad} non-finite values (NaN/inf) in features of shape {tuple(arr.shape)}")
    return arr


def feature_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature matrix.

    Args:
        features: float array or torch tensor ``[N, D]`` (any float dtype, any device), N >= 2.

    Returns:
        ``(mu, sigma)``: float64 numpy arrays ``[D]`` and ``[D, D]``; ``sigma`` is
        ``np.cov(features, rowvar=False)`` (divides by ``N - 1``), as pytorch-fid / EDM ``fid.py``.

    Raises:
        DataError: not 2-D, fewer than 2 rows, or NaN/inf values.
    """
    arr = _as_float64(features)
    if arr.shape[0] < 2:
        raise DataError(f"features: need at least 2 rows for a covariance, got {arr.shape[0]}")
    mu = arr.mean(axis=0)
    sigma = np.atleast_2d(np.cov(arr, rowvar=False))
    return mu, sigma


class StatsAccumulator:
    """Streaming mean / unbiased covariance over batches of features, in float64.

    Batches are merged with Chan et al.'s pairwise update (batch mean + centred scatter), which
    avoids the cancellation of ``sum(x x^T) - N mu mu^T`` when means are large. The result equals
    :func:`feature_stats` on the concatenated batches to float64 rounding.

    Example::

        acc = StatsAccumulator()
        for batch in batches:          # [B, D] arrays or tensors
            acc.update(batch)
        mu, sigma = acc.finalize()
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def update(self, batch: Any) -> None:
        """Add a batch ``[B, D]`` (B >= 1). Raises DataError on a dimension change or NaN/inf."""
        x = _as_float64(batch, "batch")
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        self.merge(StatsAccumulator.from_state((x.shape[0], mean_b, xc.T @ xc)))

    def merge(self, other: "StatsAccumulator") -> None:
        """Fold another accumulator (e.g. another rank's) into this one (Chan et al.'s update)."""
        if other._mean is None:
            return
        if self._mean is None:
            self.count, self._mean, self._m2 = other.count, other._mean.copy(), other._m2.copy()
            return
        if other._mean.shape != self._mean.shape:
            raise DataError(f"features: dimension {other._mean.shape[0]} differs from {self._mean.shape[0]}")
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other._mean - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def state(self) -> tuple[int, np.ndarray | None, np.ndarray | None]:
        """``(count, mean, m2)``: picklable state, e.g. for ``torch.distributed.all_gather_object``."""
        return self.count, self._mean, self._m2

    @classmethod
    def from_state(cls, state: tuple[int, np.ndarray | None, np.ndarray | None]) -> "StatsAccumulator":
        """Inverse of :meth:`state`."""
        acc = cls()
        acc.count, acc._mean, acc._m2 = state
        return acc

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu [D], sigma [D, D])`` float64; raises DataError with fewer than 2 rows seen."""
        if self._mean is None or self.count < 2:
            raise DataError(f"features: need at least 2 rows for a covariance, got {self.count}")
        sigma = self._m2 / (self.count - 1)
        sigma = (sigma + sigma.T) / 2  # exact symmetry, as np.cov's result
        return self._mean.copy(), sigma


def _check_stats(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(f"{name}: mu must be [D] and sigma [D, D], got {tuple(mu.shape)} and {tuple(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DataError(f"{name}: mu/sigma contain NaN or inf")
    return mu, sigma


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm without its 'matrix is singular' warning (singular products are expected)."""
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return linalg.sqrtm(a)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (FID on features).

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``, computed in float64
    with ``scipy.linalg.sqrtm`` as pytorch-fid ``calculate_frechet_distance`` / EDM ``fid.py`` /
    the ADM evaluator (Heusel et al. 2017). If the square root is not finite (nearly singular
    product), ``eps * I`` is added to both covariances and it is recomputed (pytorch-fid's rule).
    An imaginary part from rounding is dropped when the diagonal's is below 1e-3 (pytorch-fid's
    tolerance). The product of two PSD matrices is diagonalisable with real non-negative
    eigenvalues, so rank-deficient covariances (N < D, constant feature dimensions) are handled;
    the tests check them against closed forms.

    Args:
        mu1, mu2: means ``[D]``; sigma1, sigma2: covariances ``[D, D]`` (array-like, any float dtype).
        eps: diagonal offset used only when the first square root is not finite.

    Returns:
        The distance as a Python float (squared-distance units of the features; >= 0 up to rounding).

    Raises:
        DataError: shape mismatch, NaN/inf inputs, or a square root whose diagonal has an imaginary
        part above 1e-3 (covariances that are not PSD), or a non-finite result.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise DataError(f"Fréchet distance: feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise DataError(f"Fréchet distance: sqrtm(sigma1 sigma2) is not finite even with eps={eps} added to the diagonal")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            m = float(np.max(np.abs(covmean.imag)))
            raise DataError(f"Fréchet distance: sqrtm(sigma1 sigma2) has an imaginary component {m:.3g} (covariances not PSD?)")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    if not np.isfinite(value):
        raise DataError("Fréchet distance: result is not finite")
    return value


StatsLike = Union[str, os.PathLike, Sequence[Any], Mapping[str, Any], np.ndarray, Any]


def _resolve_stats(reference: StatsLike, name: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    if isinstance(reference, (str, os.PathLike)):
        return load_stats(reference)
    if isinstance(reference, Mapping):
        if "mu" not in reference or "sigma" not in reference:
            raise DataError(f"{name}: a statistics mapping needs keys 'mu' and 'sigma', got {sorted(reference)}")
        return _check_stats(reference["mu"], reference["sigma"], name)
    if isinstance(reference, tuple) and len(reference) == 2:
        return _check_stats(reference[0], reference[1], name)
    return feature_stats(reference)


def fid_from_features(reference: StatsLike, fake_features: Any, eps: float = 1e-6) -> float:
    """FID of ``fake_features [N, D]`` against a reference given as statistics or features.

    ``reference`` is one of: a path to a statistics file (see :func:`load_stats`), a
    ``(mu, sigma)`` tuple, a mapping with ``mu``/``sigma``, or a feature matrix ``[M, D]``.
    Returns :func:`frechet_distance` of the two statistics (float). Raises DataError as those do.
    """
    mu_r, sigma_r = _resolve_stats(reference)
    mu_f, sigma_f = feature_stats(fake_features)
    return frechet_distance(mu_f, sigma_f, mu_r, sigma_r, eps=eps)


# --------------------------------------------------------------------------------------------
# Precision / recall / density / coverage


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _distance_block(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[len(a), len(b)]`` in float64 (the ||a||^2 + ||b||^2 - 2 a.b form, as sklearn)."""
    d2 = a @ b.T
    d2 *= -2.0
    d2 += a_sq[:, None]
    d2 += b_sq[None, :]
    np.maximum(d2, 0.0, out=d2)
    return np.sqrt(d2, out=d2)


def _rows_per_block(n_cols: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, n_cols))


def knn_radii(features: np.ndarray, k: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> np.ndarray:
    """Distance from each row to its k-th nearest *other* row (float64 ``[N]``).

    Same as prdc's ``compute_nearest_neighbour_distances``: the (k+1)-th smallest entry of the
    row of the self-distance matrix, whose diagonal is exactly 0.
    """
    n = features.shape[0]
    sq = _sq_norms(features)
    radii = np.empty(n, dtype=np.float64)
    step = _rows_per_block(n, block_elements)
    for start in range(0, n, step):
        stop = min(n, start + step)
        d = _distance_block(features[start:stop], sq[start:stop], features, sq)
        d[np.arange(stop - start), np.arange(start, stop)] = 0.0
        radii[start:stop] = np.partition(d, k, axis=1)[:, k]
    return radii


def prdc(real_features: Any, fake_features: Any, k: int = 5, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> dict[str, float]:
    """Precision, recall, density and coverage of fake features against real ones, k-NN based.

    Formulas of the ``prdc`` package 0.2 (Naeem et al. 2020, "Reliable Fidelity and Diversity
    Metrics for Generative Models"; precision/recall of Kynkäänniemi et al. 2019), with
    ``r_i`` the distance of real i to its k-th nearest real neighbour and ``s_j`` that of fake j
    among fakes:

    * precision = mean_j [exists i: d(i, j) < r_i]
    * recall    = mean_i [exists j: d(i, j) < s_j]
    * density   = (1/k) mean_j #{i: d(i, j) < r_i}
    * coverage  = mean_i [min_j d(i, j) < r_i]

    Distances are Euclidean, computed in float64 in row blocks of about ``block_elements``
    entries (default 2**24, 128 MiB), so the peak is about two blocks plus O(N) vectors, whatever N
    (``benchmarks/bench_prdc.py`` compares time and memory with the ``prdc`` package).

    Args:
        real_features: ``[N_real, D]`` array or tensor; fake_features: ``[N_fake, D]``.
        k: neighbourhood size (Naeem et al. and the Neon paper use 5); needs N_real, N_fake > k.

    Returns:
        ``{"precision", "recall", "density", "coverage"}`` as Python floats (precision, recall,
        coverage in [0, 1]; density >= 0, may exceed 1).

    Raises:
        UsageError: k < 1; DataError: shape mismatch, too few rows, NaN/inf.
    """
    if int(k) != k or k < 1:
        raise UsageError(f"prdc: k must be a positive integer, got {k}")
    k = int(k)
    real = _as_float64(real_features, "real features")
    fake = _as_float64(fake_features, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"prdc: feature dimensions differ (real {real.shape[1]}, fake {fake.shape[1]})")
    for name, arr in (("real", real), ("fake", fake)):
        if arr.shape[0] <= k:
            raise DataError(f"prdc: need more than k={k} {name} samples, got {arr.shape[0]}")

    real_radii = knn_radii(real, k, block_elements)
    fake_radii = knn_radii(fake, k, block_elements)

    real_sq, fake_sq = _sq_norms(real), _sq_norms(fake)
    n_real, n_fake = real.shape[0], fake.shape[0]
    inside_count = np.zeros(n_fake, dtype=np.int64)  # #{i: d(i, j) < r_i} per fake j
    recall_hit = np.zeros(n_real, dtype=bool)
    coverage_hit = np.zeros(n_real, dtype=bool)
    step = _rows_per_block(n_fake, block_elements)
    for start in range(0, n_real, step):
        stop = min(n_real, start + step)
        d = _distance_block(real[start:stop], real_sq[start:stop], fake, fake_sq)
        r = real_radii[start:stop, None]
        inside_count += (d < r).sum(axis=0)
        recall_hit[start:stop] = (d < fake_radii[None, :]).any(axis=1)
        coverage_hit[start:stop] = d.min(axis=1) < real_radii[start:stop]

    return {
        "precision": float((inside_count > 0).mean()),
        "recall": float(recall_hit.mean()),
        "density": float(inside_count.mean() / k),
        "coverage": float(coverage_hit.mean()),
    }


# --------------------------------------------------------------------------------------------
# Statistics files


def load_stats(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read reference statistics ``(mu [D], sigma [D, D])`` as float64 from a file.

    Formats:

    * ``.npz`` with arrays ``mu`` and ``sigma``: EDM ``fid.py ref``, pytorch-fid ``--save-stats``,
      clean-fid, the LTH14 torch-fidelity fork's ``fid_statistics_file`` and ADM/guided-diffusion
      reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``mu``/``sigma`` are the pool_3
      statistics; ``mu_s``/``sigma_s`` spatial ones and ``arr_0`` images are ignored here).
    * ``.pt``/``.pth``: torch-fidelity's statistics cache, a ``torch.save``'d dict with ``mu`` and
      ``sigma`` numpy arrays (loaded with ``weights_only=True`` plus numpy's array reconstructors
      allow-listed; nothing else is unpickled).

    Raises:
        DataError: missing file, unreadable file, missing keys (the message lists the keys found;
        an ADM *sample* batch with only ``arr_0`` images needs ``neon ref-stats --images`` first),
        or shapes that do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: reference statistics file not found")
    suffix = path.suffix.lower()
    if suffix in {".pt", ".pth"}:
        obj = _load_torch_stats(path)
        if not isinstance(obj, Mapping) or "mu" not in obj or "sigma" not in obj:
            keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise DataError(f"{path}: expected a dict with 'mu' and 'sigma' (torch-fidelity cache), found {keys}")
        mu, sigma = obj["mu"], obj["sigma"]
        if hasattr(mu, "detach"):
            mu = mu.detach().cpu().double().numpy()
        if hasattr(sigma, "detach"):
            sigma = sigma.detach().cpu().double().numpy()
        return _check_stats(mu, sigma, str(path))
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            if "mu" not in keys or "sigma" not in keys:
                hint = " (an array of images? compute statistics with 'neon ref-stats --images')" if "arr_0" in keys else ""
                raise DataError(f"{path}: no 'mu'/'sigma' arrays, found keys {sorted(keys)}{hint}")
            mu, sigma = data["mu"], data["sigma"]
    except DataError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled object arrays), OSError
        raise DataError(f"{path}: cannot read as .npz statistics ({type(exc).__name__}: {exc})") from None
    return _check_stats(mu, sigma, str(path))


def _load_torch_stats(path: Path) -> Any:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        raise DataError(f"{path}: reading .pt statistics needs torch") from None
    safe: list[Any] = [np.ndarray, np.dtype]
    try:  # numpy >= 2 moved the reconstructor to numpy._core
        from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    safe.append(_reconstruct)
    safe.extend(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64))
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{path}: cannot read as torch-fidelity statistics ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def save_stats(path: str | os.PathLike[str], mu: Any, sigma: Any, features: Any = None) -> Path:
    """Write ``mu [D]`` and ``sigma [D, D]`` (float64) to an EDM-style ``.npz`` atomically.

    The file is readable by EDM ``fid.py``, pytorch-fid, clean-fid and the torch-fidelity fork
    (keys ``mu``, ``sigma``). With ``features [N, D]`` they are stored too, as float32 under the
    key ``features`` (the tools above ignore extra keys); :func:`load_features` reads them back
    for :func:`prdc`. Returns the path. Raises DataError on bad shapes / NaN.
    """
    from neon_cli.fsutil import atomic_path

    mu, sigma = _check_stats(mu, sigma, "statistics")
    arrays = {"mu": mu, "sigma": sigma}
    if features is not None:
        feats = _as_float64(features, "features")
        if feats.shape[1] != mu.shape[0]:
            raise DataError(f"features: dimension {feats.shape[1]} differs from mu's {mu.shape[0]}")
        arrays["features"] = feats.astype(np.float32)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append '.npz' to a bare name
            np.savez(fh, **arrays)
    return path


def load_features(path: str | os.PathLike[str]) -> np.ndarray:
    """The ``features [N, D]`` array stored by ``neon ref-stats --keep-features`` (float32).

    Raises DataError if the file is missing, unreadable or has no ``features`` array.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: reference statistics file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "features" not in data.files:
                raise DataError(f"{path}: no 'features' array (write it with 'neon ref-stats --keep-features'), found keys {sorted(data.files)}")
            feats = data["features"]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read as .npz ({type(exc).__name__}: {exc})") from None
    if feats.ndim != 2:
        raise DataError(f"{path}: 'features' must be [N, D], got shape {tuple(feats.shape)}")
    return feats
