"""``neon finetune``'s memory and speed with S streamed from its shards, against the version that
held S in memory (measured in the same run).

    python benchmarks/finetune_memory.py [--sizes 10000,50000,200000] [--rounds 8] [--steps 12]

For each |S| it writes a synthetic set of digits-sized images (uint8 [1, 8, 8], labels, in
``neon synth``'s layout: shards of 1,000 with a manifest) and fine-tunes the ``digits`` family's
embedded base on it with the default recipe (batch 256, no EMA). The baseline is this repository
at the commit before streaming (default: the parent of the commit that added
neon_cli/dataset.py), extracted with ``git archive`` into a temporary folder.

* **Peak memory**: ``neon_cli.finetune.finetune`` in a fresh process per (version, |S|), its
  ``ru_maxrss`` (the smaller of two runs).
* **Speed**: in one process, the baseline's ``train_loop`` (its ``neon_cli/train.py`` loaded as a
  module of its own: S concatenated in memory, a ``randperm(n)`` drawn for every batch) and this
  tree's (S read from the shards, the epoch's permutation kept) run alternately, ``--rounds``
  times ``--steps`` steps each from fresh copies of the base: the machine's load, which on a
  shared machine moves by more than the 5 % to be measured, then falls on both alike. Reported:
  images per wall-clock second over all rounds, the median of the rounds' ratios, and each data
  path alone (indices + rows of one batch, CPU time).

Targets (issue 15): peak memory flat from 10k to 200k images with streaming; images/s within 5 %
of the baseline at the default batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEM_CHILD = r"""
import json, resource, sys
tree, data, budget, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import torch
torch.set_num_threads(1)
import neon_cli
assert neon_cli.__file__.startswith(tree), (neon_cli.__file__, tree)
from neon_cli.finetune import finetune
from neon_cli.report import Report
finetune("digits", None, data, budget=budget, lr=2e-4, out_dir=out, report=Report("finetune"))
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

AB_CHILD = r"""
import copy, importlib.util, json, statistics, sys, time
tree, data, old_train_py, rounds, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
import torch
torch.set_num_threads(1)
import neon_cli
assert neon_cli.__file__.startswith(tree), (neon_cli.__file__, tree)
spec = importlib.util.spec_from_file_location("neon_baseline_train", old_train_py)
old = importlib.util.module_from_spec(spec)
sys.modules["neon_baseline_train"] = old  # its dataclasses look their module up
spec.loader.exec_module(old)
from neon_cli import train as new
from neon_cli.dataset import open_synthetic
from neon_cli.family import get_family
from neon_cli.synth import load_synthetic
fam = get_family("digits")
base = fam.load(fam.default_model)
images, labels, _ = load_synthetic(data)   # the baseline's input: S in memory
stream = open_synthetic(data)               # this tree's: S on disk
batch = fam.train_defaults["batch"]
def run(which, r):
    model = copy.deepcopy(base)
    kw = dict(budget=steps * batch, lr=2e-4, batch=batch, seed=r)
    t, c = time.perf_counter(), time.process_time()
    if which == "old":
        old.train_loop(fam, model, images, labels, old.TrainConfig(**kw))
    else:
        new.train_loop(fam, model, stream, None, new.TrainConfig(**kw))
    return time.perf_counter() - t, time.process_time() - c
run("old", 99); run("new", 99)  # warm-up (first optimiser, allocator)
res = {"old": [], "new": []}
for r in range(rounds):
    for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
        res[which].append(run(which, r))
n = len(images)
def data_old(k):
    idx = old.batch_indices(n, 0, k * batch, batch)
    return images[idx], labels[idx]
order = new.DataOrder(n, 0)
def data_new(k):
    return stream.batch(order.indices(k * batch, batch))
access = {"old": [], "new": []}
for r in range(5):
    for name, fn in (("old", data_old), ("new", data_new)):
        c = time.process_time()
        for k in range(100):
            fn(k)
        access[name].append((time.process_time() - c) / 100 * 1e3)
imgs = rounds * steps * batch
print(json.dumps({
    "old_ips": imgs / sum(w for w, _ in res["old"]), "new_ips": imgs / sum(w for w, _ in res["new"]),
    "old_cpu_ips": imgs / sum(c for _, c in res["old"]), "new_cpu_ips": imgs / sum(c for _, c in res["new"]),
    "median_ratio": statistics.median(o[0] / nw[0] for o, nw in zip(res["old"], res["new"])),
    "old_access_ms": min(access["old"]), "new_access_ms": min(access["new"])}))
"""


def baseline_rev() -> str:
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "neon_cli/dataset.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    if not added:
        raise SystemExit("cannot find the commit that added neon_cli/dataset.py; give --baseline REV")
    return added[-1] + "^"


def write_set(folder: Path, n: int, shard: int = 1000) -> None:
    import torch
    from safetensors.torch import save_file

    from neon_cli.fsutil import sha256_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(n)
    shards = []
    for k, a in enumerate(range(0, n, shard)):
        b = min(n, a + shard)
        f = folder / f"shard-{k:05d}.safetensors"
        save_file({"images": torch.randint(0, 256, (b - a, 1, 8, 8), generator=g, dtype=torch.uint8),
                   "labels": torch.arange(a, b) % 10, "seeds": torch.arange(a, b)}, str(f))
        shards.append({"file": f.name, "start": a, "count": b - a, "sha256": sha256_file(f)})
    manifest = {"schema": "neon.synth/1", "family": "digits", "num": n, "shard_size": shard, "num_classes": 10,
                "shards": shards, "image_shape": [1, 8, 8], "image_dtype": "uint8"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def run(code: str, tree: Path, data: Path, *args: object) -> dict:
    """``code`` in a fresh process whose ``neon_cli`` is ``tree``'s; its last stdout line as JSON."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tree), str(tree / "plugins")]))
    proc = subprocess.run([sys.executable, "-c", code, str(tree), str(data), *map(str, args)], env=env,
                          capture_output=True, text=True, cwd=data.parent)  # not the checkout: '' is first on sys.path
    if proc.returncode:
        raise SystemExit(f"child failed ({tree}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,50000,200000")
    ap.add_argument("--rounds", type=int, default=8, help="alternations of the two train loops per size")
    ap.add_argument("--steps", type=int, default=12, help="optimiser steps per train loop")
    ap.add_argument("--budget", type=int, default=40 * 256, help="images seen by each peak-memory run")
    ap.add_argument("--baseline", default=None, help="git revision of the in-memory version (default: see above)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rev = args.baseline or baseline_rev()
    with tempfile.TemporaryDirectory(prefix="ft-mem-") as d:
        tmp = Path(d)
        old = tmp / "baseline"
        old.mkdir()
        archive = subprocess.run(["git", "archive", rev, "neon_cli", "plugins"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        print(f"baseline {rev} ({commit}): S concatenated in memory, a randperm(n) per batch; new: this tree, S streamed")
        rows = []
        for n in sizes:
            data = tmp / f"S{n}"
            write_set(data, n)
            row = {"n": n}
            for name, tree in (("old", old), ("new", ROOT)):
                row[f"{name}_rss"] = min(run(MEM_CHILD, tree, data, args.budget, tmp / f"out-{name}-{n}-{r}")["maxrss_mb"]
                                         for r in range(2))
            row.update(run(AB_CHILD, ROOT, data, old / "neon_cli" / "train.py", args.rounds, args.steps))
            rows.append(row)
            print(f"|S| = {n:>7,}: peak RSS old {row['old_rss']:6.1f} MB, new {row['new_rss']:6.1f} MB | train loop "
                  f"old {row['old_ips']:5.0f} img/s, new {row['new_ips']:5.0f} img/s: new/old {row['new_ips'] / row['old_ips']:.3f} "
                  f"(median of {args.rounds} rounds {row['median_ratio']:.3f}; per CPU s {row['new_cpu_ips'] / row['old_cpu_ips']:.3f}) | "
                  f"one batch's data access: old {row['old_access_ms']:.2f} ms, new {row['new_access_ms']:.2f} ms CPU", flush=True)
        first, last = rows[0], rows[-1]
        print(f"peak RSS growth {first['n']:,} -> {last['n']:,} images: old {last['old_rss'] - first['old_rss']:+.1f} MB, "
              f"new {last['new_rss'] - first['new_rss']:+.1f} MB (the images alone: {(last['n'] - first['n']) * 64 / 2**20:.1f} MB)")
        print("train-loop images/s new/old: " + ", ".join(f"{r['new_ips'] / r['old_ips']:.3f} at {r['n']:,}" for r in rows)
              + " (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
