"""The ``var`` family: FoundationVision/VAR (Tian et al. 2024, next-scale prediction) through the
user's own checkout of the repository (not on PyPI; neon imports its code, copies none).

Finding the checkout (:func:`neon_cli.repo.find_repo`): ``--set repo=PATH``, ``$NEON_VAR_REPO``,
or its ``models`` package importable. The networks are built by the checkout's
``models.build_vae_var`` with the architecture read from the checkpoints' shapes (depth, scales,
classes; ``--set depth=`` / ``--set patch_nums=`` override), weights from two files::

    neon synth var --model var_d16.pth --set vae=vae_ch160v4096z32.pth --set repo=~/VAR ...

both read with ``torch.load(weights_only=True)`` (plain state dicts, or trainer checkpoints
``{'trainer': {'var_wo_ddp', 'vae_local', ...}, 'args'}``; see :mod:`neon_var.io`).

Sampling (``synth``/``eval``/``tune-w``): VAR's ``autoregressive_infer_cfg`` with ``cfg`` (γ: the
guidance setting, so ``tune-w --gamma`` searches it), ``top_k``, ``top_p``, ``more_smooth`` and the
class labels, in seed blocks that make each image reproducible (:mod:`neon_var.sampling` says
exactly what is and is not invariant). Defaults: VAR's README FID protocol (cfg 1.5, top-k 900,
top-p 0.96); the Neon paper made its S with cfg 1.25, top-p 0.95.

Fine-tuning (``finetune``): VAR's teacher-forced next-scale cross-entropy over the VQVAE's token
maps of S, the tokens computed once (:meth:`VarFamily.encode`) and cached by the core next to S;
VAR's AdamW groups, grad clip 2, fp16 loss scaling on CUDA; the Neon paper's overrides as
defaults (lr 1e-5 ramped linearly over the whole budget, global batch 768). Snapshots
``ar-ckpt-images_N.pth`` are the transformer's plain state dict, as the Neon repo's ``train.py``
saves them. See :mod:`neon_var.training`.

Metrics: Inception ``fid`` (+ precision/recall, k = 5) with ``--detector`` and ``--ref-stats`` (ADM's
``VIRTUAL_imagenet256_labeled.npz`` holds ``mu``/``sigma``, or a ``neon ref-stats`` file), else
``pixel_fid`` (:mod:`neon_diffusers.scoring`).

This module does not import torch; the methods import it when called.
"""

from __future__ import annotations

from typing import Any, Mapping

from neon_cli.errors import FamilyError, UsageError
from neon_cli.family import Setting
from neon_diffusers.scoring import ImageScoring


class VarFamily(ImageScoring):
    name = "var"
    description = "FoundationVision/VAR next-scale transformer + VQVAE from your VAR checkout (CFG, top-k, top-p)"
    settings = (
        Setting("repo", None, str, "your checkout of FoundationVision/VAR (else $NEON_VAR_REPO, else an importable 'models')"),
        Setting("vae", None, str, "the VQVAE checkpoint (vae_ch160v4096z32.pth, or a trainer checkpoint's vae_local)"),
        Setting("depth", 0, int, "transformer depth (0 = from the checkpoint's blocks)", low=0, high=128),
        Setting("patch_nums", "", str, "token-map sizes, e.g. 1_2_3_4_5_6_8_10_13_16 or 256/512 ('' = from the checkpoint)"),
        Setting("fuse", True, bool, "let VAR use flash-attn / fused kernels where installed (build_vae_var's *_if_available)"),
        Setting("cfg", 1.5, float, "classifier-free guidance ratio (gamma); VAR ramps it over the scales: t = cfg * k / (K - 1)",
                low=0.0, high=50.0),
        Setting("top_k", 900, int, "keep the k most likely tokens (0 = off)", low=0, high=1_000_000),
        Setting("top_p", 0.96, float, "nucleus sampling mass (0 = off, VAR's convention)", low=0.0, high=1.0),
        Setting("more_smooth", False, bool, "VAR's Gumbel-softmax smoothing (for visualisation; not for FID)"),
        Setting("seed_block", 50, int, "images per VAR call (one generator each); image s is in block s // seed_block",
                low=1, high=100_000),
    )
    train_settings = (
        Setting("ls", 0.0, float, "label smoothing of the cross-entropy (VAR's --ls)", low=0.0, high=1.0),
        Setting("twd", 0.05, float, "AdamW weight decay of VAR's decayed group (VAR's --twd)", low=0.0, high=10.0),
        Setting("tclip", 2.0, float, "global gradient-norm clip (VAR's --tclip; 0 = off)", low=0.0, high=1e6),
        Setting("fp16", 1, int, "VAR's --fp16: 1 fp16 with loss scaling, 2 bf16, 0 fp32 (mixed precision on CUDA only)",
                choices=(0, 1, 2)),
    )
    guidance = "cfg"
    num_classes = 1000
    default_model = None
    checkpoint_suffix = ".pth"
    #: the Neon paper's VAR fine-tune (run_var_imagenet_256.sh / train.py): global batch 768, target
    #: lr 1e-5 reached by a linear ramp over the whole run, no EMA
    train_defaults = {"batch": 768, "lr": 1e-5, "ema_halflife_images": None, "warmup_images": "budget"}
    #: ``--recipe paper``: the Neon repository's VAR/VAR_imagenet_256/run_var_imagenet_256.sh (d16: train.py --bs=768
    #: --fp16=1 --target_lr 1e-5, lr = target * images_seen / total_images) and VAR_imagenet_512/run_var_imagenet_512.sh
    #: (d36: --bs=24 --fp16=1 --target_lr 1e-6); both ran AdamW with weight decay 0 (train.py: weight_decay=0, and
    #: lr_wd_annealing, which would set VAR's --twd, is never called); ``paper`` picks by the checkpoint's depth.
    recipes = {
        "paper-d16": {"about": "run_var_imagenet_256.sh: --depth=16 --bs=768 --fp16=1 --target_lr 1e-5, linear ramp over "
                               "--total_images (the whole run), no EMA; weight decay 0 (its train.py builds AdamW with "
                               "weight_decay=0 and never calls lr_wd_annealing)",
                      "train": {"batch": 768, "lr": 1e-5, "warmup_images": "budget", "ema_halflife_images": None},
                      "settings": {"fp16": 1, "twd": 0.0}},
        "paper-d36": {"about": "run_var_imagenet_512.sh: --depth=36 --bs=24 --fp16=1 --target_lr 1e-6, linear ramp over "
                               "--total_images (the whole run), no EMA; weight decay 0 (as paper-d16)",
                      "train": {"batch": 24, "lr": 1e-6, "warmup_images": "budget", "ema_halflife_images": None},
                      "settings": {"fp16": 1, "twd": 0.0}},
    }

    def resolve_recipe(self, name: str, path: str) -> str:
        """``paper`` -> ``paper-d16`` / ``paper-d36`` by the checkpoint's number of blocks (read
        inertly); UsageError naming both for another depth."""
        if name != "paper":
            return name
        from neon_cli.errors import UsageError
        import argparse

        import torch

        from neon_cli.checkpoint import open_checkpoint
        from neon_var import io
        from neon_var.io import _count

        with torch.serialization.safe_globals([argparse.Namespace]):  # names only: no tensor is read
            with open_checkpoint(path, prefer_key=io.VAR_KEY) as ck:
                depth = _count("blocks.", dict.fromkeys(ck.names()))
        if depth not in (16, 36):
            raise UsageError(f"--recipe paper: the paper fine-tuned VAR d16 (256px) and d36 (512px); {path} has depth {depth}: "
                             "give --recipe paper-d16 or paper-d36")
        return f"paper-d{depth}"

    def precision(self, model: Any) -> str:
        """What the fine-tune ran in: ``fp16`` (autocast + GradScaler), ``bf16`` (autocast) or
        ``fp32``; ``--set fp16`` asks for mixed precision, which VAR's AmpOptimizer (and neon) use
        on CUDA only."""
        from neon_var.io import unwrap

        amp = getattr(unwrap(model), "amp", None)
        if amp is None or amp.device_type is None or not amp.mixed_precision:
            asked = getattr(amp, "mixed_precision", 0)
            return "fp32" + (f" (--set fp16={asked}: mixed precision runs on CUDA only)" if asked else "")
        return "fp16 autocast + GradScaler" if amp.mixed_precision == 1 else "bf16 autocast"

    # -- checkpoints ---------------------------------------------------------------------------
    def load(self, path: str, *, settings: Mapping[str, Any] | None = None, trust_pickle: bool = False,
             purpose: str = "sample") -> Any:
        """:class:`neon_var.io.VarModel` (VAR + its frozen VQVAE) in eval mode on CPU, built by the
        checkout's ``build_vae_var``. Raises FamilyError (no checkout, no ``--set vae``) or
        CheckpointError naming the file."""
        settings = dict(settings or {})
        vae = settings.get("vae")
        if not vae:
            raise UsageError("--set vae: family 'var' needs the VQVAE checkpoint (e.g. --set vae=vae_ch160v4096z32.pth)")
        from pathlib import Path

        if not Path(str(vae)).expanduser().is_file():
            raise UsageError(f"--set vae: {vae} is not a file")
        from neon_var import io

        io.repo_models(settings)  # a missing checkout is the first thing to say
        var_sd = io.read_state_dict(path, io.VAR_KEY, trust_pickle=trust_pickle, what="--model")
        vae_sd = io.read_state_dict(Path(str(vae)).expanduser(), io.VAE_KEY, trust_pickle=trust_pickle, what="--set vae")
        model = io.build(settings, var_sd, vae_sd, path, vae)
        if purpose == "train":
            from neon_var.training import AmpState, tag_parameters

            model.info["train"] = {k: settings[k] for k in ("ls", "twd", "tclip", "fp16") if k in settings}
            tag_parameters(model, AmpState(int(settings.get("fp16", 1))), model.info["train"])
        return model

    def model_num_classes(self, path: str) -> int:
        """Classes of the transformer at ``path`` (from ``class_emb``; no checkout needed)."""
        from neon_var.io import num_classes_of

        return num_classes_of(path)

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        """``torch.save`` of the transformer's plain state dict (VAR's loaders read it)."""
        from neon_var.io import save_var

        save_var(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        from neon_var.io import read_metadata

        return read_metadata(path)

    def snapshot_name(self, images_seen: int) -> str:
        """``ar-ckpt-images_N.pth``, the name the Neon repository's VAR ``train.py`` gives its snapshots."""
        return f"ar-ckpt-images_{int(images_seen)}.pth"

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> Any:
        """uint8 [N, 3, H, W] from VAR's ``autoregressive_infer_cfg`` in seed blocks (neon_var.sampling)."""
        from neon_var.sampling import sample

        try:
            return sample(model, seeds, labels, settings)
        except ValueError as exc:
            raise FamilyError(str(exc)) from None

    # -- training --------------------------------------------------------------------------------
    def encode_key(self, model: Any, settings: Mapping[str, Any]) -> str:
        """What the cached tokens depend on: the VQVAE file's sha256 and the token-map sizes."""
        from neon_cli.fsutil import sha256_file
        from neon_var.io import unwrap

        m = unwrap(model)
        if "vae_sha256" not in m.info:
            m.info["vae_sha256"] = sha256_file(m.info["vae_path"])
        pn = "_".join(str(p) for p in m.info["patch_nums"])
        return f"var-vqvae-{m.info['vae_sha256'][:16]}-pn{pn}"

    def encode(self, model: Any, images: Any) -> Any:
        """Token maps int16 [N, L] of uint8 images [N, 3, H, W] (VAR's ``img_to_idxBl``, all scales)."""
        from neon_var.training import encode

        try:
            return encode(model, images)
        except ValueError as exc:
            raise FamilyError(str(exc)) from None

    def loss(self, model: Any, images: Any, labels: Any, generator: Any) -> Any:
        """VAR's next-scale cross-entropy on tokens [N, L] (or uint8 images); neon_var.training.loss."""
        from neon_var.io import unwrap
        from neon_var.training import loss

        ls = float(unwrap(model).info.get("train", {}).get("ls", 0.0))
        try:
            return loss(model, images, labels, generator, label_smooth=ls)
        except ValueError as exc:
            raise FamilyError(str(exc)) from None

    def make_optimizer(self, params: Any, lr: float) -> Any:
        """VAR's AdamW (0.9, 0.95) groups, weight decay ``twd`` on matrices, clip ``tclip``, fp16 on CUDA."""
        from neon_var.training import make_optimizer

        params = list(params)
        train = next((p._neon_var_train for p in params if hasattr(p, "_neon_var_train")), {})
        return make_optimizer(params, lr, weight_decay=float(train.get("twd", 0.05)),
                              grad_clip=float(train.get("tclip", 2.0)))


family = VarFamily()
