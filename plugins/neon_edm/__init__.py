"""The ``edm`` family: NVlabs/edm network pickles (Karras et al. 2022), run through the user's own
EDM checkout. The Neon paper's first systems (conditional and unconditional CIFAR-10, FFHQ-64) are
EDM networks.

EDM is not on PyPI and its licence (CC BY-NC-SA 4.0) forbids bundling it, so this family finds the
user's clone (``--set repo=PATH``, ``$NEON_EDM_REPO``, or ``torch_utils`` / ``training`` already
importable; :mod:`neon_cli.repo`) and uses its own code: the network classes (through the pickle's
``torch_utils.persistence`` records), ``training.loss``, ``training.augment`` and
``torch_utils.misc``. This module imports neither torch nor EDM; the methods do, when called.

Checkpoints: EDM's ``.pkl`` (``network-snapshot-XXXXXX.pkl``, the released ``edm-*.pkl``):
``pickle.dump(dict(ema=<network>, loss_fn=..., augment_pipe=..., dataset_kwargs=...))``. The
network is ``ema``. Loading it for sampling or training executes the code pickled in the file and
therefore needs ``--trust-pickle``; reading its metadata (classes, image shape: ``neon plugins``,
``model_num_classes``) and merging/inspecting it (``neon merge`` / ``neon inspect``) never run it.
``neon finetune`` snapshots are written in the same format and named as EDM names them,
``network-snapshot-{kimg:06d}.pkl`` (kimg = images seen // 1000), with neon's metadata in an extra
``neon`` entry; EDM's ``generate.py``, ``fid.py`` and ``train.py --transfer`` load them unchanged.

Settings (``--set``): EDM's sampler (``generate.py``'s options, :mod:`neon_edm.sampler`):
``num_steps`` (18; NFE = 2 num_steps - 1), ``sigma_min`` / ``sigma_max`` (default 0.002 / 80,
clamped to the network's own limits), ``rho`` (7), ``S_churn``, ``S_min``, ``S_max`` (default
infinity), ``S_noise`` (Algorithm 2's stochasticity; ``S_churn = 0`` is the deterministic sampler),
and ``repo``. Training settings (``neon finetune --set``): ``augment`` (0.12, EDM's default; the
paper's FFHQ run used 0.15) and ``dropout`` (0.13, EDM's default; FFHQ 0.05). No guidance setting
(EDM has no classifier-free guidance), so ``neon tune-w`` searches w alone.

Recipe (:mod:`neon_edm.training`): ``train.py --transfer``'s. ``train_defaults`` are train.py's
defaults: batch 512, lr 1e-3 (the paper: 1e-4 for CIFAR-10, 4e-6 for FFHQ), lr ramp over
10,000,000 images, EMA half-life 500,000 images without ramp-up.

Class labels: neon's seed plan (``seed % num_classes``; each image equals ``generate.py --seeds
SEED --class LABEL``'s, see :mod:`neon_edm.sampler`), or with ``--labels edm`` the label
``generate.py`` (without ``--class``) and the paper's ``cal_metrics_all.py`` draw from each seed's
generator (:meth:`EDMFamily.draw_labels`), so the images are theirs.

Metrics: ``fid`` with ``--detector`` / ``$NEON_INCEPTION`` (the TorchScript
``inception-2015-12-05.pt``) and ``--ref-stats`` / ``$NEON_REF_STATS`` (EDM's
``cifar10-32x32.npz`` / ``ffhq-64x64.npz``), else ``pixel_fid`` (see :mod:`neon_diffusers.scoring`).
"""

from __future__ import annotations

from typing import Any, Mapping

from neon_cli.family import Setting
from neon_diffusers.scoring import ImageScoring


class EDMFamily(ImageScoring):
    name = "edm"
    description = "NVlabs/edm network pickles through your EDM checkout: Heun sampler, train.py --transfer recipe"
    settings = (
        Setting("repo", None, str, "your NVlabs/edm checkout (default: $NEON_EDM_REPO, or torch_utils/training importable)"),
        Setting("num_steps", 18, int, "Heun steps N (Karras et al. 2022 Alg. 1; NFE = 2N - 1): 18 for CIFAR-10, 40 for FFHQ-64",
                low=2, high=100000),
        Setting("sigma_min", None, float, "lowest noise level (default 0.002, at least the network's sigma_min)", low=1e-12),
        Setting("sigma_max", None, float, "highest noise level (default 80, at most the network's sigma_max)", low=1e-12),
        Setting("rho", 7.0, float, "time step exponent rho of the schedule", low=1e-6, high=1e6),
        Setting("S_churn", 0.0, float, "stochasticity strength (Alg. 2; 0 = deterministic)", low=0.0),
        Setting("S_min", 0.0, float, "lowest noise level that gets churn", low=0.0),
        Setting("S_max", None, float, "highest noise level that gets churn (default: infinity)", low=0.0),
        Setting("S_noise", 1.0, float, "churn noise inflation", low=0.0),
    )
    train_settings = (
        Setting("augment", 0.12, float, "EDM augmentation probability (train.py --augment; paper: 0.12 CIFAR-10, 0.15 FFHQ)",
                low=0.0, high=1.0),
        Setting("dropout", 0.13, float, "dropout probability (train.py --dropout; paper: 0.13 CIFAR-10, 0.05 FFHQ)",
                low=0.0, high=1.0),
    )
    guidance = None
    default_model = None
    checkpoint_suffix = ".pkl"
    #: train.py's defaults with --transfer: --batch 512, --lr 10e-4, lr_rampup_kimg 10000, --ema 0.5 (Mimg), no EMA ramp-up.
    train_defaults = {"batch": 512, "lr": 1e-3, "warmup_images": 10_000_000, "ema_halflife_images": 500_000}

    def __init__(self) -> None:
        self.num_classes = 0

    # -- checkpoints ---------------------------------------------------------------------------
    def load(self, path: str, *, settings: Mapping[str, Any] | None = None, trust_pickle: bool = False,
             purpose: str = "sample") -> Any:
        """The pickle's ``ema`` network (eval, CPU): EDM's code runs, so ``trust_pickle`` is required.

        ``purpose="train"`` returns the network ``train.py --transfer`` would train (rebuilt from the
        checkout with the ``dropout`` setting, with its loss and augmentation; :mod:`neon_edm.training`).
        Raises UsageError (no ``--trust-pickle``), FamilyError (no EDM checkout, unsupported
        preconditioning, augmentation the network cannot take), CheckpointError (not an EDM pickle).
        """
        from neon_edm import checkout

        net, repo = checkout.load(path, settings, trust_pickle)
        if purpose == "train":
            from neon_edm.training import transfer

            net = transfer(net, repo, dict(settings or {}))
        self.num_classes = int(getattr(net, "label_dim", 0) or 0)
        return net

    def model_num_classes(self, path: str) -> int:
        """``label_dim`` of the pickled network (read without running code); 0 for unconditional."""
        from neon_edm.inert import network_info

        return network_info(path)["label_dim"]

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        """EDM's snapshot pickle ``dict(ema, loss_fn, augment_pipe, dataset_kwargs)`` + ``neon`` metadata."""
        from neon_edm import checkout

        checkout.save(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        """The ``neon`` entry of a pickle neon wrote ({} for EDM's own), read without running code."""
        from neon_edm.inert import neon_metadata

        return neon_metadata(path)

    def snapshot_name(self, images_seen: int) -> str:
        """EDM's name for the snapshot after ``images_seen`` images: ``network-snapshot-{kimg:06d}.pkl``."""
        return f"network-snapshot-{int(images_seen) // 1000:06d}.pkl"

    # -- sampling and training -----------------------------------------------------------------
    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> Any:
        """uint8 [N, C, H, W]: EDM's Heun sampler from per-seed generators (:mod:`neon_edm.sampler`)."""
        from neon_edm.sampler import sample

        return sample(model, seeds, labels, settings)

    def draw_labels(self, model: Any, seeds: Any) -> Any:
        """int64 [N]: the labels EDM's ``generate.py`` draws without ``--class`` (and the Neon paper's
        ``cal_metrics_all.py``): per seed, ``randint(label_dim)`` from ``torch.Generator(device)
        .manual_seed(seed % 2**32)`` after the latent ``randn([C, H, W])``, on the network's device
        (``--labels edm``; :func:`neon_edm.sampler.edm_labels`)."""
        from neon_edm.sampler import edm_labels

        device = next(model.parameters()).device
        shape = [int(model.img_channels), int(model.img_resolution), int(model.img_resolution)]
        return edm_labels(seeds, int(model.label_dim), shape, device)

    def loss(self, model: Any, images: Any, labels: Any, generator: Any) -> Any:
        """EDM's loss for the network's preconditioning, with its augmentation (:mod:`neon_edm.training`)."""
        from neon_edm.training import loss

        return loss(model, images, labels, generator)

    def make_optimizer(self, params: Any, lr: float) -> Any:
        """Adam (0.9, 0.999), eps 1e-8, non-finite gradients replaced first, as EDM's training loop."""
        from neon_edm.training import make_optimizer

        return make_optimizer(params, lr)


family = EDMFamily()
