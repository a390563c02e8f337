"""The ``imm`` family: Inductive Moment Matching (Zhou et al. 2025; lumalabs/imm, and the
Neon paper's repository's ``imm/`` folder for training) through the user's own checkout. The
Neon paper's few-step system: IMM on ImageNet-256, FID down to 6.67 / 2.88 / 1.68 / 1.46 at
T = 1 / 2 / 4 / 8 steps.

IMM's licence (CC BY-NC-SA 4.0) forbids bundling it and it is not on PyPI, so this family finds
the user's clone (``--set repo=PATH``, ``$NEON_IMM_REPO``, or ``torch_utils`` / ``training``
importable; :mod:`neon_cli.repo`) and uses its own code: the network classes (through the
pickle's ``torch_utils.persistence`` records), the encoders and the loss built from its YAML
configs (:mod:`neon_imm.checkout`). This module imports neither torch nor IMM.

Checkpoints: IMM's ``.pkl`` (``imagenet256_ts_a2.pkl``, ``network-snapshot-*.pkl``):
``pickle.dump(dict(ema=<IMMPrecond>, ...))``. Loading one to sample or train runs the code pickled
in it and needs ``--trust-pickle``; the number of classes and neon's metadata are read without
running it (:mod:`neon_imm.inert`), and ``neon merge`` / ``neon inspect`` read it inertly.
``neon finetune`` snapshots are ``network-snapshot-{kimg:06d}.pkl`` (kimg = images seen // 1000;
IMM's trainer numbers its snapshots by tick) holding ``dict(ema, augment_pipe, dataset_kwargs,
neon)``, which IMM's ``generate_images.py`` loads unchanged.

Settings (``--set``): ``num_steps`` (T, 8; the paper evaluates 1, 2, 4, 8 and tunes w per T),
``cfg`` (gamma, the guidance setting ``tune-w --gamma`` searches; 1.5 as IMM's presets and the
paper's S), ``sampler`` (pushforward, restart), ``discretization`` (uniform, edm), ``precision``
(float64 as lumalabs's ``generate_images.py``, fp16 as the Neon repository's), ``seed_block``
(:mod:`neon_imm.sampling`), ``vae`` (a local diffusers folder of ``stabilityai/sd-vae-ft-ema``),
``config`` (the sampling config whose ``encoder`` is used), ``repo``. Training settings:
``train_config`` (whose ``loss`` is used). Recipe: :mod:`neon_imm.training`.

Metrics: ``fid`` with ``--detector`` / ``$NEON_INCEPTION`` against ``--ref-stats`` /
``$NEON_REF_STATS`` (ADM's ImageNet-256 statistics, the Neon repository's ``adm_in256_stats.npz``),
else ``pixel_fid`` (see :mod:`neon_diffusers.scoring`).
"""

from __future__ import annotations

from typing import Any, Mapping

from neon_cli.family import Setting
from neon_diffusers.scoring import ImageScoring


class IMMFamily(ImageScoring):
    name = "imm"
    description = "lumalabs/imm network pickles through your IMM checkout: few-step pushforward sampler, IMMLoss recipe"
    settings = (
        Setting("repo", None, str, "your IMM checkout (lumalabs/imm; for finetune the imm/ folder of SinaAlemohammad/Neon)"),
        Setting("num_steps", 8, int, "sampling steps T (the paper: 1, 2, 4, 8; NFE = T, 2T with guidance)", low=1, high=1000),
        Setting("cfg", 1.5, float, "classifier-free guidance scale gamma (IMM's cfg_scale)", low=0.0, high=100.0),
        Setting("sampler", "pushforward", str, "IMM's pushforward_generator_fn or restart_generator_fn",
                choices=("pushforward", "restart")),
        Setting("discretization", "uniform", str, "time grid from T to eps: uniform or edm (rho 7)", choices=("uniform", "edm")),
        Setting("precision", "float64", str, "float64 (lumalabs generate_images.py) or fp16 autocast (Neon's scripts)",
                choices=("float64", "fp16")),
        Setting("seed_block", 64, int, "consecutive seeds drawn as one batch from one seed (see neon_imm.sampling)",
                low=1, high=100000),
        Setting("vae", None, str, "local diffusers folder replacing the config's vae_name (e.g. sd-vae-ft-ema)"),
        Setting("config", "auto", str, "sampling config (file under <repo>/configs or a path) whose encoder is used"),
    )
    train_settings = (
        Setting("train_config", "auto", str, "training config (under <repo>/configs or a path) whose loss is used "
                                             "(auto: im256.yaml for latent networks, cifar10.yaml for pixel ones)"),
    )
    guidance = "cfg"
    num_classes = 1000
    default_model = None
    checkpoint_suffix = ".pkl"
    #: im256.yaml with the paper's lr: batch 512, AdamW lr 1e-6 constant, EMA beta 0.9999 per step.
    train_defaults = {"batch": 512, "lr": 1e-6, "warmup_images": 0, "ema_halflife_images": 3_548_736}
    #: ``--recipe paper``: the Neon repository's imm/run_imm_imagenet_256.sh -> run_train.sh with configs/im256.yaml:
    #: AdamW lr 1e-6 from the first step (the training loop has no lr ramp), batch 512, EMA beta 0.9999 per step
    #: (ema_halflife_kimg null), the config's loss; the same numbers as --recipe default.
    recipes = {
        "paper": {"about": "run_imm_imagenet_256.sh / im256.yaml: AdamW lr 1e-6 constant (no warm-up), batch 512, "
                           "EMA beta 0.9999 per step, IMMLoss from the config (the same as --recipe default)",
                  "train": {"batch": 512, "lr": 1e-6, "warmup_images": 0, "ema_halflife_images": 3_548_736},
                  "settings": {"train_config": "auto"}},
    }

    def load(self, path: str, *, settings: Mapping[str, Any] | None = None, trust_pickle: bool = False,
             purpose: str = "sample") -> Any:
        """The pickle's ``ema`` network (eval, CPU) with the checkout's encoder (and, for
        ``purpose="train"``, its loss). IMM's code runs: ``trust_pickle`` is required. Raises
        UsageError, FamilyError, CheckpointError (see :func:`neon_imm.checkout.load`)."""
        from neon_imm import checkout

        return checkout.load(path, settings, trust_pickle, purpose)

    def model_num_classes(self, path: str) -> int:
        """``label_dim`` of the pickled network (read without running code); 0 for unconditional."""
        from neon_imm.inert import network_info

        return network_info(path)["label_dim"]

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        """IMM's snapshot pickle ``dict(ema, augment_pipe, dataset_kwargs)`` + ``neon`` metadata."""
        from neon_imm import checkout

        checkout.save(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        """The ``neon`` entry of a pickle neon wrote ({} for IMM's own), read without running code."""
        from neon_imm.inert import neon_metadata

        return neon_metadata(path)

    def snapshot_name(self, images_seen: int) -> str:
        """``network-snapshot-{kimg:06d}.pkl`` (kimg = images seen // 1000)."""
        return f"network-snapshot-{int(images_seen) // 1000:06d}.pkl"

    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> Any:
        """uint8 [N, 3, H, W]: T IMM steps and the checkout's decoder (:mod:`neon_imm.sampling`)."""
        from neon_imm.sampling import sample

        return sample(model, seeds, labels, settings)

    def encode(self, model: Any, images: Any) -> Any:
        """SD-VAE raw latents of S, computed once and cached (:mod:`neon_imm.training`)."""
        from neon_imm.training import encode

        return encode(model, images)

    def encode_key(self, model: Any, settings: Mapping[str, Any]) -> str:
        from neon_imm.training import encode_key

        return encode_key(model, settings)

    def loss(self, model: Any, images: Any, labels: Any, generator: Any) -> Any:
        """IMM's ``IMMLoss`` from the training config (:mod:`neon_imm.training`)."""
        from neon_imm.training import loss

        return loss(model, images, labels, generator)

    def precision(self, model: Any) -> str:
        """``fp32``: the loss runs with the network's mixed precision off (neon's loop has no
        GradScaler; IMM's own step uses fp16 autocast on CUDA), :mod:`neon_imm.training`."""
        return "fp32 (IMM's fp16 autocast + GradScaler not used: neon's loop has no loss scaler)"

    def make_optimizer(self, params: Any, lr: float) -> Any:
        """AdamW (0.9, 0.999), eps 1e-8, no weight decay (im256.yaml)."""
        from neon_imm.training import make_optimizer

        return make_optimizer(params, lr)


family = IMMFamily()
