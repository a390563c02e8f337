"""Hand-run benchmark: regret of tune-w's choices against a truth, over many search seed blocks (issue 23, item 3).

For each theta_s of ``--configs`` (made here: synth at gamma_S, finetune; resumable) and each of
``--blocks`` disjoint search seed blocks, every method of ``--methods`` chooses a point on that
block's seeds alone; each chosen point is then scored on ``--truth-samples`` fresh seeds shared by
all (the "truth": common random numbers, never used by any search). The truth's optimum is the best
truth value of every chosen point, of every point the cache holds on the truth seeds (any earlier
run's), and of the same search run on the truth seeds (or, with ``--no-truth-search``, of the
minimum of a quadratic through the 10 best truth points).

    regret = (truth(chosen) - truth(best)) / truth(best)            (per cent)

Methods (``NAME@N``: N samples per evaluation):

* ``paper``: the paper's protocol: the w sweep (0.25 steps, early stop) at every gamma of a 0.25
  grid, then +-0.1 in 0.05 steps, at 10,000 samples per point (w only for families without guidance);
* ``brent@N``: Brent over w at gamma_S (``neon tune-w`` without ``--gamma``, no stage 2);
* ``joint@N``: the (w, gamma) search (``neon tune-w --gamma``; no stage 2, no base gamma search);
* ``default``: ``neon tune-w``'s defaults (the base's own gamma search, the joint search at
  ``--num-samples`` 2,000, stage 2's refit over w, and over (w, ln gamma) with a gamma box, on
  blocks of 2,000 fresh seeds until the expected regret is 0.5 % or ``--max-images`` 60,000 (w) or
  120,000 (w, gamma)) through :func:`neon_cli.tune.run_tune_w` itself;
* ``staged@N1:B:MAX[:W[:V[:T]]]``: the same with stage 1 at N1, stage-2 blocks of B up to MAX images,
  refit widths W in w and V in ln gamma (``--refit-gamma``; 0 or absent: w only), ``--target-regret`` T;
* ``rescore@N``: the first stage 2 (``--refit-width 0 --keep 3``, blocks of N up to 10 N).

Every evaluation goes to ``WORKDIR/evals.jsonl`` (tune-w's cache format), the theta_s to
``WORKDIR/NAME/``, so a rerun resumes where the last one stopped. Printed: per theta_s and method,
regret and images per block; then per method the mean / median / 90th percentile of the regret
over every (theta_s, block), and the mean images sampled (the default's also as a fraction of the
paper protocol's). Run it under ``nohup`` with one thread per process; it is hours of CPU on digits.

    python benchmarks/tune_regret.py --family gaussian-ddpm --workdir W --configs G1:1000:0.02:0 G2:500:0.05:1 --blocks 5
    python benchmarks/tune_regret.py --workdir W --quick      # 2 digits theta_s x 2 blocks, a 10k truth
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from neon_cli.tune.refit import REFIT_GAMMA_DEFAULT, REFIT_WIDTH_DEFAULT, TARGET_REGRET_DEFAULT  # noqa: E402
from neon_cli.tune.run import default_max_images  # noqa: E402

DIGITS_CONFIGS = ["T1:4000:0.03:0", "T2:4000:0.10:0", "H1:1000:0.03:1", "H2:16000:0.05:2", "H3:2000:0.01:3",
                  "R1:500:0.02:4", "R2:8000:0.03:5", "R3:2000:0.05:6@2.5", "R4:1000:0.10:7@1.5"]
GAUSS_CONFIGS = ["G1:1000:0.02:0", "G2:500:0.05:1", "G3:2000:0.01:2", "G4:250:0.03:3", "G5:1000:0.10:4"]
DEFAULT_METHODS = ["paper", "brent@1000", "brent@2000", "brent@5000", "joint@1000", "joint@2000", "joint@5000", "default"]
DEFAULT_SAMPLES = 2000  # neon tune-w --num-samples (stage 2: blocks of as many, up to 10x: the CLI's defaults)
SEARCH_SEED0 = 30_000_000  # blocks of 1,000,000 seeds each: search, then stage 2 inside the block
TRUTH_SEED = 90_000_000


def _quiet(*_a, **_k):
    return None


def metric_only(family, metric: str) -> bool:
    """Make the digits family score ``metric`` alone (fd_digits or pixel_fid, with its jackknife
    replicates), skipping precision/recall/density/coverage, whose k-NN passes are most of an
    evaluation's time at 20,000 samples. Benchmark-only (the regret is of one metric); other
    families are left alone. Returns whether the family was patched."""
    if family.name != "digits" or metric not in ("fd_digits", "pixel_fid"):
        return False
    import torch

    from neon_cli.metrics import frechet_replicates
    from neon_digits import WEIGHTS
    from neon_digits.io import DigitsScorer

    scorer = DigitsScorer(WEIGHTS / "classifier.safetensors")

    def _feats(images):
        if metric == "pixel_fid":
            return images.reshape(-1, 64).double().numpy() / 255.0, scorer.real_pix_stats
        with torch.no_grad():
            return scorer.net(images)[0].double().numpy(), scorer.real_stats

    def score_jackknife(images, labels, groups):
        f, ref = _feats(images)
        full, reps = frechet_replicates(f, *ref, groups)
        return {metric: full}, {metric: reps}

    family.score_jackknife = score_jackknife
    family.score = lambda images, labels: score_jackknife(images, labels, [])[0]
    return True


class Regret:
    def __init__(self, args):
        from neon_cli.family import get_family
        from tune import Bench  # benchmarks/tune.py: cache-backed evaluations of (theta_s, w, gamma)

        self.args = args
        self.family = get_family(args.family)
        self.metric_only = args.metric_only and metric_only(self.family, args.metric)
        self.guidance = getattr(self.family, "guidance", None)
        bargs = argparse.Namespace(family=args.family, workdir=args.workdir, batch=args.batch, metric=args.metric,
                                   num_samples=args.truth_samples, seed=TRUTH_SEED, cache=args.cache)
        self.bench = Bench(bargs)
        self.cache = args.cache

    def truth(self, snap, w: float, g: float | None) -> float:
        g = self._g(g)
        if self.guidance is None:
            return self._truth_nog(snap, w)
        return float(self.bench.metrics(snap, w, g, n=self.args.truth_samples, seed=TRUTH_SEED)[self.args.metric])

    def cached_truths(self, snap) -> dict:
        """{(w, gamma): truth value} of every evaluation of ``snap`` on the truth seeds in the cache."""
        out = {}
        for rec in self.bench.cache.records():
            k = rec["key"]
            if (k.get("selftrained") == snap["sha256"] and k.get("seed") == TRUTH_SEED
                    and k.get("num_samples") == self.args.truth_samples and self.args.metric in rec["metrics"]):
                g = k.get("gamma")
                out[(round(float(k["w"]), 9), None if g is None else round(float(g), 9))] = float(rec["metrics"][self.args.metric])
        return out

    def _g(self, g):
        return None if self.guidance is None else float(g)

    def _truth_nog(self, snap, w):
        from neon_cli.tune import evaluation_key

        b = self.bench
        key = evaluation_key(b.static, model=b.base_sha, selftrained=snap["sha256"], w=w, settings=dict(b.settings),
                             guidance=None, seed=TRUTH_SEED, num_samples=self.args.truth_samples)
        hit = b.cache.get(key, self.args.metric)
        if hit is None:
            ev = b.evaluator(self.args.truth_samples, TRUTH_SEED)
            m = ev.score_merge(b.model, b.base_sd, snap["sd"], w)
            hit = b.cache.put(key, m, m.pop("seconds"))
        return float(hit["metrics"][self.args.metric])

    def run_tune(self, snap, seed: int, **kw) -> tuple[float, float | None, int]:
        """(w, gamma, images) chosen by run_tune_w on seeds from ``seed``."""
        from neon_cli.errors import NoImprovement
        from neon_cli.report import Report
        from neon_cli.tune import run_tune_w

        rep = Report("tune-w", argv=[])
        try:
            res = run_tune_w(self.args.family, None, [snap["path"]], seed=seed, cache=self.cache, batch=self.args.batch,
                             metric=self.args.metric, report=rep, progress=_quiet, require_improvement=False, **kw)
        except NoImprovement:
            res = rep.results
        ch = res["chosen"]
        return float(ch["w"]), ch.get("gamma"), int(res["images"]["total"])

    def method(self, name: str, snap, block: int) -> tuple[float, float | None, int]:
        seed = SEARCH_SEED0 + 1_000_000 * block
        g_s = snap["gamma_S"]
        box = tuple(self.args.gamma) if self.guidance else None
        pin = [f"{self.guidance}={g_s!r}"] if self.guidance else []
        if name == "default":  # what `neon tune-w --gamma LO HI` does with no other flag
            n = DEFAULT_SAMPLES
            return self.run_tune(snap, seed, gamma=box, num_samples=n, confirm_samples=n, keep=1,
                                 max_images=default_max_images(n, surface=box is not None), refit_width=REFIT_WIDTH_DEFAULT,
                                 refit_gamma=REFIT_GAMMA_DEFAULT if box else 0.0)
        if name.startswith("staged@"):  # staged@N1:B:MAX[:W[:V[:T]]]: stage 1 at N1, stage 2 blocks of B up to MAX
            n1, b, mx, *wd = name.split("@")[1].split(":")  # images, refit widths W (w) and V (ln gamma; 0: w only),
            return self.run_tune(snap, seed, gamma=box, num_samples=int(n1), confirm_samples=int(b), keep=1,  # target T
                                 max_images=int(mx), refit_width=float(wd[0]) if wd else REFIT_WIDTH_DEFAULT,
                                 refit_gamma=float(wd[1]) if len(wd) > 1 and box else 0.0,
                                 target_regret=float(wd[2]) if len(wd) > 2 else TARGET_REGRET_DEFAULT)
        if name == "paper":
            from tune import PAPER_SAMPLES, paper_sweep_2d, paper_sweep_w

            if self.guidance is None:
                f = lambda w: self._search_nog(snap, w, seed)  # noqa: E731
                w, asked = paper_sweep_w(f, *self.args.bounds, self.args.sweep_stop)
                return w, None, len(asked) * PAPER_SAMPLES
            f2 = lambda w, g: float(self.bench.metrics(snap, w, g, n=PAPER_SAMPLES, seed=seed)[self.args.metric])  # noqa: E731
            (w, g), asked = paper_sweep_2d(f2, tuple(self.args.bounds), box, self.args.sweep_stop)
            return w, g, len(asked) * PAPER_SAMPLES
        kind, n = name.split("@")
        if kind == "brent":
            return self.run_tune(snap, seed, num_samples=int(n), confirm_samples=0, tune_base=False, set_pairs=pin)
        if kind == "rescore":  # the previous stage 2: --keep 3 re-scored, no refit, blocks of N up to 10 N
            return self.run_tune(snap, seed, gamma=box, num_samples=int(n), confirm_samples=int(n), keep=3,
                                 max_images=10 * int(n), refit_width=0.0)
        if kind == "joint":
            if box is None:
                raise SystemExit(f"{name}: family {self.args.family} has no guidance to search")
            return self.run_tune(snap, seed, gamma=box, line_gamma=g_s, num_samples=int(n), confirm_samples=0,
                                 tune_base=False)
        raise SystemExit(f"unknown method {name}")

    def _search_nog(self, snap, w, seed):
        from neon_cli.tune import evaluation_key
        from tune import PAPER_SAMPLES

        b = self.bench
        key = evaluation_key(b.static, model=b.base_sha, selftrained=snap["sha256"], w=w, settings=dict(b.settings),
                             guidance=None, seed=seed, num_samples=PAPER_SAMPLES)
        hit = b.cache.get(key, self.args.metric)
        if hit is None:
            ev = b.evaluator(PAPER_SAMPLES, seed)
            m = ev.score_merge(b.model, b.base_sd, snap["sd"], w)
            hit = b.cache.put(key, m, m.pop("seconds"))
        return float(hit["metrics"][self.args.metric])

    def truth_search(self, snap) -> list[tuple[float, float | None]]:
        """The search run on the truth seeds (its points' truth values are exact truth)."""
        from neon_cli.tune import brent_search, joint_search

        if self.guidance is None:
            r = brent_search(lambda w: self.truth(snap, w, None), tuple(self.args.bounds), xtol=0.02, max_evals=14)
            return [(e.w, None) for e in r.evaluations]
        r = joint_search(lambda w, g: self.truth(snap, w, g), tuple(self.args.bounds), tuple(self.args.gamma),
                         gamma0=snap["gamma_S"])
        return [(e.w, e.gamma) for e in r.evaluations]


def truth_vertex(truths: dict, w_box: tuple, g_box: tuple | None) -> tuple | None:
    """The minimum of a quadratic in w (or in (w, ln gamma)) fitted by least squares to the 10 lowest
    truth points, clipped to the box; None when the fit is not convex or has too few points."""
    import numpy as np

    pts = sorted(truths.items(), key=lambda kv: kv[1])[:10]
    if g_box is None:
        x = np.array([p[0] for p, _ in pts])
        if len(set(x.tolist())) < 3:
            return None
        c2, c1, _ = np.polyfit(x, [v for _, v in pts], 2)
        return None if c2 <= 0 else (round(float(np.clip(-c1 / (2 * c2), *w_box)), 9), None)
    w = np.array([p[0] for p, _ in pts])
    s = np.log([p[1] for p, _ in pts])
    if len(pts) < 7:
        return None
    X = np.stack([np.ones_like(w), w, s, w * w, s * s, w * s], 1)
    a, b1, b2, c11, c22, c12 = np.linalg.lstsq(X, np.array([v for _, v in pts]), rcond=None)[0]
    H = np.array([[2 * c11, c12], [c12, 2 * c22]])
    if not np.all(np.linalg.eigvalsh(H) > 0):
        return None
    vw, vs = np.linalg.solve(H, -np.array([b1, b2]))
    return (round(float(np.clip(vw, *w_box)), 9), round(float(np.clip(np.exp(vs), *g_box)), 9))


def _pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="digits")
    ap.add_argument("--workdir", type=Path, default=Path("bench-regret-work"))
    ap.add_argument("--cache", type=Path, default=None,
                    help="evaluation cache (default WORKDIR/evals.jsonl; one per process: tune-w locks it)")
    ap.add_argument("--configs", nargs="*", default=None, help="NAME:|S|:BUDGET_FRACTION:SEED[@GAMMA_S]")
    ap.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    ap.add_argument("--blocks", type=int, default=5, help="disjoint search seed blocks per theta_s")
    ap.add_argument("--truth-samples", type=int, default=20_000)
    ap.add_argument("--no-truth-search", action="store_true",
                    help="truth optimum = the best of the chosen points, of every point the cache holds on the truth "
                         "seeds, and of the minimum of a quadratic through the 10 best of them (one truth evaluation "
                         "instead of a search on the truth seeds)")
    ap.add_argument("--metric", default=None, help="default: the family's first metric")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--bounds", type=float, nargs=2, default=(0.0, 3.0))
    ap.add_argument("--gamma", type=float, nargs=2, default=(1.0, 4.0))
    ap.add_argument("--sweep-stop", type=float, default=0.03)
    ap.add_argument("--all-metrics", dest="metric_only", action="store_false",
                    help="digits: score every metric (default: the regret's metric alone, ~2x faster)")
    ap.add_argument("--paper-blocks", type=int, default=None,
                    help="run the paper protocol on the first K blocks only (it samples ~10^6 images per block on digits)")
    ap.add_argument("--quick", action="store_true", help="2 theta_s x 2 blocks, truth 10k, methods brent@1000 joint@1000 default")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from neon_cli.family import get_family

    fam = get_family(args.family)
    args.metric = args.metric or list(fam.metrics)[0]
    if args.configs is None:
        args.configs = DIGITS_CONFIGS if args.family == "digits" else GAUSS_CONFIGS
    if args.quick:
        args.configs, args.blocks, args.truth_samples = args.configs[:2], 2, 10_000
        args.methods = ["brent@1000", "joint@1000", "default"] if fam.guidance else ["brent@1000", "default"]
    if not fam.guidance:
        args.methods = [m for m in args.methods if not m.startswith("joint")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.cache = args.cache or args.workdir / "evals.jsonl"
    r = Regret(args)
    t0 = time.perf_counter()
    g_star = r.bench.gamma_s() if fam.guidance else None
    out: dict[str, list[tuple[float, int, str]]] = {m: [] for m in args.methods}
    for spec in args.configs:
        name, num, frac, seed = spec.split("@")[0].split(":")
        g_s = float(spec.split("@")[1]) if "@" in spec else g_star
        snap = r.bench.selftrained(name, int(num), float(frac), int(seed), g_s) if fam.guidance else \
            _selftrained_nog(r, name, int(num), float(frac), int(seed))
        chosen = {(m, b): r.method(m, snap, b) for b in range(args.blocks) for m in args.methods
                  if not (m == "paper" and args.paper_blocks is not None and b >= args.paper_blocks)}
        pts = {(round(w, 9), None if g is None else round(g, 9)) for w, g, _ in chosen.values()}
        if not args.no_truth_search:
            pts |= {(round(w, 9), None if g is None else round(g, 9)) for w, g in r.truth_search(snap)}
        truths = {p: r.truth(snap, *p) for p in pts}
        # every point any run scored on the truth seeds (the cache's) competes for the optimum
        truths.update({p: v for p, v in r.cached_truths(snap).items() if p not in truths})
        if args.no_truth_search:  # a cheaper stand-in: the truth at the minimum of a quadratic through the truth points
            v = truth_vertex(truths, tuple(args.bounds), tuple(args.gamma) if fam.guidance else None)
            if v is not None:
                truths[v] = r.truth(snap, *v)
        best = min(truths.values())
        print(f"\n{name}: |S| = {num}, budget {100 * float(frac):g}%, seed {seed}"
              + (f", gamma_S {g_s:.4g}" if g_s else "") + f"; truth on {args.truth_samples} seeds: best {best:.5g}", flush=True)
        for m in args.methods:
            regs = []
            done = [b for b in range(args.blocks) if (m, b) in chosen]
            for b in done:
                w, g, imgs = chosen[(m, b)]
                reg = 100 * (truths[(round(w, 9), None if g is None else round(g, 9))] - best) / abs(best)
                regs.append(reg)
                out[m].append((reg, imgs, name))
            print(f"  {m:12} regret % per block: {' '.join(f'{x:6.2f}' for x in regs)}   images/block "
                  f"{statistics.mean(chosen[(m, b)][2] for b in done):.0f}", flush=True)
    print(f"\nsummary over {len(args.configs)} theta_s x {args.blocks} blocks ({args.family}, {args.metric}, "
          f"truth {args.truth_samples} seeds)")
    paper_imgs = statistics.mean(i for _, i, _ in out["paper"]) if out.get("paper") else None
    for m, rows in out.items():
        if not rows:
            continue
        regs = [x for x, _, _ in rows]
        imgs = statistics.mean(i for _, i, _ in rows)
        frac = f"  ({imgs / paper_imgs:.2f} of paper's)" if paper_imgs else ""
        names = sorted({n for _, _, n in rows})
        meets = sum(statistics.mean(x for x, _, n in rows if n == t) <= 1.0 and _pct([x for x, _, n in rows if n == t], 0.9) <= 2.0
                    for t in names)
        print(f"  {m:12} regret mean {statistics.mean(regs):6.2f}%  median {statistics.median(regs):6.2f}%  "
              f"p90 {_pct(regs, 0.9):6.2f}%  max {max(regs):6.2f}%   target met on {meets}/{len(names)} theta_s   "
              f"images {imgs:9.0f}{frac}")
    print(f"wall {time.perf_counter() - t0:.0f} s; cache {r.cache}")


def _selftrained_nog(r: Regret, name: str, num: int, frac: float, seed: int) -> dict:
    """theta_s of a family without guidance: synth at its default settings, then finetune."""
    from neon_cli.finetune import finetune
    from neon_cli.fsutil import sha256_path
    from neon_cli.report import Report
    from neon_cli.synth import synthesize

    fam = r.family
    d = r.args.workdir / name
    budget = int(round(frac * int(fam.read_metadata(str(r.bench.base))["train_images"])))
    if not (d / "S" / "manifest.json").exists():
        synthesize(fam.name, None, num=num, out_dir=d / "S", seed=seed, set_pairs=[], report=Report("synth", argv=[]))
    res = finetune(fam.name, None, d / "S", budget=budget, lr=None, out_dir=d / "ft", seed=seed,
                   report=Report("finetune", argv=[]))
    path = Path(res["final"])
    return {"name": name, "num": num, "budget": budget, "frac": frac, "seed": seed, "gamma_S": None, "path": path,
            "sha256": sha256_path(path), "sd": fam.load(str(path)).state_dict()}


if __name__ == "__main__":
    sys.exit(main())
