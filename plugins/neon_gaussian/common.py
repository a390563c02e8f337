"""Closed forms and helpers shared by the ``gaussian`` and ``gaussian-ddpm`` families.

Everything here is float64 numpy (closed forms) or small torch helpers (seeded noise, checkpoint
I/O). Sources: the Gaussian negative log-likelihood and cross-entropy as written in the Neon paper
(Alemohammad, Wang, Baraniuk, ICLR 2026), App. B.1, ``L_pop``; the 2-Wasserstein distance between
Gaussians (Dowson & Landau 1982; Olkin & Pukelsheim 1982), which is also the Fréchet distance of
Heusel et al. 2017 (``neon_cli.metrics.frechet_distance`` computes the same quantity with
``scipy.linalg.sqrtm``; here symmetric eigendecompositions keep it exact for PSD inputs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from neon_cli.errors import CheckpointError

LOG_2PI = math.log(2 * math.pi)


def _sym(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return (a + a.T) / 2


def is_positive_definite(cov: np.ndarray) -> bool:
    """True if the symmetric part of ``cov`` (float [D, D]) is finite and positive definite."""
    c = _sym(cov)
    if not np.all(np.isfinite(c)):
        return False
    try:
        np.linalg.cholesky(c)
    except np.linalg.LinAlgError:
        return False
    return True


def gaussian_cross_entropy(mu: np.ndarray, cov: np.ndarray, true_mu: np.ndarray, true_cov: np.ndarray) -> float:
    """Population negative log-likelihood ``E_{x ~ N(true_mu, true_cov)}[-log N(x | mu, cov)]`` in nats.

    Paper App. B.1: ``L_pop(mu, Sigma) = 1/2 (log det Sigma + tr(Sigma^-1 (Sigma_* + (mu - mu_*)(mu - mu_*)^T))
    + D log 2 pi)``. Args: mu [D], cov [D, D] (model), true_mu [D], true_cov [D, D]. Returns
    ``inf`` if ``cov`` is not positive definite (e.g. after a merge with a large |w|).
    """
    if not is_positive_definite(cov):
        return math.inf
    c = _sym(cov)
    d = np.asarray(mu, np.float64) - np.asarray(true_mu, np.float64)
    chol = np.linalg.cholesky(c)
    logdet = 2.0 * float(np.log(np.diag(chol)).sum())
    inner = _sym(true_cov) + np.outer(d, d)
    trace = float(np.trace(np.linalg.solve(c, inner)))
    return 0.5 * (logdet + trace + len(d) * LOG_2PI)


def gaussian_entropy(cov: np.ndarray) -> float:
    """Differential entropy of N(., cov) in nats: ``1/2 (log det cov + D (1 + log 2 pi))``."""
    sign, logdet = np.linalg.slogdet(_sym(cov))
    if sign <= 0:
        return -math.inf
    return 0.5 * (float(logdet) + cov.shape[0] * (1.0 + LOG_2PI))


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0); float64 [D, D]."""
    vals, vecs = np.linalg.eigh(_sym(a))
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def w2_squared(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared 2-Wasserstein distance between N(mu1, cov1) and N(mu2, cov2) (= the Fréchet distance).

    ``||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov2^1/2 cov1 cov2^1/2)^1/2)``. Returns ``inf``
    if ``cov1`` is not positive semi-definite and finite (no Gaussian has that covariance).
    """
    c1, c2 = _sym(cov1), _sym(cov2)
    if not np.all(np.isfinite(c1)) or np.linalg.eigvalsh(c1).min() < -1e-12 * max(1.0, float(np.abs(c1).max())):
        return math.inf
    r2 = sqrtm_psd(c2)
    cross = np.linalg.eigvalsh(_sym(r2 @ c1 @ r2))
    d = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    val = float(d @ d + np.trace(c1) + np.trace(c2) - 2.0 * np.sqrt(np.clip(cross, 0.0, None)).sum())
    return max(val, 0.0)


def sample_moments(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of samples ``x`` float [N, D] (tensor or array)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def seeded_normals(seeds: Any, count: int, dtype: Any = None):
    """Per-seed standard normals, torch float [N, count]: row i is ``torch.randn(count)`` from a
    ``torch.Generator`` seeded with ``seeds[i]``, so it depends on that seed only (not on N or on
    the other seeds). ``dtype`` defaults to float64."""
    import torch

    dtype = dtype or torch.float64
    seeds = [int(s) for s in (seeds.tolist() if hasattr(seeds, "tolist") else seeds)]
    out = torch.empty(len(seeds), count, dtype=dtype)
    gen = torch.Generator()
    for i, s in enumerate(seeds):
        gen.manual_seed(s)
        out[i] = torch.randn(count, generator=gen, dtype=dtype)
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """safetensors header metadata of ``path``; CheckpointError naming the file if unreadable."""
    from neon_cli.checkpoint import read_safetensors_metadata

    return read_safetensors_metadata(path)


def load_tensors(path: str | Path, family: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(state dict, metadata) of a safetensors checkpoint written by ``family``; CheckpointError otherwise."""
    from neon_cli.checkpoint import read_safetensors

    meta = read_metadata(path)
    if meta.get("family", family) != family:
        raise CheckpointError(f"{path}: a {meta.get('family')!r} checkpoint, not a {family} one")
    return read_safetensors(path)


def save_tensors(model: Any, path: str | Path, metadata: Mapping[str, str], extra: Mapping[str, str]) -> None:
    """Flat safetensors state dict of ``model`` with ``metadata`` plus the family's ``extra`` keys."""
    from neon_cli.checkpoint import save_safetensors

    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update({str(k): str(v) for k, v in extra.items()})
    save_safetensors(model.state_dict(), path, meta)
