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

import os
import sys
from typing import Any


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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (torch.distributed.broadcast_object_list)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_cat(tensor: Any, sizes: list[int]) -> Any:
    """Concatenate on every rank the per-rank tensors (dim 0 sizes ``sizes``, same trailing shape).

    Uses torch.distributed.all_gather on padded tensors (gloo and NCCL both support it).
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    biggest = max(sizes)
    pad = torch.zeros((biggest,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    pad[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
