"""``neon merge`` through typer's CliRunner: flags, outputs, reports, exit codes, messages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from neon_cli.commands import app
from neon_cli.fsutil import sha256_path
from neon_cli.merge import merge_state_dicts

runner = CliRunner()


def _pair(tmp_path: Path, dtype=torch.float32, rel: float = 0.05) -> tuple[Path, Path, dict, dict]:
    g = torch.Generator().manual_seed(0)
    r = {
        "net.0.weight": torch.randn(32, 16, generator=g).to(dtype),
        "net.0.bias": torch.randn(32, generator=g).to(dtype),
        "bn.running_var": torch.rand(32, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(10),
    }
    s = {k: v.clone() for k, v in r.items()}
    for k in ("net.0.weight", "net.0.bias"):
        s[k] = (r[k].double() * (1 + rel * torch.randn(r[k].shape, generator=g, dtype=torch.float64))).to(dtype)
    s["bn.num_batches_tracked"] = torch.tensor(20)
    rp, sp = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    save_file(r, str(rp), metadata={"family": "digits"})
    save_file(s, str(sp), metadata={"family": "digits"})
    return rp, sp, r, s


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_help_has_example_and_flags():
    res = runner.invoke(app, ["merge", "--help"])
    assert res.exit_code == 0
    for text in ("Example", "neon merge base.safetensors", "--w", "--shard-size", "--dry-run", "--exclude", "--allow-missing", "--key", "--dtype"):
        assert text in res.stdout, text


def test_merge_writes_output_and_report(tmp_path):
    rp, sp, r, s = _pair(tmp_path)
    out, rep = tmp_path / "neon.safetensors", tmp_path / "merge.json"
    res = runner.invoke(app, ["merge", str(rp), str(sp), "--w", "1.6", "-o", str(out), "--report", str(rep), "-q"])
    assert res.exit_code == 0, res.output
    got = load_file(str(out))
    want = merge_state_dicts(r, s, 1.6)
    for k in want:
        assert torch.equal(got[k], want[k])
    report = json.loads(rep.read_text())
    assert report["schema"] == "neon.report/1" and report["command"] == "merge" and report["status"] == "ok"
    assert {i["role"]: i["sha256"] for i in report["inputs"]} == {"base": sha256_path(rp), "selftrained": sha256_path(sp)}
    assert report["outputs"] == [{"role": "merged w=1.6", "path": str(out), "sha256": sha256_path(out)}]
    assert report["settings"]["w"] == "1.6" and report["results"]["merged"] == 2
    assert report["results"]["copied"] == {"batchnorm_stats": 2}
    assert "merged 2 tensors" in res.stdout and "effective w" in res.stdout


def test_several_weights_with_w_placeholder_and_json(tmp_path):
    rp, sp, r, s = _pair(tmp_path)
    res = runner.invoke(app, ["merge", str(rp), str(sp), "--w", "0.5, 1.0,1.6", "-o", str(tmp_path / "neon-w{w}.pt"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [o["w"] for o in data["outputs"]] == [0.5, 1.0, 1.6]
    for tok, w in (("0.5", 0.5), ("1.0", 1.0), ("1.6", 1.6)):
        got = torch.load(tmp_path / f"neon-w{tok}.pt", weights_only=True)
        want = merge_state_dicts(r, s, w)
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--w", "0.5,1.6", "-o", "OUT/x.safetensors"], "-o OUT/x.safetensors: several weights need '{w}'"),
        (["--w", "abc", "-o", "OUT/x.safetensors"], "--w abc: 'abc' is not a number"),
        (["--w", "1,1", "-o", "OUT/x{w}.safetensors"], "a weight is repeated"),
        (["--w", "1.6", "-o", "OUT/x", "--shard-size", "lots"], "--shard-size lots"),
        (["--w", "1.6", "-o", "OUT/x.safetensors", "--dtype", "int4"], "--dtype int4"),
        (["--w", "1.6", "-o", "OUT/x.safetensors", "--exclude", "(("], "--exclude '(('"),
        (["--w", "1.6", "-o", "OUT/x.safetensors", "--shard-size", "1GB"], "--shard-size writes a folder"),
        (["--w", "1.6", "-o", "BASE"], "is also the input base"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
    rp, sp, _, _ = _pair(tmp_path)
    out_dir = tmp_path / "OUTDIR"
    out_dir.mkdir()
    args = [a.replace("OUT", str(out_dir)).replace("BASE", str(rp)) for a in args]
    message = message.replace("OUT", str(out_dir))
    before = sha256_path(rp), sha256_path(sp)
    res = runner.invoke(app, ["merge", str(rp), str(sp), *args, "-q"])
    assert res.exit_code == 2, res.output
    assert message in res.stderr.replace("\n", "")
    assert res.stderr.startswith("neon merge: error:")
    assert _files(out_dir) == []
    assert (sha256_path(rp), sha256_path(sp)) == before


def test_key_mismatch_error_names_key_and_writes_error_report(tmp_path):
    rp, sp, r, s = _pair(tmp_path)
    s = dict(s)
    s["net.0.bias"] = torch.zeros(31)
    save_file(s, str(sp))
    rep = tmp_path / "r.json"
    res = runner.invoke(app, ["merge", str(rp), str(sp), "--w", "1.6", "-o", str(tmp_path / "o.safetensors"), "--report", str(rep), "-q"])
    assert res.exit_code == 2
    assert "key 'net.0.bias': shape [32]" in res.stderr
    assert not (tmp_path / "o.safetensors").exists()
    data = json.loads(rep.read_text())
    assert data["status"] == "error" and "net.0.bias" in data["error"]


def test_pickled_objects_need_no_trust_pickle(tmp_path):
    """A training state holding argparse.Namespace merges without --trust-pickle (still accepted)."""
    _, _, r, s = _pair(tmp_path)
    ns = argparse.Namespace(epochs=800)
    torch.save({"model": {k: v.clone() for k, v in r.items()}, "model_ema": r, "args": ns}, tmp_path / "b.pth")
    torch.save({"model": s, "model_ema": s, "args": ns}, tmp_path / "f.pth")
    cmd = ["merge", str(tmp_path / "b.pth"), str(tmp_path / "f.pth"), "--w", "1", "-o", str(tmp_path / "o.pth"), "-q"]
    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, [*cmd[:-3], "-o", str(tmp_path / "o2.pth"), "--trust-pickle", "-q"]).exit_code == 0
    out = torch.load(tmp_path / "o.pth", weights_only=False)
    want = merge_state_dicts(r, s, 1.0)
    assert all(torch.equal(out["model_ema"][k], want[k]) for k in want) and out["args"] == ns


def test_dry_run_writes_only_the_report(tmp_path):
    rp, sp, _, _ = _pair(tmp_path)
    before = _files(tmp_path)
    res = runner.invoke(app, ["merge", str(rp), str(sp), "--w", "1.6", "-o", str(tmp_path / "o.safetensors"), "--dry-run", "--report", str(tmp_path / "dry.json")])
    assert res.exit_code == 0, res.output
    assert _files(tmp_path) == sorted(before + ["dry.json"])
    data = json.loads((tmp_path / "dry.json").read_text())
    assert data["results"]["dry_run"] is True and data["results"]["planned"] == {"merge": 2, "batchnorm_stats": 2}
    assert "dry run" in res.stdout and "nothing written" in res.stdout


def test_suggests_float32_when_bf16_loses_the_update(tmp_path):
    rp, sp, _, _ = _pair(tmp_path, dtype=torch.bfloat16, rel=1e-3)
    res = runner.invoke(app, ["merge", str(rp), str(sp), "--w", "1.6", "-o", str(tmp_path / "o.safetensors"), "-q"])
    assert res.exit_code == 0, res.output
    assert "--dtype float32" in res.stderr.replace("\n", " ")
    res = runner.invoke(app, ["merge", str(rp), str(sp), "--w", "1.6", "-o", str(tmp_path / "o32.safetensors"), "--dtype", "float32", "-q"])
    assert res.exit_code == 0 and "--dtype float32" not in (res.stdout + res.stderr).replace("\n", " ")
    assert load_file(str(tmp_path / "o32.safetensors"))["net.0.weight"].dtype == torch.float32


def test_sharded_output_with_shard_size(tmp_path):
    rp, sp, r, s = _pair(tmp_path)
    res = runner.invoke(app, ["merge", str(rp), str(sp), "--w", "1.6", "-o", str(tmp_path / "neon"), "--shard-size", "1kB", "-q"])
    assert res.exit_code == 0, res.output
    idx = json.loads((tmp_path / "neon" / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(r) and len(set(idx["weight_map"].values())) >= 2
