"""The ``xar`` family: xAR (Ren et al. 2025, "Beyond Next-Token: Next-X Prediction for
Autoregressive Visual Generation"; OliverRensu/xAR, or the ``xAR/`` folder of the Neon paper's
repository) through the user's own checkout. The Neon paper's headline system: xAR-L on
ImageNet-256, FID 1.28 -> 1.02 (xAR-B 1.72 -> 1.31).

xAR has no licence file and is not a package, so this family finds the user's clone
(``--set repo=PATH``, ``$NEON_XAR_REPO``, or ``models.xar`` importable; :mod:`neon_cli.repo`) and
uses its own code: the ``xAR`` model and its builders (``models/xar.py``), its sampler
(``sample_tokens`` with ``models/sampler.py``'s Euler-Maruyama steps and the CFG ramp over the
clusters), its training loss (the model's forward) and MAR's KL-16 VAE (``models/vae.py``). This
module imports neither torch nor xAR; the methods do, when called.

Checkpoints (:mod:`neon_xar.checkout`): ``--model`` is a released ``xAR-B.pth`` / ``xAR-L.pth``
(plain state dict), a training checkpoint ``{model, model_ema, optimizer, epoch, scaler, args}``
(weights from ``model_ema``; the ``argparse.Namespace`` is allowed in an otherwise weights-only
load, nothing runs) or a snapshot of the Neon repository / of neon (``{'model_ema': ...}``). The
architecture (``xar_base``, ``xar_large``, ``xar_huge``) is the builder whose shapes the
checkpoint has (``--set arch=auto``). The VAE is ``--set vae=kl16.ckpt`` (or ``$NEON_XAR_VAE``).
``neon finetune`` snapshots are ``checkpoint-<images seen>.pth`` holding ``{'model_ema': state
dict, 'neon': metadata}`` (the Neon repository's ``train_new.py`` layout), which its
``calculate_fid.py`` loads; ``neon merge`` keeps the base's layout (a plain state dict for
``xAR-B.pth``, which xAR's ``eval.py`` loads).

Settings (``--set``): ``flow_steps`` (40; the paper: 40 for xAR-B, 50 for xAR-L), ``cfg`` (gamma,
the guidance setting ``tune-w --gamma`` searches; the paper's S: 2.7 for xAR-B, 2.3 for xAR-L),
``seed_block`` (images drawn together from one seed, :mod:`neon_xar.sampling`), ``rounding``
(``truncate`` as the Neon repository's scripts, ``round`` as xAR's ``eval.py``), ``autocast``
(fp16 on CUDA, as the scripts), ``arch``, ``vae``, ``repo``. Training settings (``neon finetune
--set``): ``hflip``, ``attn_dropout``, ``proj_dropout``, ``label_drop_prob`` (train_new.py's
defaults). Recipe: :mod:`neon_xar.training`.

Metrics: ``fid`` with ``--detector`` / ``$NEON_INCEPTION`` (the TorchScript
``inception-2015-12-05.pt``) against ``--ref-stats`` / ``$NEON_REF_STATS`` (ADM's ImageNet-256
statistics, e.g. ``VIRTUAL_imagenet256_labeled.npz`` or the Neon repository's
``adm_in256_stats.npz``: ``mu``, ``sigma``), else ``pixel_fid`` (see :mod:`neon_diffusers.scoring`).
"""

from __future__ import annotations

from typing import Any, Mapping

from neon_cli.family import Setting
from neon_diffusers.scoring import ImageScoring


class XARFamily(ImageScoring):
    name = "xar"
    description = "OliverRensu/xAR through your xAR checkout: flow-matching sampler with CFG, train_new.py recipe"
    settings = (
        Setting("repo", None, str, "your OliverRensu/xAR checkout (default: $NEON_XAR_REPO, or models.xar importable)"),
        Setting("vae", None, str, "MAR's KL-16 VAE checkpoint kl16.ckpt (default: $NEON_XAR_VAE)"),
        Setting("arch", "auto", str, "builder in models/xar.py (xar_base, xar_large, xar_huge); auto: the one the checkpoint fits"),
        # low 3: xAR's euler_maruyama_sampler runs num_steps - 1 loop steps, then a last step that repeats
        # the first step's cache-filling call while the loop index is still 0; with 2 the KV cache gets the
        # condition twice (the next cluster fails on a shape mismatch), with 1 the index is unbound
        Setting("flow_steps", 40, int, "Euler-Maruyama steps per cluster (eval.py --num_steps; paper: 40 xAR-B, 50 xAR-L; "
                "at least 3, as xAR's sampler needs)", low=3, high=10000),
        Setting("cfg", 2.7, float, "classifier-free guidance scale gamma, ramped (cfg-1)*k/(clusters-1)+1 over the clusters",
                low=1.0, high=100.0),
        Setting("seed_block", 64, int, "consecutive seeds drawn as one batch from one seed (see neon_xar.sampling)",
                low=1, high=100000),
        Setting("rounding", "truncate", str, "float -> uint8: truncate (Neon repo's generate_dataset.py) or round (xAR's eval.py)",
                choices=("truncate", "round")),
        Setting("autocast", True, bool, "fp16 autocast on CUDA while sampling, as xAR's scripts"),
    )
    train_settings = (
        Setting("hflip", True, bool, "random horizontal flip of S (train_new.py's RandomHorizontalFlip)"),
        Setting("attn_dropout", 0.1, float, "attention dropout (train_new.py --attn_dropout)", low=0.0, high=1.0),
        Setting("proj_dropout", 0.1, float, "projection dropout (train_new.py --proj_dropout)", low=0.0, high=1.0),
        Setting("label_drop_prob", 0.1, float, "class-label dropout for CFG (train_new.py --label_drop_prob)", low=0.0, high=1.0),
    )
    guidance = "cfg"
    num_classes = 1000
    default_model = None
    checkpoint_suffix = ".pth"
    #: train_new.py as the paper ran it: batch 32 x 8 GPUs, blr 1e-6 (lr = blr * 256 / 256), linear
    #: ramp over 7 Mi images, EMA 0.9999 per step (half-life 1,774,368 images at batch 256).
    train_defaults = {"batch": 256, "lr": 1e-6, "warmup_images": 7 * 2**20, "ema_halflife_images": 1_774_368}

    # -- checkpoints ---------------------------------------------------------------------------
    def files_read(self, settings: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """MAR's VAE file (``--set vae=PATH`` or ``$NEON_XAR_VAE``), which ``load`` reads."""
        import os

        vae = (settings or {}).get("vae") or os.environ.get("NEON_XAR_VAE")
        return [("vae", vae)] if vae else []

    def load(self, path: str, *, settings: Mapping[str, Any] | None = None, purpose: str = "sample") -> Any:
        """The checkpoint's xAR model (eval mode, CPU) built by the checkout, with the VAE attached.
        Nothing from the file runs (weights-only load). Raises UsageError (no ``vae``),
        FamilyError (no checkout), CheckpointError (not an xAR checkpoint)."""
        from neon_xar import checkout

        return checkout.load(path, settings, purpose)

    def model_num_classes(self, path: str) -> int:
        """Rows of ``class_emb`` - 1 (xAR: 1000)."""
        from neon_xar import checkout

        return checkout.num_classes(path)

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        """``{'model_ema': state_dict, 'neon': metadata}`` (train_new.py's snapshot layout)."""
        from neon_xar import checkout

        checkout.save(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        """The ``neon`` entry of a checkpoint neon wrote, {} for others."""
        from neon_xar import checkout

        return checkout.metadata(path)

    def snapshot_name(self, images_seen: int) -> str:
        """``checkpoint-<images seen>.pth``, train_new.py's name by images seen."""
        return f"checkpoint-{int(images_seen)}.pth"

    # -- sampling and training -----------------------------------------------------------------
    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> Any:
        """uint8 [N, 3, 256, 256] from xAR's ``sample_tokens`` and the VAE (:mod:`neon_xar.sampling`)."""
        from neon_xar.sampling import sample

        return sample(model, seeds, labels, settings)

    def encode(self, model: Any, images: Any) -> Any:
        """VAE moments of S and of its mirror image, computed once and cached (:mod:`neon_xar.training`)."""
        from neon_xar.training import encode

        return encode(model, images)

    def encode_key(self, model: Any, settings: Mapping[str, Any]) -> str:
        from neon_xar.training import encode_key

        return encode_key(model, settings)

    def loss(self, model: Any, images: Any, labels: Any, generator: Any) -> Any:
        """xAR's own training loss on a batch of S (:mod:`neon_xar.training`)."""
        from neon_xar.training import loss

        return loss(model, images, labels, generator)

    def make_optimizer(self, params: Any, lr: float) -> Any:
        """AdamW (0.9, 0.96), weight decay 0.02 on matrices, gradient clipping 1.0 (train_new.py)."""
        from neon_xar.training import make_optimizer

        return make_optimizer(params, lr)


family = XARFamily()
