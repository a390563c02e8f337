"""The ``t2i`` family: a local diffusers text-to-image pipeline folder (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``; the class read from ``model_index.json``), sampled from prompts with
the pipeline's own scheduler and fine-tuned as diffusers' ``train_text_to_image.py`` /
``train_text_to_image_lora.py`` do. Optional extra ``pip install 'neon-cli[t2i]'``.

This module imports no torch, diffusers, transformers or peft; the methods import them when called.

**Prompts** (``--set prompts=FILE``: one prompt per line, or JSON lines with ``prompt`` and optional
``negative_prompt``; :mod:`neon_t2i.prompts`). The plan's labels are prompt indices: image i of a
plan uses seed ``seed + i`` and prompt ``(seed + i) mod P`` (``model_num_classes`` returns P), so
any rank or batch split gives the same set. ``neon synth`` keeps the prompts in S's manifest
(``conditioning``, :meth:`T2IFamily.synth_conditioning`) and the prompt index of every image in its
shards (``labels``); ``neon export S --format imagefolder`` writes them as ``metadata.jsonl``.
For ``neon eval`` / ``neon tune-w`` the same setting names the *evaluation* prompts; a θ_s whose
``neon.json`` lists S's prompts refuses evaluation prompts that overlap them.

**Checkpoints** are folders (``checkpoint_suffix = ""``): a pipeline folder, or a LoRA
(``pytorch_lora_weights.safetensors``, as ``save_lora_weights`` writes; or a kohya/A1111
``.safetensors`` file) that ``load`` fuses into its base (``--set lora_base=PIPE`` or the
``lora_base`` of its ``neon.json``): ``lora_capable = True``. Snapshots of ``neon finetune``:
the full pipeline folder (``save_pretrained``), or with ``--set lora_rank=R`` the LoRA folder.

Settings: ``prompts``, ``steps`` (num_inference_steps), ``guidance`` (γ = guidance_scale),
``resolution`` (0: the pipeline's default), ``dtype`` (sampling), ``lora_base``; train setting
``lora_rank``. Metrics: the image families' ``fid`` / ``pixel_fid`` (``$NEON_INCEPTION``,
``$NEON_REF_STATS``, ``--detector``, ``--ref-stats``) and ``clip_score`` with a local CLIP folder
in ``$NEON_CLIP`` (:mod:`neon_t2i.clip`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from neon_cli.errors import FamilyError, UsageError
from neon_cli.family import Metric, Setting
from neon_diffusers.scoring import METRIC_INFO, ImageScoring, metric_names

INSTALL_HINT = "pip install 'neon-cli[t2i]' (diffusers, transformers, peft); see README 'Neon on your Stable Diffusion model'"
CLIP_ENV = "NEON_CLIP"  # neon_t2i.clip.ENV, repeated so that listing metrics imports nothing heavy


def _require() -> None:
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise FamilyError(f"family 't2i' needs diffusers, transformers and peft ({exc}); {INSTALL_HINT}") from None


class T2IFamily(ImageScoring):
    name = "t2i"
    description = "diffusers text-to-image pipeline folder (Stable Diffusion 1.x/2.x, SDXL) sampled from prompts; full or LoRA fine-tuning"
    settings = (
        Setting("prompts", "", str, "prompt file: one prompt per line, or JSON lines {prompt, negative_prompt}; "
                "synth: S's prompts; eval/tune-w: evaluation prompts (disjoint from S's)"),
        Setting("steps", 50, int, "num_inference_steps of the pipeline's own scheduler", low=1, high=10000),
        Setting("guidance", 7.5, float, "guidance_scale (gamma; 1 or less: no classifier-free guidance)", low=0.0, high=50.0),
        Setting("resolution", 0, int, "image height = width in pixels (0: the pipeline's default)", low=0, high=8192),
        Setting("dtype", "float32", str, "dtype the pipeline samples in", choices=("float32", "float16", "bfloat16")),
        Setting("lora_base", "", str, "base pipeline folder of a LoRA checkpoint without neon.json (kohya/diffusers LoRA files)"),
    )
    train_settings = (
        Setting("lora_rank", 0, int, "0: train the UNet in full; R > 0: a peft LoRA of rank R (alpha R) on to_q/to_k/to_v/to_out.0",
                low=0, high=1024),
    )
    guidance = "guidance"
    checkpoint_suffix = ""
    default_model = None
    num_classes = 0
    lora_capable = True
    #: train_text_to_image.py / _lora.py: batch 16, lr 1e-4, constant schedule (its 500 warm-up steps
    #: apply only to the warm-up schedules), no EMA unless --use_ema (then EMAModel's 0.9999 warm-up).
    train_defaults = {"batch": 16, "lr": 1e-4, "ema_halflife_images": None, "warmup_images": 0}

    def __init__(self) -> None:
        self._prompts: list[dict[str, str]] | None = None
        self._clip: Any = None

    # -- prompts -------------------------------------------------------------------------------
    def prompts(self, settings: Mapping[str, Any]) -> list[dict[str, str]]:
        """The prompts of ``--set prompts=FILE`` (UsageError naming the setting when unset/bad)."""
        from neon_t2i.prompts import read_prompts

        if not settings.get("prompts"):
            raise UsageError("--set prompts: family 't2i' needs a prompt file (--set prompts=FILE)")
        return read_prompts(settings["prompts"])

    def model_num_classes(self, path: str, settings: Mapping[str, Any] | None = None) -> int:
        """P, the number of prompts of ``--set prompts`` (labels are prompt indices). Called by the
        core before sampling (synth, eval, tune-w), so a missing or bad prompt file is refused
        (UsageError naming ``--set prompts``) before the pipeline is loaded."""
        return len(self.prompts(settings or {}))

    def synth_conditioning(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """What S's labels index, kept in its manifest: ``{"prompts": [{prompt, negative_prompt}],
        "prompts_sha256"}``."""
        from neon_t2i.prompts import prompts_sha256

        prompts = self.prompts(settings)
        return {"kind": "prompts", "prompts": prompts, "prompts_sha256": prompts_sha256(prompts)}

    def use_synthetic_set(self, model: Any, manifest: Mapping[str, Any]) -> None:
        """``neon finetune``: S's prompts from its manifest (their text embeddings are computed once)."""
        cond = manifest.get("conditioning") or {}
        if cond.get("kind") != "prompts" or not cond.get("prompts"):
            raise UsageError("--data: the synthetic set has no prompts in its manifest (make it with 'neon synth t2i --set prompts=FILE')")
        object.__setattr__(model, "train_prompts", list(cond["prompts"]))

    def files_read(self, settings: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """Files read beside the checkpoints: the prompt file, a LoRA's base pipeline and the CLIP
        folder of ``$NEON_CLIP`` (protected from ``-o`` / ``--report`` by every command's plan)."""
        settings = settings or {}
        out = [(name, settings.get(name)) for name in ("prompts", "lora_base") if settings.get(name)]
        return out + ([("clip", os.environ[CLIP_ENV])] if os.environ.get(CLIP_ENV) else [])

    # -- checkpoints ---------------------------------------------------------------------------
    def load(self, path: str, *, settings: Mapping[str, Any] | None = None, purpose: str = "sample") -> Any:
        """:class:`neon_t2i.pipeline.T2IModel` (state dict = the UNet's) in eval mode on CPU; see
        :func:`neon_t2i.pipeline.load` (pipeline folders and LoRAs)."""
        _require()
        from neon_t2i.pipeline import load

        return load(path, settings, purpose)

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        """A pipeline folder, or a diffusers LoRA folder for a LoRA fine-tune (+ neon.json)."""
        _require()
        from neon_t2i.pipeline import save

        save(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        from pathlib import Path

        from neon_t2i.pipeline import read_neon_json

        p = Path(path)
        meta = read_neon_json(p if p.is_dir() else p.parent)
        return {k: str(v) for k, v in meta.items() if isinstance(v, (str, int, float))}

    # -- sampling and training -----------------------------------------------------------------
    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> Any:
        """uint8 [N, 3, H, W] from the pipeline (:func:`neon_t2i.pipeline.sample`): prompt labels[i] mod P, seed seeds[i]."""
        from neon_t2i.pipeline import sample

        prompts = self.prompts(settings)
        self._prompts = prompts  # what score() pairs the images with
        return sample(model, seeds, labels, settings, prompts)

    def encode_key(self, model: Any, settings: Mapping[str, Any]) -> str:
        """``t2i-vae-<sha256 of the VAE weights>``: the cached latents depend only on the VAE."""
        from neon_t2i.pipeline import vae_key

        return f"t2i-vae-{vae_key(model)}"

    def encode(self, model: Any, images: Any) -> Any:
        """float32 [n, 2 * C_latent, H/f, W/f]: the frozen VAE's latent mean and log-variance."""
        from neon_t2i.pipeline import encode

        return encode(model, images)

    def loss(self, model: Any, images: Any, labels: Any, generator: Any) -> Any:
        """train_text_to_image.py's MSE (epsilon or v target) on cached latents and prompt indices."""
        from neon_t2i.pipeline import loss

        return loss(model, images, labels, generator)

    def make_optimizer(self, params: Any, lr: float) -> Any:
        """AdamW (0.9, 0.999), weight decay 1e-2, eps 1e-8, grad-norm clip 1.0 over trainable parameters."""
        from neon_t2i.pipeline import make_optimizer

        return make_optimizer(params, lr)

    # -- metrics -------------------------------------------------------------------------------
    @property
    def metrics(self) -> tuple[str, ...]:
        clip = ("clip_score",) if os.environ.get(CLIP_ENV) else ()
        image = metric_names() if (os.environ.get("NEON_REF_STATS") or os.environ.get("NEON_INCEPTION") or not clip) else ()
        return tuple(image) + clip

    @property
    def metric_info(self) -> dict[str, Any]:
        return {**METRIC_INFO, "clip_score": Metric(
            "CLIP score: mean over images of 100 * max(cos(CLIP image, CLIP text embedding of its prompt), 0) "
            "(Hessel et al. 2021, torchmetrics' scale), local CLIP folder $NEON_CLIP, evaluation prompts --set prompts",
            higher_is_better=True)}

    def score(self, images: Any, labels: Any) -> dict[str, float]:
        """The image metrics (if configured) and ``clip_score`` (with ``$NEON_CLIP``) of the last sampled prompts."""
        names = self.metrics
        out: dict[str, float] = {}
        if any(n != "clip_score" for n in names):
            out.update(ImageScoring.score(self, images, labels))
        if "clip_score" in names:
            from neon_t2i.clip import ClipScorer, clip_path

            path = clip_path()
            if self._clip is None or self._clip.path != str(path):
                self._clip = ClipScorer(path)
            if self._prompts is None or labels is None:
                raise UsageError("clip_score: no prompts (--set prompts=FILE)")
            texts = [self._prompts[int(v) % len(self._prompts)]["prompt"] for v in labels.tolist()]
            out["clip_score"] = self._clip(images, texts)
        return out


family = T2IFamily()
