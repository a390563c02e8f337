"""``neon demo``: the whole of Neon (paper Algorithm 1) on a family's embedded default model,
following the paper's protocol (Sec. 4: every model at its FID-optimal inference settings; here
"FID" is the family's first metric, ``fd_digits`` for digits):

1. the base's own best gamma (Brent over ln gamma on that metric, common random numbers);
2. synth: |S| images at that gamma;
3. finetune: budget B images seen (a fraction of the base's training budget) -> theta_s;
4. the "more training" control: theta_r fine-tuned on the family's real data with the same budget
   and recipe;
5. tune-w: (w, gamma) jointly (w at S's gamma first, then the quadratic surface), the control's
   own best gamma, merge -> ``OUT/neon.safetensors``;
6. confirmation on a larger, disjoint seed range (tune-w's stage 2 with ``keep=1``, one block, no
   w refit, so the demo stays a few minutes; ``neon tune-w`` itself refits w there by default):
   the base at its default settings, the base at its best gamma, the control and Neon; the
   headline gain is against the base at its best, with the standard error of the paired
   difference (same seeds) and whether it is resolved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neon_cli.errors import UsageError
from neon_cli.progress import ProgressFn, null_progress


def demo(request: Any, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Run the protocol above for a :class:`neon_cli.requests.DemoRequest` (validated here) on
    ``request.base`` (default: the family's embedded model); returns results.

    ``budget`` (images seen) defaults to ``budget_fraction`` x the base's recorded training
    budget (metadata ``train_images``). ``gamma``: the guidance box searched for the base, the
    control and Neon (ignored, like the control's gamma search, for families without guidance).
    Results (also ``report.results``): ``base_default``, ``base_best``, ``control``, ``neon``
    (metrics on the confirmation seeds), ``gamma_default``, ``gamma_base_best``, ``gamma_S``,
    ``w``, ``gamma``, ``gain_vs_best`` (1 - neon / base-at-best value of ``metric``, the family's first: the headline),
    ``gain_vs_default``, ``improved``, ``num_synthetic``, ``budget_images``, ``base_train_images``,
    ``budget_fraction``, ``search_evaluations``, ``paths``, ``steps`` (each step's report).
    Raises UsageError on bad numbers or an output that is an input.
    """
    from neon_cli import validate
    from neon_cli.family import get_family, model_path, plugin_version
    from neon_cli.fsutil import check_outputs, exclusive_lock

    request.validate()
    family_name, num_synthetic, gamma, max_evals = request.family, request.num_synthetic, request.gamma, request.max_evals
    family = get_family(family_name)
    report.family = plugin_version(family_name)
    base = model_path(family, request.base, "--base")
    out_dir = Path(request.out)
    written = {f"-o ({name})": out_dir / name for name in ("neon.safetensors", "tune-cache.jsonl", "S", "ft", "control")}
    check_outputs({"--base": base}, {"-o": out_dir, **written, "--report": request.report})
    base_images = int((family.read_metadata(str(base)) or {}).get("train_images", 0) or 0)
    budget = request.budget
    if budget is None:
        if not base_images:
            raise UsageError(f"--budget: {base} records no training budget; give --budget in images")
        budget = max(1, int(round(request.budget_fraction * base_images)))
    budget = validate.positive_int("--budget", budget)
    if max_evals is not None and validate.positive_int("--max-evals", max_evals) < 7:
        raise UsageError(f"--max-evals {max_evals}: each search needs at least 7 evaluations")
    if not getattr(family, "guidance", None):
        gamma = None
    report.add_input("base", base)
    with exclusive_lock(out_dir, "-o", folder=True):
        run = _Pipeline(request, family, base, gamma, report, progress)
        results = run.all(budget)
    results.update(num_synthetic=num_synthetic, budget_images=budget, base_train_images=base_images or None,
                   budget_fraction=budget / base_images if base_images else None, confirm_samples=request.confirm_samples)
    report.add_output("neon", out_dir / "neon.safetensors")
    report.results.update(results)
    return results


class _Pipeline:
    """The demo's steps, sharing one cache and one seed plan (``10,000,000 + seed``)."""

    def __init__(self, request: Any, family: Any, base: Path, gamma: tuple[float, float] | None, report: Any,
                 progress: ProgressFn):
        self.request = request
        self.family_name, self.family, self.base, self.out = request.family, family, base, Path(request.out)
        self.seed, self.num_samples, self.confirm_samples, self.gamma = (request.seed, request.num_samples,
                                                                         request.confirm_samples, gamma)
        self.report, self.progress = report, progress
        self.cache = self.out / "tune-cache.jsonl"
        self.steps: dict[str, Any] = {}
        self.max_evals: int | None = request.max_evals

    def step(self, name: str, fn: Any, **kw: Any) -> dict[str, Any]:
        from neon_cli.report import Report

        sub = Report(name, argv=self.report.argv)
        res = fn(report=sub, progress=self.progress, **kw)
        self.steps[name] = sub.to_dict()
        return res

    def all(self, budget: int) -> dict[str, Any]:
        from neon_cli.finetune import finetune
        from neon_cli.synth import synthesize
        from neon_cli.requests import Outputs, TuneRequest
        from neon_cli.tune.run import tune_base_gamma, tune_w

        r = self.request
        num_synthetic, lr, bounds, control = r.num_synthetic, r.lr, r.bounds, r.control
        eval_seed = 10_000_000 + self.seed
        gamma_s = None
        if self.gamma is not None:  # 1. the base at its own best gamma; S is synthesized there
            bl = self.step("base-gamma", lambda **k: tune_base_gamma(TuneRequest(
                self.family_name, self.base, None, gamma=self.gamma, num_samples=self.num_samples, seed=eval_seed,
                max_evals=self.max_evals, outputs=Outputs(cache=self.cache)), **k))
            gamma_s = bl["best"]["gamma"]
        pairs = [f"{self.family.guidance}={gamma_s!r}"] if gamma_s is not None else []
        self.step("synth", lambda **k: synthesize(self.family_name, self.base, num=num_synthetic, out_dir=self.out / "S",
                                                  seed=self.seed, set_pairs=pairs, **k))
        ft = self.step("finetune", lambda **k: finetune(self.family_name, self.base, self.out / "S", budget=budget, lr=lr,
                                                        out_dir=self.out / "ft", seed=self.seed, **k))
        ctl = self._control(ft["final"], num_synthetic) if control else None
        neon_path = self.out / "neon.safetensors"
        tuned = self.step("tune-w", lambda **k: tune_w(TuneRequest(
            self.family_name, self.base, (ft["final"],), bounds=bounds, gamma=self.gamma, line_gamma=gamma_s,
            num_samples=self.num_samples, seed=eval_seed, confirm_samples=self.confirm_samples, keep=1,
            refit_width=0.0, max_evals=self.max_evals, control=ctl, require_improvement=False, write_anyway=True,
            outputs=Outputs(out=neon_path, cache=self.cache)), **k))
        return self._results(tuned, gamma_s, ft, neon_path, ctl)

    def _control(self, snapshot: str, num_real: int) -> str | None:
        """theta_r fine-tuned on real data with theta_s's budget and recipe (None without real data)."""
        from neon_cli.tune.baseline import real_control, snapshot_recipe

        if not callable(getattr(self.family, "real_samples", None)):
            return None
        recipe = snapshot_recipe(self.family, Path(snapshot))
        from neon_cli.family import load_model

        model = load_model(self.family, self.base)
        info = self.step("control", lambda report, progress: real_control(
            self.family_name, self.family, self.base, model, recipe, self.out / "control", num_real, progress))
        self.num_real = info["num_real"]
        return info["path"]

    def _results(self, tuned: dict[str, Any], gamma_s: float | None, ft: dict[str, Any], neon_path: Path,
                 ctl: str | None) -> dict[str, Any]:
        conf = tuned.get("confirmation") or {}
        m = tuned["metric"]
        bl = tuned["baselines"]
        base_default = conf.get("base_default") or bl["default"]["metrics"]
        base_best = conf.get("base_best") or (bl["best"] or bl["default"])["metrics"]
        neon = conf.get("neon") or tuned["chosen"]["metrics"]
        control = tuned.get("control")
        control_m = (control or {}).get("confirmation") or ((control or {}).get("best") or (control or {}).get("default") or {}).get("metrics")
        return {
            "metric": m, "base_default": base_default, "base_best": base_best, "neon": neon, "control": control_m,
            "gamma_default": bl["default"]["gamma"], "gamma_base_best": (bl["best"] or bl["default"])["gamma"],
            "gamma_S": gamma_s, "gamma_control": ((control or {}).get("best") or (control or {}).get("default") or {}).get("gamma"),
            "num_real": getattr(self, "num_real", None) if ctl else None,
            "w": tuned["chosen"]["w"], "gamma": tuned["chosen"]["gamma"],
            "gain_vs_best": 1 - neon[m] / base_best[m] if base_best.get(m) else None,
            "gain_vs_default": 1 - neon[m] / base_default[m] if base_default.get(m) else None,
            "gain_control_vs_best": 1 - control_m[m] / base_best[m] if control_m and base_best.get(m) else None,
            "vs_base": conf.get("vs_base") or tuned.get("search_vs_base"),
            "resolved": bool((conf.get("resolved_vs_base") if conf else (tuned.get("search_vs_base") or {}).get("resolved"))),
            "improved": tuned["improved"], "search_evaluations": sum(s["n_evals"] for s in tuned["snapshots"]),
            "evaluations": tuned["n_evals"],
            "paths": {"synthetic_set": str(self.out / "S"), "selftrained": ft["final"], "control": ctl,
                      "neon": str(neon_path) if tuned.get("written") else None},
            "steps": self.steps,
        }
