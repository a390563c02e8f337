"""``neon inspect``: what a checkpoint holds, where its weights are, and what loading it would run.

Safe on any file: torch zip archives, legacy ``torch.save`` streams and plain pickles are read
with the inert unpickler (:mod:`neon_cli.checkpoint.unpickler`: nothing of the file runs, nothing
is imported); safetensors headers are parsed by neon. Reported:

* ``tree``: the container (dicts, lists, objects by class name, plain values, tensors with key,
  shape, dtype, bytes and storage -- ``shared`` when several tensors view one storage; EDM
  persistence objects with their class name and the size and sha256 of their embedded source);
* ``weights``: what ``neon merge`` would merge: the ``--key`` it picks (``ema``, ``model_ema``,
  ``ema_model``, ``trainer.var_wo_ddp``, ...), the alternatives, tensor count and bytes;
* ``globals``: every global a normal load (``torch.load(weights_only=False)``, ``pickle.load``)
  would resolve, each with its kind: ``tensor`` (rebuilds tensors or plain data), ``class`` (imports
  that module and builds its objects: runs its code), ``dangerous`` (``os.system``,
  ``builtins.eval``, ``subprocess.*``, EDM's ``exec`` of embedded source: "this file would exec the Python source embedded in the file", ...);
* ``warnings``: one line per dangerous global: "this file would run os.system on load".
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from neon_cli.errors import CheckpointError
from neon_cli.progress import ProgressFn, null_progress
from neon_cli.requests import InspectRequest

MAX_ENTRIES = 64
MAX_DEPTH = 10
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_forward_hooks_with_kwargs",
          "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_is_full_backward_hook")


def _value(v: Any) -> Any:
    if isinstance(v, (bool, int, float)) or v is None:
        return v
    if isinstance(v, str):
        return v if len(v) <= 200 else v[:200] + f"... ({len(v)} characters)"
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    return repr(v)[:200]


def _tree(obj: Any, depth: int, shared: dict[int, int], path: str, weights: dict[int, str]) -> Any:
    from neon_cli.checkpoint.unpickler import DTypeRef, Inert, Persistent, StorageRef, TensorRef

    if depth > MAX_DEPTH:
        return {"type": "...", "note": "nested too deeply"}
    if isinstance(obj, TensorRef):
        st = obj.storage
        return {"type": "tensor", "shape": list(obj.shape), "dtype": obj.dtype, "bytes": obj.numel * _isize(obj.dtype),
                "storage": st.key, "shared": shared.get(id(st), 0) > 1, "parameter": obj.parameter}
    if isinstance(obj, StorageRef):
        return {"type": "storage", "key": obj.key, "dtype": obj.dtype, "numel": obj.numel}
    if isinstance(obj, DTypeRef):
        return {"type": "dtype", "value": obj.name}
    if isinstance(obj, Mapping):
        items = list(obj.items())
        node: dict[str, Any] = {"type": type(obj).__name__, "len": len(items),
                                "items": {str(k): _tree(v, depth + 1, shared, f"{path}.{k}" if path else str(k), weights)
                                          for k, v in items[:MAX_ENTRIES]}}
        if len(items) > MAX_ENTRIES:
            node["truncated"] = len(items) - MAX_ENTRIES
        return node
    if isinstance(obj, (list, tuple, set, frozenset)):
        seq = list(obj)
        node = {"type": type(obj).__name__, "len": len(seq),
                "items": [_tree(v, depth + 1, shared, f"{path}.{i}", weights) for i, v in enumerate(seq[:MAX_ENTRIES])]}
        if len(seq) > MAX_ENTRIES:
            node["truncated"] = len(seq) - MAX_ENTRIES
        return node
    if isinstance(obj, Inert):
        node = {"type": "object", "class": obj.qualname}
        if isinstance(obj, Persistent):
            node["persistent"] = True
            src = obj.module_src or ""
            node["module_src"] = {"characters": len(src), "sha256": hashlib.sha256(src.encode()).hexdigest()}
        mod = obj.module_state()
        if mod is not None:
            node["module"] = True
            params = {str(k): _tree(v, depth + 1, shared, path, weights) for k, v in _items(mod.get("_parameters")) if v is not None}
            buffers = {str(k): _tree(v, depth + 1, shared, path, weights) for k, v in _items(mod.get("_buffers")) if v is not None}
            kids = {str(k): _tree(v, depth + 1, shared, f"{path}.{k}", weights) for k, v in _items(mod.get("_modules")) if v is not None}
            other = {k: _value(v) for k, v in mod.items() if not k.startswith("_") and not isinstance(v, (Mapping, list, Inert))}
            node.update({k: v for k, v in (("parameters", params), ("buffers", buffers), ("modules", kids), ("attributes", other)) if v})
            return node
        attrs = obj.attributes()
        if attrs:
            node["attributes"] = {str(k): _tree(v, depth + 1, shared, f"{path}.{k}", weights)
                                  for k, v in list(attrs.items())[:MAX_ENTRIES] if k not in _HOOKS}
        if obj.args and not attrs:
            node["args"] = [_tree(a, depth + 1, shared, path, weights) for a in obj.args[:8]]
        if obj.entries:
            node["entries"] = {str(k): _tree(v, depth + 1, shared, path, weights) for k, v in list(obj.entries.items())[:MAX_ENTRIES]}
        if obj.items:
            node["items"] = [_tree(v, depth + 1, shared, path, weights) for v in obj.items[:MAX_ENTRIES]]
        return node
    return {"type": type(obj).__name__, "value": _value(obj)}


def _items(d: Any) -> list[tuple[Any, Any]]:
    return list(d.items()) if isinstance(d, Mapping) else []


def _isize(dtype: str) -> int:
    from neon_cli.checkpoint.core import DTYPES

    return DTYPES[dtype].itemsize


def _count_storages(obj: Any, seen: set[int], counts: dict[int, int], depth: int = 0) -> None:
    from neon_cli.checkpoint.unpickler import Inert, TensorRef

    if depth > 200 or id(obj) in seen and not isinstance(obj, TensorRef):
        return
    if isinstance(obj, TensorRef):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        counts[id(obj.storage)] = counts.get(id(obj.storage), 0) + 1
        return
    seen.add(id(obj))
    if isinstance(obj, Mapping):
        for v in obj.values():
            _count_storages(v, seen, counts, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _count_storages(v, seen, counts, depth + 1)
    elif isinstance(obj, Inert):
        for v in (obj.state, obj.args, obj.items, obj.entries):
            _count_storages(v, seen, counts, depth + 1)
        if getattr(obj, "meta", None):
            _count_storages(obj.meta.get("state"), seen, counts, depth + 1)


def classify_globals(globals_: Mapping[tuple[str, str], int]) -> tuple[list[dict[str, Any]], list[str]]:
    """(one entry per global: name, count, kind, why; warnings for the dangerous ones)."""
    from neon_cli.checkpoint.core import DTYPES
    from neon_cli.checkpoint.unpickler import TENSOR_GLOBALS, danger

    out, warnings = [], []
    for (m, n), c in sorted(globals_.items()):
        why = danger(m, n)
        if why:
            kind = "dangerous"
            shown = why[len("runs "):] if why.startswith("runs ") else None
            warnings.append(f"this file would run {shown} on load" if shown else f"this file would {why} on load")
        elif (m, n) in TENSOR_GLOBALS or (m == "torch" and (n.endswith("Storage") or n in DTYPES)):
            kind = "tensor"
        else:
            kind = "class"
            why = f"imports {m} and builds {n} objects (runs that module's code)"
        out.append({"name": f"{m}.{n}", "count": c, "kind": kind, "why": why})
    return out, sorted(set(warnings))


def inspect_checkpoint(request: InspectRequest, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Describe a checkpoint without running any of it (see module doc); fills ``report``.

    ``request``: a :class:`neon_cli.requests.InspectRequest`: ``checkpoint``, any file or folder
    ``neon merge`` reads; ``key``: check that ``--key KEY`` finds the weights (CheckpointError
    naming what is there otherwise); ``report``: the ``--report`` path (UsageError when it is the
    checkpoint). Returns ``{"path", "encoding",
    "bytes", "tree", "weights", "globals", "warnings", "components"}``; ``weights`` is None (with
    ``weights_error``) when merge would find no state dict. Raises CheckpointError for a file
    that cannot be parsed at all (truncated, unsupported opcode), naming the file.
    Source: issue 13 item 4.
    """
    from neon_cli.checkpoint import components, detect_layout, weights_file
    from neon_cli.fsutil import check_outputs

    p, key = Path(request.validate().checkpoint), request.key
    check_outputs({"CHECKPOINT": p}, {"--report": request.report})
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    progress("inspect", 0, 1, unit="file")
    if p.is_dir() and weights_file(p) is None:
        comps = components(p)
        if not comps:
            raise CheckpointError(f"{p}: a folder without weights")
        parts = {c: _inspect_one(weights_file(p / c), key) for c in comps}  # type: ignore[arg-type]
        res = {"path": str(p), "encoding": "folder", "components": parts,
               "warnings": sorted({w for r in parts.values() for w in r["warnings"]})}
    else:
        target = weights_file(p) if p.is_dir() else p
        res = _inspect_one(target, key)  # type: ignore[arg-type]
        res["layout"] = detect_layout(target)  # type: ignore[arg-type]
    report.add_input("checkpoint", p, None)
    report.results.update(res)
    progress("inspect", 1, 1, unit="file")
    return report.results


def _inspect_one(p: Path, key: str | None) -> dict[str, Any]:
    from neon_cli.checkpoint import detect_layout, open_checkpoint
    from neon_cli.checkpoint.core import find_state_dict

    layout = detect_layout(p)
    res: dict[str, Any] = {"path": str(p), "bytes": p.stat().st_size if p.is_file() else None}
    if layout in ("safetensors", "sharded"):
        with open_checkpoint(p, key=key) as ck:
            res["encoding"] = ck.encoding
            res["tree"] = {"type": "safetensors", "metadata": ck.metadata,
                           "tensors": {ck.raw_name(n): {"shape": list(s.shape), "dtype": s.dtype, "bytes": s.nbytes}
                                       for n, s in list(ck.specs.items())[:MAX_ENTRIES * 4]}}
            res["weights"] = {"key": ck.key, "prefix": ck.prefix, "tensors": len(ck.specs), "bytes": ck.total_bytes(), "alternatives": []}
            res["globals"], res["warnings"] = [], []
            parts = getattr(ck, "bin_parts", None) or []  # pytorch_model.bin.index.json: each shard is a pickle
            if parts:
                res["globals"], _ = classify_globals(ck.globals)
                res["shards"] = {}
                for part in parts:
                    name = Path(part.path).name
                    gl, warns = classify_globals(part.globals)
                    res["shards"][name] = {"globals": gl, "warnings": warns}
                    res["warnings"] += [f"{w} (shard {name})" for w in warns]
        return res
    from neon_cli.checkpoint.torchfile import read_container

    enc, buf, parsed = read_container(p)
    try:
        res["encoding"] = enc
        counts: dict[int, int] = {}
        _count_storages(parsed.obj, set(), counts)
        res["tree"] = _tree(parsed.obj, 0, counts, "", {})
        res["storages"] = {"count": len(parsed.storages), "shared": sum(1 for c in counts.values() if c > 1)}
        try:
            where, sd, alts, notes = find_state_dict(p, parsed.obj, None, key)
            tensors = {k: v for k, v in sd.items()}
            res["weights"] = {"key": where, "alternatives": alts, "tensors": len(tensors), "notes": notes,
                              "bytes": sum(v.numel * _isize(v.dtype) for v in tensors.values() if hasattr(v, "numel"))}
        except CheckpointError as exc:
            if key is not None:  # --key names nothing there: an error (exit 2), not "no weights found"
                raise
            res["weights"] = None
            res["weights_error"] = str(exc)
        res["globals"], res["warnings"] = classify_globals(parsed.globals)
        if parsed.persistent:
            res["persistent_objects"] = sorted({o.class_name for o in parsed.persistent})
    finally:
        buf.close()
    return res
