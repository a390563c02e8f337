"""The torch zip archive (``torch.save`` since torch 1.6), read inertly and patched in place.

Layout (pytorch ``PyTorchStreamWriter``): a zip of stored (uncompressed) members under one
folder ``ARCHIVE/``: ``data.pkl`` (the object pickle, storages as persistent ids
``('storage', torch.<X>Storage or dtype, key, location, numel)``), ``data/KEY`` (each storage's
raw little-endian bytes, 64-byte aligned), ``byteorder``, ``version``, ``.format_version``,
``.storage_alignment``, ``.data/serialization_id``. The central directory is read with
:mod:`zipfile`; a member's data starts after its local header (30 bytes + name + extra field).

Writing (:func:`fix_crcs`): the output is θ_r's archive byte for byte except the bytes of merged
storages; the CRC-32 of each changed member is recomputed and written where the archive keeps
it (local header unless a data descriptor is used, the data descriptor, the central directory),
so ``zipfile`` and ``unzip -t`` accept the output and ``torch.load`` reads it as it read θ_r.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from neon_cli.checkpoint.core import DTYPES, one_line
from neon_cli.checkpoint.legacy import LegacyResult, load_payload
from neon_cli.checkpoint.unpickler import InertUnpickler, StorageRef, scan, skeleton, storage_pid
from neon_cli.errors import CheckpointError


def is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _data_offset(buf: Any, info: zipfile.ZipInfo, where: str) -> int:
    h = info.header_offset
    if h + 30 > len(buf) or bytes(buf[h:h + 4]) != b"PK\x03\x04":
        raise CheckpointError(f"{where}: zip member {info.filename} has no local header (truncated or corrupt archive)")
    n, e = struct.unpack("<HH", bytes(buf[h + 26:h + 30]))
    return h + 30 + n + e


def read_zip(path: Path, buf: Any) -> tuple[LegacyResult, zipfile.ZipFile]:
    """The object tree of a torch zip archive with every storage located in the file."""
    where = str(path)
    try:
        zf = zipfile.ZipFile(path)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a readable zip archive, truncated or corrupt ({one_line(exc)})") from None
    pkls = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if len(pkls) != 1:
        raise CheckpointError(f"{where}: a zip archive without exactly one data.pkl (not a torch.save file)")
    root = pkls[0].filename[: -len("data.pkl")]
    by_name = {i.filename: i for i in infos}
    bo = by_name.get(root + "byteorder")
    if bo is not None:
        try:
            order = zf.read(bo).decode().strip()
        except Exception as exc:
            raise CheckpointError(f"{where}: unreadable byteorder record ({one_line(exc)})") from None
        if order != "little":
            raise CheckpointError(f"{where}: a {order}-endian archive; not supported")
    info = pkls[0]
    if info.compress_type != zipfile.ZIP_STORED:
        data_pkl = zf.read(info)
        base, start = data_pkl, 0
    else:
        start = _data_offset(buf, info, where)
        if start + info.file_size > len(buf):
            raise CheckpointError(f"{where}: truncated: data.pkl runs past the end of the file")
        base = buf
    sc = scan(base, start, where=where)
    skel, marks = skeleton(base, sc)
    storages: dict[str, StorageRef] = {}
    res = LegacyResult()
    nested: list[LegacyResult] = []

    def persistent_load(pid: Any) -> Any:
        dtype, key, location, numel, _ = storage_pid(pid, where)
        st = storages.get(key)
        if st is not None:
            return st
        name = f"{root}data/{key}"
        mi = by_name.get(name)
        if mi is None:
            raise CheckpointError(f"{where}: storage {key} has no record {name} in the archive")
        if mi.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{where}: storage {key} is compressed in the archive; not supported")
        need = numel * DTYPES[dtype].itemsize
        if mi.file_size != need:
            raise CheckpointError(
                f"{where}: storage {key} has {mi.file_size} bytes in the archive but its record says {numel} elements of "
                f"{dtype} ({need} bytes): a storage size mismatch"
            )
        off = _data_offset(buf, mi, where)
        if off + need > len(buf):
            raise CheckpointError(f"{where}: truncated: storage {key} runs past the end of the file")
        st = storages[key] = StorageRef(key, dtype, numel, location, offset=off, member=name, source=where)
        return st

    def load_from_bytes(payload: Any) -> Any:
        r = load_payload(buf, payload, where, where)
        nested.append(r)
        return r.obj

    up = InertUnpickler(skel, where=where, persistent_load=persistent_load, load_from_bytes=load_from_bytes, placeholders=marks, protocol=sc.protocol)
    res.obj = up.load()
    res.protocol = sc.protocol
    res.globals = dict(up.globals)
    res.persistent = list(up.persistent)
    for i, r in enumerate(nested):
        for g, c in r.globals.items():
            res.globals[g] = res.globals.get(g, 0) + c
        for key, st in r.storages.items():
            storages[f"nested{i}:{key}"] = st
    res.storages = storages
    return res, zf


def fix_crcs(path: Path, members: set[str]) -> None:
    """Recompute the CRC-32 of ``members`` of the zip at ``path`` (data changed in place, sizes
    unchanged) and write it to the local header, data descriptor and central directory."""
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist() if i.filename in members}
        cd_offset = zf.start_dir
    with open(path, "r+b") as fh:
        # central directory entries, in order
        fh.seek(cd_offset)
        cd_pos: dict[str, int] = {}
        pos = cd_offset
        while True:
            fh.seek(pos)
            head = fh.read(46)
            if len(head) < 46 or head[:4] != b"PK\x01\x02":
                break
            n, e, c = struct.unpack("<HHH", head[28:34])
            name = fh.read(n).decode("utf-8", "replace")
            cd_pos[name] = pos
            pos += 46 + n + e + c
        for name, info in infos.items():
            fh.seek(info.header_offset)
            local = fh.read(30)
            n, e = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + n + e
            fh.seek(start)
            crc = 0
            left = info.file_size
            while left:
                block = fh.read(min(left, 1 << 22))
                if not block:
                    raise CheckpointError(f"{path}: truncated member {name}")
                crc = zlib.crc32(block, crc)
                left -= len(block)
            packed = struct.pack("<I", crc & 0xFFFFFFFF)
            flags = struct.unpack("<H", local[6:8])[0]
            if flags & 0x08:  # a data descriptor follows the data: [signature] crc csize usize
                fh.seek(start + info.compress_size)
                sig = fh.read(4)
                fh.seek(start + info.compress_size + (4 if sig == b"PK\x07\x08" else 0))
                fh.write(packed)
                if struct.unpack("<I", local[14:18])[0]:
                    fh.seek(info.header_offset + 14)
                    fh.write(packed)
            else:
                fh.seek(info.header_offset + 14)
                fh.write(packed)
            if name in cd_pos:
                fh.seek(cd_pos[name] + 16)
                fh.write(packed)
