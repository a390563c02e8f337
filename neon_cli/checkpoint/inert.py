"""The inert stand-ins a checkpoint's pickle is read into, without running any of it: objects of
classes outside the allowlist (:class:`Inert`, EDM's :class:`Persistent`), storages and tensor views
(:class:`StorageRef`, :class:`TensorRef`), and large byte strings left in the file (:class:`Payload`).

:mod:`neon_cli.checkpoint.unpickler` builds them; :mod:`neon_cli.checkpoint.core` finds the state
dict among them. This module imports neither (only the dtype table), so the package has no import
circle.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from neon_cli.checkpoint.dtypes import DTYPES

# ----------------------------------------------------------------------------------------------
# stand-ins


class Inert:
    """An object of a class outside the allowlist: its qualified name and what the stream gave it.

    ``args``: constructor / call arguments; ``state``: the BUILD state (usually the instance
    ``__dict__``); ``items`` / ``entries``: what APPEND(S) / SETITEM(S) added. Nothing of the real
    class runs.
    """

    _neon_qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.items = []
        obj.entries = OrderedDict()
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the arguments were kept by __new__
        pass

    @property
    def qualname(self) -> str:
        return type(self)._neon_qualname

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.entries[key] = value

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> "Inert":
        return stand_in("<call>", f"{self.qualname}(...)")(*args, **kwargs)

    def attributes(self) -> dict[str, Any]:
        """The instance ``__dict__`` a normal load would have built (from BUILD state)."""
        st = self.state
        if isinstance(st, tuple) and len(st) == 2 and (st[0] is None or isinstance(st[0], dict)):
            merged: dict[str, Any] = dict(st[0] or {})
            if isinstance(st[1], dict):
                merged.update(st[1])
            return merged
        return dict(st) if isinstance(st, dict) else {}

    def module_state(self) -> dict[str, Any] | None:
        """The attributes when this stands for an ``nn.Module`` (``_parameters``/``_buffers``/``_modules``)."""
        st = self.attributes()
        if all(k in st for k in ("_parameters", "_buffers", "_modules")):
            return st
        return None

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


class Persistent(Inert):
    """An EDM/StyleGAN ``torch_utils.persistence`` object: ``class_name``, ``module_src`` (the
    defining module's source text, kept as a string and never executed), ``state``, ``meta``."""

    _neon_qualname = "torch_utils.persistence._reconstruct_persistent_obj"

    def __new__(cls, meta: Any = None, *args: Any) -> "Persistent":
        obj = Inert.__new__(cls, meta, *args)
        m = meta if isinstance(meta, dict) else {}
        obj.meta = m
        obj.class_name = str(m.get("class_name", "?"))
        src = m.get("module_src")
        obj.module_src = src if isinstance(src, str) else None
        obj.state = m.get("state")
        return obj

    @property
    def qualname(self) -> str:
        return f"persistence:{self.class_name}"

    def __setstate__(self, state: Any) -> None:
        if state is not None:
            self.state = state


_CLASSES: dict[tuple[str, str], type] = {}


def stand_in(module: str, name: str) -> type:
    """The inert class standing for global ``module.name`` (one per name, made on first use)."""
    key = (module, name)
    cls = _CLASSES.get(key)
    if cls is None:
        safe = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "_"
        cls = type(safe[:100], (Inert,), {"_neon_qualname": f"{module}.{name}", "__module__": "neon_cli.checkpoint.unpickler"})
        _CLASSES[key] = cls
    return cls


@dataclass(frozen=True)
class StorageType:
    """A storage class or dtype named in a storage's persistent id (``torch.FloatStorage``, ``torch.uint16``)."""

    name: str
    dtype: str


@dataclass(frozen=True)
class DTypeRef:
    """A ``torch.<dtype>`` global used as a value (an attribute holding a dtype)."""

    name: str


@dataclass(eq=False)
class StorageRef:
    """One storage: its key in the file, dtype, element count and where its bytes lie.

    ``offset``: absolute byte offset of the data in ``source`` (the file), or None when not known
    (a truncated file is refused earlier). ``member``: the zip member holding it (zip archives).
    """

    key: str
    dtype: str
    numel: int
    location: str = "cpu"
    offset: int | None = None
    member: str | None = None
    source: str = ""

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


@dataclass(eq=False)
class TensorRef:
    """A tensor as ``_rebuild_tensor_v2`` would build it: a strided view of ``storage``.

    ``offset`` and ``stride`` are in elements; ``parameter``: it was an ``nn.Parameter``.
    """

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False
    parameter: bool = False

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def extent(self) -> tuple[int, int]:
        """[first, last+1) element indices of the storage this view touches (empty: (o, o))."""
        if self.numel == 0:
            return self.offset, self.offset
        hi = self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride) if s > 0)
        lo = self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride) if st < 0)
        return lo, hi + 1

    def is_contiguous(self) -> bool:
        expect = 1
        for s, st in zip(reversed(self.shape), reversed(self.stride)):
            if s != 1 and st != expect:
                return False
            expect *= s
        return True


@dataclass(frozen=True)
class Payload:
    """A byte string of the stream left in the file (too big to load): absolute offset, length."""

    offset: int
    length: int
