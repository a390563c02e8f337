"""Throughput of ``neon synth`` (run by hand, not in CI).

Prints, in one run on the same machine:
  * bare:   the family's sampler in a plain loop over the same seeds and batches (no files),
  * synth:  ``neon_cli.synth.synthesize`` in this process (shards, hashes, manifest),
  * 1 rank / 2 ranks: the ``neon synth`` command, plain and under
    ``torchrun --standalone --nproc_per_node=2`` (process start-up included, and reported apart),
and the ratios: synth overhead over bare (target < 5%) and the 2-rank speed-up.

    python benchmarks/scale.py [--num 20000] [--family digits] [--set steps=12]

On a 2-core machine two ranks share the cores, so expect a speed-up near 1 unless each rank is
limited to one thread (OMP_NUM_THREADS=1, which this script sets for the rank processes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="digits")
    ap.add_argument("--num", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--set", dest="pairs", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions of bare and library runs (median)")
    args = ap.parse_args()

    import torch

    from neon_cli.evaluate import seed_plan
    from neon_cli.family import get_family, resolve_settings
    from neon_cli.report import Report
    from neon_cli.synth import synthesize

    fam = get_family(args.family)
    settings = resolve_settings(fam, args.pairs)
    model = fam.load(fam.default_model)
    seeds, labels = seed_plan(fam, 0, args.num)

    def bare_loop() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, args.num, args.shard_size):
                for i in range(s, min(s + args.shard_size, args.num), args.batch):
                    j = min(i + args.batch, s + args.shard_size, args.num)
                    fam.sample(model, seeds[i:j], labels[i:j] if labels is not None else None, settings)
        return time.perf_counter() - t0

    def library(tmp: Path, k: int) -> float:
        t0 = time.perf_counter()
        synthesize(args.family, None, num=args.num, out_dir=tmp / f"lib{k}", shard_size=args.shard_size,
                   batch=args.batch, set_pairs=args.pairs, report=Report("synth"))
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        fam.sample(model, seeds[:args.batch], labels[:args.batch] if labels is not None else None, settings)  # warm-up
        bares, libs = [], []
        for k in range(args.repeat):  # interleaved, so drift in machine load hits both alike
            bares.append(bare_loop())
            libs.append(library(Path(tmp), k))
        bare, lib = sorted(bares)[len(bares) // 2], sorted(libs)[len(libs) // 2]
        spread = (min(bares), max(bares), min(libs), max(libs))

        base_cmd = ["synth", args.family, "--num-images", str(args.num), "--shard-size", str(args.shard_size),
                    "--batch", str(args.batch), "-q", *sum((["--set", p] for p in args.pairs), [])]
        neon = str(Path(sys.executable).with_name("neon"))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, neon_cli.synth, neon_digits.model"], check=True)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([neon, *base_cmd, "-o", str(Path(tmp) / "one")], check=True, capture_output=True)
        one = time.perf_counter() - t0
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "neon_cli", "--", *base_cmd, "-o", str(Path(tmp) / "two")], check=True, capture_output=True, env=env)
        two = time.perf_counter() - t0

    n = args.num
    print(f"images: {n}, family {args.family}, settings {settings}")
    print(f"(medians of {args.repeat} interleaved runs; bare {spread[0]:.2f}-{spread[1]:.2f} s, synthesize {spread[2]:.2f}-{spread[3]:.2f} s)")
    print(f"bare sampler loop      {bare:8.2f} s  {n / bare:9.1f} img/s")
    print(f"synthesize (library)   {lib:8.2f} s  {n / lib:9.1f} img/s   overhead vs bare: {100 * (lib / bare - 1):+.1f}%")
    print(f"neon synth, 1 rank     {one:8.2f} s  {n / one:9.1f} img/s   (process start-up ~{startup:.1f} s)")
    print(f"torchrun, 2 ranks      {two:8.2f} s  {n / two:9.1f} img/s   speed-up vs 1 rank: {one / two:.2f}x")


if __name__ == "__main__":
    main()
