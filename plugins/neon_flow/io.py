"""Checkpoints of the ``flow`` family: torchcfm's CIFAR-10 example container, plus what it lacks.

``examples/images/cifar10/train_cifar10.py`` (torchcfm 1.0.7) saves, with ``torch.save``::

    {"net_model": state_dict, "ema_model": state_dict, "sched": LambdaLR state, "optim": Adam state, "step": int}

(keys prefixed ``module.`` when trained with ``--parallel``). It does not record how to build the
network (``UNetModelWrapper(dim=..., num_channels=..., ...)``) nor which flow matcher trained it.
neon records both in a ``"neon"`` entry of the same container (kept by ``neon merge``, which
replaces only the merged state dict of θ_r's container)::

    "neon": {"schema": "neon.flow/1",
             "model_args": {UNetModelWrapper keyword arguments; dim as a list},
             "train": {"matcher": "otcfm" | "icfm" | "fm" | "si", "sigma": 0.0, "hflip": true},
             "metadata": {str: str}}

Where :func:`load` finds them, first match wins:

1. the container's ``"neon"`` entry (files written by neon);
2. a sidecar JSON ``<checkpoint file name>.json`` next to the checkpoint with the same
   ``model_args`` / ``train`` keys (for checkpoints made by torchcfm's scripts);
3. torchcfm's CIFAR-10 example network (:data:`CIFAR10_ARGS`, what ``train_cifar10.py`` and
   ``compute_fid.py`` build), used only when the weights load into it strictly; the matcher then
   comes from the file name prefix ``{otcfm,icfm,fm,si}_`` the example writes (``cfm_``, the
   released I-CFM weights' name, is icfm), else ``otcfm`` (the example's default), ``hflip`` true
   (its RandomHorizontalFlip).

Otherwise :class:`~neon_cli.errors.CheckpointError` names the sidecar file to write.

Weights used: ``ema_model`` when present (what compute_fid.py evaluates), else ``net_model``, else
a bare state dict. Written (:func:`save_container`): ``net_model`` and ``ema_model`` both holding
the given weights (the core hands over the EMA when fine-tuning keeps one), ``step`` 0 and the
``"neon"`` entry; compute_fid.py's loading code reads it unchanged.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from neon_cli.errors import CheckpointError, exception_line

SCHEMA = "neon.flow/1"
#: UNetModelWrapper arguments of torchcfm's examples/images/cifar10 (train_cifar10.py, compute_fid.py).
CIFAR10_ARGS: dict[str, Any] = {
    "dim": [3, 32, 32], "num_res_blocks": 2, "num_channels": 128, "channel_mult": [1, 2, 2, 2],
    "num_heads": 4, "num_head_channels": 64, "attention_resolutions": "16", "dropout": 0.1,
}
#: Flow matchers of train_cifar10.py --model (torchcfm.conditional_flow_matching classes).
MATCHERS = {
    "otcfm": "ExactOptimalTransportConditionalFlowMatcher",
    "icfm": "ConditionalFlowMatcher",
    "fm": "TargetConditionalFlowMatcher",
    "si": "VariancePreservingConditionalFlowMatcher",
}
DEFAULT_TRAIN = {"matcher": "otcfm", "sigma": 0.0, "hflip": True}
#: UNetModelWrapper keyword arguments accepted in model_args.
WRAPPER_ARGS = ("dim", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma", "class_cond", "num_classes",
                "use_checkpoint", "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample",
                "use_scale_shift_norm", "dropout", "resblock_updown", "use_fp16", "use_new_attention_order")
WEIGHT_KEYS = ("ema_model", "net_model")


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``<checkpoint>.json`` (the full file name plus ``.json``)."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def read_container(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; CheckpointError naming the file otherwise."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        with open(p, "rb") as fh:
            zip_format = fh.read(4) == b"PK\x03\x04"  # torch.save's zip format can be memory-mapped
        return torch.load(str(p), map_location="cpu", weights_only=True, mmap=zip_format)
    except Exception as exc:
        raise CheckpointError(f"{p}: not a readable torch checkpoint ({exception_line(exc)}); the flow family reads "
                              "state dicts as torchcfm's train_cifar10.py saves them ('neon inspect' shows what "
                              "this file holds)") from None


def weights_of(container: Any, path: Path) -> tuple[dict[str, Any], str | None]:
    """(state dict with any ``module.`` prefix removed, the container key it came from or None)."""
    import torch

    key = None
    sd = container
    if isinstance(container, Mapping):
        for k in WEIGHT_KEYS:
            if k in container and isinstance(container[k], Mapping):
                key, sd = k, container[k]
                break
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: no state dict (expected ema_model / net_model as torchcfm's train_cifar10.py writes, or a flat state dict)")
    names = list(sd)
    if all(n.startswith("module.") for n in names):
        sd = {n[len("module."):]: v for n, v in sd.items()}
    return dict(sd), key


def _normalise_args(args: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(args) - set(WRAPPER_ARGS))
    if unknown:
        raise CheckpointError(f"{where}: unknown UNetModelWrapper arguments {unknown}")
    if "dim" not in args or "num_channels" not in args or "num_res_blocks" not in args:
        raise CheckpointError(f"{where}: model_args needs at least dim, num_channels and num_res_blocks")
    if args.get("learn_sigma"):
        raise CheckpointError(f"{where}: learn_sigma networks output 2C channels, not a velocity field; not supported")
    out = dict(args)
    out["dim"] = [int(d) for d in out["dim"]]
    if out.get("channel_mult") is not None:
        out["channel_mult"] = list(out["channel_mult"])
    return out


def _train_opts(train: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    opts = dict(DEFAULT_TRAIN)
    opts.update(train or {})
    if opts["matcher"] not in MATCHERS:
        raise CheckpointError(f"{where}: train.matcher {opts['matcher']!r} is not one of {sorted(MATCHERS)}")
    opts["sigma"] = float(opts["sigma"])
    opts["hflip"] = bool(opts["hflip"])
    return opts


def build(model_args: Mapping[str, Any]) -> Any:
    """``torchcfm.models.unet.unet.UNetModelWrapper(**model_args)`` (dim as a tuple)."""
    from torchcfm.models.unet.unet import UNetModelWrapper

    args = dict(model_args)
    args["dim"] = tuple(args["dim"])
    return UNetModelWrapper(**args)


def matcher_from_name(path: str | os.PathLike[str]) -> str:
    """The flow matcher named by train_cifar10.py's file name ``{model}_cifar10_weights_step_N.pt``.

    ``cfm_`` (the name of the released I-CFM weights, torchcfm release 1.0.4) means icfm; no known
    prefix gives the example's default, otcfm.
    """
    m = re.match(r"^(otcfm|icfm|cfm|fm|si)_", Path(path).name)
    if not m:
        return DEFAULT_TRAIN["matcher"]
    return "icfm" if m.group(1) == "cfm" else m.group(1)


def load(path: str | os.PathLike[str]) -> Any:
    """``UNetModelWrapper`` (eval, CPU, float32) with ``neon_flow`` = {"model_args", "train", "metadata", "source", "key"}.

    Raises CheckpointError naming the file (unreadable, no state dict, no model arguments found,
    weights that do not fit the arguments).
    """
    import torch

    p = Path(path)
    container = read_container(p)
    sd, key = weights_of(container, p)
    neon = container.get("neon") if isinstance(container, Mapping) else None
    side = sidecar_path(p)
    source = "container"
    if isinstance(neon, Mapping) and "model_args" in neon:
        args, train = _normalise_args(neon["model_args"], f"{p}[neon]"), _train_opts(neon.get("train"), f"{p}[neon]")
        meta = dict(neon.get("metadata") or {})
    elif side.is_file():
        try:
            doc = json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{side}: not readable JSON ({exc})") from None
        if not isinstance(doc, Mapping) or "model_args" not in doc:
            raise CheckpointError(f"{side}: expected {{\"model_args\": {{...}}, \"train\": {{...}}}}")
        args, train, meta, source = _normalise_args(doc["model_args"], str(side)), _train_opts(doc.get("train"), str(side)), {}, str(side)
    else:
        args, source, meta = dict(CIFAR10_ARGS), "cifar10-example", {}
        train = _train_opts({"matcher": matcher_from_name(p)}, str(p))
    try:
        net = build(args)
    except Exception as exc:
        raise CheckpointError(f"{p}: UNetModelWrapper({args}) failed ({type(exc).__name__}: {exc})") from None
    try:
        net.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()})
    except RuntimeError as exc:
        first = exception_line(exc)
        hint = (f"; write its UNetModelWrapper arguments to {side} as {{\"model_args\": {{\"dim\": [3, 32, 32], ...}}}}"
                if source == "cifar10-example" else "")
        raise CheckpointError(f"{p}: weights do not fit UNetModelWrapper({source} arguments): {first}{hint}") from None
    net = net.to(torch.float32).eval()
    if "step" in (container if isinstance(container, Mapping) else {}):
        meta.setdefault("torchcfm_step", str(container["step"]))
    net.neon_flow = {"model_args": args, "train": train, "metadata": {str(k): str(v) for k, v in meta.items()},
                     "source": source, "key": key, "path": str(p)}
    return net


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """``neon.metadata`` of a container written by neon (plus ``torchcfm_step``), else {}."""
    container = read_container(path)
    out: dict[str, str] = {}
    if isinstance(container, Mapping):
        neon = container.get("neon")
        if isinstance(neon, Mapping):
            out.update({str(k): str(v) for k, v in (neon.get("metadata") or {}).items()})
        if "step" in container:
            out.setdefault("torchcfm_step", str(container["step"]))
    return out


def save_container(net: Any, path: str | os.PathLike[str], metadata: Mapping[str, str]) -> None:
    """Write ``{"net_model", "ema_model", "step": 0, "neon": {...}}`` with ``torch.save`` at ``path``.

    Both state dicts hold ``net``'s weights (torch.save stores the shared tensors once). The
    ``neon`` entry carries the model arguments and training options of the loaded model, and
    ``metadata`` (str -> str).
    """
    import torch

    core = getattr(net, "module", net)
    info = getattr(core, "neon_flow", None)
    if info is None:
        raise CheckpointError(f"{path}: the model was not loaded by the flow family (no neon_flow arguments to record)")
    sd = {k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()}
    container = {
        "net_model": sd,
        "ema_model": sd,
        "step": 0,
        "neon": {"schema": SCHEMA, "model_args": dict(info["model_args"]), "train": dict(info["train"]),
                 "metadata": {str(k): str(v) for k, v in metadata.items()}},
    }
    torch.save(container, str(path))
