"""EDM's sampler: the 2nd-order Heun solver of Karras et al. 2022, Algorithm 1, with the stochastic
"churn" of Algorithm 2, as EDM's ``generate.py`` runs it.

Time steps (Algorithm 1 line 1 / Eq. 5, ``i = 0 .. N-1``, then ``t_N = 0``)::

    t_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

with ``sigma_min`` / ``sigma_max`` clamped to the network's own ``sigma_min`` / ``sigma_max`` and
rounded by its ``round_sigma``. For each step (Algorithm 2): ``gamma_i = min(S_churn / N, sqrt(2) - 1)``
when ``S_min <= t_i <= S_max`` else 0; ``t_hat = t_i (1 + gamma_i)``;
``x_hat = x_i + sqrt(t_hat^2 - t_i^2) S_noise eps``; an Euler step
``d = (x_hat - D(x_hat; t_hat)) / t_hat``, ``x_{i+1} = x_hat + (t_{i+1} - t_hat) d``; and, except at the
last step (``t_N = 0``), the trapezoidal correction with ``d' = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1}``:
``x_{i+1} = x_hat + (t_{i+1} - t_hat) (d + d') / 2``. So ``2N - 1`` network evaluations (NFE).
The state is float64; the network is called as EDM calls it, ``net(x, t, class_labels)`` with a
float64 ``x`` and 0-d ``t``, its output cast to float64.

Random numbers, as EDM's ``StackedRandomGenerator``: every image has its own
``torch.Generator(device).manual_seed(seed % 2**32)`` on the sampling device, which draws, in this
order, the latent ``randn([C, H, W])`` (float32), for class-conditional networks one
``randint(label_dim)`` (EDM's random label; neon draws it too so that the generator's state, and
with it the churn noise, stays EDM's), then one ``randn`` of the image per step for the churn noise.
The image is ``(x * 127.5 + 128).clip(0, 255)`` truncated to uint8, as ``generate.py`` writes it.

Image i therefore depends only on its seed, its class label and the settings: with the same label,
neon's image is ``generate.py --seeds SEED --class LABEL``'s (and, for unconditional networks,
``generate.py --seeds SEED``'s). The labels themselves come from neon's seed plan (balanced,
``seed % num_classes``), not from EDM's per-seed random draw, unless ``--labels edm``:
:func:`edm_labels` gives the labels ``generate.py`` draws without ``--class``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

#: EDM's sampler defaults (generate.py / edm_sampler), before clamping to the network's limits.
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The noise levels t_0 > ... > t_{N-1} of Algorithm 1 (Eq. 5), float64 [num_steps] (without t_N = 0)."""
    if num_steps < 2:
        raise ValueError("num_steps must be >= 2 (the schedule divides by N - 1)")
    i = torch.arange(num_steps, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + i / (num_steps - 1) * (b - a)) ** rho


def time_steps(net: Any, num_steps: int, sigma_min: float | None, sigma_max: float | None, rho: float,
               device: Any = "cpu") -> torch.Tensor:
    """float64 [num_steps + 1]: ``round_sigma(t_i)`` of the clamped schedule, then ``t_N = 0``."""
    lo = max(SIGMA_MIN if sigma_min is None else float(sigma_min), float(net.sigma_min))
    hi = min(SIGMA_MAX if sigma_max is None else float(sigma_max), float(net.sigma_max))
    t = karras_sigmas(num_steps, lo, hi, rho).to(device)
    return torch.cat([torch.as_tensor(net.round_sigma(t)).to(device, torch.float64), torch.zeros(1, dtype=torch.float64, device=device)])


def generators(seeds: Sequence[int] | torch.Tensor, device: Any) -> list[torch.Generator]:
    """One ``torch.Generator(device)`` per seed, seeded with ``seed % 2**32`` (EDM's StackedRandomGenerator)."""
    return [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in torch.as_tensor(seeds).tolist()]


def _randn(gens: list[torch.Generator], shape: Sequence[int], dtype: torch.dtype, device: Any) -> torch.Tensor:
    return torch.stack([torch.randn(list(shape), generator=g, dtype=dtype, device=device) for g in gens])


def edm_labels(seeds: Sequence[int] | torch.Tensor, label_dim: int, img_shape: Sequence[int], device: Any = "cpu") -> torch.Tensor:
    """The class labels EDM's ``generate.py`` draws without ``--class``: int64 [N].

    Per seed: the latent ``randn(img_shape)`` then ``randint(label_dim)`` from the seed's generator
    on ``device`` (CUDA and CPU generators give different numbers, as in EDM).
    """
    gens = generators(seeds, device)
    out = []
    for g in gens:
        torch.randn(list(img_shape), generator=g, device=device)
        out.append(torch.randint(label_dim, size=[], generator=g, device=device))
    return torch.stack(out).cpu() if out else torch.zeros(0, dtype=torch.int64)


def churn_gammas(t: torch.Tensor, num_steps: int, S_churn: float, S_min: float, S_max: float) -> list[float]:
    """gamma_i of Algorithm 2 for each of the N steps."""
    g = min(S_churn / num_steps, math.sqrt(2) - 1)
    return [g if S_min <= float(t[i]) <= S_max else 0.0 for i in range(num_steps)]


def heun(net: Any, latents: torch.Tensor, class_labels: torch.Tensor | None, t: torch.Tensor,
         gammas: Sequence[float], S_noise: float = 1.0, noise: Any = None) -> torch.Tensor:
    """Algorithms 1-2 from float32 ``latents`` [N, C, H, W] over ``t`` [steps + 1]: float64 x_N.

    ``noise(x)`` returns the churn noise like ``x`` (called once per step when any gamma > 0, as EDM
    draws it at every step); ``net(x, sigma, class_labels)`` is the denoiser D.
    """
    num_steps = len(t) - 1
    churn = any(g > 0 for g in gammas)
    x_next = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        x_cur = x_next
        t_hat = torch.as_tensor(net.round_sigma(t_cur + gammas[i] * t_cur)).to(t.device, torch.float64)
        if churn:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * noise(x_cur)
        else:
            x_hat = x_cur
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``generate.py``'s conversion of [-1, 1] images: ``(x * 127.5 + 128).clip(0, 255)`` -> uint8 (truncating)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def one_hot(labels: torch.Tensor, label_dim: int, device: Any) -> torch.Tensor:
    """float32 [N, label_dim] rows of the identity, as EDM's ``torch.eye(label_dim)[labels]``."""
    return torch.eye(label_dim, device=device)[torch.as_tensor(labels, device=device).long()]


def sample(net: Any, seeds: torch.Tensor, labels: torch.Tensor | None, settings: Mapping[str, Any]) -> torch.Tensor:
    """uint8 images [N, C, H, W] on CPU (see the module docstring). ``labels`` int64 [N] is required
    for class-conditional networks (``net.label_dim > 0``) and ignored otherwise."""
    return to_uint8(sample_float(net, seeds, labels, settings)).cpu()


def sample_float(net: Any, seeds: torch.Tensor, labels: torch.Tensor | None, settings: Mapping[str, Any]) -> torch.Tensor:
    """The sampler's float64 result x_N [N, C, H, W] (in [-1, 1] up to the model's error), on the
    network's device, before the uint8 conversion of :func:`sample`."""
    from neon_cli.errors import FamilyError

    device = next(net.parameters()).device
    num_steps = int(settings.get("num_steps", 18))
    t = time_steps(net, num_steps, settings.get("sigma_min"), settings.get("sigma_max"), float(settings.get("rho", 7.0)), device)
    s_max = settings.get("S_max")
    gammas = churn_gammas(t, num_steps, float(settings.get("S_churn", 0.0)), float(settings.get("S_min", 0.0)),
                          float("inf") if s_max is None else float(s_max))
    seeds = torch.as_tensor(seeds)
    gens = generators(seeds, device)
    shape = [int(net.img_channels), int(net.img_resolution), int(net.img_resolution)]
    latents = _randn(gens, shape, torch.float32, device)
    class_labels = None
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if label_dim:
        if labels is None:
            raise FamilyError(f"the EDM network is class-conditional ({label_dim} classes): labels are required")
        for g in gens:  # EDM draws its random label here; keep the generator where EDM has it
            torch.randint(label_dim, size=[], generator=g, device=device)
        class_labels = one_hot(labels, label_dim, device)
    return heun(net, latents, class_labels, t, gammas, float(settings.get("S_noise", 1.0)),
                noise=lambda like: _randn(gens, like.shape[1:], like.dtype, like.device))


def nfe(num_steps: int) -> int:
    """Network evaluations of the Heun sampler: 2N - 1."""
    return 2 * int(num_steps) - 1


__all__ = ["karras_sigmas", "time_steps", "generators", "edm_labels", "churn_gammas", "heun", "to_uint8", "one_hot",
           "sample", "sample_float", "nfe", "SIGMA_MIN", "SIGMA_MAX"]
