"""``neon finetune``: theta_s = theta_r briefly fine-tuned on the synthetic set S with the family's
own recipe (paper Algorithm 1, step 2), snapshots named by images seen.

Output directory::

    theta_s-000131072.safetensors   snapshot after 131,072 images seen (the family's native format;
    ...                             the suffix is the family's ``checkpoint_suffix``, default .safetensors;
                                    a family's ``snapshot_name`` may name them its own way, e.g. VAR's
                                    ar-ckpt-images_131072.pth)
    train_state.pt                  model, optimizer, EMA, images seen: a rerun of the same command resumes here
    finetune.json                   written last: the snapshots, their sha256 and the run's settings

S is read from its shards batch by batch (:mod:`neon_cli.dataset`), so memory does not grow with
|S|. A family with the ``encode`` hook (VAR: the frozen VQVAE's tokens) trains on its encoding of
S, computed once and cached beside S (``S/encoded-<key>/``; here under ``-o`` when S is read-only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neon_cli.errors import UsageError
from neon_cli.fsutil import atomic_path, sha256_path, write_json
from neon_cli.progress import ProgressFn, null_progress


def snapshot_name(images_seen: int, suffix: str = ".safetensors") -> str:
    """File name of the snapshot after ``images_seen`` images: ``theta_s-000131072.safetensors``."""
    return f"theta_s-{images_seen:09d}{suffix}"


def _default_warmup(value: Any, budget: int) -> int:
    """The family's ``train_defaults["warmup_images"]``: a number of images, or ``"budget"`` for a
    linear ramp over the whole run (the Neon paper's VAR and xAR fine-tunes)."""
    return int(budget) if value == "budget" else int(value or 0)


def _snapshots_on_disk(family: Any, out_dir: Path) -> list[tuple[int, Path]]:
    """(images seen, path) of the snapshots in ``out_dir`` named by the family's convention
    (:func:`neon_cli.family.snapshot_name`), in order of images seen."""
    import re

    from neon_cli.family import snapshot_name as family_snapshot_name

    found = []
    for f in out_dir.iterdir() if out_dir.is_dir() else ():
        if f.name.startswith("."):
            continue
        for digits in re.findall(r"\d+", f.name):
            if family_snapshot_name(family, int(digits)) == f.name:
                found.append((int(digits), f))
                break
    return sorted(found, key=lambda t: t[0])


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

    ``lr``/``batch``/``warmup``/``ema_halflife`` default to the family's ``train_defaults``.
    ``set_pairs`` (``--set KEY=VALUE``) resolve against the family's settings and its optional
    ``train_settings``; they and ``trust_pickle`` reach the family's ``load`` (purpose
    ``"train"``, see :func:`neon_cli.family.load_model`).
    Returns ``{"snapshots": [{"path", "images_seen", "sha256"}], ...}`` (also in ``finetune.json``
    and ``report.results``). Raises UsageError for bad numbers/paths, DataError for an incomplete
    synthetic set, CheckpointError for an unreadable model.
    """
    import torch

    from neon_cli.dataset import encoded_set, open_synthetic
    from neon_cli.family import get_family, load_model, model_path as resolve_model, plugin_version, resolve_settings
    from neon_cli.family import snapshot_name as family_snapshot_name
    from neon_cli.train import TrainConfig, train_loop

    family = get_family(family_name)
    report.family = plugin_version(family_name)
    path = resolve_model(family, model_path)
    settings = resolve_settings(family, set_pairs, train=True)
    defaults = dict(getattr(family, "train_defaults", {}) or {})
    cfg = TrainConfig(
        budget=budget,
        lr=lr if lr is not None else float(defaults.get("lr", 1e-4)),
        batch=batch or int(defaults.get("batch", 64)),
        warmup=warmup if warmup is not None else _default_warmup(defaults.get("warmup_images", 0), budget),
        ema_halflife=ema_halflife if ema_halflife is not None else defaults.get("ema_halflife_images"),
        save_every=save_every,
        seed=seed,
    )
    cfg.check()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o: {out_dir} exists and is not a directory")
    base_sha = report.add_input("base", path)
    data = open_synthetic(data_dir)  # streamed from the shards: memory does not grow with |S|
    data_sha = report.add_input("synthetic_set", Path(data_dir) / "manifest.json")
    report.settings.update(train_config=cfg.__dict__, resolved_settings=settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_meta = family.read_metadata(str(path)) if hasattr(family, "read_metadata") else {}
    base_images = int(base_meta.get("train_images", 0) or 0)
    model = load_model(family, path, settings=settings, trust_pickle=trust_pickle, purpose="train")
    if callable(getattr(family, "encode", None)) and callable(getattr(family, "encode_key", None)):
        from neon_cli.dist import device

        model.to(device())
        data, encoded = encoded_set(family, model, data, settings, fallback_dir=out_dir, progress=progress)
        report.settings.update(encoded=encoded)
    torch.manual_seed(seed)
    snapshots: list[dict[str, Any]] = []

    def on_snapshot(seen: int, weights: Any) -> None:
        f = out_dir / family_snapshot_name(family, seen)
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
        snapshots.append({"path": str(f), "images_seen": seen})
        progress("finetune", seen, cfg.budget, message=f"snapshot {f.name}")

    train_loop(family, model, data, None, cfg, state_path=out_dir / "train_state.pt",
               on_snapshot=on_snapshot, progress=progress)
    # every snapshot on disk (a resumed run only made the later ones in this process)
    all_snaps = [{"path": str(f), "images_seen": seen, "sha256": sha256_path(f)}
                 for seen, f in _snapshots_on_disk(family, out_dir) if seen <= cfg.budget]
    results = {
        "snapshots": all_snaps,
        "final": all_snaps[-1]["path"] if all_snaps else None,
        "num_synthetic": len(data),
        "budget_images": cfg.budget,
        "base_train_images": base_images or None,
        "budget_fraction": (cfg.budget / base_images) if base_images else None,
    }
    write_json(out_dir / "finetune.json", {"schema": "neon.finetune/1", "config": cfg.__dict__,
                                           "base": {"path": str(path), "sha256": base_sha},
                                           "synthetic_set": {"path": str(data_dir), "sha256": data_sha}, **results})
    for s in all_snaps:
        report.add_output("selftrained", s["path"], s["sha256"])
    report.results.update(results)
    return results
