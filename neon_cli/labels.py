"""Class-label protocols (``--labels``): which class label, and which seed, image i of a plan gets.

A plan is ``num`` images from the first seed ``seed`` for a model with ``K`` classes. The
protocols (the paper's systems each made their sets and FIDs their own way):

``balanced`` (neon's default)
    image i: seed ``seed + i``, label ``(seed + i) % K``.
``edm``
    EDM's ``generate.py`` without ``--class`` and the Neon paper's ``edm/cal_metrics_all.py``
    (``generate_images``): image i has seed ``seed + i`` and the label drawn from that seed's own
    generator, ``torch.Generator(device).manual_seed(seed % 2**32)``, by one
    ``randint(K, size=[])`` right after the image's latent ``randn([C, H, W])`` (float32), on the
    sampling device (``StackedRandomGenerator``; CUDA and CPU generators give different labels,
    as in EDM). The family draws them (its ``draw_labels(model, seeds)``; only the ``edm`` family has
    one), so this module returns None for them.
``var``
    the Neon repository's ``VAR/*/generate_dataset.py``: classes in order, ``num / K`` images per
    class, and the generator seed restarting in every class: image i = ``c * per_class + j`` has
    label ``c`` and seed ``seed + j`` (``g_seed = seed + index within the class``). Seeds repeat
    across classes, as in the script. With the ``var`` family's ``seed_block`` equal to the
    script's ``--batch_size``, ``seed`` a multiple of it and ``per_class`` a multiple of it (or
    ``seed_block = 1``, which fits the paper's ``--num_images 1``), neon's blocks are the script's
    batches.
``xar``
    xAR's ``eval.py`` (``engine_xar.evaluate``): ``np.arange(K).repeat(num // K)``, labels sorted by
    class; image i has seed ``seed + i`` and label ``i // (num / K)``.

``var`` and ``xar`` need ``num`` to be a multiple of ``K`` (the scripts make the same number of
images per class; xAR's ``eval.py`` asserts it). Every protocol gives each image its seed and
label from its index in the whole plan alone, so any shard size, batch size, rank split or resume
point gives the same set.

Families that sample a whole block of seeds from one generator (VAR, xAR, IMM:
:func:`neon_cli.repo.sample_by_seed_blocks`) also draw the block's seeds nobody asked for; their
labels come from :func:`block_draws` under the plan made active by :func:`active`, so that a block
is always drawn with the same labels whichever of its images were asked for.

This module imports nothing heavy (no torch, no numpy) at import time.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from neon_cli.errors import UsageError

PROTOCOLS = ("balanced", "edm", "var", "xar")
DEFAULT = "balanced"

#: what each protocol follows, for help texts and reports
SOURCES = {
    "balanced": "neon: label = seed % classes",
    "edm": "EDM generate.py without --class / Neon cal_metrics_all.py: randint(classes) from the seed's generator after its latent",
    "var": "Neon VAR generate_dataset.py: classes in order, g_seed = seed + index within the class",
    "xar": "xAR eval.py: np.arange(classes).repeat(n // classes), seeds seed + i",
}

#: the labels description kept in synth manifests for the default protocol (unchanged from before --labels)
BALANCED_TEXT = "(seed + i) % num_classes"


@dataclass(frozen=True)
class LabelPlan:
    """A checked plan: ``protocol`` over ``num`` images from seed ``seed`` with ``num_classes`` classes (0: none)."""

    protocol: str
    seed: int
    num: int
    num_classes: int

    @property
    def per_class(self) -> int:
        """Images per class of the ``var`` / ``xar`` protocols (``num // num_classes``)."""
        return self.num // self.num_classes if self.num_classes else 0

    def text(self) -> str | None:
        """The manifest's ``labels`` description (None for an unconditional model)."""
        if not self.num_classes:
            return None
        if self.protocol == "balanced":
            return BALANCED_TEXT
        return f"{self.protocol}: {SOURCES[self.protocol]}"

    def seeds_labels(self, start: int = 0, count: int | None = None) -> tuple[list[int], list[int] | None]:
        """Seeds and labels (Python ints) of images ``start .. start + count - 1`` of the plan.

        Labels are None for an unconditional model and for ``edm`` (drawn by the family:
        :func:`plan_tensors`). Raises ValueError for a range outside the plan.
        """
        count = self.num - start if count is None else count
        if start < 0 or count < 0 or start + count > self.num:
            raise ValueError(f"images {start}..{start + count - 1} are outside the plan of {self.num}")
        idx = range(start, start + count)
        k = self.num_classes
        if self.protocol == "var" and k:
            pc = self.per_class
            return [self.seed + i % pc for i in idx], [i // pc for i in idx]
        seeds = [self.seed + i for i in idx]
        if not k or self.protocol == "edm":
            return seeds, None
        if self.protocol == "xar":
            return seeds, [i // self.per_class for i in idx]
        return seeds, [s % k for s in seeds]

    def fill_label(self, seed: int, group_label: int | None) -> int:
        """The label of a seed a block draw includes but nobody asked for (see :func:`block_draws`)."""
        k = self.num_classes
        if self.protocol == "var" and group_label is not None:
            return group_label  # a block of the var protocol lies in one class
        if self.protocol == "xar" and self.seed <= seed < self.seed + self.num:
            return (seed - self.seed) // self.per_class
        return seed % k if k else 0


def check(protocol: str | None, num: int, num_classes: int, family: Any = None, *, seed: int = 0,
          flag: str = "--labels", num_flag: str = "--num-images") -> LabelPlan:
    """The :class:`LabelPlan` of ``protocol`` (None: ``balanced``), checked before any work.

    Raises UsageError naming ``flag``: an unknown protocol; ``var`` / ``xar`` with ``num`` not a
    multiple of the classes (``num_flag`` named); ``edm`` for a class-conditional family without
    a per-seed label draw (``family.draw_labels``). For an unconditional model every protocol
    gives the same (label-free) plan.
    """
    proto = DEFAULT if protocol is None else str(protocol).strip().lower()
    if proto not in PROTOCOLS:
        raise UsageError(f"{flag}: unknown protocol {protocol!r} (one of: {', '.join(PROTOCOLS)})")
    k = int(num_classes or 0)
    if k and proto in ("var", "xar") and int(num) % k:
        raise UsageError(f"{flag} {proto}: {num_flag} {num} is not a multiple of the model's {k} classes "
                         f"(the {proto} protocol makes the same number of images per class)")
    if k and proto == "edm" and family is not None and not callable(getattr(family, "draw_labels", None)):
        raise UsageError(f"{flag} edm: family {getattr(family, 'name', family)!r} has no per-seed label draw "
                         f"(EDM's StackedRandomGenerator); use balanced, var or xar")
    return LabelPlan(proto, int(seed), int(num), k)


def plan_tensors(plan: LabelPlan, family: Any, model: Any, start: int = 0, count: int | None = None):
    """(seeds int64 [n], labels int64 [n] or None) of images ``start .. start + count - 1``, as torch tensors.

    For ``edm`` the labels come from ``family.draw_labels(model, seeds)`` (the model on its sampling
    device); with ``model`` None they are left None (to be drawn once a model is there).
    """
    import torch

    seeds, labels = plan.seeds_labels(start, count)
    s = torch.tensor(seeds, dtype=torch.int64)
    if plan.protocol == "edm" and plan.num_classes:
        if model is None:
            return s, None
        lab = torch.as_tensor(family.draw_labels(model, s), dtype=torch.int64).cpu()
        return s, lab
    return s, (torch.tensor(labels, dtype=torch.int64) if labels is not None else None)


_ACTIVE: contextvars.ContextVar[LabelPlan | None] = contextvars.ContextVar("neon_label_plan", default=None)


@contextlib.contextmanager
def active(plan: LabelPlan | None) -> Iterator[None]:
    """Make ``plan`` the one :func:`block_draws` fills unrequested seeds from, for the ``with`` body."""
    token = _ACTIVE.set(plan)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def block_draws(seeds: Sequence[int], labels: Sequence[int] | None, block: int,
                num_classes: int) -> list[tuple[int, list[int] | None, dict[int, list[int]]]]:
    """The whole-block draws that give images of ``seeds`` (a block-seeded family).

    Seed s belongs to block ``s // block``. Returns ``[(first_seed, block_labels, {j: [i, ...]})]``
    sorted by block: draw the block with ``block_labels`` ([block] ints, None without classes) and
    image j of the draw is requested image i. Requested seeds keep their labels; the others get
    the active plan's :meth:`LabelPlan.fill_label` (no active plan: ``seed % classes``, neon's
    balanced plan). Under the ``var`` protocol (seeds repeat across classes) a block is drawn once
    per label asked of it, all its seeds with that label, as ``generate_dataset.py`` draws a
    class's batch. Raises ValueError for a negative seed, or the same seed asked twice with two
    labels outside the ``var`` protocol.
    """
    plan = _ACTIVE.get()
    if plan is not None and plan.num_classes != int(num_classes or 0):
        plan = None  # a plan for another model (e.g. a scorer's own sampling)
    nc = int(num_classes or 0)
    per_label = plan is not None and plan.protocol == "var" and nc > 0
    groups: dict[tuple[int, int | None], dict[int, int]] = {}
    asked: dict[tuple[int, int | None], dict[int, list[int]]] = {}
    for i, s in enumerate(seeds):
        s = int(s)
        if s < 0:
            raise ValueError("seeds must be >= 0")
        lab = int(labels[i]) if labels is not None and nc else (s % nc if nc else 0)
        key = (s // block, lab if per_label else None)
        got = groups.setdefault(key, {})
        if s in got and got[s] != lab:
            raise ValueError(f"seed {s} asked with labels {got[s]} and {lab} in one call")
        got[s] = lab
        asked.setdefault(key, {}).setdefault(s - key[0] * block, []).append(i)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        b, group_label = key
        first = b * block
        if nc:
            fill = plan.fill_label if plan is not None else (lambda s, _g: s % nc)
            block_labels = [groups[key].get(s, None) for s in range(first, first + block)]
            block_labels = [lab if lab is not None else fill(first + j, group_label) for j, lab in enumerate(block_labels)]
        else:
            block_labels = None
        out.append((first, block_labels, asked[key]))
    return out


__all__ = ["PROTOCOLS", "DEFAULT", "SOURCES", "LabelPlan", "check", "plan_tensors", "active", "block_draws"]
