"""Sampling a VAR model with VAR's own ``autoregressive_infer_cfg``, reproducible per image.

VAR draws a whole batch from one generator (``g_seed``), so an image depends on the batch it is
sampled in. The family therefore fixes the batches by the seeds themselves: seed s belongs to
block ``s // seed_block``, a block is always sampled whole, as one call
``autoregressive_infer_cfg(B=seed_block, label_B=<the block's labels>, g_seed=<the block's first
seed>, cfg, top_k, top_p, more_smooth)``, and the requested images are kept. So:

* **invariant**: the image of seed s, for given weights and settings, whatever range of seeds,
  batch size, shard size, number of ranks or resume point asked for it, as long as the labels
  follow the active label plan (``--labels``; :func:`neon_cli.labels.block_draws`): the block's
  other images are drawn with their plan labels whether they are requested or not (under
  ``--labels var``, whose seeds repeat in every class, a block is drawn once per class asked);
* **not invariant**: ``seed_block`` itself (another block size regroups the draws), the device
  (CUDA's and the CPU's random streams differ, and so does floating-point rounding), VAR's
  fused/flash kernels (``--set fuse=``), and a caller's labels that differ from the plan for
  other seeds of the same block. ``seed_block=1`` makes every image depend on its own seed and
  label alone (each image one call, as the Neon repo's ``generate_dataset.py --batch_size 1``).

Images: VAR returns [B, 3, H, W] in [0, 1]; neon stores ``(x.clamp(0, 1) * 255).to(uint8)``
(truncation, as the Neon repository's ``generate_dataset.py`` writes its PNGs).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from neon_cli.labels import block_draws
from neon_var.io import unwrap


def block_plan(seeds: torch.Tensor, block: int) -> list[int]:
    """Sorted block indices (``seed // block``) covering ``seeds`` (int64 [N], >= 0)."""
    return sorted({int(s) // block for s in seeds.tolist()})


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> uint8 (x * 255, truncated, as the Neon repo saves PNGs)."""
    return (images.clamp(0, 1) * 255).to(torch.uint8)


def sample(model: Any, seeds: Any, labels: Any, settings: Mapping[str, Any]) -> torch.Tensor:
    """uint8 [N, 3, H, W] for int64 ``seeds`` [N] (>= 0) and ``labels`` [N] (or None: VAR draws
    them from the block's generator); see the module docstring for what an image depends on.

    ``settings``: ``cfg`` (VAR's guidance ratio, ramped over the scales by VAR), ``top_k`` (0 =
    off; values >= the codebook size keep every token, so they are passed as 0), ``top_p`` (0 =
    off), ``more_smooth``, ``seed_block``. Raises ValueError for negative seeds.
    """
    m = unwrap(model)
    var = m.var
    seeds = torch.as_tensor(seeds, dtype=torch.int64).cpu()
    if len(seeds) and int(seeds.min()) < 0:
        raise ValueError("var family: seeds must be >= 0")
    block = int(settings.get("seed_block", 50))
    dev = var.lvl_1L.device
    if getattr(var, "rng", None) is None or var.rng.device != dev:
        var.rng = torch.Generator(device=dev)  # as VAR's trainer does when the model changes device
    nc = int(m.info["num_classes"])
    top_k = int(settings.get("top_k", 0))
    if top_k >= int(m.info["V"]):
        top_k = 0  # keeps all tokens either way; VAR's topk would fail for k > V
    if not len(seeds):
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    lab_list = torch.as_tensor(labels).tolist() if labels is not None else None
    out: list[Any] = [None] * len(seeds)
    # labels None: VAR draws every label from the block's generator, so no labels are filled in
    for first, block_labels, asked in block_draws(seeds.tolist(), lab_list, block, nc if labels is not None else 0):
        label_B = torch.tensor(block_labels, dtype=torch.int64, device=dev) if block_labels is not None else None
        with torch.inference_mode():
            images = var.autoregressive_infer_cfg(B=block, label_B=label_B, g_seed=first,
                                                  cfg=float(settings.get("cfg", 1.5)), top_k=top_k,
                                                  top_p=float(settings.get("top_p", 0.0)),
                                                  more_smooth=bool(settings.get("more_smooth", False)))
        images = to_uint8(images).cpu()
        for j, idx in asked.items():
            for i in idx:
                out[i] = images[j]
    return torch.stack(out)
