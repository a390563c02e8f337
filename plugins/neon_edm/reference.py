"""The formulas of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models", NeurIPS 2022) that an EDM checkout implements, written out from the paper so that tests
(against neon's stand-in checkout) and ``benchmarks/verify_edm.py`` (against a real NVlabs/edm
clone) can check the code numerically rather than trust it.

* :func:`preconditioning`: Table 1's ``c_skip``, ``c_out``, ``c_in``, ``c_noise`` of the denoiser
  ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` (Eq. 7) for VP, VE and EDM;
* :func:`loss_weight`: Eq. 2 / Table 1's ``lambda(sigma)``;
* :func:`vp_sigma`, :func:`vp_sigma_inv`: VP's ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``
  and its inverse;
* the sampler's time steps are :func:`neon_edm.sampler.karras_sigmas` (Eq. 5).

All functions take and return float64 numpy arrays (or floats).
"""

from __future__ import annotations

import numpy as np


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1):
    """VP noise level of time t (Table 1)."""
    t = np.asarray(t, dtype=np.float64)
    return np.sqrt(np.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1):
    """The time t with ``vp_sigma(t) = sigma`` (positive root of the quadratic in t)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return (np.sqrt(beta_min ** 2 + 2 * beta_d * np.log(1 + sigma ** 2)) - beta_min) / beta_d


def preconditioning(kind: str, sigma, *, sigma_data: float = 0.5, M: int = 1000, beta_d: float = 19.9,
                    beta_min: float = 0.1) -> tuple:
    """``(c_skip, c_out, c_in, c_noise)`` at ``sigma`` for ``kind`` in {"vp", "ve", "edm"} (Table 1).

    VP:  1, -sigma, 1 / sqrt(sigma^2 + 1), (M - 1) t(sigma)
    VE:  1, sigma, 1, ln(sigma / 2)
    EDM: sigma_d^2 / (sigma^2 + sigma_d^2), sigma sigma_d / sqrt(sigma^2 + sigma_d^2),
         1 / sqrt(sigma^2 + sigma_d^2), ln(sigma) / 4
    """
    s = np.asarray(sigma, dtype=np.float64)
    one = np.ones_like(s)
    if kind == "vp":
        return one, -s, 1 / np.sqrt(s ** 2 + 1), (M - 1) * vp_sigma_inv(s, beta_d, beta_min)
    if kind == "ve":
        return one, s, one, np.log(0.5 * s)
    if kind == "edm":
        sd = sigma_data
        return sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2), 1 / np.sqrt(sd ** 2 + s ** 2), np.log(s) / 4
    raise ValueError(f"unknown preconditioning {kind!r}")


def loss_weight(kind: str, sigma, *, sigma_data: float = 0.5):
    """Eq. 2's ``lambda(sigma)``: 1 / sigma^2 for VP and VE, (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 for EDM."""
    s = np.asarray(sigma, dtype=np.float64)
    if kind in ("vp", "ve"):
        return 1 / s ** 2
    if kind == "edm":
        return (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2
    raise ValueError(f"unknown preconditioning {kind!r}")


#: Preconditioning class of EDM's training.networks -> the kind used above.
KIND = {"VPPrecond": "vp", "VEPrecond": "ve", "EDMPrecond": "edm"}
