"""Sampling an xAR model with xAR's own ``sample_tokens`` and MAR's VAE, reproducible per seed block.

What one block does is exactly what xAR's scripts do for one batch (``eval.py`` /
``engine_xar.evaluate``, the Neon repository's ``generate_dataset.py`` and ``calculate_fid.py``)::

    torch.manual_seed(S)                       # the scripts' --seed (rank 0, first batch)
    with autocast(fp16):                       # on CUDA, as the scripts (setting autocast)
        z = model.sample_tokens(num_steps=flow_steps, cfg=cfg, label=labels)
        x = vae.decode(z / 0.2325)
    x = (x + 1) / 2 -> uint8                   # truncation (generate_dataset.py, calculate_fid.py) or rounding (eval.py)

xAR draws every latent and every SDE step's noise from torch's global generators, so an image
depends on the whole batch it is drawn in. The family therefore fixes the batches by the seeds:
seed s belongs to block ``s // seed_block``, a block is always sampled whole with
``S = block * seed_block`` (its first seed) and the labels of neon's seed plan, and the requested
images are kept. So:

* **invariant**: the image of seed s for given weights and settings, whatever range of seeds,
  batch size, shard size, number of ranks or resume point asked for it, as long as the labels
  follow neon's plan (label of seed t = t mod classes): a block's other images are drawn with
  their plan labels whether requested or not; and block b's images equal those of xAR's scripts
  run with ``--seed b*seed_block``, batch ``seed_block``, those labels, on one GPU;
* **not invariant**: ``seed_block`` itself, the device (CUDA's and the CPU's random streams and
  rounding differ), ``autocast``, and a caller's labels that differ from the plan for other seeds
  of the same block. ``seed_block=1`` makes every image depend on its own seed and label alone.

On CPU, xAR's hard-coded ``.cuda()`` calls are made no-ops for the duration of the call
(:func:`neon_cli.repo.cuda_calls_on_cpu`); torch's and numpy's global random states are restored
afterwards (:func:`neon_cli.repo.seeded_global_rng`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch

from neon_cli.repo import cuda_calls_on_cpu, sample_by_seed_blocks, seeded_global_rng
from neon_xar.checkout import LATENT_SCALE, unwrap


def to_uint8(images: torch.Tensor, rounding: str) -> torch.Tensor:
    """VAE output [B, 3, H, W] (about [-1, 1], any float dtype) -> uint8 [B, 3, H, W] on CPU.

    ``"truncate"``: ``((x + 1) / 2).mul(255).clamp(0, 255).byte()`` on the device, as the Neon
    repository's ``generate_dataset.py`` and ``calculate_fid.py`` (the paper's S and FIDs);
    ``"round"``: ``round(clip(((x + 1) / 2) * 255, 0, 255))`` on CPU, as xAR's ``eval.py``. Both in
    the dtype the VAE returned (fp16 under autocast), like the scripts.
    """
    x = (images + 1) / 2
    if rounding == "round":
        return torch.round(torch.clamp(x.cpu() * 255, 0, 255)).to(torch.uint8)
    return x.mul(255).clamp(0, 255).to(torch.uint8).cpu()


def decode_block(net: Any, vae: Any, labels: torch.Tensor, seed: int, settings: Mapping[str, Any]) -> torch.Tensor:
    """uint8 [B, 3, H, W]: one batch of xAR's sampling (module docstring) for int64 ``labels`` [B]
    on the network's device, torch's generators seeded with ``seed``."""
    dev = labels.device
    amp = torch.autocast("cuda", dtype=torch.float16) if settings.get("autocast", True) and dev.type == "cuda" \
        else contextlib.nullcontext()
    with cuda_calls_on_cpu(dev.type != "cuda"), seeded_global_rng(seed, dev), torch.no_grad(), amp:
        tokens = net.sample_tokens(num_steps=int(settings.get("flow_steps", 40)), cfg=float(settings.get("cfg", 2.7)),
                                   label=labels)
        images = vae.decode(tokens / LATENT_SCALE)
        return to_uint8(images, str(settings.get("rounding", "truncate")))


def sample(model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> torch.Tensor:
    """uint8 [N, 3, H, W] for int64 ``seeds`` [N] (>= 0) and ``labels`` [N] (None: the plan's,
    ``seed % classes``); see the module docstring for what an image depends on
    (:func:`neon_cli.repo.sample_by_seed_blocks`). Raises ValueError for negative seeds."""
    net, aux = unwrap(model)
    dev = next(net.parameters()).device
    vae = aux.vae.to(dev)

    def draw(first: int, block_labels: torch.Tensor) -> torch.Tensor:
        return decode_block(net, vae, block_labels.to(dev), first, settings)

    return sample_by_seed_blocks(seeds, labels, int(settings.get("seed_block", 64)), int(aux.kwargs["class_num"]), draw)
