"""``--labels``: each paper system's label protocol against the loop its own script runs, split
invariance of plans and of block draws, and the protocol recorded / enforced by synth, eval, tune-w."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neon_cli import labels as L
from neon_cli.errors import UsageError
from cli_helpers import invoke


def _generate_dataset_order(seed: int, per_class: int, classes: int) -> list[tuple[int, int]]:
    """(index-within-class seed, label) in the order the Neon repo's VAR generate_dataset.py visits
    them on one process: for cls_idx in class order, gid = start + ptr + i (start 0)."""
    return [(seed + gid, cls) for cls in range(classes) for gid in range(per_class)]


@pytest.mark.parametrize("seed", [0, 7])
def test_protocols_match_the_scripts_loops(seed):
    k, n = 10, 40
    # xAR eval.py: np.arange(class_num).repeat(num_images // class_num); seeds are the plan's
    seeds, labels = L.check("xar", n, k, seed=seed).seeds_labels()
    assert labels == np.arange(k).repeat(n // k).tolist()
    assert seeds == list(range(seed, seed + n))
    # VAR generate_dataset.py: class order, g_seed = seed + index within the class
    seeds, labels = L.check("var", n, k, seed=seed).seeds_labels()
    assert list(zip(seeds, labels)) == _generate_dataset_order(seed, n // k, k)
    # balanced: seed % K
    seeds, labels = L.check(None, n, k, seed=seed).seeds_labels()
    assert labels == [s % k for s in range(seed, seed + n)]
    # edm: seeds only, the family draws the labels; unconditional: no labels in any protocol
    assert L.check("edm", n, k, seed=seed).seeds_labels()[1] is None
    for proto in L.PROTOCOLS:
        assert L.check(proto, 13, 0, seed=seed).seeds_labels() == (list(range(seed, seed + 13)), None)


@pytest.mark.parametrize("proto", ["balanced", "var", "xar"])
def test_any_split_gives_the_same_plan(proto):
    plan = L.check(proto, 60, 6, seed=3)
    whole = plan.seeds_labels()
    for cuts in ([0, 60], [0, 7, 8, 31, 60], [0, 1, 59, 60]):
        parts = [plan.seeds_labels(a, b - a) for a, b in zip(cuts, cuts[1:])]
        assert sum((p[0] for p in parts), []) == whole[0]
        assert sum((p[1] for p in parts), []) == whole[1]


def test_check_refuses_by_flag():
    with pytest.raises(UsageError, match=r"^--labels: unknown protocol 'nope'"):
        L.check("nope", 10, 10)
    with pytest.raises(UsageError, match=r"--labels xar: --num-images 25 is not a multiple of the model's 10 classes"):
        L.check("xar", 25, 10)
    with pytest.raises(UsageError, match=r"--labels var: --num-samples 5 is not a multiple"):
        L.check("var", 5, 10, num_flag="--num-samples")

    class NoDraw:
        name = "toy"

    with pytest.raises(UsageError, match=r"--labels edm: family 'toy' has no per-seed label draw"):
        L.check("edm", 10, 10, NoDraw())
    assert L.check("EDM", 10, 0, NoDraw()).protocol == "edm"  # unconditional: nothing to draw


def _fake_draw(calls):
    """A block sampler whose every image depends on the whole block's labels and its first seed."""
    def draw(first, block_labels):
        calls.append((first, None if block_labels is None else block_labels.tolist()))
        h = 0 if block_labels is None else int(sum((j + 1) * 31 ** j * int(v) for j, v in enumerate(block_labels.tolist())) % 997)
        return torch.tensor([[first * 1000 + j * 10 + h] for j in range(len(block_labels) if block_labels is not None else 4)])
    return draw


@pytest.mark.parametrize("proto", ["balanced", "var", "xar"])
def test_block_sampling_is_split_invariant_under_each_protocol(proto):
    from neon_cli.repo import sample_by_seed_blocks

    k, n, block = 4, 32, 4
    plan = L.check(proto, n, k, seed=0)
    seeds, labels = plan.seeds_labels()
    with L.active(plan):
        whole = sample_by_seed_blocks(torch.tensor(seeds), torch.tensor(labels), block, k, _fake_draw([]))
        for cuts in ([0, 3, 17, 32], [0, 1, 2, 30, 32]):
            parts = [sample_by_seed_blocks(torch.tensor(seeds[a:b]), torch.tensor(labels[a:b]), block, k, _fake_draw([]))
                     for a, b in zip(cuts, cuts[1:])]
            assert torch.equal(torch.cat(parts), whole)


def test_var_blocks_are_generate_dataset_batches():
    """--labels var with seed_block = the script's --batch_size: each class's batch is one block draw
    with every label that class and g_seed = seed + index within the class (here seed 0)."""
    from neon_cli.repo import sample_by_seed_blocks

    k, per_class, block = 3, 8, 4
    plan = L.check("var", k * per_class, k, seed=0)
    seeds, labels = plan.seeds_labels()
    calls = []
    with L.active(plan):
        sample_by_seed_blocks(torch.tensor(seeds[5:20]), torch.tensor(labels[5:20]), block, k, _fake_draw(calls))
    # images 5..19: class 0 index 5-7, class 1 all, class 2 index 0-3
    # (drawn block by block, a block once per class asked of it)
    assert calls == [(0, [1] * 4), (0, [2] * 4), (4, [0] * 4), (4, [1] * 4)]


def test_xar_fill_and_default_fill():
    plan = L.check("xar", 8, 2, seed=0)  # labels 0 0 0 0 1 1 1 1
    with L.active(plan):
        (first, lab, asked), = L.block_draws([5], [1], 8, 2)
    assert (first, lab, asked) == (0, [0, 0, 0, 0, 1, 1, 1, 1], {5: [0]})
    (first, lab, asked), = L.block_draws([5], [1], 8, 2)  # no plan: seed % K for the others
    assert lab == [0, 1, 0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="seed 5 asked with labels 1 and 0"):
        L.block_draws([5, 5], [1, 0], 8, 2)


def test_edm_protocol_draws_from_each_seeds_generator():
    """EDM's StackedRandomGenerator order (generate.py / cal_metrics_all.py): per seed a CPU
    generator seeded seed % 2**32, the latent randn([C, H, W]) first, then randint(label_dim)."""
    from neon_edm import family as edm

    class Net(torch.nn.Module):
        img_channels, img_resolution, label_dim = 3, 4, 10

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

    seeds = torch.arange(2**32 - 3, 2**32 + 5)  # wraps at 2**32, as EDM's manual_seed(seed % (1 << 32))
    gens = [torch.Generator().manual_seed(int(s) % (1 << 32)) for s in seeds]
    torch.stack([torch.randn([3, 4, 4], generator=g) for g in gens])
    want = torch.stack([torch.randint(10, size=[], generator=g) for g in gens])
    assert torch.equal(edm.draw_labels(Net(), seeds), want)
    plan = L.check("edm", len(seeds), 10, edm, seed=int(seeds[0]))
    s, lab = L.plan_tensors(plan, edm, Net())
    assert torch.equal(s, seeds) and torch.equal(lab, want)


def test_synth_records_and_enforces_the_protocol(tmp_path):
    out = tmp_path / "S"
    invoke("synth", "digits", "-n", 10, "--seed", 3, "-o", out, "--labels", "xar", "--shard-size", 4, "--batch", 4, "-q")
    man = json.loads((out / "manifest.json").read_text())
    assert man["label_protocol"] == "xar" and man["labels"].startswith("xar:")
    from safetensors.torch import load_file

    shards = [load_file(str(out / f"shard-{k:05d}.safetensors")) for k in range(3)]
    assert torch.cat([d["labels"] for d in shards]).tolist() == list(range(10))  # sorted; balanced would be 3..9, 0..2
    assert torch.cat([d["seeds"] for d in shards]).tolist() == list(range(3, 13))
    res = invoke("synth", "digits", "-n", 10, "--seed", 3, "-o", out, "--shard-size", 4, "--batch", 4, "-q", code=2)
    assert "another label_protocol ('xar' != 'balanced')" in res.output


def test_evaluator_and_tune_cache_key_carry_the_protocol():
    from neon_cli.evaluate import Evaluator
    from neon_cli.family import get_family, resolve_settings
    from neon_cli.tune.cache import static_key

    fam = get_family("digits")
    ev = Evaluator(fam, resolve_settings(fam), 20, seed=5, labels="var", num_classes=10)
    assert ev.seeds.tolist() == [5, 6] * 10 and ev.labels.tolist() == np.arange(10).repeat(2).tolist()
    with pytest.raises(UsageError, match="--num-samples 21 is not a multiple"):
        Evaluator(fam, resolve_settings(fam), 21, labels="xar", num_classes=10)
    assert "labels" not in static_key(fam, "1", batch=8)
    assert static_key(fam, "1", batch=8, labels="xar")["labels"] == "xar"


def test_tune_w_refuses_a_confirmation_plan_the_protocol_cannot_split(tmp_path):
    """--labels xar needs --confirm-samples to be a multiple of the classes too, checked before any evaluation."""
    import shutil
    from pathlib import Path

    import neon_digits

    snap = tmp_path / "theta_s.safetensors"
    shutil.copy(Path(neon_digits.__file__).parent / "weights" / "base.safetensors", snap)
    res = invoke("tune-w", "digits", "-s", snap, "--labels", "xar", "-n", 20, "--confirm-samples", 15,
                 "--cache", tmp_path / "c.jsonl", "-q", code=2)
    assert "--labels xar: --confirm-samples 15 is not a multiple of the model's 10 classes" in res.output
    assert not (tmp_path / "c.jsonl").exists() or not (tmp_path / "c.jsonl").read_text().strip()  # nothing evaluated
