"""``neon align``: does Neon (w > 0) or interpolation (w < 0) help this sampler? A first-order test.

Paper (Alemohammad, Wang, Baraniuk, "Neon", ICLR 2026), Sec. 3.1, Eq. 4 and App. B.4 (Theorem
B.1): a short fine-tune on the synthetic set gives theta_s = theta_r - alpha P r_s + O(alpha^2), so
theta_Neon = theta_r - w (theta_s - theta_r) = theta_r + w alpha P r_s and

    R_data(theta_Neon) = R_data(theta_r) + w alpha s + (w alpha)^2 / 2 r_s^T P H_d P r_s + ...,
    s = <r_d, P r_s>,  r_d = grad R_data(theta_r),  r_s = grad R_syn(theta_r).

s < 0 (anti-aligned gradients): w > 0 lowers the real risk, Neon helps; s > 0: w < 0
(interpolating towards theta_s, i.e. more self-training) helps. App. B.11, Experiment 2 measures
the cosine of that angle with P = Adam's preconditioner estimated from real data.

What is computed here, from the family's own training loss (``family.loss``) only:

* r_d: the mean gradient of the loss over a set of *real* samples at theta_r (batches of the
  family's training batch size; the loss noise of batch b, e.g. diffusion times, comes from a
  generator seeded ``seed * 1_000_003 + b``, the same for every pass: common random numbers). The
  real samples must not be the base's training data (there r_d is ~0 by construction): families
  provide held-out data through the optional method ``real_samples(model, n, seed) ->
  (samples, labels | None)``, or ``--real DIR`` reads a directory in ``neon synth``'s format.
* with a self-trained checkpoint: the displacement delta = theta_r - theta_s (= alpha P_ft r_s,
  P_ft the fine-tune optimiser's own preconditioner), the directional derivative
  ``dR/dw(0) = <r_d, delta>`` (= alpha s: same sign as s) and its cosine, and the curvature
  ``d^2R/dw^2(0) = delta^T H_d delta`` by a central difference of the directional derivative at
  w = +-h; their ratio ``w_quadratic = -dR/dw / d^2R/dw^2`` is the minimiser of Eq. 4's quadratic
  proxy (the paper's w* = -s / (alpha z)) for the family's loss on real data;
* with a synthetic set: r_s, the mean gradient of the loss over S at theta_r, and
  ``s = <r_d, P r_s>`` with P = I or P = diag(1 / (sqrt(v) + 1e-8)), v the mean squared
  minibatch gradient of the real data (Adam's second-moment estimate, as App. B.11), and the cosine
  in P's geometry ``s / (||P^1/2 r_d|| ||P^1/2 r_s||)``.

The verdict uses s when a synthetic set is given, else dR/dw. Its standard error comes from the
spread of the per-batch real gradients' projections (r_s / delta held fixed); ``confident`` means
|estimate| > 2 standard errors.

Memory: the per-batch real gradients are kept, float64 [batches, parameters].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from neon_cli.errors import UsageError
from neon_cli.progress import ProgressFn, null_progress
from neon_cli.requests import AlignOptions, AlignRequest, check_sources

HELP_VERDICT = "Neon (w > 0) expected to help"
INTERPOLATE_VERDICT = "interpolate (w < 0) expected to help"
ADAM_EPS = 1e-8


def _params(model: Any) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]


def batch_gradients(family: Any, model: Any, images: Any, labels: Any, *, batch: int, seed: int,
                    progress: ProgressFn = null_progress, task: str = "gradients"):
    """Per-batch gradients of ``family.loss`` at ``model``'s parameters.

    Args:
        family: a family object (its ``loss(model, images, labels, generator)``).
        model: torch module; its trainable floating parameters, in ``named_parameters`` order,
            define the flat parameter vector.
        images: the samples [N, ...] (the family's sample tensor); labels: int64 [N] or None.
        batch: samples per batch (the last batch may be smaller); seed: loss-noise seed (batch b
            uses ``torch.Generator().manual_seed(seed * 1_000_003 + b)``).

    Returns:
        ``(grads, sizes)``: float64 [B, P] per-batch mean-loss gradients and int64 [B] batch sizes;
        the mean gradient over all N samples is ``(sizes[:, None] * grads).sum(0) / N``.
    """
    import torch

    params = [p for _, p in _params(model)]
    if not params:
        raise UsageError("the model has no trainable floating-point parameters")
    n = images.shape[0]
    if n == 0:
        raise UsageError("no real samples")
    model.train()
    rows, sizes = [], []
    starts = list(range(0, n, batch))
    for b, a in enumerate(starts):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
        lab = labels[a:a + batch] if labels is not None else None
        loss = family.loss(model, images[a:a + batch], lab, gen)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                               for g, p in zip(grads, params)]))
        sizes.append(min(batch, n - a))
        progress(task, b + 1, len(starts))
    model.eval()
    return torch.stack(rows), torch.tensor(sizes, dtype=torch.int64)


def _mean(grads, sizes):
    w = sizes.to(grads.dtype)
    return (w[:, None] * grads).sum(0) / w.sum()


def _stderr(proj, sizes) -> float | None:
    """Standard error of the size-weighted mean of per-batch projections (None with < 2 batches)."""
    import torch

    if proj.numel() < 2:
        return None
    w = sizes.to(proj.dtype) / sizes.sum()
    mean = (w * proj).sum()
    # effective-sample-size form of the weighted variance; equal batches give std / sqrt(B)
    var = (w * (proj - mean) ** 2).sum() / (1 - (w * w).sum())
    return float(torch.sqrt(var * (w * w).sum()))


def flat_params(model: Any):
    """float64 [P]: the trainable floating parameters of ``model`` concatenated (named_parameters order)."""
    import torch

    return torch.cat([p.detach().reshape(-1).to(torch.float64) for _, p in _params(model)])


def _set_flat(model: Any, flat) -> None:
    import torch

    off = 0
    with torch.no_grad():
        for _, p in _params(model):
            k = p.numel()
            p.copy_(flat[off:off + k].reshape(p.shape).to(p.dtype))
            off += k


class Samples(NamedTuple):
    """Samples of the family's sample tensor ``images`` [N, ...] and int64 ``labels`` [N] or None."""

    images: Any
    labels: Any = None


def estimate_alignment(family: Any, base: Any, real: Samples, *, selftrained: Any = None, synthetic: Samples | None = None,
                       options: AlignOptions = AlignOptions(), progress: ProgressFn = null_progress) -> dict[str, Any]:
    """The alignment diagnostics of the module docstring, as a dict of floats (and the verdict).

    Args:
        family: the family object (``loss``, ``train_defaults``).
        base: theta_r, a torch module (not modified: a copy is perturbed for the curvature).
        real: held-out real samples (:class:`Samples`: [N, ...] and int64 [N] or None).
        selftrained: theta_s (same structure), or None.
        synthetic: the synthetic set S (:class:`Samples`), or None.
        options: :class:`~neon_cli.requests.AlignOptions`: ``precond`` (``"identity"`` or ``"adam"``:
            P for s; the displacement carries its own), ``batch`` (default: the family's
            ``train_defaults["batch"]``), ``seed`` (loss noise, common to every pass),
            ``curvature_step`` (h of the central difference for d^2R/dw^2; None or 0: skipped).

    Returns:
        keys ``num_real``, ``num_params``, ``batch``, ``precond``, ``r_d_norm``; with theta_s:
        ``delta_norm``, ``dR_dw``, ``dR_dw_stderr``, ``cos_delta``, ``d2R_dw2``, ``w_quadratic``;
        with S: ``num_synthetic``, ``s``, ``s_stderr``, ``cos``, ``r_s_norm``; and ``estimate``
        (which quantity the verdict uses), ``sign`` (-1/0/+1), ``verdict``, ``confident``.

    Raises:
        UsageError: neither theta_s nor S given, an unknown ``precond``, or theta_s with another
            parameter layout.
    """
    import copy

    check_sources(selftrained, synthetic, options.precond)
    batch = int(options.batch or (getattr(family, "train_defaults", {}) or {}).get("batch", 256))
    if batch <= 0:
        raise UsageError(f"--batch: must be positive, got {batch}")
    grad = _Gradients(family, copy.deepcopy(base), batch, options.seed, progress)
    theta_r = flat_params(grad.model)
    out: dict[str, Any] = {"num_real": int(real.images.shape[0]), "num_params": int(theta_r.numel()), "batch": batch,
                           "precond": options.precond}
    g_real, sizes = grad(real, "align: real gradients")
    r_d = _mean(g_real, sizes)
    out["r_d_norm"] = float(r_d.norm())
    if selftrained is not None:
        out.update(_displacement_terms(grad, real, theta_r, flat_params(selftrained), (r_d, g_real, sizes), options.curvature_step))
    if synthetic is not None:
        out.update(_synthetic_terms(grad, synthetic, (r_d, g_real, sizes), options.precond))
        key, err = "s", out["s_stderr"]
    else:
        key, err = "dR_dw", out["dR_dw_stderr"]
    return {**out, **_verdict(key, out[key], err)}


@dataclass(frozen=True)
class _Gradients:
    """Per-batch gradients of ``family.loss`` at ``model`` (:func:`batch_gradients` with fixed settings)."""

    family: Any
    model: Any
    batch: int
    seed: int
    progress: ProgressFn

    def __call__(self, samples: Samples, task: str) -> Any:
        return batch_gradients(self.family, self.model, samples.images, samples.labels, batch=self.batch, seed=self.seed,
                               progress=self.progress, task=task)


def _displacement_terms(grad: _Gradients, real: Samples, theta_r: Any, theta_s: Any, real_grads: tuple[Any, Any, Any],
                        curvature_step: float | None) -> dict[str, Any]:
    """dR/dw(0) = <r_d, theta_r - theta_s>, its standard error and cosine, and (``curvature_step`` h > 0)
    the curvature d2R/dw2 by a central difference at w = +-h and the quadratic-proxy optimum w."""
    r_d, g_real, sizes = real_grads
    if theta_s.shape != theta_r.shape:
        raise UsageError(f"--selftrained: {theta_s.numel()} parameters, the base has {theta_r.numel()}")
    delta = theta_r - theta_s
    dn, rn = float(delta.norm()), float(r_d.norm())
    out: dict[str, Any] = dict(delta_norm=dn, dR_dw=float(r_d @ delta), dR_dw_stderr=_stderr(g_real @ delta, sizes),
                               cos_delta=float(r_d @ delta) / (rn * dn) if dn > 0 and rn > 0 else None)
    out["d2R_dw2"] = out["w_quadratic"] = None
    if curvature_step and dn > 0:
        h = float(curvature_step)
        slopes = []
        for sgn in (1.0, -1.0):
            _set_flat(grad.model, theta_r + sgn * h * delta)
            g, sz = grad(real, f"align: curvature ({'+' if sgn > 0 else '-'}h)")
            slopes.append(float(_mean(g, sz) @ delta))
        _set_flat(grad.model, theta_r)
        curv = (slopes[0] - slopes[1]) / (2 * h)
        out["d2R_dw2"] = curv
        out["w_quadratic"] = -out["dR_dw"] / curv if curv > 0 else None
    return out


def _synthetic_terms(grad: _Gradients, synthetic: Samples, real_grads: tuple[Any, Any, Any], precond: str) -> dict[str, Any]:
    """s = <r_d, P r_s> with P the identity or Adam's 1 / (sqrt(v) + eps), its standard error and
    the cosine in P's geometry."""
    import torch

    r_d, g_real, sizes = real_grads
    g_syn, s_sizes = grad(synthetic, "align: synthetic gradients")
    r_s = _mean(g_syn, s_sizes)
    if precond == "adam":
        v = _mean(g_real * g_real, sizes)
        p = 1.0 / (torch.sqrt(v) + ADAM_EPS)
    else:
        p = torch.ones_like(r_s)
    s = float((r_d * p * r_s).sum())
    nd = math.sqrt(float((r_d * p * r_d).sum()))
    ns = math.sqrt(float((r_s * p * r_s).sum()))
    return dict(num_synthetic=int(synthetic.images.shape[0]), s=s, s_stderr=_stderr(g_real @ (p * r_s), sizes),
                cos=s / (nd * ns) if nd > 0 and ns > 0 else None, r_s_norm=float(r_s.norm()))


def _verdict(key: str, val: float, err: float | None) -> dict[str, Any]:
    """Which estimate decides, its sign, the verdict and whether |estimate| > 2 standard errors."""
    return {"estimate": key, "sign": (val > 0) - (val < 0),
            "verdict": HELP_VERDICT if val < 0 else INTERPOLATE_VERDICT if val > 0 else "no first-order effect (s = 0)",
            "confident": bool(err is not None and abs(val) > 2 * err)}


def run_align(request: AlignRequest, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """``neon align``: validate ``request`` (:class:`~neon_cli.requests.AlignRequest`), load the
    checkpoints and data, run :func:`estimate_alignment`, fill ``report``.

    Real data: ``request.real`` (a directory in ``neon synth``'s format, e.g. made by a script from
    the held-out split) or the family's ``real_samples(model, num, seed)`` of ``request.real_draw``.
    ``request.base`` None means the family's embedded default.

    Raises:
        UsageError: missing paths, no source of real data, bad numbers; FamilyError: unknown
        family; CheckpointError / DataError: unreadable inputs.
    """
    from neon_cli.family import get_family, load_model, plugin_version, resolve_settings
    from neon_cli.family import model_path as resolve_model

    req = request.validate()
    family = get_family(req.family)
    report.family = plugin_version(req.family)
    path = resolve_model(family, req.base, "--base")
    report.check_outputs({"--base": path, "--selftrained": req.selftrained, "--synthetic": req.synthetic, "--real": req.real}, {})
    report.add_input("base", path)
    settings = resolve_settings(family, req.set_pairs, train=True)

    def load(p: Any) -> Any:
        return load_model(family, p, settings=settings, trust_pickle=req.trust.pickle, purpose="train")

    model = load(path)
    theta_s = None
    if req.selftrained is not None:
        if not Path(req.selftrained).exists():
            raise UsageError(f"--selftrained: {req.selftrained} does not exist")
        report.add_input("selftrained", req.selftrained)
        theta_s = load(req.selftrained)
    synthetic = _load_set(req.synthetic, "synthetic_set", report) if req.synthetic is not None else None
    real, source = _real_samples(req, family, model, report)
    report.settings.update(real_source=source)
    res = estimate_alignment(family, model, real, selftrained=theta_s, synthetic=synthetic, options=req.options,
                             progress=progress)
    res["real_source"] = source
    report.results.update(res)
    return res


def _load_set(folder: Path, role: str, report: Any) -> Samples:
    """A ``neon synth`` folder as :class:`Samples`, its manifest recorded as input ``role``."""
    from neon_cli.synth import load_synthetic

    images, labels, _ = load_synthetic(Path(folder))
    report.add_input(role, Path(folder) / "manifest.json")
    return Samples(images, labels)


def _real_samples(req: AlignRequest, family: Any, model: Any, report: Any) -> tuple[Samples, str]:
    """The held-out real samples (``--real`` or the family's ``real_samples``) and where they came from."""
    if req.real is not None:
        return _load_set(req.real, "real_set", report), str(req.real)
    provider: Callable[..., Any] | None = getattr(family, "real_samples", None)
    if provider is None:
        raise UsageError(f"family {req.family!r} provides no real samples (no real_samples method); give --real DIR")
    num, seed = req.real_draw.num, req.real_draw.seed
    images, labels = provider(model, num, seed)
    return Samples(images, labels), f"{req.family}.real_samples(n={num}, seed={seed})"


def summary_lines(res: dict[str, Any]) -> Sequence[str]:
    """Human-readable lines of :func:`estimate_alignment`'s result (used by the command)."""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"real samples: {res['num_real']} ({res.get('real_source', '')}), parameters: {res['num_params']}, "
             f"batch {res['batch']}"]
    if "dR_dw" in res:
        lines.append(f"along theta_r - w (theta_s - theta_r): dR/dw(0) = <r_d, theta_r - theta_s> = {f(res['dR_dw'])} "
                     f"+- {f(res['dR_dw_stderr'])}, cosine {f(res['cos_delta'])}")
        if res.get("d2R_dw2") is not None:
            lines.append(f"curvature d2R/dw2 = {f(res['d2R_dw2'])}; quadratic-proxy optimum w = {f(res['w_quadratic'])}")
    if "s" in res:
        lines.append(f"s = <r_d, P r_s> (P = {res['precond']}) = {f(res['s'])} +- {f(res['s_stderr'])}, "
                     f"cosine {f(res['cos'])} ({res['num_synthetic']} synthetic samples)")
    conf = "" if res["confident"] else " (not significant: |estimate| < 2 standard errors)"
    lines.append(f"verdict from {res['estimate']}: {res['verdict']}{conf}")
    return lines
