"""neon align: the alignment estimates against a loss with a known gradient and Hessian, its sign
against tune-w's w* on the paper's Gaussian B.1 model, and the command's error handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from neon_cli.align import HELP_VERDICT, INTERPOLATE_VERDICT, Samples, estimate_alignment
from neon_cli.errors import UsageError
from neon_cli.finetune import finetune
from neon_cli.report import Report
from neon_cli.requests import AlignOptions
from neon_cli.synth import load_synthetic, synthesize
from neon_cli.tune import run_tune_w
from neon_gaussian import mle as M


class _Quad(torch.nn.Module):
    def __init__(self, theta):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone())

    def forward(self, x):
        return 0.5 * ((x - self.theta) ** 2).sum(1)


class _QuadFamily:
    """loss = 1/2 mean ||theta - x||^2: gradient theta - mean(x), Hessian I."""

    train_defaults = {"batch": 4}

    def loss(self, model, images, labels, generator):
        return model(images).mean()


def test_estimates_equal_their_closed_forms():
    rng = np.random.default_rng(0)
    theta_r, theta_s = rng.standard_normal(5), rng.standard_normal(5)
    real = torch.from_numpy(rng.standard_normal((10, 5)))  # batches of 4, 4, 2
    syn = torch.from_numpy(rng.standard_normal((7, 5)) + 1.0)
    res = estimate_alignment(_QuadFamily(), _Quad(theta_r), Samples(real), selftrained=_Quad(theta_s),
                             synthetic=Samples(syn), options=AlignOptions(precond="adam", curvature_step=0.3))
    r_d = theta_r - real.numpy().mean(0)
    r_s = theta_r - syn.numpy().mean(0)
    delta = theta_r - theta_s
    assert res["dR_dw"] == pytest.approx(r_d @ delta, rel=1e-12)
    assert res["cos_delta"] == pytest.approx(r_d @ delta / np.linalg.norm(r_d) / np.linalg.norm(delta), rel=1e-12)
    assert res["d2R_dw2"] == pytest.approx(delta @ delta, rel=1e-9)  # Hessian = I
    assert res["w_quadratic"] == pytest.approx(-(r_d @ delta) / (delta @ delta), rel=1e-9)
    # Adam's preconditioner: 1 / (sqrt(v) + eps), v = batch-size-weighted mean of squared batch gradients
    gb = [theta_r - real.numpy()[a:b].mean(0) for a, b in ((0, 4), (4, 8), (8, 10))]
    v = (4 * gb[0] ** 2 + 4 * gb[1] ** 2 + 2 * gb[2] ** 2) / 10
    p = 1 / (np.sqrt(v) + 1e-8)
    assert res["s"] == pytest.approx(np.sum(r_d * p * r_s), rel=1e-9)
    assert res["cos"] == pytest.approx(np.sum(r_d * p * r_s) / np.sqrt(np.sum(r_d * p * r_d) * np.sum(r_s * p * r_s)), rel=1e-9)
    assert res["estimate"] == "s" and res["verdict"] == (HELP_VERDICT if res["s"] < 0 else INTERPOLATE_VERDICT)
    ident = estimate_alignment(_QuadFamily(), _Quad(theta_r), Samples(real), synthetic=Samples(syn))
    assert ident["s"] == pytest.approx(r_d @ r_s, rel=1e-12) and "dR_dw" not in ident


def test_standard_error_of_equal_batches_is_std_over_sqrt_b():
    theta = np.zeros(2)
    real = torch.tensor([[1.0, 0.0]] * 4 + [[3.0, 0.0]] * 4 + [[2.0, 0.0]] * 4, dtype=torch.float64)
    res = estimate_alignment(_QuadFamily(), _Quad(theta), Samples(real), selftrained=_Quad(np.array([-1.0, 0.0])),
                             options=AlignOptions(curvature_step=None))
    proj = np.array([-1.0, -3.0, -2.0])  # <theta - mean(x_b), theta_r - theta_s = (1, 0)>
    assert res["dR_dw"] == pytest.approx(-2.0)
    assert res["dR_dw_stderr"] == pytest.approx(proj.std(ddof=1) / np.sqrt(3))
    assert res["confident"] and res["verdict"] == HELP_VERDICT and res["d2R_dw2"] is None


def test_needs_a_direction_and_a_known_preconditioner():
    real = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(UsageError, match="--selftrained"):
        estimate_alignment(_QuadFamily(), _Quad(np.zeros(2)), Samples(real))
    with pytest.raises(UsageError, match="--precond"):
        estimate_alignment(_QuadFamily(), _Quad(np.zeros(2)), Samples(real), synthetic=Samples(real),
                           options=AlignOptions(precond="lbfgs"))


@pytest.mark.parametrize("tau", [0.8, 1.2])
def test_sign_agrees_with_tuned_w_on_gaussian_b1(tmp_path, tau):
    """App. B.1, D = 10, n = 100: for each draw the sign of s (and of dR/dw) is opposite to tune-w's
    w* (w* > 0 exactly when s < 0), and the quadratic-proxy w has w*'s sign."""
    from neon_cli.family import get_family

    fam = get_family("gaussian")
    for draw in range(3):
        base = tmp_path / f"base{draw}-{tau}.safetensors"
        M.save(M.make_base(10, 100, draw), str(base), {"train_images": "100"})
        S, ft = tmp_path / f"S{draw}-{tau}", tmp_path / f"ft{draw}-{tau}"
        synthesize("gaussian", base, num=10_000, out_dir=S, seed=10**6, set_pairs=[f"temperature={tau}"], report=Report("s"))
        snap = finetune("gaussian", base, S, budget=10_000, lr=None, out_dir=ft, report=Report("f"))["final"]
        w = run_tune_w("gaussian", base, [snap], bounds=(-3.0, 3.0), num_samples=2, abandon_margin=None,
                       report=Report("t"))["chosen"]["w"]
        model = fam.load(str(base))
        real, _ = fam.real_samples(model, 20_000, draw)
        syn, _, _ = load_synthetic(S)
        res = estimate_alignment(fam, model, Samples(real), selftrained=fam.load(snap), synthetic=Samples(syn))
        assert res["confident"]
        assert np.sign(res["s"]) == np.sign(res["dR_dw"]) == -np.sign(w)
        assert np.sign(res["w_quadratic"]) == np.sign(w)
        assert res["verdict"] == (HELP_VERDICT if tau < 1 else INTERPOLATE_VERDICT)


def _app():
    from neon_cli.commands import align

    app = typer.Typer()
    align.register(app)

    @app.command("version")
    def _v() -> None:  # a second command keeps typer from collapsing the app into 'align'
        pass

    return app


def test_cli_prints_the_verdict_and_exits_2_on_bad_input(tmp_path):
    base = tmp_path / "base.safetensors"
    M.save(M.make_base(4, 30, 0), str(base), {})
    synthesize("gaussian", base, num=2000, out_dir=tmp_path / "S", set_pairs=["temperature=0.7"], report=Report("s"))
    runner = CliRunner()
    r = runner.invoke(_app(), ["align", "gaussian", "--base", str(base), "--synthetic", str(tmp_path / "S"),
                               "--num-real", "5000", "--json", "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["verdict"] == HELP_VERDICT and out["s"] < 0 and out["num_synthetic"] == 2000
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["status"] == "ok" and {i["role"] for i in rep["inputs"]} == {"base", "synthetic_set"}
    r = runner.invoke(_app(), ["align", "gaussian", "--base", str(base)])
    assert r.exit_code == 2 and "--selftrained" in r.output
    r = runner.invoke(_app(), ["align", "gaussian", "--base", str(base), "--synthetic", str(tmp_path / "S"), "--precond", "x"])
    assert r.exit_code == 2 and "--precond" in r.output
    r = runner.invoke(_app(), ["align", "gaussian", "--base", str(base), "--selftrained", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output
