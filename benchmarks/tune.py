"""Hand-run benchmark: tune-w's searches against fine grids on several theta_s (issue 16, item 3).

On the digits family (metric ``--metric``, default ``fd_digits``; "FID" below), for each theta_s of
``--configs`` (different |S|, budgets and seeds) and on one seed plan (common random numbers for
every candidate; ``--num-samples`` images per evaluation):

* the fine grid over (w, gamma): a grid of step ``--fine-step`` on both axes, half-widths
  ``--fine-half-width`` W G, around the best coarse point measured (the paper protocol's sweep
  and the searches' points, plus with ``--coarse-grid`` a grid over the whole box of
  ``--coarse-w-step`` x ``--coarse-gamma-step``): the reference best is the best of all of those;
* over w alone at gamma_S (the gamma S was synthesized at): Brent (``neon_cli.tune.brent_search``)
  and the paper scripts' sweep (0.25 steps from 0, stop once the metric rises ``--sweep-stop``
  above the best so far, then +-0.1 in 0.05 steps);
* over (w, gamma): ``neon tune-w --gamma``'s default (``neon_cli.tune.joint_search``: w at gamma_S
  first, then the surface, 9 evaluations unless the fit says the optimum is not resolved, at most
  15), the 6-point pentagon design (``--joint design``, 9) and the paper's protocol (the w sweep
  with early stop at every gamma of a 0.25 grid, then +-0.1 in w and gamma in 0.05 steps).

Printed per theta_s: each method's evaluations, its images sampled (evaluations x samples; the
paper's protocol at its own 10k samples per point), its gap to the fine grid's best (%), and the
FID of its chosen point re-measured on ``--confirm-samples`` disjoint seeds ("final FID"). Then
a summary: how many theta_s each method meets the 2 % target on, and how far below the paper's
protocol (in images sampled) neon gets to the same final FID.

theta_s: ``WORKDIR/NAME/{S,ft}`` (made here, resumable: synth at gamma_S, finetune), where
gamma_S is the base's own FID-best gamma (Brent over ln gamma in [1, 4], 2,000 samples, the search
seeds; as ``neon demo``), or ``2`` for configs marked ``@2``. Every evaluation is cached in
``WORKDIR/evals.jsonl`` (tune-w's cache format and keys), so reruns only measure new points.

    python benchmarks/tune.py --workdir /work/bench                      # all configs
    python benchmarks/tune.py --workdir W --configs T1:4000:0.03:0       # NAME:|S|:BUDGET_FRACTION:SEED[@GAMMA_S]

Which configs chose the defaults: ``T1`` and ``T2`` (the design constants of
``neon_cli/tune/joint.py`` were set looking at them); ``H1``-``H4`` played no part.
Measured figures: README, "Tuning w and gamma". These gaps are on the search's own seeds (one
block); the regret of each method against a truth over many disjoint blocks is
``benchmarks/tune_regret.py`` (issue 23).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

DEFAULT_CONFIGS = ["T1:4000:0.03:0", "T2:4000:0.10:0", "H1:1000:0.03:1", "H2:16000:0.05:2", "H3:2000:0.01:3",
                   "H4:4000:0.03:0@2"]
PAPER_SAMPLES = 10_000  # the paper's samples per search evaluation (Sec. 4)


def _grid(lo: float, hi: float, step: float) -> list[float]:
    n = int(round((hi - lo) / step))
    return [round(lo + k * step, 10) for k in range(n + 1)]


def coarse_sweep(f, lo: float, hi: float, stop: float) -> list[float]:
    """0.25 steps from ``lo``, stopping once the metric rises ``stop`` above the best so far; the w asked."""
    asked, best = [], math.inf
    for w in _grid(lo, hi, 0.25):
        asked.append(w)
        v = f(w)
        if v > best + stop:
            break
        best = min(best, v)
    return asked


def paper_sweep_w(f, lo: float, hi: float, stop: float) -> tuple[float, list[float]]:
    """The paper scripts' w protocol: :func:`coarse_sweep`, then +-0.1 around the winner in 0.05
    steps. Returns (best w, the w asked)."""
    asked = coarse_sweep(f, lo, hi, stop)
    best_w = min(asked, key=f)
    for dw in (-0.1, -0.05, 0.05, 0.1):
        w = round(best_w + dw, 10)
        if lo <= w <= hi and w not in asked:
            asked.append(w)
    return min(asked, key=f), asked


def paper_sweep_2d(f, w_box, g_box, stop: float) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """The joint version: :func:`coarse_sweep` over w at every gamma of a 0.25 grid, then +-0.1 in
    w and in gamma (0.05 steps) around the best. Returns (best point, points asked)."""
    asked = [(w, g) for g in _grid(*g_box, 0.25) for w in coarse_sweep(lambda w, g=g: f(w, g), *w_box, stop)]
    bw, bg = min(asked, key=lambda p: f(*p))
    for dw in (-0.1, -0.05, 0.0, 0.05, 0.1):
        for dg in (-0.1, -0.05, 0.0, 0.05, 0.1):
            p = (round(bw + dw, 10), round(bg + dg, 10))
            if w_box[0] <= p[0] <= w_box[1] and g_box[0] <= p[1] <= g_box[1] and p not in asked:
                asked.append(p)
    return min(asked, key=lambda p: f(*p)), asked


class Bench:
    """One family, one base, one cache; evaluations of (theta_s, w, gamma) on a seed plan."""

    def __init__(self, args):
        from neon_cli.family import get_family, plugin_version, resolve_settings
        from neon_cli.fsutil import sha256_path
        from neon_cli.tune import EvalCache, static_key

        self.args = args
        self.family = get_family(args.family)
        self.base = Path(self.family.default_model)
        self.base_sha = sha256_path(self.base)
        self.settings = resolve_settings(self.family, [])
        self.static = static_key(self.family, plugin_version(args.family)["version"], batch=args.batch)
        self.cache = EvalCache(getattr(args, "cache", None) or args.workdir / "evals.jsonl")
        self.model = self.family.load(str(self.base))
        self.base_sd = self.model.state_dict()
        self.evaluators: dict = {}
        self.fresh = 0

    def evaluator(self, n: int, seed: int):
        from neon_cli.evaluate import Evaluator

        if (n, seed) not in self.evaluators:
            self.evaluators[(n, seed)] = Evaluator(self.family, self.settings, n, seed, self.args.batch)
        return self.evaluators[(n, seed)]

    def metrics(self, snap, w: float, g: float, n: int | None = None, seed: int | None = None) -> dict:
        """All metrics of theta_r - w (theta_s - theta_r) at gamma g (snap None: the base)."""
        from neon_cli.tune import evaluation_key

        n, seed = n or self.args.num_samples, self.args.seed if seed is None else seed
        s = dict(self.settings, guidance=float(g))
        key = evaluation_key(self.static, model=self.base_sha, selftrained=None if snap is None else snap["sha256"],
                             w=0.0 if snap is None else w, settings=s, guidance="guidance", seed=seed, num_samples=n)
        hit = self.cache.get(key, self.args.metric)
        if hit is None:
            ev = self.evaluator(n, seed)
            m = ev.score_model(self.model, {"guidance": g}) if snap is None else \
                ev.score_merge(self.model, self.base_sd, snap["sd"], w, {"guidance": g})
            hit = self.cache.put(key, m, m.pop("seconds"))
            self.fresh += 1
        return hit["metrics"]

    def f(self, snap):
        return lambda w, g: float(self.metrics(snap, w, g)[self.args.metric])

    def gamma_s(self) -> float:
        """The base's own best gamma, as ``neon demo`` finds it."""
        from neon_cli.tune import tune_guidance

        res = tune_guidance(lambda g: self.metrics(None, 0.0, g, n=2000)[self.args.metric], (1.0, 4.0), max_evals=9)
        return res.gamma

    def selftrained(self, name: str, num: int, frac: float, seed: int, gamma: float) -> dict:
        from neon_cli.finetune import finetune
        from neon_cli.fsutil import sha256_path
        from neon_cli.report import Report
        from neon_cli.synth import synthesize

        d = self.args.workdir / name
        budget = int(round(frac * int(self.family.read_metadata(str(self.base))["train_images"])))
        synthesize(self.family.name, None, num=num, out_dir=d / "S", seed=seed, set_pairs=[f"guidance={gamma!r}"],
                   report=Report("synth", argv=[]))
        res = finetune(self.family.name, None, d / "S", budget=budget, lr=None, out_dir=d / "ft", seed=seed,
                       report=Report("finetune", argv=[]))
        path = Path(res["final"])
        return {"name": name, "num": num, "budget": budget, "frac": frac, "seed": seed, "gamma_S": gamma, "path": path,
                "sha256": sha256_path(path), "sd": self.family.load(str(path)).state_dict()}


def fine_grid(bench: Bench, snap: dict, args, around: list[tuple[float, float]]) -> tuple[float, tuple[float, float], int]:
    """(best value, best point, points) of a fine grid (``--fine-step``) of half-widths
    ``--fine-half-width`` around the best of ``around`` (the coarse points measured so far: the
    paper protocol's sweep, the searches' points and, with ``--coarse-grid``, a coarse grid over
    the whole box), together with those points."""
    f = bench.f(snap)
    (w0, w1), (g0, g1) = args.bounds, args.gamma
    vals = {p: f(*p) for p in around}
    for rec in bench.cache.records():  # every point of this theta_s measured before on this seed plan
        k = rec["key"]
        if (k.get("selftrained") == snap["sha256"] and k["num_samples"] == args.num_samples and k["seed"] == args.seed
                and w0 <= k["w"] <= w1 and g0 <= k["gamma"] <= g1 and args.metric in rec["metrics"]):
            vals[(k["w"], k["gamma"])] = rec["metrics"][args.metric]
    if args.coarse_grid:
        vals.update({(w, g): f(w, g) for g in _grid(g0, g1, args.coarse_gamma_step)
                     for w in _grid(w0, w1, args.coarse_w_step)})
    bw, bg = min(vals, key=vals.get)
    hw, hg = args.fine_half_width
    for g in _grid(max(g0, round(bg / args.fine_step) * args.fine_step - hg), min(g1, bg + hg), args.fine_step):
        for w in _grid(max(w0, round(bw / args.fine_step) * args.fine_step - hw), min(w1, bw + hw), args.fine_step):
            vals[(w, g)] = f(w, g)
        print(f"    fine grid gamma = {g:.2f} done, best so far {min(vals.values()):.5g}", flush=True)
    p = min(vals, key=vals.get)
    return vals[p], p, len(vals)


def methods(bench: Bench, snap: dict, args) -> list[dict]:
    """Each method's chosen point and evaluations on this theta_s."""
    from neon_cli.tune import brent_search, joint_search, quadratic_search

    f, g_s = bench.f(snap), snap["gamma_S"]
    rows = []

    def add(name, part, w, g, evals):
        rows.append({"method": name, "part": part, "w": w, "gamma": g, "evals": evals, "value": f(w, g)})

    pw, asked = paper_sweep_w(lambda w: f(w, g_s), *args.bounds, args.sweep_stop)
    add("paper sweep over w (at gamma_S)", "w", pw, g_s, len(asked))
    b = brent_search(lambda w: f(w, g_s), tuple(args.bounds), xtol=0.05, max_evals=12)
    add("Brent over w (at gamma_S)", "w", b.w, g_s, b.n_evals)
    j = joint_search(f, tuple(args.bounds), tuple(args.gamma), gamma0=g_s)
    add("joint search (default)", "w,gamma", j.w, j.gamma, j.n_evals)
    rows[-1]["stopped"] = j.stopped
    q = quadratic_search(f, tuple(args.bounds), tuple(args.gamma))
    add("6-point design (--joint design)", "w,gamma", q.w, q.gamma, q.n_evals)
    (pw2, pg2), asked2 = paper_sweep_2d(f, tuple(args.bounds), tuple(args.gamma), args.sweep_stop)
    add("paper protocol over (w, gamma)", "w,gamma", pw2, pg2, len(asked2))
    rows[-1]["paper"] = True
    points = [(e.w, e.gamma) for e in j.evaluations + q.evaluations] + list(asked2)
    return rows, points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="digits")
    ap.add_argument("--workdir", type=Path, default=Path("bench-tune-work"))
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="NAME:|S|:BUDGET_FRACTION:SEED[@GAMMA_S]")
    ap.add_argument("--metric", default="fd_digits",
                    help="metric searched and reported (digits: fd_digits, the classifier-feature Fréchet distance)")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--confirm-samples", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--bounds", type=float, nargs=2, default=(0.0, 3.0))
    ap.add_argument("--gamma", type=float, nargs=2, default=(1.0, 4.0))
    ap.add_argument("--coarse-grid", action="store_true", help="also a coarse grid over the whole box")
    ap.add_argument("--coarse-w-step", type=float, default=0.1)
    ap.add_argument("--coarse-gamma-step", type=float, default=0.25)
    ap.add_argument("--fine-step", type=float, default=0.05)
    ap.add_argument("--fine-half-width", type=float, nargs=2, default=(0.2, 0.15), metavar=("W", "G"))
    ap.add_argument("--sweep-stop", type=float, default=0.03, help="paper sweep early stop, metric units")
    ap.add_argument("--target", type=float, default=2.0, help="%% gap to the fine grid's best")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    t0 = time.perf_counter()
    g_star = bench.gamma_s()
    print(f"base's own best gamma (2,000 samples, Brent over ln gamma): {g_star:.4f}", flush=True)
    summary = []
    for spec in args.configs:
        name, num, frac, seed = spec.split("@")[0].split(":")
        g_s = float(spec.split("@")[1]) if "@" in spec else g_star
        snap = bench.selftrained(name, int(num), float(frac), int(seed), g_s)
        print(f"\n{name}: |S| = {num}, budget {100 * float(frac):g}% ({snap['budget']} images), seed {seed}, "
              f"S at gamma {g_s:.4g}; {args.metric} on {args.num_samples} samples", flush=True)
        rows, points = methods(bench, snap, args)
        best, at, n_grid = fine_grid(bench, snap, args, points)
        conf = {}
        for r in rows:
            key = (round(r["w"], 9), round(r["gamma"], 9))
            if key not in conf:
                conf[key] = bench.metrics(snap, r["w"], r["gamma"], n=args.confirm_samples,
                                          seed=args.seed + args.num_samples)[args.metric]
            r["final"] = conf[key]
            r["gap"] = 100 * (r["value"] - best) / abs(best)
            r["images"] = r["evals"] * (PAPER_SAMPLES if r.get("paper") else args.num_samples)
        print(f"  fine grid ({n_grid} points): best {best:.5g} at w = {at[0]:g}, gamma = {at[1]:g}")
        print(f"  {'method':36} {'evals':>5} {'images':>9} {'w':>6} {'gamma':>6} {args.metric:>8} {'gap %':>7} "
              f"{'final':>8}")
        for r in rows:
            print(f"  {r['method']:36} {r['evals']:5d} {r['images']:9d} {r['w']:6.3f} {r['gamma']:6.3f} {r['value']:8.5g} "
                  f"{r['gap']:+7.2f} {r['final']:8.5g}" + (f"  ({r['stopped']})" if r.get("stopped") else ""), flush=True)
        summary.append((name, rows))
    _summary(summary, args)
    print(f"\n{bench.fresh} new evaluations, wall {time.perf_counter() - t0:.0f} s; cache {args.workdir / 'evals.jsonl'}")


def _summary(summary, args) -> None:
    print(f"\nsummary over {len(summary)} theta_s (gap to the fine grid's best; final = {args.metric} on "
          f"{args.confirm_samples} disjoint seeds)")
    names = [r["method"] for r in summary[0][1]]
    for m in names:
        rows = [next(r for r in rows if r["method"] == m) for _, rows in summary]
        ok = sum(r["gap"] <= args.target for r in rows)
        print(f"  {m:36} evals {min(r['evals'] for r in rows)}-{max(r['evals'] for r in rows):<3} "
              f"within {args.target:g} %: {ok}/{len(rows)}   worst gap {max(r['gap'] for r in rows):+.2f} %")
    for name, rows in summary:
        neon = next(r for r in rows if r["method"].startswith("joint"))
        paper = next(r for r in rows if r.get("paper"))
        w_only = next(r for r in rows if r["method"].startswith("Brent"))
        print(f"  {name}: neon {neon['images']} images vs the paper's protocol {paper['images']} "
              f"({paper['images'] / neon['images']:.0f}x fewer); final {args.metric} neon {neon['final']:.4g}, paper "
              f"{paper['final']:.4g} ({100 * (neon['final'] - paper['final']) / paper['final']:+.1f} %); "
              f"joint vs w alone on the search seeds {100 * (neon['value'] - w_only['value']) / w_only['value']:+.1f} %")


if __name__ == "__main__":
    sys.exit(main())
