"""Reading the plain fields of an EDM ``.pkl`` without running any of its code.

An EDM network pickle is ``pickle.dump(dict(ema=<net>, loss_fn=..., augment_pipe=...,
dataset_kwargs=...))`` where every network object is a ``torch_utils.persistence`` record
``_reconstruct_persistent_obj(meta)`` whose ``meta`` holds ``class_name``, ``module_src`` (the
source code that a normal load executes) and ``state`` (the instance ``__dict__``: plain
attributes such as ``label_dim``, ``img_resolution``, ``sigma_min``, ``_init_kwargs``, plus the
module's parameters and buffers). See ``/work/shared/research/neon-repo.md`` section 4 and EDM's
``torch_utils/persistence.py``.

:func:`read_fields` unpickles with a ``find_class`` that resolves **no** global of the file: the
persistence reconstructor becomes :class:`PersistentRecord` (class name and state, the source is
kept only as its sha256), a handful of plain containers stay what they are, and every other global
(torch's tensor and storage rebuilders, ``torch.nn`` containers, ``copyreg``) becomes an inert
:class:`Opaque` stand-in that only records its arguments. Tensors therefore come back as opaque
records, not data; this reader is for metadata (what the family needs before it is allowed to run
the file: the number of classes, the image shape, neon's metadata entry). The checkpoint tools
(``neon merge`` / ``neon inspect``) have their own complete inert reader of tensors.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

from neon_cli.errors import CheckpointError

_PLAIN = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}

PERSISTENCE = ("torch_utils.persistence", "_reconstruct_persistent_obj")


class Opaque:
    """Stand-in for an object of a class neon does not resolve: records how it was built."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


class PersistentRecord:
    """One ``torch_utils.persistence`` object: ``class_name``, ``state`` (dict), ``module_src_sha256``."""

    def __init__(self, meta: Any):
        meta = meta if isinstance(meta, dict) else {}
        self.class_name = str(meta.get("class_name", "?"))
        self.version = meta.get("version")
        src = meta.get("module_src")
        self.module_src_sha256 = hashlib.sha256(src.encode()).hexdigest() if isinstance(src, str) else None
        state = meta.get("state")
        self.state = dict(state) if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<persistent {self.class_name}>"


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        if (module, name) == PERSISTENCE:
            return PersistentRecord
        return type(name, (Opaque,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        return Opaque(pid)


def read_fields(path: str | Path) -> dict[str, Any]:
    """The top-level dict of an EDM network pickle, read inertly (see the module docstring).

    Returns the dict with :class:`PersistentRecord` values for the persistent objects (``ema``,
    ``loss_fn``, ``augment_pipe``). Raises :class:`CheckpointError` naming the file when it is not
    a pickle of a dict with an ``ema`` persistent network (e.g. a ``training-state-*.pt`` zip, a
    torch.save file, a truncated stream).
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head[:1] != b"\x80":
                kind = "a zip archive (torch.save / training-state-*.pt?)" if head == b"PK" else "not a pickle"
                raise CheckpointError(f"{p}: not an EDM network pickle ({kind}); give a network-snapshot-*.pkl or a released edm-*.pkl")
            obj = _Unpickler(io.BufferedReader(fh)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated stream, unsupported opcode, ...
        raise CheckpointError(f"{p}: unreadable EDM pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("ema"), PersistentRecord):
        what = f"a {type(obj).__name__}" if not isinstance(obj, dict) else f"a dict with keys {sorted(map(str, obj))}"
        raise CheckpointError(f"{p}: not an EDM network pickle (expected dict(ema=<persistent network>, ...), found {what})")
    return obj


def network_info(path: str | Path) -> dict[str, Any]:
    """Plain attributes of the pickled ``ema`` network: ``class_name``, ``label_dim``,
    ``img_channels``, ``img_resolution``, ``sigma_min``, ``sigma_max`` (None where absent) and
    ``init_kwargs`` (dict or None), read without running code."""
    ema = read_fields(path)["ema"]
    st = ema.state
    kwargs = st.get("_init_kwargs")

    def num(key: str) -> Any:
        v = st.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return {
        "class_name": ema.class_name,
        "label_dim": int(num("label_dim") or 0),
        "img_channels": num("img_channels"),
        "img_resolution": num("img_resolution"),
        "sigma_min": num("sigma_min"),
        "sigma_max": num("sigma_max"),
        "init_kwargs": dict(kwargs) if isinstance(kwargs, dict) else None,
        "module_src_sha256": ema.module_src_sha256,
    }


def neon_metadata(path: str | Path) -> dict[str, str]:
    """The ``neon`` entry neon writes into the pickles it makes (str -> str), {} for others."""
    meta = read_fields(path).get("neon")
    if not isinstance(meta, dict):
        return {}
    return {str(k): str(v) for k, v in meta.items() if isinstance(k, str) and isinstance(v, (str, int, float))}
