"""Repo-backed families: find the user's clone of a research repository and import its own code.

The paper's systems (NVlabs/edm, FoundationVision/VAR, OliverRensu/xAR, lumalabs/imm) are not on
PyPI and their licences (non-commercial, or none) forbid bundling them, so their families run the
user's own checkout: its network classes, samplers, losses and augmentation, so the recipe is the
official one. A family finds the checkout, in this order:

1. ``--set repo=PATH`` (the family declares a ``repo`` setting);
2. the environment variable ``NEON_<FAMILY>_REPO`` (e.g. ``NEON_EDM_REPO``);
3. the repository's top-level modules already importable (``PYTHONPATH``, an installed copy).

Writing a family for any other repository follows the same pattern (docs/families.md, "Repo-backed
families and families from a file"): declare ``Setting("repo", None, str)``, call :func:`find_repo` with the modules that mark a
checkout, then :func:`import_module` for each module the family uses.

Two repositories that share top-level package names (EDM and IMM both have ``torch_utils``,
``dnnlib`` and ``training``) cannot be used in one process: :func:`import_module` refuses to mix
them instead of silently running the wrong code.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from neon_cli.errors import FamilyError


def env_var(family_name: str) -> str:
    """``NEON_<NAME>_REPO`` for a family name (``edm`` -> ``NEON_EDM_REPO``)."""
    return "NEON_" + "".join(c if c.isalnum() else "_" for c in family_name.upper()) + "_REPO"


def _has_markers(folder: Path, markers: Sequence[str]) -> list[str]:
    """The markers (paths relative to the checkout, e.g. ``torch_utils/persistence.py``) missing in ``folder``."""
    return [m for m in markers if not (folder / m).exists()]


def _importable_root(markers: Sequence[str]) -> Path | None:
    """The sys.path entry holding every marker's top-level module, if there is one."""
    tops = {m.split("/")[0].removesuffix(".py") for m in markers}
    roots = set()
    for top in tops:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.origin and not spec.submodule_search_locations:
            return None
        origin = Path(spec.origin) if spec.origin and spec.origin != "namespace" else Path(list(spec.submodule_search_locations)[0]) / "__init__.py"
        roots.add(origin.parent.parent if origin.name == "__init__.py" else origin.parent)
    if len(roots) != 1:
        return None
    root = roots.pop()
    return root if not _has_markers(root, markers) else None


def find_repo(family_name: str, settings: Mapping[str, Any] | None, *, markers: Sequence[str],
              what: str, url: str) -> Path:
    """The user's checkout of the repository behind ``family_name``, put first on ``sys.path``.

    Args:
        family_name: e.g. ``"edm"`` (gives the variable ``NEON_EDM_REPO``).
        settings: the command's resolved settings; ``settings["repo"]`` wins when set.
        markers: files that every checkout has, relative to its root
            (``("torch_utils/persistence.py", "training/networks.py")``).
        what: the repository's name for messages (``"NVlabs/edm"``).
        url: where to clone it from, for the message.

    Raises :class:`FamilyError` in one line naming ``--set repo``, the variable and the URL when
    no checkout is found, or naming the path and the missing files when it is not a checkout.
    """
    var = env_var(family_name)
    given = (settings or {}).get("repo")
    source = None
    if given:
        folder, source = Path(str(given)).expanduser(), "--set repo"
    elif os.environ.get(var):
        folder, source = Path(os.environ[var]).expanduser(), var
    else:
        folder = _importable_root(markers)
        if folder is None:
            raise FamilyError(f"family {family_name!r} needs a checkout of {what}: give --set repo=PATH or set "
                              f"{var}=PATH (git clone {url})")
    if source is not None:
        if not folder.is_dir():
            raise FamilyError(f"{source}: {folder} is not a folder (expected a checkout of {what}, {url})")
        missing = _has_markers(folder, markers)
        if missing:
            raise FamilyError(f"{source}: {folder} is not a checkout of {what} (missing {', '.join(missing)})")
    folder = folder.resolve()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    return folder


def import_module(repo: Path, name: str) -> Any:
    """Import module ``name`` (e.g. ``training.networks``) from the checkout ``repo``.

    Raises :class:`FamilyError` when the module's top-level package is already imported from
    another place (another checkout sharing its package names) or when importing it fails.
    """
    top = name.split(".")[0]
    loaded = sys.modules.get(top)
    if loaded is not None:
        where = getattr(loaded, "__file__", None) or next(iter(getattr(loaded, "__path__", []) or []), None)
        if where is not None and Path(repo).resolve() not in Path(where).resolve().parents:
            raise FamilyError(f"module {top!r} is already imported from {where}, not from {repo}: "
                              "use one repository per neon process")
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise FamilyError(f"{repo}: importing {name} failed: {type(exc).__name__}: {exc}") from exc


def cuda_calls_on_cpu(active: bool = True) -> Any:
    """Context manager that lets a repository's CUDA-only calls run on CPU while it is open.

    Research code often hard-codes CUDA where the computation itself is device-agnostic
    (OliverRensu/xAR: ``torch.rand(n).cuda()``, ``torch.randn(...).cuda()``; the Neon paper's IMM
    loss: ``torch.cuda.get_rng_state()`` / ``set_rng_state`` around a shared dropout mask). With
    ``active`` (the model is on CPU), within the block ``Tensor.cuda()`` returns the tensor
    unchanged and ``torch.cuda.get_rng_state`` / ``set_rng_state`` act on the CPU generator (the
    device the computation runs on); everything is restored on exit. With ``active`` False (a GPU
    run) nothing is changed. Not thread-safe (it patches torch attributes), like the code it wraps.
    """
    import contextlib

    @contextlib.contextmanager
    def _cm() -> Any:
        if not active:
            yield
            return
        import torch

        saved = (torch.Tensor.cuda, torch.cuda.get_rng_state, torch.cuda.set_rng_state)

        def _cuda(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self

        torch.Tensor.cuda = _cuda  # type: ignore[method-assign]
        torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
        torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.Tensor.cuda, torch.cuda.get_rng_state, torch.cuda.set_rng_state = saved  # type: ignore[method-assign]

    return _cm()


def seeded_global_rng(seed: int, device: Any = None) -> Any:
    """Context manager: torch's global generators (CPU and, for a CUDA ``device``, that device's)
    and numpy's global generator seeded with ``seed`` inside the block, and their previous states
    restored on exit.

    For repositories whose samplers and losses draw from the global generators (xAR's
    ``torch.randn(...)`` and scipy's ``norm.rvs``, IMM's ``torch.randn`` / ``torch.rand``): seeding
    them per call makes a family's output a function of ``seed`` (``torch.manual_seed(seed)`` as
    the repositories' own scripts do, numpy with ``seed % 2**32``) without disturbing the caller's
    random state.
    """
    import contextlib

    @contextlib.contextmanager
    def _cm() -> Any:
        import numpy as np
        import torch

        dev = torch.device(device) if device is not None else torch.device("cpu")
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        np_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(seed))
                np.random.seed(int(seed) % 2**32)
                yield
        finally:
            np.random.set_state(np_state)

    return _cm()


def sample_by_seed_blocks(seeds: Any, labels: Any, block: int, num_classes: int, draw: Any) -> Any:
    """Images of ``seeds`` from a sampler that seeds a whole batch at once (a batch/global-seed
    family: VAR's ``g_seed``, xAR's and IMM's global generators), reproducible per image.

    Seed s belongs to block ``s // block``; each block touched is drawn whole by
    ``draw(first_seed, block_labels) -> uint8 [block, ...]`` (``block_labels``: int64 [block], the
    caller's labels for the requested seeds and, for the others, the active label plan's
    (:func:`neon_cli.labels.block_draws`; neon's ``seed % num_classes`` by default); None when
    ``num_classes`` is 0) and the requested images are kept, in the order asked. So an
    image depends on its seed, its block's labels and ``draw`` only, never on which other seeds
    were asked for (batch size, shards, ranks, resume). ``seeds``: int64 [N] >= 0; ``labels``:
    int64 [N] or None. Raises ValueError for a negative seed.
    """
    import torch

    from neon_cli.labels import block_draws

    seeds = torch.as_tensor(seeds, dtype=torch.int64).cpu()
    if not len(seeds):
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    out: list[Any] = [None] * len(seeds)
    lab_list = torch.as_tensor(labels).tolist() if labels is not None else None
    for first, block_labels, asked in block_draws(seeds.tolist(), lab_list, block, num_classes):
        images = draw(first, torch.tensor(block_labels, dtype=torch.int64) if block_labels is not None else None)
        for j, idx in asked.items():
            for i in idx:
                out[i] = images[j]
    return torch.stack(out)
