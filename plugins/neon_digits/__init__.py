"""The built-in ``digits`` family: an EDM-preconditioned, class-conditional denoiser on
scikit-learn's 1,797 real 8x8 handwritten digits, sampled with EDM's deterministic Heun sampler
and classifier-free guidance gamma. Neon's embedded default: runs on a CPU in seconds.

Registered through the entry-point group ``neon.families`` (see pyproject.toml) like any
third-party family. This module does not import torch; the methods import it when called.

Checkpoint format: a flat ``.safetensors`` state dict of :class:`neon_digits.model.Denoiser`
with metadata ``family=digits``, ``width``, ``depth``, ``train_images`` (training budget of the
weights in images seen, cumulative) and free-form provenance. ``neon merge`` works on it directly.

Metrics (``score``), all against all 1,797 real digits, on the shipped classifier's 64-d features:
``fd_digits`` (Fréchet distance of the features; *not* Inception FID, so not called ``fid``),
``pixel_fid`` (Fréchet distance of the 64 pixel values in [0, 1]),
``precision``/``recall``/``density``/``coverage`` (k = 5), and ``class_accuracy`` (share of
samples the classifier assigns to the label they were drawn for); definitions in
:data:`METRIC_INFO`. ``fid``, this family's name for ``fd_digits`` up to neon 0.1, is accepted as
a deprecated alias (``metric_aliases``) until the next release.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from neon_cli.family import Metric, Setting

WEIGHTS = Path(__file__).resolve().parent / "weights"


#: What the digits metrics are (``neon plugins --json``); shared by the ``autoregressive`` family,
#: which is scored by the same :class:`neon_digits.io.DigitsScorer`.
METRIC_INFO = {
    "fd_digits": Metric("Fréchet distance of the shipped digit classifier's 64-d features, samples vs all 1,797 "
                        "real digits (not Inception FID)"),
    "pixel_fid": Metric("Fréchet distance of the 64 pixel values in [0, 1], samples vs all 1,797 real digits"),
    "precision": Metric("k = 5 precision (Kynkäänniemi et al. 2019) on the classifier's features vs the real digits",
                        higher_is_better=True),
    "recall": Metric("k = 5 recall (Kynkäänniemi et al. 2019) on the classifier's features vs the real digits",
                     higher_is_better=True),
    "density": Metric("k = 5 density (Naeem et al. 2020) on the classifier's features vs the real digits",
                      higher_is_better=True),
    "coverage": Metric("k = 5 coverage (Naeem et al. 2020) on the classifier's features vs the real digits",
                       higher_is_better=True),
    "class_accuracy": Metric("share of samples the shipped classifier assigns to the class they were drawn for",
                             higher_is_better=True),
}
#: Deprecated metric names (up to neon 0.1 ``fd_digits`` was reported as ``fid``); removed in the next release.
METRIC_ALIASES = {"fid": "fd_digits"}


class DigitsFamily:
    name = "digits"
    description = "EDM denoiser + Heun sampler with CFG on scikit-learn's 8x8 digits (embedded default, CPU)"
    settings = (
        Setting("guidance", 2.0, float, "classifier-free guidance scale gamma (1 = none, 0 = unconditional)", low=0.0, high=20.0),
        Setting("steps", 12, int, "Heun steps N (NFE = 2N - 1, doubled with guidance)", low=1, high=1000),
        Setting("rho", 7.0, float, "EDM time-step exponent rho (Eq. 5)", low=1.0, high=100.0),
        Setting("sigma_min", 0.002, float, "smallest noise level", low=1e-5, high=1.0),
        Setting("sigma_max", 80.0, float, "largest noise level", low=1.0, high=1000.0),
    )
    guidance = "guidance"
    num_classes = 10
    metrics = tuple(METRIC_INFO)
    scoring_files = ()  # scored against its own reference: --detector / --ref-stats are refused
    metric_info = METRIC_INFO
    metric_aliases = METRIC_ALIASES
    train_defaults = {"batch": 256, "lr": 2e-4, "ema_halflife_images": None, "warmup_images": 0}
    #: the metrics' definition (classifier, reference set, k, names); bump when it changes (tune-w
    #: cache key). "2": ``fid`` renamed ``fd_digits``.
    metrics_version = "2"
    #: image i depends on seed i alone, bit for bit, whatever the batch (tests/test_tune_cache.py)
    batch_invariant = True

    def __init__(self) -> None:
        self._scorer = None

    @property
    def default_model(self) -> str:
        return str(WEIGHTS / "base.safetensors")

    # -- checkpoints ---------------------------------------------------------------------------
    def load(self, path: str):
        """Denoiser in eval mode from a digits ``.safetensors`` file; CheckpointError if unreadable."""
        from neon_digits.io import load_denoiser

        return load_denoiser(path)

    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None:
        """Write ``model`` as a flat safetensors state dict with ``metadata`` (str -> str)."""
        from neon_digits.io import save_denoiser

        save_denoiser(model, path, metadata)

    def read_metadata(self, path: str) -> dict[str, str]:
        from neon_digits.io import read_metadata

        return read_metadata(path)

    # -- sampling and training -----------------------------------------------------------------
    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]):
        """uint8 [N, 1, 8, 8]; EDM Heun sampler with CFG (see neon_digits.model.heun_sample)."""
        from neon_digits.model import heun_sample

        return heun_sample(model, seeds, labels, settings)

    def loss(self, model: Any, images: Any, labels: Any, generator: Any):
        from neon_digits.model import edm_loss

        return edm_loss(model, images, labels, generator)

    def make_optimizer(self, params: Any, lr: float):
        """Adam (betas 0.9, 0.999, eps 1e-8), as EDM's recipe."""
        import torch

        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)

    def real_samples(self, model: Any, n: int, seed: int):
        """Up to n real digits (uint8 [n, 1, 8, 8], int64 labels [n]) in an order drawn from ``seed``,
        for ``neon align``. The shipped base was trained on all 1,797 digits, so these are its
        training data, not held-out data: the alignment then uses the training-loss gradient."""
        import torch

        from neon_digits.model import real_digits

        images, labels = real_digits()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        return images[order], labels[order]

    # -- metrics -------------------------------------------------------------------------------
    def files_read(self, settings: Any) -> list[tuple[str, Path]]:
        """The shipped classifier that ``score`` loads (not named on the command line)."""
        return [("classifier", WEIGHTS / "classifier.safetensors")]

    def score(self, images: Any, labels: Any) -> dict[str, float]:
        """Metrics of uint8 samples [N, 1, 8, 8] (with their int64 labels [N]) against the real digits."""
        if self._scorer is None:
            from neon_digits.io import DigitsScorer

            self._scorer = DigitsScorer(WEIGHTS / "classifier.safetensors")
        return self._scorer(images, labels)


family = DigitsFamily()
