"""One way for the tests to run the ``neon`` app in-process and check its exit code."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner


def invoke(*args: Any, code: int | tuple[int, ...] = 0) -> Any:
    """Run ``neon ARGS...`` (each argument through ``str``) with typer's CliRunner and assert that
    it exited with ``code`` (one of them, for a tuple: e.g. ``(0, 5)`` for a tiny tune-w run that
    need not beat the base). Returns the click Result."""
    from neon_cli.commands import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    allowed = code if isinstance(code, tuple) else (code,)
    assert res.exit_code in allowed, res.output + repr(res.exception)
    return res
