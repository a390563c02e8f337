"""The paper's Gaussian toys as two built-in families, where the truth is known and the metrics
need no feature network (Neon paper, Alemohammad, Wang, Baraniuk, ICLR 2026, App. B.1 and B.11):

``gaussian`` (App. B.1 warm-up)
    theta_r = the maximum-likelihood Gaussian (mu_hat, Sigma_hat) of n real samples of a fixed
    D-dimensional truth; ``neon synth`` samples N(mu_hat, tau^2 Sigma_hat) (setting
    ``temperature`` tau, < 1 mode-seeking); ``neon finetune`` takes SGD steps on the synthetic
    negative log-likelihood with respect to (mu, Sigma); metrics are exact, with no sampling:
    ``nll`` the population negative log-likelihood L_pop of the model density, ``kl`` =
    KL(truth || model), ``w2`` the 2-Wasserstein distance of the sampling law N(mu, tau^2 Sigma)
    to the truth. Make a base with ``python -m neon_gaussian.make_base --dim 10 --n 100 --seed S -o
    base.safetensors``; the embedded default is D = 10, n = 100, seed 0.

``gaussian-ddpm`` (App. B.11 toy)
    a DDPM (MLP, T = 20, cosine schedule) trained on 1,000 real samples of N(0, [[2, 1], [1, 2]])
    (``python -m neon_gaussian.train_ddpm``; the embedded default is its output), sampled with the
    score scaled by ``zeta`` (> 1 mode-seeking); metrics from the samples' mean and covariance:
    ``w2`` and ``frechet`` (= w2^2) to the true Gaussian, plus the diagnostic ``trace_ratio``.

Samples are float32 [N, D] tensors, not images: ``neon synth`` stores them as the shards'
``images`` tensor and ``neon finetune`` feeds them back to ``loss`` unchanged.

Protocol extensions used here (optional methods the core uses when present):

* ``score_model(model, settings) -> dict`` (``gaussian`` only): exact metrics from the model's
  parameters; :class:`neon_cli.evaluate.Evaluator` prefers it to sampling + ``score``, so
  ``neon eval`` and ``neon tune-w`` get metrics without sampling noise.
* ``real_samples(model, n, seed) -> (samples, None)``: fresh real data for ``neon align``
  (never the base's training samples).

This module does not import torch; the methods import the torch modules when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from neon_cli.family import Metric, Setting

WEIGHTS = Path(__file__).resolve().parent / "weights"


class GaussianFamily:
    name = "gaussian"
    description = "App. B.1: ML Gaussian N(mu, Sigma) sampled at temperature tau; exact population NLL and W2 (CPU, instant)"
    settings = (
        Setting("temperature", 1.0, float, "sampling temperature tau: samples ~ N(mu, tau^2 Sigma) (< 1 mode-seeking, > 1 diversity-seeking)",
                low=0.01, high=10.0),
    )
    guidance = None
    num_classes = 0
    metrics = ("nll", "kl", "w2")
    scoring_files = ()  # scored against its own reference: --detector / --ref-stats are refused
    metric_info = {
        "nll": Metric("population negative log-likelihood (nats) of the model density N(mu, Sigma) under the true "
                      "Gaussian (App. B.1 L_pop); exact from the parameters, or of the Gaussian fitted to samples"),
        "kl": Metric("KL(truth || N(mu, Sigma)) in nats = nll - H(truth), 0 at the truth; exact, or from fitted samples"),
        "w2": Metric("2-Wasserstein distance of the sampling law N(mu, tau^2 Sigma) to the true Gaussian; exact, "
                     "or of the Gaussian fitted to samples"),
    }
    train_defaults = {"batch": 1000, "lr": 0.05, "ema_halflife_images": None, "warmup_images": 0}

    @property
    def default_model(self) -> str:
        return str(WEIGHTS / "gaussian-d10-n100-seed0.safetensors")

    def load(self, path: str):
        """GaussianModel (params ``mu`` float64 [D], ``sigma`` float64 [D, D]); CheckpointError on a bad file."""
        from neon_gaussian.mle import load

        return load(path)

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        from neon_gaussian.mle import save

        save(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        from neon_gaussian.common import read_metadata

        return read_metadata(path)

    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]):
        """float32 [N, D]: mu + tau L z with z from seed i alone; FamilyError if Sigma is not PD."""
        from neon_gaussian.mle import sample

        return sample(model, seeds, settings)

    def loss(self, model: Any, images: Any, labels: Any, generator: Any):
        """Mean negative log-likelihood (nats, float64 scalar) of samples float [N, D]."""
        from neon_gaussian.mle import loss

        return loss(model, images, generator)

    def make_optimizer(self, params: Any, lr: float):
        """Plain SGD: the paper's gradient step Sigma <- Sigma - eta grad L_syn (App. B.1)."""
        import torch

        return torch.optim.SGD(params, lr=lr)

    def score(self, images: Any, labels: Any) -> dict[str, float]:
        """nll/kl/w2 of the Gaussian fitted to samples float [N, D] (estimates of the sampling law)."""
        from neon_gaussian.mle import score_samples

        return score_samples(images)

    def score_model(self, model: Any, settings: Mapping[str, Any]) -> dict[str, float]:
        """Exact nll/kl (of N(mu, Sigma)) and w2 (of N(mu, tau^2 Sigma)) against the truth, no sampling."""
        from neon_gaussian.mle import score_model

        return score_model(model, settings)

    def real_samples(self, model: Any, n: int, seed: int):
        """(float32 [n, D] fresh samples of the truth of the model's dimension D, None)."""
        import torch

        from neon_gaussian.mle import real_samples

        return torch.from_numpy(real_samples(model.dim, n, seed)).to(torch.float32), None


class GaussianDDPMFamily:
    name = "gaussian-ddpm"
    description = "App. B.11: 2-D DDPM (MLP, T = 20, cosine) with the score scaled by zeta; W2 to N(0, [[2,1],[1,2]]) (CPU)"
    settings = (
        Setting("zeta", 1.0, float, "score scale zeta (> 1 mode-seeking, < 1 diversity-seeking)", low=0.1, high=5.0),
    )
    guidance = None
    num_classes = 0
    metrics = ("w2", "frechet")
    scoring_files = ()  # scored against its own reference: --detector / --ref-stats are refused
    metric_info = {
        "w2": Metric("2-Wasserstein distance between N(sample mean, sample covariance) and the truth N(0, [[2, 1], [1, 2]])"),
        "frechet": Metric("w2 squared: the Fréchet distance of the same Gaussians (the paper's 'FID' of this toy; "
                          "no Inception features)"),
        "trace_ratio": Metric("tr(sample covariance) / tr(true covariance): < 1 too narrow, > 1 too wide (diagnostic)",
                              higher_is_better=None),
    }
    train_defaults = {"batch": 1000, "lr": 1e-4, "ema_halflife_images": None, "warmup_images": 0}

    @property
    def default_model(self) -> str:
        return str(WEIGHTS / "ddpm-base.safetensors")

    def load(self, path: str):
        from neon_gaussian.ddpm import load

        return load(path)

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        from neon_gaussian.ddpm import save

        save(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        from neon_gaussian.common import read_metadata

        return read_metadata(path)

    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]):
        """float32 [N, 2]: ancestral DDPM with eps scaled by zeta; sample i depends on seed i only."""
        from neon_gaussian.ddpm import ddpm_sample

        return ddpm_sample(model, seeds, settings)

    def loss(self, model: Any, images: Any, labels: Any, generator: Any):
        from neon_gaussian.ddpm import ddpm_loss

        return ddpm_loss(model, images, generator)

    def make_optimizer(self, params: Any, lr: float):
        """Adam (betas 0.9, 0.999)."""
        import torch

        return torch.optim.Adam(params, lr=lr)

    def score(self, images: Any, labels: Any) -> dict[str, float]:
        from neon_gaussian.ddpm import score_samples

        return score_samples(images)

    def real_samples(self, model: Any, n: int, seed: int):
        """(float32 [n, 2] fresh samples of N(0, [[2, 1], [1, 2]]), None)."""
        import torch

        from neon_gaussian.ddpm import real_samples

        return torch.from_numpy(real_samples(n, seed)).to(torch.float32), None


family = GaussianFamily()
ddpm_family = GaussianDDPMFamily()
