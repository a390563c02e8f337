"""Folder merges as the libraries lay them out (diffusers pipelines, bare model folders, sharded and
.bin forms) and the output-safety rules of issue 12 for ``neon merge``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from neon_cli.commands import app
from neon_cli.errors import CheckpointError, UsageError
from neon_cli.fsutil import exclusive_lock, sha256_path
from neon_cli.merge import merge_checkpoints, merge_state_dicts
from neon_cli.report import Report

runner = CliRunner()
UNET_CFG = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def rep() -> Report:
    return Report("merge")


def _unet(seed: int):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    m = UNet2DModel(**UNET_CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _pipeline(path: Path, seed: int, ema: bool = True, **save_kw) -> torch.nn.Module:
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = _unet(seed)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(str(path), **save_kw)
    if ema:
        _unet(seed + 100).save_pretrained(str(path / "unet_ema"), **save_kw)
    return unet


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    r, s = root / "base_pipe", root / "ft_pipe"
    ur, us = _pipeline(r, 0), _pipeline(s, 1)
    (r / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"stale weights a loader could prefer")  # not copied
    return r, s, ur, us


def test_diffusers_pipeline_merge_loads_in_diffusers(pipes, tmp_path):
    from diffusers import DDPMPipeline, UNet2DModel

    r, s, ur, us = pipes
    out = tmp_path / "neon_pipe"
    res = runner.invoke(app, ["merge", str(r), str(s), "--w", "1", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["components"] == ["unet", "unet_ema"]
    assert "unet/diffusion_pytorch_model.bin" in data["not_copied"]
    assert not (out / "unet" / "diffusion_pytorch_model.bin").exists()
    for f in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "unet_ema/config.json"):
        assert (out / f).read_bytes() == (r / f).read_bytes(), f
    pipe = DDPMPipeline.from_pretrained(str(out))
    want = merge_state_dicts(ur.state_dict(), us.state_dict(), 1.0)
    got = pipe.unet.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    ema = UNet2DModel.from_pretrained(str(out), subfolder="unet_ema")
    er = UNet2DModel.from_pretrained(str(r), subfolder="unet_ema").state_dict()
    es = UNet2DModel.from_pretrained(str(s), subfolder="unet_ema").state_dict()
    want_e = merge_state_dicts(er, es, 1.0)
    assert all(torch.equal(ema.state_dict()[k], want_e[k]) for k in want_e)
    assert data["outputs"][0]["sha256"] == sha256_path(out)


@pytest.mark.parametrize("form", ["sharded", "bin"])
def test_bare_model_folder_forms(tmp_path, form):
    from diffusers import UNet2DModel

    kw = {"max_shard_size": "20KB"} if form == "sharded" else {"safe_serialization": False}
    a, b = _unet(0), _unet(1)
    a.save_pretrained(str(tmp_path / "a"), **kw)
    b.save_pretrained(str(tmp_path / "b"), **kw)
    if form == "sharded":
        assert (tmp_path / "a" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    merge_checkpoints(tmp_path / "a", tmp_path / "b", [1.6], [tmp_path / "o"], report=rep())
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "a").iterdir()) or form == "sharded"
    got = UNet2DModel.from_pretrained(str(tmp_path / "o")).state_dict()
    want = merge_state_dicts(a.state_dict(), b.state_dict(), 1.6)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_flow_sidecar_carried_to_output(tmp_path):
    torch.save({"ema_model": {"w": torch.ones(3)}, "step": 1}, tmp_path / "base.pt")
    torch.save({"ema_model": {"w": torch.zeros(3)}, "step": 2}, tmp_path / "ft.pt")
    (tmp_path / "base.pt.json").write_text('{"model_args": {"dim": [3, 8, 8]}}')
    merge_checkpoints(tmp_path / "base.pt", tmp_path / "ft.pt", [1.0], [tmp_path / "neon.pt"], report=rep())
    assert (tmp_path / "neon.pt.json").read_text() == '{"model_args": {"dim": [3, 8, 8]}}'


# ---------------------------------------------------------------------------------- sharded indexes (12.2)


def _sharded(folder: Path, tensors: dict, shard: str = "model-00001-of-00001.safetensors") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: shard for k in tensors}}))


@pytest.mark.parametrize("shard", ["../x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors"])
def test_index_shard_names_outside_the_folder_refused(tmp_path, shard):
    t = {"w": torch.randn(4)}
    outside = tmp_path / "x.safetensors"
    save_file(t, str(outside))
    (tmp_path / "b" / "sub").mkdir(parents=True)
    save_file(t, str(tmp_path / "b" / "sub" / "x.safetensors"))
    _sharded(tmp_path / "b", t, shard)
    _sharded(tmp_path / "s", t)
    before = sha256_path(outside)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: shard name .* must be a plain file name"):
        merge_checkpoints(tmp_path / "b", tmp_path / "s", [1.0], [tmp_path / "o"], report=rep())
    assert sha256_path(outside) == before and not (tmp_path / "o").exists()


def test_sharded_output_names_are_neons_and_weights_not_copied(tmp_path):
    t = {f"l{i}.w": torch.randn(64) for i in range(3)}
    for name in ("b", "s"):
        d = tmp_path / name
        d.mkdir()
        save_file({"l0.w": t["l0.w"], "l1.w": t["l1.w"]}, str(d / "weird-name-A.safetensors"))
        save_file({"l2.w": t["l2.w"]}, str(d / "weird-name-B.safetensors"))
        wm = {"l0.w": "weird-name-A.safetensors", "l1.w": "weird-name-A.safetensors", "l2.w": "weird-name-B.safetensors"}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    for junk in ("pytorch_model.bin", "model.safetensors", "optimizer.pt", "training_args.bin", "rng_state.pth"):
        (tmp_path / "b" / junk).write_bytes(b"theta_r junk")
    (tmp_path / "b" / "tokenizer.json").write_text("{}")
    (tmp_path / "b" / "link.json").symlink_to("/etc/hostname")
    res = merge_checkpoints(tmp_path / "b", tmp_path / "s", [1.0], [tmp_path / "o"], report=rep())
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    assert "link.json" in res["not_copied"] and "optimizer.pt" in res["not_copied"]


def test_two_index_files(tmp_path):
    t = {"w": torch.randn(4)}
    for name in ("b", "s"):
        _sharded(tmp_path / name, t)
        (tmp_path / name / "pytorch_model.bin.index.json").write_text("{}")  # transformers prefers safetensors
    merge_checkpoints(tmp_path / "b", tmp_path / "s", [1.0], [tmp_path / "o"], report=rep())
    d = tmp_path / "u"
    d.mkdir()
    for n in ("a.index.json", "b.index.json"):
        (d / n).write_text("{}")
    with pytest.raises(CheckpointError, match=r"several index files \(a.index.json, b.index.json\)"):
        merge_checkpoints(d, d, [1.0], [tmp_path / "o2"], report=rep())


# ---------------------------------------------------------------------------------- outputs (12.1, 12.3, 12.4, 12.5, 12.6)


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    save_file({"w": torch.randn(8, 8)}, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.randn(8, 8)}, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


@pytest.mark.parametrize("args,flag", [
    (["-o", "OUT.safetensors", "--report", "BASE"], "--report"),
    (["-o", "OUT.safetensors", "--report", "./FT"], "--report"),
    (["-o", "OUT-{w}.safetensors", "--report", "OUT-1.safetensors", "--w", "0.5,1"], "--report"),
])
def test_report_and_outputs_never_an_input(tmp_path, args, flag):
    b, f = _pair(tmp_path)
    os.chdir(tmp_path)
    args = [a.replace("BASE", str(b)).replace("FT", f.name).replace("OUT", str(tmp_path / "out")) for a in args]
    if "--w" not in args:
        args += ["--w", "1.6"]
    before = sha256_path(b), sha256_path(f)
    res = runner.invoke(app, ["merge", str(b), str(f), *args, "-q"])
    assert res.exit_code == 2 and flag in res.stderr, res.output
    assert (sha256_path(b), sha256_path(f)) == before
    merged = [p for p in tmp_path.glob("out*") if not p.read_bytes().startswith(b"{")]  # only an error report may be there
    assert merged == []


def test_second_run_on_same_output_refused_and_stale_tmp_cleaned(tmp_path):
    b, f = _pair(tmp_path)
    out = tmp_path / "o.safetensors"
    with exclusive_lock(out, "-o"):
        with pytest.raises(UsageError, match="being written by another neon run"):
            merge_checkpoints(b, f, [1.0], [out], report=rep())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = out.with_name(f".{out.name}.tmp-{dead}")
    stale.write_bytes(b"x" * 1000)  # what a SIGKILLed merge leaves
    merge_checkpoints(b, f, [1.0], [out], report=rep())
    assert not stale.exists() and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "ft.safetensors", "o.safetensors"]


@pytest.mark.parametrize("args,flag", [
    (["--w", "nan"], "--w"), (["--w", "inf"], "--w"), (["--w", "1,-inf"], "--w"),
    (["--w", "1", "--shard-size", "nan"], "--shard-size"), (["--w", "1", "--shard-size", "0"], "--shard-size"),
    (["--w", "1", "--shard-size", "-5MB"], "--shard-size"), (["--w", "1", "--shard-size", "infGB"], "--shard-size"),
])
def test_numeric_options_refused_by_name(tmp_path, args, flag):
    b, f = _pair(tmp_path)
    res = runner.invoke(app, ["merge", str(b), str(f), *args, "-o", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 2 and res.stderr.startswith(f"neon merge: error: {flag}"), res.output


def test_unwritable_output_is_one_line_error(tmp_path, monkeypatch):
    b, f = _pair(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"-o: cannot write .*/file"):
        merge_checkpoints(b, f, [1.0], [tmp_path / "file" / "o.safetensors"], report=rep())
    import neon_cli.checkpoint.safetensors_io as sio

    real_open = open

    def ro_open(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith(".safetensors.tmp-" + str(os.getpid())) or ("w" in mode and "/ro/" in str(path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(sio, "open", ro_open, raising=False)
    (tmp_path / "ro").mkdir()
    from neon_cli.errors import ResourceError

    with pytest.raises(ResourceError, match=r"ro/o\.safetensors: cannot write \(Permission denied\)"):  # exit 3: the machine refused
        merge_checkpoints(b, f, [1.0], [tmp_path / "ro" / "o.safetensors"], report=rep())
    assert [p.name for p in (tmp_path / "ro").iterdir()] == []


def test_free_space_message_counts_headers_in_a_readable_unit(tmp_path, monkeypatch):
    import shutil as sh

    b, f = _pair(tmp_path)
    data = 8 * 8 * 4
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - data - 10, data + 10))
    from neon_cli.errors import ResourceError

    with pytest.raises(ResourceError, match=r"not enough free disk space .*need 4\.\d\d kB, have 266 B"):
        merge_checkpoints(b, f, [1.0], [tmp_path / "o.safetensors"], report=rep())


def test_model_folder_into_one_file(tmp_path):
    a, b = _unet(0), _unet(1)
    a.save_pretrained(str(tmp_path / "a"), max_shard_size="20KB")
    b.save_pretrained(str(tmp_path / "b"))
    merge_checkpoints(tmp_path / "a", tmp_path / "b", [1.0], [tmp_path / "o.safetensors"], report=rep())
    got = load_file(str(tmp_path / "o.safetensors"))
    want = merge_state_dicts(a.state_dict(), b.state_dict(), 1.0)
    assert all(torch.equal(got[k], want[k]) for k in want)
