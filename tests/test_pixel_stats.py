"""``neon ref-stats --pixels``: the pixel statistics pixel_fid reads, without a detector; sizes whose
covariance would not fit are refused with the size in the message."""

from __future__ import annotations

import numpy as np
import pytest

from neon_cli.errors import ResourceError
from cli_helpers import invoke


def test_pixels_equal_numpy_and_the_families_reference(tmp_path, monkeypatch):
    monkeypatch.delenv("NEON_INCEPTION", raising=False)
    imgs = np.random.RandomState(0).randint(0, 256, (37, 6, 5, 3)).astype(np.uint8)  # NHWC
    np.save(tmp_path / "imgs.npy", imgs)
    invoke("ref-stats", "-i", tmp_path / "imgs.npy", "-o", tmp_path / "px.npz", "--pixels", "--batch", 8, "-q")
    got = np.load(tmp_path / "px.npz")
    x = imgs.transpose(0, 3, 1, 2).reshape(37, -1).astype(np.float64) / 255  # channel-major, as pixel_fid
    np.testing.assert_allclose(got["mu"], x.mean(0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(got["sigma"], np.cov(x, rowvar=False), rtol=0, atol=1e-14)
    from neon_diffusers.scoring import write_pixel_stats  # what the image families' pixel_fid was documented with

    write_pixel_stats(tmp_path / "imgs.npy", tmp_path / "ref.npz")
    ref = np.load(tmp_path / "ref.npz")
    np.testing.assert_allclose(got["sigma"], ref["sigma"], rtol=0, atol=1e-14)
    res = invoke("ref-stats", "-i", tmp_path / "imgs.npy", "-o", tmp_path / "k.npz", "--pixels", "--keep-features", code=2)
    assert "--pixels: --keep-features" in res.output


def test_too_large_a_covariance_is_refused_with_its_size(tmp_path):
    from neon_cli.inception import check_pixel_size

    with pytest.raises(ResourceError, match=r"^--pixels x: pixel statistics of 3x64x64 images need a 12288x12288 float64 "
                                            r"covariance of 1\.21 GB \(3 copies while computing: 3\.62 GB\), more than the 2\.00 GB"):
        check_pixel_size(12288, (3, 64, 64), "--pixels x", memory=2 * 10**9)
    assert check_pixel_size(3072, (3, 32, 32), "--pixels x", memory=2 * 10**9) == 3072 ** 2 * 8
    np.save(tmp_path / "big.npy", np.zeros((2, 3, 512, 512), np.uint8))  # a 786432^2 float64 covariance: 4.9 TB
    res = invoke("ref-stats", "-i", tmp_path / "big.npy", "-o", tmp_path / "b.npz", "--pixels", code=3)
    assert "786432x786432 float64 covariance of 4947.80 GB" in res.output
    assert not (tmp_path / "b.npz").exists()
