"""The tune-w evaluation cache: a JSON-lines file of measured candidates, and the keys that name
everything that determines a measured value (issue 12, item 8). Torch-free."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from neon_cli.tune.common import _rkey


def static_key(family: Any, family_version: str | None, *, batch: int,
               scoring: Mapping[str, Any] | None = None, labels: str = "balanced") -> dict[str, Any]:
    """The parts of a cache key that one tune-w run shares for all its candidates.

    * ``family`` (name) and ``family_version`` (its distribution's version);
    * ``metrics_version``: the family's optional attribute ``metrics_version`` (a string the
      family changes whenever its metrics' definition changes: feature extractor, reference
      data, k of precision/recall); present only when the family declares one;
    * ``batch``: the sampling batch size, unless the family declares ``batch_invariant = True``
      (image i depends on seed i alone, bit for bit, whatever the batch; see
      :class:`neon_cli.family.Family`): batched kernels may round differently per batch size;
    * ``scoring``: the sha256 of the Inception detector and of the reference statistics in
      effect (:func:`neon_cli.scoring.provenance`: from ``--detector`` / ``--ref-stats`` or from
      ``$NEON_INCEPTION`` / ``$NEON_REF_STATS``), present when either is set: FIDs against
      different detectors or references are different numbers;
    * ``labels``: the ``--labels`` protocol (:mod:`neon_cli.labels`), present unless ``balanced``
      (so caches written before the flag existed stay valid).
    """
    key: dict[str, Any] = {"family": family.name, "family_version": family_version}
    mv = getattr(family, "metrics_version", None)
    if mv is not None:
        key["metrics_version"] = str(mv)
    if not getattr(family, "batch_invariant", False):
        key["batch"] = int(batch)
    if scoring and any(scoring.values()):
        key["scoring"] = {k: (v or {}).get("sha256") for k, v in scoring.items()}
    if labels != "balanced":
        key["labels"] = labels
    return key


def evaluation_key(static: Mapping[str, Any], *, model: str, selftrained: str | None, w: float,
                   settings: Mapping[str, Any], guidance: str | None, seed: int, num_samples: int) -> dict[str, Any]:
    """The cache key of one candidate: ``static`` (:func:`static_key`) plus the model, w, the
    settings and the seed plan.

    ``model``: sha256 of theta_r (or of the checkpoint scored as is); ``selftrained``: sha256 of
    theta_s, None when ``model`` is scored without merging (then ``w`` is 0); ``settings``: the
    resolved inference settings of this candidate; ``guidance``: the name of the family's
    guidance setting (its value is repeated as ``gamma``); ``seed``, ``num_samples``: the seed
    plan. w and gamma are rounded to 12 decimals.
    """
    gamma = _rkey(settings.get(guidance)) if guidance else None
    return {**static, "base": model, "selftrained": selftrained, "w": _rkey(w), "gamma": gamma,
            "settings": dict(settings), "seed": int(seed), "num_samples": int(num_samples)}


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class EvalCache:
    """A JSON-lines file of evaluations: reruns reuse them and an interrupted search resumes.

    One line per evaluation: ``{"key": {...}, "metrics": {...}, "seconds": float, "at": ISO
    time}``. The key (a dict; compared as canonical JSON, built by :func:`static_key` and
    :func:`evaluation_key`) names everything that determines the result. The metric being
    optimised is not part of the key: ``metrics`` holds every metric the family returns, so a
    search on another metric reuses the same lines (and a record lacking the requested metric
    is a miss, see :meth:`get`).

    Each line is written with one ``write``, flushed and fsynced. A torn last line (the process was
    killed mid-write) is ignored on read and counted in ``skipped_lines``; before the first append
    a missing final newline is restored, so the torn fragment never swallows a new record.
    ``path=None``: an in-memory cache only.
    """

    def __init__(self, path: str | os.PathLike[str] | None):
        self.path = Path(path) if path is not None else None
        self._records: dict[str, dict[str, Any]] = {}
        self.skipped_lines = 0
        self._checked_tail = False
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        with open(self.path, "rb") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    if not (isinstance(rec, dict) and isinstance(rec.get("key"), dict) and isinstance(rec.get("metrics"), dict)):
                        raise ValueError("not a cache record")
                except (ValueError, UnicodeDecodeError):
                    self.skipped_lines += 1
                    continue
                self._records[_canon(rec["key"])] = rec

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[dict[str, Any]]:
        """Every record (``key``, ``metrics``, ``seconds``, ``at``), in no particular order."""
        return list(self._records.values())

    def get(self, key: Mapping[str, Any], metric: str | None = None) -> dict[str, Any] | None:
        """The record for ``key`` (with ``metrics`` and ``seconds``), or None.

        ``metric``: a record whose ``metrics`` lack it (or hold a non-number there) is a miss, so
        a search on a metric an older record did not return measures the point again instead of
        failing with a KeyError.
        """
        rec = self._records.get(_canon(dict(key)))
        if rec is None or metric is None:
            return rec
        value = rec["metrics"].get(metric)
        return rec if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def put(self, key: Mapping[str, Any], metrics: Mapping[str, float], seconds: float) -> dict[str, Any]:
        """Record an evaluation (appended to the file at once when there is one)."""
        import datetime as _dt

        rec = {"key": dict(key), "metrics": {k: float(v) for k, v in metrics.items()}, "seconds": float(seconds),
               "at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        self._records[_canon(rec["key"])] = rec
        from neon_cli.dist import is_main

        if self.path is not None and is_main():  # under torchrun only rank 0 appends; all ranks hold the record
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as fh:
                if not self._checked_tail:
                    self._checked_tail = True
                    if fh.tell() > 0:
                        with open(self.path, "rb") as rd:
                            rd.seek(-1, os.SEEK_END)
                            if rd.read(1) != b"\n":
                                fh.write(b"\n")
                fh.write((json.dumps(rec, sort_keys=True, default=str) + "\n").encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
        return rec

