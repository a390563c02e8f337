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


def hang_guard(default: float = 3600.0) -> float:
    """A subprocess time limit that only catches hangs, never a slow machine: ``$NEON_TEST_TIMEOUT``
    seconds when set, else ``default`` (an hour)."""
    import os

    return float(os.environ.get("NEON_TEST_TIMEOUT", "") or default)


def run_guarded(cmd: Any, what: str, default: float = 3600.0, **kwargs: Any) -> Any:
    """``subprocess.run(cmd, **kwargs)`` under :func:`hang_guard`; a run past it fails the test with a
    message naming ``what``, the limit and the variable that raises it (no bare TimeoutExpired)."""
    import subprocess

    import pytest

    limit = hang_guard(default)
    try:
        return subprocess.run(cmd, timeout=limit, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} ran past the hang guard of {limit:.0f} s (a hang? if this machine is only slow, "
                    f"raise it with NEON_TEST_TIMEOUT=SECONDS)", pytrace=False)
