"""Hand-run benchmark: the paper's Figure 3 on the digits default (issue 16, item 4).

Figure 3 of the paper plots the FID (here ``--metric``, digits' ``fd_digits``) of the best Neon
model (optimised over w; for CFG models, Figure 5, over (w, gamma)) against the self-training
budget B for several synthetic-set sizes |S|; B = 0 is the base. Here, for each |S| of ``--sizes``:
S is synthesized at the base's own FID-best gamma (as ``neon demo``), theta_r is fine-tuned on it
with snapshots every ``--every`` of the base budget up to ``--max-fraction``, and at each budget of
``--fractions`` the snapshot is tuned with ``neon tune-w``'s default joint (w, gamma) search
(``--num-samples`` per evaluation, the search seeds) and its chosen point re-scored on
``--confirm-samples`` disjoint seeds; B = 0 is the base at its own best gamma on those seeds.

Prints a table (|S| x budget: final FID, chosen w and gamma, evaluations) and writes the figure
(``--out``, PNG, matplotlib). Every evaluation is cached in ``WORKDIR/evals.jsonl`` (tune-w's
format), shared with ``benchmarks/tune.py`` when both use one workdir.

    python benchmarks/figure3.py --workdir /work/bench --out docs/figures/figure3.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-figure3-work"))
    ap.add_argument("--out", type=Path, default=Path("figure3.png"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="|S|")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05, 0.1],
                    help="budgets B tuned, as fractions of the base's training budget")
    ap.add_argument("--every", type=float, default=0.01, help="snapshot spacing, fraction of the base budget")
    ap.add_argument("--max-fraction", type=float, default=0.1)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--confirm-samples", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--metric", default="fd_digits",
                    help="the plotted metric (digits: fd_digits, the classifier-feature Fréchet distance)")
    ap.add_argument("--gamma", type=float, nargs=2, default=(1.0, 4.0))
    ap.add_argument("--bounds", type=float, nargs=2, default=(0.0, 3.0))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    from tune import Bench  # benchmarks/tune.py: the same cache, keys and theta_s recipe

    from neon_cli.finetune import finetune
    from neon_cli.fsutil import sha256_path
    from neon_cli.report import Report
    from neon_cli.synth import synthesize
    from neon_cli.tune import joint_search

    bench = Bench(argparse.Namespace(family="digits", workdir=args.workdir, metric=args.metric, num_samples=args.num_samples,
                                     seed=args.seed, batch=args.batch))
    fam = bench.family
    t0 = time.perf_counter()
    g_s = bench.gamma_s()
    base_images = int(fam.read_metadata(str(bench.base))["train_images"])
    cseed = args.seed + args.num_samples
    conf = lambda snap, w, g: bench.metrics(snap, w, g, n=args.confirm_samples, seed=cseed)[args.metric]  # noqa: E731
    base_fid = conf(None, 0.0, g_s)
    print(f"base at its best gamma {g_s:.4g}: {args.metric} {base_fid:.4g} on {args.confirm_samples} seeds", flush=True)
    every = int(round(args.every * base_images))
    table = {}
    for n in args.sizes:
        d = args.workdir / f"fig3-S{n}"
        synthesize(fam.name, None, num=n, out_dir=d / "S", seed=0, set_pairs=[f"guidance={g_s!r}"], report=Report("synth", argv=[]))
        res = finetune(fam.name, None, d / "S", budget=every * int(round(args.max_fraction / args.every)), lr=None,
                       save_every=every, out_dir=d / "ft", seed=0, report=Report("finetune", argv=[]))
        snaps = {s["images_seen"]: Path(s["path"]) for s in res["snapshots"]}
        for frac in args.fractions:
            # snapshots land on the first batch boundary past each mark: take the nearest
            seen, path = min(snaps.items(), key=lambda kv: abs(kv[0] - every * int(round(frac / args.every))))
            snap = {"sha256": sha256_path(path), "sd": fam.load(str(path)).state_dict()}
            j = joint_search(bench.f(snap), tuple(args.bounds), tuple(args.gamma), gamma0=g_s)
            table[(n, frac)] = (conf(snap, j.w, j.gamma), j.w, j.gamma, j.n_evals, seen)
            print(f"  |S| = {n:6d}  B = {seen:7d} ({100 * frac:4.1f}%)  {args.metric} {table[(n, frac)][0]:.4g}  "
                  f"w = {j.w:.3f}  gamma = {j.gamma:.3f}  ({j.n_evals} evaluations)", flush=True)
    _print(table, args, base_fid, base_images)
    _plot(table, args, base_fid, base_images, g_s)
    print(f"\n{bench.fresh} new evaluations, wall {time.perf_counter() - t0:.0f} s; figure {args.out}")


def _print(table, args, base_fid, base_images) -> None:
    print(f"\n{args.metric} of the best Neon model (confirmation seeds) vs budget; B = 0: the base at its best gamma "
          f"{base_fid:.4g}")
    print(f"{'|S|':>7} " + " ".join(f"{100 * f:>7.1f}%" for f in args.fractions))
    for n in args.sizes:
        print(f"{n:7d} " + " ".join(f"{table[(n, f)][0]:8.4g}" for f in args.fractions))


def _plot(table, args, base_fid, base_images, g_s) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neon_cli.fsutil import atomic_path

    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    mi = 2**20
    for n in args.sizes:
        xs = [0.0] + [table[(n, f)][4] / mi for f in args.fractions]
        ys = [base_fid] + [table[(n, f)][0] for f in args.fractions]
        ax.plot(xs, ys, "o-", ms=4, label=f"|S| = {n}")
    ax.axhline(base_fid, color="k", lw=0.8, ls="--", label=f"base at its best gamma {g_s:.2f}")
    ax.set_xlabel("self-training budget B (Mi images seen)")
    ax.set_ylabel(f"{args.metric} of the best Neon model")
    ax.set_title("digits: Neon vs fine-tuning budget (paper Fig. 3)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
