"""The paper's Gaussian toys (App. B.1 and B.11) as families: closed forms against reference
libraries and Monte Carlo, the B.1 synthetic step against Eq. B.1, Neon's sign on B.1 through
synth -> finetune -> tune-w, and the B.11 DDPM's schedule, sampler and sign of w*."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from neon_cli.errors import FamilyError
from neon_cli.family import get_family
from neon_cli.finetune import finetune
from neon_cli.merge import merge_state_dicts
from neon_cli.metrics import frechet_distance
from neon_cli.report import Report
from neon_cli.synth import synthesize
from neon_cli.train import TrainConfig, train_loop
from neon_cli.tune import run_tune_w
from neon_gaussian import ddpm as D
from neon_gaussian import mle as M
from neon_gaussian.common import gaussian_cross_entropy, read_metadata, w2_squared


@pytest.fixture(scope="module")
def gauss():
    return get_family("gaussian")


@pytest.fixture(scope="module")
def ddpm():
    return get_family("gaussian-ddpm")


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.3 * np.eye(d)


# ---------------------------------------------------------------------------------------------
# closed forms
# ---------------------------------------------------------------------------------------------


def test_cross_entropy_matches_scipy_monte_carlo():
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(0)
    tmu, tcov = rng.standard_normal(3), _spd(rng, 3)
    mu, cov = tmu + 0.3, _spd(rng, 3)
    x = rng.multivariate_normal(tmu, tcov, size=100_000)
    nll = -multivariate_normal(mu, cov).logpdf(x)
    exact = gaussian_cross_entropy(mu, cov, tmu, tcov)
    assert abs(nll.mean() - exact) < 4 * nll.std() / math.sqrt(len(x))
    # at the truth the cross-entropy is scipy's entropy, and the family's kl is 0
    assert gaussian_cross_entropy(tmu, tcov, tmu, tcov) == pytest.approx(multivariate_normal(tmu, tcov).entropy(), abs=1e-12)
    t10 = M.true_gaussian(10)
    m = M.exact_metrics(*t10, 1.0)
    assert abs(m["kl"]) < 1e-10 and m["w2"] < 1e-6
    assert M.exact_metrics(t10[0], -np.eye(10), 1.0)["nll"] == math.inf


def test_w2_matches_frechet_distance_and_the_1d_formula():
    rng = np.random.default_rng(1)
    for d in (2, 5):
        m1, m2, c1, c2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d)
        assert w2_squared(m1, c1, m2, c2) == pytest.approx(frechet_distance(m1, c1, m2, c2), rel=1e-9)
    assert w2_squared(np.array([1.0]), np.array([[4.0]]), np.array([0.0]), np.array([[1.0]])) == pytest.approx(1 + (2 - 1) ** 2)


def test_population_gradient_by_finite_differences():
    rng = np.random.default_rng(2)
    base = M.make_base(4, 50, 0)
    mu, cov = base.mu.detach().numpy(), base.covariance().detach().numpy()
    e = rng.standard_normal((4, 4))
    e = (e + e.T) / 2
    h = 1e-5
    fd = (M.exact_metrics(mu, cov + h * e, 1.0)["nll"] - M.exact_metrics(mu, cov - h * e, 1.0)["nll"]) / (2 * h)
    assert fd == pytest.approx(float(np.sum(M.population_grad_sigma(mu, cov) * e)), rel=1e-6)


def test_b1_expected_gradient_constant_by_monte_carlo():
    """E[grad_Sigma L_pop(mu_hat, Sigma_hat)] = -c Sigma_*^-1 with the exact c (App. B.1 argument)."""
    dim, n, reps = 10, 100, 1500
    tmu, tcov = M.true_gaussian(dim)
    inv = np.linalg.inv(tcov)
    rng = np.random.default_rng(3)
    proj = []
    for _ in range(reps):
        x = rng.multivariate_normal(tmu, tcov, size=n)
        mu = x.mean(0)
        g = M.population_grad_sigma(mu, (x - mu).T @ (x - mu) / n)
        proj.append(-np.sum(g * inv) / np.sum(inv * inv))  # least-squares c of this draw
    proj = np.array(proj)
    c, se = proj.mean(), proj.std() / math.sqrt(reps)
    assert abs(c - M.mle_gradient_constant(n, dim)) < 4 * se
    assert M.mle_gradient_constant(n, dim) > 0  # the population gradient asks for a wider Sigma


# ---------------------------------------------------------------------------------------------
# the family: sampling, the synthetic step, tune-w
# ---------------------------------------------------------------------------------------------


def test_sample_depends_on_its_seed_and_has_tau2_sigma(gauss):
    model = gauss.load(gauss.default_model)
    s = {"temperature": 0.8}
    together = gauss.sample(model, torch.tensor([3, 4, 5]), None, s)
    assert torch.equal(together[2:], gauss.sample(model, torch.tensor([5]), None, s))
    x = gauss.sample(model, torch.arange(40_000), None, s).double().numpy()
    cov = model.covariance().detach().numpy()
    assert np.allclose(np.cov(x, rowvar=False), 0.64 * cov, atol=0.04)
    assert np.allclose(x.mean(0), model.mu.detach().numpy(), atol=0.03)
    bad = M.GaussianModel(model.mu.detach(), -model.sigma.detach())
    with pytest.raises(FamilyError, match="positive definite"):
        gauss.sample(bad, torch.arange(2), None, s)


@pytest.mark.parametrize("tau", [0.8, 1.2])
def test_one_synthetic_sgd_step_is_eq_b1(gauss, tau):
    """Full-batch SGD on S ~ N(mu_hat, tau^2 Sigma_hat): Sigma moves by -eta/2 (1 - tau^2) Sigma_hat^-1, mu stays."""
    base = M.make_base(10, 100, 0)
    S = gauss.sample(base, torch.arange(20_000), None, {"temperature": tau})
    eta = 0.05
    ft = train_loop(gauss, copy.deepcopy(base), S, None, TrainConfig(budget=20_000, lr=eta, batch=20_000))
    sr = base.covariance().detach().numpy()
    ds = ft.covariance().detach().numpy() - sr
    pred = -eta / 2 * (1 - tau**2) * np.linalg.inv(sr)
    assert np.linalg.norm(ds - pred) < 0.15 * np.linalg.norm(pred)
    assert np.linalg.norm(ft.mu.detach().numpy() - base.mu.detach().numpy()) < 0.1 * np.linalg.norm(ds)


def _b1_pipeline(tmp_path, draw, tau, bounds=(-3.0, 3.0)):
    base = tmp_path / f"base{draw}.safetensors"
    M.save(M.make_base(10, 100, draw), str(base), {"train_images": "100"})
    S, ft = tmp_path / f"S{draw}-{tau}", tmp_path / f"ft{draw}-{tau}"
    synthesize("gaussian", base, num=10_000, out_dir=S, seed=10**6, set_pairs=[f"temperature={tau}"], report=Report("synth"))
    snap = finetune("gaussian", base, S, budget=10_000, lr=None, out_dir=ft, report=Report("finetune"))["final"]
    res = run_tune_w("gaussian", base, [snap], bounds=bounds, num_samples=2, abandon_margin=None, report=Report("tune-w"))
    w0 = M.score_model(M.load(str(base)), {"temperature": 1.0})["nll"]
    return base, snap, res["chosen"]["w"], res["chosen"]["value"], w0


@pytest.mark.parametrize("tau,sign", [(0.8, 1), (1.2, -1)])
def test_b1_tune_w_sign_follows_the_sampler(tmp_path, tau, sign):
    """App. B.1 (D = 10, n = 100): tau < 1 -> w* > 0, tau > 1 -> w* < 0, and the exact population
    NLL drops, for every draw of the real samples (measured: 20 of 20 draws each, docs/theory.md)."""
    drops = []
    for draw in range(3):
        _, _, w, nll_w, nll_0 = _b1_pipeline(tmp_path, draw, tau)
        assert sign * w > 0.3
        assert nll_w < nll_0
        drops.append(nll_0 - nll_w)
    assert np.mean(drops) > 0.02


def test_evaluator_uses_the_exact_score(gauss, tmp_path):
    from neon_cli.evaluate import Evaluator

    model = gauss.load(gauss.default_model)
    a = Evaluator(gauss, {"temperature": 0.5}, 2, seed=0).score_model(model)
    b = Evaluator(gauss, {"temperature": 0.5}, 100, seed=7).score_model(model)
    exact = M.exact_metrics(model.mu.detach().numpy(), model.covariance().detach().numpy(), 0.5)
    for k in gauss.metrics:
        assert a[k] == b[k] == pytest.approx(exact[k], rel=1e-12)


def test_make_base_cli_writes_the_mle(tmp_path, capsys):
    from neon_gaussian.make_base import main

    out = tmp_path / "b.safetensors"
    assert main(["--dim", "3", "--n", "20", "--seed", "5", "-o", str(out)]) == 0
    x = M.real_samples(3, 20, 5, stream=M.TRAIN_STREAM)
    model = M.load(str(out))
    assert np.allclose(model.mu.detach().numpy(), x.mean(0))
    assert np.allclose(model.covariance().detach().numpy(), np.cov(x, rowvar=False, bias=True))
    assert read_metadata(str(out))["train_images"] == "20"
    assert main(["--dim", "3", "--n", "20", "-o", str(out)]) == 2  # never overwrites
    assert main(["--dim", "3", "--n", "3", "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "n > D" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# App. B.11 DDPM
# ---------------------------------------------------------------------------------------------


def test_cosine_schedule_is_nichol_dhariwal_with_the_last_beta_clipped():
    s = D.cosine_schedule(20)
    t = np.arange(21)
    f = np.cos((t / 20 + D.COSINE_S) / (1 + D.COSINE_S) * np.pi / 2) ** 2
    abar = f / f[0]
    assert np.allclose(s["alpha_bar"][:-1].numpy(), abar[1:-1], rtol=1e-12)
    assert float(s["beta"][-1]) == D.MAX_BETA and float(s["beta"][:-1].max()) < D.MAX_BETA
    assert np.allclose(s["beta_tilde"].numpy(), ((1 - s["alpha_bar_prev"]) / (1 - s["alpha_bar"]) * s["beta"]).numpy())


class _OracleEps(torch.nn.Module):
    """The exact noise predictor of N(0, Sigma) data: eps*(x, t) = sqrt(1 - abar) (abar Sigma + (1 - abar) I)^-1 x."""

    def __init__(self, steps=20):
        super().__init__()
        self.steps = steps
        abar = D.cosine_schedule(steps)["alpha_bar"]
        cov = torch.from_numpy(D.TRUE_COV)
        self.mats = torch.stack([torch.sqrt(1 - a) * torch.linalg.inv(a * cov + (1 - a) * torch.eye(2)) for a in abar])

    def forward(self, x, t):
        return torch.einsum("nij,nj->ni", self.mats[t], x.double()).float()


def _oracle_sampler_cov(zeta, steps=20):
    """Covariance of the ancestral sampler's output with the exact eps*, by the linear recursion."""
    s = {k: v.numpy() for k, v in D.cosine_schedule(steps).items()}
    eye, c = np.eye(2), np.eye(2)
    for t in range(steps, 0, -1):
        i = t - 1
        ab = s["alpha_bar"][i]
        e = np.sqrt(1 - ab) * np.linalg.inv(ab * D.TRUE_COV + (1 - ab) * eye)
        m = (eye - s["beta"][i] / np.sqrt(1 - ab) * zeta * e) / np.sqrt(s["alpha"][i])
        c = m @ c @ m.T + (s["beta_tilde"][i] * eye if t > 1 else 0)
    return c


def test_ddpm_sampler_with_the_exact_score_matches_its_covariance_recursion(ddpm):
    traces = []
    for zeta in (0.9, 1.0, 1.1):
        x = ddpm.sample(_OracleEps(), torch.arange(30_000), None, {"zeta": zeta}).double().numpy()
        cov = np.cov(x, rowvar=False)
        assert np.allclose(cov, _oracle_sampler_cov(zeta), atol=0.06)
        traces.append(np.trace(cov))
    # zeta > 1 narrows the samples (mode-seeking), zeta < 1 widens them; and the 20-step ancestral
    # sampler is itself mode-seeking at zeta = 1 (trace 0.82 of the truth's), as App. B.11 says
    assert traces[0] > traces[1] > traces[2]
    assert traces[1] < 0.87 * np.trace(D.TRUE_COV)


def test_ddpm_shipped_base_is_close_to_the_exact_score_sampler(ddpm):
    model = ddpm.load(ddpm.default_model)
    meta = ddpm.read_metadata(ddpm.default_model)
    assert meta["train_images"] == str(14_000 * 1000) and meta["family"] == "gaussian-ddpm"
    seeds = torch.arange(10_000)
    m = ddpm.score(ddpm.sample(model, seeds, None, {"zeta": 1.0}), None)
    exact = math.sqrt(w2_squared(np.zeros(2), _oracle_sampler_cov(1.0), D.TRUE_MU, D.TRUE_COV))
    assert abs(m["w2"] - exact) < 0.05
    # sample i depends only on seed i (up to float rounding of the batched matmuls)
    torch.testing.assert_close(ddpm.sample(model, seeds[:5], None, {"zeta": 1.1})[3:],
                               ddpm.sample(model, seeds[3:5], None, {"zeta": 1.1}), rtol=0, atol=1e-5)


def test_ddpm_b11_sign_of_w_follows_zeta(ddpm):
    """App. B.11 Exp. 1, metric at zeta = 1 (the model's own risk): zeta = 1.1 -> w > 0 helps,
    zeta = 0.9 -> w < 0 helps. Measured on several synthetic sets in docs/theory.md; here one, 50 steps."""
    torch.manual_seed(0)
    base = ddpm.load(ddpm.default_model)
    seeds = torch.arange(5_000)

    def w2(sd):
        c = copy.deepcopy(base)
        c.load_state_dict(sd)
        return ddpm.score(ddpm.sample(c.eval(), seeds, None, {"zeta": 1.0}), None)["w2"]

    for zeta, sign in ((1.1, 1), (0.9, -1)):
        S = ddpm.sample(base, torch.arange(10**6, 10**6 + 10_000), None, {"zeta": zeta})
        ft = train_loop(ddpm, copy.deepcopy(base), S, None, TrainConfig(budget=50_000, lr=1e-4, batch=1000))
        vals = [w2(merge_state_dicts(base.state_dict(), ft.state_dict(), w)) for w in (-0.5 * sign, 0.0, 0.5 * sign)]
        assert vals[2] < vals[1] < vals[0]
