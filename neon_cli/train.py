"""The generic training loop behind ``neon finetune`` (and the digits base-training script).

The family supplies its recipe (``loss``, ``make_optimizer``, ``train_defaults``); the core owns
the loop so that budgets, data order, warm-up, EMA, snapshots and resume behave the same for every
family (paper Algorithm 1, step 2: "briefly fine-tune on S with the original recipe").

Units: every budget is in **images seen** (one image drawn into a batch counts once).

Determinism and resume: the data order is a fixed function of (seed, images seen): epoch e visits
the set in the permutation drawn from ``torch.Generator().manual_seed(seed + e)`` (drawn once per
epoch and kept, :class:`DataOrder`); the training noise of step t comes from a generator seeded
with ``seed * 1_000_003 + t`` (+ rank * 2**40 on other ranks). The data may be a tensor in memory
or a set whose rows are read per batch (``neon finetune`` streams S from its shards,
:mod:`neon_cli.dataset`): the batches are the same.

Under torchrun (several ranks) the model is wrapped in DistributedDataParallel: ``batch`` is the
**global** batch (images per optimiser step over all ranks), each rank takes its contiguous share
of the same global index list, and DDP averages the gradients, so the update equals a single
process's with the same global batch up to floating-point order (exactly so for a family whose
loss draws no noise; a stochastic loss draws different, equally distributed noise per rank). The
learning rate is therefore not rescaled with the number of ranks. Only rank 0 writes snapshots and
training states. A family's ``loss`` must compute through ``model(...)`` (its forward) for DDP to
synchronise gradients. A training state
(model, EMA, optimizer, images seen) saved every ``save_every`` images therefore lets a rerun
continue exactly where the last state left off.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from neon_cli.errors import UsageError
from neon_cli.fsutil import atomic_path
from neon_cli.progress import ProgressFn, null_progress


@dataclass
class TrainConfig:
    """What determines a training run (all budgets in images seen).

    budget: images seen in this run (B); lr: peak learning rate; batch: images per optimiser step;
    warmup: images over which the learning rate ramps linearly from 0 to lr: the step after
    ``seen`` images uses ``lr * min(seen / warmup, 1)`` (EDM's training_loop.py lr ramp-up, and the
    LambdaLR warm-ups of diffusers' and torchcfm's scripts: the first step has lr 0);
    ema_halflife: EMA half-life in images (None: no EMA; snapshots then hold the raw weights);
    save_every: images between snapshots / training states (None: only at the end); seed: data
    order and training noise.
    """

    budget: int
    lr: float
    batch: int
    warmup: int = 0
    ema_halflife: int | None = None
    save_every: int | None = None
    seed: int = 0

    def check(self) -> None:
        """Raise UsageError naming the flag for a value that cannot train (see :mod:`neon_cli.validate`)."""
        from neon_cli import validate

        validate.positive_int("--budget", self.budget)
        validate.positive("--lr", self.lr)
        validate.positive_int("--batch", self.batch)
        validate.integer("--warmup", self.warmup, low=0)
        if self.ema_halflife is not None:
            validate.positive("--ema-halflife", self.ema_halflife)
        if self.save_every is not None:
            validate.positive_int("--save-every", self.save_every)
        validate.integer("--seed", self.seed, low=0, high=MAX_TRAIN_SEED)


#: Largest training seed: the noise generator of step t is seeded with seed * 1_000_003 + t
#: (+ rank * 2**40), which must stay within torch.Generator.manual_seed's 64 bits.
MAX_TRAIN_SEED = 2**42 - 1


class DataOrder:
    """The data order of a run: position p (0-based count of images seen) is image
    ``perm_e[p mod n]`` of epoch ``e = p // n``, ``perm_e = torch.randperm(n, generator=
    torch.Generator().manual_seed(seed + e))``.

    The permutation of an epoch is drawn once and kept (int32 when n < 2**31: 4 bytes an image) for
    the batches that follow; at most two epochs are held (a batch can straddle an epoch boundary).
    """

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise UsageError("--data: the synthetic set is empty")
        self.n, self.seed = int(n), int(seed)
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            if self.n < 2**31:
                perm = perm.to(torch.int32)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}  # a straddling batch's first part
            self._perms[epoch] = perm
        return perm

    def indices(self, start: int, size: int) -> torch.Tensor:
        """Indices int64 [size] of the images seen at positions start .. start+size-1."""
        parts = []
        pos, left = int(start), int(size)
        while left > 0:
            epoch, off = divmod(pos, self.n)
            take = self.permutation(epoch)[off: off + left]
            parts.append(take)
            pos += len(take)
            left -= len(take)
        return torch.cat(parts).to(torch.int64) if parts else torch.empty(0, dtype=torch.int64)


def batch_indices(n: int, seed: int, start: int, size: int) -> torch.Tensor:
    """Indices int64 [size] of the images seen at positions start .. start+size-1 of the data order
    (see :class:`DataOrder`, which keeps the permutation between calls)."""
    return DataOrder(n, seed).indices(start, size)


@dataclass
class Saving:
    """What a training run writes and resumes from (see :func:`train_loop`).

    state_path: the training state (None: no state, no resume); on_snapshot(images_seen, weights):
    called at each snapshot, its return value recorded in the ledger; provenance: the run's inputs
    stored in the state (e.g. ``{"base_sha256": .., "synthetic_set_sha256": ..}``) and required to
    match on resume; legacy_provenance: per key, the value an older neon recorded, also accepted;
    snapshots: a list that receives the ledger (the resumed state's records first).
    """

    state_path: Path | None = None
    on_snapshot: Callable[[int, torch.nn.Module], Any] | None = None
    provenance: dict[str, Any] | None = None
    legacy_provenance: dict[str, Any] | None = None
    snapshots: list[Any] | None = None


def train_loop(family: Any, model: torch.nn.Module, images: Any, labels: torch.Tensor | None, cfg: TrainConfig,
               saving: Saving | None = None, *, progress: ProgressFn = null_progress, task: str = "finetune") -> torch.nn.Module:
    """Train ``model`` in place on (images uint8 [N, ...], labels int64 [N] or None) for cfg.budget images.

    ``images`` may instead be a set read batch by batch (``len(set)`` and ``set.batch(idx) ->
    (inputs, labels)``: :class:`neon_cli.dataset.SyntheticSet`, streamed from S's shards), with
    ``labels`` None; memory then does not grow with N. The batches are the same either way.

    ``saving`` (:class:`Saving`): calls ``saving.on_snapshot(images_seen, weights)`` every
    ``cfg.save_every`` images and at the end, where ``weights`` is the EMA model if
    ``cfg.ema_halflife`` is set, else ``model``. With ``saving.state_path``, a training state is
    saved atomically at each snapshot and, if present, loaded at the start (resume) when it belongs
    to the same run: the same config (budget and snapshot interval may differ) and the same
    ``saving.provenance`` (``legacy_provenance`` also accepted). Returns the final weights (EMA or raw).

    ``saving.snapshots``: a list that receives what ``on_snapshot`` returns for each snapshot of this run,
    the ones of the resumed state first (the state keeps this ledger, so a resumed run knows its
    earlier snapshots without looking at file names).

    Raises UsageError naming the state file when it is another run's (and what differs), and
    CheckpointError when it cannot be read (``torch.load(weights_only=True)`` refuses it).
    """
    cfg.check()
    if hasattr(images, "batch"):
        data = images
    else:
        from neon_cli.dataset import TensorSet

        data = TensorSet(images, labels)
    loop = _Loop(family, model, data, cfg, saving or Saving(), progress, task)
    loop.start()
    while loop.seen < cfg.budget:
        loop.step_once()
    model.eval()
    return loop.ema if loop.ema is not None else model


class _Loop:
    """The state of :func:`train_loop`: model, optimizer, EMA, images seen, step, ledger, ranks."""

    def __init__(self, family: Any, model: torch.nn.Module, data: Any, cfg: TrainConfig, saving: Saving,
                 progress: ProgressFn, task: str):
        from neon_cli.dist import device

        self.family, self.model, self.data, self.cfg, self.saving = family, model, data, cfg, saving
        self.progress, self.task = progress, task
        self.order = DataOrder(len(data), cfg.seed)
        self.dev = device()
        model.to(self.dev)
        self.opt = family.make_optimizer(model.parameters(), cfg.lr)
        self.ema = copy.deepcopy(model).eval() if cfg.ema_halflife else None
        self.seen = 0
        self.ledger: list[Any] = []

    def start(self) -> None:
        """Resume from the state (when there is one), wrap in DDP under several ranks, set train mode."""
        from neon_cli.dist import rank_world

        cfg, model, saving = self.cfg, self.model, self.saving
        if saving.state_path is not None and saving.state_path.exists():
            self._resume(saving.state_path)
        if saving.snapshots is not None:
            saving.snapshots[:] = self.ledger
        self.rank, self.world = rank_world()
        if self.world > 1 and cfg.batch % self.world:
            raise UsageError(f"--batch: the global batch {cfg.batch} must be divisible by the {self.world} ranks")
        self.loss_model: Any = model
        if self.world > 1:  # DistributedDataParallel: per-rank share of the global batch, gradients averaged
            from torch.nn.parallel import DistributedDataParallel

            self.loss_model = DistributedDataParallel(model)
        model.train()
        self.step = self.seen // cfg.batch
        self.next_save = _next_mark(self.seen, cfg.save_every, cfg.budget)

    def _resume(self, state_path: Path) -> None:
        state = _load_state(state_path, self.dev)
        _check_resumable(state_path, state, self.cfg, self.saving.provenance or {}, self.saving.legacy_provenance or {})
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.seen = int(state["images_seen"])
        self.ledger = list(state.get("snapshots") or [])
        self.progress(self.task, self.seen, self.cfg.budget, message=f"resuming from {state_path.name} at {self.seen} images")

    def step_once(self) -> None:
        """One optimiser step on the next global batch (EDM's lr ramp-up, this rank's share), the EMA
        update, the finite checks, progress, and a snapshot when one is due."""
        cfg, seen, rank, world = self.cfg, self.seen, self.rank, self.world
        size = min(cfg.batch, cfg.budget - seen)
        idx = self.order.indices(seen, size)
        lr = cfg.lr * min(1.0, seen / cfg.warmup) if cfg.warmup else cfg.lr  # images seen before this step (EDM)
        for g in self.opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step + rank * 2**40)
        weight = 1.0
        if world > 1:
            part = torch.tensor_split(idx, world)[rank]
            # DDP averages gradients over ranks; weighting each rank's mean loss by its share of the
            # batch makes that average the gradient of the global batch mean, even for a last,
            # uneven batch (a rank with no rows runs one row at weight 0 so every rank steps).
            weight = len(part) * world / size
            if len(part) == 0:
                part = idx[:1]
            idx = part
        batch_inputs, batch_labels = self.data.batch(idx)
        batch_labels = batch_labels.to(self.dev) if batch_labels is not None else None
        loss = self.family.loss(self.loss_model, batch_inputs.to(self.dev), batch_labels, gen) * weight
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.seen += size
        self.step += 1
        if self.ema is not None:
            _ema_update(self.ema, self.model, size, cfg.ema_halflife)
        loss_value = float(loss.detach())
        _check_finite_loss(loss_value, self.seen, self.step, cfg, self.ledger, world, self.dev)
        self.progress(self.task, self.seen, cfg.budget, unit="img", loss=loss_value)
        if self.seen >= self.next_save:
            self._save()

    def _save(self) -> None:
        """A snapshot and the training state (rank 0 writes; every rank waits at the barrier)."""
        from neon_cli.dist import barrier, is_main

        model, ema, saving, seen = self.model, self.ema, self.saving, self.seen
        weights = (ema if ema is not None else model)
        _check_finite_weights(model, ema, seen, self.cfg, self.ledger)  # never a NaN snapshot or training state
        if is_main():  # only rank 0 writes; the weights are identical on every rank
            if saving.on_snapshot is not None:
                model.eval()
                record = saving.on_snapshot(seen, weights)
                model.train()
                if record is not None:
                    self.ledger.append(record)
                    if saving.snapshots is not None:
                        saving.snapshots.append(record)
            if saving.state_path is not None:
                _save_state(saving.state_path, model, self.opt, ema, seen, self.cfg, saving.provenance or {}, self.ledger)
        barrier()
        self.next_save = _next_mark(seen, self.cfg.save_every, self.cfg.budget)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, size: int, halflife: float) -> None:
    """EMA after a step of ``size`` images: beta = 0.5 ** (size / halflife) (EDM's ema_halflife_kimg
    rule in images); buffers are copied."""
    beta = 0.5 ** (size / halflife)
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm.detach(), 1 - beta)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def _last_kept(ledger: list[Any]) -> str:
    last = next((r for r in reversed(ledger) if isinstance(r, dict) and r.get("file")), None)
    return f"the last snapshot, {last['file']}, is kept" if last else "no snapshot was written"


def _check_finite_loss(value: float, seen: int, step: int, cfg: TrainConfig, ledger: list[Any], world: int, dev: Any) -> None:
    """UsageError at the first step whose loss is inf/NaN (on any rank: under torch.distributed
    the flag is all-reduced, so every rank stops at the same step), naming the step, the images
    seen and ``--lr``, the flag that most likely caused it. Nothing of this step is written: the
    snapshots and training state on disk are the last finite ones."""
    bad = not math.isfinite(value)
    if world > 1:
        import torch.distributed as tdist

        flag = torch.tensor([1.0 if bad else 0.0], device=dev)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        bad = bool(flag.item() > 0)
    if bad:
        raise UsageError(f"the loss became non-finite ({value}) at step {step} ({seen} images seen); "
                         f"--lr {cfg.lr:g} is most likely too high (try a smaller --lr); {_last_kept(ledger)}; "
                         "nothing of this step was written")


def _check_finite_weights(model: Any, ema: Any, seen: int, cfg: TrainConfig, ledger: list[Any]) -> None:
    """UsageError, before a snapshot or training state is written, when a weight of the model (or
    its EMA) is inf/NaN although the loss was finite: one ``isfinite`` pass over the parameters per
    snapshot (weights are identical on every rank, so every rank decides alike)."""
    for net in (model, ema):
        if net is None:
            continue
        for name, p in net.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
                raise UsageError(f"weight {name!r} became non-finite at {seen} images seen; "
                                 f"--lr {cfg.lr:g} is most likely too high (try a smaller --lr); {_last_kept(ledger)}; "
                                 "no snapshot of these weights was written")


#: Config fields a resumed run may change: a state can be continued to a larger budget, with
#: another snapshot interval.
_RESUME_FREE = {"budget", "save_every"}


def _config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = (set(old) | set(new)) - _RESUME_FREE
    return sorted(k for k in keys if old.get(k) != new.get(k))


def _load_state(path: Path, dev: Any) -> dict[str, Any]:
    """The training state at ``path`` (``torch.load(weights_only=True)``); CheckpointError in one
    line when torch refuses it (a pickle with code, a truncated or foreign file)."""
    from neon_cli.errors import CheckpointError

    try:
        state = torch.load(path, weights_only=True, map_location=dev)
    except Exception as exc:  # UnpicklingError (weights_only refused it), RuntimeError (not a torch zip), EOFError
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise CheckpointError(f"{path}: not a neon training state ({type(exc).__name__}: {first}); "
                              "delete it to start this run afresh") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "images_seen", "config"} <= set(state):
        raise CheckpointError(f"{path}: not a neon training state (needs model, optimizer, images_seen, config); "
                              "delete it to start this run afresh")
    return state


def _check_resumable(path: Path, state: dict[str, Any], cfg: TrainConfig, provenance: dict[str, Any],
                     legacy: dict[str, Any]) -> None:
    """UsageError naming ``path`` and what differs unless the state is this run's (a provenance
    value equal to ``legacy``'s, what an older neon recorded for the same input, is this run's)."""
    old_prov = state.get("provenance") or {}
    for key, value in provenance.items():
        if key not in old_prov:
            raise UsageError(f"{path}: training state without a recorded {key} (made by an older neon or another "
                             "tool); cannot tell whether it is this run's: use another -o or delete it")
        if old_prov[key] != value and (key not in legacy or old_prov[key] != legacy[key]):
            raise UsageError(f"{path}: training state of another run: its {key} is {str(old_prov[key])[:12]}..., "
                             f"this run's {str(value)[:12]}...; use another -o or delete it")
    diff = _config_differences(state.get("config") or {}, asdict(cfg))
    if diff:
        old_cfg = state.get("config") or {}
        what = ", ".join(f"{k} {old_cfg.get(k)!r} != {getattr(cfg, k, None)!r}" for k in diff)
        raise UsageError(f"{path}: training state from a run with other settings ({what}); use another -o or delete it")
    if int(state["images_seen"]) > cfg.budget:
        raise UsageError(f"{path}: training state at {int(state['images_seen'])} images, past --budget {cfg.budget}; "
                         "use another -o or delete it")


def snapshot_points(budget: int, batch: int, save_every: int | None) -> list[int]:
    """Images seen at each snapshot :func:`train_loop` makes in a run from 0 to ``budget`` (the
    first step count at or past each multiple of ``save_every``, and the end)."""
    points, seen, mark = [], 0, _next_mark(0, save_every, budget)
    while seen < budget:
        seen += min(batch, budget - seen)
        if seen >= mark:
            points.append(seen)
            mark = _next_mark(seen, save_every, budget)
    return points


def _next_mark(seen: int, every: int | None, budget: int) -> int:
    if not every:
        return budget
    return min(budget, (seen // every + 1) * every)


def _save_state(path: Path, model: torch.nn.Module, opt: Any, ema: Any, seen: int, cfg: TrainConfig,
                provenance: dict[str, Any], ledger: list[Any]) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "images_seen": seen, "config": asdict(cfg),
             "provenance": dict(provenance), "snapshots": list(ledger)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class _GradClipMixin:
    """Clips the global gradient norm of the optimiser's parameters before each step (the
    ``clip_grad_norm_(params, max_norm); optimizer.step()`` of most training scripts), so the
    clipping travels with the optimiser a family hands to the core loop."""

    def __init__(self, params: Any, max_grad_norm: float = 1.0, **kwargs: Any):
        super().__init__(params, **kwargs)  # type: ignore[call-arg]
        self.max_grad_norm = float(max_grad_norm)

    def step(self, closure: Any = None) -> Any:
        grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]  # type: ignore[attr-defined]
        if grads:
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        return super().step(closure)  # type: ignore[misc]


def grad_clipped(base: type) -> type:
    """``base`` (a torch.optim.Optimizer class) whose ``step`` first clips the gradient norm to
    ``max_grad_norm`` (constructor keyword, default 1.0); state dicts are ``base``'s."""
    return type(f"GradClipped{base.__name__}", (_GradClipMixin, base), {})
