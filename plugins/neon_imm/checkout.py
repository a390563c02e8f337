"""The user's IMM checkout, IMM network pickles loaded and written through it, and its configs.

IMM (Zhou et al. 2025, lumalabs/imm; the Neon paper's repository's ``imm/`` folder adds the
training code upstream lacks) ships networks as ``torch_utils.persistence`` pickles
``dict(ema=<IMMPrecond>, ...)``, like EDM. Loading one (``pickle.load(f)['ema']``, as IMM's
``generate_images.py`` does) executes the source code pickled inside the file, so it needs the
checkout importable and the user's explicit ``--trust-pickle``; the number of classes and neon's
metadata are read without running anything (:mod:`neon_imm.inert`).

The pixel <-> latent encoder and the training loss come from the checkout's YAML configs, as
IMM's scripts build them (``dnnlib.util.construct_class_by_name(**config.encoder)``):

* ``--set config=`` (default ``auto``: ``configs/im256_generate_images.yaml`` for a latent network,
  4 channels, ``configs/cifar10_generate_images.yaml`` for a pixel one): its ``encoder`` block
  (``training.encoders.StabilityVAEEncoder`` with ``vae_name: stabilityai/sd-vae-ft-ema`` and the
  latent whitening ``raw_mean`` / ``raw_std`` / ``final_std``); ``--set vae=PATH`` replaces
  ``vae_name`` by a local diffusers folder (there is no download here);
* ``--set train_config=`` (``neon finetune``; default ``auto``: ``configs/im256.yaml`` /
  ``configs/cifar10.yaml``, the Neon repository's): its ``loss`` block (``training.loss.IMMLoss``).
  lumalabs/imm has neither file nor ``training/loss.py``: fine-tuning needs the Neon repository's
  ``imm/`` folder, and the error says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from neon_cli.errors import FamilyError, UsageError
from neon_edm.checkout import module  # a module of the checkout (neon_cli.repo.import_module)

MARKERS = ("dnnlib/__init__.py", "torch_utils/persistence.py", "training/preconds.py", "training/encoders.py")
WHAT = "lumalabs/imm (or the imm/ folder of SinaAlemohammad/Neon)"
URL = "https://github.com/lumalabs/imm"
NEON_URL = "https://github.com/SinaAlemohammad/Neon (folder imm/)"
AUX = "_neon_imm"


class Aux:
    """What a loaded IMM network needs besides its weights: the checkout, the encoder, the loss
    (training only) and the pickle's other entries. Shared, not copied, by ``copy.deepcopy``."""

    def __init__(self, repo: Path, encoder: Any, encoder_key: str, extras: Mapping[str, Any], loss_fn: Any = None):
        self.repo, self.encoder, self.encoder_key = repo, encoder, encoder_key
        self.extras, self.loss_fn = dict(extras), loss_fn

    def __deepcopy__(self, memo: dict[int, Any]) -> "Aux":
        return self


def find(settings: Mapping[str, Any] | None) -> Path:
    """The checkout from ``--set repo=PATH``, ``$NEON_IMM_REPO`` or importable ``torch_utils`` /
    ``training``; FamilyError in one line naming all three when there is none."""
    from neon_cli.repo import find_repo

    return find_repo("imm", settings, markers=MARKERS, what=WHAT, url=URL)


def require_trust(path: str | Path, trust_pickle: bool) -> None:
    """UsageError naming ``--trust-pickle`` unless the user gave it (:func:`neon_edm.checkout.require_trust`)."""
    from neon_edm.checkout import require_trust as edm_require_trust

    edm_require_trust(path, trust_pickle, "IMM")


def _yaml_loader() -> Any:
    """PyYAML's SafeLoader that also reads ``1e-6``-style numbers as floats, as OmegaConf (IMM's
    Hydra configs) does; plain YAML 1.1 reads them as strings."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return Loader


def read_config(repo: Path, name: str, default_for: str, what: str) -> tuple[dict[str, Any], Path]:
    """The YAML config ``name`` (a path, or a file name under ``<repo>/configs``; ``auto``:
    ``default_for``) as a dict (numbers such as ``1e-6`` as floats, as Hydra reads them).
    UsageError naming ``--set WHAT`` when it is missing."""
    import yaml

    file = Path(default_for if name in ("", "auto", None) else str(name)).expanduser()
    if not file.is_absolute() and not file.exists():
        file = repo / "configs" / file
    if not file.is_file():
        hint = f"; lumalabs/imm has no training configs: use {NEON_URL}" if what == "train_config" else ""
        raise UsageError(f"--set {what}: {file} does not exist{hint}")
    try:
        data = yaml.load(file.read_text(), Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except Exception as exc:
        raise UsageError(f"--set {what}: {file} is not readable YAML ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--set {what}: {file} is not a mapping")
    return data, file


_ENCODERS: dict[str, Any] = {}


def make_encoder(repo: Path, settings: Mapping[str, Any], channels: int) -> tuple[Any, str]:
    """``(encoder, key)``: the config's ``encoder`` built by the checkout's ``dnnlib`` (``vae_name``
    replaced by ``--set vae``), one per (checkout, config, vae) in this process. ``key``
    identifies it for the cache of encoded latents."""
    cfg, file = read_config(repo, str(settings.get("config") or "auto"),
                            "im256_generate_images.yaml" if channels == 4 else "cifar10_generate_images.yaml", "config")
    enc_cfg = dict(cfg.get("encoder") or {})
    if "class_name" not in enc_cfg:
        raise UsageError(f"--set config: {file} has no encoder.class_name")
    vae = settings.get("vae")
    if vae:
        p = Path(str(vae)).expanduser()
        if not p.exists():
            raise UsageError(f"--set vae: {p} does not exist (give a local diffusers AutoencoderKL folder)")
        enc_cfg["vae_name"] = str(p)
    key = repr((str(repo), sorted(enc_cfg.items())))
    if key not in _ENCODERS:
        dnnlib = module(repo, "dnnlib")
        try:
            _ENCODERS[key] = dnnlib.util.construct_class_by_name(**enc_cfg)
        except Exception as exc:
            raise FamilyError(f"--set config: {file}: building {enc_cfg['class_name']} failed: {type(exc).__name__}: {exc}") from None
    from neon_cli.fsutil import sha256_path

    name = enc_cfg.get("vae_name")
    vae_id = sha256_path(name)[:16] if name and Path(str(name)).exists() else str(name)
    ident = f"{enc_cfg['class_name']}|{vae_id}|{sorted((k, v) for k, v in enc_cfg.items() if k != 'vae_name')}"
    return _ENCODERS[key], ident


def make_loss(repo: Path, settings: Mapping[str, Any], channels: int) -> Any:
    """The training config's ``loss`` (``training.loss.IMMLoss``) built by the checkout."""
    if not (repo / "training" / "loss.py").is_file():
        raise FamilyError(f"{repo} has no training/loss.py: lumalabs/imm ships no training code; fine-tune with the "
                          f"imm/ folder of {NEON_URL} (--set repo=.../Neon/imm)")
    cfg, file = read_config(repo, str(settings.get("train_config") or "auto"),
                            "im256.yaml" if channels == 4 else "cifar10.yaml", "train_config")
    loss_cfg = dict(cfg.get("loss") or {})
    if "class_name" not in loss_cfg:
        raise UsageError(f"--set train_config: {file} has no loss.class_name")
    dnnlib = module(repo, "dnnlib")
    try:
        return dnnlib.util.construct_class_by_name(**loss_cfg)
    except Exception as exc:
        raise FamilyError(f"--set train_config: {file}: building {loss_cfg['class_name']} failed: {type(exc).__name__}: {exc}") from None


def load(path: str | Path, settings: Mapping[str, Any] | None, trust_pickle: bool, purpose: str = "sample") -> Any:
    """The pickle's ``ema`` network in eval mode on CPU, carrying an :class:`Aux` (encoder; with
    ``purpose="train"`` also the loss, and gradients on). Raises UsageError (no
    ``--trust-pickle``, bad config), FamilyError (no checkout, no training code),
    CheckpointError (not an IMM pickle, or IMM's code failed to rebuild it)."""
    from neon_edm.checkout import unpickle_network
    from neon_imm.inert import read_fields

    settings = dict(settings or {})
    require_trust(path, trust_pickle)
    read_fields(path)  # refuse anything that is not dict(ema=<persistent network>, ...) before running it
    repo = find(settings)
    net, extras = unpickle_network(path, repo, "IMM")
    channels = int(getattr(net, "img_channels", 0) or 0)
    encoder, key = make_encoder(repo, settings, channels)
    loss_fn = make_loss(repo, settings, channels) if purpose == "train" else None
    if purpose == "train":  # IMM's training_loop.py: net.train().requires_grad_(True) (every parameter)
        net = rebuild_for_training(net, repo, settings, channels)
        net.requires_grad_(True)
    setattr(net, AUX, Aux(repo, encoder, key, extras, loss_fn))
    return net


def rebuild_for_training(net: Any, repo: Path, settings: Mapping[str, Any], channels: int) -> Any:
    """The network the Neon repository's ``imm/training/training_loop.py`` trains from a pickle
    (``training.transfer``): built by the checkout (``dnnlib.util.construct_class_by_name`` of the
    training config's ``network`` block with ``img_resolution``, ``img_channels``, ``label_dim``
    and ``num_classes`` of the pickled network, as the loop's ``interface_kwargs``; a config
    without a ``network`` block: the checkout's ``training.preconds.<class>`` with the pickle's
    recorded constructor arguments), then the pickle's parameters and buffers copied in with the
    checkout's ``torch_utils.misc.copy_params_and_buffers``. So the training code (e.g.
    ``sample_eta_t``, which ``IMMLoss`` calls) is the checkout's, not the older source pickled in a
    lumalabs/imm file. Unlike the loop's ``require_all=False``, every tensor must match by name and
    shape (FamilyError naming the config otherwise: a silently untrained tensor would change the
    merge). Returns the new network on CPU in eval mode."""
    import torch

    cfg, file = read_config(repo, str(settings.get("train_config") or "auto"),
                            "im256.yaml" if channels == 4 else "cifar10.yaml", "train_config")
    net_cfg = dict(cfg.get("network") or {})
    name = type(net).__name__
    try:
        if net_cfg.get("class_name"):
            label_dim = int(getattr(net, "label_dim", 0) or 0)
            iface = {"img_resolution": net.img_resolution, "img_channels": net.img_channels, "label_dim": label_dim,
                     "num_classes": label_dim}
            where = f"{file}: network ({net_cfg['class_name']})"
            with torch.random.fork_rng(devices=[]):  # the fresh initialisation is overwritten
                new = module(repo, "dnnlib").util.construct_class_by_name(**{**net_cfg, **iface})
        else:
            cls = getattr(module(repo, "training.preconds"), name, None)
            if cls is None:
                raise FamilyError(f"{repo}: training.preconds has no class {name!r} (the pickle's network)")
            where = f"{repo}: training.preconds.{name} with the pickle's arguments"
            with torch.random.fork_rng(devices=[]):
                new = cls(*list(getattr(net, "init_args", ())), **dict(getattr(net, "init_kwargs", {})))
    except FamilyError:
        raise
    except Exception as exc:
        raise FamilyError(f"--set train_config: building the network from {file} failed: {type(exc).__name__}: {exc}") from None
    ref, mine = net.state_dict(), new.state_dict()
    bad = sorted(set(mine) ^ set(ref)) or [k for k in mine if mine[k].shape != ref[k].shape]
    if bad:
        raise FamilyError(f"--set train_config: {where} differs from the pickled {name} at "
                          f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} (give the config the pickle was trained with)")
    module(repo, "torch_utils.misc").copy_params_and_buffers(src_module=net, dst_module=new, require_all=True)
    return new.eval().cpu()


def unwrap(model: Any) -> tuple[Any, Aux]:
    """``(network, aux)`` of a loaded model, DistributedDataParallel or not."""
    net = getattr(model, "module", model)
    aux = net.__dict__.get(AUX)
    if not isinstance(aux, Aux):
        raise FamilyError("not a network loaded by the imm family")
    return net, aux


def save(net: Any, path: str | Path, metadata: Mapping[str, str]) -> None:
    """``pickle.dump(dict(ema=net, augment_pipe=..., dataset_kwargs=..., neon=metadata))``: IMM's
    snapshot format (the Neon repository's ``training_loop.py``), which IMM's ``generate_images.py``
    loads unchanged (it reads ``ema``). The network is deep-copied, put in eval mode, frozen and
    moved to CPU first, as IMM does. FamilyError when it is not a ``torch_utils.persistence``
    object (its class source could not travel in the pickle)."""
    from neon_edm.checkout import pickle_network

    aux = getattr(net, "module", net).__dict__.get(AUX)
    extras = dict(aux.extras) if isinstance(aux, Aux) else {}
    entries = {"augment_pipe": extras.get("augment_pipe"), "dataset_kwargs": dict(extras.get("dataset_kwargs") or {})}
    pickle_network(net, path, entries, metadata, attr=AUX, system="IMM")
