"""The App. B.11 toy of the Neon paper: a small DDPM on a 2-D Gaussian, sampled with a scaled score.

Source: Alemohammad, Wang, Baraniuk, "Neon", ICLR 2026, App. B.11: data N(0, [[2, 1], [1, 2]]);
a DDPM with an MLP backbone, T = 20 steps and a cosine noise schedule, trained on 1,000 real
samples with learning rate 1e-4 (the base: "10,000 epochs ... to ensure it has converged"); at
sampling the score s_theta = -eps_theta / sqrt(1 - abar_t) is replaced by zeta * s_theta
(zeta > 1 mode-seeking, zeta < 1 diversity-seeking, zeta = 1 neutral).

Followed for the parts the paper leaves open:

* cosine schedule: Nichol & Dhariwal 2021, Eq. 17 (offset s = 0.008), with beta clipped at
  :data:`MAX_BETA` = 0.75 instead of their 0.999. With only T = 20 steps the cosine's last beta is
  ~1 (alpha_bar_T = 0), so the first reverse step divides by sqrt(alpha_T) = 0.03: it multiplies
  any error in eps_theta by 32 and, with a score scale zeta = 1.1, maps x_T to -3.1 x_T (the
  samples explode). At 0.75 only that last beta is changed (the others are <= 0.7485),
  alpha_bar_T = 0.0015 (x_T is still pure noise to 4 %) and the first step divides by 0.5;
* training loss: Ho et al. 2020, Eq. 14 ("simple" epsilon-prediction MSE, t uniform in 1..T);
* sampler: Ho et al. 2020, Algorithm 2 (ancestral), with the posterior variance
  sigma_t^2 = beta_tilde_t (diffusers' ``fixed_small``) and no noise at the last step.
  Scaling the score by zeta is scaling the predicted noise by zeta.

Samples are float32 [N, 2] (not images). The metric is sample-based (this sampler has no closed
form): the Fréchet / 2-Wasserstein distance between the Gaussian with the samples' mean and
covariance and the true Gaussian.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from neon_cli.errors import CheckpointError, FamilyError, UsageError, exception_line
from neon_gaussian.common import load_tensors, sample_moments, save_tensors, seeded_normals, w2_squared

FAMILY = "gaussian-ddpm"
TRUE_MU = np.zeros(2)
TRUE_COV = np.array([[2.0, 1.0], [1.0, 2.0]])
#: numpy SeedSequence stream ids: the 1,000 training samples and held-out real samples.
TRAIN_STREAM, HELDOUT_STREAM = 11, 12
COSINE_S = 0.008
#: Largest beta of the schedule (see the module docstring for why not 0.999).
MAX_BETA = 0.75


def real_samples(n: int, seed: int, stream: int = HELDOUT_STREAM) -> np.ndarray:
    """n samples float64 [n, 2] of N(0, [[2, 1], [1, 2]]) from ``numpy.random.default_rng([stream, seed])``.

    TRAIN_STREAM seed 0 is the base's training set; the default HELDOUT_STREAM gives fresh samples.
    """
    if n < 1:
        raise UsageError(f"need at least 1 real sample, got {n}")
    rng = np.random.default_rng([stream, seed])
    return rng.multivariate_normal(TRUE_MU, TRUE_COV, size=n, method="cholesky")


def cosine_schedule(steps: int) -> dict[str, torch.Tensor]:
    """Nichol & Dhariwal 2021 cosine schedule, float64 tensors indexed by t - 1 for t = 1..T.

    ``alpha_bar[t-1] = f(t) / f(0)`` with ``f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)``;
    ``beta = min(1 - alpha_bar_t / alpha_bar_{t-1}, MAX_BETA)``; ``alpha_bar`` is then recomputed as
    the cumulative product of ``1 - beta`` so the two stay consistent. Also ``alpha = 1 - beta``,
    ``alpha_bar_prev`` and the posterior variance ``beta_tilde = (1 - abar_prev) / (1 - abar) beta``.
    """
    t = torch.arange(steps + 1, dtype=torch.float64)
    f = torch.cos(((t / steps) + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    abar = f / f[0]
    beta = (1 - abar[1:] / abar[:-1]).clamp(max=MAX_BETA)
    alpha = 1 - beta
    abar = torch.cumprod(alpha, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return {"beta": beta, "alpha": alpha, "alpha_bar": abar, "alpha_bar_prev": abar_prev,
            "beta_tilde": (1 - abar_prev) / (1 - abar) * beta}


class EpsNet(nn.Module):
    """Noise predictor eps_theta(x_t, t): an MLP with a learned per-step embedding added to every layer.

    forward(x float32 [N, 2], t int64 [N] in 0..T-1 (diffusion step t + 1)) -> float32 [N, 2].
    """

    def __init__(self, width: int = 128, depth: int = 3, steps: int = 20):
        super().__init__()
        self.width, self.depth, self.steps = width, depth, steps
        self.inp = nn.Linear(2, width)
        self.temb = nn.Embedding(steps, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.temb(t)
        h = torch.nn.functional.silu(self.inp(x) + emb)
        for layer in self.hidden:
            h = torch.nn.functional.silu(layer(h) + emb)
        return self.out(h)


def ddpm_loss(model: Any, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Ho et al. 2020 Eq. 14: mean over the batch of ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2 / 2.

    ``images``: samples float [N, 2]; t uniform in 1..T and eps ~ N(0, I) from ``generator``.
    Returns a float32 scalar (the per-coordinate mean squared error).
    """
    if images.ndim != 2 or images.shape[1] != 2:
        raise FamilyError(f"gaussian-ddpm: expected samples [N, 2], got {tuple(images.shape)}")
    steps = getattr(model, "module", model).steps  # model may be wrapped in DistributedDataParallel
    x0 = images.to(torch.float32)
    n = x0.shape[0]
    sched = cosine_schedule(steps)
    t = torch.randint(0, steps, (n,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    abar = sched["alpha_bar"].to(torch.float32)[t][:, None]
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    return ((model(xt, t) - eps) ** 2).mean()


@torch.no_grad()
def ddpm_sample(model: EpsNet, seeds: torch.Tensor, settings: Mapping[str, Any]) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) with the score scaled by ``zeta``.

    x_T ~ N(0, I); for t = T..1: eps = zeta * eps_theta(x_t, t),
    x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sqrt(beta_tilde_t) z_t
    (z_1 = 0). The 2T normals of sample i come from seed i alone. Returns float32 [N, 2].
    """
    zeta = float(settings["zeta"])
    steps = model.steps
    sched = cosine_schedule(steps)
    noise = seeded_normals(seeds, 2 * steps)  # [N, 2T]: x_T, then z_T .. z_2
    x = noise[:, :2].clone()
    for k, t in enumerate(range(steps, 0, -1)):
        i = t - 1
        tt = torch.full((x.shape[0],), i, dtype=torch.int64)
        eps = zeta * model(x.to(torch.float32), tt).to(torch.float64)
        beta, alpha, abar = sched["beta"][i], sched["alpha"][i], sched["alpha_bar"][i]
        x = (x - beta / torch.sqrt(1 - abar) * eps) / torch.sqrt(alpha)
        if t > 1:
            x = x + torch.sqrt(sched["beta_tilde"][i]) * noise[:, 2 + 2 * k: 4 + 2 * k]
    return x.to(torch.float32)


def load(path: str) -> EpsNet:
    """EpsNet (eval mode, float32) from a ``gaussian-ddpm`` checkpoint; CheckpointError on mismatch."""
    state, meta = load_tensors(path, FAMILY)
    try:
        model = EpsNet(int(meta.get("width", 128)), int(meta.get("depth", 3)), int(meta.get("steps", 20)))
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    except (RuntimeError, ValueError) as exc:
        first = exception_line(exc)
        raise CheckpointError(f"{path}: not a gaussian-ddpm state dict ({first})") from None
    return model.eval()


def save(model: EpsNet, path: str, metadata: Mapping[str, str]) -> None:
    save_tensors(model, path, metadata, {"family": FAMILY, "width": str(model.width), "depth": str(model.depth),
                                         "steps": str(model.steps), "schedule": "cosine"})


def score_samples(images: torch.Tensor) -> dict[str, float]:
    """Metrics of samples float [N, 2] against N(0, [[2, 1], [1, 2]]), from their mean and covariance.

    ``w2``: 2-Wasserstein distance between N(sample mean, sample covariance) and the truth;
    ``frechet``: its square (the Fréchet distance, as the paper's "FID" of this toy);
    ``trace_ratio``: tr(sample covariance) / tr(true covariance) (< 1: too narrow).
    """
    if images.ndim != 2 or images.shape[1] != 2 or images.shape[0] < 2:
        raise FamilyError(f"gaussian-ddpm: expected samples [N >= 2, 2], got {tuple(images.shape)}")
    mu, cov = sample_moments(images)
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(cov))):
        return {"w2": math.inf, "frechet": math.inf, "trace_ratio": math.inf}
    fd = w2_squared(mu, cov, TRUE_MU, TRUE_COV)
    return {"w2": math.sqrt(fd), "frechet": fd, "trace_ratio": float(np.trace(cov) / np.trace(TRUE_COV))}
