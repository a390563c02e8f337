"""The fake family of the tune-w tests: features z_i = (theta_0, theta_1, gamma + (theta_0 -
theta_1)/2) + SIGMA eps_i, so the metric ``dist`` is exactly quadratic in (w, gamma) and its
optimum has a closed form (:func:`closed_form`). Shared by test_tune*.py."""

from __future__ import annotations

import importlib
import math
import sys
import types
from importlib import metadata

import pytest
import torch

from neon_cli.family import ENTRY_POINT_GROUP, Setting

SIGMA = 0.05
TARGET = torch.tensor([0.4, 0.6, 2.0], dtype=torch.float64)
THETA_R = [1.0, 0.0]
THETA_S = [1.5, -0.5]   # direction d = theta_s - theta_r = (0.5, -0.5): theta(w) = (1 - w/2, w/2)
THETA_BAD = [1.0, -0.5]  # d = (0, -0.5): theta(w) stays at distance >= 0.6 from the target
THETA_WORSE = [0.5, 0.5]  # d = (-0.5, 0.5): every w > 0 moves theta(w) away from the target (worse than the base)


class FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(2))
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.int64))


def _eps(seeds):
    """The seed plan's noise: eps[i] ~ N(0, I_3) from seed i alone (float64 [N, 3])."""
    return torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds])


class FakeFamily:
    """Features z_i = (theta_0, theta_1, gamma + (theta_0 - theta_1)/2) + SIGMA eps_i; metric ``dist`` =
    ||mean_i z_i - TARGET||^2 (exactly quadratic in (w, gamma)), ``recall`` = exp(-dist)."""

    name = "fake-tune"
    description = "test family"
    settings = (Setting("guidance", 1.8, float, low=0.0, high=10.0), Setting("steps", 4, int, low=1, high=100))
    guidance = "guidance"
    num_classes = 0
    default_model = None
    metrics = ("dist", "recall")
    train_defaults = {"batch": 8, "lr": 1e-3}

    def __init__(self):
        self.sample_calls = 0
        self.seen = []  # (seeds, theta, gamma) of every sample call
        self.fail_after = None

    def load(self, path):
        from safetensors.torch import load_file

        m = FakeModel()
        m.load_state_dict(load_file(path))
        return m.eval()

    def save(self, model, path, metadata):
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path, metadata=dict(metadata))

    def read_metadata(self, path):
        from safetensors import safe_open

        with safe_open(path, "pt") as fh:
            return dict(fh.metadata() or {})

    def sample(self, model, seeds, labels, settings):
        self.sample_calls += 1
        if self.fail_after is not None and self.sample_calls > self.fail_after:
            raise KeyboardInterrupt
        th = model.theta.detach().double()
        g = float(settings["guidance"])
        self.seen.append((seeds.clone(), th.clone(), g))
        mu = torch.stack([th[0], th[1], g + (th[0] - th[1]) / 2])
        z = mu + SIGMA * _eps(seeds)
        return z.contiguous().view(torch.uint8).reshape(len(seeds), 1, 4, 6)  # float64 bytes as "images"

    def score(self, images, labels):
        z = images.reshape(len(images), 24).contiguous().view(torch.float64)
        dist = float(((z.mean(0) - TARGET) ** 2).sum())
        return {"dist": dist, "recall": math.exp(-dist)}

    def loss(self, model, images, labels, generator):
        raise NotImplementedError

    def make_optimizer(self, params, lr):
        return torch.optim.SGD(params, lr=lr)


def closed_form(theta_s, seed, n, gamma=None):
    """The exact best (w, gamma) of the fake family on seeds seed..seed+n-1 (least squares)."""
    e = SIGMA * _eps(torch.arange(seed, seed + n)).mean(0)
    r = torch.tensor(THETA_R, dtype=torch.float64)
    d = torch.tensor(theta_s, dtype=torch.float64) - r
    # mean feature m(w, g) = m0 + w * jw + g * jg
    m0 = torch.stack([r[0], r[1], (r[0] - r[1]) / 2]) + e
    jw = -torch.stack([d[0], d[1], (d[0] - d[1]) / 2])
    jg = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    if gamma is None:  # w only, at a fixed gamma
        res = m0 + FakeFamily.settings[0].default * jg - TARGET
        return float(-(res @ jw) / (jw @ jw)), None
    J = torch.stack([jw, jg], 1)
    sol = torch.linalg.lstsq(J, (TARGET - m0).unsqueeze(1)).solution.squeeze(1)
    return float(sol[0]), float(sol[1])


def _merge_stand_in(base_sd, self_sd, w):
    """theta_r - w (theta_s - theta_r) in float32, cast back; non-float tensors from theta_r."""
    out = {}
    for k, r in base_sd.items():
        s = self_sd[k]
        if r.is_floating_point():
            out[k] = (r.float() - w * (s.float() - r.float())).to(r.dtype)
        else:
            out[k] = r.clone()
    return out


@pytest.fixture
def fam(monkeypatch, tmp_path):
    """Register FakeFamily as entry point ``fake-tune`` and write base / selftrained checkpoints."""
    family = FakeFamily()
    mod = types.ModuleType("_neon_fake_tune_family")
    mod.family = family
    monkeypatch.setitem(sys.modules, "_neon_fake_tune_family", mod)
    ep = metadata.EntryPoint(name="fake-tune", value="_neon_fake_tune_family:family", group=ENTRY_POINT_GROUP)
    monkeypatch.setattr("neon_cli.family.entry_points", lambda: [ep])
    try:
        importlib.import_module("neon_cli.merge").merge_state_dicts  # noqa: B018
    except (ImportError, AttributeError):  # being written by another engineer: local stand-in
        stub = types.ModuleType("neon_cli.merge")
        stub.merge_state_dicts = _merge_stand_in
        monkeypatch.setitem(sys.modules, "neon_cli.merge", stub)

    def ckpt(name, theta):
        m = FakeModel()
        with torch.no_grad():
            m.theta.copy_(torch.tensor(theta))
        m.images_seen.fill_(1234)
        p = tmp_path / name
        family.save(m, str(p), {"train_images": "1000"})
        return p

    (tmp_path / "ft").mkdir()
    family.paths = {
        "base": ckpt("base.safetensors", THETA_R),
        "good": ckpt("ft/theta_s-000002000.safetensors", THETA_S),
        "bad": ckpt("ft/theta_s-000010000.safetensors", THETA_BAD),
        "worse": ckpt("worse.safetensors", THETA_WORSE),
    }
    return family
