"""Checks of numeric flag values, each raising :class:`~neon_cli.errors.UsageError` naming the flag.

Every number a command reads from its command line goes through one of these before any work
starts, so ``--lr inf``, ``--batch 0``, ``--max-fid nan`` or ``--seed 2**64`` are refused by name
(exit 2) instead of producing black images, non-finite weights or a CI gate that cannot fail.
Torch-free: the CLI layer and the library both call them.
"""

from __future__ import annotations

import math
from typing import Any

from neon_cli.errors import UsageError

#: Largest seed accepted: torch.Generator.manual_seed and the int64 seed tensors take 0 .. 2**63 - 1.
MAX_SEED = 2**63 - 1


def finite(flag: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within [low, high] (open ends with ``low_open``/``high_open``).

    Raises UsageError for NaN, ±inf or a value outside the range, e.g.
    ``--lr: must be a finite number > 0, got inf``.
    """
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UsageError(f"{flag}: must be a finite number{_range_text(low, high, low_open, high_open)}, got {value}")
    if low is not None and (x < low or (low_open and x == low)):
        raise UsageError(f"{flag}: must be{_range_text(low, high, low_open, high_open)}, got {value}")
    if high is not None and (x > high or (high_open and x == high)):
        raise UsageError(f"{flag}: must be{_range_text(low, high, low_open, high_open)}, got {value}")
    return x


def positive(flag: str, value: Any) -> float:
    """A finite float > 0 (learning rates, tolerances)."""
    return finite(flag, value, low=0.0, low_open=True)


def integer(flag: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within [low, high]; bools and non-integral floats are refused."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise UsageError(f"{flag}: expected an integer, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{flag}: expected an integer, got {value!r}") from None
    if (low is not None and n < low) or (high is not None and n > high):
        raise UsageError(f"{flag}: must be{_range_text(low, high, False, False)}, got {value}")
    return n


def positive_int(flag: str, value: Any) -> int:
    """An int >= 1 (batch sizes, counts, budgets in images)."""
    return integer(flag, value, low=1)


def seed(flag: str, value: Any, count: int = 1) -> int:
    """A seed such that ``value .. value + count - 1`` all lie in 0 .. 2**63 - 1."""
    n = integer(flag, value, low=0)
    if n + max(count, 1) - 1 > MAX_SEED:
        span = "" if count <= 1 else f" (with {count} consecutive seeds)"
        raise UsageError(f"{flag}: seeds must stay within 0 .. 2**63 - 1{span}, got {value}")
    return n


def _range_text(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}" if isinstance(low, float) else f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}" if isinstance(high, float) else f"{'<' if high_open else '<='} {high}")
    return (" " + " and ".join(parts)) if parts else ""
