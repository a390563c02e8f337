"""CLIP score of images against their prompts, with a local CLIP checkpoint folder (``$NEON_CLIP``).

Definition (Hessel et al. 2021, CLIPScore, with torchmetrics' scale 100 in place of 2.5): for
each image x with prompt c, ``100 * max(cos(E_I(x), E_T(c)), 0)`` with E_I / E_T the CLIP model's
projected image and text embeddings (``CLIPModel.get_image_features`` / ``get_text_features``,
inputs prepared by the folder's ``CLIPProcessor``: resize, centre crop, normalise; text truncated
to the model's length), averaged over the images. torchmetrics' ``CLIPScore`` clamps the mean
instead of each image (``max(mean cos, 0)``): the two agree whenever no cosine is negative.
Nothing is downloaded: the folder must hold the model and processor files (``save_pretrained``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from neon_cli.errors import UsageError

ENV = "NEON_CLIP"


def clip_path() -> Path | None:
    """``$NEON_CLIP`` as a Path (None when unset); UsageError naming the variable when missing."""
    raw = os.environ.get(ENV, "")
    if not raw:
        return None
    p = Path(raw)
    if not p.is_dir():
        raise UsageError(f"{ENV}: {p} is not a folder (a CLIP checkpoint saved with save_pretrained)")
    return p


class ClipScorer:
    """``CLIPModel`` + ``CLIPProcessor`` from a local folder, scoring uint8 images [N, 3, H, W]."""

    def __init__(self, path: str | Path, device: Any = None):
        import torch
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
            raise UsageError(f"{ENV}: {path}: cannot load a CLIPModel and CLIPProcessor ({type(exc).__name__}: {first})") from None
        self.device = device or torch.device("cpu")
        self.model.to(self.device)
        self.path = str(path)

    def per_image(self, images: Any, texts: list[str], batch: int = 64) -> Any:
        """float64 numpy [N]: ``100 * max(cos, 0)`` of each image with its text."""
        import numpy as np
        import torch

        arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        if len(texts) != len(arr):
            raise UsageError(f"clip_score: {len(arr)} images but {len(texts)} prompts")
        out = []
        with torch.inference_mode():
            for a in range(0, len(arr), batch):
                pics = [x.transpose(1, 2, 0) for x in arr[a:a + batch]]
                inp = self.processor(text=texts[a:a + batch], images=pics, return_tensors="pt", padding=True, truncation=True)
                inp = {k: v.to(self.device) for k, v in inp.items()}
                img = _features(self.model.get_image_features(pixel_values=inp["pixel_values"]))
                txt = _features(self.model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp.get("attention_mask")))
                cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
                out.append((100 * cos.clamp(min=0)).double().cpu().numpy())
        return np.concatenate(out)

    def __call__(self, images: Any, texts: list[str]) -> float:
        """The mean of :meth:`per_image` (the module's definition)."""
        return float(self.per_image(images, texts).mean())


def _features(out: Any) -> Any:
    """A features tensor from ``get_*_features`` (a tensor, or an output object with ``pooler_output``)."""
    if hasattr(out, "pooler_output") and not hasattr(out, "shape"):
        return out.pooler_output
    return out
