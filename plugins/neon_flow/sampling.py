"""Sampling and fine-tuning of torchcfm's ``UNetModelWrapper`` (imports torch, torchcfm, torchdiffeq).

Sampling integrates the learned velocity field dx/dt = v(t, x) from t = 0 (noise) to t = 1
(data) with ``torchdiffeq.odeint``, as torchcfm's ``examples/images/cifar10/compute_fid.py``:

* ``solver=euler``: fixed grid ``linspace(0, 1, steps + 1)`` (compute_fid.py's euler path, there
  through torchdyn's NeuralODE; the same explicit Euler steps). NFE = steps. The batch shares the
  grid, so image i depends only on its noise: exact per-seed independence.
* ``solver=dopri5``: adaptive Dormand-Prince with ``atol``/``rtol`` (compute_fid.py: both 1e-5).
  An adaptive solver picks one step sequence for the whole tensor it integrates, so by default
  each image is integrated **on its own** (image i depends only on seed i, as the family
  protocol requires; costs N solves). ``batch_solve=true`` integrates the batch in one solve as
  compute_fid.py does (much faster on a GPU); images then depend on the batch's composition within
  the tolerances. ``neon synth`` and ``neon eval`` keep batches aligned to fixed seed ranges, so
  runs stay reproducible, but an image can change by a few levels with another ``--batch``.

Initial noise x0 ~ N(0, I) of image i comes from ``torch.Generator().manual_seed(seeds[i])`` on
the CPU. Output as compute_fid.py: ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` (truncation).
Class-conditional networks (``class_cond``) get ``y = labels``; there is no guidance.

Fine-tuning follows ``train_cifar10.py``: data x1 = uint8 / 127.5 - 1 (ToTensor + Normalize 0.5),
random horizontal flip (``train.hflip``), x0 ~ N(0, I), the run's flow matcher
(``train.matcher``: otcfm, icfm, fm, si with ``train.sigma``, torchcfm classes), loss
``mean((v(t, x_t) - u_t)^2)``, Adam (torch defaults) with gradient-norm clipping at 1.0. All
randomness comes from the step's generator: t ~ U[0, 1] and the path noise are passed to
torchcfm's ``sample_xt`` / ``compute_conditional_flow``, and OT-CFM's minibatch coupling draws
its pairs from torchcfm's exact OT plan (``OTPlanSampler.get_map``) with the generator, as
``OTPlanSampler.sample_map`` does with numpy's global RNG. Dropout (0.1 in the CIFAR-10 network)
uses torch's global RNG, seeded by ``neon finetune``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from neon_cli.train import grad_clipped

from neon_cli.errors import FamilyError

MAX_GRAD_NORM = 1.0


def info_of(model: Any) -> dict[str, Any]:
    core = getattr(model, "module", model)
    info = getattr(core, "neon_flow", None)
    if info is None:
        raise FamilyError("flow: model was not loaded with the flow family (no neon_flow)")
    return info


def image_shape(info: Mapping[str, Any]) -> tuple[int, int, int]:
    c, h, w = (int(d) for d in info["model_args"]["dim"])
    return c, h, w


def num_classes(info: Mapping[str, Any]) -> int:
    """Classes of a ``class_cond`` network (UNetModelWrapper's ``num_classes``, default 1000), else 0."""
    args = info["model_args"]
    return int(args.get("num_classes", 1000)) if args.get("class_cond") else 0


def initial_noise(seeds: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """float32 [N, C, H, W]; row i ~ N(0, I) from ``torch.Generator().manual_seed(seeds[i])``."""
    out = torch.empty((len(seeds),) + tuple(shape))
    gen = torch.Generator()
    for i, s in enumerate(seeds.tolist()):
        gen.manual_seed(int(s))
        out[i] = torch.randn(shape, generator=gen)
    return out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """compute_fid.py's conversion: ``(x * 127.5 + 128).clip(0, 255).to(torch.uint8)``."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _velocity(net: Any, labels: torch.Tensor | None):
    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(()).expand(x.shape[0]).to(x.dtype)
        return net(tt, x, y=labels)

    return f


def integrate(net: Any, x0: torch.Tensor, labels: torch.Tensor | None, settings: Mapping[str, Any]) -> torch.Tensor:
    """x(1) of dx/dt = net(t, x) from x(0) = x0 with torchdiffeq.odeint (one solve for the whole tensor)."""
    from torchdiffeq import odeint

    solver = str(settings.get("solver", "euler"))
    f = _velocity(net, labels)
    if solver == "euler":
        steps = int(settings.get("steps", 100))
        t = torch.linspace(0, 1, steps + 1, device=x0.device)
        return odeint(f, x0, t, method="euler")[-1]
    if solver == "dopri5":
        t = torch.linspace(0, 1, 2, device=x0.device)
        return odeint(f, x0, t, method="dopri5", atol=float(settings.get("atol", 1e-5)), rtol=float(settings.get("rtol", 1e-5)))[-1]
    raise FamilyError(f"--set solver={solver}: expected euler or dopri5")


def sample(net: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> torch.Tensor:
    """uint8 [N, C, H, W] on CPU by ODE integration (module docstring). Runs on the network's device.

    settings: ``solver`` (euler | dopri5), ``steps`` (euler), ``atol``/``rtol`` (dopri5),
    ``batch_solve`` (dopri5: one solve per batch instead of per image).
    """
    info = info_of(net)
    k = num_classes(info)
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    if k and labels is None:
        raise FamilyError(f"flow: the network is class-conditional ({k} classes); labels are required")
    if not k and labels is not None:
        raise FamilyError("flow: labels given but the network is unconditional (class_cond false)")
    shape = image_shape(info)
    if len(seeds) == 0:
        return torch.empty((0,) + shape, dtype=torch.uint8)
    device = next(net.parameters()).device
    x0 = initial_noise(seeds, shape).to(device)
    y = torch.as_tensor(labels, dtype=torch.int64).to(device) if k else None
    per_image = str(settings.get("solver", "euler")) == "dopri5" and not bool(settings.get("batch_solve", False))
    with torch.no_grad():
        if per_image:
            x1 = torch.cat([integrate(net, x0[i:i + 1], y[i:i + 1] if y is not None else None, settings) for i in range(len(seeds))])
        else:
            x1 = integrate(net, x0, y, settings)
    return to_uint8(x1).cpu()


def make_matcher(train: Mapping[str, Any]) -> Any:
    """The torchcfm flow matcher of ``train["matcher"]`` with ``sigma``."""
    import torchcfm.conditional_flow_matching as cfm

    from neon_flow.io import MATCHERS

    return getattr(cfm, MATCHERS[train["matcher"]])(sigma=float(train["sigma"]))


def ot_pairs(matcher: Any, x0: torch.Tensor, x1: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) drawn with replacement from torchcfm's exact minibatch OT plan between x0 and x1.

    ``pi = matcher.ot_sampler.get_map(x0, x1)`` (POT's exact EMD on squared Euclidean costs),
    then ``batch`` pairs with probabilities ``pi / pi.sum()`` as ``OTPlanSampler.sample_map``, but
    drawn by ``torch.multinomial`` with ``generator`` instead of numpy's global RNG.
    """
    pi = matcher.ot_sampler.get_map(x0, x1)
    p = torch.as_tensor(pi, dtype=torch.float64).flatten()
    choices = torch.multinomial(p / p.sum(), x0.shape[0], replacement=True, generator=generator)
    return choices // pi.shape[1], choices % pi.shape[1]


def loss(model: Any, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """train_cifar10.py's flow-matching loss on uint8 images [N, C, H, W]; float32 scalar (module doc)."""
    info = info_of(model)
    core = getattr(model, "module", model)
    train = info["train"]
    device = next(core.parameters()).device
    x1 = images.to(torch.float32) / 127.5 - 1.0
    n = x1.shape[0]
    if train.get("hflip", True):
        flip = torch.rand(n, generator=generator) < 0.5
        x1 = torch.where(flip[:, None, None, None], x1.flip(3), x1)
    x0 = torch.randn(x1.shape, generator=generator)
    t = torch.rand(n, generator=generator)
    eps = torch.randn(x1.shape, generator=generator)
    k = num_classes(info)
    y = None
    if k:
        if labels is None:
            raise FamilyError("flow: the network is class-conditional; the synthetic set has no labels")
        y = labels.to(torch.int64)
    fm = make_matcher(train)
    if train["matcher"] == "otcfm":
        i, j = ot_pairs(fm, x0, x1, generator)
        x0, x1 = x0[i], x1[j]
        if y is not None:
            y = y[j]
    x0, x1, t, eps = x0.to(device), x1.to(device), t.to(device), eps.to(device)
    xt = fm.sample_xt(x0, x1, t, eps)
    ut = fm.compute_conditional_flow(x0, x1, t, xt)
    vt = model(t, xt, y=y.to(device) if y is not None else None)
    return torch.mean((vt - ut) ** 2)


#: Adam that clips the global gradient norm to ``max_grad_norm`` before each step (train_cifar10.py's
ClippedAdam = grad_clipped(torch.optim.Adam)


def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    """train_cifar10.py: ``torch.optim.Adam(params, lr)`` (betas 0.9, 0.999, eps 1e-8) + grad-norm clip 1.0."""
    return ClippedAdam(params, lr=lr, max_grad_norm=MAX_GRAD_NORM)


def ema_halflife_images(decay: float = 0.9999, batch: int = 128) -> int:
    """Images over which train_cifar10.py's per-step EMA (decay 0.9999, batch 128) halves a weight's share."""
    return int(round(batch * math.log(0.5) / math.log(decay)))
