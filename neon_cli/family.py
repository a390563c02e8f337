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
        """Raise :class:`FamilyError` if ``value`` is NaN/inf (numbers), outside the documented
        range or not one of the choices."""
        if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
            raise FamilyError(f"--set {self.name}: must be a finite number, got {value}")
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


@dataclass(frozen=True)
class Metric:
    """What one metric name of a family means (``Family.metric_info``; listed by ``neon plugins``).

    ``definition`` is one line: what is measured, on which features (detector or classifier) and
    against which reference. ``higher_is_better`` gives the direction (tune-w maximises such
    metrics); None for a diagnostic that is no objective (e.g. a ratio best at 1). A metric name says what it is: ``fid`` only for the Fréchet Inception distance of the
    standard detector against named reference statistics; other Fréchet distances get their own
    names (``fd_digits``, ``pixel_fid``, ``frechet``).
    """

    definition: str
    higher_is_better: bool | None = False

    @property
    def direction(self) -> str:
        """``"higher is better"``, ``"lower is better"`` or ``"diagnostic"``."""
        if self.higher_is_better is None:
            return "diagnostic"
        return "higher is better" if self.higher_is_better else "lower is better"

    def to_json(self, name: str) -> dict[str, Any]:
        return {"name": name, "definition": self.definition, "higher_is_better": self.higher_is_better,
                "direction": self.direction}


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
            optional ``ema_halflife_images`` (None: no EMA) and ``warmup_images`` (a number of
            images, or ``"budget"``: the linear ramp spans the whole fine-tune, as the Neon
            paper's VAR and xAR recipes).

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
        train_settings: more :class:`Setting` objects that only ``neon finetune --set`` accepts
            (the recipe's knobs: augmentation probability, dropout, ...).
        recipes: named fine-tuning recipes besides ``"default"`` (``neon finetune --recipe``):
            name -> ``{"about": str, "train": {train_defaults overrides}, "settings": {setting
            defaults}}``; ``resolve_recipe(name, path) -> str`` may map a generic name such as
            ``"paper"`` to one of them from the base checkpoint (:func:`neon_cli.finetune.recipe_plan`).
        load(path, *, settings=None, trust_pickle=False, purpose="sample"): ``load`` may accept
            any of these keywords; :func:`load_model` passes those it declares. ``settings``: the
            resolved settings of the command (``--set``, for finetune including
            ``train_settings``); ``trust_pickle``: the user gave ``--trust-pickle`` (a family whose
            loading runs code from the file must refuse without it, naming the flag);
            ``purpose``: ``"sample"`` (synth, eval, tune-w) or ``"train"`` (finetune, align).
        snapshot_name(images_seen) -> str: file name of the fine-tuning snapshot after
            ``images_seen`` images, in the family's own convention (default
            ``theta_s-%09d`` + ``checkpoint_suffix``).
        checkpoint_suffix: suffix of the snapshots ``neon finetune`` writes (``""`` for families
            whose checkpoints are folders); without it, the suffix of what ``save`` writes
            (``.safetensors``, ``.pt`` for a torch archive, ``.pkl`` for another pickle, sniffed
            once per run: :func:`neon_cli.finetune.saved_suffix`).
        scoring_files: which of the scoring commands' ``--detector`` / ``--ref-stats`` the family
            uses (a tuple of ``"detector"``, ``"ref_stats"``); ``()`` makes ``eval`` / ``tune-w``
            refuse both by name; without it neither is checked (:func:`neon_cli.scoring.check_family_scoring`).
        check_scoring() -> None: raise a NeonError when what ``score`` needs (reference
            statistics, a detector) is missing; called before the model loads or a sample is drawn.
        model_num_classes(path) -> int: classes of the model at ``path`` when they vary between
            models of the family (default: ``num_classes``). If it declares the keyword
            ``settings``, it gets the command's resolved settings (``t2i``: the number of prompts
            of ``--set prompts=FILE``, its labels being prompt indices).
        synth_conditioning(settings) -> dict: JSON kept as ``conditioning`` in the plan and manifest
            of ``neon synth`` (what the labels index: ``t2i``'s prompts); a set made with other
            conditioning is not mixed into the same folder.
        use_synthetic_set(model, manifest) -> None: called by ``neon finetune`` after loading, with
            S's manifest (``t2i`` reads its prompts there to embed them once).
        score_model(model, settings) -> dict[str, float]: exact metrics computed from the model
            itself (e.g. the Gaussian toys' closed forms); the Evaluator prefers it to sampling.
        real_samples(model, n, seed) -> (samples, labels): real data for ``neon align``.
        encode_key(model, settings) -> str and encode(model, images) -> tensor [n, ...]: a family
            whose training inputs are a fixed function of the images (VAR: the frozen VQVAE's
            multi-scale tokens) declares both. ``neon finetune`` then calls ``encode`` once per
            image of S (uint8 [n, C, H, W] in batches, under ``torch.inference_mode``, the model on
            the training device), caches the result beside S under ``encoded-<key>/`` (reused by
            every later fine-tune with the same key: it must change whenever ``encode``'s output
            would, e.g. with the VQVAE file's sha256), and hands ``loss`` rows of the encoding
            instead of images (:mod:`neon_cli.dataset`). ``loss`` should still accept images for
            callers that train on raw data (``neon align``).
        metric_info: ``{name: Metric}`` (or ``{name: "definition"}``, the direction then taken
            from the names tune-w maximises, ``neon_cli.tune.common.HIGHER_IS_BETTER``): a one-line
            definition of every name ``score``/``score_model`` may return, including names listed
            in ``metrics`` only under some configuration (e.g. ``fid`` only with a detector).
            ``neon plugins --json`` lists it; a family without it gets "(no definition given by
            the family)" per metric (:func:`metric_definitions`).
        load_with_lora(base_path, lora_path, scale) -> model and set_lora_scale(model, scale):
            θ_r with a LoRA file (θ_s = θ_r + s·B·A) attached at ``scale`` (ΔW = scale·s·B·A, not
            merged), and the same model re-scaled. ``neon tune-w`` with a LoRA as θ_s loads it once
            per snapshot and scores θ_Neon by ``set_lora_scale(model, -w)`` instead of merging for
            every w (without ``set_lora_scale`` it calls ``load_with_lora`` per w; without
            either, it merges θ_r + s·B·A as any snapshot); a ``load_with_lora`` declaring the
            keyword ``settings`` gets the run's resolved settings. :func:`neon_cli.lora.attach_lora` and
            :func:`neon_cli.lora.set_lora_scale` implement both with peft for any torch module.
        files_read(settings) -> [(role, path)]: files the family loads that the user did not name
            on the command line (a shipped classifier, a VAE from a setting or an environment
            variable); ``settings`` are the resolved settings. Default: none
            (:func:`files_read`). Each command's output plan (:mod:`neon_cli.plan`) protects them:
            no ``--report``/``-o`` may replace them, and a FIFO or device among them is refused.
        metric_aliases: ``{old_name: name}``: deprecated metric names still accepted where a user
            names a metric (``--metric``, ``--max-metric``, ``--max-fid``), resolved by
            :func:`resolve_metric` with a one-line note; reports use the new name only.

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
            "metric_info": metric_definitions(fam) if fam is not None else [],
            "metric_aliases": dict(getattr(fam, "metric_aliases", None) or {}),
            "default_model": getattr(fam, "default_model", None),
            "settings": [s.to_json() for s in getattr(fam, "settings", [])] if fam is not None else [],
            "train_defaults": dict(getattr(fam, "train_defaults", None) or {}) if fam is not None else {},
            "train_settings": [s.to_json() for s in getattr(fam, "train_settings", None) or ()] if fam is not None else [],
            "recipes": {k: dict(v) for k, v in (getattr(fam, "recipes", None) or {}).items()} if fam is not None else {},
        }


#: ``definition`` of a metric whose family gives none (third-party families without ``metric_info``).
NO_DEFINITION = "(no definition given by the family)"


def metric_definitions(family: Any) -> list[dict[str, Any]]:
    """Every metric of ``family`` with its definition, as JSON-ready dicts.

    One ``{"name", "definition", "higher_is_better", "direction", "active"}`` per name: first the
    names of ``family.metrics`` (the ones ``--metric`` / ``--max-metric`` take with the present
    configuration, ``active`` True, in that order), then the other names of ``family.metric_info``
    (``active`` False: e.g. ``fid`` of an image family without a detector, or a diagnostic that
    ``score`` returns beside its metrics). ``metric_info`` values may be :class:`Metric`
    or a plain definition string; a name without an entry gets :data:`NO_DEFINITION`. The direction
    falls back to ``neon_cli.tune.common.HIGHER_IS_BETTER`` (the names tune-w maximises).
    """
    from neon_cli.tune.common import HIGHER_IS_BETTER

    info = dict(getattr(family, "metric_info", None) or {})
    reported = list(getattr(family, "metrics", None) or [])
    out = []
    for name in list(dict.fromkeys(reported + list(info))):
        entry = info.get(name)
        if not isinstance(entry, Metric):
            entry = Metric(str(entry) if entry else NO_DEFINITION, name in HIGHER_IS_BETTER)
        out.append({**entry.to_json(name), "active": name in reported})
    return out


def resolve_metric(family: Any, name: str, flag: str, progress: Any = None, task: str = "metrics") -> str:
    """``name`` itself, or the current name when it is one of the family's deprecated
    ``metric_aliases`` (then says so in one line: ``progress(task, 0, None, message=...)``).

    ``flag`` is the option the name came from (``--metric``, ``--max-fid``, ...), named in the
    note. Unknown names are returned unchanged (the caller refuses them against ``metrics``).
    """
    new = dict(getattr(family, "metric_aliases", None) or {}).get(name)
    if not new:
        return name
    if progress is not None:
        progress(task, 0, None, message=f"{flag}: metric {name!r} of family {getattr(family, 'name', '?')!r} is now "
                                        f"{new!r} (deprecated alias, removed in the next release)")
    return str(new)


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


def is_family_spec(name: str) -> bool:
    """True when ``name`` names a family by file or module (``./fam.py:family``, ``pkg.mod:obj``,
    ``fam.py``) rather than by entry-point name."""
    return ":" in name or name.endswith(".py")


def _load_spec(spec: str) -> Any:
    """The object named by ``FILE.py[:ATTR]`` or ``MODULE:ATTR`` (ATTR defaults to ``family``).

    A file is imported as a module of its own (its folder is put on ``sys.path`` first, so it can
    import its siblings); this runs the file's code, as ``python FILE`` would: it is the user's
    own family. Raises :class:`FamilyError` naming the spec.
    """
    import importlib
    import importlib.util
    import sys

    target, _, attr = spec.rpartition(":") if ":" in spec else (spec, "", "family")
    attr = attr or "family"
    if target.endswith(".py") or "/" in target or os.sep in target:
        file = Path(target).expanduser()
        if not file.is_file():
            raise FamilyError(f"family {spec!r}: {file} does not exist")
        import hashlib

        modname = "neon_family_" + hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(modname)
        if module is None:
            folder = str(file.resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)
            loader_spec = importlib.util.spec_from_file_location(modname, file)
            if loader_spec is None or loader_spec.loader is None:
                raise FamilyError(f"family {spec!r}: {file} is not an importable Python file")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[modname] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                sys.modules.pop(modname, None)
                raise FamilyError(f"family {spec!r}: importing {file} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise FamilyError(f"family {spec!r}: cannot import module {target!r}: {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise FamilyError(f"family {spec!r}: {target} has no attribute {attr!r}") from None


def get_family(name: str) -> Any:
    """The loaded family ``name``; raises :class:`FamilyError` listing the installed ones.

    ``name`` is an entry-point name of the group ``neon.families`` or, for a family that is not
    packaged, ``path/to/family.py[:ATTR]`` or ``package.module:ATTR`` (ATTR defaults to
    ``family``), e.g. ``neon synth ./my_family.py:family ...``.
    """
    if is_family_spec(name):
        obj = _load_spec(name)
        check_family(obj, name)
        return obj
    eps = {ep.name: ep for ep in entry_points()}
    if name not in eps:
        known = ", ".join(eps) or "none"
        raise FamilyError(f"unknown family {name!r} (installed: {known}; see 'neon plugins', "
                          "or name a family by file: ./my_family.py:family)")
    try:
        obj = eps[name].load()
    except Exception as exc:
        raise FamilyError(f"family {name!r} failed to load from {eps[name].value}: {exc}") from exc
    check_family(obj, name)
    return obj


def load_model(family: Any, path: str | os.PathLike[str], *, settings: Mapping[str, Any] | None = None,
               trust_pickle: bool = False, purpose: str = "sample") -> Any:
    """``family.load(path, ...)``, passing the keywords ``settings``, ``trust_pickle`` and
    ``purpose`` that the family's ``load`` declares (see :class:`Family`); older families take
    the path alone. Returns what ``load`` returns (a ``torch.nn.Module`` in eval mode, on CPU).

    An exception of the family's ``load`` that is not a :class:`~neon_cli.errors.NeonError` (nor
    a MemoryError or interrupt, which the error boundary maps itself) becomes a
    :class:`~neon_cli.errors.CheckpointError` naming the file, the family and the exception in
    one clean line (torch's multi-line, escape-coloured messages included). An OSError of ``load``
    names the file: CheckpointError (exit 2) for a folder the family cannot read as a checkpoint or
    an unreadable file, ResourceError (exit 3) for a permission or I/O error
    (:func:`neon_cli.errors.from_os_error`)."""
    import inspect

    from neon_cli.errors import CheckpointError, NeonError, exception_line, from_os_error

    fn = family.load
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C extensions
        params = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    offered = {"settings": dict(settings or {}), "trust_pickle": bool(trust_pickle), "purpose": purpose}
    kwargs = {k: v for k, v in offered.items() if accepts_any or k in params}
    try:
        return fn(str(path), **kwargs)
    except OSError as exc:
        if Path(path).is_dir():
            raise CheckpointError(f"{path}: is a folder, not a checkpoint family {family.name!r} can read "
                                  f"({exc.strerror or exc})") from None
        raise from_os_error(exc, f"{path}: cannot read") from None
    except (NeonError, MemoryError):
        raise
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            raise
        raise CheckpointError(f"{path}: family {getattr(family, 'name', '?')!r} could not load it "
                              f"({type(exc).__name__}: {exception_line(exc)})") from exc


def snapshot_name(family: Any, images_seen: int, suffix: str | None = None) -> str:
    """File name of the fine-tuning snapshot after ``images_seen`` images: the family's own
    ``snapshot_name`` if it has one, else ``theta_s-%09d`` + ``checkpoint_suffix`` (else
    ``suffix``, what its ``save`` writes: :func:`neon_cli.finetune.saved_suffix`; else
    ``.safetensors``)."""
    fn = getattr(family, "snapshot_name", None)
    if callable(fn):
        return str(fn(int(images_seen)))
    return f"theta_s-{int(images_seen):09d}{getattr(family, 'checkpoint_suffix', suffix or '.safetensors')}"


def files_read(family: Any, settings: Mapping[str, Any] | None = None) -> list[tuple[str, Path]]:
    """``family.files_read(settings)`` as ``[(role, Path)]``, or [] for a family without the hook.

    The files a family loads beyond the checkpoints the user names (see :class:`Family`); entries
    that are None or empty are dropped. Used by :mod:`neon_cli.plan` (issue 22 item 1).
    """
    fn = getattr(family, "files_read", None)
    if not callable(fn):
        return []
    out = []
    for role, path in fn(dict(settings or {})) or ():
        if path is not None and str(path) != "":
            out.append((str(role), Path(path)))
    return out


def plugin_version(name: str) -> dict[str, Any]:
    """``{"name", "distribution", "version"}`` of family ``name`` for reports (for a family named
    by file: also ``"source"`` and its ``"sha256"``)."""
    if is_family_spec(name):
        target = name.rpartition(":")[0] if ":" in name else name
        out: dict[str, Any] = {"name": name, "distribution": None, "version": None, "source": target}
        if Path(target).is_file():
            from neon_cli.fsutil import sha256_file

            out["sha256"] = sha256_file(target)
        return out
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


def resolve_settings(family: Any, pairs: Sequence[str] = (), overrides: Mapping[str, Any] | None = None,
                     *, train: bool = False) -> dict[str, Any]:
    """Family defaults updated by ``--set KEY=VALUE`` strings and then by ``overrides``.

    ``train=True`` (``neon finetune``) also accepts the family's optional ``train_settings``.
    Raises :class:`FamilyError` naming the key for an unknown key, a malformed pair, or a value
    outside the setting's range.
    """
    all_specs = list(family.settings) + (list(getattr(family, "train_settings", ()) or ()) if train else [])
    specs = {s.name: s for s in all_specs}
    out = {s.name: s.default for s in all_specs}
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


def list_families(request: Any, *, report: Any, progress: Any = None) -> list[dict[str, Any]]:
    """``neon plugins``: every ``neon.families`` entry point as JSON (:meth:`PluginInfo.to_json`; a
    plugin that fails to load is listed with its error), also in ``report.results["families"]``.
    ``request``: a :class:`neon_cli.requests.PluginsRequest` (only its report path)."""
    infos = [i.to_json() for i in discover().values()]
    report.results["families"] = infos
    return infos
