"""Neon's merge θ_Neon = θ_r − w (θ_s − θ_r): in memory, and streaming between checkpoint files.

Paper: Alemohammad, Wang, Baraniuk, "Neon", ICLR 2026, Algorithm 1 (last step) and App. C:
θ_r is the base model, θ_s the model briefly fine-tuned on its own samples, w > 0 the
extrapolation weight (w < 0 interpolates towards θ_s).

Semantics (the same for :func:`merge_state_dicts` and :func:`merge_checkpoints`):

* a floating-point tensor is merged as ``θ_r + w·(θ_r − θ_s)`` computed in float32 (float64 when
  θ_r or the output is float64): ``d = θ_r − θ_s``, then ``w·d`` and ``+ θ_r``, each rounded once
  to float32 (w rounded to float32, as torch does for a float32 tensor), then cast to θ_r's dtype
  or ``out_dtype`` with round-to-nearest-even. This form never overflows in half precision
  ((1+w)·θ_r does for |θ_r| > 65504/(1+w) in float16). The file merge computes with numpy (no
  torch: exact bfloat16/float16 conversions, bit-identical to torch's, tested against it); the
  in-memory one with torch on the tensors' device; both give the same bits;
* copied from θ_r bit for bit (reason in brackets, as listed in the report):
  non-floating tensors (``non_float``); tensors equal in both inputs (``equal``: fixed buffers,
  ±inf attention masks); BatchNorm running statistics (``batchnorm_stats``); names the caller
  declares buffers (``buffer``); names matched by an ``exclude`` regex (``excluded``,
  ``re.search`` on the stored name); names only θ_r has, with ``allow_missing``
  (``only_in_base``); for safetensors files merged with ``--key``, tensors outside the key
  (``outside_key``). ``out_dtype`` still casts copied floating tensors;
* elementwise, where θ_r or θ_s is non-finite the output keeps θ_r's entry;
* key sets, shapes and dtypes must match (:class:`~neon_cli.errors.CheckpointError` naming the
  key); with ``allow_missing`` names only in θ_r are copied and names only in θ_s are ignored.

Precision statistics: for every merged tensor the share of elements equal in both inputs,
‖θ_s − θ_r‖, ‖θ_s − θ_r‖/‖θ_r‖, and per w the *effective* w realised after rounding the output,
the least-squares ``w_eff = <out − θ_r, θ_r − θ_s> / ‖θ_r − θ_s‖²``, each over finite entries.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from neon_cli.checkpoint import (
    CHUNK_ELEMENTS,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    Checkpoint,
    SafetensorsWriter,
    TensorSpec,
    components,
    dtype_info,
    dtype_name,
    human_bytes,
    index_json,
    is_weight_file,
    open_checkpoint,
    parse_dtype,
    safetensors_order,
    sha256_tree,
    shard_file_names,
    shard_layout,
    weights_file,
)
from neon_cli.errors import CheckpointError, UsageError
from neon_cli.progress import ProgressFn, null_progress

if TYPE_CHECKING:
    from neon_cli.requests import MergeRequest

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

_HALF = ("float16", "bfloat16")
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


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


def _copy_reason(name: str, raw: str, dtype: str, exclude: list[re.Pattern[str]], buffers: Collection[str]) -> str | None:
    info = dtype_info(dtype)
    if info.kind == "c":
        raise CheckpointError(f"key {raw!r}: complex tensors are not supported")
    if any(p.search(raw) or p.search(name) for p in exclude):
        return "excluded"
    if is_bn_stat(name):
        return "batchnorm_stats"
    if not info.is_floating:
        return "non_float"
    if name in buffers or raw in buffers:
        return "buffer"
    return None


def _compute_dtype(r_dtype: str, out_dtype: str) -> str:
    return "float64" if "float64" in (r_dtype, out_dtype) else "float32"


def _check_w(w: Any) -> float:
    from neon_cli.validate import finite

    return finite("--w", w)


# ----------------------------------------------------------------------------------------------
# exact conversions between stored bits and float32 (numpy)


def _to_compute(bits: np.ndarray, dtype: str, cdt: str, buf: np.ndarray | None) -> np.ndarray:
    """``bits`` (stored as ``dtype``) as a float32/float64 array (exact: every stored value is representable)."""
    if dtype == cdt:
        return bits
    if dtype == "bfloat16" and cdt == "float32":
        u = buf.view(np.uint32) if buf is not None else np.empty(bits.shape, np.uint32)
        np.left_shift(bits, 16, out=u, dtype=np.uint32, casting="unsafe")
        return u.view(np.float32)
    if dtype == "bfloat16":  # to float64 through float32
        return _to_compute(bits, "bfloat16", "float32", None).astype(np.float64)
    if dtype.startswith("float8"):
        return _f8_to(bits, dtype, cdt)
    out = buf.view(np.dtype("<f8" if cdt == "float64" else "<f4")) if buf is not None else None
    if out is not None:
        np.copyto(out, bits, casting="unsafe")
        return out
    return bits.astype(np.float64 if cdt == "float64" else np.float32)


def f32_to_bf16(x: np.ndarray, tmp: np.ndarray | None = None, back: np.ndarray | None = None,
                nan: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 -> bfloat16 bits with round-to-nearest-even (torch's ``c10::round_to_nearest_even``:
    ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``); NaN becomes 0x7FC0. Returns (uint16 bits, and when
    ``back`` is given, the bfloat16 values widened back to float32 in ``back``). ``nan=False``
    skips the NaN pass when the caller knows ``x`` has none."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    t = tmp if tmp is not None else np.empty(u.shape, np.uint32)
    np.right_shift(u, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(t, u, out=t)
    out = np.empty(u.shape, np.uint16)
    np.right_shift(t, 16, out=out, casting="unsafe")
    if nan:  # the caller may know there is none (finite inputs give finite or ±inf results)
        isnan = np.isnan(x)
        if isnan.any():
            out[isnan] = 0x7FC0
            t[isnan] = 0x7FC00000
    if back is not None:
        np.bitwise_and(t, np.uint32(0xFFFF0000), out=back.view(np.uint32))
    return out, back


def _from_compute(x: np.ndarray, dtype: str, tmp: np.ndarray | None, back: np.ndarray | None,
                  nan: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """float32/float64 ``x`` as new bits of ``dtype`` (round-to-nearest-even), and the stored
    values widened back into ``back`` (for the statistics) when given."""
    if dtype == "bfloat16":
        if x.dtype == np.float64:
            x = x.astype(np.float32)  # torch rounds double -> bfloat16 through float as well
        return f32_to_bf16(x, tmp, back, nan)
    if dtype.startswith("float8"):
        out = _f8_from(x, dtype)
        if back is not None:
            np.copyto(back, _f8_to(out, dtype, "float64" if back.dtype == np.float64 else "float32"))
        return out, back
    nd = np.dtype(dtype_info(dtype).numpy)
    out = x.astype(nd)  # always a new array: x may be a reused workspace buffer
    if back is not None:
        np.copyto(back, out, casting="unsafe")
    return out, back


def _f8_to(bits: np.ndarray, dtype: str, cdt: str) -> np.ndarray:  # float8: through torch (rare)
    import torch

    t = torch.from_numpy(np.ascontiguousarray(bits).copy()).view(getattr(torch, dtype))
    return t.to(torch.float64 if cdt == "float64" else torch.float32).numpy()


def _f8_from(x: np.ndarray, dtype: str) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype))
    return t.view(torch.uint8).numpy().copy()


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.size == 0:
        return True
    u = _UINT.get(a.dtype.itemsize)
    if u is None:  # complex128
        return a.tobytes() == b.tobytes()
    return bool(np.array_equal(a.reshape(-1).view(u), b.reshape(-1).view(u)))


# ----------------------------------------------------------------------------------------------
# the arithmetic (numpy, one block)


class _Stats:
    """Accumulators for one merged tensor (over its row blocks)."""

    __slots__ = ("numel", "n_equal", "n_nonfinite_in", "dd", "rr", "num", "n_nonfinite_out", "n_cast_only", "all_equal")

    def __init__(self, nw: int):
        self.numel = 0
        self.n_equal = 0
        self.n_nonfinite_in = 0
        self.dd = 0.0
        self.rr = 0.0
        self.num = [0.0] * nw
        self.n_nonfinite_out = [0] * nw
        #: per w, how many of the non-finite results were finite in the compute dtype (float32):
        #: they overflowed only when cast to the output dtype (fp16 / bf16), so --dtype float32 helps
        self.n_cast_only = [0] * nw
        self.all_equal = True


class _Workspace:
    """Reusable scratch buffers (no allocation or page faults per block)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, str], np.ndarray] = {}

    def buf(self, slot: int, n: int, dtype: Any) -> np.ndarray:
        key = (slot, np.dtype(dtype).str)
        b = self._bufs.get(key)
        if b is None or b.size < n:
            b = self._bufs[key] = np.empty(max(n, 1), dtype=dtype)
        return b[:n]


def _merge_block(r: np.ndarray, s: np.ndarray, dtype: str, ws: Sequence[float], out_dtype: str, st: _Stats | None,
                 work: _Workspace | None = None) -> list[np.ndarray]:
    """Merge one block (bits of ``dtype``, any shape) for every w; one new bits array per w in
    ``out_dtype`` (never aliasing ``work``). A block equal in both inputs comes back as θ_r's bits
    (cast only if ``out_dtype`` differs). Updates ``st`` when given."""
    shape = r.shape
    r = np.ascontiguousarray(r).reshape(-1)
    s = np.ascontiguousarray(s).reshape(-1)
    n = r.size
    cdt = _compute_dtype(dtype, out_dtype)
    fdt = np.float64 if cdt == "float64" else np.float32
    work = work or _Workspace()
    r32 = _to_compute(r, dtype, cdt, work.buf(0, n, fdt))
    s32 = _to_compute(s, dtype, cdt, work.buf(1, n, fdt))
    d = np.subtract(r32, s32, out=work.buf(2, n, fdt))  # θ_r − θ_s
    dd = float(np.dot(d, d)) if n else 0.0
    nf = None
    n_nf = 0
    if math.isfinite(dd):
        nz = int(np.count_nonzero(d.view(_UINT[d.itemsize]))) if n else 0
        equal = nz == 0
    else:  # some entry of θ_r or θ_s is ±inf/NaN (or d overflowed): keep θ_r there
        nf = ~np.isfinite(d)
        n_nf = int(nf.sum())
        d[nf] = 0.0
        dd = float(np.dot(d.astype(np.float64), d.astype(np.float64)))
        nz = int(np.count_nonzero(d))
        equal = nz == 0 and _bits_equal(r, s)
    if st is not None:
        if nf is None:
            st.rr += float(np.dot(r32, r32))
        else:
            rm = np.where(nf, 0.0, r32)
            st.rr += float(np.dot(rm, rm))
        st.numel += n
        st.n_nonfinite_in += n_nf
    if equal:
        if st is not None:
            st.n_equal += n - n_nf
        same = r if out_dtype == dtype else _from_compute(r32, out_dtype, None, None)[0]
        return [same.reshape(shape)] * len(ws)
    if st is not None:
        st.all_equal = False
        st.n_equal += n - nz - n_nf
        st.dd += dd
    r_out = None
    outs = []
    tmp = work.buf(3, n, np.uint32) if out_dtype == "bfloat16" else None
    back = work.buf(4, n, fdt) if st is not None else None
    for k, w in enumerate(ws):
        o = np.multiply(d, fdt(w), out=np.empty(n, fdt) if out_dtype == cdt else work.buf(5, n, fdt))
        np.add(o, r32, out=o)  # θ_r + w (θ_r − θ_s)
        if out_dtype == cdt:
            oc = o
            if back is not None:
                np.copyto(back, o)
        else:
            oc, _ = _from_compute(o, out_dtype, tmp, back, nan=nf is not None)
        if nf is not None:
            if r_out is None:
                r_out = r if out_dtype == dtype else _from_compute(r32, out_dtype, None, None)[0]
            oc = np.where(nf, r_out, oc)
            if back is not None:
                np.copyto(back, r32, where=nf)
        if st is not None:
            diff = np.subtract(back, r32, out=back)  # the update realised after rounding
            num = float(np.dot(diff, d))
            if not math.isfinite(num):  # rare: only a block with a non-finite result pays for this
                bad = ~np.isfinite(diff)
                diff[bad] = 0.0
                num = float(np.dot(diff, d))
                if nf is not None:
                    bad &= ~nf  # entries kept from θ_r (non-finite in an input) are not new results
                st.n_nonfinite_out[k] += int(bad.sum())
                st.n_cast_only[k] += int(np.isfinite(o[bad]).sum())
            st.num[k] += num
        outs.append(oc.reshape(shape))
    return outs


# ----------------------------------------------------------------------------------------------
# in memory (torch tensors, any device)


def merge_state_dicts(
    base: Mapping[str, Any],
    selftrained: Mapping[str, Any],
    w: float,
    *,
    exclude: Sequence[str] = (),
    buffers: Collection[str] = (),
    allow_missing: bool = False,
    out_dtype: Any = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """θ_Neon = θ_r − w (θ_s − θ_r) for two in-memory state dicts; no file I/O (used by tune-w and eval).

    ``base`` (θ_r) and ``selftrained`` (θ_s): name -> torch tensor or ``nn.Parameter`` (any
    device; same names, shapes and dtypes). ``w``: extrapolation weight (the paper's w, typically
    0.5-2). Returns a new dict in ``base``'s key order, dtypes of ``base`` (or ``out_dtype`` for
    floating tensors), plain tensors (parameters detached). Copied entries are ``base``'s own
    tensors unless a cast is needed. Raises CheckpointError naming the key on a key/shape/dtype
    mismatch, UsageError on an invalid ``exclude`` regex or ``w``, and (unless ``allow_nonfinite``)
    UsageError naming the first tensor whose result has a new inf/NaN (finite in both inputs), as
    :func:`merge_checkpoints` refuses without ``--allow-nonfinite``: tune-w and eval then stop with
    exit 2 naming the tensor and w (no candidate is scored on a broken model).
    Source: paper Algorithm 1 and App. C; the same bits as :func:`merge_checkpoints`.
    """
    import torch

    w = _check_w(w)
    odt_all = parse_dtype(out_dtype)
    pats = _compile_exclude(exclude)
    _check_names(list(base), list(selftrained), "base", "selftrained", allow_missing)
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, r in base.items():
            if not isinstance(r, torch.Tensor):
                raise CheckpointError(f"key {name!r}: not a tensor in base ({type(r).__name__})")
            r = r.detach()
            if type(r) is not torch.Tensor:
                r = r.as_subclass(torch.Tensor)
            s = selftrained.get(name)
            rdt = dtype_name(r.dtype)
            odt = odt_all if (odt_all is not None and r.is_floating_point()) else rdt
            if s is None:
                reason = "only_in_base"
            else:
                if not isinstance(s, torch.Tensor):
                    raise CheckpointError(f"key {name!r}: not a tensor in selftrained ({type(s).__name__})")
                _check_pair(name, rdt, tuple(r.shape), dtype_name(s.dtype), tuple(s.shape), "base", "selftrained")
                reason = _copy_reason(name, name, rdt, pats, buffers)
                s = s.detach().to(r.device)
            if reason is None and not torch.equal(r, s):
                out[name] = _merge_torch(r, s, w, getattr(torch, odt), None if allow_nonfinite else name)
            else:
                out[name] = base[name] if (odt == rdt and type(base[name]) is torch.Tensor) else r.to(getattr(torch, odt))
    return out


def _merge_torch(r: Any, s: Any, w: float, out_dtype: Any, refuse_as: str | None = None) -> Any:
    """The numpy kernel's arithmetic in torch: float32 (float64) d = r − s, w·d, + r, cast.
    ``refuse_as``: the tensor's name, to raise UsageError when the result has a new non-finite entry."""
    import torch

    cdt = torch.float64 if torch.float64 in (r.dtype, out_dtype) else torch.float32
    r32, s32 = r.to(cdt), s.to(cdt)
    d = r32 - s32
    o = torch.mul(d, w).add_(r32)
    oc = o.to(out_dtype)
    nf = ~torch.isfinite(d)
    if bool(nf.any()):
        oc = torch.where(nf, r.to(out_dtype), oc)
    if refuse_as is not None and oc.is_floating_point():
        bad = ~torch.isfinite(oc) & ~nf  # entries kept from θ_r (non-finite in an input) are not new results
        if bool(bad.any()):
            n_bad, n_cast_only = int(bad.sum()), int(torch.isfinite(o[bad]).sum())
            text = _nonfinite_text(refuse_as, w, n_bad, n_cast_only, dtype_name(out_dtype), dtype_name(cdt), "out_dtype=", "w")
            raise UsageError(f"{text}; this merged model is not scored or written")
    return oc


def _check_pair(name: str, rd: str, rs: tuple, sd: str, ss: tuple, rlabel: str, slabel: str) -> None:
    if rs != ss:
        raise CheckpointError(f"key {name!r}: shape {list(rs)} in {rlabel} but {list(ss)} in {slabel}")
    if rd != sd:
        raise CheckpointError(f"key {name!r}: dtype {rd} in {rlabel} but {sd} in {slabel}")


def _check_names(r_names: list[str], s_names: list[str], rlabel: str, slabel: str, allow_missing: bool) -> tuple[list[str], list[str]]:
    rs, ss = set(r_names), set(s_names)
    only_r = [n for n in r_names if n not in ss]
    only_s = [n for n in s_names if n not in rs]
    if not allow_missing:
        if only_r:
            raise CheckpointError(
                f"key {only_r[0]!r}: in {rlabel} but not in {slabel}" + (f" (and {len(only_r) - 1} more)" if len(only_r) > 1 else "")
                + "; --allow-missing copies such keys from the base")
        if only_s:
            raise CheckpointError(
                f"key {only_s[0]!r}: in {slabel} but not in {rlabel}" + (f" (and {len(only_s) - 1} more)" if len(only_s) > 1 else "")
                + "; --allow-missing ignores such keys")
    return only_r, only_s


# ----------------------------------------------------------------------------------------------
# files: plan


@dataclass
class _Item:
    name: str  # canonical (wrapper prefix stripped)
    raw: str  # the key as stored in θ_r: the output key
    spec: TensorSpec  # θ_r's
    out_dtype: str
    reason: str | None  # None: merge
    outside: bool = False  # a safetensors tensor outside --key (read by raw name)
    s_raw: str | None = None

    @property
    def out_spec(self) -> TensorSpec:
        return TensorSpec(self.raw, self.out_dtype, self.spec.shape)


def output_kind(path: Path, shard_size: int | None) -> str:
    """``"safetensors"``, ``"torch"``, ``"pickle"`` or ``"sharded"`` (a folder) for an output path."""
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


def _plan(rk: Checkpoint, sk: Checkpoint, pats: list[re.Pattern[str]], buffers: Collection[str], allow_missing: bool,
          odt: str | None) -> tuple[list[_Item], list[str]]:
    r_names = rk.names()
    _, only_s = _check_names_canon(rk, sk, allow_missing)
    items: list[_Item] = []
    for n in r_names:
        rs = rk.specs[n]
        raw = rk.raw_name(n)
        o = odt if (odt is not None and dtype_info(rs.dtype).is_floating) else rs.dtype
        if n not in sk.specs:
            items.append(_Item(n, raw, rs, o, "only_in_base"))
            continue
        ss = sk.specs[n]
        _check_pair(raw, rs.dtype, rs.shape, ss.dtype, ss.shape, str(rk.path), str(sk.path))
        items.append(_Item(n, raw, rs, o, _copy_reason(n, raw, rs.dtype, pats, buffers), s_raw=sk.raw_name(n)))
    for spec in rk.outside:
        o = odt if (odt is not None and dtype_info(spec.dtype).is_floating) else spec.dtype
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


def _blocks(ck: Checkpoint, raw: str, spec: TensorSpec, chunk: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first row, end row, bits) blocks of tensor ``raw`` along dim 0 (whole for 0-d/small)."""
    n = spec.numel
    if n == 0:
        return
    arr = ck.raw_array(raw)
    if len(spec.shape) == 0 or n <= chunk:
        yield 0, (spec.shape[0] if spec.shape else 1), arr
        return
    rows = spec.shape[0]
    per = max(1, chunk // max(1, n // rows))
    for a in range(0, rows, per):
        b = min(rows, a + per)
        yield a, b, arr[a:b]


# ----------------------------------------------------------------------------------------------
# files: sinks (one per output and per file of it)


class _Sink:
    """One output (one w): its final path, temporary path, layout, and the writers of its files."""

    def __init__(self, final: Path, tmp: Path, kind: str):
        self.final, self.tmp, self.kind = final, tmp, kind
        self.sha256: str | None = None
        self.bytes = 0
        self.writers: dict[str, Any] = {}  # file name inside the output -> writer
        self.digests: dict[Path, str] = {}


class _RawTensorFile:
    """A scratch file of tensor bytes that becomes memory-mapped torch tensors (flat ``.pt``
    outputs of a safetensors base: ``torch.save`` then writes them straight from the page cache)."""

    ALIGN = 64

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "wb")
        self._pos = 0
        self._entries: dict[str, tuple[int, TensorSpec]] = {}

    def begin(self, spec: TensorSpec) -> None:
        pad = -self._pos % self.ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self._pos += pad
        self._entries[spec.name] = (self._pos, spec)

    def write(self, name: str, data: np.ndarray) -> None:
        buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        self._fh.write(buf)
        self._pos += len(buf)

    def tensors(self) -> dict[str, Any]:
        import torch

        from neon_cli.checkpoint.core import to_torch_dtype

        self._fh.flush()
        self._fh.close()
        out: dict[str, Any] = {}
        storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self._pos) if self._pos else None
        for name, (off, spec) in self._entries.items():
            dt = to_torch_dtype(spec.dtype)
            if spec.nbytes == 0 or storage is None:
                out[name] = torch.empty(spec.shape, dtype=dt)
                continue
            out[name] = torch.empty(0, dtype=dt).set_(storage[off: off + spec.nbytes], 0, spec.shape)
        return out

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _unlink(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


def _w_text(w: float) -> str:
    return repr(float(w))


def _versions() -> dict[str, str]:
    from importlib import metadata

    from neon_cli import __version__

    v = {"neon": __version__, "numpy": np.__version__}
    for dist in ("torch", "safetensors"):
        with contextlib.suppress(Exception):
            v[dist] = metadata.version(dist)
    return v


class _RssSampler:
    """Peak anonymous resident memory (``RssAnon`` in /proc/self/status), sampled by the caller.

    ``RssAnon`` excludes file-backed pages (the memory-mapped inputs, reclaimable page cache), so
    it measures what the merge itself allocates. None where /proc is unavailable.
    """

    def __init__(self) -> None:
        self.peak: int | None = None
        self.blocks = 0  # blocks merged so far (the caller samples every 64th)
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


# ----------------------------------------------------------------------------------------------
# files: one pair of weight files -> the same weights for every w


@dataclass
class _PairResult:
    stats: dict[str, _Stats] = field(default_factory=dict)
    copied: dict[str, list[str]] = field(default_factory=dict)
    differs: set[str] = field(default_factory=set)
    nonfinite_kept: dict[str, int] = field(default_factory=dict)
    nonfinite_out: list[dict[str, int]] = field(default_factory=list)
    items: list[_Item] = field(default_factory=list)


def _shard_stem(rk: Checkpoint) -> str:
    """``model`` or ``diffusion_pytorch_model``: the stem of θ_r's weight files (neon's shard names use it)."""
    idx = getattr(rk, "index_file", None) or next((f for f in rk.files if f.name.endswith(".index.json")), None)
    name = idx.name if idx is not None else rk.path.name
    return "diffusion_pytorch_model" if name.startswith("diffusion_pytorch_model") else "model"


def _pair_outputs(rk: Checkpoint, kind: str, shard_size: int | None, items: list[_Item]) -> list[tuple[str, list[_Item]]]:
    """(file name inside the output folder, items in write order) per output file."""
    by_name = {it.raw: it for it in items}

    def ordered(group: list[_Item]) -> list[_Item]:
        return [by_name[s.name] for s in safetensors_order([it.out_spec for it in group])]

    if kind in ("torch", "pickle", "patched"):
        return [("", items)]
    if kind == "safetensors":
        return [("", ordered(items))]
    stem = _shard_stem(rk)
    if shard_size is not None or not rk.shards:
        layout = shard_layout([it.out_spec for it in items], shard_size or (1 << 62))
        names = shard_file_names(len(layout), stem)
        return [(nm, ordered([by_name[s.name] for s in grp])) for nm, grp in zip(names, layout)]
    # θ_r's shard membership, in θ_r's shard order, under neon's own names
    groups: dict[str, list[_Item]] = {}
    for it in items:
        groups.setdefault(rk.shards.get(it.raw, ""), []).append(it)
    names = shard_file_names(len(groups), stem)
    return [(nm, ordered(groups[g])) for nm, g in zip(names, sorted(groups))]


@dataclass
class _PairContext:
    """How every pair of one merge is written: the weights, the pair's layout (:func:`_pair_kind`),
    the provenance metadata, ``shard_size``, progress, the memory sampler, block size, the output
    I/O thread, the clean-up stack, the progress task name and ``allow_nonfinite``."""

    ws: list[float]
    kind: str
    provenance: dict[str, str]
    shard_size: int | None
    progress: ProgressFn
    sampler: _RssSampler
    chunk: int
    io: Any
    stack: contextlib.ExitStack
    task: str = "merge"
    allow_nonfinite: bool = False


@dataclass
class _PairSinks:
    """The open outputs of one pair: θ_r's patched copies or flat-.pt scratch files (one per w),
    the current file's safetensors writers, and per w what was written."""

    patched: list[Any]
    raws: list[_RawTensorFile]
    written: list[dict[str, Any]]
    writers: list[Any] = field(default_factory=list)


def _merge_pair(rk: Checkpoint, sk: Checkpoint, items: list[_Item], targets: list[Path],
                ctx: _PairContext) -> tuple[_PairResult, list[dict[str, Any]]]:
    """Write the merged weights of one pair to ``targets`` (one per w: a file, or for ``sharded``
    a folder that gets the shards and the index). Returns the statistics and, per w, what was
    written: ``{"writers": [...], "index": path or None, "digests": {path: sha256}}``.

    Unless ``ctx.allow_nonfinite``, the first merged tensor with a new non-finite element (finite in
    both inputs, inf/NaN in the result: a huge ``w``, or an fp16 overflow) raises UsageError
    naming it (:func:`_nonfinite_error`); the caller's clean-up removes every partial output."""
    res = _PairResult(items=items, nonfinite_out=[{} for _ in ctx.ws])
    sinks = _open_pair_sinks(rk, items, targets, ctx)
    work = _Workspace()
    done, weight_map, closing = 0, {}, []
    for fname, group in _pair_outputs(rk, ctx.kind, ctx.shard_size, items):
        sinks.writers = _open_writers(rk, fname, group, targets, ctx, sinks)
        for it in group:
            weight_map[it.raw] = fname
            for rf in sinks.raws:
                rf.begin(it.out_spec)
            if it.reason is None:
                _merge_item(rk, sk, it, res, sinks, ctx, work)
            else:
                _copy_item(rk, sk, it, res, sinks, ctx)
            done += 1
            ctx.progress(ctx.task, done, len(items), unit="tensor")
        for k, wr in enumerate(sinks.writers):  # flush + fsync on the I/O thread while the next group is merged
            closing.append((k, wr.path, wr.close_async()))
    for k, path, wait in closing:
        digest = wait()
        if digest is not None:
            sinks.written[k]["digests"][path] = digest
    for k, t in enumerate(targets):
        if sinks.patched:
            sinks.patched[k].close()
        elif sinks.raws:
            _finish_flat_pt(t, sinks.raws[k], items)
    if ctx.kind == "sharded":
        _write_indexes(rk, items, weight_map, targets, ctx, sinks.written)
    return res, sinks.written


def _open_pair_sinks(rk: Checkpoint, items: list[_Item], targets: list[Path], ctx: _PairContext) -> _PairSinks:
    """A patched copy of θ_r per w (``patched``) or a scratch tensor file per w (flat ``torch``)."""
    sinks = _PairSinks([], [], [{"writers": [], "index": None, "digests": {}} for _ in ctx.ws])
    if ctx.kind == "patched":
        from neon_cli.checkpoint.torchfile import PatchedCopy, check_disjoint

        check_disjoint(rk, [it.raw for it in items if it.reason is None], [it.raw for it in items if it.reason is not None])
        for t in targets:
            pc = PatchedCopy(rk, t)  # type: ignore[arg-type]
            ctx.stack.callback(pc.abort)
            sinks.patched.append(pc)
    elif ctx.kind == "torch":
        for t in targets:
            rf = _RawTensorFile(t.with_name(t.name + ".raw"))
            ctx.stack.callback(_unlink, rf.path)
            ctx.stack.callback(rf.abort)
            sinks.raws.append(rf)
    return sinks


def _open_writers(rk: Checkpoint, fname: str, group: list[_Item], targets: list[Path], ctx: _PairContext,
                  sinks: _PairSinks) -> list[SafetensorsWriter]:
    """The safetensors writers of output file ``fname`` (one per w); [] for a patched or flat .pt output."""
    writers: list[SafetensorsWriter] = []
    if ctx.kind not in ("safetensors", "sharded"):
        return writers
    specs = [it.out_spec for it in group]
    for k, (w, t) in enumerate(zip(ctx.ws, targets)):
        path = t if ctx.kind == "safetensors" else t / fname
        meta = _st_metadata(rk, fname, ctx.provenance, w, ctx.kind)
        pending = [key for key in ("neon.base_sha256", "neon.selftrained_sha256") if meta.get(key) == "pending"]
        for key in pending:
            meta.pop(key)
        # a single file keeps the inputs' sha256 in its header (filled in when known, then the file
        # is hashed); shards leave them to the index, so each shard is hashed as it is written
        ph = {key: 64 for key in pending} if ctx.kind == "safetensors" else {}
        # with the inputs' sha256 still pending the file is hashed after the header patch, so
        # the writes need no thread of their own (a hand-off per block costs more than the write)
        wr = SafetensorsWriter(path, specs, meta, io=None if ph else ctx.io, placeholders=ph, hash=not ph)
        ctx.stack.callback(wr.abort)
        writers.append(wr)
        sinks.written[k]["writers"].append(wr)
    return writers


def _merge_item(rk: Checkpoint, sk: Checkpoint, it: _Item, res: _PairResult, sinks: _PairSinks, ctx: _PairContext,
                work: _Workspace) -> None:
    """Merge one tensor block by block into every output; record its statistics (a tensor equal in
    both inputs is listed as copied); refuse a new non-finite result unless allowed."""
    st = res.stats[it.raw] = _Stats(len(ctx.ws))
    s_iter = _blocks(sk, it.s_raw or it.raw, it.spec, ctx.chunk)
    for a, b, rb in _blocks(rk, it.raw, it.spec, ctx.chunk):
        _, _, sb = next(s_iter)
        with np.errstate(all="ignore"):
            outs = _merge_block(rb, sb, it.spec.dtype, ctx.ws, it.out_dtype, st, work)
        ctx.sampler.blocks += 1
        if ctx.sampler.blocks % 64 == 1:
            ctx.sampler.sample()
        if sinks.patched:
            for pc, o in zip(sinks.patched, outs):
                v = pc.view(it.raw)
                if v.ndim == 0:
                    v[...] = o
                else:
                    v[a:b] = o.reshape(v[a:b].shape)
        else:
            for sink, o in zip(sinks.writers or sinks.raws, outs):
                sink.write(it.raw, o)
    if st.all_equal:
        res.copied.setdefault("equal", []).append(it.raw)
        del res.stats[it.raw]
    elif st.n_nonfinite_in:
        res.nonfinite_kept[it.raw] = st.n_nonfinite_in
    for k in range(len(ctx.ws)):
        if st.n_nonfinite_out[k]:
            res.nonfinite_out[k][it.raw] = st.n_nonfinite_out[k]
            if not ctx.allow_nonfinite:
                raise _nonfinite_error(it, ctx.ws[k], st.n_nonfinite_out[k], st.n_cast_only[k])


def _copy_item(rk: Checkpoint, sk: Checkpoint, it: _Item, res: _PairResult, sinks: _PairSinks, ctx: _PairContext) -> None:
    """Copy one tensor from θ_r (cast to the output dtype if needed), noting whether θ_s differs."""
    res.copied.setdefault(it.reason or "", []).append(it.raw)
    compare = it.reason not in ("only_in_base", "outside_key")
    s_iter = _blocks(sk, it.s_raw or it.raw, it.spec, ctx.chunk) if compare else None
    for a, b, rb in _blocks(rk, it.raw, it.spec, ctx.chunk):
        if s_iter is not None:
            _, _, sb = next(s_iter)
            if it.raw not in res.differs and not _bits_equal(rb, sb):
                res.differs.add(it.raw)
        if sinks.patched:
            continue  # θ_r's bytes are already in the copy
        t = rb if it.out_dtype == it.spec.dtype else _from_compute(
            _to_compute(np.ascontiguousarray(rb), it.spec.dtype, _compute_dtype(it.spec.dtype, it.out_dtype), None),
            it.out_dtype, None, None)[0]
        for sink in sinks.writers or sinks.raws:
            sink.write(it.raw, t)


def _write_indexes(rk: Checkpoint, items: list[_Item], weight_map: dict[str, str], targets: list[Path],
                   ctx: _PairContext, written: list[dict[str, Any]]) -> None:
    """``<stem>.safetensors.index.json`` of each sharded output (θ_r's index metadata kept, provenance under ``neon``)."""
    total_size = sum(it.out_spec.nbytes for it in items)
    for k, (w, t) in enumerate(zip(ctx.ws, targets)):
        extra = {kk: v for kk, v in rk.index_metadata.items() if kk not in ("total_size", "neon")}
        extra["neon"] = {kk: v for kk, v in {**ctx.provenance, "neon.w": _w_text(w)}.items()}
        idx = t / f"{_shard_stem(rk)}.safetensors.index.json"
        idx.write_text(json.dumps(index_json(weight_map, total_size, extra), indent=2) + "\n")
        written[k]["index"] = idx


def _nonfinite_error(it: Any, w: float, n_bad: int, n_cast_only: int) -> UsageError:
    """The refusal of a merge whose result is not finite, naming the first such tensor, with a
    dtype that would help only when one would: when every bad element was finite in the compute
    dtype (float32) and overflowed in the cast to a half-precision output, ``--dtype float32``;
    when the arithmetic itself overflowed (``|w (θ_r - θ_s)|`` beyond the compute dtype's range), no
    dtype (the weight is the problem)."""
    cdt = _compute_dtype(it.spec.dtype, it.out_dtype)
    text = _nonfinite_text(it.raw, w, n_bad, n_cast_only, it.out_dtype, cdt, "--dtype ", "--w")
    return UsageError(f"{text}; --allow-nonfinite writes the model anyway (nothing written)")


def _nonfinite_text(name: str, w: float, n_bad: int, n_cast_only: int, out_dtype: str, cdt: str, dtype_flag: str,
                    w_flag: str) -> str:
    """What is non-finite and the dtype that would help (or none): the streaming and in-memory merges' refusal."""
    where = f"tensor {name!r}: theta_r - w (theta_s - theta_r) at w={_w_text(w)} gives {n_bad} non-finite value(s) (inf/nan)"
    if n_cast_only == n_bad and out_dtype != cdt:
        return f"{where}; they overflow {out_dtype}, the output dtype; {dtype_flag}{cdt} keeps them finite"
    return f"{where}; w (theta_r - theta_s) exceeds the range of {cdt}; no output dtype helps: check {w_flag}"


def _finish_flat_pt(path: Path, rf: _RawTensorFile, items: list[_Item]) -> None:
    import torch

    merged = rf.tensors()
    obj = OrderedDict((it.raw, merged[it.raw]) for it in items)
    torch.save(obj, path)


def _st_metadata(rk: Checkpoint, fname: str, provenance: dict[str, str], w: float, kind: str) -> dict[str, str]:
    if rk.layout == "sharded" and kind == "sharded" and rk.shard_metadata:
        meta = dict(next(iter(rk.shard_metadata.values())))
    elif rk.layout in ("safetensors", "sharded"):
        meta = dict(rk.metadata)
    else:
        meta = {}
    meta = {k: v for k, v in meta.items() if not k.startswith("neon.")}
    meta.setdefault("format", "pt")
    meta.update(provenance)
    meta["neon.w"] = _w_text(w)
    return meta


# ----------------------------------------------------------------------------------------------
# files: the command


def _hash_start(paths: list[Path], io_pool: Any) -> list[Any]:
    """Start the sha256 (fsutil.sha256_path) of each input on its own thread, overlapping the merge."""
    from neon_cli.fsutil import sha256_path

    def one(p: Path) -> str:
        try:
            return sha256_path(p)
        except OSError as exc:
            raise CheckpointError(f"{p}: cannot read to compute its sha256 ({exc.strerror or exc})") from None

    return [io_pool.submit(one, p) for p in paths]


def _sync_and_hash(path: Path) -> str:
    """fsync ``path`` (files copied or written without it) and return its sha256."""
    from neon_cli.fsutil import sha256_file

    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    return sha256_file(path)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def merge_checkpoints(base: str | os.PathLike[str], selftrained: str | os.PathLike[str], ws: Sequence[float],
                      outputs: Sequence[str | os.PathLike[str]], *, report: Any, progress: ProgressFn = null_progress,
                      report_path: str | os.PathLike[str] | None = None, **options: Any) -> dict[str, Any]:
    """The keyword form of :func:`merge`: ``merge(MergeRequest(base, selftrained, ws, outputs,
    MergeOptions(**options), report_path), report=report, progress=progress)``.

    ``options``: the fields of :class:`~neon_cli.requests.MergeOptions` (``key``, ``dtype``,
    ``exclude``, ``buffers``, ``allow_missing``, ``shard_size``, ``allow_nonfinite``, ``dry_run``,
    ``chunk_elements``, ``threads``); ``trust_pickle`` is accepted and ignored (nothing is run).
    """
    from neon_cli.requests import MergeOptions, MergeRequest

    options.pop("trust_pickle", None)
    for name in ("exclude", "buffers"):
        if name in options:
            options[name] = tuple(options[name] or ())
    req = MergeRequest(Path(base), Path(selftrained), tuple(ws), tuple(Path(o) for o in outputs), MergeOptions(**options),
                       Path(report_path) if report_path is not None else None)
    return merge(req, report=report, progress=progress)


def merge(request: MergeRequest, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Stream θ_Neon = θ_r − w (θ_s − θ_r) from two checkpoints into one output per w; no code
    of either file runs (any encoding). ``request``: a :class:`neon_cli.requests.MergeRequest`
    (validated here, once: :meth:`~neon_cli.requests.MergeRequest.validate`).

    ``base`` (θ_r) and ``selftrained`` (θ_s): ``.safetensors``; a sharded folder or its index; a
    torch zip or legacy file (.pt/.pth/.bin/.ckpt, full-module pickles included); a plain pickle
    (EDM ``.pkl``); a model folder or a diffusers pipeline folder (each component a loader would
    use: ``unet/``, ``unet_ema/``, ...). Containers are searched for the weights (``key`` chooses:
    a dotted path like ``trainer.var_wo_ddp``). ``ws``/``outputs``: one output per w; every input
    tensor is read once for all of them. Output layout from the output path:

    * ``.safetensors``: flat, θ_r's header metadata kept, provenance as ``neon.*`` keys;
    * ``.pt``/``.pth``/``.bin``/``.ckpt`` from a torch θ_r, ``.pkl`` from a pickle θ_r: **θ_r's own
      file** byte for byte except the merged tensors' elements (container, classes, embedded source,
      shared storages kept; loads in the original code exactly as θ_r did); from a safetensors θ_r
      a flat ``torch.save`` state dict;
    * a folder: for a folder θ_r, θ_r's folder with every component's weights merged in θ_r's
      format (configs, scheduler, tokenizer copied; other weight files of θ_r not copied); for a
      file θ_r with ``shard_size``, sharded safetensors with ``model.safetensors.index.json``.

    A sidecar ``<θ_r file>.json`` (the flow family's) is copied to ``<output>.json``. ``dtype``:
    output dtype of floating tensors (safetensors outputs; a patched container keeps θ_r's).
    Memory: O(``chunk_elements``) per output; the merge needs numpy only (no torch) for
    safetensors inputs and outputs. ``dry_run``: validate everything (names, shapes, dtypes,
    outputs, disk space) from headers only and write nothing. ``buffers``: names copied like
    BatchNorm statistics. ``request.report``: the ``--report`` file, checked against the inputs
    and outputs. ``threads`` is kept for compatibility (the numpy kernel is single-threaded; the
    output writes, the sha256 of inputs and outputs run on their own threads).

    Fills ``report`` (inputs/outputs with sha256, results) and returns ``report.results`` (see the
    README's report section: ``merged``, ``copied``, ``copied_names``, ``copy_reasons``,
    ``copied_but_different``, ``delta_norm``, ``base_norm``, ``relative_delta``, ``most_changed``,
    ``tensors``, ``precision``, ``nonfinite_kept``, ``nonfinite_results``, ``outputs``, ``layout``,
    ``key``, ``prefix``, ``components``, ``not_copied``, ``warnings``, ``seconds``,
    ``peak_rss_anon_bytes``, ``max_rss_bytes``).
    ``allow_nonfinite``: write a result with new inf/NaN elements (default: refused, see below).
    Raises UsageError (bad w/outputs, an output that is an input or another output, an output
    being written by another run, not enough disk, a merged tensor that is not finite: named,
    with ``--dtype float32`` suggested only for an overflow of a half-precision output) and CheckpointError (unreadable/truncated
    input, key/shape/dtype mismatch naming the key); on any error no output is left behind. An OS
    error while writing an output becomes a one-line error naming the output: ResourceError
    (exit 3) for a full disk, a read-only or unwritable folder; UsageError (exit 2) for a path
    that cannot be one (a path under a file, ...).
    Source: paper Algorithm 1, App. C; issues 3, 12 and 13.
    """
    from neon_cli.errors import from_os_error

    if request.error is not None:
        raise request.error
    if _is_lora_pair(request):
        return _merge_lora(request, report, progress)
    try:
        return _merge(request, report, progress)
    except OSError as exc:
        where = exc.filename or (list(request.outputs) or ["?"])[0]
        raise from_os_error(exc, f"-o: cannot write {where}", UsageError) from None


def _is_lora_pair(request: MergeRequest) -> bool:
    """True when θ_s (or θ_r) is a LoRA file (:func:`neon_cli.lora.is_lora`); UsageError for
    ``--as-lora`` without one."""
    from neon_cli.lora import is_lora

    if is_lora(request.selftrained) or is_lora(request.base):
        return True
    if request.options.as_lora:
        raise UsageError(f"--as-lora: {request.selftrained} is not a LoRA (.safetensors with lora_A/lora_B or lora_down/lora_up keys)")
    return False


def _merge_lora(request: MergeRequest, report: Any, progress: ProgressFn) -> dict[str, Any]:
    """θ_s a LoRA: :func:`neon_cli.lora.merge_lora` (exact in LoRA space); the flags it does not use are refused by name."""
    from neon_cli.lora import merge_lora

    o = request.options
    for flag, val in (("--key", o.key), ("--exclude", o.exclude), ("--allow-missing", o.allow_missing), ("--shard-size", o.shard_size)):
        if val:
            raise UsageError(f"{flag}: not used when theta_s is a LoRA ({request.selftrained})")
    return merge_lora(request, report, progress)


@dataclass
class _Job:
    """One validated merge: the request's values as the steps use them."""

    req: MergeRequest
    ws: list[float]
    outs: list[Path]
    kind: str  # output_kind of every output
    odt: str | None
    pats: list[re.Pattern[str]]
    chunk: int
    shard: int | None = None  # bytes per shard of a sharded output (--shard-size)
    side_r: Path | None = None  # θ_r's sidecar <base>.json, copied beside each file output
    folder_mode: bool = False
    t0: float = field(default_factory=time.perf_counter)
    sampler: _RssSampler = field(default_factory=_RssSampler)

    @property
    def base_p(self) -> Path:
        return Path(self.req.base)

    @property
    def self_p(self) -> Path:
        return Path(self.req.selftrained)


@dataclass
class _PairPlan:
    """One pair of weight files to merge: its component (``.`` for a file pair), the checkpoints,
    the tensors in θ_r's order, θ_s's names ignored, and how the pair is written (:func:`_pair_kind`)."""

    comp: str
    rk: Checkpoint
    sk: Checkpoint
    items: list[_Item]
    ignored: list[str]
    pkind: str


@dataclass
class _Streamed:
    """What streaming wrote: temporary outputs, per-pair statistics and writers, the hash threads."""

    tmps: list[Path]
    pairs: list[_PairResult]
    written: list[list[dict[str, Any]]]
    not_copied: list[str]
    hashes: list[Any]
    hasher: Any
    provenance: dict[str, str]


def _merge(req: MergeRequest, report: Any, progress: ProgressFn) -> dict[str, Any]:
    """The merge as named steps: check the request, lock the outputs, open and plan the pairs,
    stream the blocks, finish (hash, fill in provenance, rename) and summarise."""
    job = _prepare(req.validate())
    with contextlib.ExitStack() as stack:
        _lock_outputs(stack, job)
        plans, warnings = _open_and_plan(stack, job)
        results = _describe(report, job, plans, warnings)
        if req.options.dry_run:
            return _dry_run_results(report, job, plans)
        streamed = _stream_pairs(stack, job, plans, progress, warnings)
        sinks = _finish_outputs(stack, job, report, streamed)
    _fill_results(results, _combine(streamed.pairs, len(job.ws)), job.ws, sinks)
    results["not_copied"] = streamed.not_copied
    results["peak_rss_anon_bytes"] = job.sampler.peak
    results["max_rss_bytes"] = _max_rss()
    results["seconds"] = round(time.perf_counter() - job.t0, 3)
    return results


def _prepare(req: MergeRequest) -> _Job:
    """The validated request as a :class:`_Job`: inputs exist, outputs are neither inputs nor each
    other, and whether the base is a folder of models merged component by component."""
    from neon_cli.fsutil import check_outputs

    o = req.options
    job = _Job(req, [_check_w(w) for w in req.ws], [Path(p) for p in req.outputs], "", parse_dtype(o.dtype),
               _compile_exclude(o.exclude), o.chunk_elements if o.chunk_elements is not None else CHUNK_ELEMENTS,
               req.shard_bytes())
    job.kind = output_kind(job.outs[0], job.shard)
    base_p, self_p = job.base_p, job.self_p
    for p in (base_p, self_p):
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
    out_flags = {"-o" if len(job.outs) == 1 else f"-o (w={_w_text(w)})": p for w, p in zip(job.ws, job.outs)}
    job.side_r = _sidecar(base_p) if base_p.is_file() and _sidecar(base_p).is_file() else None
    side_outs = ({f"-o sidecar (w={_w_text(w)})": _sidecar(p) for w, p in zip(job.ws, job.outs)}
                 if job.side_r and job.kind != "sharded" else {})
    check_outputs({"base": base_p, "selftrained": self_p, "base sidecar": job.side_r},
                  {**out_flags, **side_outs, "--report": req.report})
    if len({str(p.resolve()) for p in job.outs}) != len(job.outs):
        raise UsageError("-o: several weights write the same file; put '{w}' in the output name")
    job.folder_mode = _folder_mode(job)
    return job


def _folder_mode(job: _Job) -> bool:
    """True when the base folder's components are merged into an output folder (a one-model folder
    merged into a file is not); UsageError for a folder base with a file output or a file θ_s."""
    if not job.base_p.is_dir():
        return False
    comps = components(job.base_p)
    if not comps:
        raise CheckpointError(f"{job.base_p}: a folder without weights (model.safetensors, diffusion_pytorch_model.safetensors, "
                              "*.index.json, ...)")
    if comps == ["."] and job.kind != "sharded":
        return False  # one model folder merged into a single output file
    if job.kind != "sharded":
        raise UsageError(f"-o {job.outs[0]}: the base is a folder of models ({', '.join(comps)}); give -o a folder name (no file suffix)")
    if not job.self_p.is_dir() and comps != ["."]:
        raise UsageError(f"{job.self_p}: the base is a folder of models ({', '.join(comps)}); give the self-trained folder too")
    return True


def _lock_outputs(stack: contextlib.ExitStack, job: _Job) -> None:
    """Refuse outputs of the wrong kind, remove stale temporaries and (unless a dry run) hold each
    output's lock ``.NAME.lock`` until the merge ends."""
    from neon_cli.fsutil import exclusive_lock, remove_stale_tmp

    for o in job.outs:
        if job.kind == "sharded" and o.exists() and (not o.is_dir() or any(o.iterdir())):
            raise UsageError(f"-o {o}: exists and is not an empty folder; remove it or choose another output")
        if job.kind != "sharded" and o.is_dir():
            raise UsageError(f"-o {o}: is a folder; give a file name")
        remove_stale_tmp(o)
        if not job.req.options.dry_run:
            stack.enter_context(exclusive_lock(o, f"-o {o}", folder=False))
            stack.callback(_unlink, o.with_name(f".{o.name}.lock"))


def _open_and_plan(stack: contextlib.ExitStack, job: _Job) -> tuple[list[_PairPlan], list[str]]:
    """Open every pair, plan its tensors and layout, collect the warnings, check the free disk."""
    o = job.req.options
    pairs = _open_pairs(stack, job.base_p, job.self_p, job.folder_mode, o.key)
    if job.kind == "sharded" and not job.folder_mode and job.shard is None and pairs[0][1].layout != "sharded":
        raise UsageError(f"-o {job.outs[0]}: give a file name ending in .safetensors or .pt, or --shard-size for a sharded folder")
    plans: list[_PairPlan] = []
    warnings: list[str] = []
    for comp, rk, sk in pairs:
        items, ignored = _plan(rk, sk, job.pats, o.buffers, o.allow_missing, job.odt)
        pkind = _pair_kind(job.kind, job.folder_mode, rk, job.outs[0], job.odt, job.shard)
        plans.append(_PairPlan(comp, rk, sk, items, ignored, pkind))
        warnings += _warnings(comp, rk, sk, pkind)
    _check_disk(job.outs, sum(_output_size(p.rk, p.items, p.pkind) for p in plans)
                + (_tree_bytes(job.base_p) if job.folder_mode else 0))
    return plans, warnings


def _describe(report: Any, job: _Job, plans: list[_PairPlan], warnings: list[str]) -> dict[str, Any]:
    """The results known before any tensor is read (layouts, keys, counts, warnings), in ``report.results``."""
    rk0, sk0, folder = plans[0].rk, plans[0].sk, job.folder_mode
    results: dict[str, Any] = report.results
    results.update({
        "formula": FORMULA,
        "w": job.ws,
        "dry_run": bool(job.req.options.dry_run),
        "layout": {"base": rk0.layout if not folder else "folder", "selftrained": sk0.layout if not folder else "folder",
                   "output": "folder" if folder else plans[0].pkind if plans[0].pkind != "patched" else rk0.layout},
        "key": {"base": rk0.key, "selftrained": sk0.key},
        "prefix": {"base": rk0.prefix, "selftrained": sk0.prefix},
        "components": [p.comp for p in plans] if folder else None,
        "tensors_total": sum(len(p.items) for p in plans),
        "output_bytes_each": sum(sum(it.out_spec.nbytes for it in p.items) for p in plans),
        "ignored_selftrained_only": [n for p in plans for n in p.ignored],
        "warnings": warnings,
    })
    return results


def _dry_run_results(report: Any, job: _Job, plans: list[_PairPlan]) -> dict[str, Any]:
    """``--dry-run``: what each tensor would undergo and where each w would go; nothing written."""
    for role, p in (("base", job.base_p), ("selftrained", job.self_p)):
        report.inputs.append({"role": role, "path": str(p), "sha256": None})
    planned: dict[str, int] = {}
    for p in plans:
        for it in p.items:
            planned[it.reason or "merge"] = planned.get(it.reason or "merge", 0) + 1
    results: dict[str, Any] = report.results
    results["planned"] = planned
    results["outputs"] = [{"w": w, "path": str(o)} for w, o in zip(job.ws, job.outs)]
    results["seconds"] = round(time.perf_counter() - job.t0, 3)
    return results


def _provenance(job: _Job, rk0: Checkpoint) -> dict[str, str]:
    """The ``neon.*`` header metadata of every output (the inputs' sha256 filled in at the end)."""
    return {
        "neon.formula": FORMULA,
        "neon.compute_dtype": "float32 (float64 for float64 tensors)",
        "neon.base": job.base_p.name,
        "neon.base_sha256": "pending",
        "neon.selftrained": job.self_p.name,
        "neon.selftrained_sha256": "pending",
        "neon.key": rk0.key or "",
        "neon.exclude": json.dumps(list(job.req.options.exclude)),
        "neon.versions": json.dumps(_versions(), sort_keys=True),
    }


def _stream_pairs(stack: contextlib.ExitStack, job: _Job, plans: list[_PairPlan], progress: ProgressFn,
                  warnings: list[str]) -> _Streamed:
    """Write every pair's merged blocks to the temporary outputs (the inputs' sha256 computed
    alongside), then θ_r's other files (a folder) or its sidecar."""
    from concurrent.futures import ThreadPoolExecutor

    from neon_cli.fsutil import atomic_path

    io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neon-merge-io")
    stack.callback(io.shutdown)
    hasher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="neon-sha256")
    stack.callback(hasher.shutdown, cancel_futures=True)
    hashes = _hash_start([job.base_p, job.self_p], hasher)  # overlaps the merge; written into headers at the end
    done = _Streamed([stack.enter_context(atomic_path(o)) for o in job.outs], [], [], [], hashes, hasher,
                     _provenance(job, plans[0].rk))
    if job.kind == "sharded":
        for t in done.tmps:
            t.mkdir(parents=True, exist_ok=False)
    for p in plans:
        ctx = _PairContext(job.ws, p.pkind, done.provenance, job.shard, progress, job.sampler, job.chunk,
                           io, stack, "merge" if p.comp == "." else f"merge {p.comp}", job.req.options.allow_nonfinite)
        pr, wr = _merge_pair(p.rk, p.sk, p.items, _targets(job, p, done.tmps), ctx)
        done.pairs.append(pr)
        done.written.append(wr)
    if job.folder_mode:
        for t in done.tmps:
            done.not_copied = _copy_tree(job.base_p, t, {p.comp for p in plans}, warnings)
    elif job.side_r is not None:
        for o in job.outs:
            shutil.copy2(job.side_r, stack.enter_context(atomic_path(_sidecar(o))))
    return done


def _targets(job: _Job, p: _PairPlan, tmps: list[Path]) -> list[Path]:
    """Where pair ``p`` is written in each temporary output (its component's folder in folder mode)."""
    if not job.folder_mode:
        return list(tmps)
    targets = []
    for t in tmps:
        d = t / p.comp if p.comp != "." else t
        d.mkdir(parents=True, exist_ok=True)
        targets.append(d if p.pkind == "sharded" else d / p.rk.path.name)
    return targets


def _finish_outputs(stack: contextlib.ExitStack, job: _Job, report: Any, done: _Streamed) -> list[_Sink]:
    """Fill in the inputs' sha256 (headers, indexes, report), hash every output file, and describe
    each output (its sha256 and size); the outputs are renamed into place when ``stack`` closes."""
    r_sha, s_sha = (h.result() for h in done.hashes)
    report.add_input("base", job.base_p, r_sha)
    report.add_input("selftrained", job.self_p, s_sha)
    done.provenance["neon.base_sha256"], done.provenance["neon.selftrained_sha256"] = r_sha, s_sha
    shas = {"neon.base_sha256": r_sha, "neon.selftrained_sha256": s_sha}
    for wr in done.written:
        for info in wr:
            for writer in info["writers"]:
                if writer.pending_placeholders:
                    writer.fill_placeholders(shas)
            if info["index"] is not None:
                data = json.loads(info["index"].read_text())
                data["metadata"]["neon"].update(shas)
                info["index"].write_text(json.dumps(data, indent=2) + "\n")
    digests = _output_digests(job, done)
    sinks = []
    for k, (w, o, t) in enumerate(zip(job.ws, job.outs, done.tmps)):
        sink = _Sink(o, t, job.kind)
        if t.is_dir():
            sink.sha256 = sha256_tree(t, digests[k])
            sink.bytes = sum(f.stat().st_size for f in t.rglob("*") if f.is_file())
        else:
            sink.sha256 = digests[k][t]
            sink.bytes = t.stat().st_size
        sinks.append(sink)
        report.add_output(f"merged w={_w_text(w)}", o, sink.sha256)
    return sinks


def _output_digests(job: _Job, done: _Streamed) -> list[dict[Path, str]]:
    """sha256 of every output file (after the header patch): those hashed while written, the rest
    on parallel threads."""
    digests: list[dict[Path, str]] = [{} for _ in job.ws]
    for wr in done.written:
        for k, info in enumerate(wr):
            digests[k].update(info["digests"])  # hashed while written
    files_to_hash = []
    for k, t in enumerate(done.tmps):
        if t.is_dir():
            files_to_hash += [(k, f) for f in sorted(p for p in t.rglob("*") if p.is_file() and not p.name.startswith("."))
                              if f not in digests[k]]
        else:
            files_to_hash.append((k, t))
    futs = [(k, f, done.hasher.submit(_sync_and_hash, f)) for k, f in files_to_hash]
    for k, f, fut in futs:
        digests[k][f] = fut.result()
    return digests


def _open_pairs(stack: contextlib.ExitStack, base_p: Path, self_p: Path, folder_mode: bool, key: str | None) -> list[tuple[str, Checkpoint, Checkpoint]]:
    """(component, θ_r checkpoint, θ_s checkpoint) for a file pair or each component of a folder."""
    if not folder_mode:
        rk = stack.enter_context(open_checkpoint(base_p, key=key))
        prefer = rk.key if rk.layout in ("torch", "pickle") else None
        sk = stack.enter_context(open_checkpoint(self_p, key=key, prefer_key=prefer, key_optional=True))
        return [(".", rk, sk)]
    comps = components(base_p)
    s_comps = set(components(self_p)) if self_p.is_dir() else {"."}
    out = []
    for c in comps:
        rdir = base_p / c if c != "." else base_p
        if c in s_comps:
            sdir = self_p / c if c != "." else self_p
        elif c == "unet_ema" and "unet" in s_comps:
            sdir = self_p / "unet"  # what the diffusers family reads from each: θ_r's EMA against θ_s's weights
        elif s_comps == {"."} and len(comps) == 1:
            sdir = self_p
        else:
            raise CheckpointError(f"{self_p}: no {c}/ with weights to merge with {rdir} (found: {', '.join(sorted(s_comps)) or 'none'})")
        rf = weights_file(rdir)
        sf = weights_file(sdir) if sdir.is_dir() else sdir
        if rf is None or sf is None:
            raise CheckpointError(f"{sdir}: no weights file")
        rk = stack.enter_context(open_checkpoint(rf, key=key))
        prefer = rk.key if rk.layout in ("torch", "pickle") else None
        sk = stack.enter_context(open_checkpoint(sf, key=key, prefer_key=prefer, key_optional=True))
        out.append((c, rk, sk))
    return out


def _pair_kind(kind: str, folder_mode: bool, rk: Checkpoint, out: Path, odt: str | None, shard_size: int | None) -> str:
    """How one pair is written: ``safetensors``, ``sharded``, ``patched`` (θ_r's torch file) or ``torch`` (flat .pt)."""
    if folder_mode:
        if rk.layout == "sharded" or getattr(rk, "encoding", "") == "bin-shards" or shard_size is not None:
            return "sharded"
        if rk.layout == "safetensors":
            return "safetensors"
        kind = "torch"
    if kind in ("torch", "pickle"):
        if rk.layout in ("torch", "pickle"):
            if getattr(rk, "encoding", "") == "bin-shards":
                raise UsageError(f"-o {out}: a sharded .bin base is written as sharded safetensors; give -o a folder name")
            if kind == "pickle" and rk.layout != "pickle":
                raise UsageError(f"-o {out}: a .pkl output needs a pickle base (θ_r is a {rk.encoding} torch file); write .pt or .safetensors")
            if kind == "torch" and rk.layout == "pickle" and not folder_mode:
                raise UsageError(f"-o {out}: θ_r is a plain pickle; write its own container (.pkl) or .safetensors")
            if odt is not None and any(s.dtype != odt for s in rk.specs.values() if dtype_info(s.dtype).is_floating):
                raise UsageError(f"--dtype {odt}: a {out.suffix} output keeps θ_r's container and dtypes; write .safetensors to change the dtype")
            return "patched"
        if kind == "pickle":
            raise UsageError(f"-o {out}: a .pkl output needs a pickle base; write .safetensors or .pt instead")
        return "torch"
    return kind


def _warnings(comp: str, rk: Checkpoint, sk: Checkpoint, pkind: str) -> list[str]:
    from neon_cli.mismatch import compare, describe

    pre = "" if comp == "." else f"{comp}: "
    out = [pre + n for n in list(rk.notes) + list(sk.notes)]
    out += [pre + m for m in compare(describe(rk.container), describe(sk.container))]  # EDM/IMM pickles
    if rk.alternatives:
        out.append(f"{pre}base: merged the state dict at {rk.key!r}; also found {', '.join(rk.alternatives)} (choose with --key)")
    if pkind in ("safetensors", "sharded") and rk.layout in ("torch", "pickle"):
        if rk.non_tensors:
            out.append(f"{pre}not written to a safetensors output (not tensors): {', '.join(map(str, list(rk.non_tensors)[:8]))}")
        elif rk.key and isinstance(rk.container, Mapping):
            others = [str(k) for k in rk.container.keys() if str(k) != rk.key.split(".")[0]]
            if others:
                out.append(f"{pre}container entries of the base not written to a safetensors output (not tensors): {', '.join(others[:8])}")
    dangers = getattr(rk, "dangers", lambda: [])()
    if dangers:
        out.append(f"{pre}the base, loaded normally, would {'; '.join(d.replace('runs ', 'run ', 1) for d in dangers)}"
                   " (neon read it without running anything"
                   + ("; the output keeps it" if pkind == "patched" else "") + ")")
    return out


def _copy_tree(src: Path, dst: Path, merged_components: set[str], warnings: list[str]) -> list[str]:
    """Copy θ_r's folder into ``dst`` except weight files (the merged ones are already there) and
    symlinks leading out of it; returns the relative names of the files not copied."""
    skipped: list[str] = []
    root = src.resolve()
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_symlink():
            try:
                target = p.resolve()
            except OSError:
                target = None
            if target is None or (root not in target.parents and target != root):
                skipped.append(str(rel))
                warnings.append(f"not copied: {rel} (a symlink leading out of {src})")
                continue
        if p.is_dir():
            continue
        q = dst / rel
        if q.exists():
            continue  # a merged weights file
        if is_weight_file(p.name):
            skipped.append(str(rel))
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, q)
    return skipped


def _output_size(rk: Checkpoint, items: list[_Item], pkind: str) -> int:
    """Bytes one pair writes: tensor data plus headers and container overhead (a patched copy is
    θ_r's file; a safetensors header ~ 100 bytes per tensor plus metadata and an index; a flat .pt
    needs its scratch file too)."""
    data = sum(it.out_spec.nbytes for it in items)
    if pkind == "patched":
        return rk.path.stat().st_size if rk.path.is_file() else data
    header = 8 + 4096 + sum(len(it.raw.encode()) + 96 for it in items)
    if pkind == "sharded":
        header *= 2  # index + headers
    return data + header + (data + 64 * len(items) + 4096 if pkind == "torch" else 0)


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and not is_weight_file(p.name))


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
            from neon_cli.errors import ResourceError

            raise ResourceError(f"-o: not enough free disk space in {parent}: need {human_bytes(need)}, have {human_bytes(free)}")


def _combine(prs: list[_PairResult], nw: int) -> _PairResult:
    out = _PairResult(nonfinite_out=[{} for _ in range(nw)])
    for pr in prs:
        out.stats.update(pr.stats)
        for r, names in pr.copied.items():
            out.copied.setdefault(r, []).extend(names)
        out.differs |= pr.differs
        out.nonfinite_kept.update(pr.nonfinite_kept)
        for k in range(nw):
            out.nonfinite_out[k].update(pr.nonfinite_out[k])
        out.items.extend(pr.items)
    return out


def _fill_results(results: dict[str, Any], pr: _PairResult, ws: list[float], sinks: list[_Sink]) -> None:
    stats, copied = pr.stats, pr.copied
    dd = sum(s.dd for s in stats.values())
    rr = sum(s.rr for s in stats.values())
    numel = sum(s.numel for s in stats.values())
    n_eq = sum(s.n_equal for s in stats.values())
    per_tensor = []
    specs = {it.raw: it for it in pr.items}
    for name, s in stats.items():
        it = specs[name]
        per_tensor.append({
            "name": name,
            "dtype": it.spec.dtype,
            "out_dtype": it.out_dtype,
            "shape": list(it.spec.shape),
            "equal_fraction": s.n_equal / s.numel if s.numel else None,
            "delta_norm": math.sqrt(s.dd),
            "relative_delta": math.sqrt(s.dd) / math.sqrt(s.rr) if s.rr > 0 else None,
            "effective_w": [s.num[k] / s.dd if s.dd > 0 else None for k in range(len(ws))],
            "nonfinite_kept": s.n_nonfinite_in,
        })
    most = sorted(per_tensor, key=lambda t: -(t["relative_delta"] or 0.0))[:10]
    eff = [sum(s.num[k] for s in stats.values()) / dd if dd > 0 else None for k in range(len(ws))]
    out_dtypes = sorted({specs[n].out_dtype for n in stats})
    half_out = any(specs[n].out_dtype in _HALF for n in stats)
    eq_frac = n_eq / numel if numel else None
    rel_err = max((abs(e / w - 1.0) for e, w in zip(eff, ws) if e is not None and w != 0), default=0.0)
    suggest = "float32" if half_out and ((eq_frac or 0.0) >= SUGGEST_EQUAL_FRACTION or rel_err >= SUGGEST_REL_W_ERROR) else None
    counts = {r: len(v) for r, v in copied.items()}
    results.update({
        "merged": len(stats),
        "copied": counts,
        "copied_names": copied,
        "copy_reasons": {r: COPY_REASONS[r] for r in counts},
        "copied_but_different": sorted(pr.differs),
        "delta_norm": math.sqrt(dd),
        "base_norm": math.sqrt(rr),
        "relative_delta": math.sqrt(dd) / math.sqrt(rr) if rr > 0 else None,
        "most_changed": most,
        "precision": {"output_dtypes": out_dtypes, "equal_fraction": eq_frac, "effective_w": eff,
                      "max_relative_w_error": rel_err, "suggest_dtype": suggest},
        "nonfinite_kept": pr.nonfinite_kept,
        "nonfinite_results": [{"w": w, "tensors": nf} for w, nf in zip(ws, pr.nonfinite_out)],
        "outputs": [{"w": w, "path": str(s.final), "sha256": s.sha256, "bytes": s.bytes} for w, s in zip(ws, sinks)],
        "tensors": per_tensor,
    })
