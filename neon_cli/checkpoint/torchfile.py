"""Torch checkpoints of every encoding behind one reader, and the patched copy that writes them.

Encodings (:func:`encoding_of`): ``"zip"`` (:mod:`~neon_cli.checkpoint.torch_zip`), ``"legacy"``
(a legacy ``torch.save`` stream) and ``"pickle"`` (a plain pickle, :mod:`~neon_cli.checkpoint.legacy`).
All are read with the inert unpickler (no code of the file runs, nothing is imported) and
memory-mapped: a tensor is a numpy view of the file.

The weights are found in the container as :func:`neon_cli.checkpoint.core.find_state_dict` says
(``--key`` a dotted path through dicts, lists and objects' attributes: ``ema``, ``model_ema``,
``trainer.var_wo_ddp``, ``net.model``); an ``nn.Module`` (or EDM persistence object) yields the
keys of ``module.state_dict()``.

Writing (:class:`PatchedCopy`): the output is θ_r's file byte for byte except the elements of
the merged tensors, written in place of θ_r's (same offsets, same length), so the output has
θ_r's container, classes, embedded source and storage sharing, and loads in the original code
exactly as θ_r did. Zip archives get their CRC-32 fields recomputed.
"""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from neon_cli.checkpoint.core import DTYPES, Checkpoint, TensorSpec, common_prefix, find_state_dict, one_line
from neon_cli.checkpoint.legacy import MAGIC_PREFIX, LegacyResult, read_legacy, read_plain_pickle
from neon_cli.checkpoint.unpickler import TensorRef, danger
from neon_cli.errors import CheckpointError


def _map(path: Path) -> Any:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror or exc})") from None
    try:
        if os.fstat(fd).st_size == 0:
            raise CheckpointError(f"{path}: empty file")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def encoding_of(path: Path, buf: Any) -> str:
    """``"zip"``, ``"legacy"`` or ``"pickle"`` from the file's bytes; CheckpointError otherwise."""
    from neon_cli.checkpoint.torch_zip import is_zip

    head = bytes(buf[:len(MAGIC_PREFIX)])
    if head.startswith(b"PK\x03\x04") or (is_zip(path) and not head.startswith(b"\x80")):
        return "zip"
    if head == MAGIC_PREFIX:
        return "legacy"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:1] in (b"(", b"}", b"]", b"c", b"I", b"N"):  # protocol 0/1 pickles start with a plain opcode
        return "pickle"
    if head.startswith(b"\x1f\x8b") or bytes(buf[257:262]) == b"ustar":
        raise CheckpointError(f"{path}: a tar/gzip archive (torch < 0.4 format?); not supported")
    raise CheckpointError(f"{path}: not a torch checkpoint or pickle (unrecognised first bytes {head[:4].hex()})")


class TorchCheckpoint(Checkpoint):
    """A torch zip / legacy / plain-pickle checkpoint read inertly (see module doc).

    Besides the :class:`~neon_cli.checkpoint.core.Checkpoint` fields: ``container`` (the inert
    object tree), ``entries`` (stored key -> :class:`~neon_cli.checkpoint.unpickler.TensorRef`),
    ``globals`` ({(module, name): count} of every global the file names, nested payloads
    included), ``persistent`` (EDM persistence objects), ``storages`` (key -> StorageRef).
    """

    globals: dict[tuple[str, str], int]
    persistent: list[Any]
    storages: dict[str, Any]
    protocol: int

    def _array(self, raw: str) -> np.ndarray:
        ref = self.entries[raw]
        return tensor_view(self._maps["file"], ref)

    def dangers(self) -> list[str]:
        """What a normal load of this file would run besides rebuilding tensors (``danger``)."""
        out = []
        for (m, n) in self.globals:
            d = danger(m, n)
            if d:
                out.append(d)
        return sorted(set(out))


def storage_array(buf: Any, st: Any) -> np.ndarray:
    """The elements of storage ``st`` as a read-only numpy array of bits (bfloat16 as uint16)."""
    info = DTYPES[st.dtype]
    data = getattr(st, "inline", None)
    src = data if (data is not None and st.source == "inline") else buf
    if st.offset is None:
        raise CheckpointError(f"{st.source}: storage {st.key} has no data")
    return np.frombuffer(src, dtype=np.dtype(info.numpy), count=st.numel, offset=st.offset)


def tensor_view(buf: Any, ref: TensorRef) -> np.ndarray:
    """Tensor ``ref`` as a (possibly strided) read-only numpy view of its storage's bits."""
    arr = storage_array(buf, ref.storage)
    size = arr.itemsize
    if ref.numel == 0:
        return np.zeros(ref.shape, dtype=arr.dtype)
    view = np.lib.stride_tricks.as_strided(arr[ref.offset:], shape=ref.shape, strides=tuple(s * size for s in ref.stride), writeable=False)
    return view


def read_container(path: Path) -> tuple[str, Any, LegacyResult]:
    """(encoding, mmap, parse result) of a torch file."""
    buf = _map(path)
    try:
        enc = encoding_of(path, buf)
        if enc == "zip":
            from neon_cli.checkpoint.torch_zip import read_zip

            res, zf = read_zip(path, buf)
            zf.close()
        elif enc == "legacy":
            res = read_legacy(buf, 0, len(buf), str(path), str(path))
            if res.end != len(buf):
                raise CheckpointError(f"{path}: {len(buf) - res.end} bytes after the end of the torch.save stream")
        else:
            res = read_plain_pickle(buf, str(path), str(path))
    except BaseException:
        buf.close()
        raise
    return enc, buf, res


def open_torch(path: Path, key: str | None = None, prefer_key: str | None = None, key_optional: bool = False) -> TorchCheckpoint:
    """Open a torch zip / legacy / pickle checkpoint inertly and locate its weights.

    Raises CheckpointError naming the file: unreadable, truncated, a storage size mismatch, an
    unsupported opcode, no state dict found (or several and no ``key``), a key naming no entry.
    """
    enc, buf, res = read_container(path)
    try:
        where, sd, alternatives, notes = find_state_dict(path, res.obj, prefer_key, key, key_optional)
        bad = [k for k in sd if not isinstance(k, str)]
        if bad:
            raise CheckpointError(f"{path}: state dict key {bad[0]!r} is not a string")
        for k, v in sd.items():
            if not isinstance(v, TensorRef):
                raise CheckpointError(f"{path}: entry {k!r} of the state dict is not a tensor")
            if DTYPES[v.dtype].kind == "c":
                pass  # refused by merge with the key named
        prefix = common_prefix(list(sd))
        n = len(prefix)
        layout = "pickle" if enc == "pickle" else "torch"
        ck = TorchCheckpoint(path=path, layout=layout, specs={k[n:]: TensorSpec(k[n:], v.dtype, v.shape) for k, v in sd.items()},
                             prefix=prefix, key=where, alternatives=alternatives, container=res.obj, files=[path], encoding=enc)
        ck.entries = dict(sd)
        ck.notes.extend(notes)
        ck.globals = res.globals
        ck.persistent = res.persistent
        ck.storages = res.storages
        ck.protocol = res.protocol
        ck._maps["file"] = buf
        if isinstance(res.obj, dict) and where is None:
            ck.non_tensors = {k: v for k, v in res.obj.items() if not isinstance(v, TensorRef)}
    except BaseException:
        buf.close()
        raise
    return ck


# ----------------------------------------------------------------------------------------------
# writing: θ_r's file with merged tensor elements replaced


def check_disjoint(ck: TorchCheckpoint, merged: Iterable[str], copied: Iterable[str]) -> None:
    """Refuse a merge whose merged and copied tensors share storage elements (one rule per element).

    Tensors that view the same elements with the same rule (tied weights) are fine.
    CheckpointError naming both keys otherwise.
    """
    spans: dict[int, list[tuple[int, int, str, bool]]] = {}
    for raw, is_merged in [(r, True) for r in merged] + [(r, False) for r in copied]:
        ref = ck.entries.get(raw)
        if ref is None:
            continue
        lo, hi = ref.extent()
        if hi > lo:
            spans.setdefault(id(ref.storage), []).append((lo, hi, raw, is_merged))
    for items in spans.values():
        if len({m for *_, m in items}) < 2:
            continue
        items.sort()
        for (a0, a1, an, am), (b0, b1, bn, bm) in zip(items, items[1:]):
            if b0 < a1 and am != bm:
                m, c = (an, bn) if am else (bn, an)
                raise CheckpointError(
                    f"{ck.path}: tensors {m!r} (merged) and {c!r} (copied from the base) share storage elements; "
                    "exclude both or neither (--exclude)"
                )


class PatchedCopy:
    """θ_r's file ``ck.path`` copied to ``out``, with tensor elements to be replaced in place.

    :meth:`view` gives a writable numpy view (bits dtype, θ_r's strides) of a tensor of the
    output, into which the caller writes merged values (row block by row block); :meth:`close`
    flushes, fixes the zip CRCs of changed storages and fsyncs. Storages shared by several
    tensors stay shared (they are one region of the file). CheckpointError for a protocol-2
    pickle whose storages are latin-1 text (their length would change).
    """

    def __init__(self, ck: TorchCheckpoint, out: Path):
        if any(getattr(st, "inline", None) is not None for st in ck.storages.values()):
            raise CheckpointError(f"{ck.path}: a protocol-2 pickle (storages as latin-1 text); write the merge to .safetensors instead")
        self.ck, self.out = ck, Path(out)
        self.changed: set[str] = set()
        self._maps: dict[str, Any] = {}
        parts = getattr(ck, "bin_parts", None)
        if parts:
            raise CheckpointError(f"{ck.path}: sharded .bin checkpoints are written as sharded safetensors; give a folder -o")
        shutil.copyfile(ck.path, self.out)
        fd = os.open(self.out, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_WRITE)
        finally:
            os.close(fd)

    def view(self, raw: str) -> np.ndarray:
        ref = self.ck.entries[raw]
        st = ref.storage
        if st.member:
            self.changed.add(st.member)
        info = DTYPES[st.dtype]
        arr = np.frombuffer(self._mm, dtype=np.dtype(info.numpy), count=st.numel, offset=st.offset)
        if ref.numel == 0:
            return np.zeros(ref.shape, dtype=arr.dtype)
        return np.lib.stride_tricks.as_strided(arr[ref.offset:], shape=ref.shape, strides=tuple(s * arr.itemsize for s in ref.stride))

    def close(self) -> None:
        import gc

        self._mm.flush()
        gc.collect()  # views handed out are gone once the caller dropped them
        try:
            self._mm.close()
        except BufferError:
            pass
        if self.changed:
            from neon_cli.checkpoint.torch_zip import fix_crcs

            fix_crcs(self.out, self.changed)
        with open(self.out, "rb") as fh:
            os.fsync(fh.fileno())

    def abort(self) -> None:
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass


def describe_error(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: {one_line(exc)}")
