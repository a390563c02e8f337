"""Folders of the ``diffusers`` family: which layouts are read, what is written, the folder merge.

Read (:func:`resolve`), a local folder only (nothing is downloaded):

* a pipeline folder (``DDPMPipeline.save_pretrained`` / ``DDIMPipeline``): ``model_index.json``,
  ``unet/`` (config.json + diffusion_pytorch_model.safetensors), ``scheduler/scheduler_config.json``;
* a ``train_unconditional.py`` accelerate checkpoint ``checkpoint-N/`` with ``unet/`` and, with
  ``--use_ema``, ``unet_ema/`` (``EMAModel.save_pretrained``): **the EMA weights are used when
  present** (``unet_ema/`` wins over ``unet/``). Its scheduler is taken from ``scheduler/`` of the
  folder or of its parent (the training output_dir), else the script's default;
* a bare ``UNet2DModel`` folder (``config.json`` + weights), with ``scheduler_config.json`` beside
  it or ``../scheduler/`` (a pipeline's ``unet/`` subfolder), else the default scheduler.

Default scheduler when none is found: ``DDPMScheduler(num_train_timesteps=1000)`` with its defaults
(linear betas 1e-4..0.02, epsilon prediction), as ``train_unconditional.py`` creates it.

Written (:func:`save_pipeline`): always the ``DDPMPipeline`` layout (``model_index.json``, ``unet/``,
``scheduler/``, loadable with ``DDPMPipeline.from_pretrained`` and
``UNet2DModel.from_pretrained(path, subfolder="unet")``) plus ``neon.json``::

    {"schema": "neon.diffusers/1", "metadata": {str: str}, "num_classes": K, "null_class": K}

``metadata`` is what ``read_metadata`` returns (e.g. ``train_images``); ``num_classes`` /
``null_class`` record the class convention (below). diffusers ignores the file.

Class labels: a ``UNet2DModel`` with ``num_class_embeds = E`` (``class_embed_type`` None: an
``nn.Embedding``) is read as **K = E - 1 classes plus a null class K** (the last index) used for
classifier-free guidance, the convention of the ``digits`` family. ``neon.json`` overrides it:
``"num_classes": E, "null_class": null`` declares a model without a null class (guidance must then
be 1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from neon_cli.errors import CheckpointError, UsageError

NEON_JSON = "neon.json"
SCHEMA = "neon.diffusers/1"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin")
#: The scheduler ``train_unconditional.py`` builds: DDPMScheduler(num_train_timesteps=1000).
DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
SUPPORTED_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
#: Keys EMAModel.save_pretrained adds to a UNet config (not UNet2DModel arguments).
EMA_CONFIG_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


@dataclass
class Layout:
    """Where the parts of a diffusers checkpoint folder are.

    ``unet_dir``: the UNet folder used (``unet_ema`` when present); ``scheduler_config``: the
    scheduler config dict; ``scheduler_source``: its file or ``"default"``; ``root``: the folder
    given; ``neon``: the parsed ``neon.json`` (empty dict if none); ``ema``: True when
    ``unet_dir`` is an EMA folder.
    """

    root: Path
    unet_dir: Path
    scheduler_config: dict[str, Any]
    scheduler_source: str
    neon: dict[str, Any] = field(default_factory=dict)
    ema: bool = False

    def weights_file(self) -> Path:
        """The UNet's weights file (safetensors, its sharded index, or the legacy .bin)."""
        for name in WEIGHT_NAMES:
            if (self.unet_dir / name).is_file():
                return self.unet_dir / name
        raise CheckpointError(f"{self.unet_dir}: no {' / '.join(WEIGHT_NAMES)}")


@dataclass(frozen=True)
class ModelInfo:
    """What sampling and training need besides the UNet: attached to a loaded UNet as ``neon_info``.

    ``scheduler_config``: dict (the scheduler's ``from_config`` input); ``num_classes``: K real
    classes (0: unconditional); ``null_class``: index of the unconditional label for guidance, or
    None; ``source``: the folder it was loaded from.
    """

    scheduler_config: Mapping[str, Any]
    num_classes: int
    null_class: int | None
    source: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _is_unet_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any((p / n).is_file() for n in WEIGHT_NAMES)


def resolve(path: str | os.PathLike[str]) -> Layout:
    """The :class:`Layout` of a diffusers folder (see the module docstring for what is accepted).

    Raises CheckpointError naming the folder: not a folder, no UNet found, a model class other
    than ``UNet2DModel`` or an unreadable config.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: a diffusers checkpoint is a folder (saved with save_pretrained)")
    if _is_unet_dir(root / "unet_ema"):
        unet_dir, ema = root / "unet_ema", True
    elif _is_unet_dir(root / "unet"):
        unet_dir, ema = root / "unet", False
    elif _is_unet_dir(root):
        unet_dir, ema = root, False
    else:
        raise CheckpointError(f"{root}: no UNet folder (unet_ema/, unet/ or config.json + diffusion_pytorch_model.safetensors)")
    cls = _read_json(unet_dir / "config.json").get("_class_name")
    if cls != "UNet2DModel":
        raise CheckpointError(f"{unet_dir / 'config.json'}: model class {cls!r}; the diffusers family reads UNet2DModel only")
    candidates = [root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
                  unet_dir.parent / "scheduler" / "scheduler_config.json", root.parent / "scheduler" / "scheduler_config.json"]
    sched_file = next((c for c in candidates if c.is_file()), None)
    if sched_file is not None:
        sched, source = _read_json(sched_file), str(sched_file)
    else:
        sched, source = dict(DEFAULT_SCHEDULER), "default"
    neon_file = root / NEON_JSON
    neon = _read_json(neon_file) if neon_file.is_file() else {}
    return Layout(root=root, unet_dir=unet_dir, scheduler_config=sched, scheduler_source=source, neon=neon, ema=ema)


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' logger (warnings about accelerate, ignored EMA config keys) for a block."""
    from diffusers.utils import logging as dlog

    old = dlog.get_verbosity()
    dlog.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        dlog.set_verbosity(old)


def class_convention(num_class_embeds: int | None, neon: Mapping[str, Any], where: Path) -> tuple[int, int | None]:
    """(K classes, null class index or None) of a UNet with ``num_class_embeds`` (module docstring)."""
    if not num_class_embeds:
        return 0, None
    if "num_classes" in neon:
        k = int(neon["num_classes"])
        null = neon.get("null_class")
        null = None if null is None else int(null)
        if not 0 < k <= num_class_embeds or (null is not None and not k <= null < num_class_embeds):
            raise CheckpointError(f"{where / NEON_JSON}: num_classes {k} / null_class {null} do not fit num_class_embeds {num_class_embeds}")
        return k, null
    if num_class_embeds < 2:
        raise CheckpointError(f"{where}: num_class_embeds {num_class_embeds}: need K classes + 1 null class")
    return num_class_embeds - 1, num_class_embeds - 1


def load(path: str | os.PathLike[str]) -> Any:
    """``UNet2DModel`` (eval mode, CPU, float32) from a diffusers folder, with ``neon_info`` (:class:`ModelInfo`).

    Raises CheckpointError (see :func:`resolve`; also unreadable weights, unsupported
    ``class_embed_type``) or FamilyError when diffusers is not installed.
    """
    lay = resolve(path)
    from diffusers import UNet2DModel

    import torch

    try:
        with quiet_diffusers():
            unet = UNet2DModel.from_pretrained(str(lay.unet_dir), torch_dtype=torch.float32)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{lay.unet_dir}: UNet2DModel.from_pretrained failed ({first})") from None
    unet = unet.eval()
    if unet.class_embedding is not None and not isinstance(unet.class_embedding, torch.nn.Embedding):
        raise CheckpointError(f"{lay.unet_dir}: class_embed_type {unet.config.class_embed_type!r} is not supported "
                              "(only num_class_embeds with the default embedding)")
    k, null = class_convention(unet.config.num_class_embeds, lay.neon, lay.root)
    unet.neon_info = ModelInfo(scheduler_config=dict(lay.scheduler_config), num_classes=k, null_class=null, source=str(lay.root))
    return unet


def model_num_classes(path: str | os.PathLike[str]) -> int:
    """K, the number of real classes of the folder's UNet, from its config alone (no weights read)."""
    lay = resolve(path)
    cfg = _read_json(lay.unet_dir / "config.json")
    return class_convention(cfg.get("num_class_embeds"), lay.neon, lay.root)[0]


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """``neon.json``'s ``metadata`` (str -> str), or {} for a folder neon did not write."""
    lay = resolve(path)
    meta = lay.neon.get("metadata") or {}
    return {str(k): str(v) for k, v in meta.items()}


def scheduler_class(name: str) -> Any:
    """The diffusers scheduler class ``name`` (``DDPMScheduler`` or ``DDIMScheduler``)."""
    import diffusers

    if name not in SUPPORTED_SCHEDULERS:
        name = "DDPMScheduler"
    return getattr(diffusers, name)


def _neon_json(info: ModelInfo | None, metadata: Mapping[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": SCHEMA, "metadata": {str(k): str(v) for k, v in metadata.items()}}
    if info is not None and info.num_classes:
        doc["num_classes"] = info.num_classes
        doc["null_class"] = info.null_class
    return doc


def save_pipeline(unet: Any, path: str | os.PathLike[str], metadata: Mapping[str, str]) -> None:
    """Write ``unet`` (+ its scheduler from ``neon_info``) as a DDPMPipeline folder at ``path``, plus neon.json.

    ``path`` must not exist or be an empty folder (the core passes a fresh temporary name). The
    scheduler keeps its class when it is DDPMScheduler or DDIMScheduler, else DDPMScheduler.
    Weights are float32 safetensors (``save_pretrained(safe_serialization=True)``).
    """
    from diffusers import DDPMPipeline

    unet = getattr(unet, "module", unet)
    info: ModelInfo | None = getattr(unet, "neon_info", None)
    cfg = dict(info.scheduler_config) if info is not None else dict(DEFAULT_SCHEDULER)
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path}: exists and is not an empty folder")
    with quiet_diffusers():
        sched = scheduler_class(str(cfg.get("_class_name", "DDPMScheduler"))).from_config(cfg)
        DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path), safe_serialization=True)
    (path / NEON_JSON).write_text(json.dumps(_neon_json(info, metadata), indent=2) + "\n")


def merge_folders(base: str | os.PathLike[str], selftrained: str | os.PathLike[str], w: float,
                  out: str | os.PathLike[str], *, report: Any, **merge_options: Any) -> dict[str, Any]:
    """theta_Neon = theta_r - w (theta_s - theta_r) of two diffusers folders, written as a DDPMPipeline folder.

    The UNet weights each folder uses (:func:`resolve`: ``unet_ema/`` where present, else
    ``unet/``) are merged by :func:`neon_cli.merge.merge_checkpoints` (streaming, float32
    arithmetic, its report and provenance ``neon.*`` safetensors metadata); ``merge_options`` are
    passed on (``exclude``, ``dtype``, ...). The output folder gets θ_r's UNet config (EMA keys
    dropped), θ_r's scheduler config, ``model_index.json`` and θ_r's ``neon.json`` with
    ``metadata["neon.w"]``; it is built under a temporary name and renamed when complete.

    Raises UsageError (``out`` exists or is an input), CheckpointError (unreadable folders,
    mismatched keys/shapes, naming the key).
    """
    from neon_cli.fsutil import atomic_path
    from neon_cli.merge import merge_checkpoints

    rl, sl = resolve(base), resolve(selftrained)
    out = Path(out)
    if out.exists():
        raise UsageError(f"-o {out}: exists; outputs never replace a file or folder")
    if out.resolve() in {Path(base).resolve(), Path(selftrained).resolve()}:
        raise UsageError(f"-o {out}: would overwrite an input")
    unet_cfg = {k: v for k, v in _read_json(rl.unet_dir / "config.json").items() if k not in EMA_CONFIG_KEYS}
    sched_cfg = dict(rl.scheduler_config)
    sched_cls = str(sched_cfg.get("_class_name", "DDPMScheduler"))
    if sched_cls not in SUPPORTED_SCHEDULERS:
        sched_cls = "DDPMScheduler"
    with atomic_path(out) as tmp:
        (tmp / "unet").mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        (tmp / "unet" / "config.json").write_text(json.dumps(unet_cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2, sort_keys=True) + "\n")
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": unet_cfg.get("_diffusers_version", ""),
                 "scheduler": ["diffusers", sched_cls], "unet": ["diffusers", "UNet2DModel"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        results = merge_checkpoints(rl.weights_file(), sl.weights_file(), [float(w)],
                                    [tmp / "unet" / "diffusion_pytorch_model.safetensors"], report=report, **merge_options)
        neon = dict(rl.neon) or {"schema": SCHEMA}
        meta = {k: v for k, v in (neon.get("metadata") or {}).items() if not str(k).startswith("neon.")}
        meta.update({"neon.formula": "theta_r - w * (theta_s - theta_r)", "neon.w": repr(float(w)),
                     "neon.base": str(base), "neon.selftrained": str(selftrained)})
        neon["metadata"] = meta
        (tmp / NEON_JSON).write_text(json.dumps(neon, indent=2) + "\n")
    # the merge recorded the file inside the temporary folder; point the report at the final one
    for o in report.outputs:
        if str(o.get("path", "")).startswith(str(tmp)):
            o["path"] = str(out) + str(o["path"])[len(str(tmp)):]
    for o in results.get("outputs", []) or []:
        if isinstance(o, dict) and str(o.get("path", "")).startswith(str(tmp)):
            o["path"] = str(out) + str(o["path"])[len(str(tmp)):]
    return results
