"""File-system helpers shared by every command: atomic outputs and content hashes.

Outputs are written under a temporary name in the destination directory, flushed, fsynced and
renamed into place only when complete (``os.replace`` is atomic on POSIX within a file system),
so an interrupted job never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

_CHUNK = 1 << 22


def tmp_name(path: Path) -> Path:
    """The temporary sibling used while ``path`` is being written (``.name.tmp-<pid>``)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was. The caller writes the file (or a directory) at the yielded path. A write that
    failed because the disk is full or read-only (:func:`disk_refusal`: whatever library wrote it,
    e.g. safetensors' "os error 28" or torch.save's "unexpected pos") is re-raised as
    :class:`~neon_cli.errors.ResourceError` naming ``path`` (exit 3).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        refusal = disk_refusal(exc, path, tmp) if isinstance(exc, Exception) else None  # measured before the clean-up frees space
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if refusal is not None:
            raise refusal from None
        raise


#: How write errors of libraries that do not raise OSError (safetensors' Rust writer, torch.save)
#: spell a full or read-only disk.
_DISK_MARKERS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122",
                 "Read-only file system", "os error 30")


def disk_refusal(exc: BaseException, path: Path, tmp: Path | None = None) -> Exception | None:
    """The :class:`~neon_cli.errors.ResourceError` (exit 3, naming ``path``) for an exception raised
    while ``path`` was written, when the cause is the machine: an OSError of
    :data:`neon_cli.errors.RESOURCE_ERRNOS`, a message naming a full or read-only disk, or any
    other write failure while the folder's file system has less than 64 KiB free (torch.save on a
    full disk says only "unexpected pos ..."). None otherwise (a NeonError or another bug keeps
    its own type; a ResourceError naming the temporary ``tmp`` is re-worded to name ``path``)."""
    from neon_cli.errors import RESOURCE_ERRNOS, NeonError, ResourceError

    if isinstance(exc, ResourceError) and tmp is not None and str(tmp) in str(exc):
        return ResourceError(str(exc).replace(str(tmp), str(path)))
    if isinstance(exc, NeonError):
        return None
    text = str(exc)
    if isinstance(exc, OSError):
        if exc.errno not in RESOURCE_ERRNOS:
            return None
        reason = exc.strerror or text
    elif any(m in text for m in _DISK_MARKERS):
        reason = next(m for m in _DISK_MARKERS if m in text)
        reason = {"os error 28": "No space left on device", "os error 122": "Disk quota exceeded",
                  "os error 30": "Read-only file system"}.get(reason, reason)
    else:
        import shutil

        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            return None
        if free >= 64 << 10:
            return None
        reason = f"No space left on device: {human_free(free)} free"
    return ResourceError(f"{path}: cannot write ({reason})")


def human_free(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, streamed in 4 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of a directory as the hash of its sorted (relative name, file hash)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# outputs never touch inputs; one writer per output


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of an existing path (symlinks followed), None if it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when ``a`` and ``b`` name the same file or folder: equal after resolving ``.``/``..``
    and symlinks, or the same inode (a hard link)."""
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    ia, ib = _identity(pa), _identity(pb)
    return ia is not None and ia == ib


def _inside(child: Path, folder: Path) -> bool:
    """True when ``child`` lies inside the existing folder ``folder`` (after resolving)."""
    if not folder.is_dir():
        return False
    c, f = child.resolve(), folder.resolve()
    return c != f and f in c.parents


def check_outputs(inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
    """Refuse output paths that would overwrite an input or each other, before any work.

    Args:
        inputs: flag (or role) -> path, or an iterable of paths, of every file or folder the
            command reads; None values are skipped.
        outputs: flag -> path of every file or folder the command writes; None values are skipped.

    An output clashes with an input when it is the same file (same resolved path, a symlink to
    it, or a hard link: same inode) or lies inside an input folder; two outputs clash when they
    are the same path. Raises :class:`~neon_cli.errors.UsageError` naming both flags, e.g.
    ``--report: base.safetensors is also the input --base; choose another file``.
    """
    from neon_cli.errors import UsageError

    def flat(items: Mapping[str, Any]) -> list[tuple[str, Path]]:
        out = []
        for flag, value in items.items():
            if value is None:
                continue
            values = value if isinstance(value, (list, tuple, set)) else [value]
            out.extend((flag, Path(v)) for v in values if v is not None and str(v) != "")
        return out

    ins, outs = flat(inputs), flat(outputs)
    for oflag, opath in outs:
        for iflag, ipath in ins:
            if same_file(opath, ipath):
                raise UsageError(f"{oflag}: {opath} is also the input {iflag}; choose another path (inputs are never overwritten)")
            if _inside(opath, ipath):
                raise UsageError(f"{oflag}: {opath} is inside the input {iflag} ({ipath}); choose a path outside it")
    for i, (fa, pa) in enumerate(outs):
        for fb, pb in outs[i + 1:]:
            if same_file(pa, pb):
                raise UsageError(f"{fb}: {pb} is also the output of {fa}; give each output its own path")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_tmp(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary siblings ``.NAME.tmp-PID`` (see :func:`tmp_name`) that a killed run of
    this host left next to ``path``: those whose PID no longer runs. Returns what was removed.

    A temporary file of a live process (another run writing the same output) is left alone.
    """
    path = Path(path)
    return _remove_dead_tmp(path.parent, f".{path.name}.tmp-")


def remove_stale_tmp_in(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete every temporary file ``.NAME.tmp-PID`` directly in ``folder`` whose PID no longer
    runs (what a SIGKILLed synth/finetune left: partial shards, snapshots, training states).
    Call it while holding the folder's :func:`exclusive_lock`. Returns what was removed."""
    return _remove_dead_tmp(Path(folder), ".", ".tmp-")


def _remove_dead_tmp(folder: Path, prefix: str, marker: str = "") -> list[Path]:
    import shutil

    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not p.name.startswith(prefix):
            continue
        rest = p.name[len(prefix):]
        if marker:
            if marker not in rest:
                continue
            rest = rest.rsplit(marker, 1)[1]
        if not rest.isdigit() or _pid_alive(int(rest)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


def lock_path(target: str | os.PathLike[str], folder: bool) -> Path:
    """The lock file guarding ``target``: ``TARGET/.neon.lock`` for a folder output (the folder is
    created), ``.NAME.lock`` beside a file output. Dot files are not part of a folder's
    :func:`sha256_path`."""
    target = Path(target)
    if folder:
        target.mkdir(parents=True, exist_ok=True)
        return target / ".neon.lock"
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike[str], flag: str = "-o", *, folder: bool = False) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on :func:`lock_path` ``(target, folder)`` for the block.

    A second neon run on the same output (another process, on this host or, where the file
    system supports flock, another node) gets :class:`~neon_cli.errors.UsageError` at once
    (``-o: runs/S is being written by another neon run (pid 123 on host); wait for it to finish
    or choose another path``) instead of mixing its files with the first run's. The lock file
    holds the owner's pid and host for that message; the kernel drops the lock when the process
    dies, so a killed run never blocks its rerun.

    The lock file is removed when the block ends, after a clean run or a failed one, while the
    lock is still held (so it is never a file another live run holds). A run that opened the file
    just before it was removed finds, once it holds the lock, that the path no longer names the
    file it locked (other inode, or none) and starts over on a fresh file, so two runs can never
    both hold "the" lock. Only a run killed by SIGKILL leaves a lock file, which the next run reuses.
    """
    import fcntl
    import socket

    from neon_cli.errors import UsageError

    lp = lock_path(target, folder)
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{flag}: {target} is being written by another neon run ({owner}); "
                             "wait for it to finish or choose another path") from None
        except BaseException:
            os.close(fd)
            raise
        if _identity(lp) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            break
        os.close(fd)  # the holder before us removed the file we locked: lock the path's new file
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield lp
    finally:
        try:
            if _identity(lp) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lp)  # still ours and still held: nobody else can be using it
        finally:
            os.close(fd)  # closing the descriptor releases the lock
