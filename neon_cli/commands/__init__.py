"""The ``neon`` command-line app (typer). Importing it does not import torch.

Each subcommand lives in its own module with a ``register(app)`` function; the module only parses
flags, builds the command's request (:mod:`neon_cli.requests`) and calls one library function
through the error boundary :func:`neon_cli.commands.boundary.run`.
"""

from __future__ import annotations

import typer

from neon_cli import __version__
from neon_cli.commands._common import NeonTyper

app = NeonTyper(
    name="neon",
    help=(
        "Neon: improve a trained generator with its own samples. "
        "synth -> finetune -> tune-w -> merge (theta_Neon = theta_r - w (theta_s - theta_r)).\n\n"
        "Exit codes: 0 ok, 1 regression threshold exceeded, 2 bad input, 3 resource (disk, memory), "
        "4 internal error, 5 tune-w found nothing that beats the base, 130 interrupted, 143 terminated (SIGTERM). Every command takes --report FILE (JSON, neon.report/1) and "
        "--log-format auto|rich|plain|json ($NEON_LOG_FORMAT)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        print(f"neon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
) -> None:
    """Neon for generative-model checkpoints."""


# Registration order is the order in --help. Each module imports only typer at module level.
from neon_cli.commands import (  # noqa: E402
    align,
    demo,
    eval as eval_cmd,
    export,
    fid,
    finetune,
    inspect as inspect_cmd,
    merge,
    plugins,
    refstats,
    synth,
    tune,
)

for _mod in (synth, finetune, merge, inspect_cmd, tune, eval_cmd, fid, export, demo, align, refstats, plugins):
    _mod.register(app)


def main() -> None:
    """Console-script entry point (``neon``)."""
    app(prog_name="neon")
