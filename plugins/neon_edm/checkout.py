"""The user's NVlabs/edm checkout, and EDM network pickles loaded and written through it.

Loading a network (``pickle.load(f)['ema']``, as EDM's ``generate.py`` and ``train.py --transfer``
do) executes the source code pickled inside the file (``torch_utils.persistence``), so it needs the
checkout importable and the user's explicit ``--trust-pickle``. Writing (``pickle.dump(dict(ema=...,
loss_fn=..., augment_pipe=..., dataset_kwargs=...))``, EDM's ``training_loop.py`` snapshot format)
needs the classes the objects were made with, i.e. the same checkout.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any, Mapping

from neon_cli.errors import CheckpointError, FamilyError, UsageError

#: Files every EDM checkout has (relative to its root).
MARKERS = ("dnnlib/__init__.py", "torch_utils/persistence.py", "training/networks.py")
WHAT = "NVlabs/edm"
URL = "https://github.com/NVlabs/edm"
#: Attribute under which a loaded network carries the other entries of its pickle (loss_fn,
#: augment_pipe, dataset_kwargs) so that copies of it (EMA, merges) are saved with them.
EXTRAS = "_neon_edm_extras"


def find(settings: Mapping[str, Any] | None, family_name: str = "edm") -> Path:
    """The checkout from ``--set repo=PATH``, ``$NEON_EDM_REPO`` or an importable ``torch_utils`` /
    ``training``; :class:`FamilyError` in one line naming all three when there is none."""
    from neon_cli.repo import find_repo

    return find_repo(family_name, settings, markers=MARKERS, what=WHAT, url=URL)


def module(repo: Path, name: str) -> Any:
    """``name`` (e.g. ``training.loss``) imported from the checkout (see :func:`neon_cli.repo.import_module`)."""
    from neon_cli.repo import import_module

    return import_module(repo, name)


def require_trust(path: str | Path, trust_pickle: bool, system: str = "EDM") -> None:
    """UsageError naming ``--trust-pickle`` unless the user gave it."""
    if not trust_pickle:
        raise UsageError(f"{path}: loading an {system} network runs the Python code pickled inside it (torch_utils.persistence); "
                         "pass --trust-pickle if you trust this file (neon merge and neon inspect read it without running code)")


def unpickle_network(path: str | Path, repo: Path, system: str = "EDM") -> tuple[Any, dict[str, Any]]:
    """``(net, entries)`` of a ``torch_utils.persistence`` network pickle (EDM's and IMM's format:
    ``dict(ema=<net>, ...)``), loaded by the checkout's own code (``pickle.load`` after importing
    its ``dnnlib`` and ``torch_utils.persistence``, as EDM's ``generate.py`` does): ``ema`` in eval
    mode on CPU with gradients off, and the pickle's other entries except ``ema`` and ``neon``.
    The caller has checked ``--trust-pickle`` (:func:`require_trust`) and the file's layout
    inertly (:func:`neon_edm.inert.read_fields`). Raises CheckpointError naming the file."""
    import torch

    module(repo, "dnnlib")
    module(repo, "torch_utils.persistence")
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh)  # noqa: S301 - trusted by --trust-pickle; the system's own loading
    except Exception as exc:
        raise CheckpointError(f"{path}: {system}'s code ({repo}) failed to load it: {type(exc).__name__}: {exc}") from None
    net = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(net, torch.nn.Module):
        raise CheckpointError(f"{path}: entry 'ema' is not a torch.nn.Module")
    return net.eval().requires_grad_(False).cpu(), {k: v for k, v in data.items() if k not in ("ema", "neon")}


def pickle_network(net: Any, path: str | Path, entries: Mapping[str, Any], metadata: Mapping[str, str], *,
                   attr: str, system: str = "EDM") -> None:
    """``pickle.dump(dict(ema=<net>, **entries, neon=metadata))``, the snapshot format of EDM's and
    IMM's ``training_loop.py``: the network (unwrapped from DDP) deep-copied, in eval mode, frozen,
    on CPU, without neon's attribute ``attr``. FamilyError when its class is not a
    ``torch_utils.persistence`` class (its source could not travel in the pickle)."""
    ema = copy.deepcopy(getattr(net, "module", net)).eval().requires_grad_(False).cpu()
    ema.__dict__.pop(attr, None)
    if not hasattr(type(ema), "_orig_module_src"):
        raise FamilyError(f"{path}: the network's class {type(ema).__name__} is not an {system} persistent class; "
                          f"it cannot be written as an {system} pickle")
    data = {"ema": ema, **entries, "neon": {str(k): str(v) for k, v in metadata.items()}}
    with open(path, "wb") as fh:
        pickle.dump(data, fh)


def load(path: str | Path, settings: Mapping[str, Any] | None, trust_pickle: bool) -> tuple[Any, Path]:
    """``(net, repo)``: the pickle's ``ema`` network in eval mode on CPU, with the pickle's other
    entries attached as ``net._neon_edm_extras``.

    Raises UsageError (no ``--trust-pickle``), FamilyError (no checkout), CheckpointError (not an
    EDM network pickle, or EDM's code failed to rebuild it).
    """
    from neon_edm.inert import read_fields

    require_trust(path, trust_pickle)
    read_fields(path)  # refuse anything that is not dict(ema=<persistent network>, ...) before running it
    repo = find(settings)
    net, entries = unpickle_network(path, repo)
    setattr(net, EXTRAS, entries)
    return net, repo


def extras_of(net: Any) -> dict[str, Any]:
    """The pickle entries carried by ``net`` (see :func:`load`), {} if none."""
    inner = getattr(net, "module", None)
    if isinstance(getattr(inner, EXTRAS, None), dict):
        return getattr(inner, EXTRAS)
    found = net.__dict__.get(EXTRAS) if hasattr(net, "__dict__") else None
    return found if isinstance(found, dict) else {}


def save(net: Any, path: str | Path, metadata: Mapping[str, str]) -> None:
    """Write ``dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=..., neon=metadata)``
    with ``pickle.dump``: EDM's snapshot format (training_loop.py), which EDM's ``generate.py``,
    ``fid.py`` and ``train.py --transfer`` load unchanged (they read ``ema``; ``neon`` holds neon's
    metadata, str -> str). The network is deep-copied, put in eval mode, frozen and moved to CPU
    first, as EDM does. Raises FamilyError when the network is not a ``torch_utils.persistence``
    object (its class source could not travel in the pickle)."""
    extras = dict(extras_of(net))
    entries = {"loss_fn": extras.get("loss_fn"), "augment_pipe": extras.get("augment_pipe"),
               "dataset_kwargs": dict(extras.get("dataset_kwargs") or {})}
    pickle_network(net, path, entries, metadata, attr=EXTRAS)
