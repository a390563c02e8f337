"""One request object per command: its options, validated once, and the plan of what it reads and writes.

The command layer (:mod:`neon_cli.commands`) builds a request from the flags and hands it whole
to one library function (``merge(request, report=..., progress=...)``), as mergekit's
``run_merge(config, out_path, options)`` takes one validated configuration. A request is a frozen
dataclass:

* its fields are the command's options, in the field's terms (theta_r = ``base``, theta_s =
  ``selftrained``, ``w``); options shared by several commands are small shared dataclasses
  (:class:`Outputs`, :class:`SeedPlan`, :class:`Scoring`, :class:`Trust`);
* :meth:`validate` checks the numbers and names once, raising the one-line
  :class:`~neon_cli.errors.UsageError` naming the flag, in the order the command always used
  (the library entry point calls it first; a request whose flags did not even parse carries that
  error and raises it there, inside the error boundary);
* :meth:`plan` is its :class:`neon_cli.plan.Plan` (every path read and written): the error
  boundary (:func:`neon_cli.commands.boundary.run`) checks it before any work and ``--dry-run``
  prints it; :meth:`settings` is what the report records under ``settings``.

Requests of this module: :class:`MergeRequest` (+ :class:`MergeOptions`), :class:`AlignRequest` (+
:class:`AlignOptions`),
:class:`InspectRequest`, :class:`ExportRequest`, :class:`PluginsRequest`, :class:`SynthRequest`,
:class:`FinetuneRequest` (+ :class:`FinetuneOptions`), :class:`EvalRequest` (+ :class:`EvalGates`),
:class:`FidRequest`, :class:`RefStatsRequest`. Torch-free (imported by the command modules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from neon_cli.errors import NeonError, UsageError
from neon_cli.plan import Plan


# --------------------------------------------------------------------------------------------
# options shared by several commands


@dataclass(frozen=True)
class Outputs:
    """Where a run writes besides its main result: ``report`` (``--report``, JSON, schema
    neon.report/1), ``out`` (``-o``), ``cache`` (``--cache``), ``plot`` (``--plot``); None: not written."""

    out: Optional[Path] = None
    report: Optional[Path] = None
    cache: Optional[Path] = None
    plot: Optional[Path] = None


@dataclass(frozen=True)
class SeedPlan:
    """Which samples a run draws: ``num`` samples with seeds ``seed .. seed + num - 1`` (image i
    depends on seed i only where the family says so), ``labels``: class labels or None (the family's default)."""

    seed: int = 0
    num: int = 1
    labels: Optional[tuple[int, ...]] = None

    def validate(self, seed_flag: str = "--seed", num_flag: str = "-n") -> "SeedPlan":
        """UsageError naming ``num_flag`` (an int >= 1) or ``seed_flag`` (seeds within 0 .. 2**63 - 1)."""
        from neon_cli import validate

        num = validate.positive_int(num_flag, self.num)
        validate.seed(seed_flag, self.seed, count=num)
        return self


@dataclass(frozen=True)
class Scoring:
    """The scoring files of an FID: ``detector`` (Inception .pt, default ``$NEON_INCEPTION``) and
    ``ref_stats`` (.npz mu/sigma, default ``$NEON_REF_STATS``)."""

    detector: Optional[Path] = None
    ref_stats: Optional[Path] = None


@dataclass(frozen=True)
class Trust:
    """``pickle``: let the family run code from a checkpoint to build the model (``--trust-pickle``)."""

    pickle: bool = False


def _paths(values: Optional[Sequence[Any]]) -> tuple[str, ...]:
    return tuple(str(v) for v in values or ())


# --------------------------------------------------------------------------------------------
# neon merge


@dataclass(frozen=True)
class MergeOptions:
    """How ``neon merge`` writes theta_Neon (see :func:`neon_cli.merge.merge`).

    ``key``: dotted path of the state dict in a container (``ema``); ``dtype``: output dtype of
    floating tensors (``float32``, ...; None: theta_r's); ``exclude``: regexes of names copied from
    theta_r; ``buffers``: names copied like BatchNorm statistics; ``allow_missing``: copy names only
    theta_r has, ignore names only theta_s has; ``shard_size``: bytes per shard of a sharded
    folder output (None: not sharded; from the command line the size text, ``2GB``, parsed by
    :meth:`MergeRequest.validate`); ``as_lora``/``lora_format``: theta_s is a LoRA, write the Neon
    LoRA in that layout (:func:`neon_cli.lora.merge_lora`); ``allow_nonfinite``: write inf/NaN results;
    ``dry_run``: check from headers, write nothing; ``chunk_elements``: elements per streamed
    block (None: :data:`neon_cli.checkpoint.CHUNK_ELEMENTS`); ``threads``: kept for compatibility.
    """

    key: Optional[str] = None
    dtype: Any = None
    exclude: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    allow_missing: bool = False
    shard_size: Optional[int | str] = None
    as_lora: bool = False
    lora_format: str = "diffusers"
    allow_nonfinite: bool = False
    dry_run: bool = False
    chunk_elements: Optional[int] = None
    threads: Optional[int] = 1


@dataclass(frozen=True)
class MergeRequest:
    """``neon merge``: theta_Neon = theta_r - w (theta_s - theta_r) for each w of ``ws``, written to
    the output of the same index (paper Algorithm 1, App. C).

    ``base`` (theta_r), ``selftrained`` (theta_s): checkpoint files or folders. ``ws``: floats;
    ``outputs``: one path per w. ``report``: the ``--report`` path (checked against the others).
    ``flags``: the flags as typed (the report's ``settings``); ``error``: a flag that did not parse
    (raised by :meth:`validate`). Build from flags with :meth:`from_flags`.
    """

    base: Path
    selftrained: Path
    ws: tuple[float, ...]
    outputs: tuple[Path, ...]
    options: MergeOptions = field(default_factory=MergeOptions)
    report: Optional[Path] = None
    flags: Optional[dict[str, Any]] = field(default=None, compare=False)
    error: Optional[NeonError] = field(default=None, compare=False)

    @classmethod
    def from_flags(cls, base: Path, selftrained: Path, w: str, output: str, *, shard_size: Optional[str] = None,
                   report: Optional[Path] = None, **options: Any) -> "MergeRequest":
        """From the command line: ``w`` a comma list (``"0.5,1.0"``), ``output`` with ``{w}`` replaced by
        each weight as typed, ``shard_size`` a size text (``2GB``). Never raises: a value that does not
        parse is kept in ``error`` (the plan then guards the paths as typed)."""
        flags = {"base": base, "selftrained": selftrained, "w": w, "output": output, "key": options.get("key"),
                 "dtype": options.get("dtype"), "exclude": list(options.get("exclude") or []),
                 "allow_missing": bool(options.get("allow_missing")), "shard_size": shard_size,
                 "dry_run": bool(options.get("dry_run")), "allow_nonfinite": bool(options.get("allow_nonfinite")),
                 "trust_pickle": bool(options.pop("trust_pickle", False)), "as_lora": bool(options.get("as_lora")),
                 "lora_format": options.get("lora_format", "diffusers")}
        options["exclude"] = tuple(options.get("exclude") or ())
        error, ws, outs = None, (), (Path(output),) if output != "" else ()
        try:
            pairs = parse_weights(w)
            ws, outs = tuple(v for _, v in pairs), tuple(output_paths(output, [t for t, _ in pairs]))
        except NeonError as exc:
            error = exc
        return cls(Path(base), Path(selftrained), ws, outs, MergeOptions(shard_size=shard_size or None, **options), report,
                   flags, error)

    def shard_bytes(self) -> Optional[int]:
        """``options.shard_size`` in bytes (a size text such as ``2GB`` parsed; UsageError naming
        ``--shard-size`` when it is not one); None: not sharded."""
        shard = self.options.shard_size
        if isinstance(shard, str):
            from neon_cli.checkpoint import parse_size
            from neon_cli.validate import positive_int

            return positive_int("--shard-size", parse_size(shard))
        return shard

    def validate(self) -> "MergeRequest":
        """Raise the flag error of :meth:`from_flags`, then UsageError for: a shard size that is not
        a size, no weight, a non-finite w, not as many outputs as weights, a shard size or
        ``chunk_elements`` below 1, outputs of different layouts, an unknown dtype, an invalid
        ``exclude`` regex (each naming its flag). Returns the request."""
        if self.error is not None:
            raise self.error
        from neon_cli.checkpoint import parse_dtype
        from neon_cli.merge import _compile_exclude, _check_w, output_kind
        from neon_cli.validate import positive_int

        shard = self.shard_bytes()
        for w in self.ws:
            _check_w(w)
        if not self.ws:
            raise UsageError("--w: give at least one weight")
        if len(self.ws) != len(self.outputs):
            raise UsageError(f"-o: {len(self.outputs)} output paths for {len(self.ws)} weights; "
                             "use '{w}' in -o for several weights")
        if shard is not None:
            shard = positive_int("--shard-size", shard)
        if self.options.chunk_elements is not None:
            positive_int("chunk_elements", self.options.chunk_elements)
        if len({output_kind(o, shard) for o in self.outputs}) != 1:
            raise UsageError("-o: all outputs must have the same layout (suffix)")
        parse_dtype(self.options.dtype)
        _compile_exclude(self.options.exclude)
        return self

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.merge_plan` over the outputs (the ``-o`` pattern as typed when ``--w`` did not parse)."""
        from neon_cli.plan import merge_plan

        flags = self.flags
        outs: list[Any] = [""] if flags is not None and flags["output"] == "" else list(self.outputs)
        shard = flags["shard_size"] if flags is not None else self.options.shard_size
        return merge_plan(base=self.base, selftrained=self.selftrained, outputs=outs, shard_size=shard, report=self.report)

    def settings(self) -> dict[str, Any]:
        """The report's ``settings``: the flags as typed (or the fields, for a request built in code)."""
        if self.flags is not None:
            return dict(self.flags)
        o = self.options
        return {"base": self.base, "selftrained": self.selftrained, "w": list(self.ws), "output": [str(p) for p in self.outputs],
                "key": o.key, "dtype": o.dtype, "exclude": list(o.exclude), "allow_missing": o.allow_missing,
                "shard_size": o.shard_size, "dry_run": o.dry_run, "allow_nonfinite": o.allow_nonfinite,
                "as_lora": o.as_lora, "lora_format": o.lora_format}


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``"0.5,1.0,1.6"`` -> [("0.5", 0.5), ("1.0", 1.0), ("1.6", 1.6)]; UsageError naming ``--w``."""
    import math

    out = []
    for tok in (t.strip() for t in str(text).split(",")):
        if not tok:
            raise UsageError(f"--w {text}: empty weight in the list")
        try:
            value = float(tok)
        except ValueError:
            raise UsageError(f"--w {text}: {tok!r} is not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"--w: must be a finite number, got {tok} (in {text!r})")
        out.append((tok, value))
    if len({v for _, v in out}) != len(out):
        raise UsageError(f"--w {text}: a weight is repeated")
    return out


def output_paths(pattern: str, tokens: list[str]) -> list[Path]:
    """Replace ``{w}`` in ``-o`` by each weight as typed; UsageError if several weights lack it."""
    if "{w}" not in pattern:
        if len(tokens) > 1:
            raise UsageError(f"-o {pattern}: several weights need '{{w}}' in the output name, e.g. -o 'out-w{{w}}.safetensors'")
        return [Path(pattern)]
    return [Path(pattern.replace("{w}", tok)) for tok in tokens]


# --------------------------------------------------------------------------------------------
# neon align


@dataclass(frozen=True)
class AlignOptions:
    """How ``neon align`` estimates the gradients (:func:`neon_cli.align.estimate_alignment`).

    ``precond``: P for s, ``identity`` or ``adam``; ``batch``: samples per gradient batch (None: the
    family's ``train_defaults["batch"]``); ``seed``: loss-noise seed (batch b uses
    ``seed * 1_000_003 + b``, the same in every pass); ``curvature_step``: h of the central
    difference for d2R/dw2 (None or 0: skipped).
    """

    precond: str = "identity"
    batch: Optional[int] = None
    seed: int = 0
    curvature_step: Optional[float] = 0.1


@dataclass(frozen=True)
class AlignRequest:
    """``neon align`` (paper Eq. 4, App. B.11; :func:`neon_cli.align.run_align`).

    ``family``: a family name; ``base``: theta_r (None: the family's embedded default);
    ``selftrained``: theta_s; ``synthetic``: a ``neon synth`` folder S; ``real``: held-out real
    samples in that format (None: the family's ``real_samples``, ``real_draw.num`` samples from
    seed ``real_draw.seed``); ``options``: :class:`AlignOptions`; ``set_pairs``: ``--set KEY=VALUE``;
    ``trust``; ``report``.
    """

    family: str
    base: Optional[Path] = None
    selftrained: Optional[Path] = None
    synthetic: Optional[Path] = None
    real: Optional[Path] = None
    real_draw: SeedPlan = field(default_factory=lambda: SeedPlan(seed=0, num=10_000))
    options: AlignOptions = field(default_factory=AlignOptions)
    set_pairs: tuple[str, ...] = ()
    trust: Trust = field(default_factory=Trust)
    report: Optional[Path] = None

    def validate(self) -> "AlignRequest":
        """UsageError naming the flag: neither ``--selftrained`` nor ``--synthetic``, an unknown
        ``--precond``, ``--num-real`` < 1, ``--real-seed``/``--seed`` out of range, ``--batch`` < 1,
        a negative or non-finite ``--curvature-step``."""
        from neon_cli import validate

        o = self.options
        check_sources(self.selftrained, self.synthetic, o.precond)
        self.real_draw.validate("--real-seed", "--num-real")
        from neon_cli.train import MAX_TRAIN_SEED  # imports torch: after the checks that need none
        validate.integer("--seed", o.seed, low=0, high=MAX_TRAIN_SEED)  # batch b's loss noise: seed * 1_000_003 + b
        if o.batch is not None:
            validate.positive_int("--batch", o.batch)
        if o.curvature_step is not None:
            validate.finite("--curvature-step", o.curvature_step, low=0.0)
        return self

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.align_plan`: reads the checkpoints, sets and the family's files; writes the report."""
        from neon_cli.plan import align_plan

        return align_plan(family=self.family, base=self.base, selftrained=self.selftrained, synthetic=self.synthetic,
                          real=self.real, set_pairs=list(self.set_pairs), report=self.report)

    def settings(self) -> dict[str, Any]:
        """The report's ``settings`` (flag names)."""
        o = self.options
        return dict(family=self.family, base=self.base, selftrained=self.selftrained, synthetic=self.synthetic, real=self.real,
                    num_real=self.real_draw.num, real_seed=self.real_draw.seed, precond=o.precond, batch=o.batch,
                    seed=o.seed, curvature_step=o.curvature_step, set=list(self.set_pairs), trust_pickle=self.trust.pickle)


def check_sources(selftrained: Any, synthetic: Any, precond: str) -> None:
    """UsageError when neither theta_s nor S is given, or ``precond`` is not identity/adam."""
    if selftrained is None and synthetic is None:
        raise UsageError("give a self-trained checkpoint (--selftrained) or a synthetic set (--synthetic), or both")
    if precond not in ("identity", "adam"):
        raise UsageError(f"--precond {precond!r}: expected 'identity' or 'adam'")


# --------------------------------------------------------------------------------------------
# neon inspect, neon export, neon plugins


@dataclass(frozen=True)
class InspectRequest:
    """``neon inspect``: ``checkpoint`` (any file or folder merge reads), ``key`` (check that this
    dotted path holds the weights), ``report``."""

    checkpoint: Path
    key: Optional[str] = None
    report: Optional[Path] = None

    def validate(self) -> "InspectRequest":
        """Nothing to check beyond the plan (the file itself is checked by reading it)."""
        return self

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.inspect_plan`: reads CHECKPOINT; writes only the report."""
        from neon_cli.plan import inspect_plan

        return inspect_plan(checkpoint=self.checkpoint, report=self.report)

    def settings(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "key": self.key}


@dataclass(frozen=True)
class ExportRequest:
    """``neon export``: the synthetic set ``data`` written as ``out`` in layout ``fmt`` (``edm-zip``:
    a ``.zip`` in EDM's dataset_tool.py layout; ``imagefolder``: a new folder of PNGs with
    ``metadata.jsonl``), ``report``."""

    data: Path
    out: Path
    fmt: str = "edm-zip"
    report: Optional[Path] = None

    def validate(self) -> "ExportRequest":
        """UsageError for an unknown ``--format`` or an edm-zip ``-o`` that is not a ``.zip``."""
        from neon_cli.export import FORMATS

        if self.fmt not in FORMATS:
            raise UsageError(f"--format: {self.fmt!r} is not one of {', '.join(FORMATS)}")
        if self.fmt == "edm-zip" and Path(self.out).suffix.lower() != ".zip":
            raise UsageError(f"-o: {self.out}: the edm-zip format is a .zip file (EDM's train.py --data reads zips and folders)")
        return self

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.export_plan`: reads DATA; writes ``-o`` (with its lock) and the report."""
        from neon_cli.plan import export_plan

        return export_plan(data=self.data, out=self.out, report=self.report)

    def settings(self) -> dict[str, Any]:
        return dict(data=self.data, format=self.fmt, out=self.out)


@dataclass(frozen=True)
class PluginsRequest:
    """``neon plugins``: reads no file; ``report`` is its only output."""

    report: Optional[Path] = None

    def validate(self) -> "PluginsRequest":
        return self

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.plugins_plan`: writes only the report."""
        from neon_cli.plan import plugins_plan

        return plugins_plan(report=self.report)

    def settings(self) -> dict[str, Any]:
        return {}


# ---- tune-w / demo ----------------------------------------------------------------------------
# neon demo


@dataclass(frozen=True)
class DemoRequest:
    """``neon demo``: the paper's protocol (Algorithm 1, Sec. 4) on ``family``'s ``base`` (None: its
    embedded default), working in ``out`` (S, theta_s, the control, ``neon.safetensors``, caches).

    ``num_synthetic``: |S| (images); ``budget``: fine-tuning budget in images seen (None:
    ``budget_fraction`` x the base's recorded ``train_images``); ``lr``: fine-tuning learning rate
    (None: the family's recipe); ``bounds``: the w box; ``gamma``: the guidance box (LO, HI) searched
    for the base, the control and Neon (None or a family without guidance: no gamma search);
    ``max_evals``: evaluations per search (None: each search's own; at least 7); ``num_samples``:
    images per search evaluation; ``confirm_samples``: images of the final comparison (disjoint
    seeds); ``control``: also fine-tune the base on real data; ``seed``: of S and fine-tuning;
    ``report``: the ``--report`` path. See :func:`neon_cli.demo.demo`.
    """

    family: str = "digits"
    base: Optional[Path] = None
    out: Path = Path("neon-demo")
    num_synthetic: int = 4000
    budget: Optional[int] = None
    budget_fraction: float = 0.03
    lr: Optional[float] = None
    bounds: tuple[float, float] = (0.0, 3.0)
    gamma: Optional[tuple[float, float]] = (1.0, 4.0)
    max_evals: Optional[int] = None
    num_samples: int = 2000
    confirm_samples: int = 5000
    control: bool = True
    seed: int = 0
    report: Optional[Path] = None

    def validate(self) -> "DemoRequest":
        """UsageError naming the flag for: ``--num-synthetic`` < 1, ``--num-samples`` or
        ``--confirm-samples`` < 2, ``--budget-fraction`` not > 0, seeds beyond 2**63 - 1, ``--lr``
        not > 0, ``--gamma`` not finite LO < HI. (``--budget`` and ``--max-evals`` are checked by
        :func:`neon_cli.demo.demo` once the family is known, as before.) Returns the request."""
        from neon_cli import validate

        for flag, v in (("--num-synthetic", self.num_synthetic), ("--num-samples", self.num_samples),
                        ("--confirm-samples", self.confirm_samples)):
            validate.integer(flag, v, low=2 if flag != "--num-synthetic" else 1)
        validate.finite("--budget-fraction", self.budget_fraction, low=0.0, low_open=True)
        validate.seed("--seed", self.seed, self.num_synthetic)
        if self.lr is not None:
            validate.positive("--lr", self.lr)
        if self.gamma is not None:
            lo, hi = (validate.finite("--gamma", g) for g in self.gamma)
            if not lo < hi:
                raise UsageError(f"--gamma {lo:g} {hi:g}: need finite LO < HI")
        return self

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.demo_plan`: reads the base, the family's and scoring files; writes ``-o`` and the report."""
        from neon_cli.plan import demo_plan

        return demo_plan(family=self.family, base=self.base, out=self.out, report=self.report)

    def settings(self) -> dict[str, Any]:
        """The report's ``settings`` (as ``neon demo`` always recorded them)."""
        return dict(out=self.out, family=self.family, base=self.base, num_synthetic=self.num_synthetic, budget=self.budget,
                    budget_fraction=self.budget_fraction, lr=self.lr,
                    gamma=None if self.gamma is None else list(self.gamma), max_evals=self.max_evals,
                    control=self.control, num_samples=self.num_samples, confirm_samples=self.confirm_samples, seed=self.seed)


# neon tune-w

#: The keywords of :func:`neon_cli.tune.run_tune_w` that are not fields of :class:`TuneRequest`
#: (they go into its shared :class:`Outputs`, :class:`Scoring`, :class:`Trust`).
_TUNE_KEYWORDS = {"output": ("outputs", "out"), "cache": ("outputs", "cache"), "plot": ("outputs", "plot"),
                  "report_path": ("outputs", "report"), "detector": ("scoring", "detector"),
                  "ref_stats": ("scoring", "ref_stats"), "trust_pickle": ("trust", "pickle")}


@dataclass(frozen=True)
class TuneRequest:
    """``neon tune-w``: the best (snapshot, w[, gamma]) for theta_Neon = theta_r - w (theta_s - theta_r)
    (paper Sec. 4, App. C; see :func:`neon_cli.tune.run.tune_w` for what each step does).

    ``family``; ``base`` (theta_r; None: the family's embedded default); ``selftrained``: theta_s
    checkpoints or glob patterns as typed (None: the base alone, :func:`neon_cli.tune.run.tune_base_gamma`).
    Search: ``bounds`` (the w interval), ``gamma`` (the guidance box; None: w only), ``base_gamma`` /
    ``tune_base`` (the base's own gamma box, default ``gamma``; ``tune_base=False``: none),
    ``joint`` (``"line"``/``"design"``), ``line_gamma`` (gamma of the joint search's w line; None:
    the settings'), ``xtol`` (w units), ``max_evals``, ``rounds``, ``refine`` (default
    :data:`neon_cli.tune.common.REFINE_DEFAULT`), ``gamma_scale``, ``abandon_margin`` (relative; None:
    never abandon), ``metric`` (None: the family's first). Seed plans: ``num_samples`` images on
    seeds ``seed ..``; stage 2 ``confirm_samples`` per block (0: none), ``keep`` candidates and the
    refit probes ``w +- refit_width`` (w units; 0: no refit, :mod:`neon_cli.tune.refit`) and, with a
    gamma box, ``refit_gamma`` (the surface refit's half-width in ln gamma or gamma; 0: w only), until
    the refit's expected regret is at most ``target_regret`` (a fraction) or up to ``max_images``
    images (None: one block); ``labels`` (:mod:`neon_cli.labels`; None: balanced).
    ``set_pairs`` (``--set KEY=VALUE``), ``batch`` (sampling batch, images), ``plot_points``,
    ``control`` (``"real"`` or a checkpoint path) / ``control_samples``, ``write_anyway``,
    ``require_improvement`` (NoImprovement, exit 5, when Neon does not beat the base).
    ``outputs``: ``out`` (``-o``), ``report``, ``cache``, ``plot``; ``scoring``: detector and
    reference statistics; ``trust``: ``--trust-pickle``. ``flags``: the flags as typed (the report's
    ``settings``), from :meth:`from_flags`.
    """

    family: str
    base: Optional[Path] = None
    selftrained: Optional[tuple[Any, ...]] = ()
    bounds: tuple[float, float] = (0.0, 3.0)
    gamma: Optional[tuple[float, float]] = None
    base_gamma: Optional[tuple[float, float]] = None
    tune_base: Optional[bool] = None
    joint: str = "line"
    line_gamma: Optional[float] = None
    xtol: float = 0.05
    max_evals: Optional[int] = None
    rounds: int = 1
    refine: int = 2  # neon_cli.tune.common.REFINE_DEFAULT (this module does not import the tune package)
    gamma_scale: str = "auto"
    metric: Optional[str] = None
    num_samples: int = 2000
    seed: int = 10_000_000
    confirm_samples: int = 0
    keep: int = 1
    max_images: Optional[int] = None
    refit_width: float = 0.2  # neon_cli.tune.refit.REFIT_WIDTH_DEFAULT
    refit_gamma: float = 0.1  # neon_cli.tune.refit.REFIT_GAMMA_DEFAULT: with a gamma box, half-width in ln gamma (or gamma)
    target_regret: float = 0.005  # neon_cli.tune.refit.TARGET_REGRET_DEFAULT: stage 2 stops at this expected regret
    set_pairs: tuple[str, ...] = ()
    batch: int = 1000
    plot_points: int = 9
    abandon_margin: Optional[float] = 0.02
    control: Optional[str] = None
    control_samples: Optional[int] = None
    write_anyway: bool = False
    require_improvement: bool = True
    labels: Optional[str] = None
    outputs: Outputs = field(default_factory=Outputs)
    scoring: Scoring = field(default_factory=Scoring)
    trust: Trust = field(default_factory=Trust)
    flags: Optional[dict[str, Any]] = field(default=None, compare=False)

    @classmethod
    def from_keywords(cls, family: str, base: Optional[Path], selftrained: Any, **options: Any) -> "TuneRequest":
        """From :func:`neon_cli.tune.run_tune_w`'s keywords: ``output``, ``cache``, ``plot``,
        ``report_path`` -> :class:`Outputs`; ``detector``, ``ref_stats`` -> :class:`Scoring`;
        ``trust_pickle`` -> :class:`Trust`; the others are fields (TypeError for an unknown keyword)."""
        shared: dict[str, dict[str, Any]] = {"outputs": {}, "scoring": {}, "trust": {}}
        for key, (group, name) in _TUNE_KEYWORDS.items():
            if key in options:
                shared[group][name] = options.pop(key)
        if "set_pairs" in options:
            options["set_pairs"] = tuple(options["set_pairs"])
        return cls(family, base, None if selftrained is None else tuple(selftrained), **options,
                   outputs=Outputs(**shared["outputs"]), scoring=Scoring(**shared["scoring"]), trust=Trust(**shared["trust"]))

    @classmethod
    def from_flags(cls, family: str, base: Optional[Path], selftrained: Sequence[Any], abandon_margin: float,
                   report: Optional[Path], **options: Any) -> "TuneRequest":
        """From the command line: ``abandon_margin`` inf means never (None); the flags as typed are
        kept for the report's ``settings`` (``family, base, selftrained, abandon_margin``, then ``options``)."""
        flags = dict(family=family, base=base, selftrained=list(selftrained), abandon_margin=abandon_margin, **options)
        margin = None if abandon_margin == float("inf") else abandon_margin
        req = cls.from_keywords(family, base, selftrained, abandon_margin=margin, report_path=report, **options)
        object.__setattr__(req, "flags", flags)
        return req

    def search_plan(self) -> Any:
        """The validated :class:`neon_cli.tune.plan.Plan` (:func:`neon_cli.tune.plan.check_flags`:
        UsageError naming the flag)."""
        from neon_cli.tune.plan import check_flags

        return check_flags(self)

    def validate(self) -> "TuneRequest":
        """UsageError naming the flag for any bad number or choice (:meth:`search_plan`). Returns the request."""
        self.search_plan()
        return self

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.tune_plan`: reads the base, every snapshot match (and its recipe with
        ``--control``), the control checkpoint, scoring and family files; writes ``-o``, ``--cache``,
        ``--plot`` and the report."""
        from neon_cli.plan import tune_plan

        return tune_plan(self)

    def settings(self) -> dict[str, Any]:
        """The report's ``settings``: the flags as typed (or the fields, for a request built in code)."""
        if self.flags is not None:
            return dict(self.flags)
        from dataclasses import asdict

        return {k: v for k, v in asdict(self).items() if k != "flags"}


# --------------------------------------------------------------------------------------------
# ---- synth / finetune / eval / fid / ref-stats ----


@dataclass(frozen=True)
class SynthRequest:
    """``neon synth`` (paper Algorithm 1, step 1; :func:`neon_cli.synth.run_synth`): ``draw.num``
    images from theta_r (``model``; None: the family's embedded default) with seeds ``draw.seed ..
    draw.seed + draw.num - 1`` into the folder ``out``, ``shard_size`` images per shard, sampled
    ``batch`` at a time; ``labels``: the class-label protocol name (``--labels``; None: balanced);
    ``set_pairs``: ``--set KEY=VALUE``; ``trust``; ``report``."""

    family: str
    model: Optional[Path]
    out: Path
    draw: SeedPlan = field(default_factory=SeedPlan)
    set_pairs: tuple[str, ...] = ()
    shard_size: int = 1000
    batch: int = 500
    labels: Optional[str] = None
    trust: Trust = field(default_factory=Trust)
    report: Optional[Path] = None

    def validate(self) -> "SynthRequest":
        """UsageError naming the flag: ``--num-images``, ``--shard-size``, ``--batch`` < 1, seeds
        out of 0 .. 2**63 - 1 (``--seed``), more shards than :data:`neon_cli.synth.MAX_SHARDS`; an
        unknown ``--labels`` protocol; ResourceError: S cannot fit on the disk
        (:func:`neon_cli.synth.check_size`). Returns the request with the numbers as ints."""
        import dataclasses

        from neon_cli import labels as label_protocols
        from neon_cli import validate
        from neon_cli.synth import check_size

        num = validate.positive_int("--num-images", self.draw.num)
        shard_size = validate.positive_int("--shard-size", self.shard_size)
        batch = validate.positive_int("--batch", self.batch)
        seed = validate.seed("--seed", self.draw.seed, count=num)
        check_size(num, shard_size, Path(self.out))  # before the family loads or anything is sampled
        label_protocols.check(self.labels, 0, 0)  # the name, before anything is read
        return dataclasses.replace(self, out=Path(self.out), draw=SeedPlan(seed=seed, num=num), shard_size=shard_size,
                                   batch=batch)

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.synth_plan`: reads the model and the family's files; writes ``-o``
        (plan.json, manifest.json, every shard) and the report."""
        from neon_cli.plan import synth_plan

        return synth_plan(family=self.family, model=self.model, out=self.out, num=self.draw.num, shard_size=self.shard_size,
                          set_pairs=list(self.set_pairs), report=self.report)

    def settings(self) -> dict[str, Any]:
        """The report's ``settings`` (flag names)."""
        return dict(family=self.family, model=self.model, num=self.draw.num, out=self.out, seed=self.draw.seed,
                    set=list(self.set_pairs), shard_size=self.shard_size, batch=self.batch, labels=self.labels,
                    trust_pickle=self.trust.pickle)


@dataclass(frozen=True)
class FidRequest:
    """``neon fid A B`` (:func:`neon_cli.fid.fid`; pytorch-fid / clean-fid / EDM fid.py): ``a`` the
    generated side, ``b`` the reference (image sources or statistics files); ``scoring.detector``
    (``--detector``; None: ``$NEON_INCEPTION``); ``prdc``: also precision/recall/density/coverage;
    ``num_images``/``seed``: a seeded subset of each image side (None: all); ``batch``: images per
    detector call; ``device``: torch device (None: cuda if available); ``trust``; ``report``."""

    a: Path
    b: Path
    scoring: Scoring = field(default_factory=Scoring)
    prdc: bool = False
    num_images: Optional[int] = None
    seed: int = 0
    batch: int = 64
    device: Optional[str] = None
    trust: Trust = field(default_factory=Trust)
    report: Optional[Path] = None

    def validate(self) -> "FidRequest":
        """UsageError naming the flag: ``--batch`` < 1, ``--num-images`` < 2, ``--seed`` < 0, A or B
        that does not exist. Returns the request with the numbers as ints."""
        import dataclasses

        from neon_cli import validate

        batch = validate.positive_int("--batch", self.batch)
        num_images = None if self.num_images is None else validate.integer("--num-images", self.num_images, low=2)
        seed = validate.integer("--seed", self.seed, low=0)
        for flag, p in (("A", Path(self.a)), ("B", Path(self.b))):
            if not p.exists():
                raise UsageError(f"{flag}: {p} does not exist")
        return dataclasses.replace(self, batch=batch, num_images=num_images, seed=seed)

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.fid_plan`: reads A, B and the detector; writes only the report."""
        from neon_cli.plan import fid_plan

        return fid_plan(a=self.a, b=self.b, detector=self.scoring.detector, report=self.report)

    def settings(self) -> dict[str, Any]:
        """The report's ``settings`` (flag names)."""
        return dict(a=self.a, b=self.b, detector=self.scoring.detector, prdc=self.prdc, num_images=self.num_images,
                    seed=self.seed, batch=self.batch, device=self.device, trust_pickle=self.trust.pickle)


@dataclass(frozen=True)
class RefStatsRequest:
    """``neon ref-stats`` (:func:`neon_cli.inception.ref_stats`; EDM fid.py ref): statistics of the
    images ``images`` written to the ``.npz`` ``out``; ``scoring.detector`` (``--detector``; None:
    ``$NEON_INCEPTION``); ``batch``: images per detector call; ``device``; ``keep_features``: also
    the features [N, D]; ``pixels``: statistics of the raw pixels, no detector; ``trust``; ``report``."""

    images: Path
    out: Path
    scoring: Scoring = field(default_factory=Scoring)
    batch: int = 64
    device: Optional[str] = None
    keep_features: bool = False
    pixels: bool = False
    trust: Trust = field(default_factory=Trust)
    report: Optional[Path] = None

    def validate(self) -> "RefStatsRequest":
        """UsageError naming the flag: ``--batch`` < 1, an ``-o`` that is not a ``.npz``, ``--pixels``
        with ``--keep-features``. Returns the request."""
        from neon_cli.validate import positive_int

        positive_int("--batch", self.batch)
        if Path(self.out).suffix.lower() != ".npz":
            raise UsageError(f"-o: {Path(self.out)}: the statistics file must end in .npz")
        if self.pixels and self.keep_features:
            raise UsageError("--pixels: --keep-features stores Inception features; pixel statistics keep none")
        return self

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.refstats_plan`: reads ``--images`` and the detector; writes ``-o`` and the report."""
        from neon_cli.plan import refstats_plan

        return refstats_plan(images=self.images, out=self.out, detector=self.scoring.detector, report=self.report)

    def settings(self) -> dict[str, Any]:
        """The report's ``settings`` (flag names)."""
        return dict(images=self.images, out=self.out, detector=self.scoring.detector, batch=self.batch, device=self.device,
                    keep_features=self.keep_features, pixels=self.pixels, trust_pickle=self.trust.pickle)


@dataclass(frozen=True)
class EvalGates:
    """The thresholds of ``neon eval`` (:func:`neon_cli.evaluate.parse_thresholds`): ``max_fid``
    (``--max-fid``), ``max_metric`` / ``min_metric`` (``--max-metric`` / ``--min-metric``
    ``METRIC=X``), ``gate_se`` (``--gate-se K``: fail only beyond K standard errors, >= 0) and
    ``thresholds`` (library use: pairs ``(metric, maximum)``)."""

    max_fid: Optional[float] = None
    max_metric: tuple[str, ...] = ()
    min_metric: tuple[str, ...] = ()
    gate_se: float = 0.0
    thresholds: tuple[tuple[str, float], ...] = ()

    def limits(self) -> dict[str, tuple[float, str]]:
        """``{metric: (X, flag)}`` of every threshold; UsageError naming the flag of one that is not a finite number."""
        from neon_cli import validate
        from neon_cli.evaluate import parse_thresholds

        limits = parse_thresholds(self.max_fid, self.max_metric, self.min_metric)
        validate.finite("--gate-se", self.gate_se, low=0.0)
        for name, value in self.thresholds:
            limits[name] = (validate.finite(f"--max-metric {name}", value), f"--max-metric {name}")
        return limits


@dataclass(frozen=True)
class EvalRequest:
    """``neon eval`` (:func:`neon_cli.evaluate.evaluate`): the family's metrics of ``model`` (None:
    the family's embedded default) on the seed plan ``draw`` (seeds ``draw.seed .. draw.seed +
    draw.num - 1``), sampled ``batch`` at a time with ``--set`` pairs ``set_pairs`` and label
    protocol ``labels`` (None: balanced); ``gates``: :class:`EvalGates`; ``scoring``: the
    Inception files; ``trust``; ``report``."""

    family: str
    model: Optional[Path] = None
    draw: SeedPlan = field(default_factory=lambda: SeedPlan(seed=20_000_000, num=2000))
    set_pairs: tuple[str, ...] = ()
    batch: int = 1000
    labels: Optional[str] = None
    gates: EvalGates = field(default_factory=EvalGates)
    scoring: Scoring = field(default_factory=Scoring)
    trust: Trust = field(default_factory=Trust)
    report: Optional[Path] = None

    def validate(self) -> "EvalRequest":
        """UsageError naming the flag, before any file is read: ``--num-samples`` < 2, ``--seed`` out
        of range, ``--batch`` < 1 (:func:`neon_cli.evaluate.check_plan_numbers`), an unknown
        ``--labels``, a threshold or ``--gate-se`` that is not a finite number (or a negative
        ``--gate-se``). Returns the request (``gates.gate_se`` as a float)."""
        import dataclasses

        from neon_cli import validate
        from neon_cli.evaluate import check_plan_numbers
        from neon_cli.labels import check as check_labels

        check_plan_numbers(self.draw.num, self.draw.seed, self.batch)
        check_labels(self.labels, 0, 0)
        self.gates.limits()
        gate_se = validate.finite("--gate-se", self.gates.gate_se, low=0.0)
        return dataclasses.replace(self, gates=dataclasses.replace(self.gates, gate_se=gate_se))

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.eval_plan`: reads the model, the scoring files and the family's files; writes only the report."""
        from neon_cli.plan import eval_plan

        return eval_plan(family=self.family, model=self.model, detector=self.scoring.detector, ref_stats=self.scoring.ref_stats,
                         set_pairs=list(self.set_pairs), report=self.report)

    def settings(self) -> dict[str, Any]:
        """The report's ``settings`` (flag names)."""
        g = self.gates
        return dict(family=self.family, model=self.model, set=list(self.set_pairs), num_samples=self.draw.num, seed=self.draw.seed,
                    batch=self.batch, labels=self.labels, max_fid=g.max_fid, max_metric=list(g.max_metric),
                    min_metric=list(g.min_metric), gate_se=g.gate_se, detector=self.scoring.detector,
                    ref_stats=self.scoring.ref_stats, trust_pickle=self.trust.pickle)


@dataclass(frozen=True)
class FinetuneOptions:
    """How ``neon finetune`` trains (budgets in images seen; None: the recipe's value):
    ``budget`` (B), ``lr``, ``batch`` (images per optimiser step), ``warmup`` (images of linear
    lr ramp-up), ``save_every`` (images between snapshots; None: only at the end),
    ``ema_halflife`` (images; 0: no EMA), ``seed`` (data order and training noise), ``recipe``
    (``default``: the family's ``train_defaults``; ``paper`` or another of its ``recipes``)."""

    budget: int
    lr: Optional[float] = None
    batch: Optional[int] = None
    warmup: Optional[int] = None
    save_every: Optional[int] = None
    ema_halflife: Optional[int] = None
    seed: int = 0
    recipe: str = "default"


@dataclass(frozen=True)
class FinetuneRequest:
    """``neon finetune`` (paper Algorithm 1, step 2; :func:`neon_cli.finetune.run_finetune`): theta_s
    from theta_r (``model``; None: the family's embedded default) fine-tuned on the synthetic set
    ``data`` (a ``neon synth`` folder) into the folder ``out``; ``options``:
    :class:`FinetuneOptions`; ``set_pairs``: ``--set KEY=VALUE``; ``trust``; ``report``."""

    family: str
    model: Optional[Path]
    data: Path
    out: Path
    options: FinetuneOptions
    set_pairs: tuple[str, ...] = ()
    trust: Trust = field(default_factory=Trust)
    report: Optional[Path] = None

    def validate(self) -> "FinetuneRequest":
        """UsageError naming the flag, before any file is read: ``--budget`` < 1, ``--lr`` <= 0,
        ``--batch`` < 1, ``--warmup`` < 0, ``--save-every`` < 1, ``--ema-halflife`` < 0, ``--seed``
        outside 0 .. :data:`neon_cli.train.MAX_TRAIN_SEED`. Returns the request."""
        from neon_cli import validate

        o = self.options
        validate.positive_int("--budget", o.budget)
        if o.lr is not None:
            validate.positive("--lr", o.lr)
        if o.batch is not None:
            validate.positive_int("--batch", o.batch)
        if o.warmup is not None:
            validate.integer("--warmup", o.warmup, low=0)
        if o.save_every is not None:
            validate.positive_int("--save-every", o.save_every)
        if o.ema_halflife is not None:
            validate.integer("--ema-halflife", o.ema_halflife, low=0)
        from neon_cli.train import MAX_TRAIN_SEED  # imports torch: after the checks that need none

        validate.integer("--seed", o.seed, low=0, high=MAX_TRAIN_SEED)
        return self

    def plan(self) -> Plan:
        """:func:`neon_cli.plan.finetune_plan`: reads the model, S and the family's files; writes ``-o`` and the report."""
        from neon_cli.plan import finetune_plan

        return finetune_plan(family=self.family, model=self.model, data=self.data, out=self.out, set_pairs=list(self.set_pairs),
                             report=self.report)

    def settings(self) -> dict[str, Any]:
        """The report's ``settings`` (flag names)."""
        o = self.options
        return dict(family=self.family, model=self.model, data=self.data, budget=o.budget, lr=o.lr, out=self.out, warmup=o.warmup,
                    batch=o.batch, save_every=o.save_every, ema_halflife=o.ema_halflife, seed=o.seed, set=list(self.set_pairs),
                    recipe=o.recipe, trust_pickle=self.trust.pickle)
