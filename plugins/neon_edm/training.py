"""EDM's fine-tuning recipe, ``train.py --transfer`` as the Neon paper ran it, on neon's core loop.

What ``train.py --transfer=PKL`` does and what neon does in its place:

* **network**: EDM builds a fresh network from the command line (``--arch``, ``--precond``,
  ``--cbase``, ``--cres``, ``--dropout``, ``--augment`` -> ``augment_dim=9``) and copies the
  pickle's ``ema`` parameters and buffers into it (``misc.copy_params_and_buffers``,
  ``require_all=False``). neon builds the same class from the checkout's ``training.networks`` with
  the pickle's own constructor arguments (``init_args`` / ``init_kwargs`` recorded by
  ``torch_utils.persistence``, so the architecture cannot disagree with the file), ``dropout``
  replaced by the ``dropout`` setting, and copies with the checkout's own
  ``copy_params_and_buffers``; ``use_fp16`` is False (train.py's ``--fp16`` default). With
  ``augment > 0`` the network needs EDM's 9 augmentation labels (``augment_dim=9``, as the
  released CIFAR-10/FFHQ networks have); with ``augment = 0`` EDM
  would build no augmentation layer, neon keeps the base's (it is not used without augment labels,
  so the outputs are the same, and theta_s keeps theta_r's keys for merging).
* **preconditioning** (``--set precond``, train.py's ``--precond``): ``same`` (default recipe)
  keeps the pickle's class; ``vp`` / ``ve`` / ``edm`` build that class instead, with the pickle's
  architecture arguments (its own preconditioning arguments, e.g. VP's ``beta_d``, ``beta_min``,
  ``M``, ``epsilon_t``, dropped: the new class's defaults apply, as in train.py) and the same
  weights. The Neon paper's scripts give no ``--precond``, so train.py's default ``edm`` ran:
  ``EDMPrecond`` + ``EDMLoss`` from the VP weights (``--recipe paper``). The preconditioning
  classes own no parameters or buffers (the U-Net is ``model``), so theta_s has theta_r's keys.
* **loss**: the checkout's ``training.loss`` class matching the preconditioning (``VPPrecond`` ->
  ``VPLoss``, ``VEPrecond`` -> ``VELoss``, ``EDMPrecond`` -> ``EDMLoss``, default arguments as
  ``train.py``), called as ``loss_fn(net=net, images=images, labels=labels, augment_pipe=pipe)`` on
  images scaled to [-1, 1] (``x / 127.5 - 1``) with one-hot float32 labels; the scalar is
  ``loss.sum() / batch`` (training_loop.py's ``loss.sum().mul(loss_scaling / batch_gpu_total)``).
* **augmentation**: the checkout's ``training.augment.AugmentPipe(p=augment, xflip=1e8, yflip=1,
  scale=1, rotate_frac=1, aniso=1, translate_frac=1)`` (train.py's), none when ``augment = 0``.
* **optimiser**: ``torch.optim.Adam(betas=(0.9, 0.999), eps=1e-8)`` with non-finite gradients
  replaced first (``nan_to_num(nan=0, posinf=1e5, neginf=-1e5)``, training_loop.py).
* **schedule** (core loop, ``train_defaults``): lr ramp ``lr * min(images_seen / 10e6, 1)``
  (``lr_rampup_kimg = 10000``), EMA half-life 500,000 images (``--ema 0.5``) with no ramp-up
  (``--transfer`` sets ``ema_rampup_ratio = None``), ``beta = 0.5 ** (batch / halflife)``, batch
  512.
* **randomness**: EDM's loss, augmentation and dropout draw from torch's global generator; neon
  seeds it for each step from the core's per-step generator (:func:`neon_cli.repo.seeded_global_rng`),
  so a resumed run repeats the same noise.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from neon_cli.errors import FamilyError
from neon_edm import checkout

LOSS_FOR = {"VPPrecond": "VPLoss", "VEPrecond": "VELoss", "EDMPrecond": "EDMLoss"}
#: train.py's --precond choices and the network class each builds.
PRECOND_CLASS = {"vp": "VPPrecond", "ve": "VEPrecond", "edm": "EDMPrecond"}
#: Each preconditioning's own constructor arguments (training/networks.py); the rest
#: (img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs) is the
#: architecture, which train.py passes to whichever class --precond names.
PRECOND_KWARGS = {"VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t"), "VEPrecond": ("sigma_min", "sigma_max"),
                  "EDMPrecond": ("sigma_min", "sigma_max", "sigma_data")}
#: train.py's AugmentPipe arguments for ``--augment P`` (besides ``p``).
AUGMENT_KWARGS = {"xflip": 1e8, "yflip": 1, "scale": 1, "rotate_frac": 1, "aniso": 1, "translate_frac": 1}
#: The number of augmentation labels those produce (train.py's ``network_kwargs.augment_dim = 9``).
AUGMENT_DIM = 9
#: training_loop.py's nan_to_num replacement of non-finite gradients.
NAN_TO_NUM = {"nan": 0.0, "posinf": 1e5, "neginf": -1e5}


def loss_class_name(net: Any) -> str:
    """The EDM loss class for the network's preconditioning; FamilyError for another class."""
    name = type(net).__name__
    if name not in LOSS_FOR:
        raise FamilyError(f"EDM network class {name!r} has no training loss in EDM's train.py "
                          f"(supported: {', '.join(LOSS_FOR)})")
    return LOSS_FOR[name]


def transfer(base: Any, repo: Any, settings: Mapping[str, Any]) -> Any:
    """The network ``train.py --transfer`` trains: see the module docstring. Returns it in train
    mode with gradients on, carrying ``loss_fn``, ``augment_pipe`` and ``dataset_kwargs``."""
    networks = checkout.module(repo, "training.networks")
    misc = checkout.module(repo, "torch_utils.misc")
    loss_mod = checkout.module(repo, "training.loss")
    augment_mod = checkout.module(repo, "training.augment")
    own = type(base).__name__
    loss_class_name(base)  # a preconditioning EDM's train.py knows
    precond = str(settings.get("precond", "same") or "same")
    name = own if precond == "same" else PRECOND_CLASS.get(precond, precond)
    if name not in LOSS_FOR:
        raise FamilyError(f"--set precond={precond}: not one of same, {', '.join(PRECOND_CLASS)}")
    loss_name = LOSS_FOR[name]
    cls = getattr(networks, name, None)
    if cls is None:
        raise FamilyError(f"{repo}: training.networks has no class {name!r} (the pickle's network)")
    try:
        args, kwargs = list(base.init_args), dict(base.init_kwargs)
    except Exception:
        raise FamilyError(f"the pickled {own} has no recorded constructor arguments (init_args/init_kwargs)") from None
    if name != own:  # train.py --precond: the same architecture arguments, the new class's own defaults
        kwargs = {k: v for k, v in kwargs.items() if k not in PRECOND_KWARGS.get(own, ())}
    augment = float(settings.get("augment", 0.12))
    dropout = float(settings.get("dropout", 0.13))
    base_aug = int(kwargs.get("augment_dim", 0) or 0)
    if augment > 0 and base_aug != AUGMENT_DIM:
        raise FamilyError(f"--set augment={augment}: the base network has augment_dim={base_aug}, EDM's augmentation "
                          f"needs {AUGMENT_DIM} (train.py would add a new, untrained layer theta_r lacks, so theta_s could "
                          "not be merged with it); give --set augment=0")
    kwargs["dropout"] = dropout
    kwargs["use_fp16"] = False  # train.py passes use_fp16=--fp16, default False
    with torch.random.fork_rng(devices=[]):  # the fresh initialisation is overwritten; keep the global RNG as it was
        net = cls(*args, **kwargs)
    ref = dict(base.state_dict())
    mine = net.state_dict()
    bad = sorted(set(mine) ^ set(ref)) or [k for k in mine if mine[k].shape != ref[k].shape]
    if bad:
        raise FamilyError(f"{repo}: training.networks.{name} built with the pickle's arguments differs from the pickled "
                          f"{own} at {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} (another EDM version?)")
    misc.copy_params_and_buffers(src_module=base, dst_module=net, require_all=True)
    net.train().requires_grad_(True)
    pipe = augment_mod.AugmentPipe(p=augment, **AUGMENT_KWARGS) if augment > 0 else None
    dataset_kwargs = {"class_name": "training.dataset.ImageFolderDataset", "path": None,
                      "use_labels": bool(getattr(net, "label_dim", 0)), "xflip": False, "cache": True,
                      "resolution": getattr(net, "img_resolution", None), "max_size": None}
    setattr(net, checkout.EXTRAS, {"loss_fn": getattr(loss_mod, loss_name)(), "augment_pipe": pipe,
                                   "dataset_kwargs": dataset_kwargs})
    return net


def loss(model: Any, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """EDM's training objective on uint8 images [N, C, H, W]: ``loss_fn(...).sum() / N`` (scalar float32).

    ``model`` is the network :func:`transfer` made, or DistributedDataParallel around it. The loss,
    augmentation and dropout noise come from torch's global generator seeded from ``generator``.
    Raises FamilyError for a class-conditional network without labels.
    """
    inner = getattr(model, "module", model)
    extras = checkout.extras_of(inner)
    loss_fn = extras.get("loss_fn")
    if loss_fn is None:
        raise FamilyError("the EDM network was not loaded for training (neon finetune loads it with its recipe)")
    dev = images.device
    x = images.to(torch.float32) / 127.5 - 1
    label_dim = int(getattr(inner, "label_dim", 0) or 0)
    onehot = None
    if label_dim:
        if labels is None:
            raise FamilyError(f"the EDM network is class-conditional ({label_dim} classes) but the synthetic set has no labels")
        onehot = torch.eye(label_dim, device=dev)[labels.to(dev).long()]
    from neon_cli.repo import seeded_global_rng

    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with seeded_global_rng(seed, dev):
        per_element = loss_fn(net=model, images=x, labels=onehot, augment_pipe=extras.get("augment_pipe"))
    return per_element.sum() / x.shape[0]


class EDMAdam(torch.optim.Adam):
    """Adam whose ``step`` first replaces non-finite gradients as EDM's training loop does
    (``torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5)``); state dicts are Adam's."""

    def step(self, closure: Any = None) -> Any:
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        torch.nan_to_num(p.grad, out=p.grad, **NAN_TO_NUM)
        return super().step(closure)


def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    """``EDMAdam(params, lr, betas=(0.9, 0.999), eps=1e-8)`` (train.py's ``optimizer_kwargs``)."""
    return EDMAdam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
