"""IMM's fine-tuning recipe, the Neon repository's ``imm/train.py`` as the paper ran it, on neon's core loop.

What ``train.py --config-name=im256.yaml training.transfer=imagenet256_ts_a2.pkl`` does per step,
and what neon does in its place:

* **data**: S encoded once by the SD-VAE (``dataset_tool.py encode``: the posterior's mean and std,
  8 channels) and, per batch, ``encoder.encode(raw)`` (a posterior draw, whitened to the
  network's latent scale). neon's ``encode`` hook caches ``encoder.encode_pixels(S)`` beside S; the
  loss calls ``encoder.encode`` on the cached raw latents (or on the images, for a set not
  encoded yet, or a pixel-space network); labels are one-hot float32 as IMM's dataset gives them;
* **loss**: the training config's ``training.loss.IMMLoss`` (the Neon repository's
  ``configs/im256.yaml``: MMD with a Laplace kernel, ``matrix_size`` 4 particles per (t, r, s),
  ``a`` 2, ``b`` 4, ``k`` 12, label dropout 0.1, uniform t), called as the training loop does,
  ``loss_fn(net=ddp, images, labels, augment_pipe=None, device)``, and reduced with ``.mean()``.
  The loss uses ``net.module`` and ``torch.cuda.get_rng_state`` (the shared dropout mask): outside
  DDP the network is handed over in a wrapper with a ``module`` attribute, on CPU the RNG calls act
  on the CPU generator (:func:`neon_cli.repo.cuda_calls_on_cpu`). Its randomness (``torch.rand``,
  ``torch.randn``) is seeded per step from the core's generator. The official step uses the
  network's fp16 autocast with a GradScaler; neon's core loop has no loss scaler, so the loss is
  computed with the network's mixed precision off (float32), and snapshots keep the setting;
* **optimiser**: ``AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)`` (im256.yaml's);
* **schedule** (core loop, ``train_defaults``): constant lr 1e-6 (the paper), batch 512, EMA with
  a fixed beta 0.9999 per step (``ema_halflife_kimg: null``, ``ema_beta: 0.9999``), i.e. a half-life
  of ``512 * ln 0.5 / ln 0.9999`` = 3,548,736 images; snapshots every 102.4 kimg (a tick) in the
  paper: ``--save-every 102400``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from neon_cli.errors import FamilyError
from neon_cli.repo import cuda_calls_on_cpu, seeded_global_rng
from neon_imm.checkout import unwrap

#: im256.yaml's optimizer block.
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.0


class _AsDDP:
    """``net`` callable as ``net(...)`` with ``.module`` (what IMM's loss expects from DDP)."""

    def __init__(self, module: Any):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


@contextlib.contextmanager
def full_precision(net: Any) -> Iterator[None]:
    """The network's own mixed precision (``use_mixed_precision``) off within the block."""
    old = getattr(net, "use_mixed_precision", None)
    if old is not None:
        net.use_mixed_precision = False
    try:
        yield
    finally:
        if old is not None:
            net.use_mixed_precision = old


def encode(model: Any, images: torch.Tensor) -> torch.Tensor:
    """The ``encode`` hook: ``encoder.encode_pixels(images)`` (SD-VAE mean and std, float32
    [N, 8, h, w]; a pixel-space encoder returns the images unchanged)."""
    net, aux = unwrap(model)
    dev = next(net.parameters()).device
    with torch.no_grad():
        raw = aux.encoder.encode_pixels(images.to(dev))
    return raw if raw.dtype == torch.uint8 else raw.to(torch.float32)


def encode_key(model: Any, settings: Any) -> str:
    """Cache key of :func:`encode`: the encoder's class, VAE and whitening."""
    import hashlib

    _net, aux = unwrap(model)
    return "imm-" + hashlib.sha256(aux.encoder_key.encode()).hexdigest()[:16]


def loss(model: Any, inputs: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """IMM's training loss (scalar float32) on a batch of S: uint8 images [N, 3, H, W] or the raw
    latents of :func:`encode`; ``labels`` int64 [N] (None for an unconditional network). The batch
    must hold whole groups of ``matrix_size`` particles. FamilyError otherwise, or when the
    network was not loaded for training."""
    net, aux = unwrap(model)
    if aux.loss_fn is None:
        raise FamilyError("the IMM network was not loaded for training (neon finetune loads it with its loss)")
    m = int(getattr(aux.loss_fn, "matrix_size", 1) or 1)
    if inputs.shape[0] % m:
        raise FamilyError(f"--batch: IMM's loss groups particles by matrix_size={m}; each batch (per rank) must be a "
                          f"multiple of it, got {inputs.shape[0]}")
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    dev = inputs.device
    onehot = None
    if label_dim:
        if labels is None:
            raise FamilyError(f"the IMM network is class-conditional ({label_dim} classes) but the synthetic set has no labels")
        onehot = torch.nn.functional.one_hot(labels.to(dev).long(), num_classes=label_dim).to(torch.float32)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    caller = model if hasattr(model, "module") else _AsDDP(model)
    with cuda_calls_on_cpu(dev.type != "cuda"), seeded_global_rng(seed, dev), full_precision(net):
        x = aux.encoder.encode(inputs)
        value, _logs = aux.loss_fn(net=caller, images=x, labels=onehot, augment_pipe=None, device=dev)
    return value.mean()


def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    """``AdamW(params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)`` (im256.yaml)."""
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
