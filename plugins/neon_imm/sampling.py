"""Few-step sampling of an IMM network (Zhou et al. 2025), reproducible per seed block.

The network's own ``cfg_forward(x, t, s, class_labels, cfg_scale)`` is the one-step map of the
IMM paper (for the ImageNet-256 models, Euler-FM: ``x_s = x_t - (t - s) sigma_d F(x_t, t, s)``
with ``F = F_uncond + w (F_cond - F_uncond)``, the zero label being unconditional); neon chains it
over a time grid as IMM's ``generate_images.py`` does:

* ``sampler=pushforward`` (IMM's ``pushforward_generator_fn``, the paper's presets
  ``{1,2,4,8}_steps_cfg1.5_pushforward_uniform``): ``x <- f(x, t_i -> t_{i+1})`` for
  ``t_0 = T > t_1 > ... > t_N = eps``;
* ``sampler=restart`` (``restart_generator_fn``): jump to ``eps`` from each ``t_i`` and re-noise to
  ``t_{i+1}`` (``net.add_noise``) between the jumps;
* ``discretization=uniform`` (``linspace(T, eps, N + 1)``) or ``edm`` (Karras et al.'s rho = 7 grid
  in eta = sigma / alpha, mapped back with ``net.nt_to_t``);
* ``precision=float64``: lumalabs/imm's ``generate_images.py`` (state and times in float64, the
  network in its own mixed precision); ``precision=fp16``: the Neon repository's
  ``generate_images.py`` / ``generate_fid_neon.py`` (state and times in the latents' float32, the
  whole batch under fp16 autocast on CUDA; on CPU autocast is off, so this is float32).

The initial noise is ``net.get_init_noise([B, C, H, W])`` (``randn * sigma_d``) from torch's global
generator, the labels are one-hot float32, and the encoder of the checkout's config decodes the
latents to uint8 pixels. A batch therefore depends on one seed; as in :mod:`neon_xar.sampling`,
seed s belongs to block ``s // seed_block``, a block is drawn whole after
``torch.manual_seed(block * seed_block)`` with neon's plan labels, and the requested images are
kept. **Invariant**: an image for given weights and settings, whatever seeds, batch size, shards,
ranks or resume point asked for it (labels following the plan); block b equals the first batch of
the Neon repository's ``generate_images.py`` run with ``eval.seed=b*seed_block`` and batch
``seed_block`` on one GPU (its ``torch.manual_seed(seed + rank)``; lumalabs's script seeds torch
with a number drawn from numpy instead). **Not invariant**: ``seed_block``, the device, ``precision``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch

from neon_cli.repo import cuda_calls_on_cpu, sample_by_seed_blocks, seeded_global_rng
from neon_imm.checkout import unwrap


def time_grid(net: Any, num_steps: int, discretization: str, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """The N + 1 times from ``net.T`` down to ``net.eps`` (see the module docstring)."""
    if discretization == "uniform":
        return torch.linspace(net.T, net.eps, num_steps + 1, dtype=dtype, device=device)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    nt_min = net.get_log_nt(torch.as_tensor(net.eps, dtype=work, device=device)).exp().item()
    nt_max = net.get_log_nt(torch.as_tensor(net.T, dtype=work, device=device)).exp().item()
    rho = 7.0
    i = torch.arange(num_steps + 1, dtype=work, device=device)
    nt = (nt_max ** (1 / rho) + i / num_steps * (nt_min ** (1 / rho) - nt_max ** (1 / rho))) ** rho
    return net.nt_to_t(nt).to(dtype)


def generate(net: Any, latents: torch.Tensor, class_labels: torch.Tensor | None, settings: Mapping[str, Any]) -> torch.Tensor:
    """Latents after ``num_steps`` IMM steps from the noise ``latents`` [B, C, H, W] (module docstring)."""
    wide = str(settings.get("precision", "float64")) == "float64"
    dtype = torch.float64 if wide else latents.dtype
    n = int(settings.get("num_steps", 8))
    t = time_grid(net, n, str(settings.get("discretization", "uniform")), dtype, latents.device)
    cfg = float(settings.get("cfg", 1.5)) if class_labels is not None else None
    x = latents.to(torch.float64) if wide else latents
    if str(settings.get("sampler", "pushforward")) == "restart":
        t = t[:-1]
        for i, t_cur in enumerate(t):
            x = net.cfg_forward(x, t_cur, torch.ones_like(t_cur) * net.eps, class_labels=class_labels, cfg_scale=cfg)
            x = x.to(torch.float64) if wide else x
            if i < len(t) - 1:
                x, _ = net.add_noise(x, t[i + 1])
        return x
    for t_cur, t_next in zip(t[:-1], t[1:]):
        x = net.cfg_forward(x, t_cur, t_next, class_labels=class_labels, cfg_scale=cfg)
        x = x.to(torch.float64) if wide else x
    return x


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """The encoder's output as uint8: unchanged if uint8 (IMM's encoders decode to uint8), else
    [0, 1] or [-1, 1] floats scaled and rounded (the Neon repository's ``generate_images.py``)."""
    if images.dtype == torch.uint8:
        return images.cpu()
    x = images.float()
    if x.min() >= 0.0 and x.max() <= 1.0:
        return (x * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def decode_block(net: Any, encoder: Any, labels: torch.Tensor | None, seed: int, n: int, settings: Mapping[str, Any],
                 device: torch.device) -> torch.Tensor:
    """uint8 [n, 3, H, W]: one batch, torch's generators seeded with ``seed``; ``labels`` int64 [n] or None."""
    amp = torch.autocast("cuda", dtype=torch.float16) if str(settings.get("precision")) == "fp16" and device.type == "cuda" \
        else contextlib.nullcontext()
    with cuda_calls_on_cpu(device.type != "cuda"), seeded_global_rng(seed, device), torch.no_grad(), amp:
        z = net.get_init_noise([n, net.img_channels, net.img_resolution, net.img_resolution], device)
        c = torch.nn.functional.one_hot(labels, num_classes=net.label_dim).to(torch.float32) if labels is not None else None
        x = generate(net, z, c, settings)
        return to_uint8(encoder.decode(x))


def sample(model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> torch.Tensor:
    """uint8 [N, 3, H, W] for int64 ``seeds`` [N] (>= 0) and ``labels`` [N] (None for an
    unconditional network); see the module docstring. Raises ValueError for negative seeds."""
    net, aux = unwrap(model)
    dev = next(net.parameters()).device
    block = int(settings.get("seed_block", 64))

    def draw(first: int, block_labels: torch.Tensor | None) -> torch.Tensor:
        lab = block_labels.to(dev) if block_labels is not None else None
        return decode_block(net, aux.encoder, lab, first, block, settings, dev)

    return sample_by_seed_blocks(seeds, labels, block, int(net.label_dim or 0), draw)
