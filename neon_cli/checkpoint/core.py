"""What every checkpoint encoding shares: dtypes (torch-free), tensor specs, the ``Checkpoint``
interface, the search for the state dict inside a container, size/dtype flag parsing.

Nothing here imports torch: a safetensors merge runs on numpy alone (importing torch costs
~146 MiB of anonymous memory, more than a whole streaming merge). Tensor data is handed out as
numpy arrays of the stored bits: ``bfloat16`` as ``uint16`` and float8 as ``uint8`` (numpy has no
such types); :meth:`Checkpoint.tensor` converts to a torch tensor for callers that have torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from neon_cli.checkpoint.dtypes import (  # noqa: F401  (re-exported: core has always offered them)
    DTYPE_NAMES,
    DTYPES,
    SAFETENSORS_DTYPES,
    STORAGE_DTYPES,
    DType,
    dtype_info,
    dtype_name,
    is_floating,
    itemsize,
    parse_dtype,
    to_torch_dtype,
)
from neon_cli.checkpoint.inert import Inert, TensorRef
from neon_cli.errors import CheckpointError, UsageError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"500MB"``, ``"1.5GiB"``, ``"5G"``, ``"123"`` (bytes).

    Decimal units (kB, MB, GB, TB = 10**3k, as Hugging Face ``max_shard_size``) unless an ``i``
    says binary (KiB, MiB, GiB, TiB = 2**10k). Raises UsageError naming ``--shard-size`` for
    anything else, NaN/inf included, and for sizes below 1 byte.
    """
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UsageError(f"--shard-size {text}: expected a size such as 2GB, 500MB or 1.5GiB")
    number, unit, binary, _ = m.groups()
    power = " kmgt".index(unit.lower() or " ")
    size = int(float(number) * ((1024 if binary else 1000) ** power))
    if size <= 0:
        raise UsageError(f"--shard-size {text}: must be at least 1 byte")
    return size


def human_bytes(n: int) -> str:
    """``n`` bytes in the largest unit that keeps it >= 1 (B, kB, MB, GB, TB; decimal)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (torch name such as ``"bfloat16"``) and shape of one stored tensor (no data)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


def one_line(exc: BaseException) -> str:
    """``exc`` as one clean line (:func:`neon_cli.errors.exception_line`)."""
    from neon_cli.errors import exception_line

    return exception_line(exc)


#: Container keys searched for the state dict, most preferred first (EMA weights are what
#: generators are evaluated with: EDM/IMM ``ema``, xAR ``model_ema``, torchcfm ``ema_model``).
STATE_DICT_KEYS: tuple[str, ...] = (
    "ema", "model_ema", "ema_model", "ema_state_dict", "state_dict_ema", "state_dict", "model_state_dict",
    "model", "net", "network", "module", "generator", "params", "weights", "var_wo_ddp",
)

#: Prefixes that wrap every key of a state dict (DistributedDataParallel, torch.compile).
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


def common_prefix(names: Sequence[str]) -> str:
    """The wrapper prefixes (``module.``, ``_orig_mod.``) that every name starts with."""
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


# ----------------------------------------------------------------------------------------------
# the interface


@dataclass
class Checkpoint:
    """One opened checkpoint: the tensors of its state dict, readable lazily as numpy arrays.

    ``specs`` is keyed by the *canonical* name (wrapper prefix stripped) in file order;
    ``raw_name(name)`` gives the key as stored. ``layout``: ``"safetensors"``, ``"sharded"``,
    ``"torch"`` (zip archive or legacy ``torch.save`` stream; ``encoding`` says which) or
    ``"pickle"`` (plain pickle, e.g. an EDM ``.pkl``). For torch/pickle files ``container`` is
    the inert object tree (:mod:`neon_cli.checkpoint.unpickler`) and ``key`` the dotted path of
    the state dict in it (None when the file is the state dict). For safetensors ``key`` selects
    the tensors whose names start with ``key + "."``; the others are listed in ``outside``.
    Use as a context manager (closes the file mappings).
    """

    path: Path
    layout: str
    specs: dict[str, TensorSpec]
    prefix: str = ""
    key: str | None = None
    alternatives: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    container: Any = None
    non_tensors: dict[str, Any] = field(default_factory=dict)
    outside: list[TensorSpec] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    shards: dict[str, str] = field(default_factory=dict)
    index_metadata: dict[str, Any] = field(default_factory=dict)
    shard_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    encoding: str = ""
    #: stored key -> reader-specific handle (safetensors: (file, offset); torch: TensorRef)
    entries: dict[str, Any] = field(default_factory=dict, repr=False)
    _maps: dict[str, Any] = field(default_factory=dict, repr=False)

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
    def array(self, name: str) -> np.ndarray:
        """The whole tensor ``name`` (canonical) as a read-only numpy view of the mapped file
        (bits dtype: bfloat16 as uint16). May be strided (torch views)."""
        return self.raw_array(self.raw_name(name))

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` along dim 0 of ``name`` (canonical); touches only those bytes."""
        return self.raw_array(self.raw_name(name))[start:stop]

    def raw_array(self, raw: str) -> np.ndarray:
        """Like :meth:`array` but by stored key (used for tensors outside ``--key``)."""
        try:
            return self._array(raw)
        except CheckpointError:
            raise
        except Exception as exc:  # truncated data, I/O error
            raise CheckpointError(f"{self.path}: cannot read tensor {raw!r} ({one_line(exc)})") from None

    def _array(self, raw: str) -> np.ndarray:  # pragma: no cover - each reader defines it
        raise NotImplementedError

    def spec_of(self, raw: str) -> TensorSpec:
        for n, s in self.specs.items():
            if self.raw_name(n) == raw:
                return s
        for s in self.outside:
            if s.name == raw:
                return s
        raise KeyError(raw)

    def tensor(self, name: str) -> Any:
        """The tensor ``name`` (canonical) as a torch tensor (a copy; imports torch)."""
        return to_torch(self.array(name), self.specs[name].dtype)

    def state_dict(self) -> dict[str, Any]:
        """Every tensor of the state dict as torch tensors, by stored key (copies; imports torch)."""
        return {self.raw_name(n): self.tensor(n) for n in self.specs}

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def close(self) -> None:
        for m in self._maps.values():
            try:
                if hasattr(m, "close"):  # b"" for an empty file
                    m.close()
            except (BufferError, ValueError):
                pass  # a view is still alive; the mapping goes with it
        self._maps.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _select_flat(self, raw: list[TensorSpec], key: str | None, key_optional: bool = False) -> None:
        """Fill ``specs`` from flat stored names: ``--key`` prefix selection, wrapper prefix."""
        pre = f"{key}." if key else ""
        if key and key_optional and not any(s.name.startswith(pre) for s in raw):
            self.notes.append(f"--key {key} not in {self.path.name}: its whole state dict is used")
            key = None
        if key:
            inside = [s for s in raw if s.name.startswith(pre)]
            if not inside:
                tops = sorted({s.name.split(".")[0] for s in raw})[:12]
                raise CheckpointError(f"{self.path}: --key {key}: no tensor name starts with {pre!r} (first components: {', '.join(tops)})")
            self.key = key
            self.outside = [s for s in raw if not s.name.startswith(pre)]
            raw = [TensorSpec(s.name[len(pre):], s.dtype, s.shape) for s in inside]
        self.prefix = common_prefix([s.name for s in raw])
        n = len(self.prefix)
        self.specs = {s.name[n:]: TensorSpec(s.name[n:], s.dtype, s.shape) for s in raw}


def to_torch(arr: np.ndarray, dtype: str) -> Any:
    """A torch tensor (own memory) holding ``arr``'s bits as ``dtype``."""
    import torch

    a = np.array(arr, copy=True, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
    info = dtype_info(dtype)
    if info.numpy in ("<u2",) and info.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if info.name.startswith("float8"):
        return torch.from_numpy(a.view(np.uint8)).view(getattr(torch, info.name))
    if info.name in ("uint16", "uint32", "uint64"):
        signed = {"uint16": np.int16, "uint32": np.int32, "uint64": np.int64}[info.name]
        return torch.from_numpy(a.view(signed)).view(getattr(torch, info.name))
    return torch.from_numpy(a)


def from_torch(t: Any) -> np.ndarray:
    """The bits of torch tensor ``t`` as a numpy array (bfloat16 -> uint16), C order (no copy
    when ``t`` is a contiguous CPU tensor)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    info = dtype_info(dtype_name(t.dtype))
    if info.numpy in ("<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "i1", "u1", "?", "<c8", "<c16") and not info.name.startswith("float8"):
        return t.numpy()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[info.itemsize]
    return t.view(view).numpy().view(np.dtype(info.numpy))


# ----------------------------------------------------------------------------------------------
# finding the state dict in a container (real objects or inert stand-ins)


def is_tensor(obj: Any) -> bool:
    return isinstance(obj, TensorRef)


def module_state(obj: Any) -> dict[str, Any] | None:
    """The ``__dict__`` of an ``nn.Module`` stand-in (has ``_parameters``, ``_buffers``, ``_modules``), else None."""
    if isinstance(obj, Inert):
        st = obj.module_state()
        return st
    return None


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """What ``module.state_dict()`` would return for an inert ``nn.Module`` stand-in, in its order:
    own parameters, own persistent buffers, then each child's (torch ``Module._save_to_state_dict``)."""
    out: dict[str, Any] = {}
    st = module_state(obj)
    if st is None:
        return out
    params = st.get("_parameters") or {}
    buffers = st.get("_buffers") or {}
    non_persistent = st.get("_non_persistent_buffers_set") or set()
    for k, v in _items(params):
        if v is not None:
            out[prefix + str(k)] = v
    for k, v in _items(buffers):
        if v is not None and k not in non_persistent:
            out[prefix + str(k)] = v
    for k, child in _items(st.get("_modules") or {}):
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{k}."))
    return out


def _items(d: Any) -> list[tuple[Any, Any]]:
    if isinstance(d, Mapping):
        return list(d.items())
    return []


def is_state_dict(obj: Any) -> bool:
    """A mapping of str -> tensors (extra non-tensor entries, such as a ``step`` int, allowed as
    long as most entries are tensors)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if not all(isinstance(k, str) for k in obj):
        return False
    n_t = sum(1 for v in obj.values() if is_tensor(v))
    return n_t > 0 and n_t == len(obj)


def is_module(obj: Any) -> bool:
    return module_state(obj) is not None


def weights_of(obj: Any) -> dict[str, Any] | None:
    """The state dict a value stands for: itself (a mapping of tensors) or a module's."""
    if is_state_dict(obj):
        return dict(obj)
    if is_module(obj):
        sd = module_state_dict(obj)
        return sd if sd else None
    return None


def _children(o: Any) -> list[tuple[str, Any]]:
    """Sub-entries a dotted key can name: mapping items, sequence items, inert objects' state."""
    if isinstance(o, Mapping):
        return [(str(k), v) for k, v in o.items() if isinstance(k, (str, int))]
    if isinstance(o, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(o)]
    if isinstance(o, Inert):
        st = o.attributes()
        out = [(str(k), v) for k, v in st.items() if isinstance(k, str)]
        mods = st.get("_modules")
        if isinstance(mods, Mapping):  # a module's children are reachable by name
            out += [(str(k), v) for k, v in mods.items() if str(k) not in st]
        return out
    return []


def resolve_key(path: Path, obj: Any, key: str) -> Any:
    """Walk a dotted ``key`` through mappings, sequences and inert objects (their attributes,
    a module's children), longest matching component first. CheckpointError naming the file,
    the key and what is there otherwise."""
    parts = key.split(".")
    cur, i, walked = obj, 0, []
    while i < len(parts):
        kids = dict(_children(cur))
        for j in range(len(parts), i, -1):
            part = ".".join(parts[i:j])
            if part in kids:
                cur = kids[part]
                break
        else:
            here = ".".join(walked) or "the top level"
            shown = [k for k in kids if not k.startswith("_")]
            found = ", ".join(shown[:12]) if shown else _type_name(cur)
            raise CheckpointError(f"{path}: --key {key}: no entry {parts[i]!r} under {here} (found: {found})")
        walked.append(part)
        i = j
    return cur


def _type_name(o: Any) -> str:
    if isinstance(o, Inert):
        return o.qualname
    return type(o).__name__


def find_state_dict(path: Path, obj: Any, prefer_key: str | None, key: str | None = None,
                    key_optional: bool = False) -> tuple[str | None, dict[str, Any], list[str], list[str]]:
    """Locate the weights in a container: (dotted key or None, {stored name: tensor},
    other candidates, notes).

    ``key`` given: that entry (a state dict, a module, or an object whose attributes hold one);
    with ``key_optional`` and a file that is itself the weights, the whole file. Otherwise: the
    file itself when it is a state dict or a module; else every state dict / module up to 3
    levels down (through mappings and inert objects' attributes), choosing ``prefer_key``, the only
    one, or the first of :data:`STATE_DICT_KEYS`. CheckpointError naming the file otherwise.
    """
    notes: list[str] = []
    top = weights_of(obj)
    if key:
        try:
            sub = resolve_key(path, obj, key)
        except CheckpointError:
            if key_optional and top is not None:
                notes.append(f"--key {key} not in {path.name}: its whole state dict is used")
                return None, top, [], notes
            raise
        sd = weights_of(sub)
        if sd is None:
            sd = _mixed_state_dict(sub)
        if not sd:
            raise CheckpointError(f"{path}: --key {key} is {_describe(sub)}, not a state dict of tensors")
        return key, sd, [], notes
    if top is not None:
        return None, top, [], notes
    mixed = _mixed_state_dict(obj)
    candidates: list[tuple[tuple[str, ...], dict[str, Any]]] = []

    def walk(o: Any, p: tuple[str, ...], depth: int) -> None:
        if depth > 3:
            return
        for k, v in _children(o):
            sd = weights_of(v)
            if sd is not None:
                candidates.append((p + (k,), sd))
            elif isinstance(v, Mapping) or (module_state(v) is None and not isinstance(v, (list, tuple)) and _children(v)):
                walk(v, p + (k,), depth + 1)

    walk(obj, (), 1)
    if not candidates and mixed:
        # a flat dict holding tensors and plain values (``step``, ``epoch``): its tensors are the weights
        notes.append(f"{path.name}: the top-level dict holds non-tensor entries ({', '.join(_non_tensor_keys(obj)[:6])}); "
                     "its tensors are merged and the other entries kept")
        return None, mixed, [], notes
    if not candidates:
        tops = ", ".join(str(k) for k, _ in _children(obj)[:12]) or _type_name(obj)
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
    p, sd = candidates[chosen]
    return ".".join(p), sd, [n for i, n in enumerate(names) if i != chosen], notes


def _mixed_state_dict(obj: Any) -> dict[str, Any] | None:
    """The tensor entries of a str-keyed mapping that holds tensors and plain values, or None."""
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        return None
    t = {k: v for k, v in obj.items() if is_tensor(v)}
    return t or None


def _non_tensor_keys(obj: Any) -> list[str]:
    return [str(k) for k, v in obj.items() if not is_tensor(v)] if isinstance(obj, Mapping) else []


def _describe(o: Any) -> str:
    if isinstance(o, Mapping):
        return f"a mapping without tensors ({', '.join(map(str, list(o)[:6]))})"
    return f"a {_type_name(o)}"
