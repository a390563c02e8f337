"""What one tune-w run holds (:class:`Context`) and how it measures a candidate (:class:`Scorer`):
from the cache or by sampling, logged, shown live, every rank taking rank 0's cache decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from neon_cli.errors import UsageError
from neon_cli.identity import family_content_settings
from neon_cli.progress import ProgressFn
from neon_cli.tune.cache import EvalCache, _canon, evaluation_key
from neon_cli.tune.common import HIGHER_IS_BETTER
from neon_cli.tune.plan import Plan


@dataclass
class Context:
    """Everything the steps of one tune-w run share.

    ``settings``: the resolved inference settings (family defaults, then the base's recorded
    settings, then ``--set``); ``guidance``: the family's guidance setting name or None;
    ``sign``: +1 for a minimised metric, -1 for a maximised one (:data:`HIGHER_IS_BETTER`);
    ``static``: the run's constant cache-key part (:func:`neon_cli.tune.cache.static_key`);
    ``models``: extra checkpoints scored as they are (the ``--control`` model), by name:
    ``(sha256, model)``.
    """

    family: Any
    family_name: str
    plan: Plan
    base: Path
    snaps: list[Path]
    base_sha: str
    snap_shas: list[str]
    settings: dict[str, Any]
    guidance: str | None
    metric: str
    model: Any
    base_sd: Any
    num_classes: int
    static: dict[str, Any]
    store: EvalCache
    trust_pickle: bool
    report: Any
    progress: ProgressFn
    evaluator: Any = None
    line_gamma: float | None = None
    models: dict[str, tuple[str, Any]] = field(default_factory=dict)
    _loaded: dict[str, Any] = field(default_factory=lambda: {"index": None, "sd": None})
    _lora_kind: dict[int, bool] = field(default_factory=dict)
    _lora_model: dict[str, Any] = field(default_factory=lambda: {"index": None, "model": None})

    @property
    def sign(self) -> float:
        return -1.0 if self.metric in HIGHER_IS_BETTER else 1.0

    @property
    def default_gamma(self) -> float | None:
        return float(self.settings[self.guidance]) if self.guidance else None

    def better(self, a: float, b: float) -> bool:
        """True when metric value ``a`` is strictly better than ``b``."""
        return self.sign * a < self.sign * b

    def selftrained_sd(self, i: int) -> Any:
        """State dict of snapshot ``i`` (one snapshot held in memory at a time); a LoRA file as
        snapshot is θ_r + s·B·A (:func:`neon_cli.lora.lora_state_dict`)."""
        from neon_cli.family import load_model

        if self._loaded["index"] != i:
            self._loaded["sd"] = None  # free the previous snapshot first
            if self.is_lora(i):
                from neon_cli.lora import lora_state_dict

                self._loaded["sd"] = lora_state_dict(self.base_sd, self.snaps[i])
            else:
                self._loaded["sd"] = load_model(self.family, self.snaps[i], settings=self.settings,
                                                trust_pickle=self.trust_pickle).state_dict()
            self._loaded["index"] = i
        return self._loaded["sd"]

    def is_lora(self, i: int) -> bool:
        """Snapshot ``i`` is a LoRA file on θ_r (:func:`neon_cli.lora.is_lora`, header only)."""
        if i not in self._lora_kind:
            from neon_cli.lora import is_lora

            self._lora_kind[i] = is_lora(self.snaps[i])
        return self._lora_kind[i]

    def lora_model(self, i: int, w: float) -> Any:
        """θ_Neon for a LoRA snapshot by re-scaling the adapter (the family's ``load_with_lora`` /
        ``set_lora_scale`` hooks, scale = −w), or None when the snapshot is not a LoRA or the family
        has no ``load_with_lora`` (then the candidate is merged). One adapted model is kept."""
        fam = self.family
        if not self.is_lora(i) or not callable(getattr(fam, "load_with_lora", None)):
            return None
        rescale = getattr(fam, "set_lora_scale", None)
        if not callable(rescale):
            return fam.load_with_lora(str(self.base), str(self.snaps[i]), -float(w))
        if self._lora_model["index"] != i:
            self._lora_model["model"] = None
            self._lora_model["model"] = fam.load_with_lora(str(self.base), str(self.snaps[i]), -float(w))
            self._lora_model["index"] = i
            return self._lora_model["model"]
        return rescale(self._lora_model["model"], -float(w)) or self._lora_model["model"]

    def evaluator_for(self, num_samples: int, seed: int) -> Any:
        from neon_cli.evaluate import Evaluator

        return Evaluator(self.family, self.settings, num_samples, seed, self.plan.batch, self.progress,
                         num_classes=self.num_classes, labels=self.plan.labels)


class Scorer:
    """Measures candidates for the steps of tune-w; ``log`` holds one row per distinct candidate.

    ``scorer(who, w, gamma, evaluator, phase)`` returns the candidate's metrics (every metric
    the family reports). ``who``: a snapshot index (theta_r - w (theta_s_i - theta_r)),
    ``"base"`` (theta_r itself; w is 0) or a name of ``ctx.models`` (a checkpoint scored as it
    is). ``gamma`` None keeps the settings' guidance. A candidate already measured in this run
    is answered from memory without a new row; otherwise the cache is asked (a record lacking
    the requested metric is a miss). Under torchrun rank 0 alone reads the cache and every rank
    takes its hit-or-miss decision (broadcast), so ranks that see another cache file, or none,
    still run the same collectives; rank 0 alone appends.
    """

    def __init__(self, ctx: Context, total: int):
        self.ctx = ctx
        self.total = total
        self.log: list[dict[str, Any]] = []
        self._rows: dict[str, dict[str, Any]] = {}

    def key(self, who: Any, w: float, settings: Mapping[str, Any], ev: Any) -> dict[str, Any]:
        ctx = self.ctx
        if isinstance(who, int):
            model, selftrained = ctx.base_sha, ctx.snap_shas[who]
        elif who == "base":
            model, selftrained, w = ctx.base_sha, None, 0.0
        else:
            model, selftrained, w = ctx.models[who][0], None, 0.0
        # a setting naming a file (a VAE) enters the key as its content's sha256, not its path
        settings = family_content_settings(ctx.family, settings)
        return evaluation_key(ctx.static, model=model, selftrained=selftrained, w=w, settings=settings,
                              guidance=ctx.guidance, seed=ev.seed, num_samples=ev.num_samples)

    def __call__(self, who: Any, w: float, gamma: float | None, ev: Any, phase: str) -> dict[str, float]:
        ctx = self.ctx
        settings, overrides = dict(ctx.settings), {}
        if ctx.guidance and gamma is not None:
            settings[ctx.guidance] = overrides[ctx.guidance] = float(gamma)
        key = self.key(who, w, settings, ev)
        seen = self._rows.get(_canon(key))
        if seen is not None:
            return seen["metrics"]
        metrics, seconds, cached = self._measure(who, w, overrides, ev, key)
        row = {
            "index": len(self.log), "model": who if isinstance(who, str) else "neon",
            "snapshot": str(ctx.snaps[who]) if isinstance(who, int) else None, "w": float(key["w"]),
            "gamma": key["gamma"], "phase": phase, "round": 0, "value": float(metrics[ctx.metric]),
            "metrics": metrics, "seconds": seconds, "cached": cached, "seed": ev.seed, "num_samples": ev.num_samples,
        }
        self.log.append(row)
        self._rows[_canon(key)] = row
        label = ctx.snaps[who].name if isinstance(who, int) else who
        ctx.progress("tune-w", len(self.log), max(self.total, len(self.log)), row={
            "#": len(self.log), "model": label, "w": round(float(w), 4),
            **({"gamma": round(float(key["gamma"]), 4)} if key["gamma"] is not None else {}),
            ctx.metric: float(metrics[ctx.metric]), "s": round(seconds, 2), **({"cached": True} if cached else {}),
        })
        return metrics

    def _measure(self, who: Any, w: float, overrides: Mapping[str, Any], ev: Any,
                 key: Mapping[str, Any]) -> tuple[dict[str, float], float, bool]:
        from neon_cli.dist import broadcast_object, is_main

        ctx = self.ctx
        hit = broadcast_object(ctx.store.get(key, ctx.metric) if is_main() else None)
        if hit is not None:
            return dict(hit["metrics"]), float(hit.get("seconds", 0.0)), True
        lora_model = ctx.lora_model(who, w) if isinstance(who, int) else None
        if lora_model is not None:  # LoRA snapshot: the adapter at scale -w, nothing merged
            metrics = ev.score_model(lora_model, overrides)
        elif isinstance(who, int):
            metrics = ev.score_merge(ctx.model, ctx.base_sd, ctx.selftrained_sd(who), w, overrides)
        elif who == "base":
            metrics = ev.score_model(ctx.model, overrides)
        else:
            metrics = ev.score_model(ctx.models[who][1], overrides)
        seconds = float(metrics.pop("seconds", 0.0))
        if ctx.metric not in metrics:
            raise UsageError(f"--metric {ctx.metric}: family {ctx.family_name!r} returned only {', '.join(metrics)}")
        ctx.store.put(key, metrics, seconds)
        return metrics, seconds, False

    def rows(self, *phases: str) -> list[dict[str, Any]]:
        return [r for r in self.log if r["phase"] in phases]
