"""torch.distributed plumbing for ``torchrun`` / ``srun`` (nothing home-made: rank, world size and
rendezvous come from the environment torchrun or Slurm set, the collectives are torch.distributed's).

* ``torchrun --nproc_per_node=K -m neon_cli synth ...`` sets RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT; :func:`init_from_env` then calls
  ``torch.distributed.init_process_group`` with NCCL on GPUs and gloo on CPU.
* Under ``srun`` without torchrun, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID stand in for
  RANK / WORLD_SIZE / LOCAL_RANK; MASTER_ADDR and MASTER_PORT must be exported by the job script
  (README has an example).
* With neither, everything runs in one process and every helper here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or Slurm's environment; (0, 1, 0) if neither."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ.get("SLURM_PROCID", 0)), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_from_env() -> bool:
    """Initialise the default process group when launched with several ranks; True if it did.

    Backend: NCCL when CUDA is available (device ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    rank, world, local = env_world()
    if world <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def shutdown() -> None:
    """Destroy the process group if this process created one (never imports torch itself: a
    command that did not need torch, such as a safetensors merge, must not pay for it)."""
    if "torch.distributed" not in sys.modules:
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except ImportError:  # pragma: no cover
        pass


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (the rank that writes manifests, checkpoints and reports)."""
    return rank_world()[0] == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device() -> Any:
    """The torch device of this rank: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_device() -> Any:
    """The device the process group's backend moves tensors from: ``cuda:<current device>`` for
    NCCL (it has no CPU transport: "No backend type associated with device type cpu"), CPU for
    gloo and without a process group. Collectives here stage their tensors on it."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (torch.distributed.broadcast_object_list, its
    pickled bytes staged on :func:`backend_device`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=backend_device())
    return box[0]


def gather_cat(tensor: Any, sizes: list[int]) -> Any:
    """Concatenate on every rank the per-rank tensors (dim 0 sizes ``sizes``, same trailing shape).

    torch.distributed.all_gather on padded tensors staged on :func:`backend_device` (CUDA under
    NCCL, CPU under gloo); the result is on ``tensor``'s device, in rank order.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    dev = backend_device()
    biggest = max(sizes)
    pad = torch.zeros((biggest,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=dev)
    pad[: tensor.shape[0]] = tensor.to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(tensor.device)


@contextlib.contextmanager
def main_rank_lock(target: Any, flag: str = "-o", *, folder: bool = False) -> Iterator[None]:
    """:func:`neon_cli.fsutil.exclusive_lock` on ``target`` for the block, taken by rank 0 alone.

    Under torchrun rank 0 tries the lock and broadcasts the outcome, so when another neon run
    holds it every rank raises the same one-line UsageError together (none is left waiting in a
    collective). Without a process group this is ``exclusive_lock`` itself.
    """
    from neon_cli.errors import UsageError
    from neon_cli.fsutil import exclusive_lock

    rank, world = rank_world()
    with contextlib.ExitStack() as stack:
        refused = None
        if rank == 0:
            try:
                stack.enter_context(exclusive_lock(target, flag, folder=folder))
            except UsageError as exc:
                refused = str(exc)
        if world > 1:
            refused = broadcast_object(refused)
        if refused is not None:
            raise UsageError(refused)
        yield


def run_on_main(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on rank 0 alone; its result, or its error, on every rank.

    For checks that read or change shared files (a plan to compare, stale files to remove) that
    several ranks must not race on: a :class:`~neon_cli.errors.NeonError` raised on rank 0 is
    raised, with the same class and message, on every rank, so all exit together.
    """
    from neon_cli.errors import InternalError, NeonError

    rank, world = rank_world()
    if world == 1:
        return fn(*args, **kwargs)
    box: Any = None
    failure: BaseException | None = None
    if rank == 0:
        try:
            box = ("ok", fn(*args, **kwargs))
        except NeonError as exc:
            failure, box = exc, ("error", type(exc), str(exc))
        except BaseException as exc:  # broadcast before re-raising so no rank waits forever
            failure, box = exc, ("error", InternalError, f"rank 0: {type(exc).__name__}: {exc}")
    box = broadcast_object(box)
    if failure is not None:
        raise failure
    if box[0] == "error":
        raise box[1](box[2])
    return box[1]
