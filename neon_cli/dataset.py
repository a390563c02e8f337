"""The synthetic set S read from its shards on demand, and the family's encoded copy of it.

``neon finetune`` at the paper's sizes cannot hold S in memory (|S| = 750k ImageNet images at
256 x 256 is 147 GB as uint8), so it reads each batch's rows from the shards:
:class:`SyntheticSet` parses every shard's safetensors header once (the format: an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and byte range, then
the data; https://github.com/huggingface/safetensors) and reads a row with one ``os.preadv``
straight into the batch tensor. Memory therefore does not grow with |S| (the only per-image state
is the data order, 4 bytes an image, see :class:`neon_cli.train.DataOrder`), and the rows come from
the page cache for a set that fits in it. ``safe_open(...).get_slice`` reads the same bytes but
costs about 65 us a row against 3 us here (measured on 8x8 rows), which matters at batch 256.

Encoding (optional family hook, see :class:`neon_cli.family.Family`): a family whose training
inputs are a fixed function of the images (VAR's frozen VQVAE tokens) declares
``encode_key(model, settings)`` and ``encode(model, images)``; :func:`encoded_set` computes them once
per image and keeps them beside S::

    S/encoded-<key>/shard-00000.safetensors   "data" [n, ...] = family.encode(model, images of shard 0)
    S/encoded-<key>/encoded.json              schema neon.encoded/1: key, source shards' sha256, counts

(or under the fine-tune's output folder when S is not writable). Each encoded shard records the
sha256 of the S shard it came from (read from S's manifest, not recomputed) and is written under a
temporary name and renamed when complete: an interrupted run re-encodes only what is missing, and
a shard whose source changed is re-encoded. Under torchrun, shard k is encoded by rank
``k % world_size``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from neon_cli.errors import DataError
from neon_cli.progress import ProgressFn, null_progress

ENCODED_SCHEMA = "neon.encoded/1"
#: open shard files kept per tensor
MAX_OPEN = 128
#: a shard's rows are read as one span (not one call per row) when at least this many are asked ...
SPAN_MIN_ROWS = 8
#: ... and the span costs at most this many bytes per row asked ...
SPAN_BYTES_PER_ROW = 16 << 10
#: ... or is at most this long in all (one read from the page cache beats a call per row)
SMALL_SPAN = 64 << 10
SYNTH_SCHEMA = "neon.synth/1"


@dataclass(frozen=True)
class _Piece:
    """One shard's copy of a tensor: rows ``start .. start+count-1`` of the set."""

    path: Path
    start: int
    count: int
    offset: int  # byte offset of row 0 in the file
    row_bytes: int


def _header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(header dict, data start, file size) of a safetensors file; DataError naming it if unreadable."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except RecursionError:
        raise DataError(f"--data: {path}: unreadable shard (header is JSON nested too deep)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"--data: {path}: unreadable shard ({exc})") from None
    return header, 8 + n, size


class _Files:
    """Open read-only descriptors by path, least recently opened closed first beyond ``cap``
    (a quarter of the soft RLIMIT_NOFILE, at least 64). Shared by the tensors of one set."""

    def __init__(self) -> None:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.cap = max(64, (soft if soft > 0 else 1024) // 4)
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            if len(self.fds) >= self.cap:
                os.close(self.fds.pop(next(iter(self.fds))))
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"--data: {path}: {exc.strerror}") from None
            self.fds[path] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class ShardedTensor:
    """Rows of one tensor stored across shard files (each holding a contiguous block of rows)."""

    def __init__(self, pieces: Sequence[_Piece], row_shape: tuple[int, ...], dtype: torch.dtype,
                 files: _Files | None = None):
        self.pieces = list(pieces)
        self.row_shape = row_shape
        self.dtype = dtype
        self.starts = [p.start for p in self.pieces]
        self.paths = [str(p.path) for p in self.pieces]
        import numpy as np

        self._starts_np = np.asarray(self.starts, dtype=np.int64)
        self.files = files if files is not None else _Files()

    @classmethod
    def open(cls, files: Sequence[tuple[Path, int, int]], name: str, what: str = "--data",
             share: "ShardedTensor | None" = None) -> "ShardedTensor":
        """``files``: (path, first row, rows) per shard. Checks each header: the tensor is there,
        with ``rows`` rows, the same row shape and dtype in every shard, and its bytes inside the file.
        Raises DataError naming the file."""
        from neon_cli.checkpoint import SAFETENSORS_DTYPES
        from neon_cli.checkpoint.core import to_torch_dtype

        pieces, shape, dtype = [], None, None
        for path, start, count in files:
            header, data0, size = _header(path)
            entry = header.get(name)
            if not isinstance(entry, dict):
                raise DataError(f"{what}: {path} has no tensor {name!r}")
            dt_name = SAFETENSORS_DTYPES.get(str(entry.get("dtype")))
            dt = to_torch_dtype(dt_name) if dt_name else None
            shp = tuple(int(s) for s in entry.get("shape", ()))
            if dt is None or not shp:
                raise DataError(f"{what}: {path}: tensor {name!r} has dtype {entry.get('dtype')} shape {shp}")
            if shp[0] != count:
                raise DataError(f"{what}: {path} holds {shp[0]} images, manifest says {count}")
            if shape is None:
                shape, dtype = shp[1:], dt
            elif (shp[1:], dt) != (shape, dtype):
                raise DataError(f"{what}: {path}: {name!r} is {dt} {list(shp[1:])}, earlier shards {dtype} {list(shape)}")
            begin, end = (int(x) for x in entry["data_offsets"])
            row = (end - begin) // count if count else 0
            if data0 + end > size or row * count != end - begin:
                raise DataError(f"{what}: {path}: tensor {name!r} is truncated (unreadable shard)")
            pieces.append(_Piece(path, start, count, data0 + begin, row))
        if shape is None or dtype is None:
            raise DataError(f"{what}: the synthetic set lists no shards")
        return cls(pieces, shape, dtype, share.files if share is not None else None)

    def __len__(self) -> int:
        return sum(p.count for p in self.pieces)

    def _read(self, k: int, buf: Any, row: int) -> None:
        """Fill ``buf`` (a writable buffer) from piece ``k`` starting at its row ``row``."""
        piece = self.pieces[k]
        got = os.preadv(self.files.fd(self.paths[k]), [buf], piece.offset + row * piece.row_bytes)
        if got != memoryview(buf).nbytes:
            raise DataError(f"--data: {piece.path}: short read (file changed or truncated)")

    def plan(self, idx: Any) -> list[tuple[int, Any, Any]]:
        """How to read rows ``idx`` (int64): per piece touched, (piece, positions in the output,
        rows in the piece), numpy int64 sorted by row. Tensors with the same shard layout (the
        images and labels of S) share one plan."""
        import numpy as np

        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        which = np.searchsorted(self._starts_np, rows, side="right") - 1
        cuts = np.flatnonzero(np.diff(which)) + 1
        bounds = np.concatenate(([0], cuts, [len(rows)]))
        return [(int(which[a]), order[a:b], rows[a:b] - self._starts_np[which[a]])
                for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()) if b > a]

    def rows(self, idx: Any, plan: list[tuple[int, Any, Any]] | None = None) -> torch.Tensor:
        """Rows ``idx`` (int64 [b], any order, repeats allowed) as a new tensor [b, *row_shape].

        Per shard touched: when at least :data:`SPAN_MIN_ROWS` rows are asked and they are dense
        (their span costs at most :data:`SPAN_BYTES_PER_ROW` bytes per row asked, or is at most
        :data:`SMALL_SPAN`), one read of the span and an index into it; else one read per row,
        straight into the output. At most about ``b * SPAN_BYTES_PER_ROW`` bytes are held besides
        the output.
        """
        import numpy as np

        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        out = torch.empty((len(idx), *self.row_shape), dtype=self.dtype)
        if not out.numel():
            return out
        if int(idx.min()) < 0 or int(idx.max()) >= len(self):
            raise IndexError(f"row index out of range for a set of {len(self)}")
        flat = out.view(torch.uint8).numpy().reshape(len(idx), -1)
        rb = flat.shape[1]
        for k, pos, local in plan if plan is not None else self.plan(idx.numpy()):
            lo, hi = int(local[0]), int(local[-1]) + 1
            n = len(local)
            if n >= SPAN_MIN_ROWS and (hi - lo) * rb <= max(SMALL_SPAN, n * SPAN_BYTES_PER_ROW):
                buf = np.empty((hi - lo, rb), dtype=np.uint8)
                self._read(k, buf, lo)
                flat[pos] = buf[local - lo]
            else:
                for j, r in zip(pos.tolist(), local.tolist()):
                    self._read(k, flat[j], r)
        return out

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start .. stop-1`` (contiguous), read with one call per shard touched."""
        if start < 0 or stop > len(self) or stop < start:
            raise IndexError(f"rows {start}..{stop} out of range for a set of {len(self)}")
        out = torch.empty((stop - start, *self.row_shape), dtype=self.dtype)
        if not out.numel():
            return out
        view = out.view(torch.uint8).numpy().reshape(-1)
        pos = 0
        for k, piece in enumerate(self.pieces):
            a, b = max(start, piece.start), min(stop, piece.start + piece.count)
            if a >= b:
                continue
            nbytes = (b - a) * piece.row_bytes
            self._read(k, view[pos:pos + nbytes], a - piece.start)
            pos += nbytes
        return out

    def close(self) -> None:
        self.files.close()

    def __getstate__(self) -> dict[str, Any]:  # file descriptors are per process
        return {**self.__dict__, "files": _Files()}


class SyntheticSet:
    """A complete synthetic set (or its encoded copy), read batch by batch.

    ``len(s)`` images; :meth:`batch` gives (inputs [b, ...], labels int64 [b] or None) for int64
    indices; ``manifest`` is S's manifest; ``data_dir`` S's folder. ``inputs`` are the images of S
    or, for :func:`encoded_set`, the family's encoding of them, read from the shards for every
    batch. ``labels`` are held in memory in the smallest integer type that fits them (2 bytes an
    image for up to 32,768 classes): reading 8 bytes a row from the shards would double the read
    calls per batch for no saving worth having.
    """

    def __init__(self, data_dir: Path, manifest: dict[str, Any], inputs: ShardedTensor, labels: torch.Tensor | None):
        self.data_dir = Path(data_dir)
        self.manifest = manifest
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        return self.inputs.rows(idx), (self.labels[idx].to(torch.int64) if self.labels is not None else None)

    def close(self) -> None:
        self.inputs.close()


def _compact(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` in int16 / int32 when their values fit (they are returned as int64 per batch)."""
    if not len(labels) or labels.is_floating_point():
        return labels
    lo, hi = int(labels.min()), int(labels.max())
    for dt in (torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return labels.to(dt)
    return labels


class TensorSet:
    """An in-memory set with :class:`SyntheticSet`'s interface (base training scripts, tests)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.images[idx], (self.labels[idx] if self.labels is not None else None)


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """S's ``manifest.json``; DataError naming the folder when missing (an unfinished ``neon synth``:
    the message says to rerun it) or not a neon synthetic-set manifest."""
    data_dir = Path(data_dir)
    mf = data_dir / "manifest.json"
    if not mf.exists():
        hint = " (unfinished: rerun the same 'neon synth' command to complete it)" if (data_dir / "plan.json").exists() else ""
        raise DataError(f"--data: {data_dir} has no manifest.json{hint}")
    try:
        manifest = json.loads(mf.read_text())
    except RecursionError:
        raise DataError(f"--data: {mf}: unreadable (JSON nested too deep)") from None
    except (OSError, ValueError) as exc:
        what = "empty file, 0 bytes" if mf.is_file() and mf.stat().st_size == 0 else exc
        raise DataError(f"--data: {mf}: unreadable ({what})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SYNTH_SCHEMA:
        schema = manifest.get("schema") if isinstance(manifest, dict) else None
        raise DataError(f"--data: {mf} is not a neon synthetic-set manifest (schema {schema!r})")
    return manifest


def check_family(manifest: Mapping[str, Any], family: Any, data_dir: str | os.PathLike[str], flag: str = "--data") -> None:
    """Refuse a synthetic set made by another family (its manifest's ``family``, written by ``neon
    synth`` as the family's ``name``): DataError naming the folder and both families, before any
    sample is read (training digits on a gaussian set would otherwise fail deep inside the model).
    A manifest without ``family`` is accepted."""
    made_by = manifest.get("family")
    name = getattr(family, "name", None)
    if made_by and name and made_by != name:
        raise DataError(f"{flag}: {data_dir} is a synthetic set of family {made_by!r} (its manifest.json), "
                        f"not of {name!r}; give a set made by 'neon synth {name} ...'")


def _shard_files(data_dir: Path, manifest: Mapping[str, Any]) -> list[tuple[Path, int, int]]:
    files = []
    for sh in manifest.get("shards", []):
        f = data_dir / sh["file"]
        if not f.exists():
            raise DataError(f"--data: {f} listed in the manifest is missing")
        files.append((f, int(sh["start"]), int(sh["count"])))
    return files


def open_synthetic(data_dir: str | os.PathLike[str]) -> SyntheticSet:
    """The complete synthetic set in ``data_dir`` (``neon synth``'s layout), nothing read but the
    manifest and the shards' headers. Raises DataError naming the folder or file for a missing
    manifest (unfinished synth), a missing, unreadable or truncated shard, or an image count that
    differs from the manifest (shards are not re-hashed: that would read S twice)."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    files = _shard_files(data_dir, manifest)
    images = ShardedTensor.open(files, "images")
    labels = None
    if files and "labels" in _header(files[0][0])[0]:
        stored = ShardedTensor.open(files, "labels", share=images)
        labels = _compact(stored.block(0, len(stored)))
    return SyntheticSet(data_dir, manifest, images, labels)


def _key_folder(key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(key)).strip("._") or "default"
    return f"encoded-{safe[:120]}"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def encoded_set(family: Any, model: Any, data: SyntheticSet, settings: Mapping[str, Any], *,
                fallback_dir: Path | None = None, batch: int = 64,
                progress: ProgressFn = null_progress) -> tuple[SyntheticSet, dict[str, Any]]:
    """``data`` with its inputs replaced by ``family.encode(model, images)``, computed where missing
    and cached (see the module docstring). Returns (the encoded set, info: ``key``, ``folder``,
    ``shards_encoded`` by this process). ``batch``: images per ``encode`` call.

    Raises DataError when an encoded shard on disk is unreadable, FamilyError from the family.
    """
    from safetensors.torch import save_file

    from neon_cli.dist import barrier, rank_world
    from neon_cli.fsutil import atomic_path, remove_stale_tmp, write_json

    key = str(family.encode_key(model, settings))
    folder = data.data_dir / _key_folder(key)
    if not _writable(folder):
        if fallback_dir is None:
            raise DataError(f"--data: cannot write the encoded set to {folder}")
        folder = Path(fallback_dir) / _key_folder(key)
        folder.mkdir(parents=True, exist_ok=True)
    shards = data.manifest.get("shards", [])
    rank, world = rank_world()
    todo = []
    for k, sh in enumerate(shards):
        target = folder / sh["file"]
        if not _encoded_ok(target, key, sh):
            todo.append((k, sh, target))
    mine = [t for t in todo if t[0] % world == rank]
    total = sum(int(sh["count"]) for _, sh, _ in mine)
    done = 0
    if mine:
        progress("encode", 0, total, unit="img")
    for _, sh, target in mine:
        remove_stale_tmp(target)
        start, count = int(sh["start"]), int(sh["count"])
        parts = []
        with torch.inference_mode():
            for a in range(start, start + count, batch):
                b = min(start + count, a + batch)
                parts.append(torch.as_tensor(family.encode(model, data.inputs.block(a, b))).cpu())
                done += b - a
                progress("encode", done, total, unit="img")
        encoded = torch.cat(parts).contiguous()
        if encoded.shape[0] != count:
            raise DataError(f"encode: family {family.name!r} returned {encoded.shape[0]} rows for {count} images")
        meta = {"key": key, "source": sh["file"], "source_sha256": sh.get("sha256"), "count": count}
        with atomic_path(target) as tmp:
            save_file({"data": encoded}, str(tmp), metadata={"neon": json.dumps(meta, sort_keys=True)})
    barrier()
    if rank == 0:
        write_json(folder / "encoded.json", {"schema": ENCODED_SCHEMA, "key": key, "family": family.name,
                                            "synthetic_set": str(data.data_dir),
                                            "shards": [{"file": sh["file"], "start": sh["start"], "count": sh["count"],
                                                        "source_sha256": sh.get("sha256")} for sh in shards]})
    barrier()
    files = [(folder / sh["file"], int(sh["start"]), int(sh["count"])) for sh in shards]
    inputs = ShardedTensor.open(files, "data", what="encoded set")
    return SyntheticSet(data.data_dir, data.manifest, inputs, data.labels), {
        "key": key, "folder": str(folder), "shards_encoded": len(mine), "shards_total": len(shards)}


def _encoded_ok(target: Path, key: str, shard: Mapping[str, Any]) -> bool:
    """True when ``target`` is a complete encoding of ``shard`` under ``key``."""
    if not target.exists():
        return False
    try:
        header, _, _ = _header(target)
        meta = json.loads((header.get("__metadata__") or {}).get("neon", "{}"))
    except (DataError, ValueError):
        return False
    return (meta.get("key") == key and meta.get("source_sha256") == shard.get("sha256")
            and int(meta.get("count", -1)) == int(shard["count"]))
