"""The JSON report every command can write (``--report FILE``), one schema for all commands.

Schema ``neon.report/1`` (keys always present)::

    {
      "schema": "neon.report/1",
      "command": "merge",                      # subcommand name
      "argv": ["neon", "merge", ...],          # the command line as typed
      "versions": {"neon": "0.1.0", "torch": "2.13.0", "python": "3.11.7", "family": {...},
                   "checkouts": {"edm": {"path", "commit", "dirty", "toplevel"}}},  # official code used, if any
      "started_at": "2026-11-21T10:00:00Z",   # UTC, ISO 8601
      "wall_seconds": 12.3,
      "inputs": [{"role": "base", "path": "...", "sha256": "..."}],
      "outputs": [{"role": "merged", "path": "...", "sha256": "..."}],
      "settings": {...},                       # every option that affects the result
      "results": {...},                        # command-specific numbers (documented per command)
      "status": "ok" | "threshold_exceeded" | "no_improvement" | "interrupted" | "error",
      "error": null | "one-line message"
    }

A script acts on ``status`` and ``results`` without parsing logs. ``status`` is ``error`` for
every failure that reaches the command line, whatever its cause (bad input, a full disk, a bug).
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
    """Accumulates one command's report. Library functions fill ``inputs``/``results``.

    ``path`` is where ``--report`` will write it (None: no report file); library functions pass it
    to :meth:`check_outputs` so the report can never replace an input.
    """

    def __init__(self, command: str, argv: list[str] | None = None, settings: dict[str, Any] | None = None,
                 path: str | Path | None = None):
        self.command = command
        self.path = Path(path) if path is not None else None
        #: True once the path was found to clash with an input or output: :meth:`write` then refuses it
        self.path_refused = False
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

    def check_outputs(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        """:func:`neon_cli.fsutil.check_outputs` of ``inputs`` against ``outputs`` plus ``--report``
        (this report's own file): raises UsageError naming both flags before any work.

        When the clash is the report's own path, :attr:`path` is dropped first, so not even the
        error report is written there.
        """
        from neon_cli.fsutil import check_outputs, same_file

        if self.path is not None:
            try:
                check_outputs(inputs, {"--report": self.path})
                for flag, value in outputs.items():
                    if value is not None and same_file(self.path, value):
                        from neon_cli.errors import UsageError

                        raise UsageError(f"--report: {self.path} is also the output of {flag}; give each output its own path")
            except Exception:
                self.refuse_path()
                raise
        check_outputs(inputs, outputs)

    def refuse_path(self) -> None:
        """Never write this report to :attr:`path` (it names an input or another output)."""
        self.path = None
        self.path_refused = True

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
        repo_mod = sys.modules.get("neon_cli.repo")  # imported only by families that use an official checkout
        name = self.family.get("name") if isinstance(self.family, dict) else None
        if repo_mod is not None and name in repo_mod.USED:
            versions["checkouts"] = repo_mod.provenance([name])  # path, commit and dirty state of the family's checkout
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
        """Write the report atomically as JSON.

        Raises UsageError, writing nothing, when ``path`` was refused (:meth:`check_outputs`) or is
        the same file as an input recorded in :attr:`inputs` (a report never replaces an input).
        """
        from neon_cli.errors import UsageError
        from neon_cli.fsutil import same_file

        if self.path_refused:
            raise UsageError(f"--report: {path} names an input or another output; not written")
        for inp in self.inputs:
            if same_file(path, inp["path"]):
                raise UsageError(f"--report: {path} is also the input {inp['role']}; not written")
        return write_json(path, self.to_dict())
