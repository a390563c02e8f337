#!/usr/bin/env bash
# GPU check of neon's multi-GPU paths (run by hand on a CUDA machine; CI has no GPU).
#
#   bash benchmarks/gpu_check.sh [WORKDIR]
#
# Runs synth, finetune, eval, tune-w and ref-stats on CUDA with 1 rank and, where 2 GPUs exist,
# with 2 ranks under torchrun (NCCL), then checks the world-size invariance README "Clusters"
# promises, exiting non-zero on any mismatch:
#   synth      the shards' sha256 are identical (image i depends only on seed i)
#   finetune   theta_s equal to float tolerance on a noise-free loss (the toy family: DDP with the
#              global batch follows the single-process trajectory); digits' stochastic loss only runs
#   eval       metrics equal (every rank samples whole batches, gathered on the GPU; digits' metric)
#              and, for a family scored with an Inception detector (a stand-in TorchScript module),
#              the FID equal: every rank takes part in the detector's all-gather under NCCL
#   tune-w     the same evaluations (w, value) and the same chosen w
#   ref-stats  the same statistics file contents
# Sizes are small: about 2-4 minutes on one recent GPU. Environment: RTOL (default 1e-5) for float
# comparisons; GPU_CHECK_CPU=1 runs the same script on CPU with 2 gloo ranks (a smoke test of the
# script itself, not a GPU check). Exit codes: 0 all equal, 1 a mismatch, 2 no CUDA.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
export RTOL="${RTOL:-1e-5}"
export PYTHONPATH="$ROOT/tests/fixtures/toyfam:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
elif [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
    echo "gpu_check: no CUDA; GPU_CHECK_CPU=1: smoke run on CPU with 2 gloo ranks (not a GPU check)"
    NGPU=2
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    echo "gpu_check: no CUDA device; nothing to check (GPU_CHECK_CPU=1 runs the script on CPU)" >&2
    exit 2
fi
W="${1:-$(mktemp -d -t neon-gpu-check-XXXX)}"
mkdir -p "$W"
echo "gpu_check: $NGPU GPU(s), working in $W"
T0=$(date +%s)

neon1() { "$PY" -m neon_cli "$@"; }
neon2() { "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m neon_cli "$@"; }

# inputs made once: a toy base, an Inception stand-in detector, reference statistics for it
"$PY" - "$W" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import torch

import neon_toyfam
from test_inception import TinyDetector  # the test suite's stand-in for inception-2015-12-05.pt
from neon_cli import inception as I
from neon_cli.family import get_family
from neon_cli.metrics import save_stats

w = Path(sys.argv[1])
neon_toyfam.family.save(neon_toyfam.family.new(), str(w / "toy-base.safetensors"), {"train_images": "1000"})
torch.jit.script(TinyDetector()).save(str(w / "det.pt"))
np.save(w / "real.npy", np.random.default_rng(1).integers(0, 256, (512, 8, 8, 3), dtype=np.uint8))
mu, sigma, _ = I.compute_stats(I.load_detector(w / "det.pt"), I.open_images(w / "real.npy"), batch=128)
save_stats(w / "inc-ref.npz", mu, sigma)
EOF
INCFAM="$ROOT/tests/fixtures/inception_family.py:family"
"$PY" -c "
from neon_cli.family import get_family
f = get_family('$INCFAM'); f.save(f.new(), '$W/inc-model.safetensors', {})"

run_all() {  # $1: neon1 | neon2, $2: output folder
    local n="$1" o="$W/$2"
    mkdir -p "$o"
    $n synth digits --num-images 4000 --shard-size 500 --batch 250 -o "$o/S" -q
    $n finetune digits --data "$o/S" --budget 8192 --batch 256 --save-every 4096 -o "$o/ft" -q
    # eval and tune-w score the 1-rank run's theta_s in both runs: digits' training noise differs per
    # rank, so the 2-rank theta_s is another (equally good) model
    local ts="$W/one/ft/theta_s-000008192.safetensors"
    $n eval digits --model "$ts" --num-samples 2000 --batch 250 --report "$o/eval.json" -q
    $n tune-w digits --selftrained "$ts" --num-samples 1000 --batch 250 --max-evals 5 \
        --cache "$o/tune.jsonl" --report "$o/tune.json" -o "$o/neon.safetensors" -q
    $n synth toy --model "$W/toy-base.safetensors" --num-images 512 --shard-size 64 -o "$o/toyS" -q
    $n finetune toy --model "$W/toy-base.safetensors" --data "$o/toyS" --budget 2048 --batch 64 --lr 0.05 -o "$o/toyft" -q
    $n eval "$INCFAM" --model "$W/inc-model.safetensors" --num-samples 600 --batch 100 \
        --detector "$W/det.pt" --ref-stats "$W/inc-ref.npz" --report "$o/inc-eval.json" -q
    $n ref-stats --images "$W/real.npy" --detector "$W/det.pt" -o "$o/ref.npz" --batch 64 --report "$o/ref.json" -q
}

echo "gpu_check: 1 rank"
run_all neon1 one
if [ "$NGPU" -ge 2 ]; then
    echo "gpu_check: 2 ranks ($("$PY" -c "import torch; print('NCCL' if torch.cuda.is_available() else 'gloo, CPU')"))"
    run_all neon2 two
else
    echo "gpu_check: only 1 GPU: the 2-rank NCCL runs and the 1-vs-2 comparison are skipped (NCCL needs a GPU per rank)"
fi

"$PY" - "$W" "$NGPU" <<'EOF'
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

w, ngpu = Path(sys.argv[1]), int(sys.argv[2])
rtol = float(os.environ["RTOL"])
bad = []


def check(ok, what):
    print(("ok      " if ok else "MISMATCH") + "  " + what)
    if not ok:
        bad.append(what)


def close(a, b):
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12))


one = w / "one"
# the 1-rank runs themselves: complete and finite
m = json.loads((one / "eval.json").read_text())["results"]["metrics"]
check(all(math.isfinite(v) for v in m.values()), f"1 rank: eval metrics finite ({m['fid']:.5g} fid)")
check(json.loads((one / "inc-eval.json").read_text())["status"] == "ok", "1 rank: Inception-scored eval")
if ngpu >= 2:
    two = w / "two"
    for s in ("S", "toyS"):
        a = [x["sha256"] for x in json.loads((one / s / "manifest.json").read_text())["shards"]]
        b = [x["sha256"] for x in json.loads((two / s / "manifest.json").read_text())["shards"]]
        check(a == b, f"synth {s}: {len(a)} shards identical with 1 and 2 ranks")
    a = load_file(str(one / "toyft" / "theta_s-000002048.safetensors"))
    b = load_file(str(two / "toyft" / "theta_s-000002048.safetensors"))
    check(all(np.allclose(a[k].cpu().numpy(), b[k].cpu().numpy(), rtol=rtol, atol=1e-6) for k in a),
          "finetune toy (noise-free loss): theta_s of 2 ranks = 1 rank")
    check((two / "ft" / "theta_s-000008192.safetensors").exists(), "finetune digits ran under DDP on 2 ranks")
    for rep in ("eval.json", "inc-eval.json"):
        ma = json.loads((one / rep).read_text())["results"]["metrics"]
        mb = json.loads((two / rep).read_text())["results"]["metrics"]
        keys = [k for k in ma if k != "seconds"]
        check(all(close(ma[k], mb[k]) for k in keys), f"{rep}: {', '.join(f'{k} {ma[k]:.6g}/{mb[k]:.6g}' for k in keys)}")
    ta = json.loads((one / "tune.json").read_text())["results"]
    tb = json.loads((two / "tune.json").read_text())["results"]
    check(len(ta["evaluations"]) == len(tb["evaluations"])
          and all(close(x["w"], y["w"]) and close(x["value"], y["value"]) for x, y in zip(ta["evaluations"], tb["evaluations"])),
          f"tune-w: the same {len(ta['evaluations'])} evaluations")
    check(close(ta["chosen"]["w"], tb["chosen"]["w"]), f"tune-w: chosen w {ta['chosen']['w']:.6g} / {tb['chosen']['w']:.6g}")
    check(len((two / "tune.jsonl").read_text().splitlines()) == len(tb["evaluations"]), "tune-w: rank 0 alone wrote the cache")
    ra, rb = np.load(one / "ref.npz"), np.load(two / "ref.npz")
    check(np.allclose(ra["mu"], rb["mu"], rtol=rtol, atol=1e-9) and np.allclose(ra["sigma"], rb["sigma"], rtol=rtol, atol=1e-9),
          "ref-stats: mu, sigma equal with 1 and 2 ranks")
print(f"gpu_check: {len(bad)} mismatch(es)")
sys.exit(1 if bad else 0)
EOF
echo "gpu_check: done in $(( $(date +%s) - T0 )) s"
