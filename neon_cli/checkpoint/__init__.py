"""Checkpoint I/O: one :class:`Checkpoint` interface over every encoding, read without running code.

One module per encoding, all behind :func:`open_checkpoint`:

* :mod:`~neon_cli.checkpoint.safetensors_io` -- ``.safetensors`` (own header check, numpy
  memory map; no torch) and the streaming writer;
* :mod:`~neon_cli.checkpoint.sharded` -- sharded folders (Hugging Face
  ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` and the diffusers
  ``diffusion_pytorch_model.*`` names), with the folder layouts of :mod:`~neon_cli.checkpoint.folders`;
* :mod:`~neon_cli.checkpoint.torch_zip` -- ``torch.save`` zip archives;
* :mod:`~neon_cli.checkpoint.legacy` -- legacy ``torch.save`` streams and plain pickles (EDM ``.pkl``);
* :mod:`~neon_cli.checkpoint.unpickler` -- the inert unpickler they share (an allowlist of tensor
  rebuilders; everything else becomes a stand-in: no code of the file ever runs);
* :mod:`~neon_cli.checkpoint.torchfile` -- the torch reader and the patched-copy writer.

Tensors are numpy views of the mapped files (bfloat16 as uint16 bits); :meth:`Checkpoint.tensor`
gives torch tensors to callers that have torch. Every error is a
:class:`~neon_cli.errors.CheckpointError` whose one-line message names the file and the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from neon_cli.checkpoint.core import (
    DTYPE_NAMES,
    DTYPES,
    SAFETENSORS_DTYPES,
    STATE_DICT_KEYS,
    WRAPPER_PREFIXES,
    Checkpoint,
    TensorSpec,
    dtype_info,
    dtype_name,
    human_bytes,
    is_floating,
    itemsize,
    module_state_dict,
    parse_dtype,
    parse_size,
    resolve_key,
)
from neon_cli.checkpoint.folders import INDEX_NAMES, WEIGHT_NAMES, components, is_weight_file, read_index, weights_file
from neon_cli.checkpoint.safetensors_io import (
    SafetensorsCheckpoint,
    SafetensorsWriter,
    open_safetensors,
    read_safetensors,
    read_safetensors_metadata,
    safetensors_header,
    safetensors_order,
    save_safetensors,
)
from neon_cli.errors import CheckpointError, UsageError

TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".tar"})
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle"})
SAFETENSORS_SUFFIX = ".safetensors"
#: Elements per row block when a tensor is merged piecewise: 128 Ki elements keep every float32
#: temporary of a block in the L2 cache (measured fastest on 2 cores, benchmarks/merge.py).
CHUNK_ELEMENTS = 1 << 17

__all__ = [
    "CHUNK_ELEMENTS", "Checkpoint", "CheckpointError", "SafetensorsCheckpoint", "DTYPES", "DTYPE_NAMES", "INDEX_NAMES", "PICKLE_SUFFIXES",
    "SAFETENSORS_DTYPES", "SAFETENSORS_SUFFIX", "STATE_DICT_KEYS", "SafetensorsWriter", "TORCH_SUFFIXES", "TensorSpec",
    "UsageError", "WEIGHT_NAMES", "WRAPPER_PREFIXES", "components", "detect_layout", "dtype_info", "dtype_name", "human_bytes",
    "index_json", "is_floating", "is_weight_file", "itemsize", "module_state_dict", "open_checkpoint", "parse_dtype",
    "parse_size", "read_index", "read_safetensors", "read_safetensors_metadata", "resolve_key", "safetensors_header",
    "safetensors_order", "save_safetensors", "sha256_tree", "shard_file_names", "shard_layout", "weights_file",
]


def detect_layout(path: Path) -> str:
    """``"safetensors"``, ``"sharded"``, ``"torch"`` or ``"pickle"`` from the path name."""
    if path.is_dir() or path.name.lower().endswith(".index.json"):
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
    """Open ``path`` lazily and locate its state dict; only headers and pickles are read, and no
    code of the file runs (any encoding; ``trust_pickle`` is accepted and ignored).

    ``path``: a ``.safetensors`` file, a torch zip / legacy ``.pt``/``.pth``/``.bin``/``.ckpt``, a
    plain pickle ``.pkl``, a sharded index or a folder whose weights a loader would use
    (:func:`~neon_cli.checkpoint.folders.weights_file`). ``key``: dotted path of the state dict in
    a container (``--key``), or for safetensors a name prefix. ``prefer_key``: tried first when
    ``key`` is not given (the path found in θ_r). ``key_optional``: when ``key`` is not in the file
    but the file itself is a state dict, use the whole file (noted in ``notes``).
    Raises :class:`CheckpointError` naming the file for a missing, truncated or unreadable file,
    an unsupported pickle opcode, a storage size mismatch, or weights that cannot be found
    unambiguously.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        wf = weights_file(path)
        if wf is None:
            comps = components(path)
            if comps:
                raise CheckpointError(f"{path}: a folder of several models ({', '.join(comps)}); merge it as a folder (-o FOLDER) "
                                      "or give one component")
            raise CheckpointError(f"{path}: a folder without weights ({' / '.join(WEIGHT_NAMES[:2])}, ...)")
        path = wf
    layout = detect_layout(path)
    if layout == "safetensors":
        return open_safetensors(path, key, key_optional)
    if layout == "sharded":
        from neon_cli.checkpoint.sharded import open_index

        return open_index(path, key, key_optional)
    from neon_cli.checkpoint.torchfile import open_torch

    return open_torch(path, key, prefer_key, key_optional)


# ----------------------------------------------------------------------------------------------
# sharded output layout


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
    import hashlib

    from neon_cli.fsutil import sha256_file

    known = dict(known or {})
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest = known.get(f) or sha256_file(f)
        h.update(str(f.relative_to(root)).encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()
