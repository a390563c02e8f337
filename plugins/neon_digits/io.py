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

    def score_jackknife(self, images: torch.Tensor, labels: torch.Tensor | None, groups: Any
                        ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """The metrics of :meth:`__call__` and their leave-one-group-out values (``groups``: index
        arrays, :func:`neon_cli.metrics.balanced_groups`), from one pass of the classifier: the
        Fréchet distances by :func:`neon_cli.metrics.frechet_replicates`, precision/recall/density/
        coverage with the reals' k-NN radii computed once. Returns ``(metrics, {metric: [G values]})``."""
        import numpy as np

        from neon_cli.metrics import frechet_replicates, knn_radii, prdc

        with torch.no_grad():
            feats, logits = self.net(images)
        f = feats.double().numpy()
        pix = images.reshape(-1, 64).double().numpy() / 255.0
        fd, fd_r = frechet_replicates(f, *self.real_stats, groups)
        pf, pf_r = frechet_replicates(pix, *self.real_pix_stats, groups)
        if getattr(self, "_real_radii", None) is None:
            self._real_radii = knn_radii(self.real_feats, 5)
        full: dict[str, float] = {"fd_digits": fd, "pixel_fid": pf, **prdc(self.real_feats, f, k=5, real_radii=self._real_radii)}
        reps: dict[str, list[float]] = {"fd_digits": fd_r, "pixel_fid": pf_r}
        hit = None if labels is None else (logits.argmax(1) == labels).double().numpy()
        if hit is not None:
            full["class_accuracy"] = float(hit.mean())
        n = len(f)
        for idx in groups:
            keep = np.setdiff1d(np.arange(n), idx)
            for k, v in prdc(self.real_feats, f[keep], k=5, real_radii=self._real_radii).items():
                reps.setdefault(k, []).append(v)
            if hit is not None:
                reps.setdefault("class_accuracy", []).append(float(hit[keep].mean()))
        return {k: float(v) for k, v in full.items()}, reps
