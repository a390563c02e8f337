"""Progress reporting without printing: the library calls a callback, the CLI draws it.

A progress callback has the signature ``progress(task, done, total=None, **info)``:

* ``task``: a short human label, e.g. ``"synth"``, ``"finetune"``, ``"tune-w"``; the same label
  is reused for every update of one task;
* ``done`` / ``total``: units completed and expected (images, tensors, evaluations); ``total`` is
  None when unknown;
* ``info``: optional extras: ``message`` (a line of log text), ``row`` (a dict, e.g. one tune-w
  evaluation, that the CLI shows in a live table), ``unit`` (e.g. ``"img"``).

Library code never prints and never exits; it only calls this.
"""

from __future__ import annotations

from typing import Any, Protocol


class ProgressFn(Protocol):
    def __call__(self, task: str, done: float, total: float | None = None, **info: Any) -> None: ...


def null_progress(task: str, done: float, total: float | None = None, **info: Any) -> None:
    """The default callback: does nothing."""
