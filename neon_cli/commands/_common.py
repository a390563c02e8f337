"""What every subcommand shares: the error boundary, the report, the rich progress callback.

Subcommand modules only parse flags and call one library function through :func:`run`; they
import torch-using library modules inside the command body, never at module level.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from neon_cli.errors import NeonError

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
        if self.enabled:
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
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, task: str, done: float, total: float | None = None, **info: Any) -> None:
        if not self.enabled:
            return
        msg = info.get("message")
        row = info.get("row")
        if msg:
            self._console.print(f"[dim]{task}:[/dim] {msg}")
        if row:
            self._console.print(f"[dim]{task}:[/dim] " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
        if self._progress is None:
            return
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total)
        self._progress.update(self._tasks[task], completed=done, total=total)


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
    """Call ``fn(report=Report, progress=callback)``; turn errors into a one-line message + exit code.

    ``fn`` fills the report's inputs/outputs/results and returns its result. On success the
    report is written (if asked), results printed as JSON (``--json``) or by ``show(result,
    console)``. A :class:`NeonError` prints ``neon COMMAND: error: MESSAGE`` on stderr, writes the
    report with ``status: error`` and exits with the error's code (2 for bad input, 1 for a
    threshold exceeded). ``NEON_DEBUG=1`` re-raises instead, for a traceback. Under torchrun the
    process group is initialised here (:mod:`neon_cli.dist`) and only rank 0 prints or writes.
    """
    from neon_cli.dist import env_world, init_from_env, shutdown
    from neon_cli.report import Report

    rep = Report(command, settings=_jsonable(settings))
    console = _stderr_console()
    # under torchrun/srun every rank runs this; only rank 0 draws progress, prints and writes the report
    main = env_world()[0] == 0
    if not main:
        report, json_out, show = None, False, None
    try:
        init_from_env()
        with RichProgress(enabled=main and not quiet and not json_out) as progress:
            result = fn(report=rep, progress=progress)
    except NeonError as exc:
        if os.environ.get("NEON_DEBUG"):
            raise
        rep.status = "threshold_exceeded" if exc.exit_code == 1 else "error"
        rep.error = str(exc)
        if report:
            rep.write(report)
        if exc.exit_code == 1 and json_out:
            print(json.dumps(rep.results, indent=2, default=str))
        console.print(f"[red]neon {command}: error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print(f"neon {command}: interrupted; outputs written so far are complete, rerun to resume")
        raise typer.Exit(130)
    finally:
        shutdown()
    if report:
        rep.write(report)
    if json_out:
        print(json.dumps(rep.results, indent=2, default=str))
    elif show is not None:
        from rich.console import Console

        show(result, Console())
    return result


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}


def die(message: str, code: int = 2) -> None:
    """Print a one-line error for a flag problem caught in the CLI layer and exit."""
    print(message, file=sys.stderr)
    raise typer.Exit(code)
