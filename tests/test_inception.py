"""Inception detector loading, image sources, batched/distributed extraction and `neon ref-stats`.

The real inception-2015-12-05.pt cannot be downloaded here, so the tests build a tiny TorchScript
module with the same interface (``forward(img uint8 [N,3,H,W], return_features: bool) -> [N, D]``,
its own resize) and check every number against the module called directly plus neon_cli.metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neon_cli import inception as I
from neon_cli import metrics as M
from neon_cli.errors import CheckpointError, DataError, UsageError
from neon_cli.report import Report
from neon_cli.requests import RefStatsRequest, Scoring

# The detector format is TorchScript, which torch >= 2.10 marks deprecated; the tests build one.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")


class TinyDetector(torch.nn.Module):
    """Same calling convention as the TorchScript inception-2015-12-05.pt, 8-d features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.dtype == torch.uint8
        assert img.shape[1] == 3
        x = img.to(torch.float32) / 127.5 - 1.0
        x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        f = torch.tanh(self.conv(x)).mean(dim=(2, 3)) + 0.01 * x.mean(dim=(1, 2, 3))[:, None]
        if return_features:
            return f
        return self.fc(f)


class NoFeaturesKwarg(torch.nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().mean(dim=(2, 3))


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("det") / "inception-2015-12-05.pt"
    torch.jit.script(TinyDetector()).save(str(path))
    return path


@pytest.fixture(autouse=True)
def _no_env_detector(monkeypatch):
    monkeypatch.delenv(I.ENV_VAR, raising=False)


def _direct_features(detector_file: Path, nchw_uint8: np.ndarray) -> np.ndarray:
    module = torch.jit.load(str(detector_file))
    x = torch.from_numpy(np.ascontiguousarray(nchw_uint8))
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return module(x, return_features=True).numpy()


def _images(n: int, c: int = 3, h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


# ---------------------------------------------------------------------------- loading


def test_missing_detector_error_names_flag_and_env():
    with pytest.raises(UsageError) as exc:
        I.load_detector(None)
    msg = str(exc.value)
    assert "--detector" in msg and "NEON_INCEPTION" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="--detector.*not found"):
        I.load_detector("/nonexistent/inception.pt")


def test_env_var_and_flag(detector_file, monkeypatch, tmp_path):
    monkeypatch.setenv(I.ENV_VAR, str(detector_file))
    det = I.load_detector(None, device="cpu")
    assert det.path == detector_file
    assert det.sha256 == hashlib.sha256(detector_file.read_bytes()).hexdigest()
    monkeypatch.setenv(I.ENV_VAR, str(tmp_path / "gone.pt"))
    with pytest.raises(UsageError, match="NEON_INCEPTION.*not found"):
        I.load_detector(None)
    assert I.load_detector(detector_file, device="cpu").path == detector_file  # the flag wins over the env var


def test_non_torchscript_files_are_clear_errors(tmp_path):
    pkl = tmp_path / "inception-2015-12-05.pkl"
    pkl.write_bytes(pickle.dumps({"not": "a module"}))
    with pytest.raises(CheckpointError, match="not a TorchScript archive.*pickle"):
        I.load_detector(pkl)
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, state)  # a zip, but not TorchScript
    with pytest.raises(CheckpointError, match="torch.jit.load failed"):
        I.load_detector(state)
    bad_iface = tmp_path / "noargs.pt"
    torch.jit.script(NoFeaturesKwarg()).save(str(bad_iface))
    det = I.load_detector(bad_iface, device="cpu")
    with pytest.raises(CheckpointError, match="return_features=True"):
        det.features(_images(2))


def test_features_match_module_and_grayscale_is_repeated(detector_file):
    det = I.load_detector(detector_file, device="cpu")
    rgb = _images(6)
    np.testing.assert_array_equal(det.features(rgb).numpy(), _direct_features(detector_file, rgb))
    assert det.feature_dim == 8
    gray = _images(5, c=1, seed=1)
    np.testing.assert_array_equal(det.features(torch.from_numpy(gray)).numpy(), _direct_features(detector_file, np.repeat(gray, 3, axis=1)))
    with pytest.raises(DataError, match="uint8"):
        det.features(rgb.astype(np.float32))
    with pytest.raises(DataError, match="C 1 or 3"):
        det.features(_images(2, c=4))


# ---------------------------------------------------------------------------- extraction


def test_batched_features_and_streaming_stats(detector_file):
    det = I.load_detector(detector_file, device="cpu")
    imgs = _images(23, seed=2)
    calls = []
    feats = I.compute_features(det, imgs, batch=5, progress=lambda task, done, total=None, **kw: calls.append((task, done, total)))
    direct = _direct_features(detector_file, imgs)
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)  # batch size may change float rounding only
    assert calls[0] == ("inception", 0, 23) and calls[-1] == ("inception", 23, 23) and len(calls) == 1 + 5
    # NHWC input gives the same features
    np.testing.assert_allclose(I.compute_features(det, imgs.transpose(0, 2, 3, 1), batch=23), direct, rtol=1e-5, atol=1e-6)
    mu, sigma, kept = I.compute_stats(det, imgs, batch=4)
    assert kept is None
    mu_ref, sigma_ref = M.feature_stats(direct)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-4, atol=1e-9)
    mu2, sigma2, kept = I.compute_stats(det, imgs, batch=4, keep_features=True)
    assert kept.shape == (23, 8)
    np.testing.assert_allclose(mu2, mu, rtol=1e-10)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------------- image sources


def test_array_sources_npy_npz_layouts(tmp_path):
    nchw = _images(9, seed=3)
    np.save(tmp_path / "nhwc.npy", nchw.transpose(0, 2, 3, 1))
    np.save(tmp_path / "nchw.npy", nchw)
    np.savez(tmp_path / "adm.npz", arr_0=nchw.transpose(0, 2, 3, 1))  # ADM sample batch layout
    gray = _images(4, c=1, seed=4)
    np.savez_compressed(tmp_path / "gray.npz", images=gray[:, 0])
    for name in ("nhwc.npy", "nchw.npy", "adm.npz"):
        src = I.open_images(tmp_path / name)
        assert len(src) == 9
        np.testing.assert_array_equal(src.read(0, 9), nchw)
        np.testing.assert_array_equal(src.read(7, 9), nchw[7:9])  # non-sequential access
        np.testing.assert_array_equal(src.read(2, 5), nchw[2:5])
    src = I.open_images(tmp_path / "gray.npz")
    np.testing.assert_array_equal(src.read(0, 4), gray)
    np.save(tmp_path / "float.npy", nchw.astype(np.float32))
    with pytest.raises(DataError, match="uint8"):
        I.open_images(tmp_path / "float.npy")
    np.savez(tmp_path / "two.npz", a=nchw, b=nchw)
    with pytest.raises(DataError, match="no image array"):
        I.open_images(tmp_path / "two.npz")
    with pytest.raises(UsageError, match="does not exist"):
        I.open_images(tmp_path / "missing.npy")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UsageError, match="expected a folder"):
        I.open_images(tmp_path / "x.txt")


def test_synth_directory_source(tmp_path):
    from safetensors.numpy import save_file

    imgs = _images(7, c=1, h=8, w=8, seed=5)
    shards = []
    for k, (start, count) in enumerate([(0, 4), (4, 3)]):
        name = f"shard-{k:05d}.safetensors"
        save_file({"images": imgs[start : start + count], "seeds": np.arange(start, start + count)}, str(tmp_path / name))
        shards.append({"file": name, "start": start, "count": count, "sha256": "x"})
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "neon.synth/1", "shards": shards}))
    src = I.open_images(tmp_path)
    assert src.kind == "neon-synth" and len(src) == 7
    np.testing.assert_array_equal(src.read(0, 7), imgs)
    np.testing.assert_array_equal(src.read(3, 6), imgs[3:6])  # spans both shards


def test_image_folder_without_pillow_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "000000.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL.Image` raise ImportError
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(UsageError, match="Pillow"):
        I.open_images(tmp_path)


def test_image_folder_with_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")  # Pillow is optional (only folders of image files need it)
    imgs = _images(5, h=6, w=7, seed=6)
    sub = tmp_path / "00000"
    sub.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im.transpose(1, 2, 0)).save(sub / f"img{i:08d}.png")
    (tmp_path / "dataset.json").write_text("{}")  # EDM layout: ignored
    src = I.open_images(tmp_path)
    assert src.kind == "folder" and len(src) == 5
    np.testing.assert_array_equal(src.read(0, 5), imgs)
    gray_dir = tmp_path.parent / (tmp_path.name + "-gray")
    gray_dir.mkdir()
    for i, im in enumerate(imgs[:, 0]):
        Image.fromarray(im).save(gray_dir / f"{i}.png")  # mode "L": stays one channel
    np.testing.assert_array_equal(I.open_images(gray_dir).read(0, 5), imgs[:, :1])
    Image.fromarray(imgs[0, 0, :3, :3]).save(gray_dir / "9.png")  # sorted last, another size
    with pytest.raises(DataError, match="differs from the first"):
        I.open_images(gray_dir).read(0, 6)


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def cli_app():
    from neon_cli.commands import app

    if "ref-stats" not in {c.name for c in app.registered_commands}:  # until "refstats" is in _COMMAND_MODULES
        from neon_cli.commands import refstats

        refstats.register(app)
    return app


def test_ref_stats_cli_end_to_end_and_scoring(cli_app, detector_file, tmp_path):
    real = _images(40, seed=7)
    np.save(tmp_path / "real.npy", real.transpose(0, 2, 3, 1))
    out, rep = tmp_path / "stats.npz", tmp_path / "report.json"
    res = CliRunner().invoke(
        cli_app,
        ["ref-stats", "--images", str(tmp_path / "real.npy"), "-o", str(out), "--detector", str(detector_file),
         "--batch", "7", "--keep-features", "--report", str(rep), "--json"],
    )
    assert res.exit_code == 0, res.output
    direct = _direct_features(detector_file, real)
    mu_ref, sigma_ref = M.feature_stats(direct)
    mu, sigma = M.load_stats(out)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(M.load_features(out), direct, rtol=1e-5, atol=1e-6)

    report = json.loads(rep.read_text())
    det_sha = hashlib.sha256(detector_file.read_bytes()).hexdigest()
    out_sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert report["status"] == "ok" and report["command"] == "ref-stats"
    assert report["results"]["detector_sha256"] == det_sha
    assert report["results"]["stats_sha256"] == out_sha
    assert report["results"]["num_images"] == 40 and report["results"]["feature_dim"] == 8
    assert {"role": "detector", "path": str(detector_file), "sha256": det_sha} in report["inputs"]
    assert report["outputs"] == [{"role": "stats", "path": str(out), "sha256": out_sha}]
    assert json.loads(res.stdout)["stats_sha256"] == out_sha

    # scoring generated images against the written reference: FID + P/R/D/C from the stored features
    fake = _images(30, seed=8) // 2
    scorer = I.InceptionFID(out, detector=detector_file, device="cpu", batch=9)
    got = scorer.score(fake)
    fake_direct = _direct_features(detector_file, fake)
    expected_fid = M.frechet_distance(*M.feature_stats(fake_direct), mu_ref, sigma_ref)
    assert got["fid"] == pytest.approx(expected_fid, rel=1e-4)
    ref_prdc = M.prdc(direct, fake_direct, k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert got[key] == pytest.approx(ref_prdc[key], abs=1e-9)
    assert scorer.provenance() == {"detector": str(detector_file), "detector_sha256": det_sha,
                                   "ref_stats": str(out), "ref_stats_sha256": out_sha}


def test_ref_stats_cli_env_var_and_errors(cli_app, detector_file, tmp_path):
    np.save(tmp_path / "real.npy", _images(10, c=1, seed=9))
    out = tmp_path / "s.npz"
    runner = CliRunner()
    res = runner.invoke(cli_app, ["ref-stats", "--images", str(tmp_path / "real.npy"), "-o", str(out), "-q"],
                        env={"NEON_INCEPTION": str(detector_file)})
    assert res.exit_code == 0, res.output
    assert M.load_stats(out)[0].shape == (8,)
    # no detector anywhere: exit 2 with a one-line message naming both ways to give it
    res = runner.invoke(cli_app, ["ref-stats", "--images", str(tmp_path / "real.npy"), "-o", str(tmp_path / "t.npz")],
                        env={"NEON_INCEPTION": ""})
    assert res.exit_code == 2
    assert "--detector" in res.stderr and "NEON_INCEPTION" in res.stderr
    assert not (tmp_path / "t.npz").exists()
    # bad images: exit 2, nothing written
    np.save(tmp_path / "bad.npy", np.zeros((4, 5, 5, 3), np.float32))
    res = runner.invoke(cli_app, ["ref-stats", "--images", str(tmp_path / "bad.npy"), "-o", str(tmp_path / "u.npz"),
                                  "--detector", str(detector_file)])
    assert res.exit_code == 2 and "uint8" in res.stderr
    assert not (tmp_path / "u.npz").exists()
    res = runner.invoke(cli_app, ["ref-stats", "--help"])
    assert res.exit_code == 0 and "Example" in res.stdout and "NEON_INCEPTION" in res.stdout


def test_ref_stats_library_records_report(detector_file, tmp_path):
    np.save(tmp_path / "real.npy", _images(12, seed=10))
    rep = Report("ref-stats", argv=["neon", "ref-stats"])
    results = I.ref_stats(RefStatsRequest(tmp_path / "real.npy", tmp_path / "o.npz", Scoring(detector=detector_file), batch=5,
                                          device="cpu"), report=rep)
    assert results["stats_sha256"] == hashlib.sha256((tmp_path / "o.npz").read_bytes()).hexdigest()
    assert [i["role"] for i in rep.inputs] == ["detector", "images"]
    with pytest.raises(UsageError, match=r"\.npz"):
        I.ref_stats(RefStatsRequest(tmp_path / "real.npy", tmp_path / "o.txt", Scoring(detector=detector_file)), report=rep)


# ---------------------------------------------------------------------------- torch.distributed


def _dist_worker(rank: int, world: int, init_file: str, det_path: str, npy: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        det = I.load_detector(det_path, device="cpu")
        src = I.open_images(npy)
        seen = []
        feats = I.compute_features(det, src, batch=3, progress=lambda t, d, total=None, **k: seen.append(total))
        mu, sigma, _ = I.compute_stats(det, src, batch=3)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), feats=feats, mu=mu, sigma=sigma, local_total=seen[-1])
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_split_and_gather(detector_file, tmp_path):
    import torch.multiprocessing as mp

    imgs = _images(13, seed=11)  # 13 images over 2 ranks: slices of 6 and 7
    np.save(tmp_path / "imgs.npy", imgs)
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(detector_file), str(tmp_path / "imgs.npy"), str(tmp_path)),
             nprocs=2, join=True)
    direct = _direct_features(detector_file, imgs)
    mu_ref, sigma_ref = M.feature_stats(direct)
    totals = []
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as r:
            np.testing.assert_allclose(r["feats"], direct, rtol=1e-5, atol=1e-6)  # all rows, in order, on every rank
            np.testing.assert_allclose(r["mu"], mu_ref, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(r["sigma"], sigma_ref, rtol=1e-4, atol=1e-9)
            totals.append(int(r["local_total"]))
    assert totals == [6, 7]  # each rank extracted only its slice
