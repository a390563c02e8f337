"""The baselines Neon is measured against (issue 16, items 1 and 2).

* The base at its default settings, and the base at its **own best** guidance: the paper compares
  every model at its FID-optimal inference settings, so tune-w can search the base's gamma first
  (:func:`tune_guidance`: Brent's method over ln gamma, the same evaluation budget and the same
  seeds as Neon's search) and reports Neon against both; the headline gain is against the best.
* The "more training" control: theta_r fine-tuned on the family's *real* data with the same
  budget and recipe as theta_s (:func:`real_control`), scored the same way, so a user sees that
  Neon's gain is not what the same compute on real data gives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from neon_cli.errors import UsageError
from neon_cli.tune.brent import brent_search
from neon_cli.tune.common import Evaluation

#: Brent's tolerance on the base's guidance, in the search coordinate (ln gamma: about 2 %).
GAMMA_XTOL = 0.02


@dataclass
class GuidanceResult:
    """Outcome of :func:`tune_guidance`: the best measured gamma, its objective, every evaluation
    (``Evaluation.gamma`` set, ``w`` 0) and Brent's ``stopped``."""

    gamma: float
    value: float
    evaluations: list[Evaluation]
    stopped: str


def tune_guidance(f: Callable[[float], float], g_bounds: tuple[float, float], *, gamma_scale: str = "log",
                  max_evals: int = 9, xtol: float = GAMMA_XTOL) -> GuidanceResult:
    """Minimise ``f(gamma)`` over ``g_bounds`` with :func:`neon_cli.tune.brent_search` on
    s = ln gamma (``gamma_scale="log"``) or s = gamma (``"linear"``), ``xtol`` in s.

    Raises ValueError for a bad box (and ``"log"`` with gamma <= 0)."""
    lo, hi = (float(x) for x in g_bounds)
    if gamma_scale == "log":
        if not lo > 0:
            raise ValueError(f"gamma_scale 'log' needs gamma > 0, got ({lo:g}, {hi:g})")
        to_s, to_g = math.log, math.exp
    else:
        to_s, to_g = float, float
    res = brent_search(lambda s: f(to_g(s)), (to_s(lo), to_s(hi)), xtol=xtol, max_evals=max_evals)
    evals = [Evaluation(w=0.0, gamma=to_g(e.w), value=e.value, phase="base-gamma") for e in res.evaluations]
    return GuidanceResult(gamma=to_g(res.w), value=res.value, evaluations=evals, stopped=res.stopped)


def measure_baselines(ctx: Any, scorer: Any, who: str = "base") -> dict[str, Any]:
    """``who`` (``"base"`` or a ``ctx.models`` name) at the default settings and, with a
    ``--base-gamma`` box, at its best gamma (:func:`tune_guidance`, budget ``plan.per_snapshot``)
    on the search seeds.

    Returns ``{"default": {"gamma", "value", "metrics"}, "best": {..., "n_evals", "gamma_bounds",
    "stopped"} | None}``; "best" is the best of every evaluation of ``who`` (default included).
    """
    ev, plan, g0 = ctx.evaluator, ctx.plan, ctx.default_gamma
    phase = "base" if who == "base" else f"{who}"
    m0 = scorer(who, 0.0, g0, ev, phase)
    out: dict[str, Any] = {"default": {"gamma": g0, "value": m0[ctx.metric], "metrics": m0}, "best": None}
    if plan.base_gamma is None or not ctx.guidance:
        return out
    measured: dict[float, dict[str, float]] = {}

    def f(g: float) -> float:
        measured[g] = scorer(who, 0.0, g, ev, f"{phase}-gamma")
        return ctx.sign * measured[g][ctx.metric]

    res = tune_guidance(f, plan.base_gamma, gamma_scale=plan.base_gamma_scale, max_evals=plan.per_snapshot)
    g_best, m_best = min([(g0, m0), *measured.items()], key=lambda p: ctx.sign * p[1][ctx.metric])
    out["best"] = {"gamma": g_best, "value": m_best[ctx.metric], "metrics": m_best, "n_evals": len(res.evaluations),
                   "gamma_bounds": list(plan.base_gamma), "stopped": res.stopped}
    return out


def write_real_set(family: Any, model: Any, out_dir: Path, num: int, seed: int) -> Path:
    """Write ``family.real_samples(model, num, seed)`` as a synthetic-set folder (the layout of
    :mod:`neon_cli.synth`: one shard + ``manifest.json`` with ``"source": "real"``), so that
    :func:`neon_cli.finetune.finetune` trains on it exactly as on S. Returns ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    from neon_cli.fsutil import atomic_path, sha256_file, write_json
    from neon_cli.synth import SCHEMA, shard_name

    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").exists():
        return out_dir
    images, labels = family.real_samples(model, num, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"images": images.contiguous(), "seeds": torch.arange(len(images), dtype=torch.int64)}
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()
    f = out_dir / shard_name(0)
    with atomic_path(f) as tmp:
        save_file(tensors, str(tmp), metadata={"neon": json.dumps({"source": "real", "seed": seed}, sort_keys=True)})
    write_json(out_dir / "manifest.json", {
        "schema": SCHEMA, "source": "real", "family": family.name, "num": len(images), "seed": seed,
        "shards": [{"file": f.name, "start": 0, "count": len(images), "sha256": sha256_file(f)}],
        "image_shape": list(images.shape[1:]), "image_dtype": str(images.dtype).replace("torch.", ""),
    })
    return out_dir


def snapshot_recipe(family: Any, snapshot: Path, flag: str = "--control") -> dict[str, Any]:
    """The fine-tuning recipe behind ``snapshot``: ``budget`` (images seen), ``lr``, ``batch``,
    ``warmup``, ``ema_halflife``, ``seed``, ``num_synthetic`` (from the ``finetune.json`` beside it
    when present, else the snapshot's metadata). Raises UsageError naming ``flag`` when the
    snapshot records no budget (not made by ``neon finetune``)."""
    md = family.read_metadata(str(snapshot)) if hasattr(family, "read_metadata") else {}
    if "finetune_images" not in (md or {}):
        raise UsageError(f"{flag}: {snapshot} records no fine-tuning budget (finetune_images); "
                         "it was not made by 'neon finetune'")
    recipe: dict[str, Any] = {"budget": int(md["finetune_images"]), "lr": float(md["lr"]) if "lr" in md else None,
                              "batch": int(md["batch"]) if "batch" in md else None, "warmup": None,
                              "ema_halflife": None, "seed": 0, "num_synthetic": None}
    info = Path(snapshot).parent / "finetune.json"
    if info.is_file():
        try:
            data = json.loads(info.read_text())
            cfg = data.get("config", {})
            recipe.update(lr=cfg.get("lr", recipe["lr"]), batch=cfg.get("batch", recipe["batch"]),
                          warmup=cfg.get("warmup"), ema_halflife=cfg.get("ema_halflife"), seed=cfg.get("seed", 0),
                          num_synthetic=data.get("num_synthetic"))
        except (ValueError, AttributeError):
            pass
    return recipe


def real_control(family_name: str, family: Any, base: Path, model: Any, recipe: dict[str, Any], work: Path,
                 num_real: int, progress: Any) -> dict[str, Any]:
    """Fine-tune ``base`` on ``num_real`` real samples (``family.real_samples``; fewer when the
    family has fewer) with ``recipe`` (:func:`snapshot_recipe`) in ``work``; returns
    ``{"path", "budget", "lr", "batch", "num_real"}``. Raises UsageError when the family has no
    ``real_samples``."""
    from neon_cli.finetune import finetune
    from neon_cli.report import Report

    if not callable(getattr(family, "real_samples", None)):
        raise UsageError(f"--control real: family {family_name!r} provides no real data (no real_samples method)")
    data = write_real_set(family, model, Path(work) / "R", num_real, int(recipe.get("seed") or 0))
    res = finetune(family_name, base, data, budget=int(recipe["budget"]), lr=recipe.get("lr"), batch=recipe.get("batch"),
                   warmup=recipe.get("warmup"), ema_halflife=recipe.get("ema_halflife"), seed=int(recipe.get("seed") or 0),
                   out_dir=Path(work) / "ft", report=Report("finetune", argv=[]), progress=progress)
    n = json.loads((data / "manifest.json").read_text())["num"]
    return {"path": res["final"], "budget": int(recipe["budget"]), "lr": recipe.get("lr"), "batch": recipe.get("batch"),
            "num_real": n}
