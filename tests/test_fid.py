"""`neon fid`: the Fréchet Inception distance of two image sets (or statistics) against the closed
form, precision/recall against the `prdc` package, every image source (folder, EDM zip, npy, npz,
synth directory), EDM's --num subset, the missing-detector message, torchrun.

The real inception-2015-12-05.pt cannot be downloaded here; the stand-in detectors are TorchScript
modules with its calling convention (``detector(uint8 [N,3,H,W], return_features=True) -> [N, D]``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neon_cli.commands import app

from cli_helpers import run_guarded

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
runner = CliRunner()


class MeanDetector(torch.nn.Module):
    """Features = per-channel mean of the uint8 image / 255: known exactly for constant images."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return img.double().mean(dim=(2, 3)).float() / 255.0


class ConvDetector(torch.nn.Module):
    """A nonlinear stand-in that resizes its input itself, like the real detector (8-d features)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.float() / 255.0, size=(16, 16), mode="bilinear", align_corners=False)
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def mean_detector(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("det") / "mean.pt"
    torch.jit.script(MeanDetector()).save(str(path))
    return path


@pytest.fixture(scope="module")
def conv_detector(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("det") / "inception-2015-12-05.pt"
    torch.jit.script(ConvDetector()).save(str(path))
    return path


def _direct(detector: Path, nchw: np.ndarray) -> np.ndarray:
    module = torch.jit.load(str(detector))
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(nchw)), return_features=True).double().numpy()


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def closed_form_fid(fa: np.ndarray, fb: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2), by eigendecompositions (not scipy.sqrtm)."""
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    ra = _psd_sqrt(sa)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(_psd_sqrt(ra @ sb @ ra)))


def _constant_images(values: np.ndarray, h: int = 5, w: int = 6) -> np.ndarray:
    """uint8 NCHW images whose channel c is the constant values[i, c]."""
    return np.broadcast_to(values.astype(np.uint8)[:, :, None, None], (len(values), 3, h, w)).copy()


def _fid(*args, env=None):
    return runner.invoke(app, ["fid", *[str(a) for a in args]], env=env)


def test_fid_equals_the_closed_form(mean_detector, tmp_path):
    """Constant images: the features are exactly values / 255, so the FID is known in closed form."""
    rng = np.random.default_rng(0)
    va, vb = rng.integers(0, 256, (30, 3)), rng.integers(40, 200, (45, 3))
    np.save(tmp_path / "a.npy", _constant_images(va).transpose(0, 2, 3, 1))  # NHWC
    np.save(tmp_path / "b.npy", _constant_images(vb))  # NCHW
    expected = closed_form_fid(va / 255.0, vb / 255.0)
    assert expected > 0.01
    res = _fid(tmp_path / "a.npy", tmp_path / "b.npy", "--detector", mean_detector, "--batch", "7", "--json", "-q")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["fid"] == pytest.approx(expected, abs=1e-6, rel=1e-6)
    assert out["a"] == {"path": str(tmp_path / "a.npy"), "kind": "npy", "num_images": 30}
    assert out["feature_dim"] == 3 and out["detector_sha256"] == hashlib.sha256(mean_detector.read_bytes()).hexdigest()
    # symmetric, zero against itself
    res = _fid(tmp_path / "b.npy", tmp_path / "a.npy", "--detector", mean_detector, "--json", "-q")
    assert json.loads(res.stdout)["fid"] == pytest.approx(expected, abs=1e-6, rel=1e-6)
    res = _fid(tmp_path / "a.npy", tmp_path / "a.npy", "--detector", mean_detector, "--json", "-q")
    assert abs(json.loads(res.stdout)["fid"]) < 1e-6


def test_nonlinear_detector_and_statistics_side(conv_detector, tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (40, 3, 12, 10), dtype=np.uint8), rng.integers(0, 128, (50, 3, 12, 10), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    expected = closed_form_fid(_direct(conv_detector, a), _direct(conv_detector, b))
    assert runner.invoke(app, ["ref-stats", "-i", str(tmp_path / "b.npy"), "-o", str(tmp_path / "b.npz"),
                               "--detector", str(conv_detector), "-q"]).exit_code == 0
    rep = tmp_path / "fid.json"
    for ref in ("b.npy", "b.npz"):
        res = _fid(tmp_path / "a.npy", tmp_path / ref, "--detector", conv_detector, "--json", "-q", "--report", rep)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["fid"] == pytest.approx(expected, abs=1e-6, rel=1e-5)
    data = json.loads(rep.read_text())
    assert data["schema"] == "neon.report/1" and data["command"] == "fid" and data["status"] == "ok"
    roles = {i["role"]: i["sha256"] for i in data["inputs"]}
    assert roles["b"] == hashlib.sha256((tmp_path / "b.npz").read_bytes()).hexdigest()
    assert set(roles) == {"a", "b", "detector"} and data["results"]["b"]["kind"] == "stats"
    # two statistics files need no detector at all
    res = _fid(tmp_path / "b.npz", tmp_path / "b.npz", "--json", "-q")
    assert res.exit_code == 0, res.output
    assert abs(json.loads(res.stdout)["fid"]) < 1e-9 and json.loads(res.stdout)["detector_sha256"] is None
    # statistics of another feature dimension
    np.savez(tmp_path / "other.npz", mu=np.zeros(4), sigma=np.eye(4))
    res = _fid(tmp_path / "a.npy", tmp_path / "other.npz", "--detector", conv_detector, "-q")
    assert res.exit_code == 2 and "different dimension" in res.stderr


def test_every_image_source_gives_the_same_fid(conv_detector, tmp_path):
    """A folder of PNGs, an EDM dataset_tool zip (with dataset.json), .npy, ADM-style .npz and a
    neon synth directory holding the same images score the same."""
    Image = pytest.importorskip("PIL.Image")
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "ref.npy", rng.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "x.npy", imgs)
    np.savez(tmp_path / "x.npz", arr_0=imgs.transpose(0, 2, 3, 1))
    folder = tmp_path / "folder"
    (folder / "00000").mkdir(parents=True)
    names = [f"00000/img{i:08d}.png" for i in range(len(imgs))]
    for name, im in zip(names, imgs):
        Image.fromarray(im.transpose(1, 2, 0)).save(folder / name)
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:  # dataset_tool.py's layout, members out of order
        zf.writestr("dataset.json", json.dumps({"labels": [[n, i % 10] for i, n in enumerate(names)]}))
        for name in reversed(names):
            zf.write(folder / name, name)
    synth = tmp_path / "S"
    synth.mkdir()
    shards = []
    for k, (start, count) in enumerate([(0, 5), (5, 7)]):
        save_file({"images": imgs[start:start + count], "seeds": np.arange(start, start + count)}, str(synth / f"shard-{k:05d}.safetensors"))
        shards.append({"file": f"shard-{k:05d}.safetensors", "start": start, "count": count, "sha256": "x"})
    (synth / "manifest.json").write_text(json.dumps({"schema": "neon.synth/1", "shards": shards}))

    expected = closed_form_fid(_direct(conv_detector, imgs), _direct(conv_detector, np.load(tmp_path / "ref.npy")))
    kinds = {}
    for src in ("x.npy", "x.npz", "folder", "x.zip", "S"):
        res = _fid(tmp_path / src, tmp_path / "ref.npy", "--detector", conv_detector, "--batch", "5", "--json", "-q")
        assert res.exit_code == 0, (src, res.output)
        out = json.loads(res.stdout)
        assert out["fid"] == pytest.approx(expected, abs=1e-6, rel=1e-5), src
        kinds[src] = (out["a"]["kind"], out["a"]["num_images"])
    assert kinds == {"x.npy": ("npy", 12), "x.npz": ("npz", 12), "folder": ("folder", 12), "x.zip": ("zip", 12), "S": ("neon-synth", 12)}
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("dataset.json", "{}")
    res = _fid(tmp_path / "empty.zip", tmp_path / "ref.npy", "--detector", conv_detector)
    assert res.exit_code == 2 and "no image files" in res.stderr


def test_precision_recall_equal_the_prdc_package(conv_detector, tmp_path):
    prdc_pkg = pytest.importorskip("prdc")
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (60, 3, 10, 10), dtype=np.uint8)
    b = np.clip(rng.normal(120, 40, (70, 3, 10, 10)), 0, 255).astype(np.uint8)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    res = _fid(tmp_path / "a.npy", tmp_path / "b.npy", "--detector", conv_detector, "--prdc", "--json", "-q")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    fa, fb = _direct(conv_detector, a), _direct(conv_detector, b)
    ref = prdc_pkg.compute_prdc(real_features=fb, fake_features=fa, nearest_k=5)
    assert out["k"] == 5
    for key in ("precision", "recall", "density", "coverage"):
        assert out[key] == pytest.approx(float(ref[key]), abs=1e-9), key
    assert 0 < out["recall"] < 1 or 0 < out["precision"] < 1  # not a degenerate all-or-nothing case
    # a statistics-only reference cannot give precision/recall: one line, exit 2, before any work
    assert runner.invoke(app, ["ref-stats", "-i", str(tmp_path / "b.npy"), "-o", str(tmp_path / "b.npz"),
                               "--detector", str(conv_detector), "-q"]).exit_code == 0
    res = _fid(tmp_path / "a.npy", tmp_path / "b.npz", "--detector", conv_detector, "--prdc")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "--prdc" in lines[0] and "statistics" in lines[0], res.stderr
    # ... but statistics with the stored features can
    assert runner.invoke(app, ["ref-stats", "-i", str(tmp_path / "b.npy"), "-o", str(tmp_path / "bf.npz"),
                               "--detector", str(conv_detector), "--keep-features", "-q"]).exit_code == 0
    res = _fid(tmp_path / "a.npy", tmp_path / "bf.npz", "--detector", conv_detector, "--prdc", "--json", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["precision"] == pytest.approx(float(ref["precision"]), abs=1e-6)


def test_num_images_is_edms_seeded_subset(mean_detector, tmp_path):
    rng = np.random.default_rng(4)
    va, vb = rng.integers(0, 256, (40, 3)), rng.integers(0, 256, (25, 3))
    np.save(tmp_path / "a.npy", _constant_images(va))
    np.save(tmp_path / "b.npy", _constant_images(vb))

    def edm_subset(n: int, num: int, seed: int) -> np.ndarray:  # EDM training/dataset.py Dataset(max_size, random_seed)
        idx = np.arange(n)
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        return np.sort(idx[:num])

    for seed in (0, 7):
        res = _fid(tmp_path / "a.npy", tmp_path / "b.npy", "--detector", mean_detector, "--num-images", "20", "--seed", str(seed),
                   "--json", "-q")
        assert res.exit_code == 0, res.output
        expected = closed_form_fid(va[edm_subset(40, 20, seed)] / 255.0, vb[edm_subset(25, 20, seed)] / 255.0)
        out = json.loads(res.stdout)
        assert out["fid"] == pytest.approx(expected, abs=1e-6, rel=1e-6)
        assert out["a"]["num_images"] == 20 and out["b"]["num_images"] == 20
    res = _fid(tmp_path / "a.npy", tmp_path / "b.npy", "--detector", mean_detector, "--num-images", "30")
    assert res.exit_code == 2 and "found 25 images" in res.stderr and "--num-images" in res.stderr


def test_missing_detector_says_which_file(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8, 3), np.uint8))
    res = _fid(tmp_path / "a.npy", tmp_path / "a.npy", env={"NEON_INCEPTION": ""})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    for needle in ("inception-2015-12-05.pt", "--detector", "NEON_INCEPTION", "EDM", "StyleGAN2-ADA", "StyleGAN3", "clean-fid", "sha256"):
        assert needle in lines[0], needle
    res = _fid(tmp_path / "a.npy", tmp_path / "nothere.npz", "--detector", tmp_path / "a.npy")
    assert res.exit_code == 2 and "B:" in res.stderr and "does not exist" in res.stderr


@pytest.mark.slow
def test_fid_under_torchrun_equals_one_process(conv_detector, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(5)
    np.save(tmp_path / "a.npy", rng.integers(0, 256, (13, 3, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "b.npy", rng.integers(0, 256, (11, 3, 8, 8), dtype=np.uint8))
    args = ["fid", "a.npy", "b.npy", "--detector", str(conv_detector), "--prdc", "--batch", "4", "--json", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = runner.invoke(app, args)
    assert one.exit_code == 0, one.output
    two = run_guarded([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "neon_cli", *args],
                      "neon fid under torchrun", cwd=tmp_path, capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)
    assert r2["world_size"] == 2
    assert r2["fid"] == pytest.approx(r1["fid"], rel=1e-6, abs=1e-9)
    for key in ("precision", "recall", "density", "coverage"):
        assert r2[key] == r1[key]
