"""Hand-run benchmark: neon_cli.metrics.prdc vs the `prdc` package (time, peak memory, agreement).

Prints ratios against the `prdc` 0.2 baseline measured in the same run. The baseline holds three
N x N float distance matrices at once; neon's blocked version holds one block (about 128 MiB)
plus O(N) vectors, so its peak memory stays flat as N grows.

    python benchmarks/bench_prdc.py --n 5000 --dim 2048          # a few minutes on 2 cores
    python benchmarks/bench_prdc.py --n 10000 --dim 2048 --skip-baseline
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
import tracemalloc

import numpy as np


def _measure(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="real and fake samples each")
    ap.add_argument("--dim", type=int, default=2048, help="feature dimension (Inception pool: 2048)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--skip-baseline", action="store_true", help="only run neon (baseline needs ~3 N^2 floats)")
    args = ap.parse_args()

    from neon_cli.metrics import prdc

    rng = np.random.default_rng(0)
    real = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    fake = (rng.standard_normal((args.n, args.dim)) * 1.1 + 0.05).astype(np.float32)

    ours, t_ours, m_ours = _measure(lambda: prdc(real, fake, k=args.k))
    print(f"neon prdc     N={args.n} D={args.dim}: {t_ours:7.2f} s  peak {m_ours:8.1f} MiB  {ours}")
    if args.skip_baseline:
        return
    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):
        ref, t_ref, m_ref = _measure(lambda: compute_prdc(real, fake, nearest_k=args.k))
    ref = {k: float(v) for k, v in ref.items()}
    print(f"prdc package  N={args.n} D={args.dim}: {t_ref:7.2f} s  peak {m_ref:8.1f} MiB  {ref}")
    print(f"ratio neon/prdc: time {t_ours / t_ref:.2f}x, peak memory {m_ours / m_ref:.2f}x")
    print("max |difference|:", max(abs(ours[k] - ref[k]) for k in ours))


if __name__ == "__main__":
    main()
