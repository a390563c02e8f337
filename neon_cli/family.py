"""The family plugin protocol and its discovery through the entry-point group ``neon.families``.

A *family* is one object that knows how to load, save, sample, train and score one kind of
generator (EDM-style denoiser on digits, a diffusers UNet, a flow-matching UNet, ...). The core
(merge, tune-w, synth/finetune orchestration, reports) never imports a family's modules; it only
calls the methods below. Built-in families under ``plugins/`` register through the same entry-point
group as third-party packages::

    # pyproject.toml of a plugin distribution
    [project.entry-points."neon.families"]
    myfam = "my_package:family"          # an object satisfying :class:`Family`

Loading a plugin module must be cheap (no torch import at module level): ``neon plugins`` and
shell completion load entry points.

Environment: ``NEON_FAMILIES=a,b`` loads only those families (``""`` loads none); handy for
isolating a broken plugin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from neon_cli.errors import FamilyError

ENTRY_POINT_GROUP = "neon.families"


@dataclass(frozen=True)
class Setting:
    """One inference setting κ a family understands (e.g. CFG scale, ODE steps, temperature).

    ``type`` is one of int, float, str, bool. ``low``/``high`` are inclusive bounds for numbers.
    """

    name: str
    default: Any
    type: type = float
    help: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None

    def parse(self, text: str) -> Any:
        """Parse ``text`` from ``--set NAME=TEXT``; raises :class:`FamilyError` naming the key."""
        try:
            if self.type is bool:
                low = text.strip().lower()
                if low not in {"1", "0", "true", "false", "yes", "no"}:
                    raise ValueError(text)
                value: Any = low in {"1", "true", "yes"}
            else:
                value = self.type(text)
        except ValueError:
            raise FamilyError(f"--set {self.name}: expected {self.type.__name__}, got {text!r}") from None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Raise :class:`FamilyError` if ``value`` is outside the documented range or choices."""
        if self.choices is not None and value not in self.choices:
            raise FamilyError(f"--set {self.name}: {value!r} is not one of {list(self.choices)}")
        if self.low is not None and value < self.low:
            raise FamilyError(f"--set {self.name}: {value} is below the minimum {self.low}")
        if self.high is not None and value > self.high:
            raise FamilyError(f"--set {self.name}: {value} is above the maximum {self.high}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "low": self.low,
            "high": self.high,
            "choices": list(self.choices) if self.choices is not None else None,
            "help": self.help,
        }


@runtime_checkable
class Family(Protocol):
    """What a generator family provides. Shapes and dtypes are part of the contract.

    Attributes:
        name: the name users type (``neon synth NAME``).
        description: one line.
        settings: the inference settings κ (:class:`Setting`), with defaults.
        guidance: name of the guidance-scale setting γ (searched by ``tune-w --gamma``), or None.
        num_classes: number of class labels, 0 for unconditional families.
        default_model: path of an embedded default checkpoint, or None.
        metrics: names returned by :meth:`score`; the first is the default objective.
        train_defaults: family recipe defaults for fine-tuning: ``batch`` (images per step), ``lr``,
            optional ``ema_halflife_images`` (None: no EMA) and ``warmup_images``.

    Methods (all may raise :class:`~neon_cli.errors.NeonError` subclasses, never exit):
        load(path) -> torch.nn.Module in eval mode, on CPU. Raises CheckpointError.
        save(model, path, metadata) -> None: write the family's native checkpoint at ``path``
            (the core passes a temporary name and renames it). ``metadata``: str -> str.
        read_metadata(path) -> dict[str, str]: the checkpoint's metadata (e.g. ``train_images``,
            the base training budget in images seen).
        sample(model, seeds, labels, settings) -> uint8 tensor N x C x H x W. ``seeds``: int64 [N];
            ``labels``: int64 [N] or None. Image i must depend only on seeds[i], labels[i] and
            settings (not on N or on the other seeds): this is what makes synth resumable and
            identical across ranks, and tune-w's common random numbers possible.
        loss(model, images, labels, generator) -> scalar float tensor: the family's training
            objective (its original recipe) on a batch of uint8 images N x C x H x W.
        make_optimizer(params, lr) -> torch.optim.Optimizer (the family's recipe, e.g. Adam).
        score(images, labels) -> dict[str, float]: the family's metrics (lower is better for
            distances; see ``metrics``) of uint8 samples against its reference data.

    Optional:
        checkpoint_suffix: suffix of the snapshots ``neon finetune`` writes (default
            ``".safetensors"``; ``""`` for families whose checkpoints are folders).
        model_num_classes(path) -> int: classes of the model at ``path`` when they vary between
            models of the family (default: ``num_classes``).
        score_model(model, settings) -> dict[str, float]: exact metrics computed from the model
            itself (e.g. the Gaussian toys' closed forms); the Evaluator prefers it to sampling.
        real_samples(model, n, seed) -> (samples, labels): real data for ``neon align``.

    ``sample`` may return non-image tensors (the Gaussian families return float32 [N, D]); the
    core stores and trains on whatever the family samples.
    """

    name: str
    description: str
    settings: Sequence[Setting]
    guidance: str | None
    num_classes: int
    default_model: str | None
    metrics: Sequence[str]
    train_defaults: Mapping[str, Any]

    def load(self, path: str) -> Any: ...
    def save(self, model: Any, path: str, metadata: Mapping[str, str]) -> None: ...
    def read_metadata(self, path: str) -> dict[str, str]: ...
    def sample(self, model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> Any: ...
    def loss(self, model: Any, images: Any, labels: Any, generator: Any) -> Any: ...
    def make_optimizer(self, params: Any, lr: float) -> Any: ...
    def score(self, images: Any, labels: Any) -> dict[str, float]: ...


_REQUIRED = ("name", "settings", "num_classes", "load", "save", "sample", "loss", "make_optimizer", "score")


@dataclass
class PluginInfo:
    """One entry point of the ``neon.families`` group, loaded or not."""

    name: str
    value: str
    distribution: str | None
    version: str | None
    family: Any = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        fam = self.family
        return {
            "name": self.name,
            "entry_point": self.value,
            "distribution": self.distribution,
            "version": self.version,
            "loaded": fam is not None,
            "error": self.error,
            "description": getattr(fam, "description", None),
            "num_classes": getattr(fam, "num_classes", None),
            "guidance": getattr(fam, "guidance", None),
            "metrics": list(getattr(fam, "metrics", []) or []),
            "default_model": getattr(fam, "default_model", None),
            "settings": [s.to_json() for s in getattr(fam, "settings", [])] if fam is not None else [],
        }


def _allowed() -> set[str] | None:
    raw = os.environ.get("NEON_FAMILIES")
    if raw is None:
        return None
    return {x.strip() for x in raw.split(",") if x.strip()}


def entry_points() -> list[metadata.EntryPoint]:
    """The ``neon.families`` entry points visible on ``sys.path`` (first one wins per name)."""
    seen: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        seen.setdefault(ep.name, ep)
    allow = _allowed()
    return [ep for name, ep in sorted(seen.items()) if allow is None or name in allow]


def family_names() -> list[str]:
    """Names of the installed families, without importing them (used by shell completion)."""
    return [ep.name for ep in entry_points()]


def discover() -> dict[str, PluginInfo]:
    """Load every ``neon.families`` entry point; a broken plugin is reported, not raised."""
    out: dict[str, PluginInfo] = {}
    for ep in entry_points():
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, ep.value, getattr(dist, "name", None), getattr(dist, "version", None))
        try:
            obj = ep.load()
            check_family(obj, ep.name)
            info.family = obj
        except Exception as exc:  # a plugin must not break the CLI
            info.error = f"{type(exc).__name__}: {exc}"
        out[ep.name] = info
    return out


def check_family(obj: Any, name: str) -> None:
    """Raise :class:`FamilyError` if ``obj`` lacks what :class:`Family` requires."""
    missing = [a for a in _REQUIRED if not hasattr(obj, a)]
    if missing:
        raise FamilyError(f"family {name!r}: plugin object lacks {', '.join(missing)}")


def get_family(name: str) -> Any:
    """The loaded family ``name``; raises :class:`FamilyError` listing the installed ones."""
    eps = {ep.name: ep for ep in entry_points()}
    if name not in eps:
        known = ", ".join(eps) or "none"
        raise FamilyError(f"unknown family {name!r} (installed: {known}; see 'neon plugins')")
    try:
        obj = eps[name].load()
    except Exception as exc:
        raise FamilyError(f"family {name!r} failed to load from {eps[name].value}: {exc}") from exc
    check_family(obj, name)
    return obj


def plugin_version(name: str) -> dict[str, Any]:
    """``{"name", "distribution", "version"}`` of family ``name`` for reports."""
    for ep in entry_points():
        if ep.name == name:
            dist = getattr(ep, "dist", None)
            return {"name": name, "distribution": getattr(dist, "name", None), "version": getattr(dist, "version", None)}
    return {"name": name, "distribution": None, "version": None}


def model_path(family: Any, path: Any = None, flag: str = "--model") -> Path:
    """``path`` as a Path, or the family's embedded default when None.

    Raises :class:`~neon_cli.errors.UsageError` naming ``flag`` when ``path`` is None and the
    family has no default, or when the file or folder does not exist.
    """
    from neon_cli.errors import UsageError

    if path is None:
        if not getattr(family, "default_model", None):
            raise UsageError(f"{flag}: family {family.name!r} has no embedded default; give a checkpoint")
        return Path(family.default_model)
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag}: {path} does not exist")
    return path


def resolve_settings(family: Any, pairs: Sequence[str] = (), overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Family defaults updated by ``--set KEY=VALUE`` strings and then by ``overrides``.

    Raises :class:`FamilyError` naming the key for an unknown key, a malformed pair, or a value
    outside the setting's range.
    """
    specs = {s.name: s for s in family.settings}
    out = {s.name: s.default for s in family.settings}
    for pair in pairs:
        if "=" not in pair:
            raise FamilyError(f"--set {pair!r}: expected KEY=VALUE")
        key, text = pair.split("=", 1)
        key = key.strip()
        if key not in specs:
            raise FamilyError(f"--set {key}: family {family.name!r} has no setting {key!r} (known: {', '.join(specs) or 'none'})")
        out[key] = specs[key].parse(text.strip())
    for key, value in (overrides or {}).items():
        if key not in specs:
            raise FamilyError(f"setting {key!r}: family {family.name!r} has no such setting")
        specs[key].check(value)
        out[key] = value
    return out
