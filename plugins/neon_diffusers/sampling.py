"""Sampling and fine-tuning of a diffusers ``UNet2DModel`` (imports torch and diffusers).

Sampling follows ``DDPMPipeline.__call__`` / ``DDIMPipeline.__call__`` step for step (diffusers
0.42): initial noise ``randn_tensor`` with a **list of generators, one per image** (generator i
seeded with seeds[i]), ``scheduler.set_timesteps(steps)``, then per timestep the UNet output and
``scheduler.step(..., generator=generators)``: the DDPM posterior noise (and DDIM's for eta > 0)
of image i is drawn from its own generator, so image i depends only on its seed, its label and
the settings. Output conversion as the pipelines' ``output_type="np"`` + ``numpy_to_pil``:
``round(clamp(x / 2 + 0.5, 0, 1) * 255)`` as uint8.

Classifier-free guidance (Ho & Salimans 2022) on class-conditional UNets: the model output is
``out_uncond + gamma * (out_cond - out_uncond)`` with the null class as the unconditional label
(gamma = 1: conditional only, one UNet call; gamma = 0: unconditional only); applied to the
model output whatever the scheduler's ``prediction_type``.

Fine-tuning follows ``examples/unconditional_image_generation/train_unconditional.py``: images
to [-1, 1] (``Normalize([0.5], [0.5])``), noise ~ N(0, I), timesteps uniform in
[0, num_train_timesteps), ``scheduler.add_noise``; loss by ``prediction_type``: ``epsilon``
MSE(output, noise); ``v_prediction`` MSE(output, ``scheduler.get_velocity``) (diffusers' other
training examples); ``sample`` the SNR-weighted MSE(output, x0) of train_unconditional. AdamW
(betas 0.95, 0.999, weight decay 1e-6, eps 1e-8) with gradient-norm clipping at 1.0 (the script's
``clip_grad_norm_(..., 1.0)``). Class-conditional models: labels replaced by the null class with
probability ``LABEL_DROPOUT`` (0.1), the usual CFG training recipe (no diffusers script trains a
class-conditional UNet2DModel).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from neon_cli.train import grad_clipped
import torch.nn.functional as F

from neon_cli.errors import FamilyError
from neon_diffusers.io import ModelInfo, quiet_diffusers, scheduler_class

LABEL_DROPOUT = 0.1
MAX_GRAD_NORM = 1.0


def info_of(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` attached by :func:`neon_diffusers.io.load` (through a DDP wrapper too)."""
    core = getattr(model, "module", model)
    info = getattr(core, "neon_info", None)
    if info is None:
        raise FamilyError("diffusers: model was not loaded with the diffusers family (no neon_info)")
    return info


def make_scheduler(info: ModelInfo, kind: str) -> Any:
    """A fresh DDPMScheduler (``kind`` "ddpm") or DDIMScheduler ("ddim") from the model's scheduler config."""
    name = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}.get(kind)
    if name is None:
        raise FamilyError(f"--set scheduler={kind}: expected ddpm or ddim")
    with quiet_diffusers():
        return scheduler_class(name).from_config(dict(info.scheduler_config))


def image_shape(unet: Any) -> tuple[int, int, int]:
    """(C, H, W) the UNet generates, from its config (``sample_size`` int or (H, W))."""
    cfg = unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(cfg.in_channels), int(h), int(w)


def _check_labels(info: ModelInfo, labels: Any, gamma: float) -> None:
    if info.num_classes == 0:
        if labels is not None:
            raise FamilyError("diffusers: labels given but the model is unconditional (no num_class_embeds)")
        if gamma != 1.0:
            raise FamilyError(f"--set guidance={gamma:g}: guidance needs a class-conditional model; this one is unconditional")
        return
    if labels is None:
        raise FamilyError(f"diffusers: the model is class-conditional ({info.num_classes} classes); labels are required")
    if gamma != 1.0 and info.null_class is None:
        raise FamilyError(f"--set guidance={gamma:g}: the model has no null class (neon.json null_class is null); use guidance=1")


def guided_output(unet: Any, x: torch.Tensor, t: Any, labels: torch.Tensor | None, gamma: float, null_class: int | None) -> torch.Tensor:
    """UNet output with classifier-free guidance: ``u + gamma (c - u)`` (float32 [N, C, H, W]).

    ``labels`` None: the unconditional UNet's output. gamma == 1: conditional only; gamma == 0:
    null class only; otherwise one UNet call on the doubled batch ``[x, x]`` with labels
    ``[labels, null]``.
    """
    if labels is None:
        return unet(x, t, return_dict=False)[0]
    if gamma == 1.0:
        return unet(x, t, class_labels=labels, return_dict=False)[0]
    null = torch.full_like(labels, int(null_class))
    if gamma == 0.0:
        return unet(x, t, class_labels=null, return_dict=False)[0]
    both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null]), return_dict=False)[0]
    cond, uncond = both.chunk(2)
    return uncond + gamma * (cond - uncond)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8, as DDPMPipeline (clamp(x/2 + 0.5, 0, 1)) + numpy_to_pil (round(x * 255))."""
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def sample(unet: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> torch.Tensor:
    """uint8 [N, C, H, W] on CPU: DDPM/DDIM sampling with per-image generators and CFG (module doc).

    settings: ``scheduler`` ("ddpm" | "ddim"), ``steps`` (inference steps = UNet evaluations,
    doubled when 0 < gamma != 1), ``eta`` (DDIM only), ``guidance`` (gamma). Runs on the UNet's
    device; the noise is drawn on the CPU, so images do not depend on the device's RNG.
    """
    from diffusers.utils.torch_utils import randn_tensor

    info = info_of(unet)
    gamma = float(settings.get("guidance", 1.0))
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
    _check_labels(info, labels, gamma)
    n = len(seeds)
    c, h, w = image_shape(unet)
    if n == 0:
        return torch.empty((0, c, h, w), dtype=torch.uint8)
    device = next(unet.parameters()).device
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]
    kind = str(settings.get("scheduler", "ddpm"))
    sched = make_scheduler(info, kind)
    sched.set_timesteps(int(settings.get("steps", 1000)))
    extra = {"eta": float(settings.get("eta", 0.0))} if kind == "ddim" else {}
    lab = labels.to(device) if labels is not None else None
    with torch.no_grad():
        x = randn_tensor((n, c, h, w), generator=gens, device=device, dtype=unet.dtype)
        for t in sched.timesteps:
            out = guided_output(unet, x, t, lab, gamma, info.null_class)
            x = sched.step(out, t, x, generator=gens, **extra).prev_sample
    return to_uint8(x).cpu()


def loss(model: Any, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """train_unconditional.py's objective on uint8 images [N, C, H, W]; float32 scalar (module doc).

    All randomness (noise, timesteps, label dropout) comes from ``generator``. Computes through
    ``model(...)`` so DistributedDataParallel synchronises gradients.
    """
    info = info_of(model)
    core = getattr(model, "module", model)
    sched = make_scheduler(info, "ddpm")
    device = next(core.parameters()).device
    x0 = (images.to(torch.float32) / 127.5 - 1.0)
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, int(sched.config.num_train_timesteps), (n,), generator=generator)
    lab = None
    if info.num_classes:
        if labels is None:
            raise FamilyError("diffusers: the model is class-conditional; the synthetic set has no labels")
        lab = labels.to(torch.int64)
        if info.null_class is not None:
            drop = torch.rand(n, generator=generator) < LABEL_DROPOUT
            lab = torch.where(drop, torch.full_like(lab, info.null_class), lab)
        lab = lab.to(device)
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    noisy = sched.add_noise(x0, noise, t)
    out = model(noisy, t, class_labels=lab, return_dict=False)[0]
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return F.mse_loss(out.float(), noise.float())
    if kind == "v_prediction":
        return F.mse_loss(out.float(), sched.get_velocity(x0, noise, t).float())
    if kind == "sample":
        alpha_t = sched.alphas_cumprod.to(device)[t].float().reshape(n, 1, 1, 1)
        snr = alpha_t / (1 - alpha_t)
        return (snr * F.mse_loss(out.float(), x0.float(), reduction="none")).mean()
    raise FamilyError(f"{info.source}: scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


#: AdamW that clips the global gradient norm of its parameters to ``max_grad_norm`` before each step.
ClippedAdamW = grad_clipped(torch.optim.AdamW)


def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    """train_unconditional.py's AdamW: betas (0.95, 0.999), weight_decay 1e-6, eps 1e-8, grad-norm clip 1.0."""
    return ClippedAdamW(params, lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8, max_grad_norm=MAX_GRAD_NORM)
