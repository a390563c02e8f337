"""Warnings for a theta_s trained with another preconditioning, loss or configuration than theta_r.

EDM's and IMM's network pickles (``torch_utils.persistence``, ``dict(ema=<net>, loss_fn=...)``)
record the network's class (its preconditioning: ``VPPrecond``, ``EDMPrecond``, ``IMMPrecond``),
its constructor arguments (``_init_kwargs``: noise schedule, ``sigma_data``, dropout, ...) and the
loss object the snapshot was trained with (``loss_fn``: class and plain attributes). The merge
theta_r - w (theta_s - theta_r) is defined on the weights alone, so two such files merge whenever
their tensors line up; but when the preconditioning or loss differs (e.g. the Neon paper's EDM
recipe: theta_s an ``EDMPrecond`` trained with ``EDMLoss`` from a ``VPPrecond`` base, as its
``edm/run_*.sh`` run ``train.py`` without ``--precond``), theta_s - theta_r also holds the change of
parameterisation, and the merged network is sampled with theta_r's. That is allowed (it is what
the paper did), and reported: :func:`pickle_mismatch` lists the differences for ``neon merge`` and
``neon tune-w`` warnings. Everything is read inertly (no code from the files runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Constructor arguments that may differ without changing what the network computes at sampling.
TRAINING_ONLY_KWARGS = ("dropout", "use_fp16", "mixed_precision")


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return f"<{type(value).__name__}>"


def describe(container: Any) -> dict[str, Any] | None:
    """``{"class", "init_kwargs", "loss", "loss_state"}`` of an inertly read persistence pickle
    (:class:`neon_cli.checkpoint.unpickler.Persistent` ``ema``), None for any other container."""
    from neon_cli.checkpoint.unpickler import Persistent

    if not isinstance(container, dict) or not isinstance(container.get("ema"), Persistent):
        return None
    ema = container["ema"]
    st = ema.state if isinstance(ema.state, dict) else {}
    kwargs = st.get("_init_kwargs")
    loss = container.get("loss_fn")
    loss_state = loss.state if isinstance(loss, Persistent) and isinstance(loss.state, dict) else {}
    return {
        "class": ema.class_name,
        "init_kwargs": _plain(dict(kwargs)) if isinstance(kwargs, dict) else None,
        "loss": loss.class_name if isinstance(loss, Persistent) else None if loss is None else type(loss).__name__,
        "loss_state": {k: _plain(v) for k, v in loss_state.items() if isinstance(v, (str, int, float, bool, list, tuple))},
    }


def compare(base: dict[str, Any] | None, selftrained: dict[str, Any] | None) -> list[str]:
    """One line per difference between two :func:`describe` results ([] when either is None)."""
    if base is None or selftrained is None:
        return []
    out = []
    if base["class"] != selftrained["class"]:
        out.append(f"preconditioning differs: theta_r is {base['class']}, theta_s is {selftrained['class']} "
                   "(theta_s was trained with another parameterisation; the merge is sampled with theta_r's)")
    if base["loss"] and selftrained["loss"] and base["loss"] != selftrained["loss"]:
        out.append(f"training loss differs: theta_r's loss_fn is {base['loss']}, theta_s's is {selftrained['loss']}")
    elif base["loss"] and base["loss"] == selftrained["loss"] and base["loss_state"] != selftrained["loss_state"]:
        keys = sorted(k for k in set(base["loss_state"]) | set(selftrained["loss_state"])
                      if base["loss_state"].get(k) != selftrained["loss_state"].get(k))
        out.append(f"training loss settings differ ({base['loss']}): " + ", ".join(
            f"{k} {base['loss_state'].get(k)!r} vs {selftrained['loss_state'].get(k)!r}" for k in keys[:6]))
    rk, sk = base["init_kwargs"], selftrained["init_kwargs"]
    if isinstance(rk, dict) and isinstance(sk, dict):
        keys = sorted(k for k in set(rk) | set(sk) if k not in TRAINING_ONLY_KWARGS and rk.get(k, "<absent>") != sk.get(k, "<absent>"))
        if keys:
            out.append("network configuration (init_kwargs) differs: " + ", ".join(
                f"{k} {rk.get(k, '<absent>')!r} vs {sk.get(k, '<absent>')!r}" for k in keys[:6])
                + (" ..." if len(keys) > 6 else ""))
    return out


def pickle_mismatch(base: str | Path, selftrained: str | Path) -> list[str]:
    """:func:`compare` of two files read inertly ([] unless both are persistence pickles, or
    either cannot be read: the merge itself reports unreadable files)."""
    from neon_cli.checkpoint.torchfile import read_container

    found = []
    for p in (base, selftrained):
        try:
            encoding, buf, res = read_container(Path(p))
        except Exception:
            return []
        found.append(describe(res.obj) if encoding == "pickle" else None)
        try:
            buf.close()
        except BufferError:
            pass
    return compare(found[0], found[1])
