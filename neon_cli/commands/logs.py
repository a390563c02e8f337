"""Log rendering on stderr: progress (rich bars or one line per event), ``--log-format``, consoles.

Logs (stderr): with a terminal, rich progress bars; without one (a Slurm or CI log, a pipe), one
line per event with a UTC timestamp, never wrapped, at most one progress line per task per 10 %
of its total or per minute (:class:`LineProgress`); ``--log-format json`` (on every command, or
``$NEON_LOG_FORMAT``) gives one JSON object per event. Every command gets ``--log-format`` from
:class:`neon_cli.commands._common.NeonTyper` through :func:`with_log_format`. Results on stdout go
through :func:`stdout_console`.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import enum
import functools
import inspect
import json
import sys
import time
from typing import Any, Callable, TextIO

import typer


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


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _one_line(text: str) -> str:
    from neon_cli.errors import clean_line  # no terminal escapes from torch or a family in the error line

    return clean_line(text, limit=4000)


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


def _progress_renderer(command: str, fmt: str, enabled: bool) -> Any:
    """The progress callback of a command: rich bars (``fmt="rich"``) or :class:`LineProgress`."""
    if fmt == "rich" or not enabled:
        return RichProgress(enabled=enabled)
    return LineProgress(command, fmt)
