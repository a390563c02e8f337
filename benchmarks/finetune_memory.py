"""``neon finetune``'s memory and speed with S streamed from its shards, against the version that
held S in memory (measured in the same run).

    python benchmarks/finetune_memory.py [--sizes 10000,50000,200000] [--budget 15360] [--repeats 3]

For each |S| it writes a synthetic set of digits-sized images (uint8 [1, 8, 8], labels, in
``neon synth``'s layout: shards of 1,000 with a manifest) and fine-tunes the ``digits`` family's
embedded base on it (the default recipe: batch 256, no EMA) in a fresh process, once with this
tree's code and once with the baseline's, which ``git archive`` extracts into a temporary folder
(default: the parent of the commit that added neon_cli/dataset.py, i.e. the code before
streaming). Each process reports its peak resident memory (``ru_maxrss``) and the train loop's
images/s (from its first to its last progress call, so model loading is excluded, the per-batch
data access included), per wall-clock second and per CPU second of the process (the CPU figure
is the steadier one on a shared machine: it leaves out the time other jobs held the cores). Runs
alternate old/new; the best of ``--repeats`` is kept (the least disturbed run).

A second measurement isolates what changed: each version's data access alone (the batch's
indices and rows, 200 consecutive batches of 256, CPU time), from which, with the baseline's CPU
time per step, the images/s ratio follows without the step's own noise.

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

CHILD = r"""
import json, resource, sys, time
tree, data, budget, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import torch
torch.set_num_threads(1)
import neon_cli
assert neon_cli.__file__.startswith(tree), (neon_cli.__file__, tree)
from neon_cli.finetune import finetune
from neon_cli.report import Report
marks = []
def progress(task, done, total=None, **info):
    if task == "finetune" and "loss" in info:
        marks.append((time.perf_counter(), time.process_time(), done))
t0 = time.perf_counter()
finetune("digits", None, data, budget=budget, lr=2e-4, out_dir=out, report=Report("finetune"), progress=progress)
total = time.perf_counter() - t0
(ta, ca, na), (tb, cb, nb) = marks[0], marks[-1]
print(json.dumps({"seconds": total, "loop_images_per_s": (nb - na) / (tb - ta), "loop_images_per_cpu_s": (nb - na) / (cb - ca),
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


DATA_CHILD = r"""
import json, sys, time
tree, data, batch, steps, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import torch
torch.set_num_threads(1)
import neon_cli
assert neon_cli.__file__.startswith(tree), (neon_cli.__file__, tree)
if mode == "old":  # the baseline's finetune: S in memory, batch_indices draws randperm(n) per batch
    from neon_cli.synth import load_synthetic
    from neon_cli.train import batch_indices
    images, labels, _ = load_synthetic(data)
    n = len(images)
    def get(start):
        idx = batch_indices(n, 0, start, batch)
        return images[idx], labels[idx]
else:  # this tree's: rows read from the shards, the epoch's permutation kept
    from neon_cli.dataset import open_synthetic
    from neon_cli.train import DataOrder
    d = open_synthetic(data)
    order = DataOrder(len(d), 0)
    def get(start):
        return d.batch(order.indices(start, batch))
get(0)
c0, t0 = time.process_time(), time.perf_counter()
for k in range(1, steps + 1):
    x, y = get(k * batch)
print(json.dumps({"cpu_ms": (time.process_time() - c0) / steps * 1e3, "wall_ms": (time.perf_counter() - t0) / steps * 1e3}))
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
    ap.add_argument("--budget", type=int, default=60 * 256, help="images seen per run (default 60 steps of 256)")
    ap.add_argument("--repeats", type=int, default=3)
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
        print(f"baseline {rev} ({commit}): S loaded into memory, a randperm per batch; new: {ROOT.name} (streamed)")
        rows = []
        for n in sizes:
            data = tmp / f"S{n}"
            write_set(data, n)
            best: dict[str, dict] = {}
            for r in range(args.repeats):
                for name, tree in (("old", old), ("new", ROOT)):
                    res = run(CHILD, tree, data, args.budget, tmp / f"out-{name}-{n}-{r}")
                    io = run(DATA_CHILD, tree, data, 256, 200, name)
                    best.setdefault(name + "_data", []).append(io["cpu_ms"])
                    cur = best.setdefault(name, {"maxrss_mb": [], "ips": [], "cpu": []})
                    cur["maxrss_mb"].append(res["maxrss_mb"])
                    cur["ips"].append(res["loop_images_per_s"])
                    cur["cpu"].append(res["loop_images_per_cpu_s"])
            row = {"n": n}
            for name in ("old", "new"):
                row[f"{name}_rss"] = min(best[name]["maxrss_mb"])
                row[f"{name}_ips"] = max(best[name]["ips"])
                row[f"{name}_cpu"] = max(best[name]["cpu"])
                row[f"{name}_data_ms"] = min(best[name + "_data"])
            rows.append(row)
            print(f"|S| = {n:>7,}: peak RSS old {row['old_rss']:7.1f} MB, new {row['new_rss']:7.1f} MB; "
                  f"train loop old {row['old_ips']:7.0f} img/s, new {row['new_ips']:7.0f} img/s "
                  f"(new/old {row['new_ips'] / row['old_ips']:.3f}); per CPU second old {row['old_cpu']:7.0f}, "
                  f"new {row['new_cpu']:7.0f} (new/old {row['new_cpu'] / row['old_cpu']:.3f})", flush=True)
            step_ms = 256 / row["old_cpu"] * 1e3  # CPU per step of the baseline, its data access included
            row["predicted"] = step_ms / (step_ms - row["old_data_ms"] + row["new_data_ms"])
            print(f"    data access per batch of 256 (CPU, best of {args.repeats} x 200 batches): old {row['old_data_ms']:.3f} ms, "
                  f"new {row['new_data_ms']:.3f} ms; baseline step {step_ms:.1f} ms -> images/s new/old "
                  f"{row['predicted']:.3f}", flush=True)
        first, last = rows[0], rows[-1]
        print(f"peak RSS growth {first['n']:,} -> {last['n']:,} images: old {last['old_rss'] - first['old_rss']:+.1f} MB, "
              f"new {last['new_rss'] - first['new_rss']:+.1f} MB "
              f"(the images alone: {(last['n'] - first['n']) * 64 / 2**20:.1f} MB)")
        print(f"images/s new/old at {first['n']:,}: wall {first['new_ips'] / first['old_ips']:.3f}, "
              f"CPU {first['new_cpu'] / first['old_cpu']:.3f}; at {last['n']:,}: wall "
              f"{last['new_ips'] / last['old_ips']:.3f}, CPU {last['new_cpu'] / last['old_cpu']:.3f}; from the data access alone: "
              f"{first['predicted']:.3f} / {last['predicted']:.3f} (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
