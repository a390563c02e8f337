"""The ``edm`` family through the stand-in EDM checkout ``tests/fixtures/edm_repo`` (no NVlabs/edm here).

References: Karras et al. 2022 (Table 1 preconditioning, Eq. 2 loss weighting, Eq. 5 time steps,
Algorithms 1-2), written out in :mod:`neon_edm.reference` and in the tests below; EDM's
StackedRandomGenerator convention (one generator per seed: latents, then the label draw, then the
churn noise); EDM's training_loop.py formulas (lr ramp, EMA beta); the file formats of EDM's
snapshots and dataset_tool.py. ``benchmarks/verify_edm.py`` runs the same comparisons against a
real clone.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import invoke
from neon_cli.commands import app
from neon_cli.errors import CheckpointError, FamilyError, UsageError
from neon_cli.family import get_family, load_model
from neon_edm import reference as R
from neon_edm import sampler as S

REPO = Path(__file__).resolve().parent / "fixtures" / "edm_repo"
TINY = dict(model_type="SongUNet", model_channels=8, channel_mult=[1, 2], dropout=0.13)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def edm_modules():
    """The stand-in checkout importable (as --set repo / NEON_EDM_REPO make it), removed afterwards."""
    sys.path.insert(0, str(REPO))
    import training.augment
    import training.loss
    import training.networks

    yield training.networks, training.loss, training.augment
    while str(REPO) in sys.path:
        sys.path.remove(str(REPO))
    for name in list(sys.modules):
        if name.split(".")[0] in ("dnnlib", "torch_utils", "training") or name.startswith("_imported_module_"):
            sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _repo_env(monkeypatch):
    monkeypatch.setenv("NEON_EDM_REPO", str(REPO))


def write_pkl(path, net, loss_fn=None, augment_pipe=None) -> str:
    """An EDM network pickle as training_loop.py writes it."""
    data = dict(ema=net.eval().requires_grad_(False), loss_fn=loss_fn, augment_pipe=augment_pipe,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip", use_labels=False))
    with open(path, "wb") as fh:
        pickle.dump(data, fh)
    return str(path)


@pytest.fixture(scope="module")
def pkls(edm_modules, tmp_path_factory):
    networks, loss, augment = edm_modules
    d = tmp_path_factory.mktemp("edm")
    torch.manual_seed(0)
    out = {}
    out["edm"] = write_pkl(d / "edm-uncond.pkl", networks.EDMPrecond(8, 3, augment_dim=9, **TINY), loss.EDMLoss())
    out["cond"] = write_pkl(d / "edm-cond.pkl", networks.EDMPrecond(8, 3, label_dim=4, augment_dim=9, **TINY), loss.EDMLoss())
    out["vp"] = write_pkl(d / "vp.pkl", networks.VPPrecond(8, 3, embedding_type="fourier", resample_filter=[1, 3, 3, 1], **TINY))
    out["ve"] = write_pkl(d / "ve.pkl", networks.VEPrecond(8, 3, **{**TINY, "model_type": "DhariwalUNet"}))
    out["noaug"] = write_pkl(d / "noaug.pkl", networks.EDMPrecond(8, 3, **TINY))
    return out


@pytest.fixture(scope="module")
def fam():
    return get_family("edm")


def neon(*args: str, code: int | tuple[int, ...] = 0) -> str:
    return invoke(*args, code=code).output


# ---------------------------------------------------------------------------------------------
# the checkout, --trust-pickle, and reading without running code


def test_missing_checkout_and_missing_trust_are_one_line_errors(pkls, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NEON_EDM_REPO"}
    env["PYTHONPATH"] = ""
    res = subprocess.run([sys.executable, "-m", "neon_cli", "synth", "edm", "--model", pkls["edm"], "-n", "2", "-o", str(tmp_path / "S"),
                          "--trust-pickle", "-q"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 2
    line = res.stderr.strip()
    assert "\n" not in line and "--set repo=PATH" in line and "NEON_EDM_REPO" in line and "github.com/NVlabs/edm" in line
    out = neon("synth", "edm", "--model", pkls["edm"], "-n", "2", "-o", str(tmp_path / "S"), "-q", code=2)
    assert "--trust-pickle" in out and "runs the Python code pickled inside it" in out
    out = neon("synth", "edm", "--model", pkls["edm"], "-n", "2", "-o", str(tmp_path / "S2"), "--set", f"repo={tmp_path}",
               "--trust-pickle", "-q", code=2)
    assert "--set repo" in out and "not a checkout of NVlabs/edm" in out


def test_metadata_is_read_without_running_the_pickled_code(fam, pkls, edm_modules, tmp_path):
    marker = tmp_path / "ran"
    src = f"open({str(marker)!r}, 'w').write('x')\nclass EDMPrecond: pass\n"

    class Evil:
        def __reduce__(self):
            meta = dict(type="class", version=6, module_src=src, class_name="EDMPrecond",
                        state={"label_dim": 7, "img_channels": 3, "img_resolution": 8})
            from torch_utils.persistence import _reconstruct_persistent_obj

            return (_reconstruct_persistent_obj, (meta,), None)

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": Evil(), "neon": {"train_images": "123"}}))
    assert fam.model_num_classes(str(evil)) == 7
    assert fam.read_metadata(str(evil)) == {"train_images": "123"}
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_model(fam, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # trusted, EDM's loading runs the code (the test's pickle is live)
        load_model(fam, evil, trust_pickle=True)
    assert marker.exists()
    assert fam.model_num_classes(pkls["cond"]) == 4 and fam.model_num_classes(pkls["edm"]) == 0
    zipped = tmp_path / "training-state-000100.pt"
    torch.save({"x": 1}, zipped)
    with pytest.raises(CheckpointError, match="not an EDM network pickle"):
        fam.model_num_classes(str(zipped))


# ---------------------------------------------------------------------------------------------
# the sampler (Karras et al. 2022, Eq. 5 and Algorithms 1-2)


class Gaussian(torch.nn.Module):
    """The exact denoiser of data ~ N(0, s^2 I): D(x; sigma) = x s^2 / (s^2 + sigma^2); records each call's sigma."""

    sigma_min, sigma_max, label_dim, img_channels, img_resolution = 0.0, float("inf"), 0, 3, 4

    def __init__(self, s=0.5):
        super().__init__()
        self.s = s
        self.calls = []
        self.w = torch.nn.Parameter(torch.zeros(1))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((float(sigma), x.clone(), class_labels))
        return x * self.s ** 2 / (self.s ** 2 + sigma ** 2)


def test_time_steps_are_eq5_clamped_to_the_network(pkls, fam):
    t = S.karras_sigmas(18, 0.002, 80.0, 7.0).numpy()
    i = np.arange(18)
    np.testing.assert_allclose(t, (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rtol=1e-12)
    assert t[0] == pytest.approx(80.0) and t[-1] == pytest.approx(0.002)
    vp = load_model(fam, pkls["vp"], trust_pickle=True)  # VP supports sigma(1e-5) .. sigma(1) only
    steps = S.time_steps(vp, 5, None, None, 7.0)
    assert steps[-1] == 0 and len(steps) == 6
    assert float(steps[0]) == 80.0 and float(R.vp_sigma(1.0)) > 80  # min(80, sigma(1) = 152.2)
    assert float(steps[4]) == pytest.approx(0.002)  # max(0.002, sigma(1e-5) = 0.001)
    # the network's own limit (computed by VPPrecond in float32: 0.000977, sigma(1e-5) = 0.001 in float64)
    assert float(S.time_steps(vp, 5, 1e-4, None, 7.0)[4]) == pytest.approx(vp.sigma_min, rel=1e-12)
    assert vp.sigma_min == pytest.approx(float(R.vp_sigma(1e-5)), rel=0.03)
    assert float(S.time_steps(vp, 5, None, 1000.0, 7.0)[0]) == pytest.approx(float(R.vp_sigma(1.0)), rel=1e-6)
    assert float(S.time_steps(Gaussian(), 3, 0.1, 5.0, 2.0)[1]) == pytest.approx(((5 ** 0.5 + 0.1 ** 0.5) / 2) ** 2)


def test_heun_is_algorithm_1_second_order_with_2n_minus_1_evaluations():
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    errors = {}
    for n in (18, 36):
        net = Gaussian()
        t = S.time_steps(net, n, None, None, 7.0)
        heun = S.heun(net, x0, None, t, [0.0] * n)
        exact = x0.double() * t[0] * 0.5 / torch.sqrt(0.25 + t[0] ** 2)  # x(sigma) ~ sqrt(s^2 + sigma^2)
        euler = x0.double() * t[0]
        for i in range(n):
            euler = euler + (t[i + 1] - t[i]) * (euler - Gaussian()(euler, t[i])) / t[i]
        errors[n] = (float((heun - exact).abs().max()), float((euler - exact).abs().max()))
        # one evaluation at t_i, one correction at t_{i+1} (none at t_N = 0)
        expect = [float(t[0])] + [float(v) for v in t[1:n] for _ in (0, 1)]
        assert len(net.calls) == S.nfe(n) == 2 * n - 1
        np.testing.assert_allclose([c[0] for c in net.calls], expect, rtol=1e-12)
    assert errors[18][0] / errors[36][0] > 3.5  # second order
    assert 1.5 < errors[18][1] / errors[36][1] < 2.5  # (Euler: first order)
    assert errors[36][0] < errors[36][1] / 4 < 0.05


def test_per_seed_generator_draws_latents_label_then_churn_noise():
    """EDM's StackedRandomGenerator order on a class-conditional net, and Algorithm 2's t_hat."""
    net = Gaussian()
    net.label_dim = 5
    settings = {"num_steps": 4, "S_churn": 2.0, "S_min": 0.05, "S_max": 10.0, "S_noise": 1.007}
    S.sample(net, torch.tensor([7, 2 ** 32 + 7]), torch.tensor([3, 1]), settings)
    t = S.time_steps(net, 4, None, None, 7.0)
    gamma = min(2.0 / 4, 2 ** 0.5 - 1)
    inside = [0.05 <= float(v) <= 10.0 for v in t[:4]]
    assert inside == [False, True, True, False]  # t_0 = 80 and t_3 = 0.002 lie outside [S_min, S_max]
    g = torch.Generator().manual_seed(7)
    latent = torch.randn([3, 4, 4], generator=g)
    torch.randint(5, size=[], generator=g)  # EDM's label draw, discarded for neon's label
    eps0 = torch.randn([3, 4, 4], generator=g, dtype=torch.float64)
    first_sigma, first_x, labels = net.calls[0]
    assert first_sigma == float(t[0])  # gamma_0 = 0: t_hat = t_0, but the noise was still drawn (EDM draws every step)
    torch.testing.assert_close(first_x[0], latent.double() * t[0], rtol=0, atol=0)
    torch.testing.assert_close(first_x[1], first_x[0], rtol=0, atol=0)  # seed 2**32 + 7 is seed 7 (EDM's seed % 2**32)
    assert labels.tolist() == torch.eye(5)[[3, 1]].tolist()
    t_hat1 = float(t[1]) * (1 + gamma)
    assert net.calls[2][0] == pytest.approx(t_hat1, rel=1e-12)  # step 1 starts at t_hat = t_1 (1 + gamma)
    # x_hat_1 = x_1 + sqrt(t_hat^2 - t_1^2) S_noise eps_1, eps_1 the generator's next draw after eps_0
    eps1 = torch.randn([3, 4, 4], generator=g, dtype=torch.float64)
    x1 = net.calls[1][1][0]  # correction point of step 0 = Heun update ... recompute it exactly:
    d0 = (first_x[0] - first_x[0] * 0.25 / (0.25 + t[0] ** 2)) / t[0]
    euler = first_x[0] + (t[1] - t[0]) * d0
    torch.testing.assert_close(x1, euler, rtol=1e-12, atol=1e-12)
    d1 = (x1 - x1 * 0.25 / (0.25 + t[1] ** 2)) / t[1]
    x_after0 = first_x[0] + (t[1] - t[0]) * (0.5 * d0 + 0.5 * d1)
    expect = x_after0 + (torch.tensor(t_hat1, dtype=torch.float64) ** 2 - t[1] ** 2).sqrt() * 1.007 * eps1
    torch.testing.assert_close(net.calls[2][1][0], expect, rtol=1e-10, atol=1e-10)
    assert eps0.abs().sum() > 0


def test_image_depends_only_on_its_seed_and_label(fam, pkls):
    net = load_model(fam, pkls["cond"], trust_pickle=True)
    st = {"num_steps": 3, "S_churn": 1.0}
    many = fam.sample(net, torch.arange(10, 15), torch.tensor([0, 1, 2, 3, 0]), st)
    one = fam.sample(net, torch.tensor([13]), torch.tensor([3]), st)
    assert many.dtype == torch.uint8 and many.shape == (5, 3, 8, 8)
    assert (many[3:4].int() - one.int()).abs().max() <= 1
    other = fam.sample(net, torch.tensor([13]), torch.tensor([2]), st)
    assert (other.int() - one.int()).abs().max() > 0
    with pytest.raises(FamilyError, match="class-conditional"):
        fam.sample(net, torch.tensor([1]), None, st)
    assert S.to_uint8(torch.tensor([-1.0, -0.999, 0.0, 0.99, 1.0, 2.0])).tolist() == [0, 0, 128, 254, 255, 255]
    labels = S.edm_labels(torch.arange(50), 10, [3, 8, 8])
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10 and len(set(labels.tolist())) > 5


# ---------------------------------------------------------------------------------------------
# preconditioning (Table 1) and loss (Eq. 2)


class Spy(torch.nn.Module):
    """Stands in for F: records its inputs and returns a fixed field."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = (x.clone(), noise_labels.clone())
        return torch.full_like(x, 0.25)


@pytest.mark.parametrize("cls,kind", [("VPPrecond", "vp"), ("VEPrecond", "ve"), ("EDMPrecond", "edm")])
def test_stand_in_preconditioning_is_table_1(edm_modules, cls, kind):
    networks = edm_modules[0]
    net = getattr(networks, cls)(8, 3, **TINY)
    net.model = Spy()
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    x = torch.randn(4, 3, 8, 8)
    D = net(x, sigma)
    c_skip, c_out, c_in, c_noise = (np.asarray(c, dtype=np.float64).reshape(-1, 1, 1, 1) * np.ones((4, 1, 1, 1))
                                    for c in R.preconditioning(kind, sigma.numpy().astype(np.float64)))
    np.testing.assert_allclose(net.model.seen[0].numpy(), c_in * x.numpy(), rtol=2e-6, atol=1e-7)
    # (float32 like EDM: VP's t(sigma) = ... log(1 + sigma^2) loses digits at sigma = 0.01)
    np.testing.assert_allclose(net.model.seen[1].numpy(), c_noise.ravel(), rtol=5e-4, atol=1e-5)
    np.testing.assert_allclose(D.numpy(), c_skip * x.numpy() + c_out * 0.25, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("which,kind", [("edm", "edm"), ("vp", "vp"), ("ve", "ve")])
def test_loss_is_eq2_weighted_denoising_error(fam, pkls, which, kind):
    """neon's loss = mean over images of sum over pixels lambda(sigma) (D(y + n; sigma) - y)^2, with
    sigma, n and dropout drawn from torch's generator seeded from the step's generator."""
    net = load_model(fam, pkls[which], trust_pickle=True, purpose="train", settings={"augment": 0.0, "dropout": 0.0})
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    got = fam.loss(net, images, None, torch.Generator().manual_seed(5))
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(5)))
    y = images.float() / 127.5 - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "edm":
            sigma = (torch.randn([6, 1, 1, 1]) * 1.2 - 1.2).exp()
        elif kind == "vp":
            sigma = torch.as_tensor(R.vp_sigma((1 + torch.rand([6, 1, 1, 1]) * (1e-5 - 1)).double().numpy())).float()
        else:
            sigma = 0.02 * (100 / 0.02) ** torch.rand([6, 1, 1, 1])
        n = torch.randn_like(y) * sigma
        D = net(y + n, sigma, None)
    lam = torch.as_tensor(R.loss_weight(kind, sigma.double().numpy()))
    expect = (lam * (D.double() - y.double()) ** 2).sum() / 6
    torch.testing.assert_close(got.double(), expect, rtol=2e-5, atol=0)
    again = fam.loss(net, images, None, torch.Generator().manual_seed(5))
    assert torch.equal(got, again) and not torch.equal(got, fam.loss(net, images, None, torch.Generator().manual_seed(6)))


# ---------------------------------------------------------------------------------------------
# the train.py --transfer recipe and the training loop's formulas


def test_transfer_rebuilds_the_network_with_edms_recipe(fam, pkls, edm_modules):
    _, loss, augment = edm_modules
    base = load_model(fam, pkls["cond"], trust_pickle=True)
    net = load_model(fam, pkls["cond"], trust_pickle=True, purpose="train", settings={"augment": 0.15, "dropout": 0.05})
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert type(net).__name__ == "EDMPrecond" and net.init_kwargs["dropout"] == 0.05 and net.init_kwargs["use_fp16"] is False
    assert {m.dropout for m in net.modules() if type(m).__name__ == "Block"} == {0.05}
    for (k, a), (k2, b) in zip(base.state_dict().items(), net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    extras = net._neon_edm_extras
    assert type(extras["loss_fn"]).__name__ == "EDMLoss"
    pipe = extras["augment_pipe"]
    assert type(pipe).__name__ == "AugmentPipe" and pipe.p == 0.15
    assert (pipe.xflip, pipe.yflip, pipe.scale, pipe.rotate_frac, pipe.aniso, pipe.translate_frac) == (1e8, 1, 1, 1, 1, 1)
    vp = load_model(fam, pkls["vp"], trust_pickle=True, purpose="train", settings={"augment": 0.0, "dropout": 0.1})
    assert type(vp._neon_edm_extras["loss_fn"]).__name__ == "VPLoss" and vp._neon_edm_extras["augment_pipe"] is None
    with pytest.raises(FamilyError, match="augment_dim=0.*--set augment=0"):
        load_model(fam, pkls["noaug"], trust_pickle=True, purpose="train", settings={"augment": 0.12, "dropout": 0.1})
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.isfinite(fam.loss(net, images, torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0)))
    with pytest.raises(FamilyError, match="no labels"):
        fam.loss(net, images, None, torch.Generator())


def test_optimizer_is_adam_with_edms_betas_eps_and_gradient_cleanup(fam):
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    q = torch.nn.Parameter(p.detach().clone())
    opt = fam.make_optimizer([p], 1e-2)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8 and isinstance(opt, torch.optim.Adam)
    ref = torch.optim.Adam([q], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    p.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5])
    q.grad = torch.tensor([0.0, 1e5, -1e5, 0.5])  # training_loop.py's nan_to_num(nan=0, posinf=1e5, neginf=-1e5)
    opt.step()
    ref.step()
    assert torch.equal(p, q)


def test_train_loop_follows_edms_lr_ramp_and_ema_halflife(fam, pkls):
    """training_loop.py: lr = lr * min(cur_nimg / rampup, 1) with cur_nimg the images seen *before*
    the step; ema = beta ema + (1 - beta) net with beta = 0.5 ** (batch / halflife)."""
    from neon_cli.train import Saving, TrainConfig, snapshot_points, train_loop

    lrs = []

    class Recording:
        def __getattr__(self, name):
            return getattr(fam, name)

        def make_optimizer(self, params, lr):
            opt = fam.make_optimizer(params, lr)
            step = opt.step

            def record(closure=None):
                lrs.append(opt.param_groups[0]["lr"])
                return step(closure)

            opt.step = record
            return opt

    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(8) % 4
    net = load_model(fam, pkls["cond"], trust_pickle=True, purpose="train", settings={"augment": 0.0, "dropout": 0.0})
    made = []
    train_loop(Recording(), net, images, labels, TrainConfig(budget=36, lr=0.1, batch=8, warmup=16, save_every=12),
               Saving(on_snapshot=lambda seen, w: made.append(seen)))
    assert lrs == pytest.approx([0.1 * min(k * 8 / 16, 1) for k in range(5)]) == [0.0, 0.05, 0.1, 0.1, 0.1]
    assert made == snapshot_points(36, 8, 12) == [16, 24, 36]  # first step at or past 12, 24, 36: finetune names snapshots from this

    net = load_model(fam, pkls["cond"], trust_pickle=True, purpose="train", settings={"augment": 0.0, "dropout": 0.0})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ema = train_loop(fam, net, images, labels, TrainConfig(budget=8, lr=1e-3, batch=8, ema_halflife=20))
    beta = 0.5 ** (8 / 20)
    after = net.state_dict()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, beta * before[k] + (1 - beta) * after[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert fam.train_defaults == {"batch": 512, "lr": 1e-3, "warmup_images": 10_000_000, "ema_halflife_images": 500_000}
    assert fam.guidance is None


# ---------------------------------------------------------------------------------------------
# every command end to end


def test_synth_export_finetune_tune_w_eval_end_to_end(fam, pkls, edm_modules, tmp_path):
    from neon_diffusers.scoring import write_pixel_stats
    from neon_edm.inert import network_info

    base = pkls["cond"]
    Sdir = tmp_path / "S"
    neon("synth", "edm", "--model", base, "-n", "12", "-o", str(Sdir), "--set", "num_steps=3", "--batch", "5", "--trust-pickle", "-q")
    from neon_cli.synth import load_synthetic

    images, labels, manifest = load_synthetic(Sdir)
    assert labels.tolist() == [i % 4 for i in range(12)] and manifest["settings"]["num_steps"] == 3
    direct = fam.sample(load_model(fam, base, trust_pickle=True), torch.arange(12), labels, {**manifest["settings"]})
    assert (direct.int() - images.int()).abs().max() <= 1

    neon("export", str(Sdir), "--format", "edm-zip", "-o", str(tmp_path / "S.zip"), "-q")
    with zipfile.ZipFile(tmp_path / "S.zip") as z:
        meta = json.loads(z.read("dataset.json"))
        names = sorted(n for n in z.namelist() if n.endswith(".png"))  # ImageFolderDataset's order
        assert names[:2] == ["00000/img00000000.png", "00000/img00000001.png"] and len(names) == 12
        assert dict(meta["labels"]) == {n: i % 4 for i, n in enumerate(names)}
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        import PIL.Image

        png = np.array(PIL.Image.open(io.BytesIO(z.read(names[5]))))
        assert np.array_equal(png, images[5].permute(1, 2, 0).numpy())
        assert json.loads(z.read("neon.json"))["files"][5] == {"file": names[5], "seed": 5}

    ft = tmp_path / "ft"
    neon("finetune", "edm", "--model", base, "-d", str(Sdir), "-b", "2000", "--batch", "100", "--save-every", "1000", "--lr", "1e-3",
         "--warmup", "0", "--ema-halflife", "1000", "--set", "augment=0.12", "-o", str(ft), "--trust-pickle", "-q")
    snaps = sorted(ft.glob("network-snapshot-*.pkl"))
    assert [s.name for s in snaps] == ["network-snapshot-000001.pkl", "network-snapshot-000002.pkl"]
    summary = json.loads((ft / "finetune.json").read_text())
    assert [s["images_seen"] for s in summary["snapshots"]] == [1000, 2000]
    with open(snaps[-1], "rb") as fh:  # EDM's own loading (generate.py / train.py --transfer)
        data = pickle.load(fh)
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs", "neon"}
    assert type(data["ema"]).__name__ == "EDMPrecond" and not data["ema"].training and data["ema"].label_dim == 4
    assert type(data["loss_fn"]).__name__ == "EDMLoss" and data["augment_pipe"].p == 0.12
    assert not hasattr(data["ema"], "_neon_edm_extras")
    assert data["neon"]["finetune_images"] == "2000" and fam.read_metadata(str(snaps[-1]))["finetune_images"] == "2000"
    assert network_info(snaps[-1])["init_kwargs"]["dropout"] == 0.13  # inert view
    theta_r = load_model(fam, base, trust_pickle=True).state_dict()
    changed = [k for k, v in data["ema"].state_dict().items() if not torch.equal(v, theta_r[k])]
    assert changed and all("resample_filter" not in k for k in changed)

    write_pixel_stats(Sdir, tmp_path / "px.npz")
    best = tmp_path / "best.pkl"
    out = neon("tune-w", "edm", "--base", base, "--selftrained", str(snaps[-1]), "--num-samples", "8", "--max-evals", "3",
               "--set", "num_steps=2", "--ref-stats", str(tmp_path / "px.npz"), "--trust-pickle", "--write-anyway", "-o", str(best), "-q",
               "--report", str(tmp_path / "tune.json"),
               code=(0, 5))  # 8 images of a tiny net: Neon need not beat the base (exit 5), -o is written either way
    rep = json.loads((tmp_path / "tune.json").read_text())
    res = rep["results"]
    assert rep["status"] == ("ok" if res["improved"] else "no_improvement")
    assert res["metric"] == "pixel_fid" and res["chosen"]["gamma"] is None
    with open(best, "rb") as fh:
        merged = pickle.load(fh)
    assert merged["neon"]["neon.w"] == repr(float(res["chosen"]["w"])) and type(merged["loss_fn"]).__name__ == "EDMLoss"
    ev = json.loads(neon("eval", "edm", "--model", str(best), "--num-samples", "8", "--seed", str(res["seed"] if "seed" in res else 0),
                         "--set", "num_steps=2", "--ref-stats", str(tmp_path / "px.npz"), "--trust-pickle", "-q", "--json"))
    assert np.isfinite(ev["metrics"]["pixel_fid"])

    out = neon("finetune", "edm", "--model", base, "-d", str(Sdir), "-b", "2000", "--batch", "100", "--save-every", "500",
               "-o", str(tmp_path / "ft2"), "--trust-pickle", "-q", code=2)
    assert "--save-every" in out and "network-snapshot-000001.pkl" in out


def _has_inert_pickle_merge() -> bool:
    """The inert EDM .pkl reader/writer of the checkpoint issue (13) ships with ``neon inspect``."""
    return any(getattr(c, "name", None) == "inspect" for c in app.registered_commands)


@pytest.mark.skipif(not _has_inert_pickle_merge(), reason="needs the inert .pkl merge of the ckpt branch (issue 13)")
def test_merge_edm_pickles_without_trust_then_eval(fam, pkls, edm_modules, tmp_path):
    base = pkls["cond"]
    net = load_model(fam, base, trust_pickle=True)
    snap = tmp_path / "network-snapshot-000001.pkl"
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fam.save(net, str(snap), {"finetune_images": "1000"})
    out = tmp_path / "neon.pkl"
    neon("merge", base, str(snap), "--w", "1", "-o", str(out), "-q")
    with open(out, "rb") as fh:
        merged = pickle.load(fh)["ema"].state_dict()
    r = load_model(fam, base, trust_pickle=True).state_dict()
    s = load_model(fam, str(snap), trust_pickle=True).state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(v, r[k] - 1.0 * (s[k] - r[k]), rtol=1e-6, atol=1e-6)
        if "resample_filter" in k:
            assert torch.equal(v, r[k])
    assert fam.model_num_classes(str(out)) == 4
    neon("eval", "edm", "--model", str(out), "--num-samples", "4", "--set", "num_steps=2", "--trust-pickle", "-q", "--json",
         "--ref-stats", str(_pixel_stats(tmp_path)))


def _pixel_stats(tmp_path: Path) -> Path:
    from neon_diffusers.scoring import write_pixel_stats

    arr = tmp_path / "real.npy"
    np.save(arr, np.random.default_rng(0).integers(0, 256, (8, 3, 8, 8), dtype=np.uint8))
    write_pixel_stats(arr, tmp_path / "px.npz")
    return tmp_path / "px.npz"


def test_export_refuses_bad_targets_and_writes_null_labels(fam, pkls, tmp_path):
    Sdir = tmp_path / "S"
    neon("synth", "edm", "--model", pkls["edm"], "-n", "3", "-o", str(Sdir), "--set", "num_steps=2", "--trust-pickle", "-q")
    out = neon("export", str(Sdir), "-o", str(tmp_path / "S.tar"), "-q", code=2)
    assert "-o" in out and ".zip" in out
    out = neon("export", str(Sdir), "-o", str(Sdir / "inside.zip"), "-q", code=2)
    assert "inside the input" in out
    out = neon("export", str(Sdir), "--format", "webdataset", "-o", str(tmp_path / "a.zip"), "-q", code=2)  # imagefolder exists since t2i
    assert "--format" in out
    neon("export", str(Sdir), "-o", str(tmp_path / "u.zip"), "-q")
    with zipfile.ZipFile(tmp_path / "u.zip") as z:
        assert json.loads(z.read("dataset.json")) == {"labels": None}


def test_edm_inception_pickle_is_refused_without_running_it(edm_modules, tmp_path):
    from neon_cli.inception import load_detector

    marker = tmp_path / "ran"

    class Detector:
        def __reduce__(self):
            from torch_utils.persistence import _reconstruct_persistent_obj

            meta = dict(type="class", version=6, module_src=f"open({str(marker)!r}, 'w')\n", class_name="InceptionV3Detector",
                        state={"weights": torch.zeros(3)})
            return (_reconstruct_persistent_obj, (meta,), None)

    pkl = tmp_path / "inception-2015-12-05.pkl"
    pkl.write_bytes(pickle.dumps(Detector()))
    with pytest.raises(CheckpointError) as err:
        load_detector(pkl, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "InceptionV3Detector" in msg and "inception-2015-12-05.pt" in msg and "torch_utils.persistence" in msg
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# --recipe paper: the Neon paper's edm/run_*.sh (train.py --transfer=<vp.pkl>, default --precond=edm)


def test_paper_precond_is_edmprecond_with_the_vp_architecture_and_weights(fam, pkls, edm_modules):
    """--set precond=edm (train.py's default, which the paper's scripts ran): an EDMPrecond built
    with the VP pickle's architecture arguments (VP's beta_d/beta_min/M/epsilon_t dropped, EDM's
    defaults sigma_min 0, sigma_max inf, sigma_data 0.5), the VP weights copied in, EDMLoss."""
    networks, _, _ = edm_modules
    vp = load_model(fam, pkls["vp"], trust_pickle=True)
    net = load_model(fam, pkls["vp"], trust_pickle=True, purpose="train", settings={"augment": 0.0, "dropout": 0.0, "precond": "edm"})
    assert type(net).__name__ == "EDMPrecond" and type(net._neon_edm_extras["loss_fn"]).__name__ == "EDMLoss"
    expect = {k: v for k, v in vp.init_kwargs.items() if k not in ("beta_d", "beta_min", "M", "epsilon_t")}
    assert dict(net.init_kwargs) == {**expect, "dropout": 0.0, "use_fp16": False}
    assert (net.sigma_min, net.sigma_max, net.sigma_data) == (0, float("inf"), 0.5)
    ref = networks.EDMPrecond(*vp.init_args, **{**expect, "dropout": 0.0})
    ref.load_state_dict(vp.state_dict())
    assert list(ref.state_dict()) == list(vp.state_dict()) == list(net.state_dict())  # same keys: merges into the VP base
    for k, v in vp.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    # EDMLoss on the EDM-preconditioned VP weights: Eq. 2 with EDM's lambda and log-normal sigma
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    got = fam.loss(net, images, None, torch.Generator().manual_seed(5))
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(5)))
    y = images.float() / 127.5 - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sigma = (torch.randn([6, 1, 1, 1]) * 1.2 - 1.2).exp()
        D = ref(y + torch.randn_like(y) * sigma, sigma, None)
    lam = torch.as_tensor(R.loss_weight("edm", sigma.double().numpy()))
    torch.testing.assert_close(got.double(), (lam * (D.double() - y.double()) ** 2).sum() / 6, rtol=2e-5, atol=0)
    same = load_model(fam, pkls["vp"], trust_pickle=True, purpose="train", settings={"augment": 0.0, "dropout": 0.0})
    assert type(same).__name__ == "VPPrecond"  # the default recipe keeps the pickle's class
    with pytest.raises(FamilyError, match="precond"):
        load_model(fam, pkls["vp"], trust_pickle=True, purpose="train", settings={"augment": 0.0, "precond": "xx"})


def test_recipe_paper_finetunes_edmprecond_merges_into_vp_base_and_warns(fam, pkls, edm_modules, tmp_path):
    networks, _, _ = edm_modules
    torch.manual_seed(1)
    base = write_pkl(tmp_path / "vp-cond.pkl", networks.VPPrecond(8, 3, label_dim=4, augment_dim=9, **TINY))
    Sdir = tmp_path / "S"
    neon("synth", "edm", "--model", base, "-n", "8", "-o", str(Sdir), "--set", "num_steps=2", "--trust-pickle", "-q")
    checkouts = json.loads((Sdir / "manifest.json").read_text())["checkouts"]  # the official code that made S
    assert set(checkouts) == {"edm"} and checkouts["edm"]["path"] == str(REPO.resolve())
    assert set(checkouts["edm"]) == {"path", "commit", "dirty", "toplevel"}
    out = neon("finetune", "edm", "--model", base, "-d", str(Sdir), "-b", "16", "--recipe", "paper", "-o", str(tmp_path / "x"),
               "--trust-pickle", "-q", code=2)
    assert "--recipe paper" in out and "paper-cifar10" in out and "8x8" in out  # the paper ran 32x32 / 64x64 only
    out = neon("finetune", "edm", "--model", base, "-d", str(Sdir), "-b", "16", "--recipe", "nope", "-o", str(tmp_path / "x"),
               "--trust-pickle", "-q", code=2)
    assert "--recipe nope" in out and "paper-ffhq" in out
    ft = tmp_path / "ft"
    neon("finetune", "edm", "--model", base, "-d", str(Sdir), "-b", "1000", "--batch", "500", "--recipe", "paper-ffhq",
         "--set", "augment=0", "-o", str(ft), "--trust-pickle", "-q", "--report", str(tmp_path / "ft.json"))
    rep = json.loads((tmp_path / "ft.json").read_text())
    cfg, res = rep["settings"]["train_config"], rep["results"]
    assert rep["settings"]["recipe"] == res["recipe"] == "paper-ffhq"
    assert (cfg["lr"], cfg["warmup"], cfg["ema_halflife"]) == (4e-6, 10_000_000, 500_000)  # --batch overrides 256
    assert rep["settings"]["resolved_settings"]["precond"] == "edm" and rep["settings"]["resolved_settings"]["dropout"] == 0.05
    assert rep["settings"]["resolved_settings"]["augment"] == 0.0  # --set wins over the recipe's 0.15
    assert len(res["warnings"]) == 2 and "lr warm-up" in res["warnings"][0] and "EMA half-life" in res["warnings"][1]
    assert rep["versions"]["checkouts"]["edm"]["path"] == str(REPO.resolve())
    assert res["precision"] == "fp32" and res["checkouts"] == rep["versions"]["checkouts"]
    snap = ft / "network-snapshot-000001.pkl"
    with open(snap, "rb") as fh:
        data = pickle.load(fh)
    assert type(data["ema"]).__name__ == "EDMPrecond" and type(data["loss_fn"]).__name__ == "EDMLoss"
    assert list(data["ema"].state_dict()) == list(load_model(fam, base, trust_pickle=True).state_dict())
    # merged into the VP base (cal_metrics_all.py's merge): the output keeps the base's VP preconditioning, with warnings
    merged = tmp_path / "neon.pkl"
    neon("merge", base, str(snap), "--w", "1", "-o", str(merged), "-q", "--report", str(tmp_path / "m.json"))
    warns = json.loads((tmp_path / "m.json").read_text())["results"]["warnings"]
    assert any("preconditioning differs: theta_r is VPPrecond, theta_s is EDMPrecond" in w for w in warns)
    assert not any("dropout" in w for w in warns)  # a training-only argument is no mismatch
    with open(merged, "rb") as fh:
        assert type(pickle.load(fh)["ema"]).__name__ == "VPPrecond"
    from neon_diffusers.scoring import write_pixel_stats

    write_pixel_stats(Sdir, tmp_path / "px.npz")
    neon("tune-w", "edm", "--base", base, "--selftrained", str(snap), "--num-samples", "4", "--max-evals", "2",
         "--set", "num_steps=2", "--ref-stats", str(tmp_path / "px.npz"), "--trust-pickle", "-q",
         "--report", str(tmp_path / "t.json"), code=(0, 5))
    warns = json.loads((tmp_path / "t.json").read_text())["results"]["warnings"]
    assert warns == ["network-snapshot-000001.pkl: preconditioning differs: theta_r is VPPrecond, theta_s is EDMPrecond "
                     "(theta_s was trained with another parameterisation; the merge is sampled with theta_r's)"]
