"""EDM-preconditioned, class-conditional denoiser for scikit-learn's 8x8 digits (torch code).

Source: Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models" (EDM, NeurIPS 2022): preconditioning (Table 1, "Ours" column), training loss (Eq. 2 with
the log-normal sigma distribution and weighting lambda(sigma)), and the deterministic Heun sampler
(Algorithm 1, with the time steps of Eq. 5). Classifier-free guidance (Ho & Salimans 2022) with
label dropout during training; at sampling D = D_uncond + gamma (D_cond - D_uncond).

Images: uint8 [N, 1, 8, 8] in 0..255 on disk and in the synthetic set; the network works on
float32 x in [-1, 1] (x = u8 / 127.5 - 1).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

NUM_CLASSES = 10
PIXELS = 64
SIGMA_DATA = 0.75  # std of the digits in [-1, 1] (measured: 0.752)
P_MEAN, P_STD = -1.2, 1.2  # EDM training noise distribution ln(sigma) ~ N(P_mean, P_std^2)
LABEL_DROPOUT = 0.1  # probability of training with the null label (enables CFG)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1, 8, 8] -> float32 [N, 64] in [-1, 1]."""
    return images.reshape(images.shape[0], PIXELS).to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [N, 64] in [-1, 1] (clamped) -> uint8 [N, 1, 8, 8]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(-1, 1, 8, 8)


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real digits: uint8 images [1797, 1, 8, 8] (0..16 scaled to 0..255), int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round()).to(torch.uint8).reshape(-1, 1, 8, 8)
    return images, torch.from_numpy(d.target).to(torch.int64)


class Block(nn.Module):
    """Pre-norm residual MLP block modulated by the (noise + class) embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.fc1(torch.nn.functional.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(torch.nn.functional.silu(y))


class Denoiser(nn.Module):
    """D(x; sigma, label) with EDM preconditioning around a residual MLP F.

    forward(x float32 [N, 64], sigma float32 [N], labels int64 [N] with NUM_CLASSES = null label)
    -> float32 [N, 64], the denoised estimate.
    """

    def __init__(self, width: int = 256, depth: int = 3):
        super().__init__()
        self.width, self.depth = width, depth
        self.inp = nn.Linear(PIXELS, width)
        self.label_emb = nn.Embedding(NUM_CLASSES + 1, width)
        self.noise_fc = nn.Linear(64, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, PIXELS)
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(32) / 32), persistent=True)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1, 1).to(torch.float32)
        c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
        c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
        c_in = 1 / (SIGMA_DATA**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        ang = c_noise * self.freqs * 100
        emb = self.noise_fc(torch.cat([ang.sin(), ang.cos()], dim=1)) + self.label_emb(labels)
        emb = torch.nn.functional.silu(emb)
        h = self.inp(c_in * x)
        for block in self.blocks:
            h = block(h, emb)
        f = self.out(torch.nn.functional.silu(self.out_norm(h)))
        return c_skip * x + c_out * f


def edm_loss(model: Denoiser, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """EDM training loss (Karras et al. 2022, Eq. 2 + Table 1): mean over the batch of
    lambda(sigma) ||D(y + n; sigma) - y||^2 with ln sigma ~ N(P_mean, P_std^2),
    lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; labels dropped to the null class
    with probability LABEL_DROPOUT. ``images``: uint8 [N, 1, 8, 8]; returns a float32 scalar.
    """
    y = to_float(images)
    n, dev = y.shape[0], y.device
    # noise is drawn on the CPU generator and moved, so the draws do not depend on the device
    rnd = torch.randn(n, generator=generator).to(dev)
    sigma = (rnd * P_STD + P_MEAN).exp()
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    noise = torch.randn(y.shape, generator=generator).to(dev) * sigma[:, None]
    drop = (torch.rand(n, generator=generator) < LABEL_DROPOUT).to(dev)
    labels = labels.to(dev)
    lab = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
    d = model(y + noise, sigma, lab)
    return (weight[:, None] * (d - y) ** 2).sum(dim=1).mean() / PIXELS


def edm_time_steps(steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM Eq. 5 time steps: float64 [steps + 1], sigma_0 = sigma_max > ... > sigma_{steps-1} = sigma_min, then 0."""
    i = torch.arange(steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def initial_noise(seeds: torch.Tensor) -> torch.Tensor:
    """Per-image N(0, I) noise float32 [N, 64]; row i depends only on seeds[i] (torch.Generator per seed)."""
    out = torch.empty(len(seeds), PIXELS)
    gen = torch.Generator()
    for i, s in enumerate(seeds.tolist()):
        gen.manual_seed(int(s))
        out[i] = torch.randn(PIXELS, generator=gen)
    return out


@torch.no_grad()
def heun_sample(model: Denoiser, seeds: torch.Tensor, labels: torch.Tensor, settings: Mapping[str, Any]) -> torch.Tensor:
    """Deterministic EDM sampler (Karras et al. 2022, Algorithm 1: Heun's 2nd order, no churn) with CFG.

    settings: ``steps`` (N, NFE = 2N - 1 per guidance branch), ``guidance`` (gamma; 1 = no guidance,
    0 = unconditional), ``rho``, ``sigma_min``, ``sigma_max``. Returns uint8 [N, 1, 8, 8].
    """
    gamma = float(settings["guidance"])
    t_steps = edm_time_steps(int(settings["steps"]), float(settings["sigma_min"]), float(settings["sigma_max"]), float(settings["rho"]))
    dev = next(model.parameters()).device
    x = initial_noise(seeds).to(dev, torch.float64) * t_steps[0]
    labels = labels.to(dev)
    null = torch.full_like(labels, NUM_CLASSES)

    def denoise(x_: torch.Tensor, t: float) -> torch.Tensor:
        sig = torch.full((x_.shape[0],), t, dtype=torch.float32, device=dev)
        xf = x_.to(torch.float32)
        if gamma == 1.0:
            return model(xf, sig, labels).to(torch.float64)
        if gamma == 0.0:
            return model(xf, sig, null).to(torch.float64)
        both = model(torch.cat([xf, xf]), torch.cat([sig, sig]), torch.cat([labels, null])).to(torch.float64)
        d_cond, d_unc = both.chunk(2)
        return d_unc + gamma * (d_cond - d_unc)

    for i in range(len(t_steps) - 1):
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        d_cur = (x - denoise(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < len(t_steps) - 2:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return to_uint8(x).cpu()
