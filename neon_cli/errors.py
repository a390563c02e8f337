"""Typed errors raised by the library; the CLI turns them into one line on stderr.

Exit codes (documented in README, relied on by scripts):

* 0  success
* 1  a regression threshold was exceeded (``neon eval --max-fid``) -- :class:`ThresholdExceeded`
* 2  bad input: a flag, file, key, shape or dtype the command cannot use -- every other
     :class:`NeonError`
* 3  the system refused: no space left, a read-only or unwritable folder, out of memory --
     :class:`ResourceError` (the CLI maps such OSError / MemoryError to it)
* 4  an unexpected exception: a bug in neon or in a family plugin -- :class:`InternalError`
     (the CLI maps every other exception to it; ``NEON_DEBUG=1`` shows the traceback)
* 5  ``neon tune-w`` found no candidate that beats the base model (or its confirmation
     contradicted the search); no ``-o`` written unless ``--write-anyway`` -- :class:`NoImprovement`
* 130 interrupted (Ctrl-C); outputs are never left half-written
* 143 terminated (SIGTERM, e.g. Slurm's time limit): handled like Ctrl-C; the report's ``status``
     is ``interrupted`` for both
"""

from __future__ import annotations

import errno


class NeonError(Exception):
    """Base class. ``str(err)`` is a complete one-line message naming the file, key or flag."""

    exit_code = 2
    #: the report's ``status`` for this failure
    status = "error"


class UsageError(NeonError):
    """A flag value or combination of flags that cannot work (names the flag)."""


class FamilyError(NeonError):
    """Unknown family, a plugin that fails to load, or a setting the family does not know."""


class CheckpointError(NeonError):
    """A checkpoint that cannot be read, is truncated, or does not match the other input."""


class DataError(NeonError):
    """A synthetic-set directory or manifest that is missing, incomplete or inconsistent."""


class ThresholdExceeded(NeonError):
    """A metric crossed a regression threshold (``neon eval --max-fid``). Exit code 1."""

    exit_code = 1
    status = "threshold_exceeded"


class ResourceError(NeonError):
    """The machine refused: no space left on the device, a read-only or unwritable folder, too
    little memory. Exit code 3: the command was right, rerun it once the resource is there."""

    exit_code = 3


class InternalError(NeonError):
    """An exception neon did not expect (a bug in neon or in a family plugin). Exit code 4."""

    exit_code = 4


class NoImprovement(NeonError):
    """``neon tune-w``: no candidate beats the base model on the search seeds, or the confirmation
    on disjoint seeds contradicts the search (issue 16, item 7). Exit code 5 (3 and 4 are the
    error boundary's resource and internal errors), so a script cannot mistake it for success;
    the report holds every measurement."""

    exit_code = 5
    status = "no_improvement"


_ANSI = None


def clean_line(text: str, limit: int = 300) -> str:
    """``text`` as one plain line: terminal escapes (``\\x1b[1m``) removed, lines joined by a
    space, runs of white space collapsed; longer than ``limit`` characters, cut at a word and
    marked with an ellipsis (never mid-word)."""
    import re

    global _ANSI
    if _ANSI is None:
        _ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
    line = " ".join(_ANSI.sub("", str(text)).split())
    if len(line) > limit:
        cut = line[:limit].rsplit(" ", 1)[0].rstrip(",;:")
        line = cut + " …"
    return line


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """What went wrong in ``exc``, as one clean line (:func:`clean_line`) for a message that names
    the file itself. torch's ``weights_only`` refusal ("Weights only load failed. ... two options,
    ...") is reduced to its reason (``Unsupported global: GLOBAL torchcfm.models.models.MLP was not
    an allowed global by default``); an empty message gives the exception's type."""
    import re

    text = str(exc)
    if "Weights only load failed" in text:
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\.$|\n|$)", text)
        reason = m.group(1) if m else "it holds objects other than tensors and plain containers"
        return clean_line(f"torch.load(weights_only=True) refused it: {reason}", limit)
    line = clean_line(text, limit)
    return line or type(exc).__name__


#: OSError numbers meaning "the machine refused" (exit 3): no space, quota, read-only, permission,
#: I/O error, too many open files, out of memory, file too large for the file system.
RESOURCE_ERRNOS = frozenset(
    getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO", "EMFILE", "ENFILE", "ENOMEM", "EFBIG")
    if hasattr(errno, n)
)


def from_os_error(exc: OSError, what: str, default: type[NeonError] = CheckpointError) -> NeonError:
    """The typed error for an OSError met while reading or writing a file, one line:
    ``WHAT (REASON)``, e.g. ``out/model.safetensors: cannot write (No space left on device)``.

    :class:`ResourceError` (exit 3) for the errnos of :data:`RESOURCE_ERRNOS` (a full disk, a
    read-only or unwritable folder, ...): the command was right, the machine refused; ``default``
    (exit 2; CheckpointError unless given) for the others (a missing path, a folder where a file
    was expected, ...), which are bad input. ``what`` names the file and the action.
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    cls = ResourceError if exc.errno in RESOURCE_ERRNOS else default
    return cls(f"{what} ({reason})")
