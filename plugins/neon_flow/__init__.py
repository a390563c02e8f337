"""The ``flow`` family: torchcfm's ``UNetModelWrapper`` flow-matching checkpoints (the paper's flow
family: Tong et al., CIFAR-10), sampled by ODE integration with torchdiffeq; optional extra, see
docs/families.md (torchcfm is installed with ``--no-deps``: its own dependency list pulls
torchvision and pytorch-lightning, which it does not need for this).

This module does not import torch, torchcfm or torchdiffeq; the methods import them when called.

Checkpoints: the ``.pt`` container torchcfm's ``examples/images/cifar10/train_cifar10.py`` writes,
``{net_model, ema_model, sched, optim, step}`` (``module.`` prefixes handled); the EMA
``ema_model`` is the model (merged by ``neon merge``, which finds it first). The network's
constructor arguments and the flow matcher are recorded in a ``"neon"`` entry of the container,
or read from a sidecar ``<file>.json``, or default to the CIFAR-10 example's; see
:mod:`neon_flow.io`.

Settings: ``solver`` (euler | dopri5), ``steps`` (euler), ``atol``/``rtol`` (dopri5),
``batch_solve`` (dopri5: one adaptive solve per batch, compute_fid.py's way; default: per image,
so image i depends only on seed i). See :mod:`neon_flow.sampling`.

Fine-tuning: train_cifar10.py's recipe (flow-matching MSE, Adam lr 2e-4, batch 128, linear
warm-up over 5,000 steps, grad-norm clip 1.0, EMA decay 0.9999 per step = a half-life of
887,184 images at batch 128).

Metrics (``score``): ``fid`` with ``NEON_INCEPTION`` + ``NEON_REF_STATS``, else ``pixel_fid``
(see :mod:`neon_diffusers.scoring`, shared by both image families).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from neon_cli.errors import FamilyError
from neon_cli.family import Setting
from neon_diffusers.scoring import ImageScoring

INSTALL_HINT = "pip install '.[flow]' from the neon clone && pip install --no-deps torchcfm==1.0.7; see docs/families.md"


def _require_flow() -> None:
    missing = []
    for mod in ("torchcfm", "torchdiffeq", "ot"):
        try:
            __import__(mod)
        except ImportError:
            missing.append({"ot": "pot"}.get(mod, mod))
    if missing:
        raise FamilyError(f"family 'flow' needs {', '.join(missing)}: {INSTALL_HINT}")


class FlowFamily(ImageScoring):
    name = "flow"
    description = "torchcfm UNetModelWrapper flow matching (.pt as train_cifar10.py writes), torchdiffeq euler/dopri5"
    settings = (
        Setting("solver", "euler", str, "ODE solver from t=0 (noise) to t=1: euler (fixed steps) or dopri5 (adaptive)",
                choices=("euler", "dopri5")),
        Setting("steps", 100, int, "euler steps (NFE); compute_fid.py's integration_steps", low=1, high=100000),
        Setting("atol", 1e-5, float, "dopri5 absolute tolerance (compute_fid.py --tol)", low=1e-12, high=1.0),
        Setting("rtol", 1e-5, float, "dopri5 relative tolerance (compute_fid.py --tol)", low=1e-12, high=1.0),
        Setting("batch_solve", False, bool, "dopri5: one adaptive solve per batch (fast, as compute_fid.py; images then "
                "depend on the batch within the tolerances) instead of one per image"),
    )
    guidance = None
    checkpoint_suffix = ".pt"
    default_model = None
    #: train_cifar10.py: Adam lr 2e-4, batch 128, LambdaLR warm-up over 5,000 steps (640,000 images),
    #: EMA decay 0.9999 per step of 128 images.
    train_defaults = {
        "batch": 128,
        "lr": 2e-4,
        "warmup_images": 5000 * 128,
        "ema_halflife_images": int(round(128 * math.log(0.5) / math.log(0.9999))),
    }

    def __init__(self) -> None:
        self.num_classes = 0

    # -- checkpoints ---------------------------------------------------------------------------
    def load(self, path: str) -> Any:
        """``UNetModelWrapper`` (eval, CPU, float32) from the ``.pt`` container; sets ``self.num_classes``."""
        _require_flow()
        from neon_flow.io import load
        from neon_flow.sampling import num_classes

        net = load(path)
        self.num_classes = num_classes(net.neon_flow)
        return net

    def model_num_classes(self, path: str) -> int:
        """Classes of the checkpoint's network (0 unless ``class_cond``); loads it (does not change state)."""
        _require_flow()
        from neon_flow.io import load
        from neon_flow.sampling import num_classes

        return num_classes(load(path).neon_flow)

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        """``torch.save`` of {net_model, ema_model, step, neon} at ``path`` (see neon_flow.io)."""
        from neon_flow.io import save_container

        save_container(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        from neon_flow.io import read_metadata

        return read_metadata(path)

    # -- sampling and training -----------------------------------------------------------------
    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> Any:
        """uint8 [N, C, H, W] by torchdiffeq integration from per-seed noise (neon_flow.sampling)."""
        from neon_flow.sampling import sample

        return sample(model, seeds, labels, settings)

    def loss(self, model: Any, images: Any, labels: Any, generator: Any) -> Any:
        """train_cifar10.py's conditional flow-matching MSE (its matcher) on uint8 images."""
        from neon_flow.sampling import loss

        return loss(model, images, labels, generator)

    def make_optimizer(self, params: Any, lr: float) -> Any:
        """Adam (torch defaults) with grad-norm clipping at 1.0, as train_cifar10.py."""
        from neon_flow.sampling import make_optimizer

        return make_optimizer(params, lr)


family = FlowFamily()
