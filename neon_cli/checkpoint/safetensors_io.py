"""``.safetensors`` files: a torch-free memory-mapped reader and the streaming header-first writer.

Format (huggingface/safetensors README): little-endian u64 N; N bytes of UTF-8 JSON beginning
with ``{`` (may be padded with spaces) mapping each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` relative to the data section, plus an optional ``__metadata__``
of str -> str; the data section is fully indexed (no holes or overlaps), little-endian, C order.
:func:`read_header` checks all of it (as the safetensors library does: header size at most
100 MB, offsets contiguous and covering the file exactly, shape x item size = extent), so a
crafted header is refused with the file named.

Reading maps the file once (``mmap``) and hands out numpy views: no torch, no copy.
:class:`SafetensorsWriter` writes tensors in the safetensors library's order (dtype alignment
descending, then name) so the bytes equal ``safetensors.torch.save_file``'s for the same tensors
and metadata; it accepts numpy arrays (bits dtype) or torch tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from neon_cli.checkpoint.core import (
    DTYPE_NAMES,
    DTYPES,
    SAFETENSORS_DTYPES,
    Checkpoint,
    TensorSpec,
    dtype_name,
    from_torch,
    one_line,
)
from neon_cli.errors import CheckpointError, from_os_error

MAX_HEADER = 100_000_000

#: Ascending order of the safetensors Rust ``Dtype`` enum; ``save_file`` writes tensors by this
#: rank descending, then by name, so every tensor starts at an offset aligned to its item size.
_ST_RANK = {name: i for i, name in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
)}


def read_header(path: Path, buf: Any) -> tuple[dict[str, Any], dict[str, str], int]:
    """(tensors {name: (dtype name, shape, begin, end)} in offset order, metadata, data start).

    Raises CheckpointError ``PATH: not a readable safetensors file, truncated or corrupt (why)``.
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({why})")

    size = len(buf)
    if size == 0:
        raise bad("empty file, 0 bytes")
    if size < 8:
        raise bad("shorter than its 8-byte header size")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > MAX_HEADER:
        raise bad(f"header of {n} bytes, more than {MAX_HEADER}")
    if 8 + n > size:
        raise bad(f"header of {n} bytes but the file has {size}")
    raw = bytes(buf[8:8 + n])
    if not raw.startswith(b"{"):
        raise bad("header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not valid JSON: {one_line(exc)}") from None
    except RecursionError:
        raise bad("header is JSON nested too deep") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ must map str to str")
    entries = []
    for name, e in header.items():
        if not isinstance(e, dict):
            raise bad(f"tensor {name!r}: entry is not an object")
        code, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if code not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r}: dtype {code!r} unknown")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise bad(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)):
            raise bad(f"tensor {name!r}: bad data_offsets {offs!r}")
        dt = SAFETENSORS_DTYPES[code]
        numel = 1
        for s in shape:
            numel *= s
        if offs[1] - offs[0] != numel * DTYPES[dt].itemsize:
            raise bad(f"tensor {name!r}: data_offsets {offs} do not hold shape {shape} of {code}")
        entries.append((offs[0], offs[1], name, dt, tuple(shape)))
    entries.sort()
    pos = 0
    for b, e, name, _, _ in entries:
        if b != pos:
            raise bad(f"tensor {name!r}: data at {b} but the previous tensor ends at {pos} (holes or overlaps)")
        pos = e
    data_start = 8 + n
    if data_start + pos != size:
        raise bad(f"the tensors end at byte {data_start + pos} but the file has {size} bytes")
    tensors = {name: (dt, shape, data_start + b, data_start + e) for b, e, name, dt, shape in entries}
    return tensors, dict(meta), data_start


def map_file(path: Path) -> Any:
    """A read-only mmap of ``path`` (``b""`` for an empty file). CheckpointError naming the file when
    it is missing, a folder or not a regular file (a FIFO or device is never opened: it could block)."""
    import stat as _stat

    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    mode = os.stat(path).st_mode
    if _stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: is a folder, not a .safetensors file")
    if not _stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, socket or device); give a .safetensors file")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise from_os_error(exc, f"{path}: cannot open") from None
    try:
        if os.fstat(fd).st_size == 0:
            return b""
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


class SafetensorsCheckpoint(Checkpoint):
    """A ``.safetensors`` file or a sharded folder of them (``entries``: stored name -> (shard, dtype, shape, begin))."""

    def _array(self, raw: str) -> np.ndarray:
        shard, dt, shape, begin = self.entries[raw]
        buf = self._maps[shard]
        info = DTYPES[dt]
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            return np.zeros(shape, dtype=np.dtype(info.numpy))
        return np.frombuffer(buf, dtype=np.dtype(info.numpy), count=numel, offset=begin).reshape(shape)

    def add_file(self, shard: str, file: Path, only: set[str] | None = None) -> list[TensorSpec]:
        """Map ``file`` as shard ``shard`` and return its tensors' specs (those in ``only``, if given)."""
        buf = map_file(file)
        self._maps[shard] = buf
        tensors, meta, _ = read_header(file, buf)
        self.shard_metadata[shard] = meta
        out = []
        for name, (dt, shape, b, _e) in tensors.items():
            if only is not None and name not in only:
                continue
            self.entries[name] = (shard, dt, shape, b)
            out.append(TensorSpec(name, dt, shape))
        return out


def open_safetensors(path: Path, key: str | None = None, key_optional: bool = False) -> SafetensorsCheckpoint:
    """Open one ``.safetensors`` file (header validated, data mapped, nothing read)."""
    ck = SafetensorsCheckpoint(path=path, layout="safetensors", specs={}, files=[path], encoding="safetensors")
    try:
        raw = ck.add_file("", path)
        ck.metadata = dict(ck.shard_metadata.get("", {}))
        ck._select_flat(raw, key, key_optional)
    except BaseException:
        ck.close()
        raise
    return ck


# ----------------------------------------------------------------------------------------------
# writing


def _st_code(spec: TensorSpec) -> str:
    try:
        return DTYPE_NAMES[spec.dtype]
    except KeyError:
        raise CheckpointError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors") from None


def safetensors_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Tensors in the order ``safetensors`` writes them: dtype alignment descending, then name."""
    return sorted(specs, key=lambda s: (-_ST_RANK[_st_code(s)], s.name.encode()))


def safetensors_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> tuple[bytes, list[TensorSpec]]:
    """(8-byte length + JSON header padded with spaces to a multiple of 8, tensors in data order).

    Follows the safetensors format README: little-endian u64 header size, UTF-8 JSON with
    ``data_offsets`` relative to the data section, optional ``__metadata__`` of str -> str.
    """
    ordered = safetensors_order(specs)
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"safetensors metadata must map str to str (key {bad[0]!r})")
        header["__metadata__"] = dict(metadata)
    offset = 0
    seen = set()
    for s in ordered:
        if s.name in seen:
            raise CheckpointError(f"tensor {s.name!r} appears twice")
        seen.add(s.name)
        header[s.name] = {"dtype": _st_code(s), "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def as_bytes(data: Any, spec: TensorSpec, where: Path) -> memoryview:
    """The C-order little-endian bytes of ``data`` (numpy bits array or torch tensor) declared as ``spec``."""
    if hasattr(data, "detach"):  # a torch tensor
        if dtype_name(data.dtype) != spec.dtype:
            raise CheckpointError(f"{where}: tensor {spec.name!r} given as {dtype_name(data.dtype)}, declared {spec.dtype}")
        arr = from_torch(data)
    else:
        arr = np.asarray(data)
        if arr.dtype.itemsize != DTYPES[spec.dtype].itemsize or arr.dtype != np.dtype(DTYPES[spec.dtype].numpy):
            raise CheckpointError(f"{where}: tensor {spec.name!r} given as {arr.dtype}, declared {spec.dtype}")
    arr = np.ascontiguousarray(arr)
    if arr.size == 0:
        return memoryview(b"")
    return memoryview(arr.reshape(-1).view(np.uint8))


class SafetensorsWriter:
    """Writes one ``.safetensors`` file tensor by tensor, header first; memory O(one block).

    ``specs``: every tensor the file will hold (name, dtype, shape) -- known before any data, so
    the header is written at once. Then call :meth:`write` with each tensor's data (numpy bits
    array or torch tensor), whole or in consecutive row blocks, in :attr:`order`. :meth:`close`
    checks every byte was written, flushes, fsyncs and returns the file's sha256 (hashed as
    written, or ``None`` with ``hash=False``).

    ``io``: an optional single-worker executor shared by several writers: the file write and the
    sha256 run on that thread while the caller computes the next block (both release the GIL);
    blocks go over in batches of :attr:`BATCH_BYTES`, at most :attr:`MAX_PENDING` batches wait. ``placeholders``: ``{metadata key: length}`` of values
    known only later (the inputs' sha256), reserved in the header and written by
    :meth:`fill_placeholders` after :meth:`close` (pass ``hash=False``: the file's digest must then
    be computed after the patch).
    """

    MAX_PENDING = 4
    BATCH_BYTES = 4 << 20

    def __init__(self, path: str | os.PathLike[str], specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None,
                 io: Any = None, *, hash: bool = True, placeholders: Mapping[str, int] | None = None):
        self.path = Path(path)
        meta = dict(metadata or {})
        self._ph: dict[str, tuple[int, int]] = {}
        marks = {}
        for i, (k, n) in enumerate((placeholders or {}).items()):
            tag = f"@neon-pending-{i}@"
            if n < len(tag):
                raise CheckpointError(f"{self.path}: metadata {k}: placeholder of {n} characters is too short")
            marks[k] = tag.ljust(n, "#")
            meta[k] = marks[k]
        head, self.order = safetensors_header(specs, meta)
        for k, m in marks.items():
            at = head.find(m.encode())
            self._ph[k] = (at, len(m))
        self._hash = hash
        self._sha = hashlib.sha256()
        self._fh = open(self.path, "wb")
        self._io = io
        self._pending: deque[Any] = deque()
        self._batch: list[tuple[Any, Any]] = []
        self._batch_bytes = 0
        self._i = 0
        self._left = self.order[0].nbytes if self.order else 0
        self.bytes_written = 0
        self._put(head, None)
        self._skip_empty()

    @property
    def pending_placeholders(self) -> list[str]:
        """Metadata keys reserved with ``placeholders`` and not filled yet."""
        return list(self._ph)

    def fill_placeholders(self, values: Mapping[str, str]) -> None:
        """After :meth:`close`: write the reserved metadata values (each must be as long as its
        reservation) into the header in place, and fsync."""
        with open(self.path, "r+b") as fh:
            for key in list(self._ph):
                at, n = self._ph[key]
                enc = json.dumps(values[key])[1:-1].encode()
                if len(enc) != n:
                    raise CheckpointError(f"{self.path}: metadata {key} reserved {n} bytes, got {len(enc)}")
                fh.seek(at)
                fh.write(enc)
                del self._ph[key]
            fh.flush()
            os.fsync(fh.fileno())

    def _put(self, data: Any, keep: Any) -> None:
        self.bytes_written += len(data)
        if self._io is None:
            self._write_and_hash([(data, None)])
            return
        # blocks are handed to the I/O thread in batches of BATCH_BYTES: one hand-off per block
        # would cost more (GIL hand-over) than the write itself
        self._batch.append((data, keep))
        self._batch_bytes += len(data)
        if self._batch_bytes >= self.BATCH_BYTES:
            self._flush_batch()

    def _flush_batch(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._pending.append(self._io.submit(self._write_and_hash, batch))
        while len(self._pending) > self.MAX_PENDING:
            self._pending.popleft().result()

    def _write_and_hash(self, batch: list[tuple[Any, Any]]) -> None:
        for data, _keep in batch:
            self._fh.write(data)
            if self._hash:
                self._sha.update(data)

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _skip_empty(self) -> None:
        while self._i < len(self.order) and self._left == 0:
            self._i += 1
            self._left = self.order[self._i].nbytes if self._i < len(self.order) else 0

    @property
    def expected(self) -> str | None:
        """Name of the tensor whose bytes come next (None when complete)."""
        return self.order[self._i].name if self._i < len(self.order) else None

    def write(self, name: str, data: Any) -> None:
        """Append ``data`` (the next rows of tensor ``name``, dtype as declared)."""
        if name != self.expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} written out of order (expected {self.expected!r})")
        spec = self.order[self._i]
        buf = as_bytes(data, spec, self.path)
        if len(buf) > self._left:
            raise CheckpointError(f"{self.path}: tensor {name!r}: more bytes than its declared shape {list(spec.shape)}")
        try:
            self._put(buf, data)
        except OSError as exc:
            raise from_os_error(exc, f"{self.path}: cannot write") from None
        self._left -= len(buf)
        self._skip_empty()

    def close(self) -> str | None:
        """Flush, fsync and close; returns the file's sha256. CheckpointError if incomplete."""
        return self.close_async()()

    def close_async(self) -> Callable[[], str | None]:
        """Like :meth:`close`, but with an ``io`` executor the flush and fsync run on its thread
        while the caller goes on; call the returned function to wait and get the sha256."""
        if self.expected is not None:
            missing = self.expected
            self.abort()
            raise CheckpointError(f"{self.path}: tensor {missing!r} was not written")
        if self._io is not None:
            self._flush_batch()
        pending, self._pending = list(self._pending), deque()

        def finish() -> str | None:
            for fut in pending:
                fut.result()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            return self._sha.hexdigest() if self._hash else None

        fut = self._io.submit(finish) if self._io is not None else None

        def wait() -> str | None:
            try:
                return fut.result() if fut is not None else finish()
            except OSError as exc:
                self.abort()
                raise from_os_error(exc, f"{self.path}: cannot write") from None

        if fut is not None:
            self._pending.append(fut)
        return wait

    def abort(self) -> None:
        """Close without checks (the caller removes the file); waits for pending writes."""
        self._batch.clear()
        for fut in self._pending:
            fut.cancel()
        for fut in self._pending:
            with contextlib.suppress(BaseException):
                fut.result()
        self._pending.clear()
        if not self._fh.closed:
            self._fh.close()


# ---------------------------------------------------------------------------------------------
# Whole-file helpers for families' own checkpoints (small state dicts held in memory; torch).


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` (name -> torch tensor) to a ``.safetensors`` file at ``path``; returns its sha256.

    Unlike ``safetensors.torch.save_file`` (which emits ``__metadata__`` in hash-map order), the
    header is built by :func:`safetensors_header` with metadata keys sorted, so equal tensors and
    metadata always give byte-identical files. The caller handles atomicity. Raises
    CheckpointError for non-str metadata or a dtype safetensors cannot store.
    """
    meta = {str(k): str(v) for k, v in sorted((metadata or {}).items())}
    specs = [TensorSpec(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    writer = SafetensorsWriter(path, specs, meta)
    try:
        for spec in writer.order:
            writer.write(spec.name, tensors[spec.name].detach().cpu().contiguous())
        return writer.close() or ""
    except BaseException:
        writer.abort()
        raise


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file; CheckpointError naming the file if unreadable."""
    p = Path(path)
    buf = map_file(p)
    try:
        return read_header(p, buf)[1]
    finally:
        if hasattr(buf, "close"):
            buf.close()


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors as torch tensors, metadata) of a whole ``.safetensors`` file; CheckpointError naming the file."""
    from safetensors.torch import load_file

    meta = read_safetensors_metadata(path)
    try:
        return load_file(str(path)), meta
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({one_line(exc)})") from None
