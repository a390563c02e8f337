"""Reading the plain fields of an IMM network pickle without running any of its code.

An IMM network file (``imagenet256_ts_a2.pkl``, ``network-snapshot-*.pkl``) is, like EDM's,
``pickle.dump(dict(ema=<IMMPrecond>, ...))`` where each network object is a
``torch_utils.persistence`` record ``_reconstruct_persistent_obj(meta)``; ``meta['state']`` is
the instance ``__dict__`` (plain attributes such as ``label_dim``, ``img_channels``,
``img_resolution``, ``_init_kwargs``, and the module's tensors) and ``meta['module_src']`` is the
source code that a normal load executes (``/work/shared/research/neon-repo.md`` section 4).

:func:`read_fields` unpickles with a ``find_class`` that resolves no global of the file: the
persistence reconstructor becomes :class:`Record` (class name, state, the source kept only as its
sha256), plain containers stay what they are, and every other global (torch's tensor and storage
rebuilders, ``torch.nn`` containers, dtypes) becomes an inert :class:`Opaque` that only records its
arguments. This is for metadata (the number of classes, the latent shape, neon's entry) needed
before the user's ``--trust-pickle`` allows running the file; ``neon merge`` / ``neon inspect``
read the tensors with the checkpoint tools' own inert reader.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

from neon_cli.errors import CheckpointError

_PLAIN = {("collections", "OrderedDict"): OrderedDict, ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
          ("builtins", "dict"): dict, ("builtins", "list"): list, ("builtins", "tuple"): tuple,
          ("dnnlib.util", "EasyDict"): dict}
PERSISTENCE = ("torch_utils.persistence", "_reconstruct_persistent_obj")


class Opaque:
    """Stand-in for an object of a class that is not resolved: records how it was built."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


class Record:
    """One persistent object: ``class_name``, ``state`` (dict), ``module_src_sha256``."""

    def __init__(self, meta: Any):
        meta = meta if isinstance(meta, dict) else {}
        self.class_name = str(meta.get("class_name", "?"))
        src = meta.get("module_src")
        self.module_src_sha256 = hashlib.sha256(src.encode()).hexdigest() if isinstance(src, str) else None
        self.state = dict(meta["state"]) if isinstance(meta.get("state"), dict) else {}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        if (module, name) == PERSISTENCE:
            return Record
        return type(name, (Opaque,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        return Opaque(pid)


def read_fields(path: str | Path) -> dict[str, Any]:
    """The top-level dict of an IMM network pickle, read inertly; CheckpointError naming the file
    unless it is a pickle of a dict whose ``ema`` is a persistent network."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head[:1] != b"\x80":
                kind = "a zip archive (torch.save / training-state-*.pt?)" if head == b"PK" else "not a pickle"
                raise CheckpointError(f"{p}: not an IMM network pickle ({kind}); give a network-snapshot-*.pkl or a released .pkl")
            obj = _Unpickler(fh).load()
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{p}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise CheckpointError(f"{p}: unreadable IMM pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("ema"), Record):
        found = f"a dict with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{p}: not an IMM network pickle (expected dict(ema=<persistent network>, ...), found {found})")
    return obj


def network_info(path: str | Path) -> dict[str, Any]:
    """``class_name``, ``label_dim``, ``img_channels``, ``img_resolution`` and ``init_kwargs`` of
    the pickled ``ema`` network, read without running code."""
    ema = read_fields(path)["ema"]
    st = ema.state

    def num(key: str) -> Any:
        v = st.get(key)
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

    kwargs = st.get("_init_kwargs")
    return {"class_name": ema.class_name, "label_dim": num("label_dim") or 0, "img_channels": num("img_channels"),
            "img_resolution": num("img_resolution"), "init_kwargs": dict(kwargs) if isinstance(kwargs, dict) else None,
            "module_src_sha256": ema.module_src_sha256}


def neon_metadata(path: str | Path) -> dict[str, str]:
    """The ``neon`` entry neon writes into the pickles it makes (str -> str), {} for others."""
    meta = read_fields(path).get("neon")
    if not isinstance(meta, dict):
        return {}
    return {str(k): str(v) for k, v in meta.items() if isinstance(k, str) and isinstance(v, (str, int, float))}
