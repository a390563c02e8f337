"""The pickled Inception detector (``inception-2015-12-05.pkl``, as EDM's fid.py and the Neon paper's
cal_metrics_all.py load it): a TorchScript archive inside the pickle loads inertly and gives the
features of the ``.pt``; a pickle that can only be rebuilt by running code needs --trust-pickle."""

from __future__ import annotations

import io
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from cli_helpers import invoke
from neon_cli import inception as I
from neon_cli.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")


class Tiny(torch.nn.Module):
    """The detector's calling convention (uint8 in, ``return_features``), 6-d features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.to(torch.float32) / 127.5 - 1, size=(9, 9), mode="bilinear", align_corners=False)
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture
def persistence(monkeypatch):
    """A ``torch_utils.persistence`` module holding only the name a persistence record is pickled
    under (``_reconstruct_persistent_obj``), as StyleGAN3 / EDM pickles name it."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what the real one does is exec(meta['module_src']): never called here
        raise AssertionError("the pickle's code ran")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return mod


def _persistent_pickle(persistence, marker, state) -> bytes:
    class Record:
        def __reduce__(self):
            meta = dict(type="class", version=6, class_name="InceptionV3Detector", state=state,
                        module_src=f"open({str(marker)!r}, 'w')\n")
            return (persistence._reconstruct_persistent_obj, (meta,), None)

    return pickle.dumps(Record(), protocol=4)


def test_torchscript_inside_a_pickle_loads_inertly_with_the_pts_features(tmp_path, persistence):
    pt = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(Tiny()).save(str(pt))
    buf = io.BytesIO()
    torch.jit.save(torch.jit.load(str(pt)), buf)
    marker = tmp_path / "ran"
    pkl = tmp_path / "inception-2015-12-05.pkl"
    pkl.write_bytes(_persistent_pickle(persistence, marker, {"training": False, "_script": buf.getvalue()}))
    assert len(I.torchscript_in_pickle(pkl)) == 1
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 7, 8), dtype=np.uint8)
    a = I.load_detector(pt, device="cpu").features(images)
    det = I.load_detector(pkl, device="cpu")
    assert torch.equal(det.features(images), a) and a.shape == (5, 6)
    assert not marker.exists()
    # the CLI takes it as the detector, no --trust-pickle needed, and records the .pkl's sha256
    np.save(tmp_path / "imgs.npy", images)
    out = invoke("ref-stats", "-i", tmp_path / "imgs.npy", "-o", tmp_path / "s.npz", "--detector", pkl, "--json", "-q").output
    import json

    assert json.loads(out[out.index("{"):])["detector_sha256"] == det.sha256
    np.testing.assert_allclose(np.load(tmp_path / "s.npz")["mu"], a.numpy().astype(np.float64).mean(0), rtol=0, atol=1e-7)
    assert not marker.exists()


def test_a_pickle_that_must_run_code_needs_trust(tmp_path, persistence):
    marker = tmp_path / "ran"
    pkl = tmp_path / "inception-2015-12-05.pkl"
    pkl.write_bytes(_persistent_pickle(persistence, marker, {"weights": torch.zeros(3)}))
    with pytest.raises(CheckpointError) as err:
        I.load_detector(pkl, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "InceptionV3Detector" in msg and "--trust-pickle" in msg and "inception-2015-12-05.pt" in msg
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Tiny()))  # an ordinary pickled nn.Module: loading it calls its class
    with pytest.raises(CheckpointError, match="no TorchScript archive inside.*--trust-pickle"):
        I.load_detector(plain, device="cpu")
    images = np.random.default_rng(1).integers(0, 256, (4, 3, 5, 5), dtype=np.uint8)
    got = I.load_detector(plain, device="cpu", trust_pickle=True).features(images)
    with torch.no_grad():
        want = Tiny()(torch.from_numpy(images), return_features=True)
    assert torch.equal(got, want)
    # neon fid: refused without --trust-pickle (exit 2, one line), the features' FID with it
    np.save(tmp_path / "imgs.npy", images)
    f = want.numpy().astype(np.float64)
    np.savez(tmp_path / "ref.npz", mu=f.mean(0) + 0.5, sigma=np.cov(f, rowvar=False) + np.eye(6))
    res = invoke("fid", tmp_path / "imgs.npy", tmp_path / "ref.npz", "--detector", plain, "-q", code=2)
    assert "--trust-pickle" in res.output
    import json

    out = invoke("fid", tmp_path / "imgs.npy", tmp_path / "ref.npz", "--detector", plain, "--trust-pickle", "--json", "-q").output
    from neon_cli.metrics import frechet_distance

    want_fid = frechet_distance(f.mean(0), np.cov(f, rowvar=False), f.mean(0) + 0.5, np.cov(f, rowvar=False) + np.eye(6))
    assert json.loads(out[out.index("{"):])["fid"] == pytest.approx(want_fid, rel=1e-6)
