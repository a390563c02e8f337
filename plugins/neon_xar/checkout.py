"""The user's xAR checkout, xAR checkpoints read without running code, and the model built from them.

xAR (Ren et al. 2025, OliverRensu/xAR; also the ``xAR/`` folder of SinaAlemohammad/Neon) is not
a package: its modules are ``models/xar.py`` (the ``xAR`` class and the ``xar_base`` /
``xar_large`` / ``xar_huge`` builders), ``models/vae.py`` (MAR's KL-16 ``AutoencoderKL``) and
``models/sampler.py``. The family imports them from the checkout (:func:`find`) and never copies
them.

Checkpoints (all read with ``torch.load(weights_only=True)``, which runs no code):

* released weights ``xAR-B.pth`` / ``xAR-L.pth``: a plain state dict (xAR's ``eval.py``:
  ``load_state_dict(torch.load(path))``);
* training checkpoints ``checkpoint-*.pth`` of xAR's ``main_mar.py``: ``{model, model_ema,
  optimizer, epoch, scaler, args}`` with ``args`` an ``argparse.Namespace``, which the plain
  weights-only loader refuses; it is allowed here (``torch.serialization.safe_globals``), since
  the loader only ever sets the attributes of a Namespace, with plain values, and calls nothing;
* the Neon repository's ``train_new.py`` snapshots ``{'model_ema': ..., 'epoch': ...}`` and the
  ones ``neon finetune`` writes ``{'model_ema': ..., 'neon': {...}}``.

The weights are ``model_ema`` where present (the Neon repository's ``calculate_fid.py``:
``ckpt.get('model_ema', ckpt.get('state_dict', ckpt))``), else ``state_dict``, else ``model``,
else the file itself.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, Mapping

from neon_cli.errors import CheckpointError, FamilyError, UsageError, exception_line

MARKERS = ("models/xar.py", "models/vae.py", "models/sampler.py")
WHAT = "OliverRensu/xAR"
URL = "https://github.com/OliverRensu/xAR"
VAE_ENV = "NEON_XAR_VAE"
#: xAR's latent scale: training uses ``posterior.sample().mul_(0.2325)``, sampling ``vae.decode(z / 0.2325)``.
LATENT_SCALE = 0.2325
#: Container keys holding the weights, in the order the Neon repository's loader tries them.
WEIGHT_KEYS = ("model_ema", "state_dict", "model")
#: Attribute under which a loaded network carries its :class:`Aux` (VAE, build arguments).
AUX = "_neon_xar"


class Aux:
    """What a loaded xAR network needs besides its weights: the frozen VAE, the checkout's
    modules and the build arguments. Shared, not copied, by ``copy.deepcopy`` (the EMA copy and
    tune-w's candidates use the same frozen VAE)."""

    def __init__(self, repo: Path, vae: Any, vae_path: str, vae_module: Any, arch: str, kwargs: dict[str, Any],
                 train: Mapping[str, Any]):
        self.repo, self.vae, self.vae_path, self.vae_module = repo, vae, vae_path, vae_module
        self.arch, self.kwargs, self.train = arch, dict(kwargs), dict(train)
        self._vae_sha: str | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> "Aux":
        return self

    @property
    def vae_sha256(self) -> str:
        if self._vae_sha is None:
            from neon_cli.fsutil import sha256_file

            self._vae_sha = sha256_file(self.vae_path)
        return self._vae_sha


def find(settings: Mapping[str, Any] | None) -> Path:
    """The checkout from ``--set repo=PATH``, ``$NEON_XAR_REPO`` or an importable ``models``
    package; FamilyError in one line naming all three when there is none."""
    from neon_cli.repo import find_repo

    return find_repo("xar", settings, markers=MARKERS, what=WHAT, url=URL)


def modules(repo: Path) -> tuple[Any, Any]:
    """``(models.xar, models.vae)`` imported from the checkout.

    ``models/xar.py`` imports ``flash_attn`` at its top without using it; where flash-attn is not
    installed (a CPU machine), a stand-in module whose function raises is in ``sys.modules`` while
    ``models.xar`` is imported, and removed afterwards (so no other library takes it for the real one).
    """
    import importlib.machinery
    import importlib.util

    from neon_cli.repo import import_module

    try:
        missing = "flash_attn" not in sys.modules and importlib.util.find_spec("flash_attn") is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        stub = types.ModuleType("flash_attn")
        stub.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)

        def flash_attn_func(*args: Any, **kwargs: Any) -> Any:
            raise FamilyError("flash_attn is not installed (neon stood in for it because xAR imports it unused)")

        stub.flash_attn_func = flash_attn_func  # type: ignore[attr-defined]
        sys.modules["flash_attn"] = stub
    try:
        return import_module(repo, "models.xar"), import_module(repo, "models.vae")
    finally:
        if missing:
            sys.modules.pop("flash_attn", None)


def _torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` allowing ``argparse.Namespace``; CheckpointError in one line."""
    import pickle
    import zipfile

    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: not a file")
    mmap = zipfile.is_zipfile(p)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        why = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(f"{p}: holds Python objects that neon does not unpickle (only tensors, plain data and "
                              f"argparse.Namespace are read): {why.strip()[:200]}") from None
    except Exception as exc:
        raise CheckpointError(f"{p}: not a readable torch checkpoint ({type(exc).__name__}: {exception_line(exc)})") from None


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """``(state_dict, neon_metadata, key)`` of an xAR checkpoint (module docstring), ``key`` being
    the container key the weights came from (None: a plain state dict). Raises CheckpointError
    naming the file when nothing in it is a state dict."""
    obj = _torch_load(path)
    meta: dict[str, str] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("neon"), Mapping):
        meta = {str(k): str(v) for k, v in obj["neon"].items()}
    if _is_state_dict(obj):
        return dict(obj), meta, None
    if isinstance(obj, Mapping):
        for key in WEIGHT_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key]), meta, key
        keys = sorted(map(str, obj))[:8]
        raise CheckpointError(f"{path}: no xAR weights (expected a state dict or one of {', '.join(WEIGHT_KEYS)}; "
                              f"found keys {', '.join(keys)})")
    raise CheckpointError(f"{path}: not an xAR checkpoint (a {type(obj).__name__}, expected a state dict)")


_VAE_CACHE: dict[tuple[str, int, int], Any] = {}


def vae_path(settings: Mapping[str, Any] | None) -> str:
    """``--set vae=PATH`` or ``$NEON_XAR_VAE``; UsageError naming both when neither is given."""
    given = (settings or {}).get("vae") or os.environ.get(VAE_ENV)
    if not given:
        raise UsageError("--set vae=PATH: the xar family needs MAR's KL-16 VAE (kl16.ckpt, the file xAR's --vae_path "
                         f"names); give --set vae=PATH or set {VAE_ENV}")
    p = Path(str(given)).expanduser()
    if not p.is_file():
        raise UsageError(f"--set vae: {p} is not a file")
    return str(p)


def vae_layout(sd: Mapping[str, Any]) -> tuple[int, tuple[int, ...]]:
    """``(embed_dim, ch_mult)`` of a MAR ``AutoencoderKL`` state dict: ``post_quant_conv`` has
    ``embed_dim`` channels and level i of the encoder ``ch * ch_mult[i]`` (``ch`` from ``conv_in``)."""
    try:
        embed = int(sd["post_quant_conv.weight"].shape[0])
        ch = int(sd["encoder.conv_in.weight"].shape[0])
        levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        mult = tuple(int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in range(levels))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"not a MAR AutoencoderKL state dict (missing {exc})") from None
    return embed, mult


def load_vae(vae_module: Any, path: str) -> Any:
    """MAR's ``AutoencoderKL`` from the checkout with the weights of ``path`` (``{"model": state
    dict}``, as its ``init_from_ckpt`` reads, but with ``weights_only=True``), eval, frozen, CPU.
    Cached per file (path, size, mtime)."""
    import torch

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _VAE_CACHE:
        return _VAE_CACHE[key]
    obj = _torch_load(path)
    sd = obj.get("model") if isinstance(obj, Mapping) and "model" in obj else obj
    if not _is_state_dict(sd):
        raise CheckpointError(f"--set vae: {path} holds no VAE state dict (expected {{'model': state_dict}} like kl16.ckpt)")
    try:
        embed, mult = vae_layout(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"--set vae: {path}: {exc}") from None
    with torch.random.fork_rng(devices=[]):
        vae = vae_module.AutoencoderKL(embed_dim=embed, ch_mult=mult)
    missing, _unexpected = vae.load_state_dict(sd, strict=False)  # strict=False as xAR's init_from_ckpt (loss weights)
    if missing:
        raise CheckpointError(f"--set vae: {path} lacks {len(missing)} weights of AutoencoderKL(embed_dim={embed}, "
                              f"ch_mult={mult}), e.g. {missing[0]}")
    vae.eval().requires_grad_(False)
    vae._neon_stride = 2 ** (len(mult) - 1)
    _VAE_CACHE.clear()  # one VAE at a time
    _VAE_CACHE[key] = vae
    return vae


def build_kwargs(sd: Mapping[str, Any], vae: Any, train: Mapping[str, Any] | None) -> dict[str, Any]:
    """The constructor arguments xAR's scripts pass (``img_size``, ``vae_stride=16``,
    ``patch_size=1``, ``vae_embed_dim=16``, ``class_num``, ``attn_dropout`` / ``proj_dropout`` 0.1,
    ``label_drop_prob`` 0.1), read from the checkpoint and the VAE: ``img_size = sqrt(seq_len) *
    stride`` from ``encoder_pos_embed_learned`` and the VAE's number of levels, ``class_num`` =
    rows of ``class_emb`` - 1 (the last row is the null class)."""
    try:
        seq_len = int(sd["encoder_pos_embed_learned"].shape[1])
        rows = int(sd["class_emb.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(f"not an xAR state dict (no {exc.args[0]})") from None
    side = math.isqrt(seq_len)
    train = dict(train or {})
    return {
        "img_size": side * int(vae._neon_stride),
        "vae_stride": int(vae._neon_stride),
        "patch_size": 1,
        "vae_embed_dim": int(vae.embed_dim),
        "class_num": rows - 1,
        "attn_dropout": float(train.get("attn_dropout", 0.1)),
        "proj_dropout": float(train.get("proj_dropout", 0.1)),
        "label_drop_prob": float(train.get("label_drop_prob", 0.1)),
    }


def _shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


_META_SHAPES: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}


def _builder_shapes(xar_module: Any, name: str, kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of ``models.xar.<name>(**kwargs)``, built on the meta device (cached)."""
    import torch

    key = (id(xar_module), name, tuple(sorted(kwargs.items())))
    if key not in _META_SHAPES:
        with torch.device("meta"):
            _META_SHAPES[key] = _shapes(getattr(xar_module, name)(**kwargs).state_dict())
    return _META_SHAPES[key]


def choose_arch(xar_module: Any, sd: Mapping[str, Any], kwargs: Mapping[str, Any], arch: str, path: Any) -> str:
    """The builder of ``models.xar`` (``xar_base``, ...) whose model has exactly the checkpoint's
    keys and shapes (built on the meta device: no memory, no time); ``arch`` != "auto" is checked
    the same way. FamilyError naming the file when none matches."""
    names = [arch] if arch != "auto" else sorted(n for n, f in vars(xar_module).items() if n.startswith("xar_") and callable(f))
    want = _shapes(sd)
    for name in names:
        fn = getattr(xar_module, name, None)
        if not callable(fn):
            raise FamilyError(f"--set arch={name}: models.xar has no builder {name!r}")
        got = _builder_shapes(xar_module, name, kwargs)
        if got == want:
            return name
        if arch != "auto":
            diff = sorted(set(got) ^ set(want)) or [k for k in got if got[k] != want[k]]
            raise CheckpointError(f"{path}: does not fit {name} (first difference: {diff[0]})")
    raise CheckpointError(f"{path}: fits none of models.xar's builders ({', '.join(names)}); give --set arch=NAME")


def build(xar_module: Any, name: str, kwargs: Mapping[str, Any], sd: Mapping[str, Any]) -> Any:
    """``models.xar.<name>(**kwargs)`` holding ``sd``: built on the meta device and the tensors
    assigned (no random initialisation to throw away), or, if the model has tensors the state dict
    lacks, built on CPU (torch's global generator left as it was) and loaded strictly."""
    import torch

    with torch.device("meta"):
        net = getattr(xar_module, name)(**kwargs)
    net.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in list(net.parameters()) + list(net.buffers())):
        with torch.random.fork_rng(devices=[]):
            net = getattr(xar_module, name)(**kwargs)
        net.load_state_dict(sd, strict=True)
    return net


def load(path: str, settings: Mapping[str, Any] | None, purpose: str) -> Any:
    """The xAR network of ``path`` (eval mode, CPU) carrying an :class:`Aux` (module docstring).

    ``purpose="train"`` builds it with the training settings (dropouts, label dropout) and with
    gradients on. Raises UsageError (no VAE), FamilyError (no checkout), CheckpointError.
    """
    settings = dict(settings or {})
    repo = find(settings)
    xar_module, vae_module = modules(repo)
    vpath = vae_path(settings)
    vae = load_vae(vae_module, vpath)
    sd, _meta, _key = read_checkpoint(path)
    train = {k: settings[k] for k in ("attn_dropout", "proj_dropout", "label_drop_prob", "hflip") if k in settings}
    kwargs = build_kwargs(sd, vae, train if purpose == "train" else None)
    try:
        arch = choose_arch(xar_module, sd, kwargs, str(settings.get("arch") or "auto"), path)
        net = build(xar_module, arch, kwargs, sd)
    except (CheckpointError, FamilyError):
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: xAR's code ({repo}) failed to build the model: {type(exc).__name__}: {exc}") from None
    net.eval().requires_grad_(purpose == "train")
    setattr(net, AUX, Aux(repo, vae, vpath, vae_module, arch, kwargs, train))
    return net


def unwrap(model: Any) -> tuple[Any, Aux]:
    """``(network, aux)`` of a loaded model, DistributedDataParallel or not."""
    net = getattr(model, "module", model)
    aux = net.__dict__.get(AUX)
    if not isinstance(aux, Aux):
        raise FamilyError("not a network loaded by the xar family")
    return net, aux


def save(model: Any, path: str | Path, metadata: Mapping[str, str]) -> None:
    """``torch.save({'model_ema': state_dict, 'neon': metadata}, path)``: the Neon repository's
    snapshot layout (``train_new.py``), read by its ``calculate_fid.py`` (``model_ema``) and by
    ``torch.load(weights_only=True)``; the state dict has the model's keys, buffers included."""
    import torch

    net = getattr(model, "module", model)
    sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    torch.save({"model_ema": sd, "neon": {str(k): str(v) for k, v in metadata.items()}}, str(path))


def metadata(path: str | Path) -> dict[str, str]:
    """The ``neon`` entry of a checkpoint neon wrote ({} for xAR's own files)."""
    return read_checkpoint(path)[1]


def num_classes(path: str | Path) -> int:
    """Classes of the checkpoint's model: rows of ``class_emb.weight`` - 1 (the null class)."""
    sd = read_checkpoint(path)[0]
    if "class_emb.weight" not in sd:
        raise CheckpointError(f"{path}: not an xAR state dict (no class_emb.weight)")
    return int(sd["class_emb.weight"].shape[0]) - 1
