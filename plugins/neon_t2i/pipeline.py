"""Loading, sampling, fine-tuning and saving of the ``t2i`` family (imports torch, diffusers, peft).

Sources: diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (sampling, prompt
encoding, ``save_lora_weights`` / ``load_lora_weights``) and its training scripts
``examples/text_to_image/train_text_to_image.py``, ``train_text_to_image_lora.py`` and
``train_text_to_image_sdxl.py`` (the loss, the optimiser, the LoRA configuration).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from neon_cli.errors import CheckpointError, FamilyError, UsageError

#: Pipeline classes read (``_class_name`` of ``model_index.json``).
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
#: The file ``save_lora_weights`` writes and ``load_lora_weights`` reads in a folder.
LORA_FILE = "pytorch_lora_weights.safetensors"
#: train_text_to_image_lora.py's LoRA targets (the attention projections).
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
NEON_JSON = "neon.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quiet() -> None:
    """No progress bars or advice from diffusers / transformers (library code prints nothing)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def read_neon_json(path: str | Path) -> dict[str, Any]:
    """The ``neon.json`` of a folder neon wrote ({} when absent or unreadable)."""
    f = Path(path) / NEON_JSON
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pipeline_class(path: str | Path) -> str:
    """``_class_name`` of the folder's ``model_index.json``; CheckpointError naming the file when it
    is missing, unreadable, or not one of :data:`PIPELINES`."""
    f = Path(path) / "model_index.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: not a diffusers pipeline folder (no model_index.json) and no LoRA "
                              f"({LORA_FILE}); the t2i family reads {', '.join(PIPELINES)} folders")
    try:
        name = json.loads(f.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{f}: unreadable ({exc})") from None
    if name not in PIPELINES:
        raise CheckpointError(f"{f}: pipeline class {name!r} is not one of {', '.join(PIPELINES)}")
    return str(name)


def is_lora(path: str | Path) -> bool:
    """True for a LoRA: a ``.safetensors`` file, or a folder with :data:`LORA_FILE` and no
    ``model_index.json``."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".safetensors"
    return (p / LORA_FILE).is_file() and not (p / "model_index.json").is_file()


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The pipeline at ``path`` (class from ``model_index.json``; local files only, nothing is
    downloaded), on CPU in ``dtype``, its progress bar off. Raises CheckpointError in one line."""
    import diffusers

    quiet()
    name = pipeline_class(path)
    try:
        with warnings.catch_warnings():  # e.g. diffusers' torch_dtype -> dtype rename notice
            warnings.simplefilter("ignore")
            pipe = getattr(diffusers, name).from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    except Exception as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise CheckpointError(f"{path}: cannot load {name} ({type(exc).__name__}: {first})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fuse_lora(pipe: Any, lora: str | Path, scale: float = 1.0) -> None:
    """Add the LoRA at ``lora`` (diffusers or kohya layout: ``load_lora_weights`` converts) to the
    pipeline's weights in place (``fuse_lora(lora_scale=scale)``, then the adapter is unloaded):
    W <- W + scale * s * B A for every adapted layer (s = alpha / r as stored)."""
    from safetensors.torch import load_file

    f = Path(lora) / LORA_FILE if Path(lora).is_dir() else Path(lora)
    try:
        state = load_file(str(f))
        pipe.load_lora_weights(state, adapter_name="neon_theta_s")
        pipe.fuse_lora(lora_scale=float(scale), adapter_names=["neon_theta_s"])
        pipe.unload_lora_weights()
    except Exception as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise CheckpointError(f"{f}: cannot apply this LoRA to its base ({type(exc).__name__}: {first})") from None


class T2IModel(torch.nn.Module):
    """A text-to-image pipeline whose only trained module is the UNet.

    ``state_dict()`` / ``parameters()`` are the UNet's (keys ``unet.*``: what neon merges); the VAE,
    text encoder(s), tokenizer(s) and scheduler ride along in ``pipe`` (not submodules) and follow
    ``.to()``. ``copy.deepcopy`` copies the UNet and shares the frozen parts (EMA, tune-w candidates).
    ``neon_info``: ``path``, ``class``, ``lora_rank`` (0: the UNet is trained in full).
    ``train_prompts``: S's prompts (set by ``neon finetune``), saved into snapshots' ``neon.json``.
    """

    def __init__(self, pipe: Any, info: dict[str, Any], unet: Any = None):
        super().__init__()
        self.unet = pipe.unet if unet is None else unet
        object.__setattr__(self, "pipe", pipe)
        object.__setattr__(self, "neon_info", info)
        object.__setattr__(self, "train_prompts", None)
        object.__setattr__(self, "text_cache", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The UNet's forward (so DistributedDataParallel sees the training computation)."""
        return self.unet(*args, **kwargs)

    def frozen(self) -> list[torch.nn.Module]:
        """The pipeline's modules other than the UNet (VAE, text encoders)."""
        return [m for k, m in self.pipe.components.items() if k != "unet" and isinstance(m, torch.nn.Module)]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        super()._apply(fn, *args, **kwargs)
        for m in self.frozen():
            m._apply(fn, *args, **kwargs)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> "T2IModel":
        new = T2IModel(self.pipe, dict(self.neon_info), unet=copy.deepcopy(self.unet, memo))
        object.__setattr__(new, "train_prompts", self.train_prompts)
        object.__setattr__(new, "text_cache", self.text_cache)
        new.train(self.training)
        return new

    def bound(self) -> Any:
        """The pipeline with this model's UNet in it."""
        if self.pipe.unet is not self.unet:
            self.pipe.unet = self.unet
        return self.pipe


def load(path: str | Path, settings: Mapping[str, Any] | None = None, purpose: str = "sample") -> T2IModel:
    """θ as a :class:`T2IModel` in eval mode on CPU.

    ``path``: a pipeline folder, or a LoRA (a folder with ``pytorch_lora_weights.safetensors`` or a
    ``.safetensors`` file, diffusers or kohya layout) applied to its base: ``--set lora_base=PIPE``,
    else the ``lora_base`` recorded in the LoRA folder's ``neon.json`` (every LoRA snapshot of
    ``neon finetune`` records it). A LoRA is fused (θ_s = θ_r + s B A, dense), so merges and
    tune-w see dense weights. ``purpose="train"``: float32, and with ``lora_rank`` R > 0 a fresh
    peft LoRA (train_text_to_image_lora.py's ``LoraConfig(r=R, lora_alpha=R,
    init_lora_weights="gaussian", target_modules=["to_k","to_q","to_v","to_out.0"])``) on the
    frozen UNet. Raises CheckpointError / UsageError in one line.
    """
    settings = dict(settings or {})
    train = purpose == "train"
    dtype = torch.float32 if train else DTYPES[str(settings.get("dtype") or "float32")]
    p = Path(path)
    meta = read_neon_json(p if p.is_dir() else p.parent)
    if is_lora(p):
        base = settings.get("lora_base") or meta.get("lora_base")
        if not base:
            raise UsageError(f"{p}: a LoRA needs its base pipeline: give --set lora_base=PIPELINE_FOLDER")
        if not Path(base).is_dir():
            raise UsageError(f"{p}: its base pipeline {base} does not exist (--set lora_base=PIPELINE_FOLDER)")
        pipe = load_pipeline(base, dtype)
        fuse_lora(pipe, p)
        cls = pipeline_class(base)
    else:
        pipe = load_pipeline(p, dtype)
        cls = pipeline_class(p)
    rank = int(settings.get("lora_rank") or 0) if train else 0
    for m in [pipe.vae, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)]:
        if m is not None:
            m.requires_grad_(False)
    model = T2IModel(pipe, {"path": str(p), "class": cls, "lora_rank": rank})
    if rank:
        from peft import LoraConfig

        model.unet.requires_grad_(False)
        model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    else:
        model.unet.requires_grad_(train)
    if settings.get("prompts") and not train:
        from neon_t2i.prompts import check_disjoint, read_prompts

        if meta.get("train_prompts"):
            check_disjoint(read_prompts(settings["prompts"]), meta["train_prompts"], str(p))
    return model.eval()


def save(model: T2IModel, path: str | Path, metadata: Mapping[str, str]) -> None:
    """Write θ_s at ``path`` (a folder) with ``neon.json`` (``metadata``, S's prompts as
    ``train_prompts``): the pipeline folder (``save_pretrained``, safetensors) when the UNet is
    trained in full, else the LoRA as ``save_lora_weights`` writes it (``pytorch_lora_weights.safetensors``,
    keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, peft's layout; train_text_to_image_lora.py
    converts the same tensors to the older ``lora.down`` / ``lora.up`` names first)
    plus ``lora_base`` / ``lora_rank`` in ``neon.json``."""
    out = Path(path)
    info = dict(model.neon_info)
    meta: dict[str, Any] = {**{k: str(v) for k, v in metadata.items()}, "pipeline": info["class"]}
    if model.train_prompts is not None:
        meta["train_prompts"] = [p["prompt"] for p in model.train_prompts]
    pipe = model.pipe
    if info.get("lora_rank"):
        from peft.utils import get_peft_model_state_dict

        # peft's key layout (lora_A / lora_B), as diffusers' newer LoRA scripts save; train_text_to_image_lora.py
        # first converts to the older lora.down / lora.up names: load_lora_weights reads both
        layers = get_peft_model_state_dict(model.unet)
        out.mkdir(parents=True, exist_ok=True)
        type(pipe).save_lora_weights(save_directory=str(out), unet_lora_layers=layers, safe_serialization=True)
        base = Path(info["path"])
        meta.update(lora_base=str(base.resolve()), lora_rank=int(info["lora_rank"]), lora_alpha=int(info["lora_rank"]))
    else:
        model.bound().save_pretrained(str(out), safe_serialization=True)
    (out / NEON_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def sample(model: T2IModel, seeds: Any, labels: Any, settings: Mapping[str, Any], prompts: list[dict[str, str]]) -> torch.Tensor:
    """uint8 [N, 3, H, W]: ``pipe(prompt=[prompts[labels[i] % P]], negative_prompt=...,
    generator=[torch.Generator().manual_seed(seeds[i])], num_inference_steps=steps,
    guidance_scale=guidance, height=width=resolution, output_type="np")`` with the pipeline's own
    scheduler, converted as the pipeline's ``numpy_to_pil`` does (``(x * 255).round()``). Each
    image's noise comes from its own CPU generator (any device gives the same initial latents)."""
    import numpy as np

    if labels is None:
        raise UsageError("family 't2i': no prompts: give --set prompts=FILE")
    pipe = model.bound()
    idx = [int(v) % len(prompts) for v in labels.tolist()]
    negs = [prompts[i]["negative_prompt"] for i in idx]
    kwargs: dict[str, Any] = dict(
        prompt=[prompts[i]["prompt"] for i in idx],
        negative_prompt=negs if any(negs) else None,
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds.tolist()],
        num_inference_steps=int(settings["steps"]),
        guidance_scale=float(settings["guidance"]),
        output_type="np",
    )
    if int(settings.get("resolution") or 0):
        kwargs["height"] = kwargs["width"] = int(settings["resolution"])
    images = pipe(**kwargs).images
    arr = (np.asarray(images) * 255).round().astype(np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def encode(model: T2IModel, images: Any) -> torch.Tensor:
    """The frozen VAE's latent distribution of uint8 images [n, 3, H, W] (scaled to [-1, 1] as the
    training scripts' ``Normalize([0.5], [0.5])``): float32 [n, 2 * latent_channels, H/f, W/f], the
    ``DiagonalGaussianDistribution`` parameters (mean, log-variance), so the loss draws
    ``latent_dist.sample()`` afresh at every step exactly as the scripts do."""
    vae = model.pipe.vae
    dev = next(vae.parameters()).device
    x = images.to(dev, torch.float32) / 127.5 - 1.0
    return vae.encode(x.to(vae.dtype)).latent_dist.parameters.float()


def _text_condition(model: T2IModel, labels: torch.Tensor, dev: Any, image_hw: tuple[int, int]) -> tuple[Any, Any]:
    """(encoder_hidden_states, added_cond_kwargs or None) of the prompts ``labels`` index, from the
    text embeddings of S's prompts computed once (``pipe.encode_prompt``, no guidance) and kept."""
    if model.train_prompts is None:
        raise FamilyError("family 't2i': the synthetic set's prompts are unknown (S was not made by 'neon synth t2i')")
    pipe = model.pipe
    xl = model.neon_info["class"] == "StableDiffusionXLPipeline"
    if model.text_cache is None or model.text_cache["embeds"].device != torch.device(dev):
        texts = [p["prompt"] for p in model.train_prompts]
        embeds, pooled = [], []
        with torch.no_grad():
            for a in range(0, len(texts), 64):
                out = pipe.encode_prompt(prompt=texts[a:a + 64], device=dev, num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
                embeds.append(out[0].float())
                if xl:
                    pooled.append(out[2].float())
        cache = {"embeds": torch.cat(embeds), "pooled": torch.cat(pooled) if xl else None}
        object.__setattr__(model, "text_cache", cache)
    cache = model.text_cache
    idx = labels.to(cache["embeds"].device).long() % cache["embeds"].shape[0]
    ehs = cache["embeds"][idx]
    if not xl:
        return ehs, None
    h, w = image_hw  # train_text_to_image_sdxl.py: original size + crop (0, 0) + target size
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=ehs.dtype, device=ehs.device).repeat(len(idx), 1)
    return ehs, {"text_embeds": cache["pooled"][idx], "time_ids": time_ids}


def loss(model: Any, inputs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """train_text_to_image.py's loss: latents = ``latent_dist.sample() * scaling_factor`` (minus
    ``shift_factor`` where the VAE has one), noise ~ N(0, I), t ~ U{0 .. T-1}, ``add_noise`` of
    the training ``DDPMScheduler`` built from the pipeline's scheduler config, target the noise
    (``prediction_type`` epsilon) or ``get_velocity`` (v_prediction), MSE in float32 (mean).

    ``inputs``: the cached VAE moments (:func:`encode`) or uint8 images [n, 3, H, W] (encoded
    here). ``labels``: int64 prompt indices into S's prompts. Noise from ``generator`` (CPU).
    """
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.utils.torch_utils import randn_tensor

    inner = getattr(model, "module", model)  # DistributedDataParallel
    pipe = inner.pipe
    dev = next(inner.unet.parameters()).device
    with torch.no_grad():
        moments = encode(inner, inputs) if inputs.dtype == torch.uint8 else inputs.to(dev, torch.float32)
        latents = DiagonalGaussianDistribution(moments).sample(generator=generator)
        cfg = pipe.vae.config
        if getattr(cfg, "shift_factor", None) is not None:
            latents = latents - cfg.shift_factor
        latents = latents * cfg.scaling_factor
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    noise = randn_tensor(latents.shape, generator=generator, device=dev, dtype=latents.dtype)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(dev)
    noisy = sched.add_noise(latents, noise, t)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = sched.get_velocity(latents, noise, t)
    else:
        raise FamilyError(f"family 't2i': scheduler prediction_type {kind!r} is not trained (epsilon or v_prediction)")
    f = pipe.vae_scale_factor
    ehs, added = _text_condition(inner, labels, dev, (latents.shape[2] * f, latents.shape[3] * f))
    unet_dtype = inner.unet.dtype
    kwargs = {"added_cond_kwargs": added} if added is not None else {}
    pred = model(noisy.to(unet_dtype), t, ehs.to(unet_dtype), return_dict=False, **kwargs)[0]
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def make_optimizer(params: Any, lr: float) -> Any:
    """AdamW over the trainable parameters (the UNet, or its LoRA factors), betas (0.9, 0.999),
    weight decay 1e-2, eps 1e-8, gradient-norm clip 1.0: train_text_to_image(_lora).py's defaults."""
    from neon_cli.train import grad_clipped

    trainable = [p for p in params if p.requires_grad]
    return grad_clipped(torch.optim.AdamW)(trainable, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                           max_grad_norm=1.0)


def vae_key(model: T2IModel) -> str:
    """A short sha256 of the VAE's weights (what the cached encoding depends on)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.pipe.vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
