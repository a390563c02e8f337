"""The legacy ``torch.save`` stream (``_use_new_zipfile_serialization=False``, and the nested
``torch.storage._load_from_bytes`` payloads of plain pickles) and plain pickle files (``.pkl``:
EDM/StyleGAN network snapshots, ``pickle.dump`` of modules), read inertly.

A legacy stream is (pytorch ``torch/serialization.py``, ``_legacy_save``):

1. ``pickle(MAGIC_NUMBER = 0x1950a86a20f9469cfc6c)``, ``pickle(PROTOCOL_VERSION = 1001)``,
   ``pickle(sys_info)`` (a dict with ``little_endian``);
2. the object pickle, whose storages appear as persistent ids
   ``('storage', torch.<X>Storage, key, location, numel[, view_metadata])``;
3. ``pickle(sorted storage keys)``;
4. per key, an 8-byte little-endian element count followed by the raw little-endian data.

A plain pickle stores each tensor's storage as ``torch.storage._load_from_bytes(b)`` where ``b``
is such a legacy stream in a BINBYTES payload (protocol >= 3) or ``_codecs.encode(str, "latin1")``
(protocol 2). Both are parsed here into :class:`~neon_cli.checkpoint.unpickler.StorageRef` s
that point into the file, so tensor data is memory-mapped, never loaded, and a merged output is
θ_r's file with each merged storage's bytes replaced by bytes of equal length
(:class:`neon_cli.checkpoint.torchfile.PatchedCopy`).
"""

from __future__ import annotations

from typing import Any

from neon_cli.checkpoint.unpickler import (
    InertUnpickler,
    Payload,
    StorageRef,
    scan,
    skeleton,
    storage_pid,
    unpack_u64,
)
from neon_cli.errors import CheckpointError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
#: How a legacy stream begins: the pickle of MAGIC_NUMBER (protocol 2).
MAGIC_PREFIX = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e"


def _small_pickle(buf: Any, pos: int, where: str, what: str) -> tuple[Any, int]:
    sc = scan(buf, pos, where=where)
    data, marks = skeleton(buf, sc)
    up = InertUnpickler(data, where=where, placeholders=marks, protocol=sc.protocol)
    try:
        value = up.load()
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (reading the {what})") from None
    return value, sc.end


class LegacyResult:
    """What :func:`read_legacy` found: the object, its storages (key -> StorageRef), the end
    offset, the globals named and the persistence objects met (main pickle and nested ones)."""

    def __init__(self) -> None:
        self.obj: Any = None
        self.storages: dict[str, StorageRef] = {}
        self.end = 0
        self.globals: dict[tuple[str, str], int] = {}
        self.persistent: list[Any] = []
        self.protocol = 0


def read_legacy(buf: Any, start: int, end: int, where: str, source: str, inline: bool = False) -> LegacyResult:
    """Parse the legacy stream ``buf[start:end]`` (see module doc) without running its code.

    ``inline``: ``buf`` is a bytes object of its own (a protocol-2 payload) rather than the file,
    so storage offsets are into ``buf`` (recorded in ``StorageRef.source`` as ``"inline"``).
    Raises CheckpointError naming ``where`` for a wrong magic number or protocol, a big-endian
    file, a truncated stream or a storage whose size disagrees with its record.
    """
    res = LegacyResult()
    magic, pos = _small_pickle(buf, start, where, "magic number")
    if magic != MAGIC_NUMBER:
        raise CheckpointError(f"{where}: not a torch.save stream (wrong magic number)")
    proto, pos = _small_pickle(buf, pos, where, "protocol version")
    if proto != PROTOCOL_VERSION:
        raise CheckpointError(f"{where}: torch.save protocol {proto!r}, expected {PROTOCOL_VERSION}")
    info, pos = _small_pickle(buf, pos, where, "system info")
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise CheckpointError(f"{where}: a big-endian torch.save stream; not supported")
    storages: dict[str, StorageRef] = {}

    def persistent_load(pid: Any) -> Any:
        dtype, key, location, numel, view = storage_pid(pid, where)
        st = storages.get(key)
        if st is None:
            st = storages[key] = StorageRef(key, dtype, numel, location, source="inline" if inline else source)
        elif st.dtype != dtype and st.numel * _size(st.dtype) != numel * _size(dtype):
            raise CheckpointError(f"{where}: storage {key} recorded with two different sizes")
        if view is not None:
            raise CheckpointError(f"{where}: storage views of torch < 1.0 (storage {key}) are not supported")
        return st

    sc = scan(buf, pos, where=where)
    data, marks = skeleton(buf, sc)
    nested: list[LegacyResult] = []

    def load_from_bytes(payload: Any) -> Any:
        r = load_payload(buf, payload, where, source)
        nested.append(r)
        return r.obj

    up = InertUnpickler(data, where=where, persistent_load=persistent_load, load_from_bytes=load_from_bytes, placeholders=marks, protocol=sc.protocol)
    res.obj = up.load()
    res.protocol = sc.protocol
    res.globals = dict(up.globals)
    res.persistent = list(up.persistent)
    for r in nested:
        for g, c in r.globals.items():
            res.globals[g] = res.globals.get(g, 0) + c
        res.persistent.extend(r.persistent)
    keys, pos = _small_pickle(buf, sc.end, where, "storage keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{where}: the storage key list is not a list of strings")
    if set(keys) != set(storages):
        missing = sorted(set(storages) - set(keys))
        raise CheckpointError(f"{where}: storage {(missing or sorted(set(keys) - set(storages)))[0]} is listed but has no data record")
    for key in keys:
        st = storages[key]
        count = unpack_u64(buf, pos, where)
        nbytes = st.numel * _size(st.dtype)
        if count * _size(st.dtype) != nbytes:
            raise CheckpointError(
                f"{where}: storage {key} has {count} elements in the file but {st.numel} in its record (a storage size mismatch)"
            )
        pos += 8
        if pos + nbytes > end:
            raise CheckpointError(f"{where}: truncated: storage {key} needs bytes {pos}..{pos + nbytes} but the stream ends at {end}")
        st.offset = pos
        pos += nbytes
    res.storages = storages
    res.end = pos
    return res


def _size(dtype: str) -> int:
    from neon_cli.checkpoint.core import DTYPES

    return DTYPES[dtype].itemsize


def load_payload(buf: Any, payload: Any, where: str, source: str) -> LegacyResult:
    """A ``_load_from_bytes`` argument: a :class:`Payload` in the file, or bytes (protocol 2)."""
    if isinstance(payload, Payload):
        r = read_legacy(buf, payload.offset, payload.offset + payload.length, where, source)
        if r.end != payload.offset + payload.length:
            raise CheckpointError(f"{where}: a nested storage record at byte {payload.offset} has {payload.offset + payload.length - r.end} trailing bytes")
    elif isinstance(payload, (bytes, bytearray)):
        data = bytes(payload)
        r = read_legacy(data, 0, len(data), where, source, inline=True)
        for st in r.storages.values():
            st.inline = data  # type: ignore[attr-defined]
    else:
        raise CheckpointError(f"{where}: torch.storage._load_from_bytes of a {type(payload).__name__}")
    return r


def read_plain_pickle(buf: Any, where: str, source: str) -> LegacyResult:
    """A plain pickle file (``pickle.dump``): its object tree with every storage located in the file."""
    res = LegacyResult()
    sc = scan(buf, 0, where=where)
    data, marks = skeleton(buf, sc)
    nested: list[LegacyResult] = []

    def load_from_bytes(payload: Any) -> Any:
        r = load_payload(buf, payload, where, source)
        nested.append(r)
        return r.obj

    up = InertUnpickler(data, where=where, load_from_bytes=load_from_bytes, placeholders=marks, protocol=sc.protocol)
    res.obj = up.load()
    res.protocol = sc.protocol
    res.globals = dict(up.globals)
    res.persistent = list(up.persistent)
    for i, r in enumerate(nested):
        for g, c in r.globals.items():
            res.globals[g] = res.globals.get(g, 0) + c
        res.persistent.extend(r.persistent)
        for key, st in r.storages.items():
            res.storages[f"{i}:{key}"] = st
    res.end = sc.end
    return res
