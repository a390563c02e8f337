"""The JSON report every command can write (``--report FILE``), one schema for all commands.

Schema ``neon.report/1`` (keys always present)::

    {
      "schema": "neon.report/1",
      "command": "merge",                      # subcommand name
      "argv": ["neon", "merge", ...],          # the command line as typed
      "versions": {"neon": "0.1.0", "torch": "2.13.0", "python": "3.11.7", "family": {...}},
      "started_at": "2026-11-21T10:00:00Z",   # UTC, ISO 8601
      "wall_seconds": 12.3,
      "inputs": [{"role": "base", "path": "...", "sha256": "..."}],
      "outputs": [{"role": "merged", "path": "...", "sha256": "..."}],
      "settings": {...},                       # every option that affects the result
      "results": {...},                        # command-specific numbers (documented per command)
      "status": "ok" | "threshold_exceeded" | "error",
      "error": null | "one-line message"
    }

A script acts on ``status`` and ``results`` without parsing logs.
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
import time
from pathlib import Path
from typing import Any

from neon_cli import __version__
from neon_cli.fsutil import sha256_path, write_json

SCHEMA = "neon.report/1"


class Report:
    """Accumulates one command's report. Library functions fill ``inputs``/``results``."""

    def __init__(self, command: str, argv: list[str] | None = None, settings: dict[str, Any] | None = None):
        self.command = command
        self.argv = list(sys.argv if argv is None else argv)
        self.settings: dict[str, Any] = dict(settings or {})
        self.inputs: list[dict[str, Any]] = []
        self.outputs: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.family: dict[str, Any] | None = None
        self.status = "ok"
        self.error: str | None = None
        self._t0 = time.perf_counter()
        self.started_at = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def add_input(self, role: str, path: str | Path, sha256: str | None = None) -> str:
        """Record an input file or directory with its sha256 (computed if not given); returns it."""
        digest = sha256 or sha256_path(path)
        self.inputs.append({"role": role, "path": str(path), "sha256": digest})
        return digest

    def add_output(self, role: str, path: str | Path, sha256: str | None = None) -> None:
        """Record an output file or directory with its sha256 (computed if not given)."""
        self.outputs.append({"role": role, "path": str(path), "sha256": sha256 or sha256_path(path)})

    def to_dict(self) -> dict[str, Any]:
        versions: dict[str, Any] = {"neon": __version__, "python": platform.python_version()}
        torch = sys.modules.get("torch")
        versions["torch"] = getattr(torch, "__version__", None)
        if self.family:
            versions["family"] = self.family
        return {
            "schema": SCHEMA,
            "command": self.command,
            "argv": self.argv,
            "versions": versions,
            "started_at": self.started_at,
            "wall_seconds": round(time.perf_counter() - self._t0, 3),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "settings": self.settings,
            "results": self.results,
            "status": self.status,
            "error": self.error,
        }

    def write(self, path: str | Path) -> Path:
        """Write the report atomically as JSON."""
        return write_json(path, self.to_dict())
