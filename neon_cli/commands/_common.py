"""What every subcommand shares: the error boundary, the report, the rich progress callback.

Subcommand modules only parse flags and call one library function through :func:`run`; they
import torch-using library modules inside the command body, never at module level.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from neon_cli.errors import InternalError, NeonError, ResourceError, UsageError

#: Options reused by many commands (defined once so help texts stay consistent).
ReportOpt = typer.Option(None, "--report", help="Write a JSON report (schema neon.report/1) to this file.", dir_okay=False)
JsonOpt = typer.Option(False, "--json", help="Print the results as JSON on stdout (progress goes to stderr).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Inference setting of the family (repeatable); see 'neon plugins'.")
TrustOpt = typer.Option(
    False, "--trust-pickle",
    help="Let the family run code from the checkpoint to build the model (EDM/IMM .pkl networks). Only for files you trust.")
DetectorOpt = typer.Option(
    None, "--detector", dir_okay=False,
    help="Inception detector inception-2015-12-05.pt for FID (default: $NEON_INCEPTION).")
RefStatsOpt = typer.Option(
    None, "--ref-stats", dir_okay=False,
    help="Reference statistics .npz (mu, sigma) for FID (default: $NEON_REF_STATS).")


def complete_family(incomplete: str) -> list[str]:
    """Shell completion for FAMILY: entry-point names, without importing any plugin."""
    from neon_cli.family import family_names

    return [n for n in family_names() if n.startswith(incomplete)]


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


class RichProgress:
    """A :class:`neon_cli.progress.ProgressFn` drawing rich progress bars on stderr.

    ``row=`` infos (e.g. tune-w evaluations) are printed as table lines above the bars.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None
        self._tasks: dict[str, Any] = {}
        self._console = _stderr_console()

    def __enter__(self) -> "RichProgress":
        return self

    def _start(self) -> None:
        # started on the first bar, not on entry: a live display stopped without a bar would leave
        # an empty line, and an error message must be the first line on stderr
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._progress.start()

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, task: str, done: float, total: float | None = None, **info: Any) -> None:
        if not self.enabled:
            return
        msg = info.get("message")
        row = info.get("row")
        if msg:
            self._console.print(f"[dim]{task}:[/dim] {_escape(str(msg))}")
        if row:
            self._console.print(f"[dim]{task}:[/dim] " + _escape("  ".join(f"{k}={_fmt(v)}" for k, v in row.items())))
        if self._progress is None:
            self._start()
        assert self._progress is not None
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total)
        self._progress.update(self._tasks[task], completed=done, total=total)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run(
    command: str,
    fn: Callable[..., Any],
    *,
    settings: dict[str, Any],
    report: Optional[Path] = None,
    json_out: bool = False,
    quiet: bool = False,
    show: Optional[Callable[[Any, Any], None]] = None,
) -> Any:
    """Call ``fn(report=Report, progress=callback)``: the one error boundary of every command.

    ``fn`` fills the report's inputs/outputs/results and returns its result. On success the
    report is written (if asked), results printed as JSON (``--json``) or by ``show(result,
    console)``. Before ``fn`` runs, ``--report`` is checked against every path on the command line
    (it may not be an input or another output, in any spelling: :func:`neon_cli.fsutil.same_file`).

    Whatever ``fn`` raises becomes one line ``neon COMMAND: error: MESSAGE`` on stderr (the first
    line there), a report with ``status: error`` (``threshold_exceeded`` for exit 1) and an exit
    code: the :class:`NeonError`'s own (1 threshold, 2 bad input, 3 :class:`ResourceError`, 4
    :class:`InternalError`); an OSError is 2 for a path that does not exist or has the wrong kind,
    else 3 (no space, read-only, permission), like MemoryError / CUDA out of memory; any other
    exception is 4 (:func:`as_neon_error`). Ctrl-C is 130. ``NEON_DEBUG=1`` re-raises instead,
    for a traceback. Under torchrun the process group is initialised here (:mod:`neon_cli.dist`)
    and only rank 0 prints or writes (another rank prints an error only when it is its own:
    not a NeonError, which every rank raises alike).
    """
    from neon_cli.dist import env_world, init_from_env, shutdown
    from neon_cli.report import Report

    console = _stderr_console()
    rank = env_world()[0]
    main = rank == 0
    rep = Report(command, settings=_jsonable(settings), path=report)
    # under torchrun/srun every rank runs this; only rank 0 draws progress, prints and writes the report
    if not main:
        report, json_out, show = None, False, None
    try:
        try:
            _check_report_path(report, settings)
        except UsageError:
            rep.refuse_path()  # not even the error report goes over an input
            raise
        init_from_env()
        with RichProgress(enabled=main and not quiet and not json_out) as progress:
            result = fn(report=rep, progress=progress)
        if report:
            rep.write(report)
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        if os.environ.get("NEON_DEBUG"):
            raise
        _write_error_report(rep, report, "error", "interrupted (Ctrl-C or SIGINT)")
        if main:
            console.print(f"neon {command}: interrupted; outputs written so far are complete, rerun to resume",
                          markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    except Exception as raw:
        if os.environ.get("NEON_DEBUG") or type(raw).__module__.split(".")[0] in ("typer", "click"):
            raise  # a traceback on request; the CLI framework's own exits and usage errors as they are
        exc = as_neon_error(raw)
        status = "threshold_exceeded" if exc.exit_code == 1 else "error"
        note = _write_error_report(rep, report, status, _one_line(str(exc)))
        if exc.exit_code == 1 and json_out:
            print(json.dumps(rep.results, indent=2, default=str))
        if main or not isinstance(raw, NeonError):
            who = f"neon {command}" + ("" if main else f" (rank {rank})")
            console.print(f"[red]{who}: error:[/red] {_escape(_one_line(str(exc)) + note)}", markup=True, highlight=False,
                          soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    finally:
        shutdown()
    if json_out:
        print(json.dumps(rep.results, indent=2, default=str))
    elif show is not None:
        from rich.console import Console

        show(result, Console())
    return result


#: OSError numbers that mean "this path is wrong" (bad input, exit 2) rather than "the machine refused" (exit 3).
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY}


def as_neon_error(exc: BaseException) -> NeonError:
    """The :class:`NeonError` an exception reaching the command line is reported as (one line).

    NeonError: itself. OSError: UsageError (exit 2) for a missing path or one of the wrong kind,
    else :class:`ResourceError` (exit 3: no space, read-only file system, permission, I/O error),
    the message naming the file and the reason (``/data/S/shard-00003.safetensors: No space left
    on device``). MemoryError and torch's OutOfMemoryError: ResourceError. Anything else:
    :class:`InternalError` (exit 4) with the exception's type and first line.
    """
    if isinstance(exc, NeonError):
        return exc
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else None
        reason = exc.strerror or _first_line(exc) or type(exc).__name__
        text = f"{where}: {reason}" if where is not None else reason
        if getattr(exc, "filename2", None):
            text += f" ({exc.filename2})"
        if exc.errno in _PATH_ERRNOS:
            return UsageError(text)
        return ResourceError(text)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return ResourceError(f"out of memory ({_first_line(exc) or type(exc).__name__}); try a smaller --batch")
    return InternalError(f"{type(exc).__name__}: {_first_line(exc) or 'no message'} "
                         "(unexpected: a bug in neon or the family plugin; NEON_DEBUG=1 shows the traceback)")


def _one_line(text: str) -> str:
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, KeyError) and exc.args:
        text = repr(exc.args[0])
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def _write_error_report(rep: Any, report: Optional[Path], status: str, message: str) -> str:
    """Write the failure report; returns a note for the error line when even that failed."""
    rep.status = status
    rep.error = message
    if not report or rep.path_refused:
        return ""
    try:
        rep.write(report)
    except OSError as exc:
        return f" (--report {report} not written: {exc.strerror or exc})"
    except NeonError as exc:
        return f" ({exc})"
    return ""


def _check_report_path(report: Optional[Path], settings: dict[str, Any]) -> None:
    """Refuse a ``--report`` that names the same file as any other path given to the command.

    The paths are the command's ``settings`` values (every flag it passes to :func:`run`), Path or
    string, lists element by element. Same file means equal after resolving or the same inode
    (:func:`neon_cli.fsutil.same_file`), so a symlink, a hard link or ``./x`` for ``x`` are all
    caught. Raises UsageError naming both flags.
    """
    if not report:
        return
    from neon_cli.fsutil import same_file

    for key, value in settings.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if (isinstance(v, Path) or (isinstance(v, str) and v)) and same_file(report, v):
                raise UsageError(f"--report: {report} is also {_flag_of(key)} {v}; choose another file "
                                 "(a report never replaces an input or another output)")


def _flag_of(key: str) -> str:
    """The flag of a settings key: ``out``/``output`` -> ``-o``, ``family`` -> ``FAMILY``, else ``--key-name``."""
    if key in ("out", "output"):
        return "-o"
    if key == "family":
        return "FAMILY"
    return "--" + key.replace("_", "-")


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
