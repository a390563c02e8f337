"""Benchmark ``neon merge`` against the machine's I/O floor, mergekit, and itself under a memory cap
(run by hand, not in CI).

Builds a sharded bfloat16 safetensors pair in the Hugging Face layout (a random Llama-shaped
model, ~542M parameters = ~1.08 GB per input by default; ``--params`` to run smaller) with
θ_s = θ_r·(1 + 0.01·noise), then times, side by side in each round (``--repeat`` rounds,
medians reported, every variant in its own subprocess, page cache warm):

* ``floor``: one Python process that reads every byte of both inputs and writes an output of
  the same size (θ_r's shards copied in 4 MiB blocks) with fsync: the least any merge must do;
* ``neon``: ``python -m neon_cli merge BASE FT --w 1.6 -o OUT`` (sharded output like θ_r's, fp32
  arithmetic, bf16 output, sha256 of inputs and outputs, fsync);
* ``neon@192MiB`` (and ``--caps``): the same command in a memory cgroup capped at that size
  (cgroup v1 ``memory.limit_in_bytes`` in a child of this process's own memory cgroup; else
  ``systemd-run --scope -p MemoryMax=``; the method used is printed); the output must be
  identical (same folder sha256) to the uncapped one;
* ``naive``: ``safetensors.torch.load_file`` of every shard, the fp32 formula tensor by tensor,
  ``save_file`` per shard (what one-off scripts do);
* ``mergekit``: ``mergekit-yaml`` with ``task_arithmetic``, ``base_model: θ_r``, weight −w,
  ``normalize: false``, ``dtype: float32``, ``out_dtype: bfloat16`` -- the same arithmetic -- from
  its own virtualenv (``--mergekit-yaml PATH``; default ``/work/venvs/mergekit/bin/mergekit-yaml``
  or on PATH); skipped with a note when absent.

Reported per variant: median wall time of the whole command (interpreter start and imports
included), all runs, peak anonymous memory (summed ``RssAnon`` of the process tree sampled every
10 ms: the mapped input pages are page cache, not counted), and the ratios of issue 13's targets:
neon / floor (target <= 3), mergekit / neon (target >= 8), capped / uncapped (target <= 1.5, with an
identical output), plus the spread of each variant's runs (max/min) to show how noisy the shared
machine was. Outputs are compared: largest difference in bf16 units in the last place.

Usage::

    python benchmarks/merge.py --repeat 3                 # ~1.08 GB per input (needs ~7 GB of disk)
    python benchmarks/merge.py --params 60e6              # quick run
    python benchmarks/merge.py --skip naive --caps 192,256
"""

from __future__ import annotations

import argparse
import contextlib
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
        return {"rc": proc.returncode, "wall": wall, "peak_anon": peak, "maxrss": ru.ru_maxrss * 1024, "cpu": ru.ru_utime + ru.ru_stime,
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


FLOOR = r"""
import os, sys
from pathlib import Path
base, ft, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
buf = bytearray(1 << 22)
mv = memoryview(buf)
out.mkdir()
for f in sorted(ft.iterdir()):
    with open(f, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
for f in sorted(base.iterdir()):
    with open(f, "rb", buffering=0) as fi, open(out / f.name, "wb", buffering=0) as fo:
        while n := fi.readinto(buf):
            fo.write(mv[:n])
        os.fsync(fo.fileno())
"""


def _memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory folder, if it can hold a child with a limit."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrl, path = line.split(":", 2)
            if "memory" in ctrl.split(","):
                d = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                if (d / "memory.limit_in_bytes").exists() and os.access(d, os.W_OK):
                    return d
    except OSError:
        pass
    return None


def capped(cmd: list[str], mib: int, tag: str) -> tuple[list[str], str, Path | None]:
    """``cmd`` run under a ``mib`` MiB memory cap: (command, method, cgroup folder to remove)."""
    cg = _memory_cgroup()
    if cg is not None:
        child = cg / f"neon-bench-{os.getpid()}-{tag}"
        child.mkdir(exist_ok=True)
        (child / "memory.limit_in_bytes").write_text(str(mib << 20))
        try:
            (child / "memory.memsw.limit_in_bytes").write_text(str(mib << 20))
        except OSError:
            pass
        wrap = ["sh", "-c", f'echo $$ > {child}/cgroup.procs && exec "$@"', "sh"]
        return wrap + cmd, "cgroup v1 memory.limit_in_bytes", child
    if shutil.which("systemd-run"):
        return ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={mib}M", "-p", "MemorySwapMax=0", *cmd], "systemd-run -p MemoryMax", None
    return ["prlimit", f"--as={mib << 20}", *cmd], "prlimit RLIMIT_AS (address space, not resident memory)", None


def _folder_sha(p: Path) -> str:
    sys.path.insert(0, str(REPO))
    from neon_cli.fsutil import sha256_path

    return sha256_path(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=542e6, help="parameters per model (default 542e6 = ~1.08 GB bf16)")
    ap.add_argument("--shard-size", type=float, default=5e8, help="input shard size in bytes (default 500 MB)")
    ap.add_argument("--rel", type=float, default=1e-2, help="relative size of the self-training update")
    ap.add_argument("--w", type=float, default=1.6)
    ap.add_argument("--repeat", type=int, default=3, help="rounds (medians reported)")
    ap.add_argument("--caps", default="192", help="memory caps in MiB for capped neon runs (comma list; '' for none)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the pair (default: a temp dir)")
    ap.add_argument("--reuse", type=Path, default=None, help="a folder holding base/ and ft/ from an earlier --keep run")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    default_mk = "/work/venvs/mergekit/bin/mergekit-yaml" if Path("/work/venvs/mergekit/bin/mergekit-yaml").exists() else shutil.which("mergekit-yaml")
    ap.add_argument("--mergekit-yaml", default=default_mk, help="mergekit-yaml executable (its own venv)")
    ap.add_argument("--skip", action="append", default=[], choices=["floor", "neon", "naive", "mergekit", "capped"])
    args = ap.parse_args()

    root = args.reuse or Path(tempfile.mkdtemp(prefix="neon-bench-", dir=args.workdir))
    cgroups: list[Path] = []
    try:
        t = time.perf_counter()
        if args.reuse:
            base, ft = root / "base", root / "ft"
            nparams = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
        else:
            base, ft, nparams = build_pair(root, args.params, int(args.shard_size), args.rel)
        in_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"pair: {nparams / 1e6:.1f}M params, bf16, {in_bytes / 1e9:.2f} GB per input, "
              f"{len(list(base.glob('*.safetensors')))} shards; ready in {time.perf_counter() - t:.1f}s; w={args.w}")
        load = os.getloadavg()
        print(f"machine: {os.cpu_count()} cpus, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start; page cache warm")

        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        neon_cmd = [sys.executable, "-m", "neon_cli", "merge", str(base), str(ft), "--w", str(args.w), "-o", "{out}", "--json", "-q"]
        variants: dict[str, list[str]] = {}
        variants["floor"] = [sys.executable, "-c", FLOOR, str(base), str(ft), "{out}"]
        variants["neon"] = neon_cmd
        methods = {}
        for mib in [int(c) for c in args.caps.split(",") if c.strip()] if "capped" not in args.skip else []:
            cmd, method, cg = capped(neon_cmd, mib, f"{mib}")
            variants[f"neon@{mib}MiB"] = cmd
            methods[mib] = method
            if cg is not None:
                cgroups.append(cg)
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
            print("note: mergekit-yaml not found (install mergekit in its own venv, --mergekit-yaml PATH): mergekit skipped")
        for name in args.skip:
            variants.pop(name, None)
        for mib, m in methods.items():
            print(f"memory cap {mib} MiB: {m}")

        results: dict[str, dict] = {n: {"walls": [], "peaks": [], "maxrss": [], "cpus": [], "failed": None} for n in variants}
        shas: dict[str, str] = {}
        for k in range(args.repeat):
            for name, cmd in variants.items():
                if results[name]["failed"]:
                    continue
                out = root / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                r = run_measured([c.replace("{out}", str(out)) for c in cmd], env=env)
                if r["rc"] != 0:
                    tail = r["stderr"].strip().splitlines()[-1:] if r["stderr"].strip() else []
                    results[name]["failed"] = f"rc={r['rc']} {tail}"
                    print(f"{name}: failed (rc={r['rc']}{', killed' if r['rc'] in (-9, 137) else ''}): {tail}")
                    continue
                results[name]["walls"].append(r["wall"])
                results[name]["peaks"].append(r["peak_anon"])
                results[name]["maxrss"].append(r["maxrss"])
                results[name]["cpus"].append(r["cpu"])
                if name.startswith("neon"):
                    js = json.loads(r["stdout"])
                    results[name]["extra"] = {"internal_s": js["seconds"], "effective_w": js["precision"]["effective_w"][0],
                                              "equal_fraction": js["precision"]["equal_fraction"]}
                    shas[name] = _folder_sha(out)
            print(f"round {k + 1}: " + ", ".join(f"{n} {v['walls'][-1]:.2f}s" for n, v in results.items() if v["walls"] and len(v["walls"]) == k + 1))

        print()
        print(f"{'variant':14s} {'median s':>9s} {'spread':>7s} {'CPU s':>7s} {'peak RssAnon':>13s}   runs")
        med, cpu = {}, {}
        for name, r in results.items():
            if not r["walls"]:
                print(f"{name:14s} {'-':>9s}   {r['failed']}")
                continue
            med[name] = statistics.median(r["walls"])
            cpu[name] = statistics.median(r["cpus"])
            print(f"{name:14s} {med[name]:9.2f} {max(r['walls']) / min(r['walls']):6.2f}x {cpu[name]:7.2f} {max(r['peaks']) / 2**20:9.0f} MiB   "
                  + ", ".join(f"{x:.2f}" for x in r["walls"]))
        print("spread = slowest / fastest run of the variant (noise of the shared machine); CPU s = user + system time\n"
              "of the process and its threads (os.wait4), which other jobs on the machine do not inflate")
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        if "neon" in med:
            n = results["neon"]["extra"]
            print(f"neon internal merge time {n['internal_s']:.2f}s (last run, without interpreter start); effective w "
                  f"{n['effective_w']:.4f} for w={args.w}; {100 * n['equal_fraction']:.1f}% of elements equal in both inputs")
            if "floor" in med:
                ratio = med["neon"] / med["floor"]
                print(f"neon / I/O floor: {ratio:.2f}x wall (target <= 3: {'met' if ratio <= 3 else 'NOT met'}), "
                      f"{cpu['neon'] / cpu['floor']:.2f}x CPU")
            if "mergekit" in med:
                ratio = med["mergekit"] / med["neon"]
                print(f"mergekit / neon: {ratio:.2f}x wall (target >= 8: {'met' if ratio >= 8 else 'NOT met'}), "
                      f"{cpu['mergekit'] / cpu['neon']:.2f}x CPU; "
                      f"peak memory neon {max(results['neon']['peaks']) / 2**20:.0f} MiB vs mergekit {max(results['mergekit']['peaks']) / 2**20:.0f} MiB")
            if "naive" in med:
                print(f"naive / neon: {med['naive'] / med['neon']:.2f}x")
            for name in med:
                if name.startswith("neon@"):
                    ratio = med[name] / med["neon"]
                    same = shas.get(name) == shas.get("neon")
                    print(f"{name} / neon: {ratio:.2f}x wall, {cpu[name] / cpu['neon']:.2f}x CPU, output {'identical' if same else 'DIFFERENT'} "
                          f"(target <= 1.5 and identical: {'met' if ratio <= 1.5 and same else 'NOT met'})")
            for other in ("naive", "mergekit"):
                if other in med:
                    print(f"outputs neon vs {other}: {compare(root / 'out-neon', root / f'out-{other}')}")
    finally:
        for cg in cgroups:
            with contextlib.suppress(OSError):
                cg.rmdir()
        if args.keep or args.reuse:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
