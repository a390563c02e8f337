"""neon_cli.merge: the arithmetic against the formula, copy rules, every layout, every error."""

from __future__ import annotations

import argparse
import json
import math
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neon_cli.checkpoint import index_json
from neon_cli.errors import CheckpointError, UsageError
from neon_cli.fsutil import sha256_path
from neon_cli.merge import merge_checkpoints, merge_state_dicts
from neon_cli.report import Report

W = 1.6


def formula64(r: torch.Tensor, s: torch.Tensor, w: float) -> torch.Tensor:
    """θ_r − w (θ_s − θ_r) in float64 (the reference)."""
    r64, s64 = r.double(), s.double()
    return r64 - w * (s64 - r64)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64), floored at the smallest subnormal."""
    fi = torch.finfo(dtype)
    e = torch.floor(torch.log2(x.abs().clamp_min(fi.tiny)))
    return torch.maximum(torch.exp2(e) * fi.eps, torch.tensor(fi.tiny * fi.eps, dtype=torch.float64))


def bits(t: torch.Tensor) -> torch.Tensor:
    iv = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().reshape(-1).view(iv)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def pair(dtype: torch.dtype, n: int = 4000, rel: float = 1e-2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=g, dtype=torch.float64)
    s = r * (1 + rel * torch.randn(n, generator=g, dtype=torch.float64))
    return r.to(dtype), s.to(dtype)


# ---------------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_merge_matches_formula_within_half_ulp_of_output(dtype):
    r, s = pair(dtype)
    out = merge_state_dicts({"x": r}, {"x": s}, W)["x"]
    assert out.dtype == dtype
    ref = formula64(r, s, W)
    err = (out.double() - ref).abs()
    # output is the formula rounded to dtype: at most half a unit in the last place, plus the
    # float32 (float64) arithmetic error, far below it for half types
    slack = 0.5 if dtype in (torch.float16, torch.bfloat16) else 2.0
    assert bool((err <= slack * ulp(ref, dtype) + 1e-300).all())
    if dtype in (torch.float16, torch.bfloat16):
        assert (out == ref.to(dtype)).double().mean() > 0.999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_merge_exact_on_representable_values(dtype):
    """Small integers and w = 0.5: every intermediate and the result are exact."""
    r = torch.arange(-40, 40, dtype=torch.float64)
    s = r + torch.tensor([(-1) ** i * (i % 5) for i in range(80)], dtype=torch.float64)
    out = merge_state_dicts({"x": r.to(dtype)}, {"x": s.to(dtype)}, 0.5)["x"]
    assert torch.equal(out, (r - 0.5 * (s - r)).to(dtype))


def test_fp16_large_values_do_not_overflow():
    r = torch.tensor([30000.0, 60000.0, -30000.0], dtype=torch.float16)
    s = torch.tensor([29984.0, 59008.0, -29984.0], dtype=torch.float16)
    naive = (1 + W) * r - W * s  # (1+w) θ_r in float16 overflows
    assert not bool(torch.isfinite(naive).all())
    out = merge_state_dicts({"x": r}, {"x": s}, W)["x"]
    assert out.dtype == torch.float16
    assert out.tolist() == [30032.0, 61600.0, -30032.0]  # fp16(30025.6), fp16(61587.2)
    assert torch.equal(out, formula64(r, s, W).to(torch.float16))


def test_nonfinite_entries_and_masks_keep_base():
    r = torch.tensor([1.0, float("-inf"), 2.0, float("nan"), 3.0, float("inf")])
    s = torch.tensor([1.5, float("-inf"), float("inf"), 0.0, float("nan"), 7.0])
    out = merge_state_dicts({"x": r}, {"x": s}, W)["x"]
    assert out[0].item() == pytest.approx(1.0 - W * 0.5)
    assert out[4].item() == 3.0 and out[2].item() == 2.0  # θ_s non-finite -> θ_r
    assert out[1].item() == float("-inf") and math.isnan(out[3].item()) and out[5].item() == float("inf")
    assert torch.equal(bits(out[1:4:2]), bits(r[1:4:2]))
    # a causal -inf mask equal in both inputs comes back bit for bit (the naive formula gives NaN)
    mask = torch.full((6, 6), float("-inf")).triu(1)
    assert bool(torch.isnan(mask + W * (mask - mask)).any())
    got = merge_state_dicts({"m": mask}, {"m": mask.clone()}, W)["m"]
    assert bit_equal(got, mask)


def test_copy_rules_ints_bn_equal_buffers_exclude():
    g = torch.Generator().manual_seed(1)
    base = {
        "conv.weight": torch.randn(4, 3, generator=g),
        "bn.weight": torch.randn(4, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.running_var": torch.rand(4, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(1000),
        "pos_ids": torch.arange(6, dtype=torch.int64),
        "frozen": torch.tensor([-0.0, 1.0, -2.5]),
        "ema_decay": torch.tensor([0.999]),
        "head.weight": torch.randn(2, 4, generator=g),
    }
    st = {k: v.clone() for k, v in base.items()}
    for k in ("conv.weight", "bn.weight", "bn.running_mean", "bn.running_var", "ema_decay", "head.weight"):
        st[k] = st[k] + 0.25
    st["bn.num_batches_tracked"] = torch.tensor(1200)
    st["pos_ids"] = st["pos_ids"] + 1
    out = merge_state_dicts(base, st, W, buffers={"ema_decay"}, exclude=[r"^head\."])
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "pos_ids", "frozen", "ema_decay", "head.weight"):
        assert bit_equal(out[k], base[k]), k
    assert out["frozen"] is base["frozen"]  # copied, not recomputed (keeps -0.0)
    for k in ("conv.weight", "bn.weight"):
        assert torch.allclose(out[k].double(), formula64(base[k], st[k], W), atol=1e-6)
    assert list(out) == list(base)


def test_out_dtype_float32_from_bf16():
    r, s = pair(torch.bfloat16)
    out = merge_state_dicts({"x": r, "i": torch.tensor(3)}, {"x": s, "i": torch.tensor(4)}, W, out_dtype="float32")
    assert out["x"].dtype == torch.float32 and out["i"].dtype == torch.int64
    assert torch.allclose(out["x"].double(), formula64(r, s, W), rtol=0, atol=1e-6)


def test_in_memory_errors_name_the_key():
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"key 'x': shape \[2, 3\] in base but \[3, 2\] in selftrained"):
        merge_state_dicts(a, {"x": torch.zeros(3, 2), "y": torch.zeros(1)}, W)
    with pytest.raises(CheckpointError, match=r"key 'x': dtype float32 in base but float16 in selftrained"):
        merge_state_dicts(a, {"x": torch.zeros(2, 3, dtype=torch.float16), "y": torch.zeros(1)}, W)
    with pytest.raises(CheckpointError, match=r"key 'y': in base but not in selftrained.*--allow-missing"):
        merge_state_dicts(a, {"x": torch.zeros(2, 3)}, W)
    with pytest.raises(CheckpointError, match=r"key 'z': in selftrained but not in base"):
        merge_state_dicts(a, {**a, "z": torch.zeros(1)}, W)
    out = merge_state_dicts(a, {"x": torch.ones(2, 3), "z": torch.zeros(1)}, W, allow_missing=True)
    assert set(out) == {"x", "y"} and out["y"] is a["y"]
    with pytest.raises(UsageError, match="--exclude"):
        merge_state_dicts(a, a, W, exclude=["("])
    with pytest.raises(UsageError, match="--w"):
        merge_state_dicts(a, a, float("nan"))


# ---------------------------------------------------------------------------------- fixtures


def sd_pair(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[OrderedDict, OrderedDict]:
    """A small state dict with the cases merge must handle and its self-trained version."""
    g = torch.Generator().manual_seed(seed)
    r = OrderedDict()
    r["blocks.0.attn.weight"] = torch.randn(48, 32, generator=g).to(dtype)
    r["blocks.0.attn.bias"] = torch.randn(48, generator=g).to(dtype)
    r["blocks.0.norm.weight"] = torch.ones(32, dtype=dtype)  # equal in both
    r["bn.running_mean"] = torch.randn(8, generator=g)
    r["bn.running_var"] = torch.rand(8, generator=g) + 0.5
    r["bn.num_batches_tracked"] = torch.tensor(1000)
    r["attn_bias_for_masking"] = torch.full((1, 1, 6, 6), float("-inf")).triu(1)  # VAR's mask
    r["lvl_1L"] = torch.arange(6, dtype=torch.int64)
    r["head.weight"] = torch.randn(10, 32, generator=g).to(dtype)
    s = OrderedDict((k, v.clone()) for k, v in r.items())
    for k in ("blocks.0.attn.weight", "blocks.0.attn.bias", "head.weight"):
        s[k] = (r[k].double() * (1 + 0.02 * torch.randn(r[k].shape, generator=g, dtype=torch.float64))).to(dtype)
    s["bn.running_mean"] = r["bn.running_mean"] + 0.1
    s["bn.num_batches_tracked"] = torch.tensor(1200)
    return r, s


def expected(r: dict, s: dict, w: float, dtype: torch.dtype | None = None) -> dict:
    return merge_state_dicts(r, s, w, out_dtype=dtype)


def assert_sd_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for k in want:
        assert bit_equal(got[k], want[k]), k


def read_st(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        idx = json.loads((path / "model.safetensors.index.json").read_text())
        out = {}
        for shard in sorted(set(idx["weight_map"].values())):
            out.update(load_file(str(path / shard)))
        assert set(out) == set(idx["weight_map"])
        return out
    return load_file(str(path))


def rep() -> Report:
    return Report("merge", argv=["neon", "merge"])


def snapshot(*paths: Path) -> dict[str, str]:
    return {str(p): sha256_path(p) for p in paths}


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# ---------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_file_merge_safetensors_equals_in_memory_and_reports(tmp_path, dtype):
    r, s = sd_pair(dtype=dtype)
    save_file(r, str(tmp_path / "r.safetensors"), metadata={"family": "digits", "width": "64"})
    save_file(s, str(tmp_path / "s.safetensors"))
    out = tmp_path / "neon.safetensors"
    report = rep()
    res = merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W], [out], report=report, chunk_elements=100)
    assert_sd_equal(read_st(out), expected(r, s, W))
    assert res["merged"] == 3
    assert res["copied"] == {"batchnorm_stats": 3, "equal": 2, "non_float": 1}
    assert set(res["copied_names"]["equal"]) == {"blocks.0.norm.weight", "attn_bias_for_masking"}
    assert set(res["copied_but_different"]) == {"bn.running_mean", "bn.num_batches_tracked"}
    # norms over the merged tensors, against a direct computation
    d2 = sum(float(((s[k].double() - r[k].double()) ** 2).sum()) for k in ("blocks.0.attn.weight", "blocks.0.attn.bias", "head.weight"))
    r2 = sum(float((r[k].double() ** 2).sum()) for k in ("blocks.0.attn.weight", "blocks.0.attn.bias", "head.weight"))
    assert res["delta_norm"] == pytest.approx(math.sqrt(d2), rel=1e-5)
    assert res["relative_delta"] == pytest.approx(math.sqrt(d2 / r2), rel=1e-5)
    assert res["most_changed"][0]["relative_delta"] >= res["most_changed"][-1]["relative_delta"]
    # provenance and θ_r's metadata in the output header
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["family"] == "digits" and meta["width"] == "64" and meta["neon.w"] == "1.6"
    assert meta["neon.base_sha256"] == sha256_path(tmp_path / "r.safetensors")
    assert meta["neon.selftrained_sha256"] == sha256_path(tmp_path / "s.safetensors")
    assert meta["neon.formula"] == "theta_r - w * (theta_s - theta_r)"
    assert report.outputs[0]["sha256"] == sha256_path(out) == res["outputs"][0]["sha256"]
    assert [i["role"] for i in report.inputs] == ["base", "selftrained"]
    assert res["peak_rss_anon_bytes"] > 0 and res["seconds"] >= 0


def test_precision_statistics_against_direct_computation(tmp_path):
    """Share of equal elements and the effective w after rounding, recomputed by hand."""
    g = torch.Generator().manual_seed(3)
    r = torch.randn(20000, generator=g, dtype=torch.float64)
    s = r * (1 + 1e-3 * torch.randn(20000, generator=g, dtype=torch.float64))
    rb, sb = r.to(torch.bfloat16), s.to(torch.bfloat16)
    save_file({"x": rb}, str(tmp_path / "r.safetensors"))
    save_file({"x": sb}, str(tmp_path / "s.safetensors"))
    res = merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W, 0.5], [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], report=rep())
    eq = float((rb == sb).double().mean())
    assert eq > 0.5  # a 1e-3 update mostly vanishes in bfloat16 storage
    assert res["precision"]["equal_fraction"] == pytest.approx(eq, abs=1e-12)
    d = rb.double() - sb.double()
    for k, (w, name) in enumerate([(W, "a"), (0.5, "b")]):
        o = load_file(str(tmp_path / f"{name}.safetensors"))["x"].double()
        w_eff = float(((o - rb.double()) * d).sum() / (d * d).sum())
        assert res["precision"]["effective_w"][k] == pytest.approx(w_eff, rel=1e-5)
        assert res["tensors"][0]["effective_w"][k] == pytest.approx(w_eff, rel=1e-5)
    assert res["precision"]["suggest_dtype"] == "float32"
    # in float32 the realised w is the asked one and no suggestion is made
    res32 = merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W], [tmp_path / "c.safetensors"], dtype="float32", report=rep())
    assert res32["precision"]["effective_w"][0] == pytest.approx(W, rel=1e-5)
    assert res32["precision"]["suggest_dtype"] is None
    assert load_file(str(tmp_path / "c.safetensors"))["x"].dtype == torch.float32


def test_fp16_overflow_reported_as_nonfinite_result(tmp_path):
    r = torch.tensor([60000.0, 1.0, 30000.0], dtype=torch.float16)
    s = torch.tensor([50000.0, 1.5, 29984.0], dtype=torch.float16)
    save_file({"x": r}, str(tmp_path / "r.safetensors"))
    save_file({"x": s}, str(tmp_path / "s.safetensors"))
    res = merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W], [tmp_path / "o.safetensors"], report=rep(),
                            allow_nonfinite=True)
    o = load_file(str(tmp_path / "o.safetensors"))["x"]
    assert o[0].item() == float("inf") and o[2].item() == 30032.0
    assert res["nonfinite_results"] == [{"w": W, "tensors": {"x": 1}}]


def test_edm_like_container_pt_to_pt_and_safetensors(tmp_path):
    r, s = sd_pair()
    model_r = OrderedDict((k, torch.zeros_like(v)) for k, v in r.items())
    torch.save({"ema": r, "model": model_r, "step": 500, "loss_scale": 2.0}, tmp_path / "base.pt")
    torch.save({"ema": s, "model": model_r, "step": 600, "loss_scale": 2.0}, tmp_path / "ft.pt")
    res = merge_checkpoints(tmp_path / "base.pt", tmp_path / "ft.pt", [W], [tmp_path / "neon.pt"], report=rep())
    out = torch.load(tmp_path / "neon.pt", weights_only=True)
    assert res["key"] == {"base": "ema", "selftrained": "ema"}
    assert out["step"] == 500 and out["loss_scale"] == 2.0  # carried over from θ_r
    assert_sd_equal(out["model"], model_r)
    assert_sd_equal(out["ema"], expected(r, s, W))
    assert list(out["ema"]) == list(r)
    assert set(out) == {"ema", "model", "step", "loss_scale"}  # θ_r's container, nothing added
    # θ_r's archive byte for byte except the merged storages' bytes
    a, b = (tmp_path / "base.pt").read_bytes(), (tmp_path / "neon.pt").read_bytes()
    assert len(a) == len(b)
    import zipfile
    with zipfile.ZipFile(tmp_path / "base.pt") as za, zipfile.ZipFile(tmp_path / "neon.pt") as zb:
        assert zb.testzip() is None  # CRCs recomputed
        changed = [i.filename for i in za.infolist() if za.read(i) != zb.read(i.filename)]
    assert len(changed) == 3 and all("/data/" in c for c in changed)  # the 3 merged tensors' storages
    assert res["outputs"][0]["sha256"] == sha256_path(tmp_path / "neon.pt")
    res2 = merge_checkpoints(tmp_path / "base.pt", tmp_path / "ft.pt", [W], [tmp_path / "neon.safetensors"], report=rep())
    assert_sd_equal(read_st(tmp_path / "neon.safetensors"), expected(r, s, W))
    assert any("not written to a safetensors output" in m for m in res2["warnings"])


def test_var_like_flat_state_dict_with_module_prefix(tmp_path):
    r, s = sd_pair(dtype=torch.bfloat16)
    r_ddp = OrderedDict(("module." + k, v) for k, v in r.items())
    torch.save({"trainer": {"var_wo_ddp": r_ddp, "vae_local": {"q.weight": torch.ones(3)}}, "args": {"depth": 16}}, tmp_path / "ar-ckpt-best.pth")
    torch.save(s, tmp_path / "ft.pth")  # flat, no prefix
    # VAR's trainer checkpoint: trainer.var_wo_ddp is found without --key (vae_local named as the alternative)
    auto = merge_checkpoints(tmp_path / "ar-ckpt-best.pth", tmp_path / "ft.pth", [W], [tmp_path / "auto.pth"], report=rep())
    assert auto["key"]["base"] == "trainer.var_wo_ddp" and any("trainer.vae_local" in m for m in auto["warnings"])
    res = merge_checkpoints(tmp_path / "ar-ckpt-best.pth", tmp_path / "ft.pth", [W], [tmp_path / "o.pth"], key="trainer.var_wo_ddp", report=rep())
    assert (tmp_path / "auto.pth").read_bytes() == (tmp_path / "o.pth").read_bytes()
    assert res["prefix"] == {"base": "module.", "selftrained": ""}
    out = torch.load(tmp_path / "o.pth", weights_only=True)
    want = expected(r, s, W)
    got = out["trainer"]["var_wo_ddp"]
    assert list(got) == list(r_ddp)
    assert_sd_equal({k[len("module."):]: v for k, v in got.items()}, want)
    assert bit_equal(got["module.attn_bias_for_masking"], r["attn_bias_for_masking"])
    assert got["module.lvl_1L"].dtype == torch.int64
    assert torch.equal(out["trainer"]["vae_local"]["q.weight"], torch.ones(3)) and out["args"] == {"depth": 16}


def test_xar_like_training_checkpoint_needs_no_trust_pickle(tmp_path):
    """{model, model_ema, args: argparse.Namespace}: read inertly, written as θ_r's own archive."""
    r, s = sd_pair()
    args = argparse.Namespace(model="xar_l", lr=1e-4)
    torch.save({"model": {k: v.clone() for k, v in r.items()}, "model_ema": r, "args": args, "epoch": 799}, tmp_path / "checkpoint-last.pth")
    torch.save({"model": s, "model_ema": s, "args": args, "epoch": 800}, tmp_path / "ft.pth")
    before = snapshot(tmp_path / "checkpoint-last.pth", tmp_path / "ft.pth")
    res = merge_checkpoints(tmp_path / "checkpoint-last.pth", tmp_path / "ft.pth", [W], [tmp_path / "o.pth"], report=rep())
    assert res["key"]["base"] == "model_ema"
    out = torch.load(tmp_path / "o.pth", weights_only=False)
    assert_sd_equal(out["model_ema"], expected(r, s, W))
    assert_sd_equal(out["model"], r)  # carried over from θ_r
    assert out["args"] == args and out["epoch"] == 799
    assert snapshot(tmp_path / "checkpoint-last.pth", tmp_path / "ft.pth") == before


def test_edm_pickle_module_to_pickle(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    net_s = pickle.loads(pickle.dumps(net))
    with torch.no_grad():
        for p in net_s.parameters():
            p.add_(0.01 * torch.randn_like(p))
        net_s[1].running_mean.add_(1.0)
        net_s[1].num_batches_tracked.add_(7)
    for name, obj in (("base.pkl", net), ("ft.pkl", net_s)):
        with open(tmp_path / name, "wb") as fh:
            pickle.dump({"ema": obj, "augment_pipe": None}, fh)
    merge_checkpoints(tmp_path / "base.pkl", tmp_path / "ft.pkl", [W], [tmp_path / "neon.pkl"], report=rep())
    assert (tmp_path / "neon.pkl").stat().st_size == (tmp_path / "base.pkl").stat().st_size
    with open(tmp_path / "neon.pkl", "rb") as fh:
        out = pickle.load(fh)
    assert isinstance(out["ema"], torch.nn.Sequential) and set(out) == {"ema", "augment_pipe"}
    want = expected(net.state_dict(), net_s.state_dict(), W)
    assert_sd_equal(out["ema"].state_dict(), want)
    assert bit_equal(out["ema"][1].running_mean, net[1].running_mean)


def _write_sharded(folder: Path, sd: dict, groups: list[list[str]], extra_files: bool = True) -> None:
    folder.mkdir()
    wm = {}
    n = len(groups)
    for j, names in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k] for k in names}, str(folder / fname), metadata={"format": "pt"})
        wm.update({k: fname for k in names})
    total = sum(v.nbytes for v in sd.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json(wm, total)))
    if extra_files:
        (folder / "config.json").write_text('{"model_type": "tiny"}\n')


def test_sharded_folder_follows_base_shards_and_reshards(tmp_path):
    r, s = sd_pair(dtype=torch.bfloat16)
    names = list(r)
    groups = [names[:4], names[4:]]
    _write_sharded(tmp_path / "base", r, groups)
    _write_sharded(tmp_path / "ft", s, groups)
    res = merge_checkpoints(tmp_path / "base", tmp_path / "ft", [W], [tmp_path / "out"], report=rep())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in (tmp_path / "base").iterdir())
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    base_idx = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert idx["weight_map"] == base_idx["weight_map"]
    assert idx["metadata"]["total_size"] == sum(v.nbytes for v in r.values())
    assert idx["metadata"]["neon"]["neon.w"] == "1.6"
    assert_sd_equal(read_st(tmp_path / "out"), expected(r, s, W))
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "tiny"}\n'
    assert res["outputs"][0]["sha256"] == sha256_path(tmp_path / "out")
    # re-shard a single file into ~1 kB shards, float32 output
    save_file(r, str(tmp_path / "r.safetensors"))
    save_file(s, str(tmp_path / "s.safetensors"))
    merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W], [tmp_path / "resharded"], shard_size=1000, dtype="float32", report=rep())
    shards = sorted(p.name for p in (tmp_path / "resharded").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert_sd_equal(read_st(tmp_path / "resharded"), expected(r, s, W, torch.float32))


def test_several_w_read_each_tensor_once(tmp_path, monkeypatch):
    from neon_cli.checkpoint import core as ckmod

    r, s = sd_pair()
    save_file(r, str(tmp_path / "r.safetensors"))
    save_file(s, str(tmp_path / "s.safetensors"))
    reads: list[str] = []
    orig = ckmod.Checkpoint.raw_array

    def counting(self, raw):
        reads.append(f"{self.path.name}:{raw}")
        return orig(self, raw)

    monkeypatch.setattr(ckmod.Checkpoint, "raw_array", counting)
    ws = [0.5, 1.0, W]
    outs = [tmp_path / f"o{w}.safetensors" for w in ws]
    res = merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", ws, outs, report=rep())
    assert len(reads) == len(set(reads)) == 2 * len(r)  # every block of every input exactly once
    for w, o in zip(ws, outs):
        assert_sd_equal(read_st(o), expected(r, s, w))
    assert [o["w"] for o in res["outputs"]] == ws and len(res["precision"]["effective_w"]) == 3


def test_chunked_equals_whole(tmp_path):
    r, s = sd_pair(dtype=torch.float16)
    save_file(r, str(tmp_path / "r.safetensors"))
    save_file(s, str(tmp_path / "s.safetensors"))
    a = merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W], [tmp_path / "a.safetensors"], chunk_elements=64, report=rep())
    b = merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W], [tmp_path / "b.safetensors"], chunk_elements=1 << 20, report=rep())
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a["precision"]["effective_w"][0] == pytest.approx(b["precision"]["effective_w"][0], rel=1e-6)


def test_exclude_buffers_allow_missing_in_files(tmp_path):
    r, s = sd_pair()
    r["only_base.weight"] = torch.randn(3)
    s["only_ft.weight"] = torch.randn(3)
    save_file(r, str(tmp_path / "r.safetensors"))
    save_file(s, str(tmp_path / "s.safetensors"))
    with pytest.raises(CheckpointError, match=r"key 'only_base.weight': in .*r.safetensors but not in .*s.safetensors"):
        merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W], [tmp_path / "o.safetensors"], report=rep())
    res = merge_checkpoints(
        tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W], [tmp_path / "o.safetensors"],
        exclude=[r"^head\."], buffers={"blocks.0.attn.bias"}, allow_missing=True, report=rep(),
    )
    out = read_st(tmp_path / "o.safetensors")
    assert set(out) == set(r)
    for k in ("head.weight", "blocks.0.attn.bias", "only_base.weight"):
        assert bit_equal(out[k], r[k])
    assert res["copied_names"]["excluded"] == ["head.weight"]
    assert res["copied_names"]["buffer"] == ["blocks.0.attn.bias"]
    assert res["copied_names"]["only_in_base"] == ["only_base.weight"]
    assert res["ignored_selftrained_only"] == ["only_ft.weight"]


def test_dry_run_writes_nothing(tmp_path):
    r, s = sd_pair()
    save_file(r, str(tmp_path / "r.safetensors"))
    save_file(s, str(tmp_path / "s.safetensors"))
    before = listing(tmp_path)
    report = rep()
    res = merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [0.5, W], [tmp_path / "a.pt", tmp_path / "b.pt"], dry_run=True, report=report)
    assert listing(tmp_path) == before
    assert res["planned"] == {"merge": 5, "batchnorm_stats": 3, "non_float": 1}  # equality is only known from the data
    assert report.outputs == [] and all(i["sha256"] is None for i in report.inputs)
    with pytest.raises(CheckpointError, match="shape"):
        s2 = dict(s)
        s2["head.weight"] = torch.zeros(3, 3)
        save_file(s2, str(tmp_path / "s2.safetensors"))
        merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s2.safetensors", [W], [tmp_path / "a.pt"], dry_run=True, report=rep())


# ---------------------------------------------------------------------------------- errors


def _err_case(tmp_path: Path, case: str):
    r, s = sd_pair()
    rp, sp = tmp_path / "r.safetensors", tmp_path / "s.safetensors"
    out = tmp_path / "o.safetensors"
    kw: dict = {}
    if case == "shape":
        s["head.weight"] = torch.zeros(5, 5)
    elif case == "dtype":
        s["head.weight"] = s["head.weight"].double()
    elif case == "missing":
        del s["head.weight"]
    save_file(r, str(rp))
    save_file(s, str(sp))
    if case == "truncated":
        data = sp.read_bytes()
        sp.write_bytes(data[: len(data) - 100])
    elif case == "output_is_input":
        out = sp
    elif case == "output_is_base":
        out = Path(str(rp))
    elif case == "bad_regex":
        kw["exclude"] = ["[unclosed"]
    elif case == "pkl_output":
        out = tmp_path / "o.pkl"
    elif case == "count":
        return rp, sp, [tmp_path / "a.safetensors"], {"ws": [0.5, W]}
    elif case == "mixed_suffix":
        return rp, sp, [tmp_path / "a.safetensors", tmp_path / "b.pt"], {"ws": [0.5, W]}
    elif case == "folder_without_shard_size":
        out = tmp_path / "outdir"
    return rp, sp, [out], kw


@pytest.mark.parametrize(
    "case,exc,pattern",
    [
        ("shape", CheckpointError, r"key 'head.weight': shape \[10, 32\]"),
        ("dtype", CheckpointError, r"key 'head.weight': dtype float32 in .* but float64"),
        ("missing", CheckpointError, r"key 'head.weight': in .*r.safetensors but not in"),
        ("truncated", CheckpointError, r"s.safetensors: not a readable safetensors file"),
        ("output_is_input", UsageError, r"-o: .*s.safetensors is also the input selftrained"),
        ("output_is_base", UsageError, r"-o: .*r.safetensors is also the input base"),
        ("bad_regex", UsageError, r"--exclude '\[unclosed'"),
        ("pkl_output", UsageError, r"\.pkl output needs a pickle base"),
        ("count", UsageError, r"1 output paths for 2 weights"),
        ("mixed_suffix", UsageError, r"same layout"),
        ("folder_without_shard_size", UsageError, r"--shard-size"),
    ],
)
def test_errors_leave_no_output_and_inputs_untouched(tmp_path, case, exc, pattern):
    rp, sp, outs, kw = _err_case(tmp_path, case)
    ws = kw.pop("ws", [W])
    before = snapshot(rp, sp)
    files_before = listing(tmp_path)
    with pytest.raises(exc, match=pattern) as err:
        merge_checkpoints(rp, sp, ws, outs, report=rep(), **kw)
    assert "\n" not in str(err.value)
    assert snapshot(rp, sp) == before
    assert listing(tmp_path) == files_before  # no output, no temporary file


def test_error_during_writing_removes_partial_outputs(tmp_path, monkeypatch):
    from neon_cli import merge as mmod

    r, s = sd_pair()
    save_file(r, str(tmp_path / "r.safetensors"))
    save_file(s, str(tmp_path / "s.safetensors"))
    (tmp_path / "out").mkdir()
    before = listing(tmp_path)
    calls = {"n": 0}
    orig = mmod._merge_block

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise CheckpointError("simulated read failure")
        return orig(*a, **k)

    monkeypatch.setattr(mmod, "_merge_block", failing)
    for outs, kw in (
        ([tmp_path / "out" / "a.safetensors", tmp_path / "out" / "b.safetensors"], {}),
        ([tmp_path / "out" / "a.pt", tmp_path / "out" / "b.pt"], {}),
        ([tmp_path / "out" / "sa", tmp_path / "out" / "sb"], {"shard_size": 500}),
    ):
        calls["n"] = 0
        with pytest.raises(CheckpointError, match="simulated"):
            merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [0.5, W], outs, report=rep(), **kw)
        assert listing(tmp_path) == before


def test_existing_nonempty_output_folder_refused(tmp_path):
    r, s = sd_pair()
    save_file(r, str(tmp_path / "r.safetensors"))
    save_file(s, str(tmp_path / "s.safetensors"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="not an empty folder"):
        merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W], [tmp_path / "out"], shard_size=10**6, report=rep())
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_output_overwrites_existing_file_atomically(tmp_path):
    r, s = sd_pair()
    save_file(r, str(tmp_path / "r.safetensors"))
    save_file(s, str(tmp_path / "s.safetensors"))
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    merge_checkpoints(tmp_path / "r.safetensors", tmp_path / "s.safetensors", [W], [out], report=rep())
    assert_sd_equal(read_st(out), expected(r, s, W))


def test_in_memory_merge_refuses_a_new_nonfinite_result_naming_the_first_key():
    """Issue 22 (4) for tune-w / eval's in-memory merge: the same refusal as the streaming merge's
    (the first key, w, and the dtype that helps or none); inputs' own inf/NaN stay allowed (kept from θ_r)."""
    r = {"a": torch.tensor([1.0, float("inf")]), "b": torch.tensor([1.0, 2.0]), "c": torch.tensor([0.0, 1.0])}
    s = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, -1e10]), "c": torch.tensor([1.0, 1.0])}
    # a: d = [0, inf] -> [1, inf kept from θ_r]; b: 2 + 1e30 * 1e10 overflows float32 (the compute dtype); c: finite
    with pytest.raises(UsageError, match=r"tensor 'b'.*w=1e\+30 gives 1 non-finite.*range of float32; no output dtype helps"):
        merge_state_dicts(r, s, 1e30)
    out = merge_state_dicts(r, s, 1e30, allow_nonfinite=True)
    assert math.isinf(out["b"][1].item()) and math.isinf(out["a"][1].item())
    assert merge_state_dicts(r, s, 0.5)["a"][1].item() == float("inf")  # non-finite input, not a new result: allowed
    h = {"x": torch.tensor([60000.0, 1.0], dtype=torch.float16)}
    hs = {"x": torch.tensor([50000.0, 1.0], dtype=torch.float16)}
    with pytest.raises(UsageError, match=r"tensor 'x'.*overflow float16, the output dtype; out_dtype=float32 keeps them finite"):
        merge_state_dicts(h, hs, 1.0)  # 60000 + 10000 = 70000 > fp16 max 65504, finite in float32
    want = 2 * h["x"].double() - hs["x"].double()  # θ_r - 1 (θ_s - θ_r) of the float16 inputs (50000 -> 49984)
    assert torch.equal(merge_state_dicts(h, hs, 1.0, out_dtype="float32")["x"].double(), want)
