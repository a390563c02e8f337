"""``neon demo``: the whole of Neon (paper Algorithm 1) on a family's embedded default model.

synth (|S| images at the default inference settings) -> finetune (budget B images seen, a
fraction of the base model's training budget) -> tune-w (Brent's method over w on FID, common
random numbers) -> merge (the chosen w, written to ``OUT/neon.safetensors``) -> confirmation:
base (w = 0) and Neon re-scored on a disjoint, larger seed range, so the reported gain is not the
search's own selection noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neon_cli.errors import UsageError
from neon_cli.progress import ProgressFn, null_progress


def demo(
    *,
    family_name: str = "digits",
    out_dir: Path = Path("neon-demo"),
    num_synthetic: int = 4000,
    budget: int | None = None,
    budget_fraction: float = 0.03,
    lr: float | None = None,
    bounds: tuple[float, float] = (0.0, 3.0),
    max_evals: int = 10,
    num_samples: int = 2000,
    confirm_samples: int = 5000,
    seed: int = 0,
    report: Any,
    progress: ProgressFn = null_progress,
) -> dict[str, Any]:
    """Run synth -> finetune -> tune-w -> merge on the family's embedded default; returns results.

    ``budget`` (images seen) defaults to ``budget_fraction`` x the base model's recorded training
    budget (checkpoint metadata ``train_images``). Results (also ``report.results``): ``base_fid``,
    ``neon_fid`` (confirmation seeds), ``improvement`` (1 - neon/base), ``w``, ``num_synthetic``,
    ``budget_images``, ``base_train_images``, ``budget_fraction``, ``base``/``neon`` (all metrics),
    ``search`` (every tune-w evaluation), ``paths``. Raises UsageError on bad numbers.
    """
    from neon_cli.family import get_family, model_path, plugin_version
    from neon_cli.finetune import finetune
    from neon_cli.report import Report
    from neon_cli.synth import synthesize
    from neon_cli.tune import run_tune_w

    family = get_family(family_name)
    report.family = plugin_version(family_name)
    base = model_path(family, None, "--family")
    base_images = int(family.read_metadata(str(base)).get("train_images", 0) or 0)
    if budget is None:
        if not base_images:
            raise UsageError(f"--budget: {base} records no training budget; give --budget in images")
        budget = max(1, int(round(budget_fraction * base_images)))
    out_dir = Path(out_dir)
    report.add_input("base", base)
    steps: dict[str, Any] = {}

    def step(name: str, fn: Any, **kw: Any) -> dict[str, Any]:
        sub = Report(name, argv=report.argv)
        res = fn(report=sub, progress=progress, **kw)
        steps[name] = sub.to_dict()
        return res

    step("synth", lambda **k: synthesize(family_name, None, num=num_synthetic, out_dir=out_dir / "S", seed=seed, **k))
    ft = step("finetune", lambda **k: finetune(family_name, None, out_dir / "S", budget=budget, lr=lr, out_dir=out_dir / "ft",
                                                 seed=seed, **k))
    neon_path = out_dir / "neon.safetensors"
    tuned = step("tune-w", lambda **k: run_tune_w(family_name, None, [ft["final"]], bounds=bounds, max_evals=max_evals,
                                                   num_samples=num_samples, seed=10_000_000 + seed,
                                                   confirm_samples=confirm_samples, cache=out_dir / "tune-cache.jsonl",
                                                   output=neon_path, **k))
    conf = tuned.get("confirmation") or {}
    base_m = conf.get("base") or {}
    neon_m = conf.get("neon") or tuned["chosen"]["metrics"]
    results = {
        "base_fid": base_m.get("fid"),
        "neon_fid": neon_m.get("fid"),
        "improvement": (1 - neon_m["fid"] / base_m["fid"]) if base_m.get("fid") else None,
        "w": tuned["chosen"]["w"],
        "num_synthetic": num_synthetic,
        "budget_images": budget,
        "base_train_images": base_images or None,
        "budget_fraction": budget / base_images if base_images else None,
        "base": base_m,
        "neon": neon_m,
        "confirm_samples": confirm_samples,
        "search_evaluations": tuned.get("n_evals"),
        "paths": {"synthetic_set": str(out_dir / "S"), "selftrained": ft["final"], "neon": str(neon_path)},
        "steps": steps,
    }
    report.add_output("neon", neon_path)
    report.results.update(results)
    return results
