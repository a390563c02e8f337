"""Checkpoint I/O of the ``autoregressive`` family (imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from neon_autoregressive.model import PixelTransformer
from neon_cli.checkpoint import read_safetensors, read_safetensors_metadata, save_safetensors
from neon_cli.errors import CheckpointError, exception_line

FAMILY = "autoregressive"


def read_metadata(path: str | Path) -> dict[str, str]:
    """safetensors header metadata of ``path``; CheckpointError naming the file if unreadable."""
    return read_safetensors_metadata(path)


def load_model(path: str | Path) -> PixelTransformer:
    """PixelTransformer (eval mode, CPU, float32) from an ``autoregressive`` checkpoint.

    The architecture comes from the metadata keys ``levels``, ``width``, ``depth``, ``heads``.
    Raises CheckpointError naming the file for an unreadable file, another family's checkpoint or
    a state dict that does not fit.
    """
    meta = read_metadata(path)
    if meta.get("family", FAMILY) != FAMILY:
        raise CheckpointError(f"{path}: a {meta.get('family')!r} checkpoint, not an autoregressive one")
    state, _ = read_safetensors(path)
    try:
        model = PixelTransformer(int(meta.get("levels", 6)), int(meta.get("width", 64)), int(meta.get("depth", 3)),
                                 int(meta.get("heads", 4)))
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    except (RuntimeError, ValueError, OSError) as exc:
        first = exception_line(exc)
        raise CheckpointError(f"{path}: not an autoregressive state dict ({first})") from None
    return model.eval()


def save_model(model: PixelTransformer, path: str | Path, metadata: Mapping[str, str]) -> None:
    """Flat safetensors state dict with family/levels/width/depth/heads added to ``metadata``."""
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update(family=FAMILY, levels=str(model.levels), width=str(model.width), depth=str(model.depth),
                heads=str(model.heads))
    save_safetensors(model.state_dict(), path, meta)
