"""Exact Neon in LoRA space: θ_s = θ_r + s·B·A gives θ_Neon = θ_r − w·s·B·A.

Paper: Alemohammad, Wang, Baraniuk, "Neon", ICLR 2026, Algorithm 1 (last step): θ_Neon =
θ_r − w (θ_s − θ_r). When θ_s is θ_r plus a LoRA (Hu et al. 2021) on some layers, θ_s − θ_r is
that LoRA's ΔW = s·B·A on those layers and zero elsewhere, so Neon is the same LoRA at scale −w
(diffusers' ``fuse_lora(lora_scale=-w)`` / ``set_adapters(..., [-w])``). ΔW is linear in B, so
folding −w into B (B' = −w·B, alpha and r kept) is exact; applying the Neon formula to A and B
separately (as some ports do) is not: it gives s·((1+w)B_r − wB_s)((1+w)A_r − wA_s), a product
of extrapolations, not the extrapolation of the product.

Formats read (:func:`read_lora`), all into one canonical form ``{component: {module path:
LoraLayer(A, B, scale)}}`` with A ``[r, in]`` (conv: ``[r, in, kh, kw]``), B ``[out, r]`` (conv:
``[out, r, 1, 1]``) and ``scale`` = alpha / r (alpha / sqrt(r) with rslora):

* diffusers (``pytorch_lora_weights.safetensors``, ``StableDiffusionPipeline.save_lora_weights``):
  keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (peft names) or ``.lora.down.weight`` /
  ``.lora.up.weight`` and ``.lora_linear_layer.down/up`` (diffusers' ``convert_state_dict_to_diffusers``
  names), under ``unet.``, ``text_encoder.``, ``text_encoder_2.`` or ``transformer.``; alpha and r
  from the ``lora_adapter_metadata`` header entry (diffusers >= 0.35, ``"unet.lora_alpha"``, ...,
  with peft's ``rank_pattern`` / ``alpha_pattern`` / ``use_rslora``), else per-module ``.alpha``
  tensors, else alpha = r (scale 1: diffusers' default);
* a peft folder (``adapter_model.safetensors`` + ``adapter_config.json``; keys under
  ``base_model.model.``; taken as the ``unet``), or a folder with ``pytorch_lora_weights.safetensors``
  (its ``adapter_config.json``, if any, gives alpha/r to components the header does not describe);
* kohya sd-scripts / A1111 (``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``; ``lora_te_``, ``lora_te1_``, ``lora_te2_`` for the text encoders): the module is found
  by matching the underscored name against the base model's module names; SDXL's sgm block names
  (``input_blocks_4_1``, ``in_layers_2``) go through diffusers' ``_maybe_map_sgm_blocks_to_diffusers``
  and the sgm -> diffusers renames (``input_blocks`` -> ``down_blocks``, ``in_layers_2`` -> ``conv1``, ...).
  A module without ``.alpha`` has alpha = r (kohya's ``networks/lora.py`` default).

Anything else (DoRA magnitudes, LoHa/LoKr, unknown keys) is refused with the key named. Torch is
imported inside the functions that need it; this module imports without it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping

from neon_cli.errors import CheckpointError, UsageError
from neon_cli.progress import ProgressFn, null_progress

FORMULA = "theta_r - w * s * B @ A"
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
#: diffusers' safetensors header entry for the LoRA config (``diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY``)
METADATA_KEY = "lora_adapter_metadata"
COMPONENT_PREFIXES = ("unet", "text_encoder_2", "text_encoder", "transformer")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
LORA_FORMATS = ("diffusers", "kohya")

# suffix (after the module path) -> factor ("A" down / "B" up); longest first
_SUFFIXES = (
    (".lora_linear_layer.down.weight", "A"), (".lora_linear_layer.up.weight", "B"),
    (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora.down.weight", "A"), (".lora.up.weight", "B"),
    (".lora_down.weight", "A"), (".lora_up.weight", "B"),
)
# diffusers' old attention-processor names -> module names (diffusers.utils.state_dict_utils UNET_TO_DIFFUSERS)
_OLD_ATTN = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_REFUSED = ("lora_magnitude_vector", "dora_scale", ".hada_", ".lokr_", ".lora_mid.")
_REFUSED_ENDS = (".diff", ".diff_b")


def _refused(key: str) -> bool:
    """DoRA / LyCORIS (LoHa, LoKr, Tucker mid, full diff) tensors: not a plain ΔW = s·B·A."""
    return any(r in key for r in _REFUSED) or key.endswith(_REFUSED_ENDS)


@dataclass
class LoraLayer:
    """One LoRA'd layer: ΔW = scale · B·A (A [r, in(, kh, kw)], B [out, r(, 1, 1)], torch tensors).

    ``alpha``: the stored alpha (None when the file gave none: alpha = r); ``rslora``: scale is
    alpha/sqrt(r) (peft ``use_rslora``); ``keys``: the A and B keys in the file, for messages.
    """

    A: Any
    B: Any
    scale: float
    alpha: float | None = None
    rslora: bool = False
    keys: tuple[str, str] = ("", "")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight ΔW updates: ``[out, in]`` or ``[out, in, kh, kw]``."""
        return (int(self.B.shape[0]),) + tuple(int(d) for d in self.A.shape[1:])

    def product(self) -> Any:
        """B·A in float32 (float64 if either factor is float64), shaped like the weight (no scale).

        Conv: ΔW[o, i, :, :] = Σ_r B[o, r] A[r, i, :, :], as peft's ``Conv2d.get_delta_weight``."""
        import torch

        cdt = torch.float64 if torch.float64 in (self.A.dtype, self.B.dtype) else torch.float32
        a = self.A.to(cdt).reshape(self.rank, -1)
        b = self.B.to(cdt).reshape(self.B.shape[0], self.rank)
        return (b @ a).reshape(self.weight_shape())

    def delta(self, factor: float = 1.0) -> Any:
        """factor · scale · B·A in float32: peft's ``get_delta_weight`` with ``scaling`` multiplied by
        ``factor`` (diffusers' ``fuse_lora(lora_scale=factor)``): (B @ A) * (scale * factor)."""
        return self.product() * (self.scale * factor)


@dataclass
class Lora:
    """A LoRA file in canonical form: ``layers[component][module path] = LoraLayer``."""

    path: Path
    format: str
    layers: dict[str, dict[str, LoraLayer]] = field(default_factory=dict)

    def modules(self) -> list[tuple[str, str, LoraLayer]]:
        return [(c, m, l) for c in self.layers for m, l in self.layers[c].items()]

    def ranks(self) -> dict[str, int]:
        return dict(Counter(l.rank for _, _, l in self.modules()))


# ------------------------------------------------------------------------------------------------
# finding and reading


def lora_file(path: str | Any) -> tuple[Path, Path | None]:
    """(weights file, adapter_config.json or None) of a LoRA path: a ``.safetensors`` file, or a
    folder holding ``pytorch_lora_weights.safetensors`` or ``adapter_model.safetensors``.
    CheckpointError naming the path otherwise."""
    p = Path(path)
    if p.is_dir():
        cfg = p / "adapter_config.json"
        for n in LORA_FILE_NAMES:
            if (p / n).is_file():
                return p / n, cfg if cfg.is_file() else None
        raise CheckpointError(f"{p}: no LoRA weights in the folder ({' or '.join(LORA_FILE_NAMES)})")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: a LoRA must be a .safetensors file (diffusers, peft or kohya layout)")
    cfg = p.parent / "adapter_config.json"
    return p, cfg if cfg.is_file() and p.name in LORA_FILE_NAMES else None


def is_lora(path: str | Any) -> bool:
    """True when ``path`` is a LoRA (a ``.safetensors`` file or LoRA folder whose tensor names are
    LoRA factors: ``lora_A``/``lora_B``, ``lora.down``/``lora.up``, ``lora_down``/``lora_up``).
    Reads the header only; never raises for an ordinary checkpoint."""
    p = Path(path)
    if p.is_dir() and not any((p / n).is_file() for n in LORA_FILE_NAMES):
        return False
    try:
        names = _lora_tensor_names(p)
    except CheckpointError:
        return False
    return bool(names) and all(any(s in n for s, _ in _SUFFIXES) or n.endswith(".alpha") or _refused(n) for n in names)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``):
    the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for k, v in patterns.items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def _config_scale(cfg: Mapping[str, Any], module: str, rank: int, where: str) -> tuple[float, float, bool]:
    """(alpha, scale, rslora) of ``module`` from a peft LoraConfig dict (r, lora_alpha, rank_pattern,
    alpha_pattern, use_rslora); peft ``LoraLayer.update_layer``: scaling = alpha / r (alpha / sqrt(r))."""
    if cfg.get("use_dora"):
        raise CheckpointError(f"{where}: a DoRA adapter (use_dora) is not a linear ΔW = s·B·A; not supported")
    if cfg.get("fan_in_fan_out"):
        raise CheckpointError(f"{where}: fan_in_fan_out (Conv1D weights stored transposed) is not supported")
    r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", rank)))
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r)))
    if r != rank:
        raise CheckpointError(f"{where}: {module}: the config says r={r}, the factors have rank {rank}")
    rs = bool(cfg.get("use_rslora"))
    return alpha, alpha / (math.sqrt(rank) if rs else rank), rs


def _split_component(key: str) -> tuple[str, str]:
    """(component, rest) for a diffusers/peft key."""
    if key.startswith("base_model.model."):
        return "unet", key[len("base_model.model."):]
    for c in COMPONENT_PREFIXES:
        if key.startswith(c + "."):
            return c, key[len(c) + 1:]
    return "unet", key  # a bare peft state dict of one model: taken as the UNet


def _module_of(rest: str) -> tuple[str, str] | None:
    """(module path, "A"/"B"/"alpha") of a key without its component prefix, or None."""
    if rest.endswith(".alpha"):
        mod, kind = rest[: -len(".alpha")], "alpha"
    else:
        for suf, kind in _SUFFIXES:
            if rest.endswith(suf):
                mod = rest[: -len(suf)]
                break
        else:
            return None
    mod = mod.replace(".processor.", ".")
    head, _, last = mod.rpartition(".")
    if last in _OLD_ATTN:
        mod = (head + "." if head else "") + _OLD_ATTN[last]
    return mod, kind


def _kohya_lookup(names: Collection[str] | None) -> dict[str, str]:
    return {} if names is None else {n.replace(".", "_"): n for n in names}


#: sgm/LDM names of kohya's SDXL UNet -> diffusers' (after diffusers' block renumbering); the
#: renames diffusers' ``_convert_unet_lora_key`` applies, written out as facts about the two layouts
_SGM_RENAMES = (("input_blocks_", "down_blocks_"), ("middle_block_", "mid_block_"), ("output_blocks_", "up_blocks_"),
                ("_in_layers_2", "_conv1"), ("_out_layers_3", "_conv2"), ("_emb_layers_1", "_time_emb_proj"),
                ("_skip_connection", "_conv_shortcut"), ("_op", "_conv"))


def _kohya_module(lookup: Mapping[str, str], under: str) -> str | None:
    """The module of a kohya name (``'.'`` written ``'_'``): direct, else after the sgm renames."""
    if under in lookup:
        return lookup[under]
    for a, b in _SGM_RENAMES:
        under = under.replace(a, b) if not a.startswith("_") else (under[: -len(a)] + b if under.endswith(a) else under.replace(a + "_", b + "_"))
    return lookup.get(under)


def _load_lora_file(path: str | Any) -> tuple[Path, dict[str, Any], Any, Any]:
    """``(file, tensors, header metadata (peft, JSON) or None, adapter_config.json or None)`` of a LoRA;
    CheckpointError naming the file for no tensors, a header or config that is not JSON, or DoRA/LyCORIS keys."""
    from neon_cli.checkpoint.safetensors_io import read_safetensors

    f, cfg_path = lora_file(path)
    tensors, header = read_safetensors(f)
    if not tensors:
        raise CheckpointError(f"{f}: no tensors")
    meta = None
    if header.get(METADATA_KEY):
        try:
            meta = json.loads(header[METADATA_KEY])
        except ValueError:
            raise CheckpointError(f"{f}: header entry {METADATA_KEY} is not JSON") from None
    cfg = None
    if cfg_path is not None:
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError:
            raise CheckpointError(f"{cfg_path}: not JSON") from None
    for k in tensors:
        if _refused(k):
            raise CheckpointError(f"{f}: key {k!r}: DoRA/LyCORIS (LoHa, LoKr, full diff) adapters are not a plain ΔW = s·B·A; "
                                  "only LoRA is supported")
    return f, tensors, meta, cfg


def _kohya_slot(f: Path, k: str, modules: Mapping[str, Collection[str]] | None) -> tuple[str, str, str]:
    """``(component, module, "A"|"B"|"alpha")`` of kohya key ``k`` (``lora_unet_a_b.lora_down.weight``),
    the module resolved against ``modules``; CheckpointError/UsageError naming the key."""
    pre = next((p for p in KOHYA_PREFIXES if k.startswith(p)), None)
    if pre is None:
        raise CheckpointError(f"{f}: key {k!r} is neither lora_unet_* nor lora_te*_* (kohya layout)")
    comp = KOHYA_PREFIXES[pre]
    under, _, suffix = k[len(pre):].partition(".")
    kind = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}.get(suffix)
    if kind is None:
        raise CheckpointError(f"{f}: key {k!r}: unknown kohya suffix .{suffix} (expected .lora_down.weight, .lora_up.weight, .alpha)")
    if modules is None:
        raise UsageError(f"{f}: a kohya LoRA names modules with '_' for '.'; the base model is needed to resolve {k!r}")
    mod = _kohya_module(_kohya_lookup(modules.get(comp)), under)
    if mod is None:
        raise CheckpointError(f"{f}: key {k!r}: no module {under!r} in the base's {comp} (after '_' -> '.')")
    return comp, mod, kind


def _lora_parts(f: Path, tensors: Mapping[str, Any], kohya: bool,
                modules: Mapping[str, Collection[str]] | None) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(component, module): {"A"|"B"|"alpha": (key, tensor)}}``; CheckpointError naming a key that
    is not a LoRA factor or repeats one."""
    parts: dict[tuple[str, str], dict[str, Any]] = {}
    for k, t in tensors.items():
        if kohya:
            comp, mod, kind = _kohya_slot(f, k, modules)
        else:
            comp, rest = _split_component(k)
            got = _module_of(rest)
            if got is None:
                raise CheckpointError(f"{f}: key {k!r} is not a LoRA factor (.lora_A.weight/.lora_B.weight, "
                                      ".lora.down.weight/.lora.up.weight, .alpha)")
            mod, kind = got
        slot = parts.setdefault((comp, mod), {})
        if kind in slot:
            raise CheckpointError(f"{f}: key {k!r}: module {comp}.{mod} has two {kind} tensors")
        slot[kind] = (k, t)
    return parts


def _lora_layer(f: Path, comp: str, mod: str, slot: Mapping[str, Any], meta: Any, cfg: Any,
                modules: Mapping[str, Collection[str]] | None) -> LoraLayer:
    """The :class:`LoraLayer` of one module's factors; its scale from ``.alpha``, else the header
    metadata, else ``adapter_config.json``, else 1. CheckpointError naming the key otherwise."""
    if "A" not in slot or "B" not in slot:
        have = next(iter(slot.values()))[0]
        raise CheckpointError(f"{f}: key {have!r}: module {comp}.{mod} lacks its {'A (down)' if 'A' not in slot else 'B (up)'} factor")
    (ka, a), (kb, b) = slot["A"], slot["B"]
    if not (a.is_floating_point() and b.is_floating_point()):
        raise CheckpointError(f"{f}: key {ka!r}: LoRA factors must be floating point")
    r = int(a.shape[0])
    if a.dim() not in (2, 4) or b.dim() != a.dim() or int(b.shape[1]) != r or (b.dim() == 4 and tuple(b.shape[2:]) != (1, 1)):
        raise CheckpointError(f"{f}: key {kb!r}: shapes A {tuple(a.shape)} and B {tuple(b.shape)} are not a LoRA pair "
                              "(A [r, in(, k, k)], B [out, r(, 1, 1)])")
    where = f"{f}: key {ka!r}"
    comp_meta = None if meta is None else {k2[len(comp) + 1:]: v for k2, v in meta.items() if k2.startswith(comp + ".")}
    if "alpha" in slot:
        alpha = float(slot["alpha"][1].item())
        lay = LoraLayer(a, b, alpha / r, alpha, False, (ka, kb))
    elif comp_meta:
        alpha, s, rs = _config_scale(comp_meta, mod, r, where)
        lay = LoraLayer(a, b, s, alpha, rs, (ka, kb))
    elif cfg is not None:
        alpha, s, rs = _config_scale(cfg, mod, r, where)
        lay = LoraLayer(a, b, s, alpha, rs, (ka, kb))
    else:
        lay = LoraLayer(a, b, 1.0, None, False, (ka, kb))
    if modules is not None:
        if comp not in modules:
            raise CheckpointError(f"{f}: key {ka!r}: the base has no component {comp!r} (has {', '.join(sorted(modules))}); give the pipeline folder")
        if mod not in modules[comp]:
            raise CheckpointError(f"{f}: key {ka!r}: no module {mod!r} with a weight in the base's {comp}")
    return lay


def read_lora(path: str | Any, modules: Mapping[str, Collection[str]] | None = None,
              unet_config: Mapping[str, Any] | None = None) -> Lora:
    """Read a LoRA (diffusers, peft or kohya/A1111 ``.safetensors``; see the module docstring).

    Args:
        path: the file or folder.
        modules: ``{component: module paths}`` of the model the LoRA applies to (the base's weight
            names without ``.weight``); needed to resolve kohya names (``lora_unet_a_b_c``), and used
            to check every module exists (CheckpointError naming the LoRA key otherwise).
        unet_config: the UNet's ``config.json`` (for SDXL kohya files with sgm block names).

    Returns a :class:`Lora` with torch tensors as stored (dtype kept). Raises CheckpointError naming
    the file and key for an unknown key, a factor without its partner, rank mismatches, DoRA/LoHa.
    """
    f, tensors, meta, cfg = _load_lora_file(path)
    kohya = any(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors)
    fmt = "kohya" if kohya else ("peft" if any(k.startswith("base_model.model.") for k in tensors) else "diffusers")
    if kohya and unet_config is not None and any("input_blocks" in k or "output_blocks" in k or "middle_block" in k for k in tensors):
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        from types import SimpleNamespace

        tensors = _maybe_map_sgm_blocks_to_diffusers(tensors, SimpleNamespace(**dict(unet_config)))
    lora = Lora(path=Path(path), format=fmt)
    for (comp, mod), slot in _lora_parts(f, tensors, kohya, modules).items():
        lora.layers.setdefault(comp, {})[mod] = _lora_layer(f, comp, mod, slot, meta, cfg, modules)
    return lora


# ------------------------------------------------------------------------------------------------
# Neon in LoRA space


def negated(lora: Lora, w: float) -> Lora:
    """The Neon LoRA of θ_s = θ_r + s·B·A: B' = −w·B (computed in float32, cast once to B's dtype),
    A, alpha, r and scale kept; exact since ΔW = s·B·A is linear in B (paper Alg. 1, last step)."""
    import torch

    out = Lora(path=lora.path, format=lora.format)
    for c, m, l in lora.modules():
        cdt = torch.float64 if l.B.dtype == torch.float64 else torch.float32
        b = (l.B.to(cdt) * (-float(w))).to(l.B.dtype)
        out.layers.setdefault(c, {})[m] = LoraLayer(l.A, b, l.scale, l.alpha, l.rslora, l.keys)
    return out


def neon_cat(base: Lora, selftrained: Lora, w: float) -> Lora:
    """Neon when θ_r = W0 + s_r·B_r·A_r and θ_s = W0 + s_s·B_s·A_s (two LoRAs on one checkpoint W0):
    θ_Neon = W0 + (1+w)·s_r·B_r·A_r − w·s_s·B_s·A_s, written exactly as one LoRA of rank r_r + r_s
    per module: A = [A_r; A_s] (rows), B = [(1+w)·s_r·B_r, −w·s_s·B_s] (columns), scale 1 (alpha = r).
    This is peft's ``add_weighted_adapter(combination_type="cat")``; the factor-wise ``linear`` mode
    is not exact. A module in only one LoRA keeps its own factor. Float32 factors (float64 kept)."""
    import torch

    out = Lora(path=selftrained.path, format=selftrained.format)
    keys = sorted({(c, m) for c, m, _ in base.modules()} | {(c, m) for c, m, _ in selftrained.modules()})
    for c, m in keys:
        lr, ls = base.layers.get(c, {}).get(m), selftrained.layers.get(c, {}).get(m)
        if lr is not None and ls is not None and lr.weight_shape() != ls.weight_shape():
            raise CheckpointError(f"{selftrained.path}: key {ls.keys[0]!r}: updates a {ls.weight_shape()} weight, "
                                  f"the base LoRA's {lr.keys[0]!r} a {lr.weight_shape()} one")
        As, Bs = [], []
        for lay, coef in ((lr, (1.0 + w)), (ls, -float(w))):
            if lay is None:
                continue
            cdt = torch.float64 if torch.float64 in (lay.A.dtype, lay.B.dtype) else torch.float32
            As.append(lay.A.to(cdt))
            Bs.append(lay.B.to(cdt) * (lay.scale * coef))
        cdt = torch.float64 if any(a.dtype == torch.float64 for a in As) else torch.float32
        a = torch.cat([x.to(cdt) for x in As], 0)
        b = torch.cat([x.to(cdt) for x in Bs], 1)
        out.layers.setdefault(c, {})[m] = LoraLayer(a, b, 1.0, float(a.shape[0]), False,
                                                  ((lr or ls).keys[0], (ls or lr).keys[1]))
    return out


def factorwise(base: Lora, selftrained: Lora, w: float) -> Lora:
    """The *wrong* Neon some ports compute: (1+w)·X_r − w·X_s applied to A and B separately (same
    ranks and scales). Kept only so the tests can show it differs from :func:`neon_cat`."""
    out = Lora(path=selftrained.path, format=selftrained.format)
    for c, m, ls in selftrained.modules():
        lr = base.layers[c][m]
        if lr.rank != ls.rank:
            raise UsageError(f"{selftrained.path}: {c}.{m}: ranks {lr.rank} and {ls.rank}: factor-wise combination needs equal ranks")
        out.layers.setdefault(c, {})[m] = LoraLayer((1 + w) * lr.A.float() - w * ls.A.float(),
                                                  (1 + w) * lr.B.float() - w * ls.B.float(), ls.scale)
    return out


# ------------------------------------------------------------------------------------------------
# θ_s as a state dict, and the adapter attached to a live model (tune-w)


def component_layers(lora: Lora, names: Collection[str] | None = None) -> tuple[str, dict[str, LoraLayer]]:
    """(component, its layers) of the LoRA a single model uses: the only component, else ``unet``.
    ``names``: the model's module paths; a module missing there raises CheckpointError naming its key."""
    comps = list(lora.layers)
    comp = comps[0] if len(comps) == 1 else "unet" if "unet" in comps else None
    if comp is None:
        raise CheckpointError(f"{lora.path}: a LoRA on {', '.join(comps)}; a single model needs one component (or unet)")
    if names is not None:
        for m, l in lora.layers[comp].items():
            if m not in names:
                raise CheckpointError(f"{lora.path}: key {l.keys[0]!r}: the model has no module {m!r}")
    return comp, lora.layers[comp]


def _lora_tensor_names(path: str | Any) -> list[str]:
    """The tensor names of the LoRA file at ``path`` (:func:`lora_file`), from its header only."""
    from neon_cli.checkpoint.safetensors_io import map_file, read_header

    f, _ = lora_file(path)
    buf = map_file(f)
    try:
        return list(read_header(f, buf)[0])
    finally:
        if hasattr(buf, "close"):
            buf.close()


def _header_names_kohya(path: str | Any) -> bool:
    """True when the LoRA file's tensor names are kohya's (``lora_unet_*``, ``lora_te*_*``); header only."""
    return any(n.startswith(tuple(KOHYA_PREFIXES)) for n in _lora_tensor_names(path))


def lora_state_dict(base_sd: Mapping[str, Any], path: str | Any) -> dict[str, Any]:
    """θ_s = θ_r + s·B·A as a state dict (``base_sd`` name -> tensor; LoRA'd weights computed in
    float32 and cast to their dtype, the others shared with ``base_sd``): the fallback that lets
    any family merge a LoRA snapshot like a full one. The LoRA's module paths are matched as they
    are, or under ``"<component>."`` when every one is found there (a model whose state dict keeps
    its component's name, e.g. the t2i family's ``unet.*``); a kohya file's names are resolved against
    those modules (taken as the UNet's). CheckpointError naming a LoRA key whose
    module is not in ``base_sd`` or whose shape differs."""
    import torch

    mods = {n[: -len(".weight")] for n in base_sd if n.endswith(".weight")}
    if _header_names_kohya(path):  # underscored names: resolved against the model's modules (under 'unet.' if it has them)
        under = {n[len("unet."):] for n in mods if n.startswith("unet.")}
        lora = read_lora(path, {"unet": under or mods})
    else:
        lora = read_lora(path, None)
    comp, layers = component_layers(lora)
    # a model whose state dict names its component (the t2i family's ``unet.*``): match under that prefix
    pre = comp + "." if not all(m in mods for m in layers) and all(f"{comp}.{m}" in mods for m in layers) else ""
    _, layers = component_layers(lora, {n[len(pre):] for n in mods if n.startswith(pre)})
    out = dict(base_sd)
    for m, l in layers.items():
        w = base_sd[pre + m + ".weight"]
        if tuple(w.shape) != l.weight_shape():
            raise CheckpointError(f"{path}: key {l.keys[0]!r}: B·A is {l.weight_shape()}, {m}.weight is {tuple(w.shape)}")
        cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
        out[pre + m + ".weight"] = (w.to(cdt) + l.delta().to(device=w.device, dtype=cdt)).to(w.dtype)
    return out


ADAPTER = "neon"


def attach_lora(model: Any, path: str | Any, scale: float = 1.0, adapter: str = ADAPTER, *, lora: Lora | None = None) -> Any:
    """Attach a LoRA file to ``model`` (any torch module whose module paths are the LoRA's) with
    peft, unmerged, at ``scale``: forward uses W + scale·s·B·A. peft ``inject_adapter_in_model``
    with one ``LoraConfig`` (target_modules = the LoRA's modules, rank_pattern / alpha_pattern per
    module, alpha = scale·r so the file's s is kept exactly), ``set_peft_model_state_dict``, then
    :func:`set_lora_scale`. ``lora``: the file already read (:func:`read_lora` with the model's
    module names, which resolves kohya names); default: read ``path`` as it is. Returns ``model``
    (modified in place). CheckpointError for a module the model lacks."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    names = {n for n, _ in model.named_modules()}
    _, layers = component_layers(read_lora(path, None) if lora is None else lora, names)
    ranks = Counter(l.rank for l in layers.values())
    r = ranks.most_common(1)[0][0]
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(layers),
                     rank_pattern={re.escape(m): l.rank for m, l in layers.items() if l.rank != r},
                     alpha_pattern={re.escape(m): l.scale * l.rank for m, l in layers.items()})
    inject_adapter_in_model(cfg, model, adapter_name=adapter)
    sd = {}
    for m, l in layers.items():
        sd[f"{m}.lora_A.weight"] = l.A
        sd[f"{m}.lora_B.weight"] = l.B
    res = set_peft_model_state_dict(model, sd, adapter_name=adapter)
    missing = [k for k in getattr(res, "unexpected_keys", []) or [] if "lora_" in k]
    if missing:
        raise CheckpointError(f"{path}: key {missing[0]!r} was not loaded into the model")
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.scaling and name in layers:
            mod._neon_s = float(layers[name].scale)  # the file's s, exactly (peft would compute alpha / r)
    set_lora_scale(model, scale, adapter)
    return model


def set_lora_scale(model: Any, scale: float, adapter: str = ADAPTER) -> Any:
    """Re-scale the attached LoRA: every peft ``LoraLayer`` of ``adapter`` gets scaling = scale·s
    (s = the file's alpha/r), i.e. forward W + scale·s·B·A; no weight is merged. Returns ``model``."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for mod in model.modules():
        if isinstance(mod, LoraLayer) and adapter in mod.scaling:
            mod.scaling[adapter] = float(scale) * mod._neon_s
            n += 1
    if n == 0:
        raise UsageError(f"set_lora_scale: the model has no LoRA adapter {adapter!r} (attach_lora first)")
    return model


# ------------------------------------------------------------------------------------------------
# writing a LoRA file


def lora_tensors(lora: Lora, fmt: str, components: Collection[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, safetensors metadata) of ``lora`` in ``fmt``:

    * ``"diffusers"``: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` and the header
      entry ``lora_adapter_metadata`` (diffusers' ``save_lora_weights(..., unet_lora_adapter_metadata=)``
      layout): per component ``r`` and ``lora_alpha`` (most common), ``rank_pattern`` /
      ``alpha_pattern`` (full module paths) for the others, ``target_modules``, ``use_rslora``;
      ``pipe.load_lora_weights`` builds exactly these scales;
    * ``"kohya"``: ``lora_unet_<module, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` /
      ``.alpha`` (``lora_te_`` for ``text_encoder``, ``lora_te1_``/``lora_te2_`` when both text
      encoders are present), the layout of kohya sd-scripts ``networks/lora.py`` that A1111, ComfyUI
      and diffusers' ``_convert_non_diffusers_lora_to_diffusers`` read; scale = alpha / r, so an
      rslora layer is written with alpha = scale·r.
    """
    import torch

    if fmt not in LORA_FORMATS:
        raise UsageError(f"--lora-format {fmt}: choose one of {', '.join(LORA_FORMATS)}")
    tensors: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    if fmt == "diffusers":
        for comp, mods in lora.layers.items():
            for m, l in mods.items():
                tensors[f"{comp}.{m}.lora_A.weight"] = l.A.contiguous()
                tensors[f"{comp}.{m}.lora_B.weight"] = l.B.contiguous()
            ranks = Counter(l.rank for l in mods.values())
            r = ranks.most_common(1)[0][0]
            alphas = {m: (l.alpha if l.alpha is not None else float(l.rank)) for m, l in mods.items()}
            rs = {l.rslora for l in mods.values()}
            if len(rs) > 1:  # mixed: write plain alpha/r with alpha = scale * r
                alphas = {m: l.scale * l.rank for m, l in mods.items()}
                rs = {False}
            alpha = Counter(alphas.values()).most_common(1)[0][0]
            cfg = {"r": r, "lora_alpha": alpha, "target_modules": sorted(mods), "use_rslora": rs.pop(),
                   "rank_pattern": {re.escape(m): l.rank for m, l in mods.items() if l.rank != r},
                   "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
                   "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True, "use_dora": False}
            meta.update({f"{comp}.{k}": v for k, v in cfg.items()})
        return tensors, {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
    both_te = "text_encoder_2" in lora.layers or (components is not None and "text_encoder_2" in components)
    pre = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if both_te else "lora_te_", "text_encoder_2": "lora_te2_"}
    for comp, mods in lora.layers.items():
        if comp not in pre:
            raise UsageError(f"--lora-format kohya: component {comp!r} has no kohya prefix (unet, text_encoder, text_encoder_2)")
        for m, l in mods.items():
            name = pre[comp] + m.replace(".", "_")
            alpha = l.scale * l.rank if (l.rslora or l.alpha is None) else l.alpha
            tensors[f"{name}.lora_down.weight"] = l.A.contiguous()
            tensors[f"{name}.lora_up.weight"] = l.B.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors, {"format": "pt", "ss_network_module": "networks.lora"}


# ------------------------------------------------------------------------------------------------
# the command


def _base_modules(base: Path) -> tuple[dict[str, Path], dict[str, dict[str, Any]], dict[str, Any] | None]:
    """({component: weights file}, {component: {weight name: spec}}, unet config) of a pipeline or model folder.

    A model folder holding weights itself (a bare ``unet/``) is the component ``unet``."""
    from neon_cli.checkpoint import components, open_checkpoint, weights_file

    if not base.is_dir():
        raise UsageError(f"{base}: the base of a LoRA merge must be a diffusers pipeline or model folder")
    comps = components(base)
    if not comps:
        raise CheckpointError(f"{base}: a folder without weights (diffusion_pytorch_model.safetensors, model.safetensors, ...)")
    files, specs = {}, {}
    for c in comps:
        name = "unet" if c == "." else c
        wf = weights_file(base / c)
        with open_checkpoint(wf) as ck:
            specs[name] = {n: ck.specs[n] for n in ck.names()}
        files[name] = wf
    cfgp = (base / "config.json") if comps == ["."] else (base / "unet" / "config.json")
    cfg = json.loads(cfgp.read_text()) if cfgp.is_file() else None
    return files, specs, cfg


def _module_names(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, set[str]]:
    return {c: {n[: -len(".weight")] for n in s if n.endswith(".weight")} for c, s in specs.items()}


def _check_shapes(lora: Lora, specs: Mapping[str, Mapping[str, Any]]) -> None:
    for c, m, l in lora.modules():
        spec = specs[c][m + ".weight"]
        if tuple(spec.shape) != l.weight_shape():
            raise CheckpointError(f"{lora.path}: key {l.keys[0]!r}: B·A is {l.weight_shape()}, the base's {c} "
                                  f"{m}.weight is {tuple(spec.shape)}")


def _write_lora_file(lora: Lora, out: Path, fmt: str, comps: Collection[str], extra_meta: Mapping[str, str]) -> str:
    from neon_cli.checkpoint.safetensors_io import save_safetensors
    from neon_cli.fsutil import atomic_path

    tensors, meta = lora_tensors(lora, fmt, comps)
    with atomic_path(out) as tmp:
        return save_safetensors(tensors, tmp, {**meta, **extra_meta})


@dataclass
class _LoraJob:
    """One checked ``neon merge`` with θ_s a LoRA: the values :func:`merge_lora` writes from.

    ``files``: θ_r's component weight files (empty for a LoRA θ_r); ``comps``: the components
    written; ``ls``/``lr``: θ_s's LoRA and θ_r's (None unless θ_r is a LoRA); ``odt``: the output
    dtype of fused floating tensors (None: θ_r's); ``t0``: ``time.perf_counter()`` at the start."""

    base_p: Path
    lora_p: Path
    ws: list[float]
    outs: list[Path]
    as_lora: bool
    lora_format: str
    odt: str | None
    allow_nonfinite: bool
    t0: float
    files: dict[str, Path] = field(default_factory=dict)
    comps: list[str] = field(default_factory=list)
    ls: Lora | None = None
    lr: Lora | None = None


def _fuse_tensor(job: _LoraJob, where: str, w0: Any, layer: LoraLayer, factor: float, out_dtype: str,
                 stats: dict[str, Any]) -> Any:
    """W + factor·s·B·A of one weight in float32 (float64 for float64), cast once to ``out_dtype``;
    UsageError starting with ``where`` (``-o OUT: COMPONENT TENSOR``) for new non-finite values (unless allowed)."""
    import torch

    from neon_cli.checkpoint.core import to_torch_dtype

    cdt = torch.float64 if w0.dtype == torch.float64 else torch.float32
    d = layer.delta(factor).to(cdt)
    res = (w0.to(cdt) + d).to(to_torch_dtype(out_dtype))
    bad = int((~torch.isfinite(res) & torch.isfinite(w0)).sum())
    if bad and not job.allow_nonfinite:
        raise UsageError(f"{where}: {bad} merged value(s) are not finite in "
                         f"{out_dtype} (w={-factor:g}); try --dtype float32, a smaller --w, or "
                         "--allow-nonfinite to write them anyway")
    stats["nonfinite"] = stats.get("nonfinite", 0) + bad
    stats["fused"] += 1
    stats["max_abs_delta"] = max(stats["max_abs_delta"], float(d.abs().max()))
    return res


def _fuse_component(job: _LoraJob, comp: str, factor: float, out: Path, tmp: Path, extra_meta: Mapping[str, str],
                    progress: ProgressFn, stats: dict[str, Any]) -> None:
    """Write component ``comp`` of θ_r into ``tmp`` as safetensors, each module θ_s's LoRA has there fused."""
    from neon_cli.checkpoint import TensorSpec, open_checkpoint
    from neon_cli.checkpoint.core import is_floating, to_torch, to_torch_dtype
    from neon_cli.checkpoint.safetensors_io import SafetensorsWriter

    mods = job.ls.layers[comp]
    src = job.files[comp]
    rel = src.parent.relative_to(job.base_p)
    fname = "model.safetensors" if src.name.startswith("model") else "diffusion_pytorch_model.safetensors"
    (tmp / rel).mkdir(parents=True, exist_ok=True)
    odt = job.odt
    with open_checkpoint(src) as ck:
        specs = [ck.specs[n] for n in ck.names()]
        outspecs = [TensorSpec(s.name, odt if (odt and is_floating(s.dtype)) else s.dtype, s.shape) for s in specs]
        meta = dict(ck.metadata or {}) if ck.layout == "safetensors" else {}
        writer = SafetensorsWriter(tmp / rel / fname, outspecs, {**meta, **extra_meta}, hash=False)
        try:
            by_name = {s.name: s for s in specs}
            for k, spec in enumerate(writer.order):
                s_in = by_name[spec.name]
                arr = ck.array(spec.name)
                mod = spec.name[: -len(".weight")] if spec.name.endswith(".weight") else None
                if mod in mods:
                    writer.write(spec.name, _fuse_tensor(job, f"-o {out}: {comp} {spec.name}", to_torch(arr, s_in.dtype),
                                                         mods[mod], factor, spec.dtype, stats))
                elif spec.dtype != s_in.dtype:
                    writer.write(spec.name, to_torch(arr, s_in.dtype).to(to_torch_dtype(spec.dtype)))
                else:
                    writer.write(spec.name, arr)
                progress("merge", k + 1, len(writer.order), component=comp)
            writer.close()
        except BaseException:
            writer.abort()
            raise


def _write_fused(job: _LoraJob, factor: float, out: Path, extra_meta: Mapping[str, str],
                 progress: ProgressFn) -> dict[str, Any]:
    """θ_r's folder with each LoRA'd component's weights replaced by W + factor·s·B·A (float32, cast once)."""
    from neon_cli.fsutil import atomic_path
    from neon_cli.merge import _copy_tree

    lora = job.ls
    stats: dict[str, Any] = {"fused": 0, "max_abs_delta": 0.0}
    warnings: list[str] = []
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for comp in lora.layers:
            _fuse_component(job, comp, factor, out, tmp, extra_meta, progress, stats)
        for comp, src in job.files.items():  # components without a LoRA: θ_r's weights as they are
            if comp in lora.layers:
                continue
            rel = src.parent.relative_to(job.base_p)
            names = [src.name]
            if src.name.endswith(".index.json"):
                from neon_cli.checkpoint.folders import read_index

                names += sorted(set(read_index(src)[0].values()))
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for n in names:
                shutil.copyfile(src.parent / n, tmp / rel / n)
        _copy_tree(job.base_p, tmp, set(lora.layers), warnings)
    stats["warnings"] = warnings
    return stats


def _lora_job(request: Any) -> _LoraJob:
    """The checked :class:`_LoraJob` of a :class:`~neon_cli.requests.MergeRequest` whose θ_s is a
    LoRA (flags and outputs; nothing read beyond the file names); UsageError/CheckpointError as
    :func:`merge_lora` documents."""
    from neon_cli.checkpoint import parse_dtype
    from neon_cli.fsutil import check_outputs
    from neon_cli.merge import _check_w

    t0 = time.perf_counter()
    o = request.options
    base_p, lora_p = Path(request.base), Path(request.selftrained)
    ws = [_check_w(w) for w in request.ws]
    outs = [Path(x) for x in request.outputs]
    if not ws or len(ws) != len(outs):
        raise UsageError("-o: one output per weight; use '{w}' in -o for several weights")
    if o.lora_format not in LORA_FORMATS:
        raise UsageError(f"--lora-format {o.lora_format}: choose one of {', '.join(LORA_FORMATS)}")
    odt = parse_dtype(o.dtype)
    for p in (base_p, lora_p):
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
    base_is_lora = is_lora(base_p)
    if not is_lora(lora_p):
        raise UsageError(f"{lora_p}: theta_s is not a LoRA (.safetensors with lora_A/lora_B or lora_down/lora_up keys), "
                         f"but the base {base_p} is one: give two LoRAs, or a checkpoint pair")
    as_lora = o.as_lora or base_is_lora
    for out in outs:
        if as_lora and out.suffix != ".safetensors":
            raise UsageError(f"-o {out}: a LoRA output is a .safetensors file")
        if not as_lora and (out.suffix or out.is_file()):
            raise UsageError(f"-o {out}: the fused output is a pipeline folder (no file suffix); or add --as-lora for a LoRA file")
        if not as_lora and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"-o {out}: exists and is not an empty folder; remove it or choose another output")
        if out.is_dir() and as_lora:
            raise UsageError(f"-o {out}: is a folder; give a .safetensors file name")
    check_outputs({"base": base_p, "selftrained": lora_p}, {"-o": outs, "--report": request.report})
    if odt is not None and as_lora:
        raise UsageError("--dtype: applies to the fused pipeline; a LoRA output keeps the factors' dtypes")
    job = _LoraJob(base_p, lora_p, ws, outs, as_lora, o.lora_format, odt, o.allow_nonfinite, t0)
    job.lr = read_lora(base_p) if base_is_lora else None
    return job


def _read_pair(job: _LoraJob, results: dict[str, Any]) -> None:
    """Read θ_s's LoRA (and θ_r's, or θ_r's module names and shapes) into ``job``; the formula into
    ``results``. CheckpointError naming the LoRA key for a module or shape θ_r lacks."""
    if job.lr is not None:
        lr, ls = job.lr, read_lora(job.lora_p)
        for c, m, l in lr.modules():
            if c in ls.layers and m in ls.layers[c] and l.weight_shape() != ls.layers[c][m].weight_shape():
                raise CheckpointError(f"{job.lora_p}: key {ls.layers[c][m].keys[0]!r}: shape differs from the base LoRA's")
        job.files, job.comps = {}, sorted(set(lr.layers) | set(ls.layers))
        results["formula"] = "W0 + (1+w) s_r B_r A_r - w s_s B_s A_s (cat LoRA, scale 1)"
    else:
        files, specs, ucfg = _base_modules(job.base_p)
        ls = read_lora(job.lora_p, _module_names(specs), ucfg)
        _check_shapes(ls, specs)
        job.files, job.comps = files, sorted(files)
        results["formula"] = FORMULA
    job.ls = ls


def merge_lora(request: Any, report: Any = None, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """``neon merge BASE LORA --w W``: Neon with θ_s = θ_r + s·B·A (exact; paper Alg. 1, last step).

    ``request``: a :class:`~neon_cli.requests.MergeRequest`; the fields used:

        base: θ_r: a diffusers pipeline folder (``unet/``, ``text_encoder/``, ...) or a bare model
            folder (taken as the UNet); or a LoRA itself (θ_r = W0 + s_r·B_r·A_r on a checkpoint W0):
            then the output is the exact ``cat`` LoRA of :func:`neon_cat` (``as_lora`` implied; a
            kohya base LoRA cannot be resolved without W0 and is refused).
        selftrained: θ_s as a LoRA on θ_r (file or folder; formats in :func:`read_lora`).
        ws, outputs: one output per w; report: the ``--report`` path (checked against the others).
        options.as_lora: write a LoRA with −w folded into B (:func:`negated`) in ``options.lora_format``
            (``"diffusers"`` or ``"kohya"``; see :func:`lora_tensors`) instead of the fused folder.
        options.dtype: output dtype of the floating tensors of the components the LoRA touches (default
            θ_r's; the other components are copied as they are); the merge is
            W + (B @ A)·(−w·s) in float32 (float64 for float64), cast once: diffusers'
            ``fuse_lora(lora_scale=-w)`` (peft ``LoraLayer.merge``), which for a float32 θ_r gives
            the same values (tested); for a half-precision θ_r peft rounds the delta to the
            weight's dtype before adding it (two roundings), neon rounds once.
        options.dry_run: check everything (formats, module names, shapes, outputs) and write nothing.
        options.allow_nonfinite: write a fused weight with new inf/NaN elements (default: UsageError naming
            the tensor, as ``neon merge``; nothing is left behind).

    Output: the fused pipeline folder (θ_r's folder, configs copied, each LoRA'd component's weights
    rewritten as safetensors, the header carrying ``neon.*`` provenance) or a ``.safetensors`` LoRA.
    Each output is written under a temporary name and renamed when complete. Returns and fills
    ``report.results``. Raises UsageError (bad flags/outputs), CheckpointError (unknown LoRA key,
    missing module, shape mismatch: the key named).
    """
    job = _lora_job(request)
    results: dict[str, Any] = report.results if report is not None else {}
    _read_pair(job, results)
    ls = job.ls
    results.update({
        "w": job.ws, "dry_run": bool(request.options.dry_run), "lora_format_in": ls.format,
        "output_kind": ("lora-" + job.lora_format) if job.as_lora else "fused-folder",
        "lora_modules": {c: len(m) for c, m in ls.layers.items()}, "lora_ranks": ls.ranks(),
        "lora_scales": sorted({round(l.scale, 6) for _, _, l in ls.modules()}),
    })
    if request.options.dry_run:
        results["outputs"] = [{"w": w, "path": str(o)} for w, o in zip(job.ws, job.outs)]
        results["seconds"] = round(time.perf_counter() - job.t0, 3)
        return results
    import contextlib

    from neon_cli.fsutil import exclusive_lock, lock_path, remove_stale_tmp

    with contextlib.ExitStack() as stack:
        for o in job.outs:
            remove_stale_tmp(o)
            stack.enter_context(exclusive_lock(o, f"-o {o}", folder=False))
            stack.callback(lambda p=lock_path(o, False): p.unlink(missing_ok=True))
        return _write_outputs(job, results, report, progress)


def _write_outputs(job: _LoraJob, results: dict[str, Any], report: Any, progress: ProgressFn) -> dict[str, Any]:
    """Write one output per w of ``job`` (cat LoRA, negated LoRA or fused folder), the provenance in
    each header; fill ``results`` (and the report's inputs and outputs)."""
    from neon_cli.fsutil import sha256_path

    base_p, lora_p, ls, lr = job.base_p, job.lora_p, job.ls, job.lr
    prov = {"neon.formula": results["formula"], "neon.base": base_p.name, "neon.selftrained": lora_p.name,
            "neon.base_sha256": sha256_path(base_p), "neon.selftrained_sha256": sha256_path(lora_p)}
    if report is not None:
        report.inputs.append({"role": "base", "path": str(base_p), "sha256": prov["neon.base_sha256"]})
        report.inputs.append({"role": "selftrained", "path": str(lora_p), "sha256": prov["neon.selftrained_sha256"]})
    res_outs = []
    for w, o in zip(job.ws, job.outs):
        meta = {**prov, "neon.w": repr(float(w))}
        if lr is not None:
            cat = neon_cat(lr, ls, w)
            _write_lora_file(cat, o, job.lora_format, job.comps, meta)
            info: dict[str, Any] = {"ranks": cat.ranks()}
        elif job.as_lora:
            _write_lora_file(negated(ls, w), o, job.lora_format, job.comps, meta)
            info = {}
        else:
            info = _write_fused(job, -float(w), o, meta, progress)
        if report is not None:
            report.add_output("merged", o)
        res_outs.append({"w": w, "path": str(o), **info})
    results["outputs"] = res_outs
    results["seconds"] = round(time.perf_counter() - job.t0, 3)
    return results
