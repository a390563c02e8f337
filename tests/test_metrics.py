"""Fréchet distance, feature statistics, PRDC and statistics files (neon_cli.metrics).

References: closed forms for commuting covariances, an independent symmetric-eigendecomposition
computation of tr((S1 S2)^{1/2}) in float64, numpy's np.cov, and the ``prdc`` package (test extra).
"""

from __future__ import annotations

import numpy as np
import pytest

from neon_cli import metrics as M
from neon_cli.errors import DataError, UsageError

from prdc import compute_prdc  # test dependency: pyproject [project.optional-dependencies] test


def _random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _reference_fid(mu1, s1, mu2, s2) -> float:
    """Independent float64 FID: tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}) via eigh."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _commuting_pair(d, a, b, rng):
    q = _random_orthogonal(d, rng)
    s1 = (q * a) @ q.T
    s2 = (q * b) @ q.T
    return (s1 + s1.T) / 2, (s2 + s2.T) / 2


# ---------------------------------------------------------------------------- Fréchet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 48
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_commuting_nondiagonal_closed_form():
    rng = np.random.default_rng(1)
    d = 64
    a, b = rng.uniform(0.05, 2.0, d), rng.uniform(0.05, 2.0, d)
    s1, s2 = _commuting_pair(d, a, b, rng)
    mu1, mu2 = rng.standard_normal(d), np.zeros(d)
    expected = mu1 @ mu1 + np.sum(a + b - 2 * np.sqrt(a * b))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # symmetric in its arguments
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-6)


def test_frechet_matches_independent_eigh_computation_on_sample_covariances():
    rng = np.random.default_rng(2)
    d, n = 96, 600
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.2
    y = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.2 + 0.1
    mu1, s1 = M.feature_stats(x)
    mu2, s2 = M.feature_stats(y)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-6)


@pytest.mark.parametrize("kind", ["exact_zeros", "tiny_eigenvalues", "shared_null_space"])
def test_frechet_near_singular_commuting_closed_form(kind):
    """Rank-deficient / near-singular covariances: finite and equal to the closed form."""
    rng = np.random.default_rng(3)
    d = 64
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    if kind == "exact_zeros":
        a[:20], b[10:30] = 0.0, 0.0
    elif kind == "tiny_eigenvalues":
        a[:20], b[10:30] = 1e-14, 1e-13
    else:
        a[:20], b[:20] = 0.0, 0.0
    s1, s2 = _commuting_pair(d, a, b, rng)
    mu = rng.standard_normal(d) * 0.1
    expected = mu @ mu + np.sum(a + b - 2 * np.sqrt(a * b))
    got = M.frechet_distance(mu, s1, np.zeros(d), s2)
    assert np.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_rank_deficient_sample_covariances_fewer_samples_than_dims():
    """N < D (the small-sample case, covariances of rank N-1): matches the eigh reference."""
    rng = np.random.default_rng(4)
    d = 128
    x = rng.standard_normal((40, d)) @ rng.standard_normal((d, d)) * 0.3
    y = rng.standard_normal((50, d)) @ rng.standard_normal((d, d)) * 0.3
    mu1, s1 = M.feature_stats(x)
    mu2, s2 = M.feature_stats(y)
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_digits_pixels_with_constant_dimensions():
    """Real 8x8 digits: several pixels are constant (zero-variance rows/columns of sigma)."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64)
    mu1, s1 = M.feature_stats(x[::2])
    mu2, s2 = M.feature_stats(x[1::2])
    assert np.any(np.diag(s1) == 0) and np.any(np.diag(s2) == 0)
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-6)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_frechet_eps_fallback_when_sqrtm_not_finite(monkeypatch):
    """pytorch-fid's rule: if sqrtm(S1 S2) is not finite, retry with eps*I added to both."""
    import scipy.linalg

    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def flaky_sqrtm(a, *args, **kwargs):
        calls.append(a)
        out = real_sqrtm(a, *args, **kwargs)
        return out * np.nan if len(calls) == 1 else out

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    a = np.array([0.0, 1.0, 2.0, 1e-3])
    b = np.array([1.0, 0.0, 2.0, 4.0])
    eps = 1e-4
    got = M.frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b), eps=eps)
    assert len(calls) == 2
    expected = np.sum(a + b - 2 * np.sqrt((a + eps) * (b + eps)))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_rejects_non_psd_and_bad_shapes():
    with pytest.raises(DataError, match="imaginary"):
        M.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(DataError, match="dimensions differ"):
        M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(DataError, match="sigma"):
        M.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(DataError, match="NaN"):
        M.frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------------------- statistics


def test_feature_stats_is_unbiased_covariance_and_accepts_tensors():
    import torch

    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 7)).astype(np.float32)
    mu, sigma = M.feature_stats(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1), rtol=1e-10, atol=1e-14)
    mu_t, sigma_t = M.feature_stats(torch.from_numpy(x))
    np.testing.assert_array_equal(mu_t, mu)
    np.testing.assert_array_equal(sigma_t, sigma)


def test_stats_accumulator_matches_np_cov_with_large_offset():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((523, 12)) + 1e6  # naive sum(x x^T) - N mu mu^T loses ~all digits here
    acc = M.StatsAccumulator()
    for start in range(0, len(x), 50):
        acc.update(x[start : start + 50])
    mu, sigma = acc.finalize()
    assert acc.count == 523
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-8)


def test_stats_errors():
    with pytest.raises(DataError, match="non-finite"):
        M.feature_stats(np.array([[0.0, np.inf], [1.0, 2.0]]))
    with pytest.raises(DataError, match="at least 2"):
        M.feature_stats(np.zeros((1, 3)))
    with pytest.raises(DataError, match="2-D"):
        M.feature_stats(np.zeros(3))
    acc = M.StatsAccumulator()
    acc.update(np.zeros((2, 3)))
    with pytest.raises(DataError, match="dimension"):
        acc.update(np.zeros((2, 4)))


# ---------------------------------------------------------------------------- PRDC


@pytest.mark.parametrize(
    "n_real,n_fake,dim,k,dtype,block",
    [
        (400, 300, 16, 5, np.float64, 1 << 24),
        (257, 311, 32, 5, np.float64, 1000),  # many small blocks, uneven last block
        (300, 300, 64, 3, np.float32, 4096),
    ],
)
def test_prdc_matches_prdc_package(n_real, n_fake, dim, k, dtype, block, capsys):
    rng = np.random.default_rng(7)
    real = rng.standard_normal((n_real, dim)).astype(dtype)
    fake = (rng.standard_normal((n_fake, dim)) * 1.2 + 0.3).astype(dtype)
    got = M.prdc(real, fake, k=k, block_elements=block)
    ref = compute_prdc(real, fake, nearest_k=k)
    assert set(got) == {"precision", "recall", "density", "coverage"}
    for key in got:
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(float(ref[key]), abs=1e-12), key
    # the values are not trivial (this distribution shift moves every metric off 0 and 1)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1 and 0 < got["coverage"] < 1


def test_prdc_identical_sets():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((200, 8))
    got = M.prdc(x, x.copy(), k=5)
    assert got["precision"] == 1.0 and got["recall"] == 1.0 and got["coverage"] == 1.0
    assert got["density"] == pytest.approx(float(compute_prdc(x, x.copy(), 5)["density"]), abs=1e-12)


def test_prdc_errors():
    x = np.zeros((5, 3))
    with pytest.raises(DataError, match="more than k=5"):
        M.prdc(x, np.ones((10, 3)), k=5)
    with pytest.raises(DataError, match="dimensions differ"):
        M.prdc(np.ones((10, 3)), np.ones((10, 4)), k=2)
    with pytest.raises(UsageError, match="k must be"):
        M.prdc(np.ones((10, 3)), np.ones((10, 3)), k=0)


# ---------------------------------------------------------------------------- statistics files


def test_save_load_stats_roundtrip_and_fid_from_features(tmp_path):
    rng = np.random.default_rng(9)
    ref_feats = rng.standard_normal((300, 10))
    fake_feats = rng.standard_normal((200, 10)) + 0.5
    mu, sigma = M.feature_stats(ref_feats)
    path = M.save_stats(tmp_path / "ref.npz", mu, sigma)
    assert path == tmp_path / "ref.npz" and path.is_file()
    with np.load(path) as data:
        assert sorted(data.keys()) == ["mu", "sigma"]  # EDM fid.py layout
    mu2, sigma2 = M.load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    mu_f, sigma_f = M.feature_stats(fake_feats)
    expected = M.frechet_distance(mu_f, sigma_f, mu, sigma)
    assert expected > 0.1
    for reference in (path, str(path), (mu, sigma), {"mu": mu, "sigma": sigma}, ref_feats):
        assert M.fid_from_features(reference, fake_feats) == pytest.approx(expected, rel=1e-12)


def test_load_adm_reference_batch_and_errors(tmp_path):
    rng = np.random.default_rng(10)
    mu, sigma = M.feature_stats(rng.standard_normal((50, 6)))
    adm = tmp_path / "VIRTUAL_labeled.npz"
    np.savez(
        adm,
        arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
        mu=mu.astype(np.float32),
        sigma=sigma.astype(np.float32),
        mu_s=np.zeros(3),
        sigma_s=np.eye(3),
    )
    mu2, sigma2 = M.load_stats(adm)
    assert mu2.dtype == np.float64
    np.testing.assert_allclose(mu2, mu, rtol=1e-6)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-6, atol=1e-7)

    images_only = tmp_path / "samples.npz"
    np.savez(images_only, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="arr_0.*ref-stats"):
        M.load_stats(images_only)
    with pytest.raises(DataError, match="not found"):
        M.load_stats(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        M.load_stats(garbage)


def test_load_torch_fidelity_cache(tmp_path):
    """torch-fidelity caches FID statistics as torch.save({'mu': ndarray, 'sigma': ndarray})."""
    import torch

    rng = np.random.default_rng(11)
    mu, sigma = M.feature_stats(rng.standard_normal((40, 5)))
    path = tmp_path / "cifar10-train-inception-v3-compat-stat-fid-2048.pt"
    torch.save({"mu": mu, "sigma": sigma}, path)
    mu2, sigma2 = M.load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    bad = tmp_path / "bad.pt"
    torch.save({"features": torch.zeros(3)}, bad)
    with pytest.raises(DataError, match="'mu' and 'sigma'"):
        M.load_stats(bad)
