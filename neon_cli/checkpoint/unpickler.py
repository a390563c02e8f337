"""The inert unpickler: reads any pickle a PyTorch checkpoint holds without running a line of it.

:class:`InertUnpickler` is a :class:`pickle.Unpickler` whose ``find_class`` returns a real object
only for the short allowlist below; every other global (the model's classes, ``argparse.Namespace``,
``os.system``, ``builtins.eval``, ...) becomes an inert stand-in class made on the spot
(:func:`stand_in`). Calling a stand-in (REDUCE, NEWOBJ, ``copyreg._reconstructor``) records the
arguments; BUILD records the state; SETITEM(S)/APPEND(S) record the items. No ``__reduce__``,
``__setstate__``, constructor or import of the file's own code ever runs, and no module is imported.

Allowlist (:data:`ALLOWED`), each replaced by an inert implementation of our own:

* containers: ``collections.OrderedDict``, ``builtins.set`` / ``frozenset`` / ``object`` (and the
  Python 2 ``__builtin__`` spellings), ``copyreg._reconstructor`` (builds a stand-in, or an empty
  container of an allowed type), ``_codecs.encode`` (only ``(str, "latin1")``: protocol-2 bytes);
* tensors: ``torch._utils._rebuild_tensor`` / ``_rebuild_tensor_v2`` -> :class:`TensorRef`;
  ``_rebuild_parameter`` / ``_rebuild_parameter_with_state`` / ``torch._tensor._rebuild_from_type_v2``
  -> the same TensorRef marked as a parameter; storage classes (``torch.FloatStorage``, ...,
  ``torch.UntypedStorage``) and dtypes (``torch.float32``) -> markers; ``torch.Size`` -> tuple;
  ``torch.device`` -> its string;
* ``torch.storage._load_from_bytes`` (a nested ``torch.load`` of a legacy stream in protocol >= 3
  bytes: how a plain ``pickle.dump`` of a tensor stores it) -> parsed by neon's own reader
  (:mod:`neon_cli.checkpoint.legacy`), never by torch;
* ``torch_utils.persistence._reconstruct_persistent_obj`` (EDM/StyleGAN persistence) ->
  :class:`Persistent`, holding ``meta['class_name']``, ``meta['state']`` and ``meta['module_src']``
  as a string (never executed).

An ``nn.Module`` stand-in is any stand-in whose state holds ``_parameters``, ``_buffers`` and
``_modules``; :func:`neon_cli.checkpoint.core.module_state_dict` yields exactly the keys
``module.state_dict()`` would.

Big byte strings are never loaded: :func:`scan` walks the opcode stream (a table-driven reader of
the pickle opcodes in :mod:`pickletools`, refusing those it does not support) and records where
each payload lies; :func:`skeleton` replaces them by short placeholders (and drops FRAME opcodes,
which are only read-ahead hints), so unpickling costs memory for the object tree only and a
nested storage is a (file offset, length) pair. Every global the stream names is recorded
(:attr:`InertUnpickler.globals`) for ``neon inspect``; :func:`danger` says which would do
something other than rebuild tensors on a normal load.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from neon_cli.checkpoint.dtypes import DTYPES, STORAGE_DTYPES
from neon_cli.checkpoint.inert import (  # noqa: F401  (re-exported: where readers have always found them)
    DTypeRef,
    Inert,
    Payload,
    Persistent,
    StorageRef,
    StorageType,
    TensorRef,
    stand_in,
)
from neon_cli.errors import CheckpointError

# ----------------------------------------------------------------------------------------------
# the allowlist


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
    if not isinstance(storage, StorageRef):  # e.g. a nested payload that is not a storage: keep it inert
        return stand_in("torch._utils", "_rebuild_tensor_v2")(storage, storage_offset, size, stride, *rest)
    shape = tuple(int(s) for s in size)
    st = tuple(int(s) for s in stride) if stride is not None else _contiguous_strides(shape)
    if len(st) != len(shape) or any(s < 0 for s in shape):
        raise CheckpointError(f"storage {storage.key}: a tensor of size {list(shape)} and stride {list(st)}")
    t = TensorRef(storage, int(storage_offset), shape, st, bool(rest[0]) if rest and isinstance(rest[0], bool) else False)
    lo, hi = t.extent()
    if t.numel and (lo < 0 or hi > storage.numel):
        raise CheckpointError(
            f"storage {storage.key} holds {storage.numel} elements but a tensor of size {list(shape)} at offset "
            f"{t.offset} reads elements {lo}..{hi - 1}"
        )
    return t


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= s
    return tuple(reversed(st))


def _rebuild_parameter(data: Any, requires_grad: Any = True, *rest: Any) -> Any:
    if isinstance(data, TensorRef):
        data.parameter = True
        data.requires_grad = bool(requires_grad)
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    if func is _rebuild_tensor or func is _rebuild_parameter:
        t = func(*args)
        if isinstance(t, TensorRef) and isinstance(new_type, type) and getattr(new_type, "_neon_qualname", "").endswith("Parameter"):
            t.parameter = True
        return t
    return stand_in("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """copyreg._reconstructor, inert: an empty stand-in (or an allowed container) of ``cls``."""
    if isinstance(cls, type) and issubclass(cls, Inert):
        obj = cls.__new__(cls)
        obj.base = base
        if state is not None:
            obj.args = (state,)
        return obj
    if cls in (dict, OrderedDict, list, set, object):
        return cls()
    return stand_in("copyreg", "_reconstructor")(cls, base, state)


def _codecs_encode(obj: Any, encoding: str = "utf-8", *rest: Any) -> Any:
    if isinstance(obj, str) and str(encoding).lower().replace("-", "") in ("latin1", "iso88591"):
        return obj.encode("latin1")
    return stand_in("_codecs", "encode")(obj, encoding, *rest)


def _size(arg: Any = ()) -> tuple:
    return tuple(arg)


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


#: The globals a tensor checkpoint legitimately names, mapped to neon's inert implementations.
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("__builtin__", "object"): object,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
}

#: Globals that rebuild tensors or plain data on a normal load (no warning in ``neon inspect``).
TENSOR_GLOBALS = frozenset(ALLOWED) | {
    ("torch.storage", "_load_from_bytes"), ("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
    ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("builtins", "slice"), ("builtins", "complex"), ("builtins", "bytearray"),
    ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "int"), ("builtins", "float"),
}

#: Modules and functions that do something other than build data when a normal load calls them.
DANGEROUS_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty",
                     "code", "ctypes", "multiprocessing", "webbrowser", "pickle", "_pickle", "marshal", "builtins.exec",
                     "asyncio", "signal", "tempfile", "pathlib", "io", "urllib", "http", "requests", "platform",
                     "commands", "timeit", "pdb", "bdb", "operator", "functools", "types", "gc", "threading")
DANGEROUS_BUILTINS = frozenset({"eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals",
                                "locals", "vars", "input", "breakpoint", "apply", "execfile", "file", "reload", "exit", "quit",
                                "print", "memoryview", "help", "__build_class__"})


def danger(module: str, name: str) -> str | None:
    """Why a normal load of a file naming global ``module.name`` would be unsafe, or None.

    ``"runs os.system"``-style text for functions that act on the system or evaluate code,
    ``"exec the Python source embedded in the file ..."`` for EDM persistence objects, None for the tensor/data
    allowlist. Classes of other modules (the model's own) are not flagged here; ``neon inspect``
    lists them as modules a load imports.
    """
    if (module, name) in TENSOR_GLOBALS:
        return None
    if module == "torch" and (name.endswith("Storage") or name in DTYPES):
        return None
    if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
        return "exec the Python source embedded in the file (torch_utils.persistence)"
    if module in ("builtins", "__builtin__"):
        return f"runs builtins.{name}" if name in DANGEROUS_BUILTINS else None
    top = module.split(".")[0]
    if module in DANGEROUS_MODULES or top in DANGEROUS_MODULES:
        shown = "os" if top in ("posix", "nt") else module
        return f"runs {shown}.{name}"
    return None


# ----------------------------------------------------------------------------------------------
# scanning the opcode stream

_UP_TO_NEWLINE = pickletools.UP_TO_NEWLINE
_ARG1 = pickletools.TAKEN_FROM_ARGUMENT1
_ARG4 = pickletools.TAKEN_FROM_ARGUMENT4
_ARG4U = pickletools.TAKEN_FROM_ARGUMENT4U
_ARG8U = pickletools.TAKEN_FROM_ARGUMENT8U
_REFUSED = {"NEXT_BUFFER", "READONLY_BUFFER", "EXT1", "EXT2", "EXT4", "PERSID"}
_OPS: dict[int, tuple[str, int, int]] = {}
for _op in pickletools.opcodes:
    _n = _op.arg.n if _op.arg is not None else 0
    _lines = 2 if _op.arg is not None and _op.arg.name == "stringnl_noescape_pair" else 1
    _OPS[ord(_op.code)] = (_op.name, _n, _lines)
_BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
#: Byte strings at least this long are left in the file (placeholders in the skeleton): all, so that
#: every storage payload has its offset (the writer patches it in place).
PAYLOAD_MIN = 1
_TAG = b"\x00neon-payload\x00"


@dataclass
class Scan:
    """Result of :func:`scan`: the stream's end (after STOP), its big byte payloads and frames."""

    start: int
    end: int
    protocol: int = 0
    payloads: list[tuple[int, int, int]] = field(default_factory=list)  # (opcode pos, data pos, length)
    frames: list[int] = field(default_factory=list)  # FRAME opcode positions
    n_ops: int = 0


def scan(buf: Any, start: int = 0, *, where: str = "") -> Scan:
    """Walk one pickle opcode stream in ``buf`` (bytes, mmap) from ``start`` to its STOP.

    Raises CheckpointError naming ``where`` for a stream cut short ("truncated at byte N") or an
    opcode neon does not read ("unsupported pickle opcode 0x.. (NAME) at byte N").
    """
    n = len(buf)
    pos = start
    res = Scan(start, start)
    get = buf.__getitem__
    while True:
        if pos >= n:
            raise CheckpointError(f"{where}: pickle stream truncated at byte {pos} (no STOP opcode)")
        code = get(pos)
        info = _OPS.get(code)
        if info is None:
            raise CheckpointError(f"{where}: unsupported pickle opcode 0x{code:02x} at byte {pos}")
        name, argn, lines = info
        if name in _REFUSED:
            raise CheckpointError(f"{where}: unsupported pickle opcode {name} at byte {pos}")
        op_pos = pos
        pos += 1
        res.n_ops += 1
        if argn >= 0:
            if name == "PROTO" and pos < n:
                res.protocol = get(pos)
            if name == "FRAME":
                res.frames.append(op_pos)
            pos += argn
        elif argn == _UP_TO_NEWLINE:
            for _ in range(lines):
                nl = buf.find(b"\n", pos) if hasattr(buf, "find") else bytes(buf[pos:]).find(b"\n") + pos
                if nl < 0:
                    raise CheckpointError(f"{where}: pickle stream truncated at byte {n} (inside {name} at byte {op_pos})")
                pos = nl + 1
        else:
            width = {_ARG1: 1, _ARG4: 4, _ARG4U: 4, _ARG8U: 8}[argn]
            if pos + width > n:
                raise CheckpointError(f"{where}: pickle stream truncated at byte {n} (inside {name} at byte {op_pos})")
            raw = bytes(buf[pos:pos + width])
            length = int.from_bytes(raw, "little", signed=(argn == _ARG4))
            if length < 0:
                raise CheckpointError(f"{where}: negative length in {name} at byte {op_pos}")
            pos += width
            if name in _BYTES_OPS and length >= PAYLOAD_MIN:
                res.payloads.append((op_pos, pos, length))
            pos += length
        if pos > n:
            raise CheckpointError(f"{where}: pickle stream truncated at byte {n} (inside {name} at byte {op_pos})")
        if name == "STOP":
            res.end = pos
            return res


def skeleton(buf: Any, sc: Scan) -> tuple[bytes, dict[bytes, Payload]]:
    """The stream of ``sc`` with every big payload replaced by a short placeholder and FRAME
    opcodes dropped; returns (stream, placeholder -> :class:`Payload`)."""
    cuts: list[tuple[int, int, bytes | None, Payload | None]] = []
    marks: dict[bytes, Payload] = {}
    for op_pos, data_pos, length in sc.payloads:
        tag = _TAG + str(len(marks)).encode()
        p = Payload(data_pos, length)
        marks[tag] = p
        cuts.append((op_pos, data_pos + length, b"C" + bytes([len(tag)]) + tag, p))
    for f in sc.frames:
        cuts.append((f, f + 9, b"", None))
    cuts.sort()
    out = io.BytesIO()
    pos = sc.start
    for a, b, repl, _ in cuts:
        out.write(bytes(buf[pos:a]))
        out.write(repl or b"")
        pos = b
    out.write(bytes(buf[pos:sc.end]))
    return out.getvalue(), marks


# ----------------------------------------------------------------------------------------------
# the unpickler


class InertUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that never resolves a global outside :data:`ALLOWED` (see module doc).

    ``persistent_load``: called with the persistent id tuple (``('storage', type, key, location,
    numel[, view])`` in torch files); defaults to refusing persistent ids. ``load_from_bytes``:
    called with a :class:`Payload` (or small ``bytes``) for ``torch.storage._load_from_bytes``.
    ``placeholders``: from :func:`skeleton`. After :meth:`load`, :attr:`globals` counts every
    global the stream named, :attr:`persistent` the EDM persistence objects met.
    """

    def __init__(self, data: bytes, *, where: str, persistent_load: Callable[[Any], Any] | None = None,
                 load_from_bytes: Callable[[Any], Any] | None = None, placeholders: dict[bytes, Payload] | None = None,
                 protocol: int = 4):
        super().__init__(io.BytesIO(data))
        self.protocol = protocol
        self.where = where
        self._pl = persistent_load
        self._lfb = load_from_bytes
        self.placeholders = placeholders or {}
        self.globals: dict[tuple[str, str], int] = {}
        self.persistent: list[Persistent] = []
        self.nested: list[Any] = []  # reports of nested payloads (their globals)

    def find_class(self, module: str, name: str) -> Any:
        module, name = str(module), str(name)
        if self.protocol < 3:  # Python 2 names, mapped as pickle.Unpickler(fix_imports=True) does
            import _compat_pickle

            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        self.globals[(module, name)] = self.globals.get((module, name), 0) + 1
        impl = ALLOWED.get((module, name))
        if impl is not None:
            return impl
        if module == "torch":
            if name in STORAGE_DTYPES:
                return StorageType(name, STORAGE_DTYPES[name])
            if name in DTYPES:
                return DTypeRef(name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self._load_from_bytes
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return self._persistent
        return stand_in(module, name)

    def _persistent(self, meta: Any = None, *args: Any) -> Persistent:
        obj = Persistent(meta, *args)
        self.persistent.append(obj)
        return obj

    def _load_from_bytes(self, data: Any) -> Any:
        if isinstance(data, bytes) and data in self.placeholders:
            data = self.placeholders[data]
        if self._lfb is None:
            return stand_in("torch.storage", "_load_from_bytes")(data)
        return self._lfb(data)

    def persistent_load(self, pid: Any) -> Any:
        if self._pl is None:
            raise pickle.UnpicklingError("persistent id in a plain pickle")
        return self._pl(pid)

    def load(self) -> Any:
        try:
            return super().load()
        except CheckpointError as exc:
            msg = str(exc)
            raise CheckpointError(msg if msg.startswith(self.where) else f"{self.where}: {msg}") from None
        except RecursionError:
            raise CheckpointError(f"{self.where}: pickle nested too deeply") from None
        except Exception as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CheckpointError(f"{self.where}: cannot read the pickle ({type(exc).__name__}: {text})") from None


def storage_pid(pid: Any, where: str) -> tuple[str, str, str, int, Any]:
    """(dtype, key, location, numel, view metadata) of a torch storage persistent id."""
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
        raise CheckpointError(f"{where}: unexpected persistent id {str(pid)[:80]}")
    stype, key, location, numel = pid[1], pid[2], pid[3], pid[4]
    view = pid[5] if len(pid) > 5 else None
    if isinstance(stype, StorageType):
        dtype = stype.dtype
    elif isinstance(stype, DTypeRef):
        dtype = stype.name
    else:
        q = getattr(stype, "_neon_qualname", type(stype).__name__)
        raise CheckpointError(f"{where}: storage {key} of unsupported type {q}")
    try:
        numel = int(numel)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: storage {key}: element count {numel!r}") from None
    if numel < 0:
        raise CheckpointError(f"{where}: storage {key}: negative element count")
    return dtype, str(key), str(location), numel, view


def unpack_u64(buf: Any, pos: int, where: str) -> int:
    if pos + 8 > len(buf):
        raise CheckpointError(f"{where}: truncated at byte {len(buf)} (expected a storage size at byte {pos})")
    return struct.unpack("<Q", bytes(buf[pos:pos + 8]))[0]
