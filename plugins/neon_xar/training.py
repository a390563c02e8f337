"""xAR's fine-tuning recipe, the Neon repository's ``train_new.py`` as the paper ran it, on neon's core loop.

What ``train_new.py --resume xAR-B.pth --blr 1e-6 --warmup_epochs = --epochs`` does per step, and
what neon does in its place:

* **data**: ImageNet-style images (center crop, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize(0.5, 0.5)``), encoded by the frozen KL-16 VAE, ``x = posterior.sample() * 0.2325``;
  with ``--use_cached`` the posterior moments of each image and of its mirror image are cached
  and one of the two is drawn per image (MAR's ``CachedFolder``, ``torch.rand(1) < 0.5`` keeps the
  original). neon's ``encode`` hook caches exactly those two moment tensors per image of S
  (``[moments, moments_flip]`` stacked on channels: float32 [N, 4 E, h, w]), and ``loss`` draws
  the flip per image (``hflip`` setting; without a cache it encodes the chosen view on the fly,
  which gives the same batch);
* **loss**: the checkout's ``model(x, labels)`` (xAR's velocity regression with logit-normal
  times, label dropout to the null class, noisy context), called through the model's forward so
  DistributedDataParallel synchronises; xAR's randomness (``torch.rand``, ``torch.randn``,
  scipy's ``norm.rvs`` on numpy's global generator) is seeded per step from the core's generator
  (:func:`neon_cli.repo.seeded_global_rng`), so a resumed run repeats the same noise. The
  official step runs the loss under fp16 autocast with a GradScaler; neon's core loop has no loss
  scaler, so the loss is computed in float32 (the same function, without fp16 rounding);
* **optimiser**: ``AdamW(betas=(0.9, 0.96))``, weight decay 0.02 except on 1-D parameters
  (biases, norms: ``misc.add_weight_decay``), gradient norm clipped to 1.0 (``--grad_clip``);
* **schedule** (core loop, ``train_defaults``): ``lr = blr * batch / 256`` (paper: blr 1e-6 at a
  global batch of 256 = 32 x 8 GPUs, so lr 1e-6), ramped linearly from 0 over the run
  (``--warmup_epochs`` = ``--epochs``; the paper: "a linear warmup schedule over the 7 Mi images
  seen", 7 x 2**20 images); EMA with rate 0.9999 per step (``--ema_rate``), i.e. a half-life of
  ``batch * ln 0.5 / ln 0.9999`` images (1,774,368 at batch 256).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from neon_cli.repo import cuda_calls_on_cpu, seeded_global_rng
from neon_xar.checkout import LATENT_SCALE, unwrap

#: train_new.py's defaults: --weight_decay 0.02, --grad_clip 1.0, AdamW betas (0.9, 0.96), --ema_rate 0.9999.
WEIGHT_DECAY = 0.02
GRAD_CLIP = 1.0
BETAS = (0.9, 0.96)
EMA_RATE = 0.9999


def ema_halflife_images(batch: int, rate: float = EMA_RATE) -> int:
    """Half-life in images of an EMA with ``rate`` per step of ``batch`` images (core loop:
    ``beta = 0.5 ** (batch / halflife)``)."""
    return int(round(batch * math.log(0.5) / math.log(rate)))


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 in [-1, 1]: torchvision's ``ToTensor`` (x / 255) then
    ``Normalize([0.5] * 3, [0.5] * 3)`` ((x - 0.5) / 0.5), as train_new.py's transform."""
    return images.to(torch.float32).div(255).sub(0.5).div(0.5)


def encode(model: Any, images: torch.Tensor) -> torch.Tensor:
    """The ``encode`` hook: float32 [N, 4 E, h, w], the VAE posterior moments of each image and of
    its horizontal mirror, ``cat([moments, moments_flip], 1)`` (MAR's cached latents)."""
    net, aux = unwrap(model)
    dev = next(net.parameters()).device
    vae = aux.vae.to(dev)
    x = to_unit(images.to(dev))
    with torch.no_grad():
        m = vae.encode(x).parameters
        mf = vae.encode(x.flip(dims=[3])).parameters
    return torch.cat([m, mf], dim=1).to(torch.float32)


def encode_key(model: Any, settings: Any) -> str:
    """Cache key of :func:`encode`: the VAE file's sha256 (the moments depend on nothing else)."""
    _net, aux = unwrap(model)
    return f"xar-vae-{aux.vae_sha256[:16]}-moments-hflip"


def latents(model: Any, inputs: torch.Tensor) -> torch.Tensor:
    """x = posterior.sample() * 0.2325 for a batch of uint8 images or cached moments (module
    docstring), from torch's global generator: first ``torch.rand(N) < 0.5`` (keep the original
    view), then the VAE (images only), then the posterior draw."""
    net, aux = unwrap(model)
    dev = inputs.device
    n = inputs.shape[0]
    keep = torch.rand(n) < 0.5
    if not aux.train.get("hflip", True):
        keep = torch.ones(n, dtype=torch.bool)
    keep = keep.to(dev).view(n, 1, 1, 1)
    with torch.no_grad():
        if inputs.dtype == torch.uint8:
            vae = aux.vae.to(dev)
            x = to_unit(inputs)
            moments = vae.encode(torch.where(keep, x, x.flip(dims=[3]))).parameters
        else:
            m, mf = inputs.to(torch.float32).chunk(2, dim=1)
            moments = torch.where(keep, m, mf)
        return aux.vae_module.DiagonalGaussianDistribution(moments).sample().mul_(LATENT_SCALE)


def loss(model: Any, inputs: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """xAR's training loss (scalar float32) on a batch of S: uint8 images [N, 3, H, W] or the
    cached moments of :func:`encode`; ``labels`` int64 [N] (xAR is class-conditional). The
    randomness is seeded from one draw of ``generator``."""
    from neon_cli.errors import FamilyError

    if labels is None:
        raise FamilyError("xAR is class-conditional but the synthetic set has no labels")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    dev = inputs.device
    with cuda_calls_on_cpu(dev.type != "cuda"), seeded_global_rng(seed, dev):
        x = latents(model, inputs)
        return model(x, labels.to(dev))


def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    """train_new.py's optimiser: AdamW(betas=(0.9, 0.96)) with weight decay 0.02 on parameters of
    more than one dimension and none on the others (``misc.add_weight_decay``), the gradient norm
    clipped to 1.0 before each step (``--grad_clip``)."""
    from neon_cli.train import grad_clipped

    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
              {"params": [p for p in params if p.ndim > 1], "weight_decay": WEIGHT_DECAY}]
    return grad_clipped(torch.optim.AdamW)(groups, lr=lr, betas=BETAS, max_grad_norm=GRAD_CLIP)
