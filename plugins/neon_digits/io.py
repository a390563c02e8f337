"""Checkpoint I/O and metrics of the digits family (imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from neon_cli.checkpoint import read_safetensors, read_safetensors_metadata, save_safetensors
from neon_cli.errors import CheckpointError, exception_line
from neon_digits.classifier import DigitClassifier
from neon_digits.model import Denoiser, real_digits


def read_metadata(path: str | Path) -> dict[str, str]:
    """safetensors header metadata of ``path``; CheckpointError naming the file if unreadable."""
    return read_safetensors_metadata(path)


def load_denoiser(path: str | Path) -> Denoiser:
    """Denoiser (eval mode, CPU, float32) from a digits checkpoint; CheckpointError on mismatch."""
    state, meta = read_safetensors(path)
    if meta.get("family", "digits") != "digits":
        raise CheckpointError(f"{path}: a {meta.get('family')!r} checkpoint, not a digits one")
    model = Denoiser(width=int(meta.get("width", 256)), depth=int(meta.get("depth", 3)))
    try:
        model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        first = exception_line(exc)
        raise CheckpointError(f"{path}: not a digits denoiser state dict ({first})") from None
    return model.eval()


def save_denoiser(model: Denoiser, path: str | Path, metadata: Mapping[str, str]) -> None:
    """Flat safetensors state dict with family/width/depth metadata added to ``metadata`` (byte-deterministic)."""
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update(family="digits", width=str(model.width), depth=str(model.depth))
    save_safetensors(model.state_dict(), path, meta)


def load_classifier(path: str | Path) -> DigitClassifier:
    state, _ = read_safetensors(path)
    net = DigitClassifier()
    net.load_state_dict(state)
    return net.eval()


class DigitsScorer:
    """Scores uint8 digits [N, 1, 8, 8] against all 1,797 real digits (metrics in the package docstring)."""

    def __init__(self, classifier_path: str | Path):
        from neon_cli.metrics import feature_stats

        self.net = load_classifier(classifier_path)
        real, _ = real_digits()
        with torch.no_grad():
            self.real_feats = self.net(real)[0].double().numpy()
        self.real_stats = feature_stats(self.real_feats)
        self.real_pix_stats = feature_stats(real.reshape(-1, 64).double().numpy() / 255.0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        from neon_cli.metrics import feature_stats, frechet_distance, prdc

        with torch.no_grad():
            feats, logits = self.net(images)
        f = feats.double().numpy()
        out: dict[str, Any] = {"fd_digits": frechet_distance(*feature_stats(f), *self.real_stats)}
        out["pixel_fid"] = frechet_distance(*feature_stats(images.reshape(-1, 64).double().numpy() / 255.0), *self.real_pix_stats)
        out.update(prdc(self.real_feats, f, k=5))
        if labels is not None:
            out["class_accuracy"] = float((logits.argmax(1) == labels).double().mean())
        return {k: float(v) for k, v in out.items()}
