"""Which Inception detector and reference statistics a scoring command uses.

Families that report Inception FID read the detector from ``$NEON_INCEPTION`` and the reference
statistics from ``$NEON_REF_STATS`` (see :mod:`neon_cli.inception`). The scoring commands
(``eval``, ``tune-w``, ``fid``) also take them as ``--detector FILE`` / ``--ref-stats FILE``:
:func:`scoring_files` makes the flags visible to the family for the duration of the command, the
flag winning over the variable, and :func:`provenance` gives their sha256 for reports and the
tune-w cache key (FIDs from different detectors or references are not comparable).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from neon_cli.errors import UsageError

DETECTOR_ENV = "NEON_INCEPTION"
REF_ENV = "NEON_REF_STATS"


@contextlib.contextmanager
def scoring_files(detector: str | os.PathLike[str] | None = None,
                  ref_stats: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Within the block, ``$NEON_INCEPTION`` / ``$NEON_REF_STATS`` name ``detector`` / ``ref_stats``
    when given (the previous values are restored afterwards). Yields :func:`provenance`.

    Raises UsageError naming ``--detector`` / ``--ref-stats`` for a path that is not a file.
    """
    saved = {k: os.environ.get(k) for k in (DETECTOR_ENV, REF_ENV)}
    try:
        for flag, var, value in (("--detector", DETECTOR_ENV, detector), ("--ref-stats", REF_ENV, ref_stats)):
            if value is None or str(value) == "":
                continue
            if not Path(value).is_file():
                raise UsageError(f"{flag}: {value} is not a file")
            os.environ[var] = str(Path(value))
        yield provenance()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_WHAT = {"detector": "an Inception detector", "ref_stats": "reference statistics"}


def check_family_scoring(family: Any, family_name: str, detector: Any = None, ref_stats: Any = None) -> None:
    """Before the first sample, inside :func:`scoring_files`: refuse ``--detector`` /
    ``--ref-stats`` for a family that declares it does not use them (``scoring_files``, a tuple of
    ``"detector"`` / ``"ref_stats"``; ``()`` for families that score with their own reference,
    e.g. digits' classifier; a family without the attribute is not checked), then run the
    family's optional ``check_scoring()`` (the image families: statistics named and readable).
    Raises UsageError naming the flag and the family."""
    uses = getattr(family, "scoring_files", None)
    if uses is not None:
        for flag, key, value in (("--detector", "detector", detector), ("--ref-stats", "ref_stats", ref_stats)):
            if value is not None and str(value) != "" and key not in uses:
                metrics = ", ".join(getattr(family, "metrics", ()) or ()) or "none"
                raise UsageError(f"{flag}: family {family_name!r} does not use {_WHAT[key]} (it scores "
                                 f"{metrics} against its own reference); leave {flag} out")
    check = getattr(family, "check_scoring", None)
    if callable(check):
        check()


def provenance() -> dict[str, Any]:
    """``{"detector": {"path", "sha256"} | None, "ref_stats": {...} | None}`` of the files the
    environment names now (a named file that does not exist gets ``"sha256": None``)."""
    from neon_cli.fsutil import sha256_file

    out: dict[str, Any] = {}
    for key, var in (("detector", DETECTOR_ENV), ("ref_stats", REF_ENV)):
        raw = os.environ.get(var, "")
        if not raw:
            out[key] = None
            continue
        p = Path(raw)
        out[key] = {"path": str(p), "sha256": sha256_file(p) if p.is_file() else None}
    return out
