"""Neon's merge θ_Neon = θ_r − w (θ_s − θ_r): in memory, and streaming between checkpoint files.

Paper: Alemohammad, Wang, Baraniuk, "Neon", ICLR 2026, Algorithm 1 (last step) and App. C:
θ_r is the base model, θ_s the model briefly fine-tuned on its own samples, w > 0 the
extrapolation weight (w < 0 interpolates towards θ_s).

Semantics (the same for :func:`merge_state_dicts` and :func:`merge_checkpoints`):

* a floating-point tensor is merged as ``θ_r + w·(θ_r − θ_s)`` computed in float32 (float64 when
  θ_r or the output is float64; w stays a Python float, never rounded to the storage dtype), then
  cast to θ_r's dtype or to ``out_dtype``. This form never overflows in half precision
  ((1+w)·θ_r does for |θ_r| > 65504/(1+w) in float16);
* copied from θ_r bit for bit (reason in brackets, as listed in the report):
  non-floating tensors (``non_float``: integer step counters, boolean masks); tensors equal in
  both inputs (``equal``: fixed buffers, ±inf attention masks); BatchNorm running statistics
  (``batchnorm_stats``: ``running_mean``, ``running_var``, ``num_batches_tracked``, buffers that
  the paper copies from θ_r); names the caller declares buffers (``buffer``); names matched by an
  ``exclude`` regex (``excluded``, ``re.search`` on the stored name); names only θ_r has, with
  ``allow_missing`` (``only_in_base``); for safetensors files merged with ``--key``, tensors outside
  the key (``outside_key``). ``out_dtype`` still casts copied floating tensors;
* elementwise, where θ_r or θ_s is non-finite the output keeps θ_r's entry;
* key sets, shapes and dtypes must match (:class:`~neon_cli.errors.CheckpointError` naming the
  key); with ``allow_missing`` names only in θ_r are copied and names only in θ_s are ignored.

Precision statistics (issue 3, item 6): for every merged tensor the share of elements equal in
both inputs, ‖θ_s − θ_r‖, ‖θ_s − θ_r‖/‖θ_r‖, and per w the *effective* w realised after rounding
the output, the least-squares ``w_eff = <out − θ_r, θ_r − θ_s> / ‖θ_r − θ_s‖²`` (equal to w before
rounding), each over finite entries.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from neon_cli.checkpoint import (
    CHUNK_ELEMENTS,
    Checkpoint,
    RawTensorFile,
    SafetensorsWriter,
    TensorSpec,
    dtype_name,
    index_json,
    open_checkpoint,
    parse_dtype,
    replace_in_container,
    shard_file_names,
    shard_layout,
    sha256_tree,
    INDEX_NAMES,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
)
from neon_cli.errors import CheckpointError, UsageError
from neon_cli.progress import ProgressFn, null_progress

FORMULA = "theta_r - w * (theta_s - theta_r)"

#: Name endings of BatchNorm running statistics (torch.nn.modules.batchnorm buffers).
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")

#: Why a tensor was copied from θ_r instead of merged (report keys -> explanation).
COPY_REASONS: dict[str, str] = {
    "non_float": "not a floating-point tensor",
    "equal": "equal in both inputs",
    "batchnorm_stats": "BatchNorm running statistic",
    "buffer": "declared a buffer",
    "excluded": "matched --exclude",
    "only_in_base": "only in the base (--allow-missing)",
    "outside_key": "outside the merged state dict (--key)",
}

#: The CLI suggests ``--dtype float32`` when a half-precision output realises a w this far from
#: the one asked for (relative), or when this share of elements is identical in both inputs.
SUGGEST_REL_W_ERROR = 0.01
SUGGEST_EQUAL_FRACTION = 0.25

_HALF = (torch.float16, torch.bfloat16)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ----------------------------------------------------------------------------------------------
# classification


def is_bn_stat(name: str) -> bool:
    """True for BatchNorm running statistics (``...running_mean``/``running_var``/``num_batches_tracked``)."""
    return name.rsplit(".", 1)[-1] in BN_STATS


def _compile_exclude(exclude: Sequence[str]) -> list[re.Pattern[str]]:
    out = []
    for pat in exclude:
        try:
            out.append(re.compile(pat))
        except re.error as exc:
            raise UsageError(f"--exclude {pat!r}: not a valid regular expression ({exc})") from None
    return out


def _copy_reason(name: str, raw: str, dtype: torch.dtype, exclude: list[re.Pattern[str]], buffers: Collection[str]) -> str | None:
    if dtype.is_complex:
        raise CheckpointError(f"key {raw!r}: complex tensors are not supported")
    if any(p.search(raw) or p.search(name) for p in exclude):
        return "excluded"
    if is_bn_stat(name):
        return "batchnorm_stats"
    if not dtype.is_floating_point:
        return "non_float"
    if name in buffers or raw in buffers:
        return "buffer"
    return None


def _compute_dtype(r_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (r_dtype, out_dtype) else torch.float32


# ----------------------------------------------------------------------------------------------
# the arithmetic


class _Stats:
    """Accumulators for one merged tensor (over its row blocks)."""

    __slots__ = ("numel", "n_equal", "n_nonfinite_in", "dd", "rr", "num", "n_nonfinite_out", "all_equal")

    def __init__(self, nw: int):
        self.numel = 0
        self.n_equal = 0
        self.n_nonfinite_in = 0
        self.dd = 0.0
        self.rr = 0.0
        self.num = [0.0] * nw
        self.n_nonfinite_out = [0] * nw
        self.all_equal = True


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    iv = _INT_VIEW[a.element_size()]
    return torch.equal(a.reshape(-1).view(iv), b.reshape(-1).view(iv))


class _Workspace:
    """Reusable scratch buffers for :func:`_merge_block` (no allocation or page faults per block)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def buf(self, slot: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (slot, dtype, device)
        b = self._bufs.get(key)
        if b is None or b.numel() < n:
            b = self._bufs[key] = torch.empty(n, dtype=dtype, device=device)
        return b[:n]


def _merge_block(
    r: torch.Tensor,
    s: torch.Tensor,
    ws: Sequence[float],
    out_dtype: torch.dtype,
    st: _Stats | None,
    work: _Workspace | None = None,
) -> list[torch.Tensor]:
    """Merge one block (any shape) for every w; returns one tensor per w in ``out_dtype``.

    A block equal in both inputs comes back as θ_r's own bits (cast only if ``out_dtype``
    differs). Updates ``st`` when given. The returned tensors never alias ``work``.
    """
    shape = r.shape
    r = r.contiguous().reshape(-1)
    s = s.contiguous().reshape(-1)
    n = r.numel()
    cdt = _compute_dtype(r.dtype, out_dtype)
    if work is None:
        work = _Workspace()
    r32 = r if r.dtype == cdt else work.buf(0, n, cdt, r.device).copy_(r)
    d = work.buf(1, n, cdt, r.device)
    if s.dtype == cdt:
        torch.sub(r32, s, out=d)
    else:
        torch.sub(r32, d.copy_(s), out=d)  # θ_r − θ_s
    tmp = work.buf(2, n, cdt, r.device)
    dd = float(torch.dot(d, d)) if n else 0.0
    nf = None
    n_nf = 0
    if math.isfinite(dd):
        if st is None:  # in memory: the caller has checked equality (torch.equal)
            nz = n
        elif n > 1 << 24:
            nz = int(torch.count_nonzero(d))
        else:  # |sign(d)| summed in float32: exact below 2**24 elements, and fast
            nz = int(torch.sign(d, out=tmp).abs_().sum()) if n else 0
        equal = nz == 0
    else:  # some entry of θ_r or θ_s is ±inf/NaN (or d overflowed): keep θ_r there
        nf = ~torch.isfinite(d)
        n_nf = int(nf.sum())
        d.masked_fill_(nf, 0.0)
        dd = float(torch.dot(d, d))
        nz = int(torch.count_nonzero(d))
        equal = nz == 0 and _bits_equal(r, s)
    if st is not None:
        rm = r32 if nf is None else r32.masked_fill(nf, 0.0)
        st.numel += n
        st.n_nonfinite_in += n_nf
        st.rr += float(torch.dot(rm, rm))
    if equal:
        if st is not None:
            st.n_equal += n - n_nf
        same = r if out_dtype == r.dtype else r.to(out_dtype)
        return [same.reshape(shape)] * len(ws)
    if st is not None:
        st.all_equal = False
        st.n_equal += n - nz - n_nf
        st.dd += dd
    r_out = None
    outs = []
    for k, w in enumerate(ws):
        if out_dtype == cdt:  # the result is the output: a fresh tensor
            o = oc = torch.add(r32, d, alpha=float(w))  # θ_r + w (θ_r − θ_s)
        else:
            o = torch.add(r32, d, alpha=float(w), out=work.buf(3, n, cdt, r.device))
            oc = o.to(out_dtype)
        if nf is not None:
            if r_out is None:
                r_out = r if out_dtype == r.dtype else r.to(out_dtype)
            oc = torch.where(nf, r_out, oc)
        if st is not None:
            back = oc if out_dtype == cdt else tmp.copy_(oc)
            diff = torch.sub(back, r32, out=tmp)  # the update realised after rounding
            num = float(torch.dot(diff, d))
            if not math.isfinite(num):
                bad = ~torch.isfinite(oc)
                if nf is not None:
                    bad &= ~nf
                st.n_nonfinite_out[k] += int(bad.sum())
                diff.masked_fill_(~torch.isfinite(diff), 0.0)
                num = float(torch.dot(diff, d))
            st.num[k] += num
        outs.append(oc.reshape(shape))
    return outs


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (restored after). Block-wise merging is memory-bound and
    fork/join per small op costs more than it gains on a shared machine (benchmarks/merge.py)."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# in memory


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    selftrained: Mapping[str, torch.Tensor],
    w: float,
    *,
    exclude: Sequence[str] = (),
    buffers: Collection[str] = (),
    allow_missing: bool = False,
    out_dtype: torch.dtype | str | None = None,
) -> dict[str, torch.Tensor]:
    """θ_Neon = θ_r − w (θ_s − θ_r) for two in-memory state dicts; no file I/O (used by tune-w).

    ``base`` (θ_r) and ``selftrained`` (θ_s): name -> tensor (any device; same names, shapes and
    dtypes). ``w``: extrapolation weight (Python float; the paper's w, typically 0.5-2).
    Returns a new dict in ``base``'s key order, dtypes of ``base`` (or ``out_dtype`` for floating
    tensors). Copied entries (see module docstring) are ``base``'s own tensor objects unless a
    cast is needed; merged ones are new tensors. Raises CheckpointError naming the key on a
    key/shape/dtype mismatch, UsageError on an invalid ``exclude`` regex or ``w``.
    Source: paper Algorithm 1 and App. C; the same arithmetic as :func:`merge_checkpoints`.
    """
    w = _check_w(w)
    odt_all = parse_dtype(out_dtype)
    pats = _compile_exclude(exclude)
    _check_names(list(base), list(selftrained), "base", "selftrained", allow_missing)
    out: dict[str, torch.Tensor] = {}
    work = _Workspace()
    with torch.no_grad():
        for name, r in base.items():
            if not isinstance(r, torch.Tensor):
                raise CheckpointError(f"key {name!r}: not a tensor in base ({type(r).__name__})")
            s = selftrained.get(name)
            odt = odt_all if (odt_all is not None and r.is_floating_point()) else r.dtype
            if s is None:
                reason = "only_in_base"
            else:
                _check_pair(name, r.dtype, tuple(r.shape), s.dtype, tuple(s.shape), "base", "selftrained")
                reason = _copy_reason(name, name, r.dtype, pats, buffers)
                s = s.detach().to(r.device)
            if reason is None and not torch.equal(r, s):
                out[name] = _merge_block(r.detach(), s, (w,), odt, None, work)[0]
            else:
                out[name] = r if odt == r.dtype else r.detach().to(odt)
    return out


def _check_w(w: Any) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise UsageError(f"--w {w!r}: not a number") from None
    if not math.isfinite(w):
        raise UsageError(f"--w {w}: must be finite")
    return w


def _check_pair(name: str, rd: torch.dtype, rs: tuple, sd: torch.dtype, ss: tuple, rlabel: str, slabel: str) -> None:
    if rs != ss:
        raise CheckpointError(f"key {name!r}: shape {list(rs)} in {rlabel} but {list(ss)} in {slabel}")
    if rd != sd:
        raise CheckpointError(f"key {name!r}: dtype {dtype_name(rd)} in {rlabel} but {dtype_name(sd)} in {slabel}")


def _check_names(r_names: list[str], s_names: list[str], rlabel: str, slabel: str, allow_missing: bool) -> tuple[list[str], list[str]]:
    rs, ss = set(r_names), set(s_names)
    only_r = [n for n in r_names if n not in ss]
    only_s = [n for n in s_names if n not in rs]
    if not allow_missing:
        if only_r:
            raise CheckpointError(
                f"key {only_r[0]!r}: in {rlabel} but not in {slabel}"
                + (f" (and {len(only_r) - 1} more)" if len(only_r) > 1 else "")
                + "; --allow-missing copies such keys from the base"
            )
        if only_s:
            raise CheckpointError(
                f"key {only_s[0]!r}: in {slabel} but not in {rlabel}"
                + (f" (and {len(only_s) - 1} more)" if len(only_s) > 1 else "")
                + "; --allow-missing ignores such keys"
            )
    return only_r, only_s


# ----------------------------------------------------------------------------------------------
# files


@dataclass
class _Item:
    name: str  # canonical (wrapper prefix stripped)
    raw: str  # the key as stored in θ_r: the output key
    spec: TensorSpec  # θ_r's
    out_dtype: torch.dtype
    reason: str | None  # None: merge
    outside: bool = False  # a safetensors tensor outside --key (read by raw name)

    @property
    def out_spec(self) -> TensorSpec:
        return TensorSpec(self.raw, self.out_dtype, self.spec.shape)


def output_kind(path: Path, shard_size: int | None) -> str:
    """``"safetensors"``, ``"torch"``, ``"pickle"`` or ``"sharded"`` for an output path."""
    suffix = path.suffix.lower()
    if shard_size is not None:
        if suffix in TORCH_SUFFIXES | PICKLE_SUFFIXES or suffix == SAFETENSORS_SUFFIX:
            raise UsageError(f"-o {path}: --shard-size writes a folder; give -o a folder name without a file suffix")
        return "sharded"
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    return "sharded"


class _RssSampler:
    """Peak anonymous resident memory (``RssAnon`` in /proc/self/status), sampled by the caller.

    ``RssAnon`` excludes file-backed pages (the memory-mapped inputs, reclaimable page cache), so
    it measures what the merge itself allocates. Sampled after each block while its temporaries
    are alive. None where /proc is unavailable.
    """

    def __init__(self) -> None:
        self.peak: int | None = None
        self.ok = os.path.exists("/proc/self/status")
        self.sample()

    def sample(self) -> None:
        if not self.ok:
            return
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        v = int(line.split()[1]) * 1024
                        self.peak = v if self.peak is None else max(self.peak, v)
                        return
        except OSError:
            self.ok = False


def _max_rss() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return None


def _versions() -> dict[str, str]:
    from neon_cli import __version__

    v = {"neon": __version__, "torch": torch.__version__}
    try:
        import safetensors

        v["safetensors"] = safetensors.__version__
    except Exception:
        pass
    return v


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _w_text(w: float) -> str:
    return repr(float(w))


class _Sink:
    """One output (one w). Receives tensors group by group, in each group's declared order."""

    def __init__(self, final: Path, tmp: Path, kind: str):
        self.final, self.tmp, self.kind = final, tmp, kind
        self.sha256: str | None = None
        self.bytes = 0


def merge_checkpoints(
    base: str | os.PathLike[str],
    selftrained: str | os.PathLike[str],
    ws: Sequence[float],
    outputs: Sequence[str | os.PathLike[str]],
    *,
    report: Any,
    key: str | None = None,
    dtype: torch.dtype | str | None = None,
    exclude: Sequence[str] = (),
    buffers: Collection[str] = (),
    allow_missing: bool = False,
    shard_size: int | None = None,
    dry_run: bool = False,
    trust_pickle: bool = False,
    progress: ProgressFn = null_progress,
    chunk_elements: int = CHUNK_ELEMENTS,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Stream θ_Neon = θ_r − w (θ_s − θ_r) from two checkpoint files into one output per w.

    ``base`` (θ_r) and ``selftrained`` (θ_s): .safetensors, a sharded safetensors folder (or its
    ``model.safetensors.index.json``), a torch zip file (.pt/.pth/.bin/.ckpt), or with
    ``trust_pickle`` a full pickle; nested containers are searched for the state dict (``key``
    chooses: a dotted path like ``trainer.var_wo_ddp``). ``ws``/``outputs``: one output path per w;
    every input tensor is read once for all of them. The output layout comes from the output
    suffix: ``.safetensors`` (flat, θ_r's header metadata kept, provenance added as ``neon.*``
    keys), ``.pt``/``.pth``/``.bin``/``.ckpt`` (θ_r's container with the state dict replaced, a
    ``neon_provenance`` entry when the container is a dict that is not itself the state dict),
    ``.pkl`` (only from a pickle θ_r), or a folder: sharded safetensors with
    ``model.safetensors.index.json``, split by ``shard_size`` bytes or as θ_r's shards.
    ``dtype``: output dtype of floating tensors (default θ_r's). Memory: O(``chunk_elements``)
    per output, never the checkpoint (safetensors outputs; .pt outputs go through a memory-mapped
    scratch file). ``dry_run``: validate everything (names, shapes, dtypes, outputs, disk space)
    from headers only and write nothing; input sha256 are not computed (null in the report).
    ``buffers``: names copied like BatchNorm statistics (a family's declared buffers).
    ``chunk_elements``: elements per row block; ``threads``: torch intra-op threads during the
    merge (1: the arithmetic is memory-bound and one more thread writes and hashes the output;
    None keeps torch's setting).

    Fills ``report`` (inputs/outputs with sha256, results) and returns ``report.results``:
    ``merged`` (count), ``copied`` ({reason: count}), ``copied_names`` ({reason: [keys]}),
    ``copy_reasons``, ``copied_but_different`` (copied keys whose θ_s value differs, e.g.
    ``num_batches_tracked``), ``delta_norm`` ‖θ_s − θ_r‖, ``base_norm`` ‖θ_r‖, ``relative_delta``
    (over merged tensors, finite entries), ``most_changed`` (10 tensors by relative change),
    ``tensors`` (per merged tensor: shape, dtypes, ``equal_fraction``, ``delta_norm``,
    ``relative_delta``, ``effective_w`` per w, ``nonfinite_kept``), ``precision``
    (``equal_fraction``, ``effective_w`` per w, ``max_relative_w_error``, ``suggest_dtype``),
    ``nonfinite_kept`` ({key: count}), ``nonfinite_results`` (per w: {key: count} of results not
    finite in the output dtype), ``outputs`` (w, path, sha256, bytes), ``layout``, ``key``,
    ``prefix``, ``warnings``, ``seconds``, ``peak_rss_anon_bytes`` (RssAnon sampled after each
    block: the process's anonymous memory, interpreter and torch included, mapped input pages
    excluded) and ``max_rss_bytes`` (ru_maxrss: includes mapped file pages).
    Raises UsageError (bad w/outputs, output equal to an input, not enough disk) and
    CheckpointError (unreadable/truncated input, key/shape/dtype mismatch naming the key); on any
    error no output is left behind. Source: paper Algorithm 1, App. C; issue 3.
    """
    t0 = time.perf_counter()
    sampler = _RssSampler()
    ws = [_check_w(w) for w in ws]
    outs = [Path(o) for o in outputs]
    if not ws:
        raise UsageError("--w: give at least one weight")
    if len(ws) != len(outs):
        raise UsageError(f"-o: {len(outs)} output paths for {len(ws)} weights; use '{{w}}' in -o for several weights")
    if len({str(o.resolve()) for o in outs}) != len(outs):
        raise UsageError("-o: several weights write the same file; put '{w}' in the output name")
    kinds = {output_kind(o, shard_size) for o in outs}
    if len(kinds) != 1:
        raise UsageError("-o: all outputs must have the same layout (suffix)")
    kind = kinds.pop()
    odt = parse_dtype(dtype)
    pats = _compile_exclude(exclude)
    base_p, self_p = Path(base), Path(selftrained)

    with contextlib.ExitStack() as stack:
        rk = stack.enter_context(open_checkpoint(base_p, key=key, trust_pickle=trust_pickle))
        sk = stack.enter_context(
            open_checkpoint(self_p, key=key, prefer_key=rk.key if rk.layout in ("torch", "pickle") else None, trust_pickle=trust_pickle, key_optional=True)
        )
        _check_outputs(outs, kind, rk, sk, shard_size)
        items, ignored = _plan(rk, sk, pats, buffers, allow_missing, odt)
        warnings = list(rk.notes) + list(sk.notes)
        if rk.alternatives:
            warnings.append(f"base: merged the state dict at {rk.key!r}; also found {', '.join(rk.alternatives)} (choose with --key)")
        if kind in ("safetensors", "sharded") and rk.non_tensors:
            warnings.append(f"not written to a safetensors output (not tensors): {', '.join(list(rk.non_tensors)[:8])}")
        if kind in ("safetensors", "sharded") and rk.key and rk.layout in ("torch", "pickle"):
            others = [str(k) for k in rk.container.keys() if str(k) != rk.key.split(".")[0]] if isinstance(rk.container, Mapping) else []
            if others:
                warnings.append(f"container entries of the base not written to a safetensors output: {', '.join(others[:8])}")
        if kind == "pickle" and rk.layout != "pickle":
            raise UsageError(f"-o {outs[0]}: a .pkl output needs a pickle base; write .safetensors or .pt instead")
        groups = _groups(items, kind, rk, shard_size)
        out_bytes = sum(it.out_spec.nbytes for it in items)
        _check_disk(outs, out_bytes * (2 if kind in ("torch", "pickle") else 1))

        results: dict[str, Any] = report.results
        results.update(
            {
                "formula": FORMULA,
                "w": ws,
                "dry_run": bool(dry_run),
                "layout": {"base": rk.layout, "selftrained": sk.layout, "output": kind},
                "key": {"base": rk.key, "selftrained": sk.key},
                "prefix": {"base": rk.prefix, "selftrained": sk.prefix},
                "tensors_total": len(items),
                "output_bytes_each": out_bytes,
                "ignored_selftrained_only": ignored,
                "warnings": warnings,
            }
        )
        if dry_run:
            for role, ck in (("base", rk), ("selftrained", sk)):
                report.inputs.append({"role": role, "path": str(ck.path), "sha256": None})
            planned: dict[str, int] = {}
            for it in items:
                planned[it.reason or "merge"] = planned.get(it.reason or "merge", 0) + 1
            results["planned"] = planned
            results["outputs"] = [{"w": w, "path": str(o)} for w, o in zip(ws, outs)]
            results["seconds"] = round(time.perf_counter() - t0, 3)
            return results

        # header first: the provenance (with the inputs' sha256) must be known before any data
        progress("merge", 0, len(items), message="hashing inputs (sha256)", unit="tensor")
        r_sha, s_sha = _hash_inputs([rk.path, sk.path])
        report.add_input("base", rk.path, r_sha)
        report.add_input("selftrained", sk.path, s_sha)
        provenance = {
            "neon.formula": FORMULA,
            "neon.compute_dtype": "float32 (float64 for float64 tensors)",
            "neon.base": rk.path.name,
            "neon.base_sha256": r_sha,
            "neon.selftrained": sk.path.name,
            "neon.selftrained_sha256": s_sha,
            "neon.key": rk.key or "",
            "neon.exclude": json.dumps(list(exclude)),
            "neon.versions": json.dumps(_versions(), sort_keys=True),
        }

        stats, copied, nonfinite_kept, nonfinite_out, sinks = _run(
            stack, items, groups, rk, sk, ws, outs, kind, provenance, shard_size, progress, sampler, chunk_elements, threads
        )
        for w, sink in zip(ws, sinks):
            report.add_output(f"merged w={_w_text(w)}", sink.final, sink.sha256)

    _fill_results(results, items, stats, copied, nonfinite_kept, nonfinite_out, ws, sinks, odt, rk)
    results["peak_rss_anon_bytes"] = sampler.peak
    results["max_rss_bytes"] = _max_rss()
    results["seconds"] = round(time.perf_counter() - t0, 3)
    return results


def _hash_inputs(paths: list[Path]) -> list[str]:
    """sha256 (fsutil.sha256_path) of each input, hashed on parallel threads (hashlib and file
    reads release the GIL). Done before writing: the output header records these digests."""
    from concurrent.futures import ThreadPoolExecutor

    from neon_cli.fsutil import sha256_path

    def one(p: Path) -> str:
        try:
            return sha256_path(p)
        except OSError as exc:
            raise CheckpointError(f"{p}: cannot read to compute its sha256 ({exc.strerror or exc})") from None

    with ThreadPoolExecutor(max_workers=len(paths), thread_name_prefix="neon-sha256") as pool:
        return list(pool.map(one, paths))


def _check_outputs(outs: list[Path], kind: str, rk: Checkpoint, sk: Checkpoint, shard_size: int | None) -> None:
    inputs = [rk.path, sk.path, *rk.files, *sk.files]
    for o in outs:
        for i in inputs:
            if _same_path(o, i):
                raise UsageError(f"-o {o}: is an input ({i}); choose another output")
            if kind == "sharded" and i.resolve().is_relative_to(o.resolve()):
                raise UsageError(f"-o {o}: the output folder holds an input ({i}); choose another output")
        if kind == "sharded":
            if o.exists() and (not o.is_dir() or any(o.iterdir())):
                raise UsageError(f"-o {o}: exists and is not an empty folder; remove it or choose another output")
            if shard_size is None and rk.layout != "sharded":
                raise UsageError(f"-o {o}: give a file name ending in .safetensors or .pt, or --shard-size for a sharded folder")
        elif o.is_dir():
            raise UsageError(f"-o {o}: is a folder; give a file name")


def _check_disk(outs: list[Path], need_each: int) -> None:
    by_dir: dict[str, tuple[Path, int]] = {}
    for o in outs:
        parent = o.resolve().parent
        while not parent.exists():
            parent = parent.parent
        key = str(parent)
        by_dir[key] = (parent, by_dir.get(key, (parent, 0))[1] + need_each)
    for parent, need in by_dir.values():
        free = shutil.disk_usage(parent).free
        if need > free:
            raise UsageError(f"-o: not enough free disk space in {parent}: need {need / 1e9:.2f} GB, have {free / 1e9:.2f} GB")


def _plan(rk: Checkpoint, sk: Checkpoint, pats: list[re.Pattern[str]], buffers: Collection[str], allow_missing: bool, odt: torch.dtype | None) -> tuple[list[_Item], list[str]]:
    r_names = rk.names()
    _, only_s = _check_names_canon(rk, sk, allow_missing)
    items: list[_Item] = []
    for n in r_names:
        rs = rk.specs[n]
        raw = rk.raw_name(n)
        o = odt if (odt is not None and rs.dtype.is_floating_point) else rs.dtype
        if n not in sk.specs:
            items.append(_Item(n, raw, rs, o, "only_in_base"))
            continue
        ss = sk.specs[n]
        _check_pair(raw, rs.dtype, rs.shape, ss.dtype, ss.shape, str(rk.path), str(sk.path))
        items.append(_Item(n, raw, rs, o, _copy_reason(n, raw, rs.dtype, pats, buffers)))
    for spec in rk.outside:
        o = odt if (odt is not None and spec.dtype.is_floating_point) else spec.dtype
        items.append(_Item(spec.name, spec.name, spec, o, "outside_key", outside=True))
    return items, [sk.raw_name(n) for n in only_s]


def _check_names_canon(rk: Checkpoint, sk: Checkpoint, allow_missing: bool) -> tuple[list[str], list[str]]:
    r_names, s_names = rk.names(), sk.names()
    ss, rs = set(s_names), set(r_names)
    only_r = [n for n in r_names if n not in ss]
    only_s = [n for n in s_names if n not in rs]
    if not allow_missing and (only_r or only_s):
        if only_r:
            n, a, b, more = rk.raw_name(only_r[0]), rk.path, sk.path, len(only_r) - 1
            hint = "--allow-missing copies such keys from the base"
        else:
            n, a, b, more = sk.raw_name(only_s[0]), sk.path, rk.path, len(only_s) - 1
            hint = "--allow-missing ignores such keys"
        raise CheckpointError(f"key {n!r}: in {a} but not in {b}" + (f" (and {more} more)" if more else "") + f"; {hint}")
    return only_r, only_s


def _groups(items: list[_Item], kind: str, rk: Checkpoint, shard_size: int | None) -> list[tuple[str, list[_Item]]]:
    """(file name inside the output, items in write order) per output file."""
    from neon_cli.checkpoint import safetensors_order

    if kind in ("torch", "pickle"):
        return [("", items)]
    by_name = {it.raw: it for it in items}

    def ordered(group: list[_Item]) -> list[_Item]:
        return [by_name[s.name] for s in safetensors_order([it.out_spec for it in group])]

    if kind == "safetensors":
        return [("", ordered(items))]
    if shard_size is not None:
        layout = shard_layout([it.out_spec for it in items], shard_size)
        names = shard_file_names(len(layout))
        return [(nm, ordered([by_name[s.name] for s in grp])) for nm, grp in zip(names, layout)]
    # follow θ_r's shards (names and membership)
    shards: dict[str, list[_Item]] = {}
    for it in items:
        shards.setdefault(rk.shards.get(it.raw if it.outside else rk.raw_name(it.name), "model.safetensors"), []).append(it)
    return [(nm, ordered(grp)) for nm, grp in shards.items()]


def _blocks(ck: Checkpoint, it: _Item, chunk: int) -> Iterator[torch.Tensor]:
    spec = it.spec
    n = spec.numel
    if n == 0:
        return
    if it.outside:
        read_all = lambda: ck.raw_tensor(it.raw)  # noqa: E731
        read_rows = lambda a, b: ck.raw_tensor(it.raw, a, b)  # noqa: E731
    else:
        read_all = lambda: ck.tensor(it.name)  # noqa: E731
        read_rows = lambda a, b: ck.rows(it.name, a, b)  # noqa: E731
    if len(spec.shape) == 0 or n <= chunk:
        yield read_all()
        return
    rows = spec.shape[0]
    per = max(1, chunk // max(1, n // rows))
    for a in range(0, rows, per):
        yield read_rows(a, min(rows, a + per))


def _run(
    stack: contextlib.ExitStack,
    items: list[_Item],
    groups: list[tuple[str, list[_Item]]],
    rk: Checkpoint,
    sk: Checkpoint,
    ws: list[float],
    outs: list[Path],
    kind: str,
    provenance: dict[str, str],
    shard_size: int | None,
    progress: ProgressFn,
    sampler: _RssSampler,
    chunk: int,
    threads: int | None,
) -> tuple[dict[str, _Stats], dict[str, list[str]], dict[str, int], list[dict[str, int]], list[_Sink]]:
    from concurrent.futures import ThreadPoolExecutor

    from neon_cli.fsutil import atomic_path

    sinks = []
    for o in outs:
        tmp = stack.enter_context(atomic_path(o))
        sinks.append(_Sink(o, tmp, kind))
    # one I/O thread writes and hashes the output blocks while this thread computes the next ones
    io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neon-merge-io")
    stack.callback(io.shutdown)
    work = _Workspace()
    stats: dict[str, _Stats] = {}
    copied: dict[str, list[str]] = {}
    differs: set[str] = set()
    nonfinite_kept: dict[str, int] = {}
    nonfinite_out: list[dict[str, int]] = [{} for _ in ws]
    done = 0
    total = len(items)

    raws: list[RawTensorFile] = []
    if kind in ("torch", "pickle"):
        for sink in sinks:
            raw_path = sink.tmp.with_name(sink.tmp.name + ".raw")
            rf = RawTensorFile(raw_path)
            raws.append(rf)
            stack.callback(_unlink, raw_path)
            stack.callback(rf.abort)
    if kind == "sharded":
        for sink in sinks:
            sink.tmp.mkdir(parents=True, exist_ok=False)
    weight_map: dict[str, str] = {}
    shard_sha: list[dict[str, str]] = [{} for _ in sinks]
    closing: list[tuple[int, str, Any]] = []
    all_writers: list[list[SafetensorsWriter]] = [[] for _ in sinks]

    with _torch_threads(threads):
        for fname, group in groups:
            writers: list[SafetensorsWriter] = []
            if kind in ("safetensors", "sharded"):
                specs = [it.out_spec for it in group]
                for k, (w, sink) in enumerate(zip(ws, sinks)):
                    meta = _st_metadata(rk, fname, provenance, w, kind)
                    path = sink.tmp if kind == "safetensors" else sink.tmp / fname
                    wr = SafetensorsWriter(path, specs, meta, io=io)
                    stack.callback(wr.abort)
                    writers.append(wr)
                    all_writers[k].append(wr)
            for it in group:
                weight_map[it.raw] = fname
                targets: list[Any] = writers if writers else raws
                if not writers:
                    for rf in raws:
                        rf.begin(it.out_spec)
                st = None
                if it.reason is None:
                    st = stats[it.raw] = _Stats(len(ws))
                    s_iter = _blocks(sk, it, chunk)
                    for rb in _blocks(rk, it, chunk):
                        sb = next(s_iter)
                        res = _merge_block(rb, sb, ws, it.out_dtype, st, work)
                        sampler.sample()
                        for tgt, t in zip(targets, res):
                            tgt.write(it.raw, t)
                    if st.all_equal:
                        copied.setdefault("equal", []).append(it.raw)
                        del stats[it.raw]
                    elif st.n_nonfinite_in:
                        nonfinite_kept[it.raw] = st.n_nonfinite_in
                    for k in range(len(ws)):
                        if st.n_nonfinite_out[k]:
                            nonfinite_out[k][it.raw] = st.n_nonfinite_out[k]
                else:
                    copied.setdefault(it.reason, []).append(it.raw)
                    s_iter = _blocks(sk, it, chunk) if it.reason not in ("only_in_base", "outside_key") else None
                    for rb in _blocks(rk, it, chunk):
                        if s_iter is not None:
                            sb = next(s_iter)
                            if it.raw not in differs and not _bits_equal(rb.contiguous(), sb.contiguous()):
                                differs.add(it.raw)
                        t = rb if it.out_dtype == rb.dtype else rb.to(it.out_dtype)
                        for tgt in targets:
                            tgt.write(it.raw, t)
                done += 1
                progress("merge", done, total, unit="tensor")
            for k, wr in enumerate(writers):  # flush + fsync on the I/O thread, overlapping the next group
                closing.append((k, fname, wr.close_async()))
    for k, fname, wait in closing:
        digest = wait()  # sha256 computed while writing: no re-read
        if kind == "safetensors":
            sinks[k].sha256 = digest
        else:
            shard_sha[k][fname] = digest
    for k, sink in enumerate(sinks):
        sink.bytes += sum(wr.bytes_written for wr in all_writers[k])

    if kind == "sharded":
        for k, (w, sink) in enumerate(zip(ws, sinks)):
            _finish_sharded(sink, rk, weight_map, items, provenance, w, shard_sha[k])
    elif kind in ("torch", "pickle"):
        for k, (w, sink) in enumerate(zip(ws, sinks)):
            _finish_torch(sink, rk, raws[k], items, provenance, w)
    copied["_differs"] = sorted(differs)
    return stats, copied, nonfinite_kept, nonfinite_out, sinks


def _unlink(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


def _st_metadata(rk: Checkpoint, fname: str, provenance: dict[str, str], w: float, kind: str) -> dict[str, str]:
    if rk.layout == "sharded" and kind == "sharded" and fname in rk.shard_metadata:
        meta = dict(rk.shard_metadata[fname])
    elif rk.layout in ("safetensors", "sharded"):
        meta = dict(rk.metadata)
    else:
        meta = {}
    meta = {k: v for k, v in meta.items() if not k.startswith("neon.")}
    meta.setdefault("format", "pt")
    meta.update(provenance)
    meta["neon.w"] = _w_text(w)
    return meta


def _finish_sharded(sink: _Sink, rk: Checkpoint, weight_map: dict[str, str], items: list[_Item], provenance: dict[str, str], w: float, shard_sha: dict[str, str]) -> None:
    total = sum(it.out_spec.nbytes for it in items)
    extra = {k: v for k, v in rk.index_metadata.items() if k not in ("total_size", "neon")}
    extra["neon"] = {**provenance, "neon.w": _w_text(w)}
    idx = index_json(weight_map, total, extra)
    (sink.tmp / INDEX_NAMES[0]).write_text(json.dumps(idx, indent=2) + "\n")
    if rk.layout == "sharded" and rk.path.is_dir():
        shard_files = set(rk.shards.values())
        for f in sorted(rk.path.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name not in shard_files and not f.name.endswith(".index.json"):
                shutil.copy2(f, sink.tmp / f.name)
    # the digest of fsutil.sha256_path (relative names), reusing the shard digests computed while writing
    sink.sha256 = sha256_tree(sink.tmp, {sink.tmp / name: d for name, d in shard_sha.items()})
    for f in sink.tmp.iterdir():
        if f.name not in shard_sha:  # shards were fsynced by their writer
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            sink.bytes += f.stat().st_size


def _finish_torch(sink: _Sink, rk: Checkpoint, rf: RawTensorFile, items: list[_Item], provenance: dict[str, str], w: float) -> None:
    from neon_cli.fsutil import sha256_file

    merged = rf.tensors()
    prov = {**provenance, "neon.w": _w_text(w)}
    if rk.layout in ("torch", "pickle"):
        sd_in = rk.state_dict
        assert sd_in is not None
        sd: Any = OrderedDict()
        for k, v in sd_in.items():
            sd[k] = merged.get(k, v) if isinstance(v, torch.Tensor) else v
        if hasattr(sd_in, "_metadata"):
            sd._metadata = sd_in._metadata  # type: ignore[attr-defined]
        if rk.module is not None:
            rk.module.load_state_dict(sd, strict=True, assign=True)
            sd = rk.module
        if rk.key is None:
            obj: Any = sd
        else:
            obj = replace_in_container(rk.container, rk.key, sd)
            if isinstance(obj, dict):
                obj["neon_provenance"] = prov
    else:  # safetensors/sharded base written as a flat .pt state dict
        obj = OrderedDict((it.raw, merged[it.raw]) for it in items)
    if sink.kind == "pickle":
        import pickle

        with open(sink.tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        torch.save(obj, sink.tmp)
    sink.bytes = sink.tmp.stat().st_size
    sink.sha256 = sha256_file(sink.tmp)


def _fill_results(
    results: dict[str, Any],
    items: list[_Item],
    stats: dict[str, _Stats],
    copied: dict[str, list[str]],
    nonfinite_kept: dict[str, int],
    nonfinite_out: list[dict[str, int]],
    ws: list[float],
    sinks: list[_Sink],
    odt: torch.dtype | None,
    rk: Checkpoint,
) -> None:
    differs = copied.pop("_differs", [])
    dd = sum(s.dd for s in stats.values())
    rr = sum(s.rr for s in stats.values())
    numel = sum(s.numel for s in stats.values())
    n_eq = sum(s.n_equal for s in stats.values())
    per_tensor = []
    specs = {it.raw: it for it in items}
    for name, s in stats.items():
        it = specs[name]
        per_tensor.append(
            {
                "name": name,
                "dtype": dtype_name(it.spec.dtype),
                "out_dtype": dtype_name(it.out_dtype),
                "shape": list(it.spec.shape),
                "equal_fraction": s.n_equal / s.numel if s.numel else None,
                "delta_norm": math.sqrt(s.dd),
                "relative_delta": math.sqrt(s.dd) / math.sqrt(s.rr) if s.rr > 0 else None,
                "effective_w": [s.num[k] / s.dd if s.dd > 0 else None for k in range(len(ws))],
                "nonfinite_kept": s.n_nonfinite_in,
            }
        )
    most = sorted(per_tensor, key=lambda t: -(t["relative_delta"] or 0.0))[:10]
    eff = [sum(s.num[k] for s in stats.values()) / dd if dd > 0 else None for k in range(len(ws))]
    out_dtypes = sorted({dtype_name(specs[n].out_dtype) for n in stats})
    half_out = any(specs[n].out_dtype in _HALF for n in stats)
    eq_frac = n_eq / numel if numel else None
    rel_err = max((abs(e / w - 1.0) for e, w in zip(eff, ws) if e is not None and w != 0), default=0.0)
    suggest = None
    if half_out and ((eq_frac or 0.0) >= SUGGEST_EQUAL_FRACTION or rel_err >= SUGGEST_REL_W_ERROR):
        suggest = "float32"
    counts = {r: len(v) for r, v in copied.items()}
    results.update(
        {
            "merged": len(stats),
            "copied": counts,
            "copied_names": copied,
            "copy_reasons": {r: COPY_REASONS[r] for r in counts},
            "copied_but_different": differs,
            "delta_norm": math.sqrt(dd),
            "base_norm": math.sqrt(rr),
            "relative_delta": math.sqrt(dd) / math.sqrt(rr) if rr > 0 else None,
            "most_changed": most,
            "precision": {
                "output_dtypes": out_dtypes,
                "equal_fraction": eq_frac,
                "effective_w": eff,
                "max_relative_w_error": rel_err,
                "suggest_dtype": suggest,
            },
            "nonfinite_kept": nonfinite_kept,
            "nonfinite_results": [{"w": w, "tensors": nf} for w, nf in zip(ws, nonfinite_out)],
            "outputs": [{"w": w, "path": str(s.final), "sha256": s.sha256, "bytes": s.bytes} for w, s in zip(ws, sinks)],
            "tensors": per_tensor,
        }
    )
