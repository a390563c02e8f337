"""The one error boundary of every command (:func:`run`): plan check, progress, report, exit codes.

A command module builds its request and calls :func:`run` with the one library function and the
request's plan. Torch-free at import. Exit codes: :mod:`neon_cli.errors`, README "Exit codes".

Whatever the command's function raises becomes one line ``neon COMMAND: error: MESSAGE`` on stderr (the last
line there; with ``--log-format json`` one object with ``"event": "error"``), a report with ``status: error`` (``threshold_exceeded`` for exit 1) and an exit
code: the :class:`NeonError`'s own (1 threshold, 2 bad input, 3 :class:`ResourceError`, 4
:class:`InternalError`); an OSError is 2 for a path that does not exist or has the wrong kind,
else 3 (no space, read-only, permission), like MemoryError / CUDA out of memory; any other
exception is 4 (:func:`as_neon_error`). Ctrl-C is 130 and SIGTERM 143 (:class:`Terminated`), both
with the report's ``status`` ``interrupted``. With ``--json`` a failure is also a JSON object on
stdout (``{"status", "exit_code", "error"}``). Results go to stdout through :func:`stdout_console`
(full width in a pipe); a stdout that cannot be written is exit 3 in one line
(:func:`_to_stdout`). ``NEON_DEBUG=1`` re-raises instead,
for a traceback. Under torchrun the process group is initialised here (:mod:`neon_cli.dist`)
and only rank 0 prints or writes (another rank prints an error only when it is its own:
not a NeonError, which every rank raises alike).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from neon_cli.commands.logs import LineProgress, _escape, _one_line, _progress_renderer, _stderr_console, log_format, stdout_console
from neon_cli.errors import InternalError, NeonError, ResourceError, UsageError


def run(
    command: str,
    fn: Callable[..., Any],
    *,
    settings: dict[str, Any],
    report: Optional[Path] = None,
    json_out: bool = False,
    quiet: bool = False,
    show: Optional[Callable[[Any, Any], None]] = None,
    plan: Optional[Callable[[], Any]] = None,
    dry_run: bool = False,
    dry_run_calls_fn: bool = False,
    json_result: bool = False,
) -> Any:
    """Call ``fn(report=Report, progress=callback)``: the one error boundary of every command.

    ``plan``: a builder of the command's :class:`neon_cli.plan.Plan` (every path it reads and
    writes). Before ``fn`` runs the plan is checked (:func:`neon_cli.plan.check_plan`), and the
    failure report is written only where the plan allows ``--report``
    (:func:`neon_cli.plan.report_problem`): a report path that is an input, another output, a file
    inside either, a device, FIFO or socket gets no report at all, and the error line says so.
    ``dry_run`` (``--dry-run``): the plan goes into the results (``"plan": {"reads", "writes"}``,
    printed with ``--json``) and ``fn`` is not called, unless ``dry_run_calls_fn`` (merge's own
    header-only validation, whose results then carry the plan too). ``json_result``: ``--json``
    prints ``fn``'s return value instead of the report's results (plugins: the list of families);
    errors are the same JSON object as every command's.

    ``fn`` fills the report's inputs/outputs/results and returns its result. On success the
    report is written (if asked), results printed as JSON (``--json``) or by ``show(result,
    console)``. Before ``fn`` runs, ``--report`` is checked against every path on the command line
    (it may not be an input or another output, in any spelling: :func:`neon_cli.fsutil.same_file`).

    Progress goes to stderr as the command's ``--log-format`` says (:func:`log_format`: rich bars
    on a terminal, else :class:`LineProgress` lines; nothing with ``-q``), also with ``--json``.

    Failures, exit codes, ``--json`` errors and ranks: see the module docstring.
    """
    from neon_cli.dist import env_world, init_from_env, shutdown
    from neon_cli.report import Report

    b = _Boundary(command, env_world()[0], log_format(), Report(command, settings=_jsonable(settings), path=report), report,
                  json_out)
    # under torchrun/srun every rank runs this; only rank 0 draws progress, prints and writes the report
    if not b.main:
        b.report, b.json_out, show = None, False, None
    restore_sigterm = _sigterm_as_interrupt()
    try:
        plan_obj = _check_plan_first(b.rep, b.report, settings, plan)
        init_from_env()
        with _progress_renderer(command, b.fmt, enabled=b.main and not quiet) as progress:
            if dry_run and plan_obj is not None:
                b.rep.results["plan"] = plan_obj.to_json()
                b.rep.results.setdefault("dry_run", True)
            result = fn(report=b.rep, progress=progress) if not dry_run or dry_run_calls_fn else b.rep.results
        if b.report:
            b.rep.write(b.report)
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt as stop:
        if os.environ.get("NEON_DEBUG"):
            raise
        raise typer.Exit(_interrupted(b, stop))
    except Exception as raw:
        if os.environ.get("NEON_DEBUG") or type(raw).__module__.split(".")[0] in ("typer", "click"):
            raise  # a traceback on request; the CLI framework's own exits and usage errors as they are
        raise typer.Exit(_failed(b, raw))
    finally:
        restore_sigterm()
        shutdown()
    if dry_run and not dry_run_calls_fn and not b.json_out and b.main:
        show = _show_plan
    _print_results(b, result, show, json_result)
    return result


@dataclass
class _Boundary:
    """One command run as the boundary sees it: its name, this process's rank, the log format, the
    report being filled and its path (None on ranks other than 0), ``--json``, the stderr console."""

    command: str
    rank: int
    fmt: str
    rep: Any
    report: Optional[Path]
    json_out: bool
    console: Any = field(default_factory=lambda: _stderr_console())

    @property
    def main(self) -> bool:
        return self.rank == 0


def _interrupted(b: _Boundary, stop: KeyboardInterrupt) -> int:
    """Ctrl-C (130) or SIGTERM (143): the report's status ``interrupted``, one line; returns the exit code."""
    # SIGTERM (Slurm's time limit and pre-emption, `kill`) arrives as Terminated: the same
    # clean-up as Ctrl-C (every temporary removed on the way up), exit 128 + 15
    term = isinstance(stop, Terminated)
    code, why = (143, "terminated (SIGTERM)") if term else (130, "interrupted (Ctrl-C or SIGINT)")
    _write_error_report(b.rep, b.report, "interrupted", why)
    if b.main:
        text = f"{why.split(' (')[0]}; outputs written so far are complete, rerun to resume"
        _json_error_out(b.json_out, "interrupted", code, why)
        if b.fmt == "json":
            LineProgress(b.command, "json").emit("interrupted", message=text, exit_code=code)
        else:
            b.console.print(f"neon {b.command}: {text}", markup=False, highlight=False, soft_wrap=True)
    return code


def _failed(b: _Boundary, raw: Exception) -> int:
    """An exception out of the command: the failure report, the error line (and ``--json`` object);
    returns the exit code (:func:`as_neon_error`)."""
    exc = as_neon_error(raw)
    status = exc.status  # "error", or "threshold_exceeded" (exit 1) / "no_improvement" (exit 5)
    note = _write_error_report(b.rep, b.report, status, _one_line(str(exc)))
    if status != "error" and b.json_out:  # a measured outcome: its numbers are the results
        _to_stdout(b.command, lambda: print(json.dumps(b.rep.results, indent=2, default=str)))
    elif b.json_out:  # `neon fid A B --json | jq` gets an object, not an empty stream
        _json_error_out(b.json_out, status, exc.exit_code, _one_line(str(exc)) + note)
    if b.main or not isinstance(raw, NeonError):
        who = f"neon {b.command}" + ("" if b.main else f" (rank {b.rank})")
        if b.fmt == "json":
            LineProgress(b.command, "json").emit("error", message=_one_line(str(exc)) + note, exit_code=exc.exit_code,
                                                 rank=b.rank, error=type(exc).__name__)
        else:
            b.console.print(f"[red]{who}: error:[/red] {_escape(_one_line(str(exc)) + note)}", markup=True, highlight=False,
                            soft_wrap=True)
    return exc.exit_code


def _print_results(b: _Boundary, result: Any, show: Optional[Callable[[Any, Any], None]], json_result: bool = False) -> None:
    """The results on stdout: JSON (``--json``, warnings on stderr; ``result`` itself with
    ``json_result``, else the report's results) or ``show(result, console)``."""
    if b.json_out:
        warnings = b.rep.results.get("warnings") if isinstance(b.rep.results, dict) else None
        for w in warnings if isinstance(warnings, list) else []:  # stderr in every mode (show() prints them otherwise)
            b.console.print(f"[yellow]neon {b.command}: warning:[/yellow] {_escape(str(w))}", highlight=False, soft_wrap=True)
        payload = result if json_result else b.rep.results
        _to_stdout(b.command, lambda: print(json.dumps(payload, indent=2, default=str)), b.rep, b.report)
    elif show is not None:
        _to_stdout(b.command, lambda: show(result, stdout_console()), b.rep, b.report)


class Terminated(KeyboardInterrupt):
    """SIGTERM received (Slurm's time limit or pre-emption, ``kill PID``): raised in the main
    thread like Ctrl-C's KeyboardInterrupt, so every ``finally`` / temporary-file clean-up runs
    the same way; :func:`run` exits 143 (128 + 15) with the report's ``status`` ``interrupted``."""


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Handle SIGTERM by raising :class:`Terminated` for the duration of :func:`run`; returns the
    function restoring the previous handler. Only the main thread can set handlers (elsewhere,
    e.g. a test runner's thread, nothing changes)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)


def _json_error_out(json_out: bool, status: str, code: int, message: str) -> None:
    """With ``--json``, a failure is a JSON object on stdout too: ``{"status", "exit_code", "error"}``."""
    if json_out and sys.stdout is not None:
        with contextlib.suppress(OSError, ValueError):
            print(json.dumps({"status": status, "exit_code": code, "error": message}, indent=2))
            sys.stdout.flush()


def _to_stdout(command: str, write: Callable[[], None], rep: Any = None, report: Optional[Path] = None) -> None:
    """Run ``write`` (the results on stdout) and flush; a closed or full stdout (``> /dev/full``, a
    pipe whose reader quit) ends in one line on stderr and exit 3, never a traceback, and the
    report (if any) says ``status: error``. Later writes to stdout go to /dev/null, so the
    interpreter's own flush at exit stays quiet."""
    try:
        if sys.stdout is None:  # started with stdout closed (`>&-`)
            raise ValueError("stdout is closed")
        write()
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        text = f"cannot write the results to stdout ({reason})"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        if rep is not None and report:
            _write_error_report(rep, report, "error", text)
        _stderr_console().print(f"[red]neon {command}: error:[/red] {_escape(text)}", highlight=False, soft_wrap=True)
        raise typer.Exit(ResourceError.exit_code) from None



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


def _check_plan_first(rep: Any, report: Optional[Path], settings: dict[str, Any], plan: Optional[Callable[[], Any]]) -> Any:
    """Build and check the command's plan before any work; returns it (None without a builder).

    The report path is judged first: when the plan refuses it (or, without a plan, it names a
    path of ``settings``), ``rep`` forgets it, so not even the failure report is written, and the
    UsageError says so. Then any other refusal of the plan (or an error building it) is raised,
    the failure report going to the allowed ``--report``.
    """
    if plan is None:
        try:
            _check_report_path(report, settings)
        except UsageError as exc:
            rep.refuse_path()  # not even the error report goes over an input
            raise UsageError(f"{exc}; no report written") from None
        return None
    from neon_cli.plan import check_plan, report_problem

    try:
        plan_obj = plan()
    except Exception as exc:
        if report:
            try:
                _check_report_path(report, settings)
            except UsageError as refused:
                rep.refuse_path()
                raise UsageError(f"{refused}; no report written") from None
        raise exc
    if report:
        why = report_problem(plan_obj)
        if why:
            rep.refuse_path()
            raise UsageError(f"{why}; no report written")
    check_plan(plan_obj)
    return plan_obj


def _show_plan(results: dict[str, Any], console: Any) -> None:
    """``--dry-run`` without ``--json``: what the run would read and write (a folder's files counted)."""
    plan = results.get("plan") or {}
    console.print("dry run: nothing read or written; the run would use:", highlight=False, markup=False)
    for what in ("reads", "writes"):
        entries = plan.get(what) or []
        for e in entries:
            if e["role"].endswith((" member", " temp", " lock")):
                continue
            inner = sum(1 for x in entries if x["role"] == f"{e['role']} member")
            console.print(f"  {what[:-1]} {e['role']}: {e['path']}" + (f" ({inner} files)" if inner else ""),
                          highlight=False, markup=False)


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
