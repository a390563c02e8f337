"""The ``diffusers`` family: a local Hugging Face diffusers ``UNet2DModel`` folder with its DDPM/DDIM
scheduler; optional extra ``pip install '.[diffusers]'`` from the clone (see docs/families.md).

This module does not import torch or diffusers; the methods import them when called.

Checkpoints are **folders** (``checkpoint_suffix = ""``: ``neon finetune`` names snapshots
``theta_s-000131072/``). Read: a ``DDPMPipeline``/``DDIMPipeline`` folder, a bare ``UNet2DModel``
folder, or a ``train_unconditional.py`` ``checkpoint-N/`` folder whose ``unet_ema/`` (EMA weights)
is used where present. Written: the DDPMPipeline layout plus ``neon.json`` (metadata); see
:mod:`neon_diffusers.io`. ``neon_diffusers.io.merge_folders`` merges two folders' UNet weights
into a new loadable folder (``neon merge`` itself reads single files and sharded folders).

Settings: ``scheduler`` (ddpm | ddim), ``steps``, ``eta`` (DDIM), ``guidance`` (gamma, CFG with the
null class = the last class index, class-conditional UNets only). Image i depends only on seed i:
one ``torch.Generator`` per image draws its initial noise and its per-step DDPM noise
(:mod:`neon_diffusers.sampling`).

``num_classes`` is the loaded model's (0 until a class-conditional folder is loaded; ``load``
sets it, and ``model_num_classes(path)`` reads it from the config alone).

Metrics (``score``): ``fid`` with ``NEON_INCEPTION`` + ``NEON_REF_STATS``, else ``pixel_fid`` against
``NEON_REF_STATS`` pixel statistics (not comparable with published FIDs); see
:mod:`neon_diffusers.scoring`.
"""

from __future__ import annotations

from typing import Any, Mapping

from neon_cli.errors import FamilyError
from neon_cli.family import Setting
from neon_diffusers.scoring import ImageScoring

INSTALL_HINT = "pip install '.[diffusers]' from the neon clone (or: pip install diffusers); see docs/families.md"


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        raise FamilyError(f"family 'diffusers' needs the diffusers package ({exc}); {INSTALL_HINT}") from None


class DiffusersFamily(ImageScoring):
    name = "diffusers"
    description = "diffusers UNet2DModel folder (DDPMPipeline layout) sampled with DDPM/DDIM, optional CFG"
    settings = (
        Setting("scheduler", "ddpm", str, "sampler: ddpm (DDPMScheduler) or ddim (DDIMScheduler), built from the folder's scheduler config",
                choices=("ddpm", "ddim")),
        Setting("steps", 1000, int, "inference steps (UNet evaluations; doubled by guidance other than 0 and 1)", low=1, high=10000),
        Setting("eta", 0.0, float, "DDIM eta (0 = deterministic DDIM, 1 = DDPM-like noise); ignored by ddpm", low=0.0, high=1.0),
        Setting("guidance", 1.0, float, "classifier-free guidance gamma (1 = conditional only, 0 = null class only); class-conditional models",
                low=0.0, high=50.0),
    )
    guidance = "guidance"
    checkpoint_suffix = ""
    default_model = None
    #: train_unconditional.py: AdamW lr 1e-4, batch 16, 500 warm-up steps (= 8,000 images). Its EMA
    #: (EMAModel with warm-up decay 1 - (1 + step)^-3/4, capped at 0.9999) has no fixed half-life,
    #: so none by default (--ema-halflife sets one).
    train_defaults = {"batch": 16, "lr": 1e-4, "ema_halflife_images": None, "warmup_images": 8000}

    def __init__(self) -> None:
        self.num_classes = 0

    # -- checkpoints ---------------------------------------------------------------------------
    def load(self, path: str) -> Any:
        """``UNet2DModel`` in eval mode on CPU (float32) with ``neon_info``; sets ``self.num_classes``."""
        _require_diffusers()
        from neon_diffusers.io import load

        unet = load(path)
        self.num_classes = unet.neon_info.num_classes
        return unet

    def load_with_lora(self, base_path: str, lora_path: str, scale: float) -> Any:
        """θ_r's UNet2DModel (:meth:`load`) with a LoRA on it (diffusers/peft/kohya ``.safetensors``,
        ``unet.``-prefixed or bare module names) attached unmerged at ``scale`` through peft
        (:func:`neon_cli.lora.attach_lora`): forward uses W + scale·s·B·A. tune-w passes scale = −w."""
        from neon_cli.lora import attach_lora

        return attach_lora(self.load(base_path), lora_path, scale)

    def set_lora_scale(self, model: Any, scale: float) -> Any:
        """Re-scale the LoRA attached by :meth:`load_with_lora` (:func:`neon_cli.lora.set_lora_scale`)."""
        from neon_cli.lora import set_lora_scale

        return set_lora_scale(model, scale)

    def model_num_classes(self, path: str) -> int:
        """Number of real classes of the folder's UNet (config only); 0 for unconditional."""
        from neon_diffusers.io import model_num_classes

        return model_num_classes(path)

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        """Write a DDPMPipeline folder (unet/, scheduler/, model_index.json) + neon.json at ``path``."""
        _require_diffusers()
        from neon_diffusers.io import save_pipeline

        save_pipeline(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        from neon_diffusers.io import read_metadata

        return read_metadata(path)

    # -- sampling and training -----------------------------------------------------------------
    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> Any:
        """uint8 [N, C, H, W]; DDPM/DDIM with per-image generators and CFG (neon_diffusers.sampling)."""
        from neon_diffusers.sampling import sample

        return sample(model, seeds, labels, settings)

    def loss(self, model: Any, images: Any, labels: Any, generator: Any) -> Any:
        """train_unconditional.py's noise-prediction (or v / sample) MSE on uint8 images."""
        from neon_diffusers.sampling import loss

        return loss(model, images, labels, generator)

    def make_optimizer(self, params: Any, lr: float) -> Any:
        """AdamW (0.95, 0.999), weight decay 1e-6, eps 1e-8, grad-norm clip 1.0, as train_unconditional.py."""
        from neon_diffusers.sampling import make_optimizer

        return make_optimizer(params, lr)


family = DiffusersFamily()
