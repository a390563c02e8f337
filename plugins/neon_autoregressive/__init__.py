"""The built-in ``autoregressive`` family: a small class-conditional causal transformer over the
pixel tokens of scikit-learn's 8x8 digits (6 grey levels, raster order, class token first),
sampled with the knobs of VAR/xAR-style samplers: ``temperature``, ``top_k``, ``top_p`` and
classifier-free guidance ``guidance`` (logits (1 + g) cond - g uncond, VAR's form).

Its theory role (Neon paper, App. B.6): temperature < 1, top-k, top-p and CFG are mode-seeking
samplers (Neon's w > 0 expected to help), temperature > 1 diversity-seeking (w < 0).

Checkpoint: flat ``.safetensors`` state dict of :class:`neon_autoregressive.model.PixelTransformer`
with metadata ``family=autoregressive``, ``levels``, ``width``, ``depth``, ``heads``,
``train_images``. The shipped base (``weights/base.safetensors``) is made by
``python -m neon_autoregressive.train`` on 1,600 of the 1,797 digits; the other 197 are held out
(``real_samples``, for ``neon align``).

Metrics: the digits family's (``neon_digits.io.DigitsScorer``, ``neon_digits.METRIC_INFO``:
``fd_digits`` on its classifier's 64-d features against all 1,797 real digits, ``pixel_fid``,
precision/recall/density/coverage, k = 5, ``class_accuracy``; ``fid`` is a deprecated alias of
``fd_digits``, as for digits). Quantising the real digits to 6 levels alone gives fd_digits 0.016.

This module does not import torch; the methods import it when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from neon_cli.family import Setting
from neon_digits import METRIC_ALIASES, METRIC_INFO

WEIGHTS = Path(__file__).resolve().parent / "weights"


class AutoregressiveFamily:
    name = "autoregressive"
    description = "causal transformer over 6-level pixel tokens of the 8x8 digits; temperature, top-k, top-p, CFG (CPU)"
    settings = (
        Setting("temperature", 1.0, float, "softmax temperature tau (< 1 mode-seeking, > 1 diversity-seeking)", low=0.05, high=10.0),
        Setting("top_k", 0, int, "keep the k most likely tokens (0 = off)", low=0, high=1000),
        Setting("top_p", 1.0, float, "nucleus: keep the most likely tokens up to this mass (1 = off)", low=0.01, high=1.0),
        Setting("guidance", 0.0, float, "CFG scale g: logits (1 + g) cond - g uncond (0 = conditional only, VAR's form)",
                low=0.0, high=20.0),
        Setting("guidance_schedule", "constant", str, "g constant, or ramped linearly over the pixels (VAR ramps over scales)",
                choices=("constant", "linear")),
    )
    guidance = "guidance"
    num_classes = 10
    metrics = tuple(METRIC_INFO)
    scoring_files = ()  # scored against its own reference: --detector / --ref-stats are refused
    metric_info = METRIC_INFO
    metric_aliases = METRIC_ALIASES
    #: the metrics' definition (neon_digits.METRIC_INFO); bump when it changes (tune-w cache key).
    #: "2": ``fid`` renamed ``fd_digits`` (none before: the key had no version).
    metrics_version = "2"
    train_defaults = {"batch": 64, "lr": 1e-4, "ema_halflife_images": None, "warmup_images": 0}

    def __init__(self) -> None:
        self._scorer = None

    @property
    def default_model(self) -> str:
        return str(WEIGHTS / "base.safetensors")

    def load(self, path: str):
        """PixelTransformer in eval mode; CheckpointError if unreadable or not this family's."""
        from neon_autoregressive.io import load_model

        return load_model(path)

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        from neon_autoregressive.io import save_model

        save_model(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        from neon_autoregressive.io import read_metadata

        return read_metadata(path)

    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]):
        """uint8 [N, 1, 8, 8]; image i depends only on seeds[i], labels[i] and the settings."""
        from neon_autoregressive.model import ar_sample

        return ar_sample(model, seeds, labels, settings)

    def loss(self, model: Any, images: Any, labels: Any, generator: Any):
        """Next-token cross-entropy (nats per pixel) on uint8 digits [N, 1, 8, 8], label dropout 0.1."""
        from neon_autoregressive.model import ar_loss

        return ar_loss(model, images, labels, generator)

    def make_optimizer(self, params: Any, lr: float):
        """AdamW with VAR's betas (0.9, 0.95) and no weight decay (decay would add a shrink
        towards zero to theta_s - theta_r, which is not the self-training direction)."""
        import torch

        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def files_read(self, settings: Any) -> list[tuple[str, Path]]:
        """The digits family's shipped classifier that ``score`` loads (not named on the command line)."""
        from neon_digits import WEIGHTS as DIGITS_WEIGHTS

        return [("classifier", DIGITS_WEIGHTS / "classifier.safetensors")]

    def score(self, images: Any, labels: Any) -> dict[str, float]:
        """The digits family's metrics of uint8 samples [N, 1, 8, 8] (neon_digits.io.DigitsScorer)."""
        if self._scorer is None:
            from neon_digits import WEIGHTS as DIGITS_WEIGHTS
            from neon_digits.io import DigitsScorer

            self._scorer = DigitsScorer(DIGITS_WEIGHTS / "classifier.safetensors")
        return self._scorer(images, labels)

    def real_samples(self, model: Any, n: int, seed: int):
        """Up to n of the 197 held-out real digits (uint8 [n, 1, 8, 8], int64 labels [n]), in an
        order drawn from ``seed``; never trained on by the shipped base."""
        import torch

        from neon_autoregressive.model import real_digits, split_indices

        images, labels = real_digits()
        _, held = split_indices()
        order = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(seed))][:n]
        return images[order], labels[order]


family = AutoregressiveFamily()
