"""``neon finetune``: theta_s = theta_r briefly fine-tuned on the synthetic set S with the family's
own recipe (paper Algorithm 1, step 2), snapshots named by images seen.

Output directory::

    theta_s-000131072.safetensors   snapshot after 131,072 images seen (the family's native format;
    ...                             the suffix is the family's ``checkpoint_suffix``, default .safetensors)
    train_state.pt                  model, optimizer, EMA, images seen: a rerun of the same command resumes here
    finetune.json                   written last: the snapshots, their sha256 and the run's settings
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

    from neon_cli.family import get_family, load_model, model_path as resolve_model, plugin_version, resolve_settings
    from neon_cli.synth import load_synthetic
    from neon_cli.family import snapshot_name as family_snapshot_name
    from neon_cli.train import TrainConfig, snapshot_points, train_loop

    family = get_family(family_name)
    report.family = plugin_version(family_name)
    path = resolve_model(family, model_path)
    settings = resolve_settings(family, set_pairs, train=True)
    defaults = dict(getattr(family, "train_defaults", {}) or {})
    cfg = TrainConfig(
        budget=budget,
        lr=lr if lr is not None else float(defaults.get("lr", 1e-4)),
        batch=batch or int(defaults.get("batch", 64)),
        warmup=warmup if warmup is not None else int(defaults.get("warmup_images", 0)),
        ema_halflife=ema_halflife if ema_halflife is not None else defaults.get("ema_halflife_images"),
        save_every=save_every,
        seed=seed,
    )
    cfg.check()
    points = snapshot_points(cfg.budget, cfg.batch, cfg.save_every)
    names = [family_snapshot_name(family, p) for p in points]
    for (a, na), (b, nb) in zip(zip(points, names), zip(points[1:], names[1:])):
        if na == nb:
            raise UsageError(f"--save-every: the snapshots after {a} and {b} images would both be named {na} "
                             f"(family {family.name!r}'s snapshot names); give a larger --save-every")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o: {out_dir} exists and is not a directory")
    base_sha = report.add_input("base", path)
    images, labels, manifest = load_synthetic(data_dir)
    data_sha = report.add_input("synthetic_set", Path(data_dir) / "manifest.json")
    report.settings.update(train_config=cfg.__dict__, resolved_settings=settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_meta = family.read_metadata(str(path)) if hasattr(family, "read_metadata") else {}
    base_images = int(base_meta.get("train_images", 0) or 0)
    suffix = getattr(family, "checkpoint_suffix", ".safetensors")
    model = load_model(family, path, settings=settings, trust_pickle=trust_pickle, purpose="train")
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

    train_loop(family, model, images, labels, cfg, state_path=out_dir / "train_state.pt",
               on_snapshot=on_snapshot, progress=progress)
    # every snapshot on disk (a resumed run only made the later ones in this process): this run's
    # schedule under the family's names, plus default-named ones of earlier runs with another --save-every
    found = {out_dir / n: p for p, n in zip(points, names) if (out_dir / n).exists()}
    for f in sorted(out_dir.glob(f"theta_s-*{suffix}")):
        digits = f.name[len("theta_s-"):len(f.name) - len(suffix)]
        if digits.isdigit() and int(digits) <= cfg.budget:
            found.setdefault(f, int(digits))
    all_snaps = [{"path": str(f), "images_seen": seen, "sha256": sha256_path(f)}
                 for f, seen in sorted(found.items(), key=lambda kv: kv[1])]
    results = {
        "snapshots": all_snaps,
        "final": all_snaps[-1]["path"] if all_snaps else None,
        "num_synthetic": int(images.shape[0]),
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
