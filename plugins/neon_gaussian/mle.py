"""The App. B.1 warm-up of the Neon paper: a D-dimensional Gaussian fitted by maximum likelihood.

Source: Alemohammad, Wang, Baraniuk, "Neon", ICLR 2026, App. B.1 ("Warmup: Gaussian estimation
with finite data"):

* truth p_* = N(mu_*, Sigma_*) in R^D (here a fixed function of D, :func:`true_gaussian`);
* base theta_r = the MLE (mu_hat, Sigma_hat) of n real samples (``Sigma_hat`` divides by n);
* synthetic sampler N(mu_hat, tau^2 Sigma_hat) (``temperature`` tau; tau < 1 mode-seeking);
* "fine-tuning" = gradient steps on the synthetic negative log-likelihood with respect to
  (mu, Sigma) themselves (plain SGD, the paper's step ``Sigma_s = Sigma_hat - eta grad``);
* metric: the population NLL ``L_pop`` of the model density N(mu, Sigma), in closed form, and
  the exact 2-Wasserstein distance of the sampling distribution N(mu, tau^2 Sigma) to p_*.

The model's parameters are the mean ``mu`` float64 [D] and the covariance ``sigma`` float64 [D, D]
(not a Cholesky factor): B.1 differentiates and merges Sigma itself, so theta_Neon = (1 + w)
theta_r - w theta_s is exactly the paper's Sigma_Neon = (1 + w) Sigma_hat - w Sigma_s. A merge with
a large |w| can leave Sigma not positive definite; the metrics are then ``inf`` and sampling raises
FamilyError.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from neon_cli.errors import CheckpointError, FamilyError, UsageError
from neon_gaussian.common import (
    LOG_2PI,
    gaussian_cross_entropy,
    gaussian_entropy,
    is_positive_definite,
    load_tensors,
    sample_moments,
    save_tensors,
    seeded_normals,
    w2_squared,
)

FAMILY = "gaussian"
#: Seed of the generator that draws the truth (mu_*, Sigma_*) for each D.
TRUTH_SEED = 20_251_003
#: numpy SeedSequence stream ids: the base's n training samples and the held-out real samples.
TRAIN_STREAM, HELDOUT_STREAM = 1, 2


def true_gaussian(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The truth (mu_* [D], Sigma_* [D, D]) float64 for dimension ``dim``, a fixed function of D.

    mu_* ~ N(0, I) and Sigma_* = Q diag(lambda) Q^T with Q a random orthogonal matrix (QR of a
    Gaussian matrix) and lambda log-spaced in [0.5, 2] (condition number 4), both drawn from
    ``numpy.random.default_rng([TRUTH_SEED, dim])``. The paper does not state its (mu_*, Sigma_*).
    """
    if dim < 1:
        raise UsageError(f"--dim: must be >= 1, got {dim}")
    rng = np.random.default_rng([TRUTH_SEED, dim])
    mu = rng.standard_normal(dim)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))
    lam = np.geomspace(0.5, 2.0, dim) if dim > 1 else np.ones(1)
    return mu, (q * lam) @ q.T


def real_samples(dim: int, n: int, seed: int, stream: int = HELDOUT_STREAM) -> np.ndarray:
    """n samples float64 [n, dim] of the truth from ``numpy.random.default_rng([stream, seed])``.

    ``stream`` TRAIN_STREAM draws the base's training data (``make_base``), HELDOUT_STREAM (default)
    fresh real data for ``neon align``: the two never coincide.
    """
    if n < 1:
        raise UsageError(f"--n: need at least 1 sample, got {n}")
    mu, cov = true_gaussian(dim)
    rng = np.random.default_rng([stream, seed])
    return rng.multivariate_normal(mu, cov, size=n, method="cholesky")


class GaussianModel(nn.Module):
    """N(mu, sigma) with parameters ``mu`` float64 [D] and ``sigma`` float64 [D, D] (a covariance)."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor):
        super().__init__()
        self.mu = nn.Parameter(torch.as_tensor(mu, dtype=torch.float64).clone())
        self.sigma = nn.Parameter(torch.as_tensor(sigma, dtype=torch.float64).clone())

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def covariance(self) -> torch.Tensor:
        """The symmetric part of ``sigma`` (a gradient step keeps it symmetric up to rounding)."""
        return (self.sigma + self.sigma.T) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample negative log-likelihood float64 [N] of x [N, D] (any float dtype), in nats."""
        x = x.to(torch.float64)
        cov = self.covariance()
        chol = torch.linalg.cholesky(cov)
        diff = (x - self.mu).T  # [D, N]
        z = torch.linalg.solve_triangular(chol, diff, upper=False)
        logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
        return 0.5 * (logdet + (z * z).sum(0) + self.dim * LOG_2PI)


def fit_mle(x: np.ndarray) -> GaussianModel:
    """Maximum-likelihood Gaussian of samples x [n, D] (n >= 2): sample mean and ``1/n`` scatter."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise UsageError(f"need at least 2 samples [n, D] for a maximum-likelihood fit, got shape {x.shape}")
    mu = x.mean(0)
    xc = x - mu
    return GaussianModel(torch.from_numpy(mu), torch.from_numpy(xc.T @ xc / x.shape[0]))


def make_base(dim: int, n: int, seed: int) -> GaussianModel:
    """theta_r of App. B.1: the MLE of ``n`` real samples (stream TRAIN_STREAM, ``seed``) of the truth."""
    if n <= dim:
        raise UsageError(f"--n {n}: the MLE covariance of n <= D = {dim} samples is singular; use n > D")
    return fit_mle(real_samples(dim, n, seed, stream=TRAIN_STREAM))


def load(path: str) -> GaussianModel:
    """GaussianModel (eval mode) from a ``gaussian`` checkpoint; CheckpointError on a bad file."""
    state, _ = load_tensors(path, FAMILY)
    if set(state) != {"mu", "sigma"}:
        raise CheckpointError(f"{path}: a gaussian checkpoint holds exactly 'mu' and 'sigma', got {sorted(state)}")
    mu, sigma = state["mu"], state["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise CheckpointError(f"{path}: shapes mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not match [D] and [D, D]")
    return GaussianModel(mu, sigma).eval()


def save(model: GaussianModel, path: str, metadata: Mapping[str, str]) -> None:
    save_tensors(model, path, metadata, {"family": FAMILY, "dim": str(model.dim)})


def _moments(model: GaussianModel) -> tuple[np.ndarray, np.ndarray]:
    return model.mu.detach().numpy().astype(np.float64), model.covariance().detach().numpy().astype(np.float64)


def sample(model: GaussianModel, seeds: torch.Tensor, settings: Mapping[str, Any]) -> torch.Tensor:
    """x_i = mu + tau L z_i with L L^T = Sigma and z_i = N(0, I_D) drawn from seed i alone.

    Returns float32 [N, D]. Raises FamilyError if Sigma is not positive definite.
    """
    tau = float(settings["temperature"])
    cov = model.covariance().detach()
    try:
        chol = torch.linalg.cholesky(cov)
    except RuntimeError:
        raise FamilyError("gaussian: the model's covariance is not positive definite (a merge with too large |w|?)") from None
    z = seeded_normals(seeds, model.dim)
    return (model.mu.detach() + tau * z @ chol.T).to(torch.float32)


def loss(model: Any, images: torch.Tensor, generator: Any = None) -> torch.Tensor:
    """Mean negative log-likelihood (float64 scalar) of samples float [N, D]; App. B.1 ``L_syn`` on S.

    ``model``: a GaussianModel or a wrapper of one (DistributedDataParallel: ``.module``); the
    loss goes through its forward."""
    dim = getattr(model, "module", model).dim
    if images.ndim != 2 or images.shape[1] != dim:
        raise FamilyError(f"gaussian: expected samples [N, {dim}], got {tuple(images.shape)}")
    try:
        return model(images).mean()
    except RuntimeError:  # cholesky of a non-PD covariance (training diverged)
        raise FamilyError("gaussian: covariance lost positive definiteness during training; lower --lr") from None


def exact_metrics(mu: np.ndarray, cov: np.ndarray, tau: float) -> dict[str, float]:
    """Exact metrics of the model N(mu, cov) sampled at temperature tau, against the truth.

    ``nll``: population NLL L_pop(mu, cov) of the model density (App. B.1), nats;
    ``kl``: KL(p_* || N(mu, cov)) = nll - H(p_*), nats (0 at the truth);
    ``w2``: 2-Wasserstein distance between the sampling law N(mu, tau^2 cov) and p_*.
    Non-positive-definite ``cov``: all ``inf``.
    """
    dim = len(mu)
    tmu, tcov = true_gaussian(dim)
    if not is_positive_definite(cov):
        return {"nll": math.inf, "kl": math.inf, "w2": math.inf}
    nll = gaussian_cross_entropy(mu, cov, tmu, tcov)
    return {"nll": nll, "kl": nll - gaussian_entropy(tcov), "w2": math.sqrt(w2_squared(mu, tau * tau * cov, tmu, tcov))}


def score_model(model: GaussianModel, settings: Mapping[str, Any]) -> dict[str, float]:
    """:func:`exact_metrics` of ``model`` at the settings' temperature (no sampling)."""
    mu, cov = _moments(model)
    return exact_metrics(mu, cov, float(settings["temperature"]))


def score_samples(images: torch.Tensor) -> dict[str, float]:
    """The same metrics for the Gaussian fitted to samples float [N, D] (sample mean, unbiased
    covariance), at temperature 1: estimates of the *sampling distribution's* nll/kl/w2."""
    mu, cov = sample_moments(images)
    return exact_metrics(mu, cov, 1.0)


def population_grad_sigma(mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Gradient of L_pop with respect to Sigma at (mu, cov), float64 [D, D] (paper App. B.1):
    ``1/2 (Sigma^-1 - Sigma^-1 C Sigma^-1)`` with ``C = Sigma_* + (mu - mu_*)(mu - mu_*)^T``."""
    tmu, tcov = true_gaussian(len(mu))
    d = np.asarray(mu, np.float64) - tmu
    inv = np.linalg.inv((np.asarray(cov, np.float64) + np.asarray(cov, np.float64).T) / 2)
    return 0.5 * (inv - inv @ (tcov + np.outer(d, d)) @ inv)


def mle_gradient_constant(n: int, dim: int) -> float:
    """c > 0 with E[grad_Sigma L_pop(mu_hat, Sigma_hat)] = -c Sigma_*^-1 over draws of n samples.

    Derivation (App. B.1's argument with exact moments): mu_hat and Sigma_hat are independent,
    E[(mu_hat - mu_*)(mu_hat - mu_*)^T] = Sigma_* / n and n Sigma_hat = S ~ Wishart_D(Sigma_*, m = n - 1),
    whose inverse moments are E[S^-1] = Sigma_*^-1 / (m - D - 1) and E[S^-1 Sigma_* S^-1] =
    (m - 1) Sigma_*^-1 / ((m - D)(m - D - 1)(m - D - 3)) (second moments of the inverted Wishart,
    von Rosen 1988; needs n > D + 4; checked by Monte Carlo in tests/test_gaussian.py). Hence
    ``c = n / (2 (n - D - 2)) ((n + 1)(n - 2) / ((n - D - 1)(n - D - 4)) - 1)``
    ``  = n ((2D + 4) n - (D + 1)(D + 4) - 2) / (2 (n - D - 1)(n - D - 2)(n - D - 4))``.
    (The paper's printed ``c_MLE = n (D + 5) / (2 (n - D - 2)(n - D - 4))`` takes
    E[Sigma_hat^-1 Sigma_* Sigma_hat^-1] = n^2 Sigma_*^-1 / ((n - D - 2)(n - D - 4)), without the
    factor (n - 2) / (n - D - 1); for D = 10, n = 100 it gives 0.0991 against 0.1666 here, which a
    Monte Carlo average reproduces.) Raises UsageError unless n > D + 4.
    """
    if n <= dim + 4:
        raise UsageError(f"the second inverse moment of the Wishart needs n > D + 4, got n = {n}, D = {dim}")
    return n * ((2 * dim + 4) * n - (dim + 1) * (dim + 4) - 2) / (2 * (n - dim - 1) * (n - dim - 2) * (n - dim - 4))


def paper_c_mle(n: int, dim: int) -> float:
    """The constant as printed in the paper's App. B.1: ``n (D + 5) / (2 (n - D - 2)(n - D - 4))``."""
    return n * (dim + 5) / (2 * (n - dim - 2) * (n - dim - 4))
