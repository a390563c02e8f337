"""Request objects (neon_cli/requests.py, issue 25): built from flags or field by field, validated once
with the flag named, carrying the plan the error boundary and --dry-run use."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from neon_cli.errors import UsageError
from neon_cli.plan import merge_plan
from neon_cli.requests import (
    AlignOptions,
    AlignRequest,
    ExportRequest,
    MergeOptions,
    MergeRequest,
    SeedPlan,
    parse_weights,
)


def test_merge_request_from_flags_equals_the_one_built_in_code(tmp_path):
    flags = MergeRequest.from_flags(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "0.5, 1.6",
                                    str(tmp_path / "o-{w}.safetensors"), key="ema", exclude=["^head"], report=tmp_path / "r.json")
    code = MergeRequest(tmp_path / "a.safetensors", tmp_path / "b.safetensors", (0.5, 1.6),
                        (tmp_path / "o-0.5.safetensors", tmp_path / "o-1.6.safetensors"),
                        MergeOptions(key="ema", exclude=("^head",)), tmp_path / "r.json")
    assert flags == code and flags.validate() is flags
    assert flags.settings()["w"] == "0.5, 1.6" and flags.settings()["exclude"] == ["^head"]
    assert flags.plan() == code.plan()  # the same reads and writes whichever way it was built
    roles = code.plan().roles()
    assert {f"-o ({tmp_path / 'o-0.5.safetensors'})", f"-o ({tmp_path / 'o-1.6.safetensors'})", "--report"} <= roles
    with pytest.raises(dataclasses.FrozenInstanceError):
        code.ws = (1.0,)  # type: ignore[misc]


def test_a_flag_that_does_not_parse_is_raised_by_validate_and_the_plan_still_guards_the_report(tmp_path):
    req = MergeRequest.from_flags(tmp_path / "a.pt", tmp_path / "b.pt", "1,x", str(tmp_path / "o.pt"), report=tmp_path / "r.json")
    with pytest.raises(UsageError, match=r"^--w 1,x: 'x' is not a number$"):
        req.validate()
    assert req.plan() == merge_plan(base=tmp_path / "a.pt", selftrained=tmp_path / "b.pt", outputs=[str(tmp_path / "o.pt")],
                                    report=tmp_path / "r.json")
    empty = MergeRequest.from_flags(tmp_path / "a.pt", tmp_path / "b.pt", "1", "")
    assert [m for _, m in empty.plan().problems] == ["-o: empty path; give a path"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(ws=(), outputs=()), "--w: give at least one weight"),
    (dict(ws=(float("nan"),), outputs=(Path("o.safetensors"),)), "--w: must be a finite number"),
    (dict(ws=(1.0, 2.0), outputs=(Path("o.safetensors"),)), "-o: 1 output paths for 2 weights"),
    (dict(ws=(1.0, 2.0), outputs=(Path("o.safetensors"), Path("o.pt"))), "-o: all outputs must have the same layout"),
    (dict(ws=(1.0,), outputs=(Path("o"),), options=MergeOptions(shard_size="2XB")), "--shard-size 2XB: expected a size"),
    (dict(ws=(1.0,), outputs=(Path("o"),), options=MergeOptions(shard_size=0)), "--shard-size"),
    (dict(ws=(1.0,), outputs=(Path("o.safetensors"),), options=MergeOptions(dtype="float7")), "float7"),
    (dict(ws=(1.0,), outputs=(Path("o.safetensors"),), options=MergeOptions(exclude=("(",))), "--exclude '('"),
])
def test_merge_request_validate_names_the_flag(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        MergeRequest(Path("a.safetensors"), Path("b.safetensors"), **kwargs).validate()


def test_shard_size_text_is_parsed_in_bytes():
    req = MergeRequest(Path("a"), Path("b"), (1.0,), (Path("o"),), MergeOptions(shard_size="1.5GiB"))
    assert req.shard_bytes() == int(1.5 * 2**30)
    assert parse_weights("0.5,1.0") == [("0.5", 0.5), ("1.0", 1.0)]


@pytest.mark.parametrize("req, flag", [
    (AlignRequest("gaussian"), "--selftrained"),
    (AlignRequest("gaussian", synthetic=Path("S"), options=AlignOptions(precond="lbfgs")), "--precond"),
    (AlignRequest("gaussian", synthetic=Path("S"), real_draw=SeedPlan(seed=0, num=0)), "--num-real"),
    (AlignRequest("gaussian", synthetic=Path("S"), real_draw=SeedPlan(seed=-1, num=5)), "--real-seed"),
    (AlignRequest("gaussian", synthetic=Path("S"), options=AlignOptions(batch=0)), "--batch"),
    (AlignRequest("gaussian", synthetic=Path("S"), options=AlignOptions(curvature_step=-1.0)), "--curvature-step"),
])
def test_align_request_validate_names_the_flag(req, flag):
    with pytest.raises(UsageError, match=f"^{flag}|\\({flag}\\)"):
        req.validate()


def test_align_and_export_requests_validate_and_plan(tmp_path):
    ok = AlignRequest("gaussian", selftrained=tmp_path / "s.safetensors", options=AlignOptions(curvature_step=0.0))
    assert ok.validate() is ok and ok.settings()["curvature_step"] == 0.0 and ok.settings()["num_real"] == 10_000
    assert any(e.role == "--selftrained" for e in ok.plan().reads)
    with pytest.raises(UsageError, match="^--format: 'tar'"):
        ExportRequest(tmp_path, tmp_path / "x.zip", fmt="tar").validate()
    with pytest.raises(UsageError, match="^-o: .*x.tar: the edm-zip format is a .zip file"):
        ExportRequest(tmp_path, tmp_path / "x.tar").validate()
    assert ExportRequest(tmp_path, tmp_path / "x.zip").plan().roles() >= {"-o", "-o lock"}


# ---- synth / finetune / eval / fid / ref-stats ----

from neon_cli.requests import (  # noqa: E402
    EvalGates,
    EvalRequest,
    FidRequest,
    FinetuneOptions,
    FinetuneRequest,
    RefStatsRequest,
    Scoring,
    SynthRequest,
)


@pytest.mark.parametrize("req, message", [
    (SynthRequest("digits", None, Path("S"), SeedPlan(seed=0, num=0), shard_size=0), "^--num-images: must be >= 1, got 0$"),
    (SynthRequest("digits", None, Path("S"), SeedPlan(seed=0, num=5), shard_size=0, batch=0), "^--shard-size: must be >= 1"),
    (SynthRequest("digits", None, Path("S"), SeedPlan(seed=2**63 - 3, num=5)), "^--seed: seeds must stay within"),
    (SynthRequest("digits", None, Path("S"), SeedPlan(seed=0, num=5), labels="nope"), "^--labels: unknown protocol 'nope'"),
    (FinetuneRequest("toy", None, Path("S"), Path("ft"), FinetuneOptions(budget=0, lr=-1.0)), "^--budget: must be >= 1"),
    (FinetuneRequest("toy", None, Path("S"), Path("ft"), FinetuneOptions(budget=8, lr=-1.0, batch=0)), "^--lr: must be > 0"),
    (FinetuneRequest("toy", None, Path("S"), Path("ft"), FinetuneOptions(budget=8, ema_halflife=-1)), "^--ema-halflife"),
    (FinetuneRequest("toy", None, Path("S"), Path("ft"), FinetuneOptions(budget=8, seed=2**42)), "^--seed"),
    (EvalRequest("digits", draw=SeedPlan(seed=0, num=1)), "^--num-samples: must be >= 2, got 1$"),
    (EvalRequest("digits", gates=EvalGates(max_metric=("fd_digits",))), "^--max-metric 'fd_digits': expected METRIC=NUMBER$"),
    (EvalRequest("digits", gates=EvalGates(gate_se=-1.0)), "^--gate-se"),
    (EvalRequest("digits", gates=EvalGates(thresholds=(("fd_digits", float("nan")),))), "^--max-metric fd_digits"),
    (FidRequest(Path("a.npz"), Path("b.npz"), batch=0, num_images=1), "^--batch: must be >= 1"),
    (FidRequest(Path("a.npz"), Path("b.npz"), num_images=1), "^--num-images: must be >= 2"),
    (FidRequest(Path("nowhere-a.npz"), Path("b.npz")), "^A: nowhere-a.npz does not exist$"),
    (RefStatsRequest(Path("i"), Path("o.txt"), batch=0), "^--batch: must be >= 1"),
    (RefStatsRequest(Path("i"), Path("o.txt")), r"^-o: o.txt: the statistics file must end in \.npz$"),
    (RefStatsRequest(Path("i"), Path("o.npz"), keep_features=True, pixels=True), "^--pixels: --keep-features"),
])
def test_new_requests_validate_in_the_commands_order_naming_the_flag(req, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: nothing outside tmp_path is looked at
    with pytest.raises(UsageError, match=message):
        req.validate()


def test_new_requests_settings_and_plans(tmp_path):
    synth = SynthRequest("digits", None, tmp_path / "S", SeedPlan(seed=3, num=25), ("steps=2",), shard_size=10,
                         report=tmp_path / "r.json")
    assert synth.validate() == synth and list(synth.settings()) == [
        "family", "model", "num", "out", "seed", "set", "shard_size", "batch", "labels", "trust_pickle"]
    assert {str(e.path) for e in synth.plan().writes} >= {str(tmp_path / "S" / f"shard-0000{k}.safetensors") for k in range(3)}
    ft = FinetuneRequest("digits", None, tmp_path / "S", tmp_path / "ft", FinetuneOptions(budget=48, recipe="paper"))
    assert ft.validate() is ft and ft.settings()["recipe"] == "paper" and ft.settings()["set"] == []
    assert any(e.role == "--data" for e in ft.plan().reads)
    ev = EvalRequest("digits", gates=EvalGates(max_fid=2, min_metric=("precision=0.5",), gate_se=1))
    assert ev.validate().gates.gate_se == 1.0 and isinstance(ev.validate().gates.gate_se, float)
    assert ev.gates.limits() == {"fid": (2.0, "--max-fid"), "precision<min": (0.5, "--min-metric precision")}
    assert ev.settings()["num_samples"] == 2000 and ev.settings()["seed"] == 20_000_000
    stats = tmp_path / "ref.npz"
    stats.write_bytes(b"")
    fid = FidRequest(stats, stats, Scoring(detector="det.pt"), num_images=10)
    assert fid.validate() == fid and fid.settings()["detector"] == "det.pt"
    rs = RefStatsRequest(stats, tmp_path / "o.npz").plan()
    assert rs.roles() >= {"-o", "-o lock"} and any(e.role == "--images" for e in rs.reads)
