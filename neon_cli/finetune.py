"""``neon finetune``: theta_s = theta_r briefly fine-tuned on the synthetic set S with the family's
own recipe (paper Algorithm 1, step 2), snapshots named by images seen.

Output directory::

    theta_s-000131072.safetensors   snapshot after 131,072 images seen (the family's native format;
    ...                             the suffix is the family's ``checkpoint_suffix``, else that of what
                                    its ``save`` writes (:func:`saved_suffix`);
                                    a family's ``snapshot_name`` may name them its own way, e.g. VAR's
                                    ar-ckpt-images_131072.pth)
    train_state.pt                  model, optimizer, EMA, images seen, the sha256 of the base and S's content
                                    identity (:func:`neon_cli.identity.synthetic_set_sha256`), and
                                    the ledger of snapshots written so far: a rerun of the same command resumes here
    finetune.json                   written last: the snapshots, their sha256 and the run's settings
    .neon.lock                      held while a run writes here (a second run on the folder is refused)

Snapshot names are the family's (:func:`neon_cli.family.snapshot_name`).

S is read from its shards batch by batch (:mod:`neon_cli.dataset`), so memory does not grow with
|S|. A family with the ``encode`` hook (VAR: the frozen VQVAE's tokens) trains on its encoding of
S, computed once and cached beside S (``S/encoded-<key>/``; under ``-o`` when S is read-only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neon_cli.errors import FamilyError, UsageError
from neon_cli.fsutil import atomic_path, sha256_path, write_json
from neon_cli.progress import ProgressFn, null_progress


def _default_warmup(value: Any, budget: int, num_synthetic: int | None = None) -> int:
    """The recipe's ``warmup_images``: a number of images, ``"budget"`` for a linear ramp over the
    whole run (the Neon paper's VAR fine-tunes: ``train.py --total_images``), or ``"epochs:N"`` for
    N passes over S (xAR's ``train_new.py --warmup_epochs N``; needs ``num_synthetic`` = |S|)."""
    if isinstance(value, str) and value.startswith("epochs:"):
        return int(float(value.split(":", 1)[1]) * int(num_synthetic or 0))
    return int(budget) if value == "budget" else int(value or 0)


#: Fraction of the recipe's lr warm-up / EMA half-life below which a budget draws a warning.
SHORT_BUDGET = 0.1


def recipe_plan(family: Any, name: str, model_path: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(concrete name, train defaults, setting defaults)`` of the fine-tuning recipe ``name``.

    ``"default"`` is the family's ``train_defaults`` (no settings). Other names come from the
    family's optional ``recipes`` mapping (name -> ``{"train": {...}, "settings": {...},
    "about": str}``, ``train`` overriding ``train_defaults``); a family may map a generic name
    (``"paper"``) to a concrete one from the base checkpoint with ``resolve_recipe(name, path)``
    (e.g. EDM: the image resolution picks ``paper-cifar10`` or ``paper-ffhq``).
    Raises UsageError naming ``--recipe`` and the family's recipes for an unknown name.
    """
    recipes = dict(getattr(family, "recipes", None) or {})
    known = ["default", *recipes]
    if name != "default" and name not in recipes and callable(getattr(family, "resolve_recipe", None)):
        name = family.resolve_recipe(name, str(model_path))
    if name == "default":
        return "default", dict(getattr(family, "train_defaults", {}) or {}), {}
    if name not in recipes:
        raise UsageError(f"--recipe {name}: family {family.name!r} has no such recipe (known: {', '.join(known)})")
    rec = recipes[name]
    train = {**dict(getattr(family, "train_defaults", {}) or {}), **dict(rec.get("train") or {})}
    return name, train, dict(rec.get("settings") or {})


def short_budget_warnings(cfg: Any, recipe: str) -> list[str]:
    """One line for each of the recipe's lr warm-up and EMA half-life that the budget covers less
    than :data:`SHORT_BUDGET` of: theta_s then barely moves from theta_r (lr still near 0) or the
    snapshots are nearly theta_r (the EMA average), and the merge has little to extrapolate."""
    out = []
    for what, span in (("lr warm-up", cfg.warmup), ("EMA half-life", cfg.ema_halflife)):
        if span and cfg.budget < SHORT_BUDGET * span:
            out.append(f"--budget {cfg.budget} is {cfg.budget / span:.2%} of recipe {recipe!r}'s {what} ({span} images): "
                       f"theta_s will be close to theta_r; give a larger --budget or a shorter "
                       f"{'--warmup' if what == 'lr warm-up' else '--ema-halflife'}")
    return out


def finetune(family_name: str, model_path: Path | None, data_dir: Path, *, report: Any, progress: ProgressFn = null_progress,
             **options: Any) -> dict[str, Any]:
    """Keyword form of :func:`run_finetune` (tests, benchmarks and ``neon demo`` call it):
    ``options`` are ``out_dir``, ``set_pairs`` (()), ``trust_pickle`` (False) and the fields of
    :class:`~neon_cli.requests.FinetuneOptions` (``budget``, ``lr``, ``batch``, ``warmup``,
    ``save_every``, ``ema_halflife``, ``seed``, ``recipe``). Returns and raises as :func:`run_finetune`."""
    from neon_cli.requests import FinetuneOptions, FinetuneRequest, Trust

    o = dict(options)
    out, pairs, trust = o.pop("out_dir"), tuple(o.pop("set_pairs", ())), Trust(pickle=o.pop("trust_pickle", False))
    req = FinetuneRequest(family_name, model_path, data_dir, out, FinetuneOptions(**o), pairs, trust)
    return run_finetune(req, report=report, progress=progress)


@dataclass
class _Run:
    """One fine-tune as it is being set up: what :func:`run_finetune`'s steps share."""

    req: Any
    report: Any
    progress: ProgressFn
    family: Any = None
    path: Any = None
    settings: dict[str, Any] = field(default_factory=dict)
    cfg: Any = None
    recipe: str = "default"
    warmup_spec: Any = 0
    data: Any = None
    base_sha: str = ""
    data_sha: str = ""
    manifest_sha: str = ""
    base_images: int = 0
    model: Any = None
    suffix: str | None = None
    warnings: list[str] = field(default_factory=list)


def run_finetune(request: Any, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Fine-tune ``request.model`` on the synthetic set ``request.data`` for ``options.budget`` images
    seen, into ``request.out``; ``request``: a :class:`~neon_cli.requests.FinetuneRequest`.

    ``options.lr``/``batch``/``warmup``/``ema_halflife`` default to the recipe's (``ema_halflife`` 0: no
    EMA): ``recipe`` ``"default"`` is the family's ``train_defaults``, another name one of the
    family's ``recipes`` (e.g. ``"paper"``: the Neon paper's own scripts, see :func:`recipe_plan`),
    whose settings are defaults that ``--set`` overrides. ``request.set_pairs`` (``--set KEY=VALUE``)
    resolve against the family's settings and its optional ``train_settings``; they and
    ``request.trust`` reach the family's
    ``load`` (purpose ``"train"``, see :func:`neon_cli.family.load_model`).

    Every number is checked before any file is read
    (:meth:`~neon_cli.requests.FinetuneRequest.validate`); ``-o`` and ``--report`` may not be an input
    (:func:`neon_cli.fsutil.check_outputs`), and ``-o`` is locked for the run (a second run on it
    is refused). The training state records the sha256 of the base model and the content identity
    of the synthetic set (:func:`neon_cli.identity.synthetic_set_sha256`: its manifest, which lists
    every shard's sha256, without paths) and is resumed only when both match, wherever the files
    lie (a state of an older neon, which hashed the manifest file, still resumes); the
    snapshots listed are the ones this run's ledger records (``train_state.pt``), never other
    files of ``-o``.

    Returns ``{"snapshots": [{"path", "images_seen", "sha256"}], "recipe", "warnings" (short-budget
    lines, :func:`short_budget_warnings`), "checkouts" (official code used: path, commit, dirty;
    :func:`neon_cli.repo.provenance`), "precision" (what the fine-tune ran in, from the family's
    optional ``precision(model)``; None without it), ...}`` (also in ``finetune.json`` and
    ``report.results``). Raises UsageError for bad numbers/paths or another run's state,
    DataError for an incomplete synthetic set, CheckpointError for an unreadable model or state.
    """
    import torch  # noqa: F401  (imported before the checks, as always: a refused run's report names its version)

    from neon_cli.dataset import check_family, read_manifest
    from neon_cli.dist import broadcast_object, main_rank_lock, run_on_main
    from neon_cli.family import get_family, model_path as resolve_model, plugin_version
    from neon_cli.fsutil import remove_stale_tmp_in

    req = request.validate()
    run = _Run(req, report, progress)
    run.family = get_family(req.family)
    report.family = plugin_version(req.family)
    run.path = resolve_model(run.family, req.model)
    _configure(run)
    out_dir, data_dir = Path(req.out), req.data
    report.check_outputs({"--model": run.path, "--data": data_dir}, {"-o": out_dir})
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o: {out_dir} exists and is not a directory")
    check_family(read_manifest(Path(data_dir)), run.family, data_dir)  # S of another family: refused before any work
    with main_rank_lock(out_dir, "-o", folder=True):
        run_on_main(remove_stale_tmp_in, out_dir)  # what a killed run left half-written
        _open_inputs(run)
        ledger = _train(run)
        results = broadcast_object(_write_results(run, ledger))
    for s in results["snapshots"]:
        report.add_output("selftrained", s["path"], s["sha256"])
    report.results.update(results)
    return results


def _configure(run: _Run) -> None:
    """The recipe, the resolved settings and the :class:`~neon_cli.train.TrainConfig` (flags over
    the recipe's defaults); UsageError for a value that cannot train or snapshots of one name."""
    from neon_cli.family import resolve_settings, snapshot_name
    from neon_cli.train import TrainConfig, snapshot_points

    o, family = run.req.options, run.family
    run.recipe, defaults, recipe_settings = recipe_plan(family, o.recipe, run.path)
    set_pairs = list(run.req.set_pairs)
    given = {p.split("=", 1)[0].strip() for p in set_pairs if "=" in p}
    run.settings = resolve_settings(family, set_pairs, {k: v for k, v in recipe_settings.items() if k not in given}, train=True)
    run.warmup_spec = warmup_spec = o.warmup if o.warmup is not None else defaults.get("warmup_images", 0)
    ema_halflife = o.ema_halflife if o.ema_halflife is not None else defaults.get("ema_halflife_images")
    cfg = TrainConfig(
        budget=o.budget,
        lr=o.lr if o.lr is not None else float(defaults.get("lr", 1e-4)),
        batch=o.batch if o.batch is not None else int(defaults.get("batch", 64)),
        warmup=_default_warmup(warmup_spec, o.budget, 1) if str(warmup_spec).startswith("epochs:") else
        _default_warmup(warmup_spec, o.budget),
        ema_halflife=ema_halflife or None,
        save_every=o.save_every,
        seed=o.seed,
    )
    cfg.check()
    points = snapshot_points(cfg.budget, cfg.batch, cfg.save_every)
    names = [snapshot_name(family, p) for p in points]
    for (a, na), (b, nb) in zip(zip(points, names), zip(points[1:], names[1:])):
        if na == nb:  # e.g. EDM's network-snapshot-{kimg:06d}.pkl with snapshots less than 1000 images apart
            raise UsageError(f"--save-every: the snapshots after {a} and {b} images would both be named {na} "
                             f"(family {family.name!r}'s snapshot names); give a larger --save-every")
    run.cfg = cfg


def _open_inputs(run: _Run) -> None:
    """Hash the base and S, stream S, load the model (and S's encoding, for a family with one)."""
    from neon_cli.dataset import encoded_set, open_synthetic
    from neon_cli.family import load_model
    from neon_cli.identity import synthetic_set_sha256

    req, report, family, cfg = run.req, run.report, run.family, run.cfg
    data_dir, out_dir = req.data, Path(req.out)
    run.base_sha = report.add_input("base", run.path)
    run.data = open_synthetic(data_dir)  # streamed from the shards: memory does not grow with |S|
    run.manifest_sha = report.add_input("synthetic_set", Path(data_dir) / "manifest.json")
    # S by content (its manifest without paths): a moved S, or one re-made from the same base
    # at another path, is the same S; states of older neon recorded the manifest file's sha256
    run.data_sha = synthetic_set_sha256(data_dir)
    if str(run.warmup_spec).startswith("epochs:"):  # xAR's --warmup_epochs: passes over S
        cfg.warmup = _default_warmup(run.warmup_spec, cfg.budget, len(run.data))
        cfg.check()
    run.warnings = short_budget_warnings(cfg, run.recipe)
    for msg in run.warnings:
        run.progress("finetune", 0, cfg.budget, message=f"warning: {msg}")
    report.settings.update(train_config=cfg.__dict__, resolved_settings=run.settings, recipe=run.recipe)
    base_meta = family.read_metadata(str(run.path)) if hasattr(family, "read_metadata") else {}
    run.base_images = int(base_meta.get("train_images", 0) or 0)
    run.model = model = load_model(family, run.path, settings=run.settings, trust_pickle=req.trust.pickle, purpose="train")
    use_set = getattr(family, "use_synthetic_set", None)
    if callable(use_set):  # optional: the family reads what S's labels index (t2i: the manifest's prompts)
        use_set(model, run.data.manifest)
    run.suffix = saved_suffix(family, model, out_dir)  # what its save writes, when it does not say
    if callable(getattr(family, "encode", None)) and callable(getattr(family, "encode_key", None)):
        from neon_cli.dist import device

        model.to(device())
        run.data, encoded = encoded_set(family, model, run.data, run.settings, fallback_dir=out_dir, progress=run.progress)
        report.settings.update(encoded=encoded)


def _train(run: _Run) -> list[dict[str, Any]]:
    """:func:`neon_cli.train.train_loop` over S, each snapshot written atomically under the family's
    name with its metadata; returns the snapshot ledger (rank 0's)."""
    import torch

    from neon_cli.family import snapshot_name
    from neon_cli.train import Saving, train_loop

    family, cfg, out_dir, progress = run.family, run.cfg, Path(run.req.out), run.progress
    suffix = run.suffix
    torch.manual_seed(run.req.options.seed)
    ledger: list[dict[str, Any]] = []

    def on_snapshot(seen: int, weights: Any) -> dict[str, Any]:
        name = snapshot_name(family, seen, suffix)
        if Path(name).name != name or name in ("", ".", ".."):
            raise FamilyError(f"family {family.name!r}: snapshot_name({seen}) = {name!r} is not a plain file name")
        f = out_dir / name
        meta = {
            "neon_role": "selftrained",
            "finetune_images": str(seen),
            "train_images": str(run.base_images + seen),
            "base_sha256": run.base_sha,
            "synthetic_set_sha256": run.data_sha,
            "lr": repr(cfg.lr),
            "batch": str(cfg.batch),
        }
        with atomic_path(f) as tmp:
            family.save(weights, str(tmp), meta)
        progress("finetune", seen, cfg.budget, message=f"snapshot {f.name}")
        return {"file": name, "images_seen": seen, "sha256": sha256_path(f)}

    saving = Saving(state_path=out_dir / "train_state.pt", on_snapshot=on_snapshot,
                    provenance={"base_sha256": run.base_sha, "synthetic_set_sha256": run.data_sha},
                    legacy_provenance={"synthetic_set_sha256": run.manifest_sha}, snapshots=ledger)
    train_loop(family, run.model, run.data, None, cfg, saving, progress=progress)
    return ledger


def _write_results(run: _Run, ledger: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rank 0 (which made the snapshots and holds the ledger) writes finetune.json; None on other ranks."""
    from neon_cli.dist import is_main
    from neon_cli.repo import provenance

    if not is_main():
        return None
    family, cfg, out_dir = run.family, run.cfg, Path(run.req.out)
    results = _results(out_dir, ledger, cfg, len(run.data), run.base_images)
    precision = family.precision(run.model) if callable(getattr(family, "precision", None)) else None
    results.update(recipe=run.recipe, warnings=run.warnings, checkouts=provenance([family.name]), precision=precision)
    write_json(out_dir / "finetune.json", {"schema": "neon.finetune/1", "config": cfg.__dict__, "recipe": run.recipe,
                                           "base": {"path": str(run.path), "sha256": run.base_sha},
                                           "synthetic_set": {"path": str(run.req.data), "sha256": run.data_sha},
                                           **results})
    return results


def _results(out_dir: Path, ledger: list[dict[str, Any]], cfg: Any, num_synthetic: int, base_images: int) -> dict[str, Any]:
    """The run's results from its snapshot ledger (one entry per images-seen mark, the latest
    write of each; a file deleted since is not listed)."""
    by_seen: dict[int, dict[str, Any]] = {}
    for rec in ledger:
        by_seen[int(rec["images_seen"])] = rec
    snaps = []
    for seen in sorted(by_seen):
        rec = by_seen[seen]
        f = out_dir / rec["file"]
        if f.exists():
            snaps.append({"path": str(f), "images_seen": seen, "sha256": rec["sha256"]})
    return {
        "snapshots": snaps,
        "final": snaps[-1]["path"] if snaps else None,
        "num_synthetic": num_synthetic,
        "budget_images": cfg.budget,
        "base_train_images": base_images or None,
        "budget_fraction": (cfg.budget / base_images) if base_images else None,
    }


def sniff_suffix(path: Path) -> str:
    """``".safetensors"`` (an 8-byte header length then ``{``), ``".pt"`` (a torch zip archive or a
    legacy ``torch.save`` stream), ``".pkl"`` (another pickle), ``""`` (a folder, or bytes of no
    format neon knows) for what ``path`` holds, read from its first bytes: the suffix its loaders
    expect (torch >= 2.13's ``torch.load`` reads a ``.safetensors`` name as safetensors)."""
    from neon_cli.checkpoint.legacy import MAGIC_PREFIX

    if path.is_dir():
        return ""
    with open(path, "rb") as fh:
        head = fh.read(len(MAGIC_PREFIX))
    if len(head) >= 9 and head[8:9] == b"{":
        return ".safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(MAGIC_PREFIX):
        return ".pt"
    if head[:1] == b"\x80":
        return ".pkl"
    return ""


def saved_suffix(family: Any, model: Any, out_dir: Path) -> str | None:
    """The suffix of the snapshots of a family that names neither (no ``snapshot_name``, no
    ``checkpoint_suffix``): ``model`` saved once with the family's ``save`` into a temporary folder
    in ``out_dir`` and sniffed (:func:`sniff_suffix`), so a family whose ``save`` writes a pickle
    gets ``.pt``/``.pkl`` snapshots, not ``.safetensors`` that ``torch.load`` would read as
    safetensors. None when the family names its snapshots itself. Raises FamilyError naming the
    family when its ``save`` fails."""
    import os
    import shutil

    from neon_cli.errors import NeonError, exception_line

    if callable(getattr(family, "snapshot_name", None)) or hasattr(family, "checkpoint_suffix"):
        return None
    # named like every temporary of a run (.NAME.tmp-PID): a killed run's is removed by the next
    tmp = out_dir / f".suffix-probe.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        probe = tmp / "probe"
        try:
            family.save(model, str(probe), {})
        except NeonError:
            raise
        except Exception as exc:
            raise FamilyError(f"family {family.name!r}: save() of a probe into {tmp} failed ({exception_line(exc)})") from None
        return sniff_suffix(probe) if probe.exists() else ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
