"""VAR checkpoints: reading them, building the networks with the user's checkout, saving snapshots
(imports torch).

Files read (both with ``torch.load(weights_only=True)``; see :func:`read_state_dict`):

* the transformer (``--model``): FoundationVision's ``var_d16.pth`` (a plain state dict), a
  fine-tuned ``ar-ckpt-images_N.pth`` (the same), a trainer checkpoint ``ar-ckpt-last.pth``
  (``{'epoch', 'iter', 'trainer': {'config', 'var_wo_ddp', 'vae_local', 'var_opt'}, 'args'}``:
  ``trainer.var_wo_ddp`` is used), ``{'var_wo_ddp': ...}`` or ``{'state_dict': ...}``; a
  ``_orig_mod.`` (torch.compile) or ``module.`` (DDP) prefix is stripped;
* the VQVAE (``--set vae=``): ``vae_ch160v4096z32.pth`` (plain state dict) or a trainer
  checkpoint (``trainer.vae_local``).

The architecture comes from the shapes: ``depth`` = number of ``blocks.N``, width 64 x depth
(VAR's ``build_vae_var`` rule), ``patch_nums`` from the ``lvl_1L`` buffer (the scale index of
every token), classes from ``class_emb``, shared AdaLN from ``shared_ada_lin``, L2-normalised
attention from ``scale_mul_1H11``; the VQVAE's ``V``/``Cvae`` from its codebook, ``ch`` from
``encoder.conv_in``, ``share_quant_resi`` from its ``quant_resi`` convolutions. ``--set depth=`` /
``--set patch_nums=`` override the first two.

Snapshots written (:func:`save_var`): ``torch.save`` of the transformer's plain state dict, the
layout VAR's own loaders read (``var.load_state_dict(torch.load(path), strict=True)``); neon's
metadata rides in the state dict's ``_metadata`` under the key ``"__neon__"``, which
``load_state_dict`` never reads (it only looks up module prefixes there).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from io import StringIO
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from neon_cli.errors import CheckpointError, FamilyError

FAMILY = "var"
REPO_MARKERS = ("models/__init__.py", "models/var.py", "models/vqvae.py")
REPO_NAME = "FoundationVision/VAR"
REPO_URL = "https://github.com/FoundationVision/VAR"
#: where a VAR trainer checkpoint keeps the transformer and the VQVAE (trainer.py's state_dict)
VAR_KEY = "trainer.var_wo_ddp"
VAE_KEY = "trainer.vae_local"
META_KEY = "__neon__"


def repo_models(settings: Mapping[str, Any] | None) -> Any:
    """VAR's ``models`` package from the user's checkout (``--set repo=``, ``$NEON_VAR_REPO`` or
    importable; :func:`neon_cli.repo.find_repo`). Raises FamilyError naming the flag and the URL."""
    from neon_cli.repo import find_repo, import_module

    repo = find_repo(FAMILY, settings, markers=REPO_MARKERS, what=REPO_NAME, url=REPO_URL)
    models = import_module(repo, "models")
    if not hasattr(models, "build_vae_var"):
        raise FamilyError(f"{repo}: models has no build_vae_var (not a checkout of {REPO_NAME}?)")
    return models


def read_state_dict(path: str | Path, prefer_key: str, *, trust_pickle: bool = False, what: str = "--model") -> dict[str, torch.Tensor]:
    """The tensors of the state dict in ``path`` (name -> tensor, wrapper prefix stripped).

    ``prefer_key``: the dotted path used when the file is a container holding several state
    dicts (:data:`VAR_KEY` / :data:`VAE_KEY`). Read with ``torch.load(weights_only=True)`` through
    :func:`neon_cli.checkpoint.open_checkpoint`, with one class allowed besides tensors and
    containers: ``argparse.Namespace`` (training scripts store their ``args`` as one). Rebuilding a
    Namespace runs no code from the file (``object.__new__`` then ``__dict__.update``), so a trainer
    checkpoint needs no ``--trust-pickle``; any other class is still refused. Raises
    CheckpointError naming ``what`` and the file.
    """
    from neon_cli.checkpoint import open_checkpoint

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ck = open_checkpoint(path, prefer_key=prefer_key, trust_pickle=trust_pickle)
        with ck:
            return {name: ck.tensor(name) for name in ck.names()}
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None


def _count(prefix: str, sd: Mapping[str, Any]) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(found) + 1 if found else 0


def var_arch(sd: Mapping[str, torch.Tensor], path: Any) -> dict[str, Any]:
    """``build_vae_var`` keywords of the transformer state dict ``sd`` (see the module docstring)."""
    need = ("word_embed.weight", "class_emb.weight", "lvl_1L", "head.weight", "pos_1LC")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"--model: {path} is not a VAR transformer state dict (no {', '.join(missing)})")
    depth = _count("blocks.", sd)
    width = int(sd["word_embed.weight"].shape[0])
    if depth == 0 or width != 64 * depth:
        raise CheckpointError(f"--model: {path}: width {width} with {depth} blocks; build_vae_var makes width 64 x depth")
    lvl = sd["lvl_1L"].reshape(-1).long()
    patch_nums = []
    for count in torch.bincount(lvl).tolist():
        pn = int(round(count ** 0.5))
        if pn * pn != count or count == 0:
            raise CheckpointError(f"--model: {path}: lvl_1L has {count} tokens at one scale, not a square")
        patch_nums.append(pn)
    return {
        "depth": depth,
        "num_classes": int(sd["class_emb.weight"].shape[0]) - 1,
        "patch_nums": tuple(patch_nums),
        "shared_aln": "shared_ada_lin.1.weight" in sd,
        "attn_l2_norm": "blocks.0.attn.scale_mul_1H11" in sd,
        "V": int(sd["head.weight"].shape[0]),
        "Cvae": int(sd["word_embed.weight"].shape[1]),
    }


def vae_arch(sd: Mapping[str, torch.Tensor], path: Any) -> dict[str, Any]:
    """``build_vae_var``'s VQVAE keywords (V, Cvae, ch, share_quant_resi) of a VQVAE state dict."""
    for k in ("quantize.embedding.weight", "encoder.conv_in.weight"):
        if k not in sd:
            raise CheckpointError(f"--set vae: {path} is not a VAR VQVAE state dict (no {k})")
    V, Cvae = (int(x) for x in sd["quantize.embedding.weight"].shape)
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        share = _count("quantize.quant_resi.qresi_ls.", sd)  # partially shared (VAR's default, 4)
    elif "quantize.quant_resi.qresi.weight" in sd:
        share = 1  # one shared refinement
    else:
        share = 0  # one per scale
    return {"V": V, "Cvae": Cvae, "ch": int(sd["encoder.conv_in.weight"].shape[0]), "share_quant_resi": share}


def parse_patch_nums(text: str) -> tuple[int, ...] | None:
    """``"1_2_3_4"`` (or ``"1,2,3,4"``; VAR's ``--pn`` names ``256``/``512``/``1024`` too) -> tuple;
    ``""`` -> None (from the checkpoint)."""
    named = {"256": "1_2_3_4_5_6_8_10_13_16", "512": "1_2_3_4_6_9_13_18_24_32",
             "1024": "1_2_3_4_5_7_9_12_16_21_27_36_48_64"}  # utils/arg_util.py
    text = named.get(text.strip(), text.strip())
    if not text:
        return None
    try:
        out = tuple(int(p) for p in re.split(r"[_,\s-]+", text) if p)
    except ValueError:
        raise FamilyError(f"--set patch_nums: expected sizes like 1_2_3_4_5_6_8_10_13_16, got {text!r}") from None
    if not out or any(b <= a for a, b in zip(out, out[1:])) or out[0] < 1:
        raise FamilyError(f"--set patch_nums: sizes must increase from >= 1, got {text!r}")
    return out


@contextmanager
def _init_hooks_restored() -> Iterator[None]:
    """VAR's ``build_vae_var`` replaces ``reset_parameters`` of torch's layer classes with a no-op
    for the whole process ("disable built-in initialization for speed"); put them back after it,
    so other models built in this process initialise as usual."""
    classes = [c for c in vars(torch.nn).values() if isinstance(c, type) and issubclass(c, torch.nn.Module)]
    saved = {c: c.__dict__.get("reset_parameters") for c in classes}
    try:
        yield
    finally:
        for c, fn in saved.items():
            if c.__dict__.get("reset_parameters") is not fn:
                if fn is None:
                    delattr(c, "reset_parameters")
                else:
                    setattr(c, "reset_parameters", fn)


class VarModel(torch.nn.Module):
    """VAR's transformer (``self.var``: the weights neon fine-tunes and merges; ``state_dict`` keys
    ``var.*``) with its frozen VQVAE (``self.vae``, not a submodule: it is in no state dict, no
    optimiser and no copy, but moves with ``.to()``). ``forward`` is VAR's teacher-forced forward,
    so DistributedDataParallel wraps this module. ``info``: the architecture, ``patch_nums``,
    ``begin_ends`` (token range of each scale), the VQVAE's path and training settings."""

    def __init__(self, var: torch.nn.Module, vae: torch.nn.Module, info: dict[str, Any]):
        super().__init__()
        self.var = var
        object.__setattr__(self, "vae", vae)  # bypass Module.__setattr__: not registered
        self.info = info

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Logits float32 [B, L, V] (VAR.forward; class dropout from torch's global generator)."""
        return self.var(label_B, x_BLCv_wo_first_l)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "VarModel":
        super()._apply(fn, *args, **kwargs)
        self.vae._apply(fn)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> "VarModel":
        for m in self.vae.modules():  # the VQVAE is frozen: copies share it
            memo[id(m)] = m
        for t in list(self.vae.parameters()) + list(self.vae.buffers()):
            memo[id(t)] = t
        new = VarModel(copy.deepcopy(self.var, memo), self.vae, copy.deepcopy(self.info, memo))
        return new.train(self.training)


def build(settings: Mapping[str, Any], var_sd: Mapping[str, torch.Tensor], vae_sd: Mapping[str, torch.Tensor],
          model_path: Any, vae_path: Any) -> VarModel:
    """VQVAE + VAR built by the checkout's ``build_vae_var`` with the architecture of the two state
    dicts (and ``settings``' ``depth``/``patch_nums``/``fuse``), weights loaded with ``strict=True``;
    eval mode, CPU, float32. Raises CheckpointError naming the file whose weights do not fit."""
    models = repo_models(settings)
    arch = var_arch(var_sd, model_path)
    varch = vae_arch(vae_sd, vae_path)
    if (arch["V"], arch["Cvae"]) != (varch["V"], varch["Cvae"]):
        raise CheckpointError(f"--set vae: {vae_path} has a {varch['V']} x {varch['Cvae']} codebook, "
                              f"{model_path} predicts {arch['V']} tokens of {arch['Cvae']} channels")
    if int(settings.get("depth") or 0):
        arch["depth"] = int(settings["depth"])
    pn = parse_patch_nums(str(settings.get("patch_nums") or ""))
    if pn is not None:
        arch["patch_nums"] = pn
    fuse = bool(settings.get("fuse", True))
    kwargs = dict(V=varch["V"], Cvae=varch["Cvae"], ch=varch["ch"], share_quant_resi=varch["share_quant_resi"],
                  device="cpu", patch_nums=arch["patch_nums"], num_classes=arch["num_classes"], depth=arch["depth"],
                  shared_aln=arch["shared_aln"], attn_l2_norm=arch["attn_l2_norm"],
                  flash_if_available=fuse, fused_if_available=fuse)
    try:  # VAR's constructors print their configuration: keep stdout for neon's --json
        with _init_hooks_restored(), contextlib.redirect_stdout(StringIO()):
            vae, var = models.build_vae_var(**kwargs)
    except Exception as exc:
        raise FamilyError(f"build_vae_var({', '.join(f'{k}={v}' for k, v in kwargs.items())}) failed: "
                          f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
    for module, sd, path, flag in ((vae, vae_sd, vae_path, "--set vae"), (var, var_sd, model_path, "--model")):
        try:
            module.load_state_dict(dict(sd), strict=True)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])[:400]
            raise CheckpointError(f"{flag}: {path}: weights do not fit the network build_vae_var made ({detail})") from None
    vae.eval().requires_grad_(False)
    var.eval()
    begin_ends, end = [], 0
    for p in arch["patch_nums"]:
        begin_ends.append((end, end + p * p))
        end += p * p
    info = {**kwargs, "begin_ends": begin_ends, "L": end, "vae_path": str(vae_path),
            "downsample": int(getattr(vae, "downsample", 16))}
    del info["device"]
    return VarModel(var, vae, info)


def unwrap(model: Any) -> VarModel:
    """The :class:`VarModel` inside ``model`` (itself, or the module of a DDP wrapper)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, VarModel):
        raise FamilyError(f"family 'var': expected a model loaded by the var family, got {type(inner).__name__}")
    return inner


def save_var(model: Any, path: str | Path, metadata: Mapping[str, str]) -> None:
    """``torch.save`` of the transformer's plain state dict (CPU tensors, VAR's key names) with
    ``metadata`` under ``_metadata["__neon__"]`` (see the module docstring)."""
    var = unwrap(model).var
    sd = var.state_dict()
    meta = getattr(sd, "_metadata", None)
    out = type(sd)((k, v.detach().cpu()) for k, v in sd.items())
    out._metadata = type(meta)(meta) if meta is not None else {}  # type: ignore[attr-defined]
    out._metadata[META_KEY] = {str(k): str(v) for k, v in metadata.items()}  # type: ignore[attr-defined]
    torch.save(out, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """neon's metadata of a snapshot written by :func:`save_var` (``{}`` for other files)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}
    meta = getattr(obj, "_metadata", None) or {}
    return {str(k): str(v) for k, v in dict(meta.get(META_KEY, {}) or {}).items()}


def num_classes_of(path: str | Path) -> int:
    """Classes of the transformer at ``path`` (``class_emb`` rows - 1, the last being the null class)."""
    sd = read_state_dict(path, VAR_KEY)
    if "class_emb.weight" not in sd:
        raise CheckpointError(f"--model: {path} is not a VAR transformer state dict (no class_emb.weight)")
    return int(sd["class_emb.weight"].shape[0]) - 1
