"""Benchmark ``neon merge`` against a naive load-everything merge and mergekit (run by hand, not in CI).

Builds a sharded bfloat16 safetensors pair in the Hugging Face layout (a random Llama-shaped
model, ~542M parameters = ~1.08 GB per input by default; ``--params`` to run smaller) with
θ_s = θ_r·(1 + 0.01·noise), then times in one run, each variant in its own subprocess:

* ``neon``: ``python -m neon_cli merge BASE FT --w 1.6 -o OUT`` (sharded output like θ_r's, fp32
  arithmetic, bf16 output, sha256 of inputs and outputs, fsync);
* ``naive``: ``safetensors.torch.load_file`` of every shard of both inputs, the same fp32 formula
  tensor by tensor into a dict, ``save_file`` per shard (what most one-off scripts do);
* ``mergekit``: ``mergekit-yaml`` with ``task_arithmetic``, ``base_model: θ_r``, weight −w,
  ``normalize: false``, ``dtype: float32``, ``out_dtype: bfloat16`` -- the same arithmetic -- when
  its executable is found (``--mergekit-yaml PATH`` or on PATH); otherwise skipped with a note.

Reported per variant: wall time of the whole command (interpreter start and imports included),
peak anonymous memory, and the ratios neon/baseline measured in this run. Peak memory is the
maximum over samples every 10 ms of the summed ``RssAnon`` (/proc/PID/status) of the variant's
process tree: anonymous pages only, because ``ru_maxrss``/``VmHWM`` also count the pages of
memory-mapped input files, which are reclaimable page cache (they are printed too, as
``maxrss``). Outputs are compared tensor by tensor: the largest difference in bf16 units in the
last place (target: ≤ 1) and the share of elements that differ.

Targets (issue 3): neon at least 3x faster than mergekit and at most a quarter of its peak memory.

Usage::

    python benchmarks/merge.py                      # ~1.08 GB per input (needs ~7 GB of disk)
    python benchmarks/merge.py --params 60e6        # quick run
    python benchmarks/merge.py --mergekit-yaml /tmp/mkvenv/bin/mergekit-yaml --repeat 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _llama_shape(params: float) -> dict:
    big = params >= 2e8
    h = 1024 if big else 256
    vocab = 32000 if big else 4096
    inter = int(2.75 * h) // 64 * 64
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    layers = max(1, round((params - 2 * vocab * h - h) / per_layer))
    return {"hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab,
            "num_attention_heads": max(1, h // 64), "num_key_value_heads": max(1, h // 64)}


def _tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i))]
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def build_pair(root: Path, params: float, shard_bytes: int, rel: float, seed: int = 0) -> tuple[Path, Path, int]:
    """Write base/ and ft/ (sharded bf16 safetensors + index + config.json); returns their paths and #params."""
    import torch
    from safetensors.torch import save_file

    cfg = _llama_shape(params)
    shapes = _tensor_shapes(cfg)
    nparams = sum(math.prod(s) for _, s in shapes)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nb = 2 * math.prod(shape)
        if groups[-1] and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nb
    n = len(groups)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, **cfg}
    g = torch.Generator().manual_seed(seed)
    base, ft = root / "base", root / "ft"
    for d in (base, ft):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
    wm = {}
    for j, grp in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        rs, ss = {}, {}
        for name, shape in grp:
            if len(shape) == 1:
                r = 1 + 0.1 * torch.randn(shape, generator=g)
            else:
                r = torch.randn(shape, generator=g) * shape[-1] ** -0.5
            s = r * (1 + rel * torch.randn(shape, generator=g))
            rs[name], ss[name] = r.to(torch.bfloat16), s.to(torch.bfloat16)
            wm[name] = fname
        save_file(rs, str(base / fname), metadata={"format": "pt"})
        save_file(ss, str(ft / fname), metadata={"format": "pt"})
        del rs, ss
    total = 2 * nparams
    for d in (base, ft):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    return base, ft, nparams


# ------------------------------------------------------------------------------ measurement


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds, peak summed RssAnon of its process tree, its ru_maxrss, output."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, sum(_rss_anon(p) for p in _tree(proc.pid)))
                time.sleep(0.01)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        th.join()
        fo.seek(0)
        fe.seek(0)
        return {"rc": proc.returncode, "wall": wall, "peak_anon": peak, "maxrss": ru.ru_maxrss * 1024,
                "stdout": fo.read().decode(), "stderr": fe.read().decode()}


NAIVE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
base, ft, out, w = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
idx = json.loads((base / "model.safetensors.index.json").read_text())
shards = sorted(set(idx["weight_map"].values()))
R, S = {}, {}
for sh in shards:
    R.update(load_file(str(base / sh))); S.update(load_file(str(ft / sh)))
O = {}
for k, r in R.items():
    r32 = r.float()
    O[k] = (r32 + w * (r32 - S[k].float())).to(r.dtype)
out.mkdir()
for sh in shards:
    save_file({k: O[k] for k, v in idx["weight_map"].items() if v == sh}, str(out / sh), metadata={"format": "pt"})
(out / "model.safetensors.index.json").write_text(json.dumps(idx))
"""


def compare(a: Path, b: Path) -> dict:
    """Largest difference between two outputs in bf16 ulps of ``a``, share of differing elements."""
    import torch

    sys.path.insert(0, str(REPO))
    from neon_cli.checkpoint import open_checkpoint

    worst, diff, total = 0.0, 0, 0
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        if set(ca.names()) != set(cb.names()):
            return {"error": f"different tensor names ({len(ca.names())} vs {len(cb.names())})"}
        for n in ca.names():
            x, y = ca.tensor(n).float(), cb.tensor(n).float()
            if x.shape != y.shape:
                return {"error": f"{n}: shape {tuple(x.shape)} vs {tuple(y.shape)}"}
            ne = x != y
            diff += int(ne.sum())
            total += x.numel()
            if bool(ne.any()):
                fi = torch.finfo(torch.bfloat16)
                ulp = torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(fi.tiny)))) * fi.eps
                worst = max(worst, float(((x - y).abs() / ulp).max()))
    return {"max_ulp_bf16": worst, "differing_fraction": diff / max(total, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=542e6, help="parameters per model (default 542e6 = ~1.08 GB bf16)")
    ap.add_argument("--shard-size", type=float, default=5e8, help="input shard size in bytes (default 500 MB)")
    ap.add_argument("--rel", type=float, default=1e-2, help="relative size of the self-training update")
    ap.add_argument("--w", type=float, default=1.6)
    ap.add_argument("--repeat", type=int, default=1, help="runs per variant (median wall time reported)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the pair (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml"), help="mergekit-yaml executable (default: on PATH)")
    ap.add_argument("--skip", action="append", default=[], choices=["neon", "naive", "mergekit"])
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="neon-bench-", dir=args.workdir))
    try:
        t = time.perf_counter()
        base, ft, nparams = build_pair(root, args.params, int(args.shard_size), args.rel)
        in_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"pair: {nparams / 1e6:.1f}M params, bf16, {in_bytes / 1e9:.2f} GB per input, "
              f"{len(list(base.glob('*.safetensors')))} shards; built in {time.perf_counter() - t:.1f}s; w={args.w}")
        print(f"machine: {os.cpu_count()} cpus; torch threads default; page cache warm (files just written)")

        variants: dict[str, list[str]] = {}
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        variants["neon"] = [sys.executable, "-m", "neon_cli", "merge", str(base), str(ft), "--w", str(args.w), "-o", "{out}", "--json", "-q"]
        variants["naive"] = [sys.executable, "-c", NAIVE, str(base), str(ft), "{out}", str(args.w)]
        if args.mergekit_yaml and "mergekit" not in args.skip:
            cfg = root / "mergekit.yml"
            cfg.write_text(
                "merge_method: task_arithmetic\n"
                f"base_model: {base}\n"
                "models:\n"
                f"  - model: {ft}\n"
                "    parameters:\n"
                f"      weight: {-args.w}\n"
                "parameters:\n  normalize: false\n"
                "dtype: float32\nout_dtype: bfloat16\n"
            )
            variants["mergekit"] = [args.mergekit_yaml, str(cfg), "{out}", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
        elif "mergekit" not in args.skip:
            print("note: mergekit-yaml not found (pip install mergekit, or --mergekit-yaml PATH): mergekit skipped")
        for name in args.skip:
            variants.pop(name, None)

        results: dict[str, dict] = {}
        for name, cmd in variants.items():
            walls, peaks, maxrss, extra = [], [], [], {}
            for k in range(args.repeat):
                out = root / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                r = run_measured([c.replace("{out}", str(out)) for c in cmd], env=env)
                if r["rc"] != 0:
                    print(f"{name}: failed (rc={r['rc']}): {r['stderr'].strip().splitlines()[-1:] if r['stderr'].strip() else ''}")
                    break
                walls.append(r["wall"])
                peaks.append(r["peak_anon"])
                maxrss.append(r["maxrss"])
                if name == "neon":
                    js = json.loads(r["stdout"])
                    extra = {"internal_s": js["seconds"], "effective_w": js["precision"]["effective_w"][0],
                             "equal_fraction": js["precision"]["equal_fraction"]}
            if walls:
                results[name] = {"wall": statistics.median(walls), "walls": walls, "peak_anon": max(peaks), "maxrss": max(maxrss), **extra}

        print()
        print(f"{'variant':10s} {'wall s':>8s} {'peak RssAnon':>13s} {'maxrss*':>10s}   runs")
        for name, r in results.items():
            print(f"{name:10s} {r['wall']:8.2f} {r['peak_anon'] / 2**30:10.2f} GiB {r['maxrss'] / 2**30:7.2f} GiB   "
                  + ", ".join(f"{x:.2f}" for x in r["walls"]))
        print("* ru_maxrss of the process (os.wait4): includes pages of memory-mapped input files")
        if "neon" in results:
            n = results["neon"]
            print(f"neon internal merge time {n['internal_s']:.2f}s (without interpreter start); "
                  f"effective w {n['effective_w']:.4f} for w={args.w}; {100 * n['equal_fraction']:.1f}% of elements equal in both inputs")
            for other in ("naive", "mergekit"):
                if other in results:
                    o = results[other]
                    print(f"neon vs {other}: {o['wall'] / n['wall']:.2f}x faster, peak memory {n['peak_anon'] / o['peak_anon']:.3f}x of {other}'s")
            for other in ("naive", "mergekit"):
                if other in results:
                    print(f"outputs neon vs {other}: {compare(root / 'out-neon', root / f'out-{other}')}")
        if "mergekit" in results and "neon" in results:
            n, m = results["neon"], results["mergekit"]
            ok_t, ok_m = m["wall"] / n["wall"] >= 3, n["peak_anon"] <= m["peak_anon"] / 4
            print(f"targets: >=3x faster than mergekit: {'met' if ok_t else 'NOT met'}; <=1/4 of its peak memory: {'met' if ok_m else 'NOT met'}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
