"""Checkpoint I/O for ``neon merge``: lazy readers for every common layout, streaming writers.

Layouts read (:func:`open_checkpoint`):

* **safetensors** (``.safetensors``): opened with ``safetensors.safe_open`` (memory-mapped);
  a tensor is read row block by row block with ``get_slice``, so nothing is loaded up front.
* **sharded safetensors** (Hugging Face convention): a folder holding
  ``model.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {tensor: shard}}``) or the
  index file itself; ``pytorch_model.bin.index.json`` shards are read like torch files.
* **torch zip** (``.pt``/``.pth``/``.bin``/``.ckpt``, ``torch.save`` format since torch 1.6):
  ``torch.load(weights_only=True, mmap=True)``: storages are mapped, not read (torch docs,
  ``torch.load``). Legacy non-zip files are loaded without ``mmap``.
* **nested containers**: the state dict to merge is found under the common keys
  (:data:`STATE_DICT_KEYS`: ``ema``, ``model_ema``, ``state_dict``, ``model``, ``net``, ...), or chosen
  with ``key`` (a dotted path such as ``trainer.var_wo_ddp``); a wrapper prefix on every key
  (``module.`` from DistributedDataParallel, ``_orig_mod.`` from ``torch.compile``) is stripped for
  matching and kept in the output names.
* **full pickles** (EDM ``.pkl`` snapshots, training states holding Python objects such as an
  ``argparse.Namespace``) are refused with a :class:`~neon_cli.errors.CheckpointError` naming
  ``--trust-pickle``; with ``trust_pickle=True`` they are unpickled (this runs code from the file).

Writers: :class:`SafetensorsWriter` streams a ``.safetensors`` file tensor by tensor (header
first, in the safetensors library's dtype-alignment order, so the bytes equal
``safetensors.torch.save_file``'s for the same tensors and metadata) and hashes the bytes as it
writes them; :func:`shard_layout` and :func:`index_json` give the Hugging Face sharded layout;
:class:`RawTensorFile` backs ``.pt`` outputs with a memory-mapped scratch file so ``torch.save``
never needs the merged tensors in anonymous memory.

Every error is a :class:`~neon_cli.errors.CheckpointError` (or ``UsageError``) whose one-line
message names the file and, where it applies, the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import struct
import zipfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from neon_cli.errors import CheckpointError, UsageError

#: Container keys searched for the state dict, most preferred first (EMA weights are what
#: generators are evaluated with: EDM/IMM ``ema``, xAR ``model_ema``, torchcfm ``ema_model``).
STATE_DICT_KEYS: tuple[str, ...] = (
    "ema",
    "model_ema",
    "ema_model",
    "ema_state_dict",
    "state_dict_ema",
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "module",
    "generator",
    "params",
    "weights",
)

#: Prefixes that wrap every key of a state dict (DistributedDataParallel, torch.compile).
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")

TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".tar"})
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle"})
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

#: safetensors dtype names <-> torch dtypes (the format's README); only those this torch has.
_ST_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "C64": "complex64",
}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _ST_NAMES.items() if hasattr(torch, v)}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

#: Ascending order of the safetensors Rust ``Dtype`` enum; ``save_file`` writes tensors by this
#: rank descending, then by name, so every tensor starts at an offset aligned to its item size.
_ST_RANK = {name: i for i, name in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
)}

#: Elements per row block when a tensor is read or merged piecewise (4 MiB of float32: the
#: temporaries of one block stay in cache; measured fastest on 2 cores, see benchmarks/merge.py).
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one stored tensor (no data)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """Short torch name of ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).replace("torch.", "")


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """``"float32"``/``"fp32"``/``"bf16"``/... -> a floating torch dtype; UsageError naming ``--dtype``."""
    if text is None or isinstance(text, torch.dtype):
        return text
    aliases = {
        "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
    }
    try:
        return aliases[text.strip().lower()]
    except KeyError:
        raise UsageError(f"--dtype {text}: expected one of float32, float16, bfloat16, float64") from None


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"500MB"``, ``"1.5GiB"``, ``"5G"``, ``"123"`` (bytes).

    Decimal units (kB, MB, GB, TB = 10**3k, as Hugging Face ``max_shard_size``) unless an ``i``
    says binary (KiB, MiB, GiB, TiB = 2**10k). Raises UsageError naming ``--shard-size``.
    """
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UsageError(f"--shard-size {text}: expected a size such as 2GB, 500MB or 1.5GiB")
    number, unit, binary, _ = m.groups()
    power = " kmgt".index(unit.lower() or " ")
    size = int(float(number) * ((1024 if binary else 1000) ** power))
    if size <= 0:
        raise UsageError(f"--shard-size {text}: must be positive")
    return size


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class Checkpoint:
    """One opened checkpoint: the tensors of its state dict, readable lazily.

    ``specs`` is keyed by the *canonical* name (wrapper prefix stripped) in file order;
    ``raw_name(name)`` gives the key as stored. ``layout`` is ``"safetensors"``, ``"sharded"``,
    ``"torch"`` or ``"pickle"``. For torch/pickle files ``container`` is the loaded object and
    ``key`` the dotted path of the state dict inside it (``None`` when the file is the state dict).
    For safetensors ``key`` selects the tensors whose names start with ``key + "."``; the others are
    listed in ``outside``. Use as a context manager (closes safetensors handles).
    """

    path: Path
    layout: str
    specs: dict[str, TensorSpec]
    prefix: str = ""
    key: str | None = None
    alternatives: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    container: Any = None
    state_dict: Mapping[str, Any] | None = None
    module: Any = None
    non_tensors: dict[str, Any] = field(default_factory=dict)
    outside: list[TensorSpec] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    shards: dict[str, str] = field(default_factory=dict)
    index_metadata: dict[str, Any] = field(default_factory=dict)
    shard_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- names
    def names(self) -> list[str]:
        """Canonical tensor names in file order."""
        return list(self.specs)

    def raw_name(self, name: str) -> str:
        """The stored key of canonical ``name`` (prefix and ``--key`` prefix restored)."""
        raw = self.prefix + name
        if self.layout in ("safetensors", "sharded") and self.key:
            raw = f"{self.key}.{raw}"
        return raw

    # -- data
    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (canonical). Torch files: a view of the mapped file."""
        return self._read(self.raw_name(name), None, None)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` along dim 0 of ``name`` (canonical); reads only those bytes."""
        return self._read(self.raw_name(name), start, stop)

    def raw_tensor(self, raw: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Like :meth:`rows` but by stored key (used for tensors outside ``--key``)."""
        return self._read(raw, start, stop)

    def _read(self, raw: str, start: int | None, stop: int | None) -> torch.Tensor:
        try:
            if self.layout in ("safetensors", "sharded"):
                fh = self._handle(self.shards.get(raw, ""))
                if start is None:
                    return fh.get_tensor(raw)
                return fh.get_slice(raw)[start:stop]
            t = self._sd_value(raw)
            return t if start is None else t[start:stop]
        except CheckpointError:
            raise
        except Exception as exc:  # truncated data, I/O error
            raise CheckpointError(f"{self.path}: cannot read tensor {raw!r} ({_one_line(exc)})") from None

    def _sd_value(self, raw: str) -> torch.Tensor:
        assert self.state_dict is not None
        return self.state_dict[raw]

    def _handle(self, shard: str) -> Any:
        fh = self._handles.get(shard)
        if fh is None:
            from safetensors import safe_open

            file = self.path / shard if shard else self.path
            fh = _safe_open(file, safe_open)
            self._handles[shard] = fh
        return fh

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def close(self) -> None:
        for fh in self._handles.values():
            try:
                fh.__exit__(None, None, None)
            except Exception:
                pass
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _safe_open(file: Path, safe_open: Any) -> Any:
    if not file.exists():
        raise CheckpointError(f"{file}: no such file")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"{file}: not a readable safetensors file, truncated or corrupt ({_one_line(exc)})"
        ) from None


def detect_layout(path: Path) -> str:
    """``"safetensors"``, ``"sharded"``, ``"torch"`` or ``"pickle"`` from the path (and magic bytes)."""
    if path.is_dir():
        return "sharded"
    name = path.name.lower()
    if name.endswith(".index.json"):
        return "sharded"
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return "safetensors"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "pickle"
    return "torch"


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    key: str | None = None,
    prefer_key: str | None = None,
    trust_pickle: bool = False,
    key_optional: bool = False,
) -> Checkpoint:
    """Open ``path`` lazily and locate its state dict; nothing but headers is read.

    ``key``: dotted path of the state dict in a container (``--key``), or for safetensors a name
    prefix. ``prefer_key``: a path tried first when ``key`` is not given (the path found in θ_r,
    so θ_s is read from the same place). ``key_optional``: when ``key`` is not in the file but the
    file is itself a flat state dict, use the whole file (θ_s written by ``neon finetune`` as a flat
    state dict next to a θ_r container; noted in ``notes``). Raises :class:`CheckpointError` naming the file for a
    missing, truncated or unreadable file, a pickle that needs ``--trust-pickle``, or a container
    whose state dict cannot be found unambiguously.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    layout = detect_layout(path)
    if layout == "safetensors":
        return _open_safetensors(path, key, key_optional)
    if layout == "sharded":
        return _open_sharded(path, key, trust_pickle, key_optional)
    return _open_torch(path, key, prefer_key, trust_pickle, key_optional)


def _open_safetensors(path: Path, key: str | None, key_optional: bool = False) -> Checkpoint:
    from safetensors import safe_open

    fh = _safe_open(path, safe_open)
    try:
        metadata = dict(fh.metadata() or {})
        raw: list[TensorSpec] = []
        for name in fh.offset_keys():
            sl = fh.get_slice(name)
            raw.append(TensorSpec(name, _st_dtype(path, name, sl.get_dtype()), tuple(sl.get_shape())))
    except CheckpointError:
        fh.__exit__(None, None, None)
        raise
    ck = Checkpoint(path=path, layout="safetensors", specs={}, metadata=metadata, files=[path])
    ck._handles[""] = fh
    _select_flat(ck, raw, key, key_optional)
    return ck


def _st_dtype(path: Path, name: str, text: str) -> torch.dtype:
    try:
        return SAFETENSORS_DTYPES[text]
    except KeyError:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {text}, which this torch cannot hold") from None


def _select_flat(ck: Checkpoint, raw: list[TensorSpec], key: str | None, key_optional: bool = False) -> None:
    """Fill ``ck.specs`` from flat stored names: ``--key`` prefix selection, wrapper prefix."""
    pre = f"{key}." if key else ""
    if key and key_optional and not any(s.name.startswith(pre) for s in raw):
        ck.notes.append(f"--key {key} not in {ck.path.name}: its whole state dict is used")
        key = None
    if key:
        inside = [s for s in raw if s.name.startswith(pre)]
        if not inside:
            tops = sorted({s.name.split(".")[0] for s in raw})[:12]
            raise CheckpointError(f"{ck.path}: --key {key}: no tensor name starts with {pre!r} (first components: {', '.join(tops)})")
        ck.key = key
        ck.outside = [s for s in raw if not s.name.startswith(pre)]
        raw = [TensorSpec(s.name[len(pre):], s.dtype, s.shape) for s in inside]
    ck.prefix = _common_prefix([s.name for s in raw])
    n = len(ck.prefix)
    ck.specs = {s.name[n:]: TensorSpec(s.name[n:], s.dtype, s.shape) for s in raw}


def _common_prefix(names: Sequence[str]) -> str:
    prefix = ""
    names = list(names)
    while names:
        for p in WRAPPER_PREFIXES:
            if all(n.startswith(p) for n in names):
                prefix += p
                names = [n[len(p):] for n in names]
                break
        else:
            break
    return prefix


def _open_sharded(path: Path, key: str | None, trust_pickle: bool, key_optional: bool = False) -> Checkpoint:
    if path.is_dir():
        index = next((path / n for n in INDEX_NAMES if (path / n).is_file()), None)
        if index is None:
            found = sorted(path.glob("*.index.json"))
            index = found[0] if len(found) == 1 else None
        if index is None:
            single = path / "model.safetensors"
            if single.is_file():
                return _open_safetensors(single, key, key_optional)
            raise CheckpointError(f"{path}: a folder without model.safetensors.index.json or model.safetensors")
        folder = path
    else:
        index, folder = path, path.parent
    try:
        data = json.loads(index.read_text())
        weight_map: dict[str, str] = dict(data["weight_map"])
    except Exception as exc:
        raise CheckpointError(f"{index}: not a valid sharded-checkpoint index ({_one_line(exc)})") from None
    if not weight_map:
        raise CheckpointError(f"{index}: empty weight_map")
    shard_names = list(dict.fromkeys(weight_map.values()))
    if any(Path(s).suffix.lower() != SAFETENSORS_SUFFIX for s in shard_names):
        return _open_bin_shards(index, folder, weight_map, shard_names, key, trust_pickle, data)
    from safetensors import safe_open

    ck = Checkpoint(path=folder, layout="sharded", specs={}, files=[index], index_metadata=dict(data.get("metadata") or {}))
    raw: list[TensorSpec] = []
    try:
        for shard in shard_names:
            file = folder / shard
            fh = _safe_open(file, safe_open)
            ck._handles[shard] = fh
            ck.files.append(file)
            ck.shard_metadata[shard] = dict(fh.metadata() or {})
            expected = {k for k, v in weight_map.items() if v == shard}
            present = set(fh.keys())
            missing = expected - present
            if missing:
                raise CheckpointError(f"{file}: tensor {sorted(missing)[0]!r} listed in {index.name} is not in this shard")
            for name in fh.offset_keys():
                if weight_map.get(name) != shard:
                    continue  # not indexed here: the index decides
                sl = fh.get_slice(name)
                raw.append(TensorSpec(name, _st_dtype(file, name, sl.get_dtype()), tuple(sl.get_shape())))
                ck.shards[name] = shard
    except BaseException:
        ck.close()
        raise
    # keep the index's order of first appearance per shard but tensor order within shard by offset
    ck.metadata = dict(ck.shard_metadata.get(shard_names[0], {}))
    _select_flat(ck, raw, key, key_optional)
    return ck


def _open_bin_shards(index: Path, folder: Path, weight_map: dict[str, str], shard_names: list[str], key: str | None, trust_pickle: bool, data: dict) -> Checkpoint:
    merged: dict[str, torch.Tensor] = {}
    files = [index]
    for shard in shard_names:
        obj = _torch_load(folder / shard, trust_pickle)
        if not _is_state_dict(obj):
            raise CheckpointError(f"{folder / shard}: a shard that is not a flat state dict")
        merged.update({k: v for k, v in obj.items() if weight_map.get(k) == shard})
        files.append(folder / shard)
    ck = _from_state_dict(folder, "torch", merged, None, None, [])
    ck.layout = "torch"
    ck.files = files
    ck.index_metadata = dict(data.get("metadata") or {})
    if key:
        raise CheckpointError(f"{index}: --key is not supported for sharded .bin checkpoints")
    return ck


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load with weights_only=True and mmap=True where the format allows; see module doc."""
    is_zip = _is_zip(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if not trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError:
            needs = ""
            if is_zip:
                try:
                    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                    if names:
                        needs = f" (it holds {', '.join(names[:6])})"
                except Exception:
                    pass
            raise CheckpointError(
                f"{path}: holds Python objects that the safe loader (torch.load weights_only=True) refuses{needs}; "
                "pass --trust-pickle to unpickle it in full, which runs code from the file: only for files you trust"
            ) from None
        except Exception as exc:
            if not is_zip and path.suffix.lower() in PICKLE_SUFFIXES | {".ckpt", ".pt", ".pth", ".bin", ".tar"}:
                # a plain pickle (not torch.save): only loadable with full unpickling
                msg = _one_line(exc)
                if "magic number" in msg.lower() or "invalid load key" in msg.lower():
                    raise CheckpointError(
                        f"{path}: a plain Python pickle, not a torch checkpoint; pass --trust-pickle to unpickle it "
                        "in full, which runs code from the file: only for files you trust"
                    ) from None
            raise CheckpointError(f"{path}: cannot read as a torch checkpoint, truncated or corrupt ({_one_line(exc)})") from None
    try:
        if is_zip:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            if "magic number" not in str(exc).lower() and "invalid load key" not in str(exc).lower():
                raise
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot unpickle ({type(exc).__name__}: {_one_line(exc)})") from None


def _open_torch(path: Path, key: str | None, prefer_key: str | None, trust_pickle: bool, key_optional: bool = False) -> Checkpoint:
    if detect_layout(path) == "pickle" and not trust_pickle:
        raise CheckpointError(
            f"{path}: a full pickle (e.g. an EDM network snapshot); pass --trust-pickle to unpickle it, "
            "which runs code from the file: only for files you trust"
        )
    obj = _torch_load(path, trust_pickle)
    layout = "pickle" if not _is_zip(path) and detect_layout(path) == "pickle" else "torch"
    notes: list[str] = []
    if key and key_optional and (_is_state_dict(obj) or _is_module(obj)):
        try:
            _resolve_key(path, obj, key)
        except CheckpointError:
            notes.append(f"--key {key} not in {path.name}: its whole state dict is used")
            key = None
    if key:
        sd, module, alternatives, where = _resolve_key(path, obj, key), None, [], key
        if _is_module(sd):
            module, sd = sd, sd.state_dict()
        if not isinstance(sd, Mapping) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: --key {key} is a {type(sd).__name__}, not a state dict of tensors")
    else:
        where, sd, module, alternatives = _find_state_dict(path, obj, prefer_key)
    ck = _from_state_dict(path, layout, sd, where, obj, alternatives)
    ck.module = module
    ck.notes.extend(notes)
    return ck


def _from_state_dict(path: Path, layout: str, sd: Mapping[str, Any], where: str | None, container: Any, alternatives: list[str]) -> Checkpoint:
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the state dict{' at ' + where if where else ''} holds no tensors")
    for k, v in tensors.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: state dict key {k!r} is not a string")
        if v.layout != torch.strided or v.is_quantized:
            raise CheckpointError(f"{path}: tensor {k!r} has an unsupported layout ({v.layout}{', quantized' if v.is_quantized else ''})")
    prefix = _common_prefix(list(tensors))
    n = len(prefix)
    ck = Checkpoint(
        path=path,
        layout=layout,
        specs={k[n:]: TensorSpec(k[n:], v.dtype, tuple(v.shape)) for k, v in tensors.items()},
        prefix=prefix,
        key=where,
        alternatives=alternatives,
        container=container,
        state_dict=sd,
        non_tensors={k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)},
        files=[path],
    )
    return ck


def _is_module(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _resolve_key(path: Path, obj: Any, key: str) -> Any:
    """Walk a dotted ``key`` through nested mappings (longest matching component first)."""
    parts = key.split(".")
    cur, i, walked = obj, 0, []
    while i < len(parts):
        for j in range(len(parts), i, -1):
            part = ".".join(parts[i:j])
            if isinstance(cur, Mapping) and part in cur:
                cur = cur[part]
                break
            if isinstance(cur, (list, tuple)) and j == i + 1 and part.isdigit() and int(part) < len(cur):
                cur = cur[int(part)]
                break
            if j == i + 1 and _is_module(cur) and hasattr(cur, part):
                cur = getattr(cur, part)
                break
        else:
            here = ".".join(walked) or "the top level"
            keys = ", ".join(map(str, list(cur)[:12])) if isinstance(cur, Mapping) else type(cur).__name__
            raise CheckpointError(f"{path}: --key {key}: no entry {parts[i]!r} under {here} (found: {keys})")
        walked.append(part)
        i = j
    return cur


def _find_state_dict(path: Path, obj: Any, prefer_key: str | None) -> tuple[str | None, Mapping[str, Any], Any, list[str]]:
    """Locate the state dict in a loaded container; returns (dotted path, state dict, module, others)."""
    if _is_state_dict(obj):
        return None, obj, None, []
    if _is_module(obj):
        return None, obj.state_dict(), obj, []
    candidates: list[tuple[tuple[str, ...], Any]] = []

    def walk(o: Any, p: tuple[str, ...]) -> None:
        if len(p) > 3 or not isinstance(o, Mapping):
            return
        for k, v in o.items():
            if not isinstance(k, str):
                continue
            if _is_state_dict(v) or _is_module(v):
                candidates.append((p + (k,), v))
            elif isinstance(v, Mapping):
                walk(v, p + (k,))

    walk(obj, ())
    if not candidates:
        tops = ", ".join(map(str, list(obj)[:12])) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: no state dict of tensors found (top level: {tops}); choose one with --key")
    names = [".".join(p) for p, _ in candidates]
    chosen = None
    if prefer_key and prefer_key in names:
        chosen = names.index(prefer_key)
    elif len(candidates) == 1:
        chosen = 0
    else:
        ranked = [(STATE_DICT_KEYS.index(p[-1]), len(p), i) for i, (p, _) in enumerate(candidates) if p[-1] in STATE_DICT_KEYS]
        if ranked:
            chosen = min(ranked)[2]
    if chosen is None:
        raise CheckpointError(f"{path}: several state dicts found ({', '.join(names)}); choose one with --key")
    p, v = candidates[chosen]
    module = v if _is_module(v) else None
    sd = v.state_dict() if module is not None else v
    return ".".join(p), sd, module, [n for i, n in enumerate(names) if i != chosen]


def replace_in_container(container: Any, key: str, value: Any) -> Any:
    """A copy of ``container`` with the entry at dotted ``key`` replaced (copies along the path only)."""
    parts = key.split(".")

    def rec(cur: Any, i: int) -> Any:
        if i == len(parts):
            return value
        for j in range(len(parts), i, -1):
            part = ".".join(parts[i:j])
            if isinstance(cur, Mapping) and part in cur:
                new = cur.copy() if hasattr(cur, "copy") else dict(cur)  # keeps OrderedDict & co.
                new[part] = rec(cur[part], j)
                return new
            if isinstance(cur, list) and j == i + 1 and part.isdigit():
                new_l = list(cur)
                new_l[int(part)] = rec(cur[int(part)], j)
                return new_l
            if isinstance(cur, tuple) and j == i + 1 and part.isdigit():
                new_t = list(cur)
                new_t[int(part)] = rec(cur[int(part)], j)
                return type(cur)(new_t) if type(cur) is tuple else tuple(new_t)
        raise KeyError(key)

    return rec(container, 0)


# ----------------------------------------------------------------------------------------------
# writing


def safetensors_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Tensors in the order ``safetensors`` writes them: dtype alignment descending, then name."""
    return sorted(specs, key=lambda s: (-_ST_RANK[_st_name(s)], s.name.encode()))


def _st_name(spec: TensorSpec) -> str:
    try:
        return DTYPE_NAMES[spec.dtype]
    except KeyError:
        raise CheckpointError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors") from None


def safetensors_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> tuple[bytes, list[TensorSpec]]:
    """(8-byte length + JSON header padded with spaces to a multiple of 8, tensors in data order).

    Follows the safetensors format README: little-endian u64 header size, UTF-8 JSON with
    ``data_offsets`` relative to the data section, optional ``__metadata__`` of str -> str.
    """
    ordered = safetensors_order(specs)
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"safetensors metadata must map str to str (key {bad[0]!r})")
        header["__metadata__"] = dict(metadata)
    offset = 0
    seen = set()
    for s in ordered:
        if s.name in seen:
            raise CheckpointError(f"tensor {s.name!r} appears twice")
        seen.add(s.name)
        header[s.name] = {"dtype": _st_name(s), "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in C order, little-endian (no copy when ``t`` is contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class SafetensorsWriter:
    """Writes one ``.safetensors`` file tensor by tensor, header first; memory O(one chunk).

    ``specs``: every tensor the file will hold (name, dtype, shape) -- known before any data, so
    the header is written at once. Then call :meth:`write` with each tensor's data, whole or in
    consecutive row blocks, in :attr:`order` (safetensors' dtype-alignment order). :meth:`close`
    checks that every byte was written, flushes and fsyncs, and returns the sha256 of the file.

    ``io``: an optional single-worker ``concurrent.futures`` executor (shared by several writers):
    the file write and the sha256 update then run on that thread while the caller computes the
    next block (both release the GIL); at most :attr:`MAX_PENDING` blocks wait, which bounds the
    memory held. Bytes reach the file in call order either way.
    """

    MAX_PENDING = 8

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        io: Any = None,
    ):
        self.path = Path(path)
        head, self.order = safetensors_header(specs, metadata)
        self._sha = hashlib.sha256()
        self._fh = open(self.path, "wb")
        self._io = io
        self._pending: deque[Any] = deque()
        self._i = 0
        self._left = self.order[0].nbytes if self.order else 0
        self.bytes_written = 0
        self._put(head, None)
        self._skip_empty()

    def _put(self, data: bytes | memoryview, keep: Any) -> None:
        self.bytes_written += len(data)
        if self._io is None:
            self._write_and_hash(data, None)
            return
        # ``keep`` holds the tensor that owns ``data`` until the worker has written it
        self._pending.append(self._io.submit(self._write_and_hash, data, keep))
        while len(self._pending) > self.MAX_PENDING:
            self._pending.popleft().result()

    def _write_and_hash(self, data: bytes | memoryview, keep: Any) -> None:
        self._fh.write(data)
        self._sha.update(data)

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _skip_empty(self) -> None:
        while self._i < len(self.order) and self._left == 0:
            self._i += 1
            self._left = self.order[self._i].nbytes if self._i < len(self.order) else 0

    @property
    def expected(self) -> str | None:
        """Name of the tensor whose bytes come next (None when complete)."""
        return self.order[self._i].name if self._i < len(self.order) else None

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append ``data`` (the next rows of tensor ``name``, dtype as declared)."""
        if name != self.expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} written out of order (expected {self.expected!r})")
        spec = self.order[self._i]
        if data.dtype != spec.dtype:
            raise CheckpointError(f"{self.path}: tensor {name!r} given as {data.dtype}, declared {spec.dtype}")
        data = data.detach().contiguous()
        buf = tensor_bytes(data)
        if len(buf) > self._left:
            raise CheckpointError(f"{self.path}: tensor {name!r}: more bytes than its declared shape {list(spec.shape)}")
        try:
            self._put(buf, data)
        except OSError as exc:  # disk full, I/O error (raised here also for a background write)
            raise CheckpointError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        self._left -= len(buf)
        self._skip_empty()

    def close(self) -> str:
        """Flush, fsync and close; returns the file's sha256. CheckpointError if incomplete."""
        return self.close_async()()

    def close_async(self) -> Callable[[], str]:
        """Like :meth:`close`, but with an ``io`` executor the flush and fsync run on its thread
        (after the pending writes) while the caller goes on; call the returned function to wait
        for them and get the sha256. CheckpointError (now, or from the call) on failure."""
        if self.expected is not None:
            missing = self.expected
            self.abort()
            raise CheckpointError(f"{self.path}: tensor {missing!r} was not written")
        pending, self._pending = list(self._pending), deque()

        def finish() -> str:
            for fut in pending:  # done already (one worker, first in first out); re-raises errors
                fut.result()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            return self._sha.hexdigest()

        fut = self._io.submit(finish) if self._io is not None else None

        def wait() -> str:
            try:
                return fut.result() if fut is not None else finish()
            except OSError as exc:
                self.abort()
                raise CheckpointError(f"{self.path}: cannot write ({exc.strerror or exc})") from None

        if fut is not None:
            self._pending.append(fut)  # so that abort() waits for it
        return wait

    def abort(self) -> None:
        """Close without checks (the caller removes the file); waits for pending writes."""
        for fut in self._pending:
            fut.cancel()
        for fut in self._pending:
            with contextlib.suppress(BaseException):
                fut.result()
        self._pending.clear()
        if not self._fh.closed:
            self._fh.close()


def shard_layout(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs`` (in order) into shards of at most ``max_bytes`` of tensor data each.

    A tensor larger than ``max_bytes`` gets a shard of its own (tensors are never split), as in
    Hugging Face ``save_pretrained(max_shard_size=...)``.
    """
    shards: list[list[TensorSpec]] = []
    size = 0
    for s in specs:
        if not shards or (size + s.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards or [[]]


def shard_file_names(n: int, stem: str = "model") -> list[str]:
    """Hugging Face shard names: ``model-00001-of-00003.safetensors`` (one shard: ``model.safetensors``)."""
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def index_json(weight_map: Mapping[str, str], total_size: int, extra_metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``model.safetensors.index.json`` content: ``{"metadata": {"total_size": bytes, ...}, "weight_map"}``."""
    meta: dict[str, Any] = dict(extra_metadata or {})
    meta["total_size"] = int(total_size)
    return {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}


def sha256_tree(root: Path, known: Mapping[Path, str] | None = None) -> str:
    """sha256 of a folder exactly as :func:`neon_cli.fsutil.sha256_path` computes it, reusing the
    digests in ``known`` (absolute path -> hex) instead of re-reading those files."""
    from neon_cli.fsutil import sha256_file

    known = dict(known or {})
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest = known.get(f) or sha256_file(f)
        h.update(str(f.relative_to(root)).encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


class RawTensorFile:
    """A scratch file of tensor bytes that becomes memory-mapped tensors (for ``.pt`` outputs).

    Tensors are appended (whole or in row blocks) at 64-byte aligned offsets; :meth:`tensors`
    maps the file once (``torch.UntypedStorage.from_file``, private mapping) and returns one
    tensor per name, each with its *own* storage (a slice of the mapping), so ``torch.save``
    writes them as separate storages straight from the page cache and ``safetensors`` accepts a
    re-save. The caller deletes the file after saving.
    """

    ALIGN = 64

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "wb")
        self._pos = 0
        self._entries: dict[str, tuple[int, TensorSpec]] = {}
        self._current: str | None = None
        self._left = 0

    def begin(self, spec: TensorSpec) -> None:
        pad = -self._pos % self.ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self._pos += pad
        self._entries[spec.name] = (self._pos, spec)
        self._current, self._left = spec.name, spec.nbytes

    def write(self, name: str, data: torch.Tensor) -> None:
        if name != self._current:
            raise CheckpointError(f"{self.path}: tensor {name!r} written while {self._current!r} is open")
        buf = tensor_bytes(data)
        if len(buf) > self._left:
            raise CheckpointError(f"{self.path}: tensor {name!r}: more bytes than declared")
        self._fh.write(buf)
        self._pos += len(buf)
        self._left -= len(buf)

    def tensors(self) -> dict[str, torch.Tensor]:
        self._fh.flush()
        self._fh.close()
        out: dict[str, torch.Tensor] = {}
        if self._pos == 0:
            storage = None
        else:
            storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self._pos)
        for name, (off, spec) in self._entries.items():
            if spec.nbytes == 0 or storage is None:
                out[name] = torch.empty(spec.shape, dtype=spec.dtype)
                continue
            st = storage[off: off + spec.nbytes]
            out[name] = torch.empty(0, dtype=spec.dtype).set_(st, 0, spec.shape)
        return out

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()


# ---------------------------------------------------------------------------------------------
# Whole-file helpers for families' own checkpoints (small state dicts held in memory).


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` to a ``.safetensors`` file at ``path`` and return its sha256.

    Unlike ``safetensors.torch.save_file`` (which emits ``__metadata__`` in hash-map order), the
    header is built by :func:`safetensors_header` with metadata keys sorted, so equal tensors and
    metadata always give byte-identical files (and equal sha256 in reports and tune-w caches).
    The caller handles atomicity (e.g. :func:`neon_cli.fsutil.atomic_path`). Raises
    CheckpointError for non-str metadata or a dtype safetensors cannot store.
    """
    meta = {str(k): str(v) for k, v in sorted((metadata or {}).items())}
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = SafetensorsWriter(path, specs, meta)
    try:
        for spec in writer.order:
            writer.write(spec.name, tensors[spec.name].detach().cpu().contiguous())
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file; CheckpointError naming the file if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a whole ``.safetensors`` file; CheckpointError naming the file if unreadable."""
    from safetensors.torch import load_file

    meta = read_safetensors_metadata(path)
    try:
        return load_file(str(path)), meta
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({_one_line(exc)})") from None
