"""The built-in digits family against EDM's formulas, and its shipped weights and metric."""

from __future__ import annotations

import math

import pytest
import torch

from neon_digits import model as M
from neon_digits.io import DigitsScorer
from neon_digits import WEIGHTS


def test_edm_preconditioning_and_loss_weight():
    net = M.Denoiser(width=32, depth=1)
    x = torch.randn(5, 64)
    labels = torch.arange(5)
    # sigma -> 0: c_skip -> 1, c_out -> 0, so D(x) -> x (EDM Table 1)
    torch.testing.assert_close(net(x, torch.full((5,), 1e-7), labels), x, atol=1e-6, rtol=0)
    for s in (0.01, 0.3, 2.0, 80.0):  # lambda(sigma) * c_out(sigma)^2 = 1: the effective weight on F is 1
        lam = (s**2 + M.SIGMA_DATA**2) / (s * M.SIGMA_DATA) ** 2
        c_out = s * M.SIGMA_DATA / math.sqrt(s**2 + M.SIGMA_DATA**2)
        assert lam * c_out**2 == pytest.approx(1.0, rel=1e-12)


def test_time_steps_follow_edm_eq5():
    t = M.edm_time_steps(18, 0.002, 80.0, 7.0)
    assert t.shape == (19,) and t[0] == pytest.approx(80.0) and t[17] == pytest.approx(0.002) and t[18] == 0
    assert bool((t[:-1] > t[1:]).all())
    i = 5
    expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(t[i]) == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.5])
def test_one_step_sampler_is_cfg_mixed_denoiser(gamma):
    torch.manual_seed(0)
    net = M.Denoiser(width=32, depth=1).eval()
    seeds, labels = torch.tensor([3, 9, 11]), torch.tensor([1, 2, 3])
    settings = {"guidance": gamma, "steps": 1, "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0}
    out = M.heun_sample(net, seeds, labels, settings)
    x0 = M.initial_noise(seeds) * 80.0
    sig = torch.full((3,), 80.0)
    with torch.no_grad():
        d_c, d_u = net(x0, sig, labels).double(), net(x0, sig, torch.full_like(labels, 10)).double()
    # one Euler step from sigma_max to 0 lands exactly on D(x0)
    expect = M.to_uint8(d_u + gamma * (d_c - d_u))
    assert (out.int() - expect.int()).abs().max() <= 1


def test_scorer_on_real_and_noise():
    scorer = DigitsScorer(WEIGHTS / "classifier.safetensors")
    real, labels = M.real_digits()
    same = scorer(real, labels)
    assert same["fd_digits"] == pytest.approx(0.0, abs=1e-6) and same["pixel_fid"] == pytest.approx(0.0, abs=1e-8)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["class_accuracy"] > 0.99
    noise = torch.randint(0, 256, (1000, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad = scorer(noise, labels[:1000])
    assert bad["fd_digits"] > 100 * max(same["fd_digits"], 1e-3) and bad["precision"] < 0.5


def test_shipped_base_model(digits):
    meta = digits.read_metadata(digits.default_model)
    assert meta["family"] == "digits" and int(meta["train_images"]) == 2**20
    net = digits.load(digits.default_model)
    settings = {s.name: s.default for s in digits.settings}
    seeds = torch.arange(500)
    images = digits.sample(net, seeds, seeds % 10, settings)
    m = digits.score(images, seeds % 10)
    assert m["class_accuracy"] > 0.9  # the conditional model draws the digit it is asked for
    assert m["fd_digits"] < 5.0 and m["precision"] > 0.8


def test_training_script_runs(tmp_path):
    from neon_digits.train import main

    main(["--out", str(tmp_path), "--budget", "1024", "--skip-classifier", "--width", "32", "--ema-halflife", "512"])
    from neon_digits.io import read_metadata, load_denoiser

    assert read_metadata(tmp_path / "base.safetensors")["train_images"] == "1024"
    assert load_denoiser(tmp_path / "base.safetensors").width == 32
