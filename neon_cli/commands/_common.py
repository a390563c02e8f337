"""What every subcommand shares: the error boundary, the report, progress on stderr, completion.

Subcommand modules only parse flags and call one library function through :func:`run`; they
import torch-using library modules inside the command body, never at module level.

Logs (stderr): with a terminal, rich progress bars; without one (a Slurm or CI log, a pipe), one
line per event with a UTC timestamp, never wrapped, at most one progress line per task per 10 %
of its total or per minute (:class:`LineProgress`); ``--log-format json`` (on every command, or
``$NEON_LOG_FORMAT``) gives one JSON object per event. Every command gets ``--log-format`` from
:class:`NeonTyper`, which also keeps boolean flags free of a ``<bool>`` placeholder in ``--help``.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import enum
import errno
import functools
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import typer
from typer.core import TyperCommand, TyperGroup

from neon_cli.errors import InternalError, NeonError, ResourceError, UsageError

#: Options reused by many commands (defined once so help texts stay consistent).
ReportOpt = typer.Option(None, "--report", help="Write a JSON report (schema neon.report/1) to this file.", dir_okay=False)
JsonOpt = typer.Option(False, "--json", help="Print the results as JSON on stdout (progress goes to stderr).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress (bars or log lines).")
DryRunOpt = typer.Option(False, "--dry-run", help="Check the paths the run would read and write and print them (--json: as JSON); do nothing else.")


def _family_on_line(ctx: Any) -> Optional[str]:
    """The FAMILY (argument or ``--family``) typed so far on the line being completed.

    While completing ``--set VALUE`` the parser stops at the value-less ``--set``, so the words
    typed before it (``$COMP_WORDS`` for bash, ``$_TYPER_COMPLETE_ARGS`` for zsh/fish) are parsed
    again without it.
    """
    import shlex

    name = (ctx.params or {}).get("family")
    if name or ctx.command is None:
        return name
    raw = os.environ.get("_TYPER_COMPLETE_ARGS") or os.environ.get("COMP_WORDS") or ""
    try:
        words = shlex.split(raw)
    except ValueError:
        words = raw.split()
    if ctx.info_name in words:
        words = words[words.index(ctx.info_name) + 1:]
    if "--set" in words:
        words = words[: len(words) - 1 - words[::-1].index("--set")]
    try:
        sub = ctx.command.make_context(ctx.info_name, words, resilient_parsing=True)
    except Exception:
        return None
    return sub.params.get("family")


def complete_setting(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Shell completion for ``--set KEY=VALUE``: the family's setting names (``guidance=``, ...).

    The family is the command's FAMILY argument (or ``--family``) already on the line; only
    entry-point families are asked (a family given as a file path is not imported on TAB). Plugin
    modules must be cheap to import (no torch: the built-in ones import only ``neon_cli.family``).
    ``finetune`` also completes the family's ``train_settings``. After ``KEY=``, a setting with
    choices completes its values. Any failure completes nothing.
    """
    try:
        from neon_cli.family import family_names, get_family

        name = _family_on_line(ctx)
        if not name or name not in family_names():
            return []
        fam = get_family(name)
        settings = list(getattr(fam, "settings", []) or [])
        if ctx.command is not None and ctx.command.name == "finetune":
            settings += list(getattr(fam, "train_settings", []) or [])
        key, sep, _ = incomplete.partition("=")
        if sep:
            for st in settings:
                if st.name == key and getattr(st, "choices", None):
                    return [(f"{key}={c}", _short(st.help or "")) for c in st.choices if f"{key}={c}".startswith(incomplete)]
            return []
        return [(f"{st.name}=", _short(f"default {st.default}: {st.help or ''}")) for st in settings if st.name.startswith(incomplete)]
    except Exception:  # completion never fails loudly
        return []


def _short(text: str, width: int = 56) -> str:
    """A completion help text short enough that no shell's menu (or typer's fish output) wraps it."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", autocompletion=complete_setting,
                      help="Inference setting of the family (repeatable); see 'neon plugins'.")
TrustOpt = typer.Option(
    False, "--trust-pickle",
    help="Let the family run code from the checkpoint to build the model (EDM/IMM .pkl networks). Only for files you trust.")
DetectorOpt = typer.Option(
    None, "--detector", dir_okay=False,
    help="Inception detector inception-2015-12-05.pt for FID (default: $NEON_INCEPTION).")
RefStatsOpt = typer.Option(
    None, "--ref-stats", dir_okay=False,
    help="Reference statistics .npz (mu, sigma) for FID (default: $NEON_REF_STATS).")


DetectorTrustOpt = typer.Option(
    False, "--trust-pickle",
    help="Let a pickled detector (EDM's / StyleGAN3's inception-2015-12-05.pkl) run the code stored in it when it holds "
         "no TorchScript archive (one inside loads without running anything). Only for files you trust.")


def complete_labels(incomplete: str) -> list[tuple[str, str]]:
    from neon_cli.labels import PROTOCOLS, SOURCES

    return [(p, _short(SOURCES[p])) for p in PROTOCOLS if p.startswith(incomplete)]


LabelsOpt = typer.Option(
    "balanced", "--labels", autocompletion=complete_labels,
    help="Class-label protocol of the seed plan: balanced (label = seed % classes), or a paper system's own: "
         "edm (EDM generate.py's per-seed draw), var (VAR generate_dataset.py: class order, seed restarts per class), "
         "xar (xAR eval.py: labels sorted by class).")


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


class LineProgress:
    """A :class:`neon_cli.progress.ProgressFn` writing one line per event, for logs that are read
    with ``grep`` / ``tail -f`` (Slurm, CI, a pipe): never wrapped, whatever the terminal width.

    Events: a task's first update (or a restart: ``done`` going down), then a progress line when
    it has passed another ``every_fraction`` of its total and ``min_seconds`` went by since its last
    line, or ``every_seconds`` went by, its completion (``done >= total``), and every ``message`` /
    ``row`` info. Updates in between are dropped, so a long job writes about ten lines per task
    plus one a minute, a task of a few seconds two, never one per batch.

    ``fmt="plain"``: ``2026-11-21T10:00:03Z neon synth: synth 1024/4000 img (26%) 12.3s eta 35.2s``
    (messages ``... neon finetune: finetune: snapshot theta_s-000010000.safetensors``, rows
    ``... neon tune-w: tune-w: w=0.8 gamma=2 fid=0.3309``). ``fmt="json"``: one object per line,
    ``{"time", "command", "task", "event": "start"|"progress"|"done"|"message"|"row", "done",
    "total", "unit", "elapsed_s", "eta_s", "message", "row", ...numeric infos such as "loss"}``.
    Times are UTC (ISO 8601, second resolution); ``elapsed_s``/``eta_s`` are seconds since the
    task's first update and the linear estimate of the rest.
    """

    def __init__(self, command: str, fmt: str = "plain", stream: TextIO | None = None, every_fraction: float = 0.1,
                 every_seconds: float = 60.0, min_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.command = command
        self.fmt = fmt
        self.stream = stream
        self.every_fraction = every_fraction
        self.every_seconds = every_seconds
        self.min_seconds = min_seconds
        self.clock = clock
        self._tasks: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    # -- events ----------------------------------------------------------------------------
    def __call__(self, task: str, done: float, total: float | None = None, **info: Any) -> None:
        now = self.clock()
        st = self._tasks.get(task)
        if st is None or done < st["done"]:
            st = self._tasks[task] = {"t0": now, "last_t": now, "done": done, "bucket": self._bucket(done, total), "finished": False}
            if not self._complete(done, total):
                self._progress_event("start", task, done, total, st, now, info)
        msg, row = info.get("message"), info.get("row")
        if msg:
            self.emit("message", task, done=done, total=total, message=_one_line(str(msg)))
        if row:
            self.emit("row", task, done=done, total=total, row=dict(row))
        bucket = self._bucket(done, total)
        st["done"] = done
        if self._complete(done, total):
            if not st["finished"]:
                st["finished"] = True
                self._progress_event("done", task, done, total, st, now, info)
        elif (bucket > st["bucket"] and now - st["last_t"] >= self.min_seconds) or now - st["last_t"] >= self.every_seconds:
            self._progress_event("progress", task, done, total, st, now, info)
            st["bucket"] = bucket

    def _bucket(self, done: float, total: float | None) -> int:
        if not total or total <= 0:
            return 0
        return int(max(0.0, min(1.0, done / total)) / self.every_fraction + 1e-9)

    @staticmethod
    def _complete(done: float, total: float | None) -> bool:
        return total is not None and total > 0 and done >= total

    def _progress_event(self, event: str, task: str, done: float, total: float | None, st: dict[str, Any], now: float,
                        info: dict[str, Any]) -> None:
        st["last_t"] = now
        elapsed = now - st["t0"]
        eta = None
        if total and 0 < done < total and elapsed > 0:
            eta = elapsed * (total - done) / done
        extra = {k: v for k, v in info.items() if k not in ("message", "row", "unit") and isinstance(v, (int, float, str, bool))}
        self.emit(event, task, done=done, total=total, unit=info.get("unit"), elapsed_s=round(elapsed, 3),
                  eta_s=None if eta is None else round(eta, 3), **extra)

    def emit(self, event: str, task: str | None = None, **fields: Any) -> None:
        """Write one event line (plain or JSON); ``None`` fields are left out."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        fields = {k: v for k, v in fields.items() if v is not None}
        if self.fmt == "json":
            line = json.dumps({"time": stamp, "command": self.command, "task": task, "event": event, **fields},
                              default=str, separators=(",", ":"))
        else:
            line = f"{stamp} neon {self.command}: " + _plain_event(event, task, fields)
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()


def _plain_event(event: str, task: str | None, f: dict[str, Any]) -> str:
    if event == "message":
        return f"{task}: {f.get('message', '')}"
    if event == "row":
        return f"{task}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in f.get("row", {}).items())
    if event in ("start", "progress", "done"):
        done, total, unit = f.get("done", 0), f.get("total"), f.get("unit")
        text = f"{task} {_fmt_count(done)}" + (f"/{_fmt_count(total)}" if total is not None else "") + (f" {unit}" if unit else "")
        if total:
            text += f" ({100.0 * done / total:.0f}%)"
        if event != "start":
            text += f" {f.get('elapsed_s', 0):.1f}s"
        if f.get("eta_s") is not None:
            text += f" eta {f['eta_s']:.1f}s"
        extras = [f"{k}={_fmt(v)}" for k, v in f.items() if k not in ("done", "total", "unit", "elapsed_s", "eta_s")]
        text += "".join(" " + e for e in extras)
        return text + (" done" if event == "done" else "")
    return " ".join(f"{k}={_fmt(v)}" for k, v in f.items())


def _fmt_count(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


class LogFormat(str, enum.Enum):
    """``--log-format``: how progress and errors are written to stderr."""

    auto = "auto"    # rich bars on a terminal, plain lines otherwise
    rich = "rich"    # rich progress bars (as on a terminal)
    plain = "plain"  # one timestamped text line per event
    json = "json"    # one JSON object per event


#: the ``--log-format`` of the command being run (set by :func:`with_log_format`)
_LOG_FORMAT: contextvars.ContextVar[str] = contextvars.ContextVar("neon_log_format", default="auto")

LogFormatOpt = typer.Option(
    LogFormat.auto, "--log-format", metavar="FORMAT", envvar="NEON_LOG_FORMAT", show_envvar=True, case_sensitive=False,
    help="Progress/errors on stderr: auto (rich bars on a terminal, else one timestamped line per event), "
         "rich, plain, or json (one JSON object per event).")


def log_format(stream: Any = None) -> str:
    """The effective log format: ``rich``, ``plain`` or ``json`` (``auto`` resolved on ``stream``,
    default stderr: rich if it is a terminal)."""
    fmt = str(getattr(_LOG_FORMAT.get(), "value", _LOG_FORMAT.get())).lower()
    if fmt in ("rich", "plain", "json"):
        return fmt
    stream = stream if stream is not None else sys.stderr
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):
        tty = False
    return "rich" if tty else "plain"


def with_log_format(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with one more keyword parameter, ``log_format`` (``--log-format``), that sets the log
    format for the duration of the call; typer reads the extended signature."""
    sig = inspect.signature(fn, eval_str=True)
    if "log_format" in sig.parameters:
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, log_format: Any = LogFormat.auto, **kwargs: Any) -> Any:
        token = _LOG_FORMAT.set(getattr(log_format, "value", log_format))
        try:
            return fn(*args, **kwargs)
        finally:
            _LOG_FORMAT.reset(token)

    extra = inspect.Parameter("log_format", inspect.Parameter.KEYWORD_ONLY, default=LogFormatOpt, annotation=LogFormat)
    params = list(sig.parameters.values())
    wrapper.__signature__ = sig.replace(parameters=params + [extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "log_format": LogFormat}
    return wrapper


def _hide_flag_placeholders(params: list[Any]) -> list[Any]:
    """Boolean flags take no value, so ``--help`` must not show a ``<bool>`` after them (typer's
    rich help prints every option's type, flags included; an empty metavar prints nothing)."""
    for p in params:
        if getattr(p, "is_flag", False) and getattr(p, "metavar", None) is None:
            p.metavar = ""
    return params


class NeonCommand(TyperCommand):
    """Every neon subcommand: flags without a ``<bool>`` placeholder in ``--help``; with ``--json``
    on the line, a flag the parser refuses (a missing option, ``--batch abc``) is also a JSON
    object on stdout, as every other error is (:func:`run`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _hide_flag_placeholders(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        from typer._click.exceptions import UsageError as ClickUsageError

        from neon_cli.plan import note_empty_paths

        wants_json = "--json" in args
        typed = list(args)
        try:
            rest = super().parse_args(ctx, args)
        except ClickUsageError as exc:
            _json_error_out(wants_json, "error", exc.exit_code, _one_line(exc.format_message()))
            raise
        note_empty_paths(self.params, ctx.params, typed)  # typer turns a Path option's '' into '.'
        return rest


class NeonGroup(TyperGroup):
    """The ``neon`` group: its own flags (``--version``, ``--install-completion``) without ``<bool>``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _hide_flag_placeholders(super().get_params(ctx))


class NeonTyper(typer.Typer):
    """``typer.Typer`` whose commands are :class:`NeonCommand` and all take ``--log-format``.

    Defined once here so every command, including those registered by later modules, gets the
    same log option and help rendering without repeating it in each signature.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("cls", NeonGroup)
        super().__init__(*args, **kwargs)

    def command(self, name: Optional[str] = None, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        kwargs.setdefault("cls", NeonCommand)
        decorator = super().command(name, **kwargs)

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            decorator(with_log_format(fn))
            return fn

        return register


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
    plan: Optional[Callable[[], Any]] = None,
    dry_run: bool = False,
    dry_run_calls_fn: bool = False,
) -> Any:
    """Call ``fn(report=Report, progress=callback)``: the one error boundary of every command.

    ``plan``: a builder of the command's :class:`neon_cli.plan.Plan` (every path it reads and
    writes). Before ``fn`` runs the plan is checked (:func:`neon_cli.plan.check_plan`), and the
    failure report is written only where the plan allows ``--report``
    (:func:`neon_cli.plan.report_problem`): a report path that is an input, another output, a file
    inside either, a device, FIFO or socket gets no report at all, and the error line says so.
    ``dry_run`` (``--dry-run``): the plan goes into the results (``"plan": {"reads", "writes"}``,
    printed with ``--json``) and ``fn`` is not called, unless ``dry_run_calls_fn`` (merge's own
    header-only validation, whose results then carry the plan too).

    ``fn`` fills the report's inputs/outputs/results and returns its result. On success the
    report is written (if asked), results printed as JSON (``--json``) or by ``show(result,
    console)``. Before ``fn`` runs, ``--report`` is checked against every path on the command line
    (it may not be an input or another output, in any spelling: :func:`neon_cli.fsutil.same_file`).

    Progress goes to stderr as the command's ``--log-format`` says (:func:`log_format`: rich bars
    on a terminal, else :class:`LineProgress` lines; nothing with ``-q``), also with ``--json``.

    Whatever ``fn`` raises becomes one line ``neon COMMAND: error: MESSAGE`` on stderr (the last
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
    from neon_cli.dist import env_world, init_from_env, shutdown
    from neon_cli.report import Report

    console = _stderr_console()
    fmt = log_format()
    rank = env_world()[0]
    main = rank == 0
    rep = Report(command, settings=_jsonable(settings), path=report)
    # under torchrun/srun every rank runs this; only rank 0 draws progress, prints and writes the report
    if not main:
        report, json_out, show = None, False, None
    restore_sigterm = _sigterm_as_interrupt()
    try:
        plan_obj = _check_plan_first(rep, report, settings, plan)
        init_from_env()
        with _progress_renderer(command, fmt, enabled=main and not quiet) as progress:
            if dry_run and plan_obj is not None:
                rep.results["plan"] = plan_obj.to_json()
                rep.results.setdefault("dry_run", True)
            result = fn(report=rep, progress=progress) if not dry_run or dry_run_calls_fn else rep.results
        if report:
            rep.write(report)
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt as stop:
        if os.environ.get("NEON_DEBUG"):
            raise
        # SIGTERM (Slurm's time limit and pre-emption, `kill`) arrives as Terminated: the same
        # clean-up as Ctrl-C (every temporary removed on the way up), exit 128 + 15
        term = isinstance(stop, Terminated)
        code, why = (143, "terminated (SIGTERM)") if term else (130, "interrupted (Ctrl-C or SIGINT)")
        _write_error_report(rep, report, "interrupted", why)
        if main:
            text = f"{why.split(' (')[0]}; outputs written so far are complete, rerun to resume"
            _json_error_out(json_out, "interrupted", code, why)
            if fmt == "json":
                LineProgress(command, "json").emit("interrupted", message=text, exit_code=code)
            else:
                console.print(f"neon {command}: {text}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code)
    except Exception as raw:
        if os.environ.get("NEON_DEBUG") or type(raw).__module__.split(".")[0] in ("typer", "click"):
            raise  # a traceback on request; the CLI framework's own exits and usage errors as they are
        exc = as_neon_error(raw)
        status = exc.status  # "error", or "threshold_exceeded" (exit 1) / "no_improvement" (exit 5)
        note = _write_error_report(rep, report, status, _one_line(str(exc)))
        if status != "error" and json_out:  # a measured outcome: its numbers are the results
            _to_stdout(command, lambda: print(json.dumps(rep.results, indent=2, default=str)))
        elif json_out:  # `neon fid A B --json | jq` gets an object, not an empty stream
            _json_error_out(json_out, status, exc.exit_code, _one_line(str(exc)) + note)
        if main or not isinstance(raw, NeonError):
            who = f"neon {command}" + ("" if main else f" (rank {rank})")
            if fmt == "json":
                LineProgress(command, "json").emit("error", message=_one_line(str(exc)) + note, exit_code=exc.exit_code,
                                                   rank=rank, error=type(exc).__name__)
            else:
                console.print(f"[red]{who}: error:[/red] {_escape(_one_line(str(exc)) + note)}", markup=True, highlight=False,
                              soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    finally:
        restore_sigterm()
        shutdown()
    if dry_run and not dry_run_calls_fn and not json_out and main:
        show = _show_plan
    if json_out:
        warnings = rep.results.get("warnings") if isinstance(rep.results, dict) else None
        for w in warnings if isinstance(warnings, list) else []:  # stderr in every mode (show() prints them otherwise)
            console.print(f"[yellow]neon {command}: warning:[/yellow] {_escape(str(w))}", highlight=False, soft_wrap=True)
        _to_stdout(command, lambda: print(json.dumps(rep.results, indent=2, default=str)), rep, report)
    elif show is not None:
        _to_stdout(command, lambda: show(result, stdout_console()), rep, report)
    return result


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


def stdout_console() -> Any:
    """The rich console for results on stdout: terminal width on a terminal; when stdout is a pipe
    or a file, wide enough that no table cell or line is cut or wrapped (``neon plugins | cat``,
    tune-w's snapshot names, merge's paths stay whole)."""
    from rich.console import Console

    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    return Console(soft_wrap=True) if tty else Console(soft_wrap=True, width=100_000)


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


def _progress_renderer(command: str, fmt: str, enabled: bool) -> Any:
    """The progress callback of a command: rich bars (``fmt="rich"``) or :class:`LineProgress`."""
    if fmt == "rich" or not enabled:
        return RichProgress(enabled=enabled)
    return LineProgress(command, fmt)


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
    from neon_cli.errors import clean_line  # no terminal escapes from torch or a family in the error line

    return clean_line(text, limit=4000)


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
