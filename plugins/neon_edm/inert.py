"""Reading the plain fields of an EDM ``.pkl`` without running any of its code.

An EDM network pickle is ``pickle.dump(dict(ema=<net>, loss_fn=..., augment_pipe=...,
dataset_kwargs=...))`` where every network object is a ``torch_utils.persistence`` record
``_reconstruct_persistent_obj(meta)`` whose ``meta`` holds ``class_name``, ``module_src`` (the
source code that a normal load executes) and ``state`` (the instance ``__dict__``: plain
attributes such as ``label_dim``, ``img_resolution``, ``sigma_min``, ``_init_kwargs``, plus the
module's parameters and buffers).

The file is parsed by neon's inert checkpoint reader (:func:`neon_cli.checkpoint.torchfile.read_container`,
the one ``neon merge`` and ``neon inspect`` use): no global of the file is resolved, the
persistence records become :class:`neon_cli.checkpoint.unpickler.Persistent` stand-ins (class name
and state; the source is kept as a string, never executed), tensors stay references into the
mapped file. This module only picks out what the family needs before it is allowed to run the
file: the number of classes, the image shape, the constructor arguments, neon's metadata entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from neon_cli.errors import CheckpointError


def read_fields(path: str | Path, *, system: str = "EDM", released: str = "edm-*.pkl") -> dict[str, Any]:
    """The top-level dict of an EDM network pickle, read inertly (see the module docstring).
    ``system`` / ``released`` name the file's system in errors (IMM's pickles have EDM's layout:
    :mod:`neon_imm.inert` reads them here).

    Returns the dict, with :class:`~neon_cli.checkpoint.unpickler.Persistent` values for the
    persistent objects (``ema``, ``loss_fn``, ``augment_pipe``). Raises :class:`CheckpointError`
    naming the file when it is not a pickle of a dict with an ``ema`` persistent network (e.g. a
    ``training-state-*.pt`` zip, a state dict, a truncated stream).
    """
    from neon_cli.checkpoint.torchfile import read_container
    from neon_cli.checkpoint.unpickler import Persistent

    p = Path(path)
    try:
        encoding, buf, res = read_container(p)
    except CheckpointError:
        raise
    except Exception as exc:  # defensive: the reader raises CheckpointError for what it refuses
        raise CheckpointError(f"{p}: unreadable {system} pickle ({type(exc).__name__}: {exc})") from None
    try:
        buf.close()
    except BufferError:  # a view into the mapping is still referenced; it is freed with it
        pass
    obj = res.obj
    if encoding != "pickle" or not isinstance(obj, dict) or not isinstance(obj.get("ema"), Persistent):
        kind = "zip archive" if encoding == "zip" else f"{encoding} file"
        what = (f"a torch.save {kind} (training-state-*.pt?)" if encoding != "pickle"
                else f"a dict with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else f"a {type(obj).__name__}")
        raise CheckpointError(f"{p}: not an {system} network pickle (expected pickle.dump(dict(ema=<persistent network>, ...)), "
                              f"found {what}); give a network-snapshot-*.pkl or a released {released}")
    return obj


def network_info(path: str | Path, **names: str) -> dict[str, Any]:
    """Plain attributes of the pickled ``ema`` network: ``class_name``, ``label_dim``,
    ``img_channels``, ``img_resolution``, ``sigma_min``, ``sigma_max`` (None where absent),
    ``init_kwargs`` (dict or None) and ``module_src_sha256``, read without running code."""
    ema = read_fields(path, **names)["ema"]
    st = ema.state if isinstance(ema.state, dict) else {}
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
        "module_src_sha256": hashlib.sha256(ema.module_src.encode()).hexdigest() if ema.module_src else None,
    }


def neon_metadata(path: str | Path, **names: str) -> dict[str, str]:
    """The ``neon`` entry neon writes into the pickles it makes (str -> str), {} for others."""
    meta = read_fields(path, **names).get("neon")
    if not isinstance(meta, dict):
        return {}
    return {str(k): str(v) for k, v in meta.items() if isinstance(k, str) and isinstance(v, (str, int, float))}
