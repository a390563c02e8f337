"""What every subcommand shares: the common options and the typer classes; the rest re-exported.

Subcommand modules only parse flags, build one request object (:mod:`neon_cli.requests`) and
call one library function through :func:`run`; they import torch-using library modules inside the
command body, never at module level. The shared pieces live in three modules:

* :mod:`neon_cli.commands.boundary`: the error boundary :func:`run` (plan check, report, exit codes);
* :mod:`neon_cli.commands.logs`: log rendering on stderr (rich bars, :class:`LineProgress`,
  ``--log-format``) and the stdout console;
* :mod:`neon_cli.commands.completion`: shell completion of FAMILY and ``--set``.

Their names other modules import are re-exported here (``from neon_cli.commands._common import
run, ReportOpt, ...`` keeps working). :class:`NeonTyper` gives every command ``--log-format`` and
keeps boolean flags free of a ``<bool>`` placeholder in ``--help``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from neon_cli.commands.boundary import (
    Terminated,
    _check_plan_first,
    _check_report_path,
    _flag_of,
    _json_error_out,
    _jsonable,
    _show_plan,
    _sigterm_as_interrupt,
    _to_stdout,
    _write_error_report,
    as_neon_error,
    run,
)
from neon_cli.commands.completion import _family_on_line, _short, complete_family, complete_labels, complete_setting
from neon_cli.commands.logs import (
    LineProgress,
    LogFormat,
    LogFormatOpt,
    RichProgress,
    _escape,
    _fmt,
    _one_line,
    _progress_renderer,
    _stderr_console,
    log_format,
    stdout_console,
    with_log_format,
)

#: Re-exported for the command modules (and other branches) that import them from here.
__all__ = [
    "DetectorOpt", "DetectorTrustOpt", "DryRunOpt", "LabelsOpt", "JsonOpt", "LineProgress", "LogFormat", "LogFormatOpt", "NeonCommand", "NeonGroup",
    "NeonTyper", "QuietOpt", "RefStatsOpt", "ReportOpt", "RichProgress", "SetOpt", "Terminated", "TrustOpt",
    "_check_plan_first", "_check_report_path", "_escape", "_family_on_line", "_flag_of", "_fmt", "_json_error_out",
    "_jsonable", "_one_line", "_progress_renderer", "_short", "_show_plan", "_sigterm_as_interrupt", "_stderr_console",
    "_to_stdout", "_write_error_report", "as_neon_error", "complete_family", "complete_labels", "complete_setting", "log_format", "run",
    "stdout_console", "with_log_format",
]

#: Options reused by many commands (defined once so help texts stay consistent).
ReportOpt = typer.Option(None, "--report", help="Write a JSON report (schema neon.report/1) to this file.", dir_okay=False)
JsonOpt = typer.Option(False, "--json", help="Print the results as JSON on stdout (progress goes to stderr).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress (bars or log lines).")
DryRunOpt = typer.Option(False, "--dry-run", help="Check the paths the run would read and write and print them (--json: as JSON); do nothing else.")

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
LabelsOpt = typer.Option(
    "balanced", "--labels", autocompletion=complete_labels,
    help="Class-label protocol of the seed plan: balanced (label = seed % classes), or a paper system's own: "
         "edm (EDM generate.py's per-seed draw), var (VAR generate_dataset.py: class order, seed restarts per class), "
         "xar (xAR eval.py: labels sorted by class).")


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
