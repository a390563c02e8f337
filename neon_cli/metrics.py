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

import math
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
    "balanced_groups",
    "jackknife",
    "paired_difference",
    "combine_differences",
    "frechet_replicates",
    "score_with_jackknife",
    "with_uncertainty",
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


def prdc(real_features: Any, fake_features: Any, k: int = 5, block_elements: int = DEFAULT_BLOCK_ELEMENTS,
         real_radii: Any = None) -> dict[str, float]:
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
        real_radii: the reals' k-NN radii ``[N_real]`` if already computed (:func:`knn_radii`; they
            depend on the reals alone, so a jackknife over fakes computes them once).

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

    real_radii = knn_radii(real, k, block_elements) if real_radii is None else np.asarray(real_radii, dtype=np.float64)
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


# --------------------------------------------------------------------------------------------
# Uncertainty: a class-balanced delete-a-group jackknife (issue 23)

#: Groups of the delete-a-group jackknife (Kott 2001; Efron & Stein 1981 for the jackknife). Ten
#: groups give the standard error about 9 degrees of freedom (its own relative error ~ 24 %).
JACKKNIFE_GROUPS = 10

#: Two-sided 95 % normal quantile: a paired difference is "resolved" when its interval
#: ``diff +- Z95 * se`` excludes 0.
Z95 = 1.959963984540054


def balanced_groups(n: int, num_classes: int = 0, groups: int = JACKKNIFE_GROUPS) -> list[np.ndarray]:
    """Index arrays of the delete-a-group jackknife for a seed plan of ``n`` images.

    Under neon's seed plan image i has seed ``seed + i`` and label ``(seed + i) % K``
    (:mod:`neon_cli.evaluate`), so any run of ``K`` consecutive images holds every class once.
    The groups are contiguous blocks whose size is a multiple of ``K`` (``K = max(num_classes, 1)``):
    every group, and every sample left when one group is deleted, is class-balanced like the full
    plan, so the replicates estimate the same quantity at ``n - n/G`` images. Random subsets (the
    ordinary bootstrap) are not balanced and overstate the variance of a balanced plan. Images past
    the last whole block (``n`` not a multiple of ``G*K``) join the last group.

    Args:
        n: images in the plan (>= 2); num_classes: K (0 for unconditional families);
        groups: G wanted; fewer when ``n < G*K`` (at least 2 groups, else an empty list).

    Returns:
        ``G`` int64 index arrays covering ``0 .. n-1`` in order (empty list when ``n < 2K``).
    """
    k = max(int(num_classes or 0), 1)
    g = min(int(groups), n // k)
    if g < 2:
        return []
    size = (n // (g * k)) * k
    bounds = [i * size for i in range(g)] + [n]
    return [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(g)]


def stratified_groups(labels: Sequence[int], groups: int = JACKKNIFE_GROUPS) -> list[np.ndarray]:
    """Delete-a-group jackknife groups for a seed plan whose labels are not ``seed % K`` (the
    ``--labels edm|var|xar`` protocols of :mod:`neon_cli.labels`): each class's images, in plan
    order, are cut into ``G`` near-equal runs and group g joins run g of every class, so each group
    (and each sample left when one is deleted) keeps the plan's class proportions. Classes with
    fewer than ``G`` images spread over the first groups.

    Args: labels: one int per image (length n); groups: G wanted (fewer when n < 2G).
    Returns: ``G`` sorted int64 index arrays covering ``0 .. n-1`` (empty list when n < 4).
    """
    lab = np.asarray(list(labels), dtype=np.int64)
    g = min(int(groups), len(lab) // 2)
    if g < 2:
        return []
    parts: list[list[np.ndarray]] = [[] for _ in range(g)]
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        for j, chunk in enumerate(np.array_split(idx, g)):
            parts[j].append(chunk)
    out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    return [o for o in out if o.size] if sum(o.size > 0 for o in out) >= 2 else []


def jackknife(full: float, replicates: Sequence[float]) -> dict[str, float]:
    """Delete-a-group jackknife of a statistic from its value ``full`` on all ``n`` images and its
    ``G`` leave-one-group-out values ``replicates``.

    ``se = sqrt((G-1)/G * sum_g (r_g - mean r)^2)``; ``bias_corrected = G*full - (G-1)*mean r``
    (Quenouille's correction: removes a bias of the form ``c/n``, as the Fréchet distance's
    ``tr``-term; valid here because every replicate is class-balanced, see :func:`balanced_groups`).

    Returns ``{"value", "se", "bias_corrected"}`` (floats; se is NaN with fewer than 2 replicates,
    inf when a replicate is not finite).
    """
    r = np.asarray(list(replicates), dtype=np.float64)
    g = r.size
    if g < 2:
        return {"value": float(full), "se": math.nan, "bias_corrected": math.nan}
    if not (np.isfinite(r).all() and math.isfinite(full)):
        return {"value": float(full), "se": math.inf, "bias_corrected": math.nan}
    mean = float(r.mean())
    se = math.sqrt((g - 1) / g * float(((r - mean) ** 2).sum()))
    return {"value": float(full), "se": se, "bias_corrected": g * float(full) - (g - 1) * mean}


def paired_difference(full_a: float, rep_a: Sequence[float], full_b: float, rep_b: Sequence[float],
                      z: float = Z95) -> dict[str, Any]:
    """``a - b`` for two candidates scored on the **same** seeds, with the jackknife of the
    difference over the same groups (common random numbers: the shared noise cancels, so this is
    much tighter than ``sqrt(se_a^2 + se_b^2)``).

    Returns ``{"diff", "se", "ci": [lo, hi], "resolved"}``: ``resolved`` is True when the
    interval ``diff +- z*se`` (z = 1.96: 95 %) excludes 0.
    """
    if len(rep_a) != len(rep_b):
        raise DataError(f"paired difference: {len(rep_a)} and {len(rep_b)} jackknife replicates (not the same groups)")
    jk = jackknife(float(full_a) - float(full_b), [float(x) - float(y) for x, y in zip(rep_a, rep_b)])
    return combine_differences([(jk["value"], jk["se"])], z=z)


def combine_differences(blocks: Sequence[tuple[float, float]], z: float = Z95) -> dict[str, Any]:
    """Mean of paired differences measured on ``B`` independent seed blocks of equal size, each
    ``(diff, se)``: ``diff = mean``, ``se = sqrt(sum se_b^2) / B``. Returns ``{"diff", "se", "ci",
    "resolved", "blocks"}`` as :func:`paired_difference`."""
    if not blocks:
        raise DataError("combine_differences: no blocks")
    d = float(np.mean([b[0] for b in blocks]))
    se = math.sqrt(sum(float(b[1]) ** 2 for b in blocks)) / len(blocks)
    lo, hi = d - z * se, d + z * se
    resolved = bool(math.isfinite(se) and (lo > 0 or hi < 0))
    return {"diff": d, "se": se, "ci": [lo, hi], "resolved": resolved, "blocks": len(blocks)}


def frechet_replicates(features: Any, mu_ref: Any, sigma_ref: Any, groups: Sequence[np.ndarray],
                       eps: float = 1e-6) -> tuple[float, list[float]]:
    """Fréchet distance of ``features [N, D]`` to ``(mu_ref, sigma_ref)`` and its leave-one-group-out
    values (the jackknife replicates), from one pass over the features.

    The full value is :func:`frechet_distance` (pytorch-fid's formula). A replicate's statistics
    are the full ones minus the group's (Chan et al.'s update run backwards, float64), and its
    ``tr (S1 S2)^{1/2}`` is ``sum sqrt(eig(R S1 R))`` with ``R = S2^{1/2}`` computed once
    (symmetric eigenproblems: for 2,048-d Inception features ~10x faster than ``sqrtm``; equal to
    it up to rounding, as the tests check). Returns ``(full, [G replicates])``.
    """
    x = _as_float64(features)
    mu_ref, sigma_ref = _check_stats(mu_ref, sigma_ref, "reference statistics")
    full = frechet_distance(*feature_stats(x), mu_ref, sigma_ref, eps=eps)
    n = x.shape[0]
    total_mean = x.mean(axis=0)
    xc = x - total_mean
    total_m2 = xc.T @ xc
    evals, evecs = np.linalg.eigh((sigma_ref + sigma_ref.T) / 2)
    root = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    tr_ref = float(np.trace(sigma_ref))
    reps = []
    for idx in groups:
        m = len(idx)
        gm = x[idx].mean(axis=0)
        gc = x[idx] - gm
        rest = n - m
        mean = (n * total_mean - m * gm) / rest
        delta = gm - mean
        m2 = total_m2 - gc.T @ gc - np.outer(delta, delta) * (m * rest / n)
        sigma = m2 / (rest - 1)
        sigma = (sigma + sigma.T) / 2
        inner = root @ sigma @ root
        lam = np.linalg.eigvalsh((inner + inner.T) / 2)
        diff = mean - mu_ref
        reps.append(float(diff @ diff + np.trace(sigma) + tr_ref - 2.0 * np.sqrt(np.clip(lam, 0, None)).sum()))
    return full, reps


def score_with_jackknife(score: Any, images: Any, labels: Any, groups: Sequence[np.ndarray]
                         ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Generic jackknife: ``score(images, labels) -> {metric: float}`` on all images and on each
    leave-one-group-out subset (G + 1 calls). Returns ``(metrics, {metric: [G replicates]})``.
    A family can do this faster with its own ``score_jackknife`` (features computed once)."""
    full = {k: float(v) for k, v in score(images, labels).items()}
    reps: dict[str, list[float]] = {k: [] for k in full}
    n = len(images)
    for idx in groups:
        keep = np.setdiff1d(np.arange(n), idx)
        out = score(images[keep], labels[keep] if labels is not None else None)
        for k in full:
            reps[k].append(float(out.get(k, math.nan)))
    return full, reps


def with_uncertainty(metrics: Mapping[str, float], replicates: Mapping[str, Sequence[float]] | None
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """``metrics`` plus ``<name>_se`` for every metric with replicates (existing keys unchanged),
    and ``{name: bias-corrected value}`` (:func:`jackknife`). Without replicates (exact metrics,
    e.g. the Gaussian toys' closed forms) the SE is 0 and nothing is bias-corrected."""
    out = {k: float(v) for k, v in metrics.items()}
    corrected: dict[str, float] = {}
    for k, v in metrics.items():
        if k == "seconds" or k.endswith("_se"):
            continue
        if replicates is None:
            out[f"{k}_se"] = 0.0
            continue
        if k in replicates:
            jk = jackknife(float(v), replicates[k])
            out[f"{k}_se"] = jk["se"]
            corrected[k] = jk["bias_corrected"]
    return out, corrected
