"""VAR's training recipe for ``neon finetune``: teacher-forced next-scale cross-entropy over the
VQVAE's token maps, VAR's AdamW parameter groups, gradient clipping and fp16 loss scaling.

Sources: FoundationVision/VAR ``trainer.py`` (``VARTrainer.train_step``: tokens
``vae.img_to_idxBl(x)``, inputs ``quantize.idxBl_to_var_input``, ``CrossEntropyLoss(label_smoothing=
ls, reduction='none')`` weighted 1/L per token, summed over tokens, averaged over the batch),
``train.py`` (``filter_params`` no-decay rules, ``AdamW(betas=(0.9, 0.95), fused)``),
``utils/amp_sc.py`` (``AmpOptimizer``: fp16 autocast with ``GradScaler(init_scale=2**11,
growth_interval=1000)``, the scale capped at 32768, unscale then ``clip_grad_norm_(tclip)``),
``utils/arg_util.py`` (``tclip=2``, ``twd=0.05``, ``ls=0``, ``fp16``), and the Neon repository's
``VAR_imagenet_256/train.py`` / ``run_var_imagenet_256.sh`` (target lr 1e-5 ramped linearly over
the whole run, global batch 768, ``--fp16=1``).

Inputs: the tokens of S are computed once by :func:`encode` (the VQVAE is frozen) and cached by
the core next to S; :func:`loss` takes either those tokens (int [B, L]) or uint8 images (encoded
on the fly, e.g. for ``neon align``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from neon_var.io import unwrap

#: train.py's filter_params: names with these parts get no weight decay (nor do 1-d tensors and biases)
NO_DECAY = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
            "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def images_to_pm1(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1]: torchvision's ToTensor (x / 255) then VAR's
    ``normalize_01_into_pm1`` (x + x - 1)."""
    x = images.float().div(255)
    return x.add(x).add_(-1)


@torch.no_grad()
def encode(model: Any, images: torch.Tensor) -> torch.Tensor:
    """Token maps of uint8 images [B, 3, H, W] as int16 (V <= 32767) or int32 [B, L]: the
    VQVAE's ``img_to_idxBl`` for every scale, concatenated coarse to fine (VARTrainer's ``gt_BL``).
    Raises ValueError when H, W differ from the model's resolution."""
    m = unwrap(model)
    side = int(m.info["patch_nums"][-1]) * int(m.info["downsample"])
    if tuple(images.shape[1:]) != (3, side, side):
        raise ValueError(f"var family: images are {tuple(images.shape[1:])}, the VQVAE takes (3, {side}, {side})")
    dev = m.var.lvl_1L.device
    tokens = torch.cat(m.vae.img_to_idxBl(images_to_pm1(images.to(dev))), dim=1)
    return tokens.to(torch.int16 if int(m.info["V"]) <= 32767 else torch.int32).cpu()


def _seed_from(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def loss(model: Any, batch: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None,
         label_smooth: float = 0.0) -> torch.Tensor:
    """VARTrainer's training loss (scalar float32) of one batch: ``batch`` = tokens int [B, L]
    (from :func:`encode`) or uint8 images [B, 3, H, W]; ``labels`` int64 [B].

    Randomness: VAR's forward drops labels to the null class with probability 0.1 (and applies
    stochastic depth) with torch's global generator; here it is seeded from ``generator`` inside
    ``torch.random.fork_rng``, so a step is reproducible and the caller's global state untouched.
    With loss scaling active (see :class:`VarAdamW`) the forward runs under fp16 autocast and the
    gradient of the returned loss is multiplied by the current scale (its value is not).
    """
    m = unwrap(model)
    dev = m.var.lvl_1L.device
    if labels is None:
        raise ValueError("var family: training needs class labels")
    tokens = encode(m, batch) if batch.dtype == torch.uint8 and batch.dim() == 4 else batch
    tokens = tokens.to(dev).long()
    L, V = int(m.info["L"]), int(m.info["V"])
    if tokens.dim() != 2 or tokens.shape[1] != L:
        raise ValueError(f"var family: expected tokens [B, {L}], got {tuple(tokens.shape)}")
    B = tokens.shape[0]
    gt_idx_Bl = [tokens[:, a:b] for a, b in m.info["begin_ends"]]
    with torch.no_grad():
        x_BLCv_wo_first_l = m.vae.quantize.idxBl_to_var_input(gt_idx_Bl)
    amp = getattr(m, "amp", None)
    autocast = amp.autocast(dev) if amp is not None else None
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_seed_from(generator))
        if autocast is not None:
            with autocast:
                logits = model(labels.to(dev), x_BLCv_wo_first_l)
                value = _weighted_ce(logits, tokens, B, L, V, label_smooth)
        else:
            logits = model(labels.to(dev), x_BLCv_wo_first_l)
            value = _weighted_ce(logits, tokens, B, L, V, label_smooth)
    if amp is not None and amp.scaler is not None and value.requires_grad:
        value.register_hook(amp.scale_gradient)
    return value


def _weighted_ce(logits: torch.Tensor, tokens: torch.Tensor, B: int, L: int, V: int, ls: float) -> torch.Tensor:
    ce = F.cross_entropy(logits.view(-1, V), tokens.view(-1), label_smoothing=ls, reduction="none").view(B, -1)
    weight = torch.ones(1, L, device=logits.device) / L  # VARTrainer.loss_weight
    return ce.mul(weight).sum(dim=-1).mean()


class AmpState:
    """fp16 / bf16 autocast and (fp16) GradScaler of one model, as VAR's ``AmpOptimizer``.

    ``mixed_precision``: VAR's ``--fp16`` (0 fp32, 1 fp16 with loss scaling, 2 bf16). Active only
    once :class:`VarAdamW` is made for parameters on a CUDA device (``fp16 only on CUDA``);
    elsewhere training is fp32.
    """

    def __init__(self, mixed_precision: int):
        self.mixed_precision = int(mixed_precision)
        self.device_type: str | None = None
        self.scaler: Any = None

    def enable(self, device: torch.device) -> None:
        if self.mixed_precision and device.type == "cuda":
            self.device_type = "cuda"
            if self.mixed_precision == 1:
                self.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 11, growth_interval=1000)

    def autocast(self, device: torch.device) -> Any:
        if self.device_type is None or device.type != self.device_type:
            return None
        dtype = torch.float16 if self.mixed_precision == 1 else torch.bfloat16
        return torch.autocast(self.device_type, dtype=dtype, cache_enabled=True)

    def scale_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(grad)


class VarAdamW(torch.optim.AdamW):
    """AdamW with VAR's recipe around ``step``: fp16 gradients unscaled (steps with inf/NaN
    gradients skipped and the scale halved, as ``GradScaler``), the global gradient norm clipped to
    ``grad_clip`` (VAR's ``tclip``; <= 0 off), then the AdamW step; the loss scale is capped at
    32768 as ``AmpOptimizer`` does. ``state_dict`` carries the GradScaler's state (resume)."""

    def __init__(self, params: Any, *, amp: AmpState | None = None, grad_clip: float = 2.0, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.amp = amp
        self.grad_clip = float(grad_clip)
        self._inner = False

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def step(self, closure: Any = None) -> Any:
        if self._inner:  # GradScaler.step calls back into this method
            return super().step(closure)
        scaler = self.amp.scaler if self.amp is not None else None
        if scaler is not None:
            scaler.unscale_(self)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params(), self.grad_clip)
        if scaler is None:
            return super().step(closure)
        self._inner = True
        try:
            out = scaler.step(self)
        finally:
            self._inner = False
        if scaler.get_scale() > 32768.0:
            scaler.update(new_scale=32768.0)
        else:
            scaler.update()
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.amp is not None and self.amp.scaler is not None:
            state["grad_scaler"] = self.amp.scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = dict(state_dict)
        scaler_state = state.pop("grad_scaler", None)
        super().load_state_dict(state)
        if scaler_state is not None and self.amp is not None and self.amp.scaler is not None:
            self.amp.scaler.load_state_dict(scaler_state)


def make_optimizer(params: Iterable[torch.Tensor], lr: float, *, weight_decay: float = 0.05,
                   grad_clip: float = 2.0) -> VarAdamW:
    """:class:`VarAdamW` over ``params`` (a VarModel's ``parameters()``) in VAR's two groups:
    decay ``weight_decay`` for matrices, none for 1-d tensors, biases and the :data:`NO_DECAY`
    names (positions, level embeddings, attention scales); betas (0.9, 0.95); fused on CUDA.

    The names come from the tags :func:`tag_parameters` puts on a loaded model's parameters; the
    loss-scaling state from the same tags (fp16 on CUDA, see :class:`AmpState`)."""
    params = [p for p in params if p.requires_grad]
    decay, no_decay, amp = [], [], None
    for p in params:
        name = getattr(p, "_neon_var_name", "")
        amp = amp or getattr(p, "_neon_var_amp", None)
        if p.ndim == 1 or name.endswith("bias") or any(k in name for k in NO_DECAY):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [g for g in ({"params": decay, "weight_decay": float(weight_decay)},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    cuda = bool(params) and params[0].is_cuda
    if amp is not None and params:
        amp.enable(params[0].device)
    return VarAdamW(groups, amp=amp, grad_clip=grad_clip, lr=lr, betas=(0.9, 0.95), fused=cuda or None)


def tag_parameters(model: Any, amp: AmpState, train: Mapping[str, Any]) -> None:
    """Record on each parameter of a VarModel its name inside VAR (``_neon_var_name``, for the
    weight-decay groups), the model's :class:`AmpState` (``_neon_var_amp``) and its training
    settings (``_neon_var_train``: ``twd``, ``tclip``), which :func:`make_optimizer` reads: the core
    hands a family's ``make_optimizer`` the parameters alone."""
    m = unwrap(model)
    m.amp = amp
    for name, p in m.var.named_parameters():
        p._neon_var_name = name
        p._neon_var_amp = amp
        p._neon_var_train = dict(train)
