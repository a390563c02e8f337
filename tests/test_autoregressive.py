"""The autoregressive digits family: tokenisation, the sampler's knobs against their definitions
(Hugging Face warpers, VAR's CFG mix), the key/value cache against the full forward, per-image
seeds, the loss, and the shipped base."""

from __future__ import annotations

import math

import pytest
import torch

from neon_autoregressive import model as A
from neon_cli.family import get_family, resolve_settings


@pytest.fixture(scope="module")
def ar():
    return get_family("autoregressive")


@pytest.fixture(scope="module")
def base(ar):
    return ar.load(ar.default_model)


def test_tokens_round_trip_and_quantise_real_digits():
    images, _ = A.real_digits()
    tok = A.to_tokens(images, 6)
    assert tok.min() == 0 and tok.max() == 5
    raw = torch.round(images.float() * 16 / 255).reshape(-1, 64)  # scikit-learn's 0..16
    assert torch.equal(tok, torch.floor(raw * 5 / 16 + 0.5).long())  # nearest level, ties (v = 8) up
    assert torch.equal(A.to_tokens(A.to_images(tok, 6), 6), tok)
    train, held = A.split_indices()
    assert len(train) == 1600 and len(held) == 197 and not set(train.tolist()) & set(held.tolist())


def test_filter_logits_follows_the_hugging_face_warpers():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    logits = p.log()
    # temperature: softmax(logits / tau)
    t = torch.softmax(A.filter_logits(logits, 0.5, 0, 1.0), -1)
    assert torch.allclose(t, p**2 / (p**2).sum(), atol=1e-12)
    # top-k keeps the k largest
    k = A.filter_logits(logits, 1.0, 2, 1.0)
    assert torch.isinf(k[0, 2:]).all() and torch.isfinite(k[0, :2]).all()
    # top-p keeps the smallest prefix whose mass reaches p (0.5 + 0.3 >= 0.7), always the first
    assert torch.isfinite(A.filter_logits(logits, 1.0, 0, 0.7)[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(A.filter_logits(logits, 1.0, 0, 0.81)[0]).tolist() == [True, True, True, False]
    assert torch.isfinite(A.filter_logits(logits, 1.0, 0, 0.01)[0]).tolist() == [True, False, False, False]
    # the same on a permuted vocabulary
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.isfinite(A.filter_logits(logits[:, perm], 1.0, 0, 0.7)[0]).tolist() == [False, True, False, True]


def test_inverse_cdf_draw_has_the_softmax_frequencies():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]]).repeat(20_000, 1)
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(A.draw(logits, u), minlength=4).double() / 20_000
    p = torch.softmax(logits[0].double(), -1)
    assert torch.allclose(freq, p, atol=4 * math.sqrt(0.25 / 20_000))
    assert A.draw(torch.tensor([[0.0, -math.inf, 0.0]]), torch.tensor([0.49], dtype=torch.float64)).item() == 0
    assert A.draw(torch.tensor([[0.0, -math.inf, 0.0]]), torch.tensor([0.51], dtype=torch.float64)).item() == 2


@pytest.mark.parametrize("settings", [
    {"temperature": 0.8, "top_k": 3, "top_p": 0.9, "guidance": 1.5, "guidance_schedule": "constant"},
    {"temperature": 1.2, "top_k": 0, "top_p": 1.0, "guidance": 2.0, "guidance_schedule": "linear"},
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "guidance": 0.0, "guidance_schedule": "constant"},
])
def test_cached_sampler_equals_the_full_forward_with_vars_cfg_mix(ar, base, settings):
    """Teacher-force the sampled tokens through the full (uncached) forward for the class and the
    null label, mix (1 + g) cond - g uncond, warp and draw with the image's own uniforms: the
    sampler must have drawn exactly those tokens."""
    seeds, labels = torch.arange(40, 56), torch.arange(16) % 10
    images = ar.sample(base, seeds, labels, settings)
    tok = A.to_tokens(images, base.levels)
    with torch.no_grad():
        cond = base(tok, labels).double()
        unc = base(tok, torch.full_like(labels, A.NUM_CLASSES)).double()
    u = A.seeded_uniforms(seeds)
    g = settings["guidance"]
    for t in range(64):
        gt = g * t / 63 if settings["guidance_schedule"] == "linear" else g
        mixed = (1 + gt) * cond[:, t] - gt * unc[:, t] if g else cond[:, t]
        want = A.draw(A.filter_logits(mixed, settings["temperature"], settings["top_k"], settings["top_p"]), u[:, t])
        # the cached and full attention differ in float rounding; a draw may flip only when u sits on a CDF edge
        assert (want == tok[:, t]).float().mean() >= 15 / 16


def test_image_depends_only_on_its_seed_and_label(ar, base):
    s = resolve_settings(ar, ["guidance=1.0", "temperature=0.9"])
    a = ar.sample(base, torch.tensor([5, 6, 7]), torch.tensor([1, 2, 3]), s)
    b = ar.sample(base, torch.tensor([7]), torch.tensor([3]), s)
    assert torch.equal(a[2:], b)
    assert not torch.equal(ar.sample(base, torch.tensor([8]), torch.tensor([3]), s), b)
    assert a.dtype == torch.uint8 and a.shape == (3, 1, 8, 8)


def test_loss_is_cross_entropy_in_nats_per_pixel(ar):
    m = A.PixelTransformer(6, 32, 1, 2)
    torch.nn.init.zeros_(m.head.weight)
    torch.nn.init.zeros_(m.head.bias)  # uniform predictions
    images, labels = A.real_digits()
    loss = ar.loss(m, images[:32], labels[:32], torch.Generator().manual_seed(0))
    assert float(loss.detach()) == pytest.approx(math.log(6), rel=1e-6)


def test_shipped_base_small_and_good(ar, base):
    from pathlib import Path

    assert Path(ar.default_model).stat().st_size < 5 * 2**20
    meta = ar.read_metadata(ar.default_model)
    assert int(meta["train_images"]) > 0 and meta["family"] == "autoregressive"
    # held-out next-token loss well below the 6-level uniform log 6 = 1.79 nats/pixel
    assert float(meta["heldout_loss"]) < 1.0
    seeds = torch.arange(1000)
    m = ar.score(ar.sample(base, seeds, seeds % 10, resolve_settings(ar)), seeds % 10)
    assert m["fd_digits"] < 1.0 and m["class_accuracy"] > 0.85
