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

from pathlib import Path
from typing import Any

from neon_cli.errors import FamilyError, UsageError
from neon_cli.fsutil import atomic_path, sha256_path, write_json
from neon_cli.progress import ProgressFn, null_progress


def _default_warmup(value: Any, budget: int) -> int:
    """The family's ``train_defaults["warmup_images"]``: a number of images, or ``"budget"`` for a
    linear ramp over the whole run (the Neon paper's VAR and xAR fine-tunes)."""
    return int(budget) if value == "budget" else int(value or 0)


def finetune(
    family_name: str,
    model_path: Path | None,
    data_dir: Path,
    *,
    budget: int,
    lr: float | None,
    out_dir: Path,
    batch: int | None = None,
    warmup: int | None = None,
    save_every: int | None = None,
    ema_halflife: int | None = None,
    seed: int = 0,
    set_pairs: list[str] | tuple[str, ...] = (),
    trust_pickle: bool = False,
    report: Any,
    progress: ProgressFn = null_progress,
) -> dict[str, Any]:
    """Fine-tune ``model_path`` on the synthetic set in ``data_dir`` for ``budget`` images seen.

    ``lr``/``batch``/``warmup``/``ema_halflife`` default to the family's ``train_defaults``
    (``ema_halflife`` 0: no EMA). ``set_pairs`` (``--set KEY=VALUE``) resolve against the family's
    settings and its optional ``train_settings``; they and ``trust_pickle`` reach the family's
    ``load`` (purpose ``"train"``, see :func:`neon_cli.family.load_model`).

    Every number is checked before any file is read; ``-o`` and ``--report`` may not be an input
    (:func:`neon_cli.fsutil.check_outputs`), and ``-o`` is locked for the run (a second run on it
    is refused). The training state records the sha256 of the base model and the content identity
    of the synthetic set (:func:`neon_cli.identity.synthetic_set_sha256`: its manifest, which lists
    every shard's sha256, without paths) and is resumed only when both match, wherever the files
    lie (a state of an older neon, which hashed the manifest file, still resumes); the
    snapshots listed are the ones this run's ledger records (``train_state.pt``), never other
    files of ``-o``.

    Returns ``{"snapshots": [{"path", "images_seen", "sha256"}], ...}`` (also in ``finetune.json``
    and ``report.results``). Raises UsageError for bad numbers/paths or another run's state,
    DataError for an incomplete synthetic set, CheckpointError for an unreadable model or state.
    """
    import torch

    from neon_cli import validate
    from neon_cli.dist import broadcast_object, is_main, main_rank_lock, run_on_main
    from neon_cli.family import get_family, load_model, model_path as resolve_model, plugin_version, resolve_settings
    from neon_cli.family import snapshot_name
    from neon_cli.fsutil import remove_stale_tmp_in
    from neon_cli.dataset import check_family, encoded_set, open_synthetic, read_manifest
    from neon_cli.identity import synthetic_set_sha256
    from neon_cli.train import MAX_TRAIN_SEED, TrainConfig, snapshot_points, train_loop

    # ---- numbers first: nothing is read or written for a value that cannot work ----
    validate.positive_int("--budget", budget)
    if lr is not None:
        validate.positive("--lr", lr)
    if batch is not None:
        validate.positive_int("--batch", batch)
    if warmup is not None:
        validate.integer("--warmup", warmup, low=0)
    if save_every is not None:
        validate.positive_int("--save-every", save_every)
    if ema_halflife is not None:
        validate.integer("--ema-halflife", ema_halflife, low=0)
    validate.integer("--seed", seed, low=0, high=MAX_TRAIN_SEED)
    family = get_family(family_name)
    report.family = plugin_version(family_name)
    path = resolve_model(family, model_path)
    settings = resolve_settings(family, set_pairs, train=True)
    defaults = dict(getattr(family, "train_defaults", {}) or {})
    if ema_halflife is None:
        ema_halflife = defaults.get("ema_halflife_images")
    cfg = TrainConfig(
        budget=budget,
        lr=lr if lr is not None else float(defaults.get("lr", 1e-4)),
        batch=batch if batch is not None else int(defaults.get("batch", 64)),
        warmup=warmup if warmup is not None else _default_warmup(defaults.get("warmup_images", 0), budget),
        ema_halflife=ema_halflife or None,
        save_every=save_every,
        seed=seed,
    )
    cfg.check()
    points = snapshot_points(cfg.budget, cfg.batch, cfg.save_every)
    names = [snapshot_name(family, p) for p in points]
    for (a, na), (b, nb) in zip(zip(points, names), zip(points[1:], names[1:])):
        if na == nb:  # e.g. EDM's network-snapshot-{kimg:06d}.pkl with snapshots less than 1000 images apart
            raise UsageError(f"--save-every: the snapshots after {a} and {b} images would both be named {na} "
                             f"(family {family.name!r}'s snapshot names); give a larger --save-every")
    out_dir = Path(out_dir)
    report.check_outputs({"--model": path, "--data": data_dir}, {"-o": out_dir})
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o: {out_dir} exists and is not a directory")
    check_family(read_manifest(Path(data_dir)), family, data_dir)  # S of another family: refused before any work
    with main_rank_lock(out_dir, "-o", folder=True):
        run_on_main(remove_stale_tmp_in, out_dir)  # what a killed run left half-written
        base_sha = report.add_input("base", path)
        data = open_synthetic(data_dir)  # streamed from the shards: memory does not grow with |S|
        manifest_sha = report.add_input("synthetic_set", Path(data_dir) / "manifest.json")
        # S by content (its manifest without paths): a moved S, or one re-made from the same base
        # at another path, is the same S; states of older neon recorded the manifest file's sha256
        data_sha = synthetic_set_sha256(data_dir)
        report.settings.update(train_config=cfg.__dict__, resolved_settings=settings)
        base_meta = family.read_metadata(str(path)) if hasattr(family, "read_metadata") else {}
        base_images = int(base_meta.get("train_images", 0) or 0)
        model = load_model(family, path, settings=settings, trust_pickle=trust_pickle, purpose="train")
        use_set = getattr(family, "use_synthetic_set", None)
        if callable(use_set):  # optional: the family reads what S's labels index (t2i: the manifest's prompts)
            use_set(model, data.manifest)
        suffix = saved_suffix(family, model, out_dir)  # what its save writes, when it does not say
        if callable(getattr(family, "encode", None)) and callable(getattr(family, "encode_key", None)):
            from neon_cli.dist import device

            model.to(device())
            data, encoded = encoded_set(family, model, data, settings, fallback_dir=out_dir, progress=progress)
            report.settings.update(encoded=encoded)
        torch.manual_seed(seed)
        ledger: list[dict[str, Any]] = []

        def on_snapshot(seen: int, weights: Any) -> dict[str, Any]:
            name = snapshot_name(family, seen, suffix)
            if Path(name).name != name or name in ("", ".", ".."):
                raise FamilyError(f"family {family.name!r}: snapshot_name({seen}) = {name!r} is not a plain file name")
            f = out_dir / name
            meta = {
                "neon_role": "selftrained",
                "finetune_images": str(seen),
                "train_images": str(base_images + seen),
                "base_sha256": base_sha,
                "synthetic_set_sha256": data_sha,
                "lr": repr(cfg.lr),
                "batch": str(cfg.batch),
            }
            with atomic_path(f) as tmp:
                family.save(weights, str(tmp), meta)
            progress("finetune", seen, cfg.budget, message=f"snapshot {f.name}")
            return {"file": name, "images_seen": seen, "sha256": sha256_path(f)}

        train_loop(family, model, data, None, cfg, state_path=out_dir / "train_state.pt",
                   on_snapshot=on_snapshot, progress=progress,
                   provenance={"base_sha256": base_sha, "synthetic_set_sha256": data_sha}, snapshots=ledger,
                   legacy_provenance={"synthetic_set_sha256": manifest_sha})
        results = None
        if is_main():  # rank 0 made the snapshots and holds the ledger; it writes finetune.json
            results = _results(out_dir, ledger, cfg, len(data), base_images)
            write_json(out_dir / "finetune.json", {"schema": "neon.finetune/1", "config": cfg.__dict__,
                                                   "base": {"path": str(path), "sha256": base_sha},
                                                   "synthetic_set": {"path": str(data_dir), "sha256": data_sha},
                                                   **results})
        results = broadcast_object(results)
    for s in results["snapshots"]:
        report.add_output("selftrained", s["path"], s["sha256"])
    report.results.update(results)
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
