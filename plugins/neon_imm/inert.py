"""Reading the plain fields of an IMM network pickle without running any of its code.

An IMM network file (``imagenet256_ts_a2.pkl``, ``network-snapshot-*.pkl``) has EDM's layout:
``pickle.dump(dict(ema=<IMMPrecond>, ...))`` where each network object is a
``torch_utils.persistence`` record whose ``meta['state']`` is the instance ``__dict__`` (plain
attributes such as ``label_dim``, ``img_channels``, ``img_resolution``, ``_init_kwargs``, and the
module's tensors) and ``meta['module_src']`` the source code a normal load executes
(``/work/shared/research/neon-repo.md`` section 4). So it is read by :mod:`neon_edm.inert`
(neon's inert checkpoint reader: no global of the file is resolved), with IMM named in the errors.
This is for metadata (the number of classes, the latent shape, neon's entry) needed before the
user's ``--trust-pickle`` allows running the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neon_edm import inert as _edm

_NAMES = {"system": "IMM", "released": ".pkl"}


def read_fields(path: str | Path) -> dict[str, Any]:
    """The top-level dict of an IMM network pickle, read inertly; CheckpointError naming the file
    unless it is a pickle of a dict whose ``ema`` is a persistent network."""
    return _edm.read_fields(path, **_NAMES)


def network_info(path: str | Path) -> dict[str, Any]:
    """``class_name``, ``label_dim``, ``img_channels``, ``img_resolution``, ``init_kwargs`` and
    ``module_src_sha256`` of the pickled ``ema`` network, read without running code."""
    return _edm.network_info(path, **_NAMES)


def neon_metadata(path: str | Path) -> dict[str, str]:
    """The ``neon`` entry neon writes into the pickles it makes (str -> str), {} for others."""
    return _edm.neon_metadata(path, **_NAMES)
