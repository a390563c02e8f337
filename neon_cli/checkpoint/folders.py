"""Folders as their libraries lay them out: sharded indexes, bare model folders, diffusers pipelines.

Which weights a loader uses in one model folder (:func:`weights_file`), in the order of
``transformers``/``diffusers`` ``from_pretrained`` (safetensors before pickles, an index before a
single file): ``model.safetensors.index.json``, ``model.safetensors``,
``diffusion_pytorch_model.safetensors.index.json``, ``diffusion_pytorch_model.safetensors``,
``pytorch_model.bin.index.json``, ``pytorch_model.bin``, ``diffusion_pytorch_model.bin.index.json``,
``diffusion_pytorch_model.bin``. Another single ``*.index.json`` is used when it is the only one.

A pipeline folder (``model_index.json``, ``unet/``, ``unet_ema/``, ``scheduler/``, ...) is a set of
components (:func:`components`): each immediate subfolder holding weights. A sharded index is
checked (:func:`read_index`): a shard name with ``..``, an absolute path or a subfolder, or one
that is a symlink leading out of the folder, is refused with the index named.

:data:`WEIGHT_PATTERNS` are the files of a folder that hold weights some loader could prefer
(``pytorch_model*.bin``, ``model*.safetensors``, ``*.pt``, ``optimizer*``, ``training_args.bin``,
...); a merged folder never carries θ_r's copies of them (a loader preferring one would load θ_r).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from neon_cli.checkpoint.core import one_line
from neon_cli.errors import CheckpointError

#: Index files and single weight files, in the order loaders prefer them.
WEIGHT_NAMES = (
    "model.safetensors.index.json", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin.index.json", "pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin",
)
INDEX_NAMES = tuple(n for n in WEIGHT_NAMES if n.endswith(".index.json"))

#: Files never copied from θ_r's folder into a merged one (weights, optimizer and training states).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt",
                   "*.pkl", "optimizer*", "scheduler.pt", "rng_state*", "training_args.bin", "*.msgpack", "*.h5", "*.onnx",
                   "*.gguf", "*.npz")


def is_weight_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in WEIGHT_PATTERNS)


def weights_file(folder: Path) -> Path | None:
    """The weights file (or index) a loader uses in ``folder``, or None. CheckpointError when the
    folder holds several unrelated ``*.index.json`` files (naming them)."""
    for n in WEIGHT_NAMES:
        if (folder / n).is_file():
            return folder / n
    others = sorted(p for p in folder.glob("*.index.json") if p.is_file())
    if len(others) == 1:
        return others[0]
    if len(others) > 1:
        raise CheckpointError(f"{folder}: several index files ({', '.join(p.name for p in others)}); give the one to merge as the path")
    return None


def components(folder: Path) -> list[str]:
    """Relative paths of the model folders inside ``folder``: ``"."`` when it holds weights itself,
    else each immediate subfolder that does (a diffusers pipeline's ``unet``, ``unet_ema``, ...)."""
    if weights_file(folder) is not None:
        return ["."]
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")):
        if weights_file(sub) is not None:
            out.append(sub.name)
    return out


def check_shard_name(index: Path, name: Any) -> str:
    """A shard name of an index, refused unless it is a plain file name inside the index's folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: shard name {name!r} is not a file name")
    if name in (".", "..") or "/" in name or "\\" in name or name.startswith("~") or "\x00" in name or Path(name).is_absolute():
        raise CheckpointError(f"{index}: shard name {name!r} must be a plain file name in the index's folder "
                              "(no '..', absolute path or subfolder)")
    file = index.parent / name
    if file.is_symlink():
        try:
            inside = index.parent.resolve() in file.resolve().parents
        except OSError:
            inside = False
        if not inside:
            raise CheckpointError(f"{index}: shard {name!r} is a symlink leading out of the folder")
    return name


def read_index(index: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """(weight_map, metadata) of a sharded index, every shard name checked (:func:`check_shard_name`)."""
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except Exception as exc:
        raise CheckpointError(f"{index}: not a valid sharded-checkpoint index ({one_line(exc)})") from None
    if not weight_map:
        raise CheckpointError(f"{index}: empty weight_map")
    for k, v in weight_map.items():
        check_shard_name(index, v)
    meta = data.get("metadata") or {}
    return dict(weight_map), dict(meta) if isinstance(meta, dict) else {}


def index_stem(index_name: str) -> str:
    """``model.safetensors.index.json`` -> ``model`` (the shard name stem neon writes)."""
    return index_name.split(".")[0] or "model"
