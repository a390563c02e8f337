"""The inert reader and θ_r-container writer (issue 13): real third-party files, an EDM-style
persistence pickle written by the test, malicious pickles in every encoding, broken files, and
the numpy conversions against torch."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neon_cli.checkpoint import open_checkpoint
from neon_cli.commands import app
from neon_cli.errors import CheckpointError
from neon_cli.fsutil import sha256_path
from neon_cli.merge import f32_to_bf16, merge_checkpoints, merge_state_dicts
from neon_cli.report import Report

runner = CliRunner()
W = 1.6


def rep() -> Report:
    return Report("merge")


def bits(t: torch.Tensor) -> torch.Tensor:
    iv = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().reshape(-1).view(iv)


@pytest.fixture
def cfm(real_fixture) -> Path:
    """torchcfm's 2-D notebook checkpoints in ../shared/fixtures/real (skipped without them, failed
    under $NEON_REQUIRE_FIXTURES, which CI's .ci/run sets)."""
    return real_fixture("torchcfm-2d")


@pytest.fixture
def mnist(real_fixture) -> Path:
    return real_fixture("mnist-ddpm")


def test_real_fixtures_are_there(cfm, mnist):
    assert (cfm / "gaussian-moons_cfm_v1.pt").is_file() and (mnist / "ddpm_mnist_starter.pth").is_file()


# ---------------------------------------------------------------------------------- torchcfm full-module pickles


class _MainMLP(torch.nn.Module):
    """A class compatible with the notebook's __main__.MLP: unpickling needs the name only."""


def _load_full(path: Path) -> torch.nn.Module:
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("pair,main", [
    (("8gaussian-moons_cfm_v1.pt", "8gaussian-moons_otcfm_v1.pt"), False),  # torchcfm.models.models.MLP
    (("8gaussian-moons_rect_1_v1.pt", "8gaussian-moons_rect_2_v1.pt"), True),  # __main__.MLP (no such class anywhere)
])
def test_torchcfm_full_module_pickles_merge_and_load_in_torch(tmp_path, monkeypatch, pair, main, cfm):
    base, ft = cfm / pair[0], cfm / pair[1]
    with open_checkpoint(base) as ck:
        assert ck.names() == [f"net.{i}.{p}" for i in (0, 2, 4, 6) for p in ("weight", "bias")]
        assert ("__main__", "MLP") in ck.globals if main else ("torchcfm.models.models", "MLP") in ck.globals
    out = tmp_path / "neon.pt"
    res = merge_checkpoints(base, ft, [W], [out], report=rep())
    assert res["merged"] == 8 and res["layout"]["output"] == "torch"
    if main:
        monkeypatch.setattr(sys.modules["__main__"], "MLP", _MainMLP, raising=False)
    m_r, m_s, m_o = _load_full(base), _load_full(ft), _load_full(out)
    assert type(m_o) is type(m_r)
    want = merge_state_dicts(m_r.state_dict(), m_s.state_dict(), W)
    got = m_o.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        r64, s64 = m_r.state_dict()[k].double(), m_s.state_dict()[k].double()
        assert torch.equal(got[k], v)
        assert torch.allclose(got[k].double(), r64 - W * (s64 - r64), atol=1e-5)
    assert len(out.read_bytes()) == len(base.read_bytes())
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None


# ---------------------------------------------------------------------------------- MNIST DDPM state dicts


def test_mnist_ddpm_buffers_copied_and_real_shape_mismatch(tmp_path, mnist):
    a, b = mnist / "ddpm_mnist_starter.pth", mnist / "ddpm_mnist_augmentation.pth"
    out = tmp_path / "neon.pth"
    res = merge_checkpoints(a, b, [1.0], [out], report=rep())
    assert set(res["copied_names"]["equal"]) == {"beta_t", "alpha_t", "gt.frequencies"}
    r, s, o = (torch.load(p, weights_only=True, map_location="cpu") for p in (a, b, out))
    for k in ("beta_t", "alpha_t", "gt.frequencies"):
        assert torch.equal(bits(o[k]), bits(r[k]))
    want = merge_state_dicts(r, s, 1.0)
    assert all(torch.equal(o[k], want[k]) for k in want)
    before = sha256_path(a)
    with pytest.raises(CheckpointError, match=r"key 'gt\.blocks\.0\.net\.1\.weight': shape \[16, 28, 28\] in .* but \[28, 28\] in .*vishalj99"):
        merge_checkpoints(a, mnist / "vishalj99_ddpm_mnist.pth", [1.0], [tmp_path / "x.pth"], report=rep())
    assert not (tmp_path / "x.pth").exists() and sha256_path(a) == before


# ---------------------------------------------------------------------------------- EDM persistence pickles


SRC = "import torch\n# the network's module source travels inside the pickle (never executed by neon)\n" \
      "open('EXECUTED-MARKER', 'w').write('ran')\nclass Net: pass\n"


def _persistence(monkeypatch, marker_dir: Path):
    """A stand-in torch_utils.persistence: pickling and loading EDM-style persistent objects.

    Written from the format: REDUCE of ``_reconstruct_persistent_obj`` with one ``meta`` dict
    (type, version, module_src, class_name, state); loading builds the class from a registry of
    this test (no source is executed) and sets the state."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    registry: dict[str, type] = {}

    def _reconstruct_persistent_obj(meta):
        assert meta["type"] == "class" and meta["version"] == 6 and isinstance(meta["module_src"], str)
        cls = registry[meta["class_name"]]
        obj = cls.__new__(cls)
        obj.__dict__.update(meta["state"])
        return obj

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)

    class Persistent:
        def __reduce__(self):
            meta = dict(type="class", version=6, module_src=SRC, class_name=type(self).__name__, state=dict(self.__dict__))
            return (_reconstruct_persistent_obj, (meta,), None)

    class Conv(Persistent, torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(c, c, 3, 3))
            self.bias = torch.nn.Parameter(torch.randn(c))
            self.register_buffer("resample_filter", torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8)
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

    class UNet(Persistent, torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.ModuleDict({"conv0": Conv(4), "conv1": Conv(4)})
            self.norm = torch.nn.GroupNorm(2, 4)
            self.img_resolution = 8

    class Precond(Persistent, torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sigma_min = 0.002
            self.model = UNet()

    class Loss(Persistent):
        def __init__(self):
            self.P_mean, self.P_std = -1.2, 1.2

    for c in (Conv, UNet, Precond, Loss):
        registry[c.__name__] = c
    return Precond, Loss


def _edm_snapshot(path: Path, net, loss) -> None:
    with open(path, "wb") as fh:
        pickle.dump({"ema": net, "loss_fn": loss, "augment_pipe": None, "dataset_kwargs": {"resolution": 8}}, fh)


def test_edm_persistence_pickle_read_merged_and_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Precond, Loss = _persistence(monkeypatch, tmp_path)
    torch.manual_seed(0)
    net = Precond()
    net_s = Precond()
    net_s.load_state_dict({k: v + 0.01 * torch.randn_like(v) if "resample" not in k else v for k, v in net.state_dict().items()})
    _edm_snapshot(tmp_path / "network-snapshot-r.pkl", net, Loss())
    _edm_snapshot(tmp_path / "network-snapshot-s.pkl", net_s, Loss())
    with open_checkpoint(tmp_path / "network-snapshot-r.pkl") as ck:
        assert ck.layout == "pickle" and ck.key == "ema"
        assert ck.names() == list(net.state_dict())  # params, persistent buffers, children, in order
        assert "model.enc.conv0.scratch" not in ck.names()
        assert sorted(o.class_name for o in ck.persistent) == ["Conv", "Conv", "Loss", "Precond", "UNet"]
        assert all(o.module_src == SRC for o in ck.persistent)
        assert ck.dangers() == ["exec the Python source embedded in the file (torch_utils.persistence)"]
    out = tmp_path / "neon.pkl"
    res = merge_checkpoints(tmp_path / "network-snapshot-r.pkl", tmp_path / "network-snapshot-s.pkl", [W], [out], report=rep())
    assert "model.enc.conv0.resample_filter" in res["copied_names"]["equal"]
    assert not (tmp_path / "EXECUTED-MARKER").exists()
    with open(out, "rb") as fh:
        got = pickle.load(fh)  # through the test's stand-in _reconstruct_persistent_obj
    assert isinstance(got["ema"], Precond) and got["ema"].sigma_min == 0.002 and got["dataset_kwargs"] == {"resolution": 8}
    want = merge_state_dicts(net.state_dict(), net_s.state_dict(), W)
    sd = got["ema"].state_dict()
    assert list(sd) == list(want) and all(torch.equal(sd[k], want[k]) for k in want)
    assert out.stat().st_size == (tmp_path / "network-snapshot-r.pkl").stat().st_size


def test_inert_reader_interface_for_families(tmp_path, monkeypatch):
    """What a family helper uses to read an EDM .pkl inertly: open_checkpoint(...).state_dict()."""
    Precond, Loss = _persistence(monkeypatch, tmp_path)
    torch.manual_seed(1)
    net = Precond()
    _edm_snapshot(tmp_path / "n.pkl", net, Loss())
    monkeypatch.delitem(sys.modules, "torch_utils.persistence")  # no EDM code is needed to read it
    with open_checkpoint(tmp_path / "n.pkl", key="ema") as ck:
        sd = ck.state_dict()
        ema = ck.container["ema"]
        assert ema.class_name == "Precond" and ema.attributes()["sigma_min"] == 0.002
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------------- malicious pickles


class _Evil:
    def __init__(self, marker: Path, how: str):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "os.system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "eval":
            return (eval, (f"open({self.marker!r}, 'w')",))
        if self.how == "exec":
            return (exec, (f"open({self.marker!r}, 'w')",))
        return (subprocess.Popen, (["touch", self.marker],))


class _NestedEvil:
    """A storage-like object whose payload is a legacy torch.save stream running os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        from torch.storage import _load_from_bytes

        payload = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
        payload += pickle.dumps(_Evil(self.marker, "os.system"), protocol=2) + pickle.dumps([], protocol=2)
        return (_load_from_bytes, (payload,))


def _malicious(path: Path, encoding: str, how: str, marker: Path) -> None:
    sd = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    evil = _NestedEvil(marker) if how == "nested" else _Evil(marker, how)
    obj = {"model": sd, "extra": evil}
    if encoding == "zip":
        torch.save(obj, path)
    elif encoding == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)


@pytest.mark.parametrize("encoding", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("how", ["os.system", "eval", "exec", "popen", "nested"])
def test_malicious_pickles_never_run(tmp_path, monkeypatch, encoding, how):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    suffix = ".pkl" if encoding == "pickle" else ".pt"
    base, ft = tmp_path / f"base{suffix}", tmp_path / f"ft{suffix}"
    _malicious(base, encoding, how, marker)
    _malicious(ft, encoding, how, marker)
    assert not marker.exists()
    res = runner.invoke(app, ["inspect", str(base), "--json"])
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(res.stdout)
    want = {"os.system": "os.system", "nested": "os.system", "eval": "builtins.eval", "exec": "builtins.exec", "popen": "subprocess.Popen"}[how]
    assert f"this file would run {want} on load" in data["warnings"]
    assert data["weights"]["key"] == "model"
    res = runner.invoke(app, ["merge", str(base), str(ft), "--w", "1", "-o", str(tmp_path / f"out{suffix}"), "-q", "--json"])
    assert res.exit_code == 0, res.output
    assert any(want.split(".")[-1] in w for w in json.loads(res.stdout)["warnings"])
    assert not marker.exists()


# ---------------------------------------------------------------------------------- broken files


def _legacy_file(path: Path) -> None:
    torch.save({"w": torch.arange(64.0)}, path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("case,pattern", [
    ("zip_truncated", r"not a readable zip archive|truncated"),
    ("legacy_truncated", r"truncated"),
    ("pickle_truncated", r"truncated"),
    ("legacy_size_mismatch", r"storage \d+ has 65 elements in the file but 64 in its record"),
    ("zip_size_mismatch", r"storage 0 has \d+ bytes in the archive but its record says 64 elements"),
    ("opcode", r"unsupported pickle opcode 0xff at byte 2"),
])
def test_broken_torch_files_one_line_error_no_output(tmp_path, case, pattern):
    p = tmp_path / ("b.pkl" if case.startswith(("pickle", "opcode")) else "b.pt")
    if case.startswith("zip"):
        torch.save({"w": torch.arange(64.0)}, p)
    elif case.startswith("legacy"):
        _legacy_file(p)
    else:
        with open(p, "wb") as fh:
            pickle.dump({"w": torch.arange(64.0)}, fh)
    data = bytearray(p.read_bytes())
    if case.endswith("truncated"):
        data = data[: len(data) // 2]
    elif case == "legacy_size_mismatch":
        at = data.rfind(struct.pack("<Q", 64))
        data[at:at + 8] = struct.pack("<Q", 65)
    elif case == "zip_size_mismatch":
        data = bytearray(_zip_with_short_storage(bytes(data)))
    elif case == "opcode":
        data = bytearray(b"\x80\x04\xff") + data[2:]
    p.write_bytes(bytes(data))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match=pattern) as err:
        merge_checkpoints(p, p, [1.0], [tmp_path / "o.safetensors"], report=rep())
    assert str(p) in str(err.value) and "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == before


def _zip_with_short_storage(data: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.endswith("/data/0"):
                body = body[:-4]
            dst.writestr(info.filename, body)
    return buf.getvalue()


def test_flat_dict_with_step_and_key_through_module_attribute(tmp_path, cfm):
    torch.save({"w": torch.ones(3), "b": torch.zeros(2), "step": 1200, "epoch": 3}, tmp_path / "r.pt")
    torch.save({"w": torch.full((3,), 2.0), "b": torch.zeros(2), "step": 1400, "epoch": 4}, tmp_path / "s.pt")
    res = merge_checkpoints(tmp_path / "r.pt", tmp_path / "s.pt", [1.0], [tmp_path / "o.pt"], report=rep())
    assert any("non-tensor entries (step, epoch)" in m for m in res["warnings"])
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    assert out["step"] == 1200 and torch.equal(out["w"], torch.zeros(3))  # 1 - 1 * (2 - 1)
    # --key through a module's attribute (the torchcfm MLP's `net`), checked before any work
    with open_checkpoint(cfm / "8gaussian-moons_cfm_v1.pt", key="net") as ck:
        assert ck.names()[:2] == ["0.weight", "0.bias"]
    with open_checkpoint(cfm / "8gaussian-moons_cfm_v1.pt", key="net.2") as ck:
        assert ck.names() == ["weight", "bias"]
    with pytest.raises(CheckpointError, match=r"--key nope: no entry 'nope' under the top level \(found: .*net"):
        merge_checkpoints(cfm / "8gaussian-moons_cfm_v1.pt", cfm / "8gaussian-moons_otcfm_v1.pt", [1.0], [tmp_path / "k.pt"],
                          key="nope", report=rep())


def test_nn_parameters_in_memory_merge():
    p = {"w": torch.nn.Parameter(torch.ones(3))}
    q = {"w": torch.nn.Parameter(torch.full((3,), 2.0))}
    out = merge_state_dicts(p, q, 1.0)
    assert type(out["w"]) is torch.Tensor and not out["w"].requires_grad and torch.equal(out["w"], torch.zeros(3))


def test_tied_weights_stay_tied(tmp_path):
    t = torch.randn(5, 3)
    torch.save({"embed.weight": t, "head.weight": t, "bias": torch.zeros(3)}, tmp_path / "r.pt")
    s = t + 0.1
    torch.save({"embed.weight": s, "head.weight": s, "bias": torch.zeros(3)}, tmp_path / "s.pt")
    merge_checkpoints(tmp_path / "r.pt", tmp_path / "s.pt", [1.0], [tmp_path / "o.pt"], report=rep())
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    assert out["embed.weight"].untyped_storage().data_ptr() == out["head.weight"].untyped_storage().data_ptr()
    assert torch.allclose(out["head.weight"], t - 0.1, atol=1e-6)
    # a copied and a merged tensor on one storage: refused by name
    big = torch.randn(8)
    torch.save({"a": big[:4], "bn.running_mean": big[2:6]}, tmp_path / "r2.pt")
    torch.save({"a": big[:4] + 1, "bn.running_mean": big[2:6]}, tmp_path / "s2.pt")
    with pytest.raises(CheckpointError, match=r"tensors 'a' \(merged\) and 'bn.running_mean' \(copied from the base\) share storage"):
        merge_checkpoints(tmp_path / "r2.pt", tmp_path / "s2.pt", [1.0], [tmp_path / "o2.pt"], report=rep())


# ---------------------------------------------------------------------------------- conversions against torch


def test_bf16_and_fp16_rounding_bit_identical_to_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200000, generator=g) * torch.exp2(torch.randint(-140, 128, (200000,), generator=g).float())
    u = x.view(torch.int32)
    ties = (u & ~0xFFFF) | 0x8000  # exactly half-way between two bfloat16 values
    edge = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.3895314e38, 3.4028235e38, 1e-45, -1e-40, 65504.0, 65520.0, 1e-8])
    x = torch.cat([x, ties.view(torch.float32), edge])
    x = x[torch.isfinite(x) | torch.isinf(x)]
    ours, _ = f32_to_bf16(x.numpy())
    assert np.array_equal(ours.view(np.int16), x.to(torch.bfloat16).view(torch.int16).numpy())
    with np.errstate(over="ignore"):  # values beyond float16's range round to inf in both
        assert np.array_equal(x.numpy().astype(np.float16).view(np.int16), x.to(torch.float16).view(torch.int16).numpy())


def test_safetensors_merge_imports_no_torch(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 8).to(torch.bfloat16), "n": torch.tensor(3)}, str(tmp_path / "r.safetensors"))
    save_file({"w": torch.randn(64, 8).to(torch.bfloat16), "n": torch.tensor(3)}, str(tmp_path / "s.safetensors"))
    code = ("import sys; from neon_cli.commands import app; from typer.testing import CliRunner;"
            f"r = CliRunner().invoke(app, ['merge', {str(tmp_path / 'r.safetensors')!r}, {str(tmp_path / 's.safetensors')!r},"
            f" '--w', '1.6', '-o', {str(tmp_path / 'o.safetensors')!r}, '-q']);"
            "print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "False"]


# ---------------------------------------------------------------------------------- neon inspect


def test_inspect_tree_weights_and_globals(tmp_path, monkeypatch):
    import json

    Precond, Loss = _persistence(monkeypatch, tmp_path)
    torch.manual_seed(2)
    _edm_snapshot(tmp_path / "n.pkl", Precond(), Loss())
    out = tmp_path / "inspect.json"
    res = runner.invoke(app, ["inspect", str(tmp_path / "n.pkl"), "--json", "--report", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["encoding"] == "pickle" and data["weights"]["key"] == "ema"
    ema = data["tree"]["items"]["ema"]
    assert ema["class"] == "persistence:Precond" and ema["module"] and ema["module_src"]["characters"] == len(SRC)
    conv = ema["modules"]["model"]["modules"]["enc"]["modules"]["conv0"]
    assert conv["parameters"]["weight"] == {"type": "tensor", "shape": [4, 4, 3, 3], "dtype": "float32", "bytes": 576,
                                            "storage": conv["parameters"]["weight"]["storage"], "shared": False, "parameter": True}
    kinds = {g["name"]: g["kind"] for g in data["globals"]}
    assert kinds["torch._utils._rebuild_tensor_v2"] == "tensor" and kinds["torch.nn.modules.container.ModuleDict"] == "class"
    assert kinds["torch_utils.persistence._reconstruct_persistent_obj"] == "dangerous"
    assert data["warnings"] == ["this file would exec the Python source embedded in the file (torch_utils.persistence) on load"]
    assert json.loads(out.read_text())["status"] == "ok"
    # VAR's trainer checkpoint: the key merge picks; a folder of components; --report never over the input
    torch.save({"trainer": {"var_wo_ddp": {"w": torch.ones(2)}, "vae_local": {"q": torch.ones(1)}}, "epoch": 3}, tmp_path / "var.pth")
    data = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "var.pth"), "--json"]).stdout)
    assert data["weights"]["key"] == "trainer.var_wo_ddp" and data["weights"]["alternatives"] == ["trainer.vae_local"]
    assert data["warnings"] == [] and {g["kind"] for g in data["globals"]} == {"tensor"}
    before = sha256_path(tmp_path / "var.pth")
    res = runner.invoke(app, ["inspect", str(tmp_path / "var.pth"), "--report", str(tmp_path / "var.pth")])
    assert res.exit_code == 2 and "--report" in res.stderr and sha256_path(tmp_path / "var.pth") == before
