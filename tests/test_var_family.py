"""The ``var`` family through the stand-in VAR checkout in tests/fixtures/var_repo (tiny, CPU).

The stand-in has VAR's interfaces (``build_vae_var``, ``autoregressive_infer_cfg``, ``forward``,
``img_to_idxBl``, ``idxBl_to_var_input``) and key layout; its networks are the project's own. So
these tests pin what the family does *with* those interfaces: samples equal the sampler called
directly block by block, the loss equals VARTrainer's formula written out on the stand-in's
modules, the optimiser VAR's groups and clipping, files load with ``strict=True``.
``benchmarks/verify_var.py`` runs the same comparisons against the real repository.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neon_cli.errors import CheckpointError, FamilyError, UsageError
from neon_cli.family import get_family, resolve_settings
from neon_cli.report import Report

REPO = Path(__file__).resolve().parent / "fixtures" / "var_repo"
TINY = dict(patch_nums=(1, 2, 4), V=32, Cvae=8, ch=8, share_quant_resi=2, num_classes=4, depth=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stand_in():
    sys.path.insert(0, str(REPO))
    import models

    assert Path(models.__file__).resolve().parent == REPO / "models"
    return models


@pytest.fixture(scope="module")
def fam():
    return get_family("var")


@pytest.fixture(scope="module")
def ckpts(stand_in, tmp_path_factory):
    """Plain state dicts of a tiny stand-in VAR (depth 2: width 128) and its VQVAE. VAR's init
    nearly zeroes the blocks' AdaLN gains; noise on every weight makes the class condition (and
    so cfg) change the samples, as in a trained model."""
    torch.manual_seed(0)
    vae, var = stand_in.build_vae_var(device="cpu", **TINY)
    with torch.no_grad():
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    d = tmp_path_factory.mktemp("var")
    torch.save(var.state_dict(), d / "var.pth")
    torch.save(vae.state_dict(), d / "vae.pth")
    return d / "var.pth", d / "vae.pth"


def _pairs(ckpts, *more):
    return [f"repo={REPO}", f"vae={ckpts[1]}", *more]


def _load(fam, ckpts, *more, purpose="sample"):
    return fam.load(str(ckpts[0]), settings=resolve_settings(fam, _pairs(ckpts, *more), train=True), purpose=purpose)


def _fresh(stand_in, path):
    """A stand-in VAR loaded the way VAR's scripts load a checkpoint (strict)."""
    _, var = stand_in.build_vae_var(device="cpu", **TINY)
    var.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return var


# ---------------------------------------------------------------------------------------------
# loading


def test_load_reads_architecture_from_shapes_and_trainer_containers(fam, ckpts, tmp_path):
    model = _load(fam, ckpts)
    info = {k: model.info[k] for k in TINY}
    assert info == TINY and model.info["L"] == 21
    base = torch.load(ckpts[0], weights_only=True)
    assert all(torch.equal(model.var.state_dict()[k], v) for k, v in base.items())
    assert not any(k.startswith("vae") for k in model.state_dict())  # the VQVAE is in no state dict
    assert fam.model_num_classes(str(ckpts[0])) == 4

    # VAR's trainer checkpoint: {'trainer': {var_wo_ddp, vae_local, ...}, 'args': Namespace}, torch.compile prefix
    vae_sd = torch.load(ckpts[1], weights_only=True)
    container = tmp_path / "ar-ckpt-last.pth"
    torch.save({"epoch": 3, "iter": 0, "args": argparse.Namespace(depth=2, pn="1_2_4"),
                "trainer": {"config": {"label_smooth": 0.0}, "var_wo_ddp": {f"_orig_mod.{k}": v for k, v in base.items()},
                            "vae_local": vae_sd, "var_opt": {"optimizer": {"state": {}, "param_groups": []}}}}, container)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(container, weights_only=True)  # what the Namespace allowance is for
    again = fam.load(str(container), settings=resolve_settings(fam, [f"repo={REPO}", f"vae={container}"]))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_load_errors_name_the_flag(fam, ckpts, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="--set vae"):
        fam.load(str(ckpts[0]), settings=resolve_settings(fam, [f"repo={REPO}"]))
    with pytest.raises(CheckpointError, match="--set vae: .* not a VAR VQVAE"):
        fam.load(str(ckpts[0]), settings=resolve_settings(fam, [f"repo={REPO}", f"vae={ckpts[0]}"]))
    with pytest.raises(CheckpointError, match="--model: .* not a VAR transformer"):
        fam.load(str(ckpts[1]), settings=resolve_settings(fam, _pairs(ckpts)))
    with pytest.raises(CheckpointError, match="--model: .*weights do not fit"):
        _load(fam, ckpts, "depth=3")
    with pytest.raises(FamilyError, match="--set repo: .* is not a checkout of FoundationVision/VAR"):
        fam.load(str(ckpts[0]), settings=resolve_settings(fam, [f"repo={tmp_path}", f"vae={ckpts[1]}"]))
    monkeypatch.setenv("NEON_VAR_REPO", str(tmp_path / "nowhere"))
    with pytest.raises(FamilyError, match="NEON_VAR_REPO: .* is not a folder"):
        fam.load(str(ckpts[0]), settings=resolve_settings(fam, [f"vae={ckpts[1]}"]))
    monkeypatch.setenv("NEON_VAR_REPO", str(REPO))
    assert fam.load(str(ckpts[0]), settings=resolve_settings(fam, [f"vae={ckpts[1]}"])).info["depth"] == 2


def test_build_vae_var_side_effect_on_torch_is_undone():
    from neon_var.io import _init_hooks_restored

    own = {cls: cls.reset_parameters for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)}
    assert "reset_parameters" not in torch.nn.Conv2d.__dict__  # inherited from _ConvNd
    with _init_hooks_restored():  # what VAR's build_vae_var does to the whole process
        for cls in own:
            cls.reset_parameters = lambda self: None
    assert {cls: cls.reset_parameters for cls in own} == own
    assert "reset_parameters" not in torch.nn.Conv2d.__dict__
    assert torch.nn.Linear(3, 3).weight.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# sampling


def test_sample_is_var_sampler_called_per_seed_block(fam, ckpts):
    from neon_var.sampling import to_uint8

    model = _load(fam, ckpts)
    st = resolve_settings(fam, _pairs(ckpts, "cfg=2.0", "top_p=0.9", "seed_block=4"))
    assert st["top_k"] == 900 > TINY["V"]  # keeps every token: passed to VAR as 0
    seeds = torch.arange(12)
    labels = seeds % 4
    neon = fam.sample(model, seeds, labels, st)
    assert neon.shape == (12, 3, 8, 8) and neon.dtype == torch.uint8
    ref = torch.cat([to_uint8(model.var.autoregressive_infer_cfg(B=4, label_B=labels[b * 4:(b + 1) * 4], g_seed=4 * b,
                                                                 cfg=2.0, top_k=0, top_p=0.9)) for b in range(3)])
    assert torch.equal(neon, ref)
    pick = torch.tensor([9, 2, 5])
    assert torch.equal(fam.sample(model, pick, pick % 4, st), neon[pick])  # any range: the same image per seed
    assert not torch.equal(fam.sample(model, seeds, labels, {**st, "seed_block": 3}), neon)  # the block size is part of kappa
    assert not torch.equal(fam.sample(model, seeds, labels, {**st, "cfg": 0.0}), neon)  # cfg is gamma
    assert fam.guidance == "cfg"
    with pytest.raises(FamilyError, match="seeds must be >= 0"):
        fam.sample(model, torch.tensor([-1]), torch.tensor([0]), st)


def test_synth_images_do_not_depend_on_shards_or_batches(ckpts, tmp_path):
    from neon_cli.synth import load_synthetic, synthesize

    pairs = _pairs(ckpts, "seed_block=4")
    synthesize("var", ckpts[0], num=10, out_dir=tmp_path / "a", shard_size=3, batch=2, set_pairs=pairs, report=Report("s"))
    synthesize("var", ckpts[0], num=10, out_dir=tmp_path / "b", shard_size=10, batch=10, set_pairs=pairs, report=Report("s"))
    a, la, _ = load_synthetic(tmp_path / "a")
    b, lb, _ = load_synthetic(tmp_path / "b")
    assert torch.equal(a, b) and la.tolist() == lb.tolist() == [i % 4 for i in range(10)]


# ---------------------------------------------------------------------------------------------
# training recipe


def test_loss_is_vartrainer_objective(fam, ckpts):
    model = _load(fam, ckpts, "ls=0.1", purpose="train").train()
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (5, 3, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 0])
    tokens = fam.encode(model, images)
    x = images.float() / 255 * 2 - 1
    gt = torch.cat(model.vae.img_to_idxBl(x), 1)
    assert tokens.dtype == torch.int16 and tokens.shape == (5, 21) and torch.equal(tokens.long(), gt)

    rng_before = torch.get_rng_state()
    value = fam.loss(model, tokens, labels, torch.Generator().manual_seed(9))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the draws are the step generator's, not the caller's
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(9)))
    torch.manual_seed(seed)
    split = [gt[:, a:b] for a, b in ((0, 1), (1, 5), (5, 21))]
    logits = model.var(labels, model.vae.quantize.idxBl_to_var_input(split))
    ce = F.cross_entropy(logits.view(-1, 32), gt.view(-1), label_smoothing=0.1, reduction="none").view(5, 21)
    want = ce.mul(torch.ones(1, 21) / 21).sum(-1).mean()  # VARTrainer: loss_weight 1/L, sum over L, mean over B
    assert torch.equal(value, want)
    assert torch.equal(fam.loss(model, images, labels, torch.Generator().manual_seed(9)), value)  # images encode on the fly
    assert value.requires_grad

    model.var.cond_drop_rate = 1.0  # VAR's class dropout replaces the label by the null class
    dropped = fam.loss(model, tokens, labels, torch.Generator().manual_seed(9))
    model.var.cond_drop_rate = 0.0
    null = fam.loss(model, tokens, torch.full_like(labels, 4), torch.Generator().manual_seed(9))
    model.var.cond_drop_rate = 0.1
    assert torch.equal(dropped, null)
    with pytest.raises(FamilyError, match="expected tokens"):
        fam.loss(model, tokens[:, :20], labels, None)
    with pytest.raises(FamilyError, match="the VQVAE takes"):
        fam.encode(model, torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_optimizer_is_vars_adamw_groups_with_clipping(fam, ckpts):
    model = _load(fam, ckpts, "twd=0.05", "tclip=2.0", purpose="train")
    opt = fam.make_optimizer(model.parameters(), 1e-3)
    names = {id(p): n for n, p in model.var.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert "blocks.0.attn.mat_qkv.weight" in decayed and "class_emb.weight" in decayed and "head.weight" in decayed
    for nd in ("pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "head.bias", "blocks.1.attn.q_bias"):
        assert nd not in decayed
    ref_model = copy.deepcopy(model.var)
    torch.manual_seed(0)
    for p in model.var.parameters():
        p.grad = torch.randn_like(p) * 10  # a large gradient: the clip acts
    ref_params = dict(ref_model.named_parameters())
    for n, p in model.var.named_parameters():
        ref_params[n].grad = p.grad.clone()
    groups = [{"params": [ref_params[names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    ref_opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    norm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 2.0)
    assert norm > 2.0
    ref_opt.step()
    opt.step()
    for n, p in model.var.named_parameters():
        assert torch.equal(p, ref_params[n]), n


def test_fp16_loss_scaling_follows_vars_amp_optimizer():
    from neon_var.training import AmpState, VarAdamW

    assert AmpState(1).scaler is None
    AmpState(1).enable(torch.device("cpu"))  # fp16 only on CUDA: nothing happens on the CPU
    amp = AmpState(1)
    amp.device_type = None
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 11, growth_interval=1000)  # as enable() makes it on CUDA
    p = torch.nn.Parameter(torch.ones(3))
    ref = torch.nn.Parameter(torch.ones(3))
    opt = VarAdamW([{"params": [p], "weight_decay": 0.0}], amp=amp, grad_clip=0.0, lr=0.1, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)

    loss = (p * 3).sum()
    loss.register_hook(amp.scale_gradient)
    loss.backward()
    assert torch.equal(p.grad, torch.full((3,), 3.0 * 2 ** 11))  # the backward pass sees the scaled loss
    opt.step()
    (ref * 3).sum().backward()
    ref_opt.step()
    assert torch.equal(p, ref) and amp.scaler.get_scale() == 2.0 ** 11

    before = p.detach().clone()
    p.grad = torch.tensor([float("inf"), 1.0, 1.0])
    opt.step()
    assert torch.equal(p, before) and amp.scaler.get_scale() == 2.0 ** 10  # skipped, scale halved
    amp.scaler.update(new_scale=2.0 ** 16)
    p.grad = torch.ones(3)
    opt.step()
    assert amp.scaler.get_scale() == 32768.0  # AmpOptimizer's cap
    state = opt.state_dict()
    assert state["grad_scaler"]["scale"] == 32768.0
    amp2 = AmpState(1)
    amp2.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    VarAdamW([{"params": [torch.nn.Parameter(torch.ones(3))], "weight_decay": 0.0}], amp=amp2, lr=0.1).load_state_dict(state)
    assert amp2.scaler.get_scale() == 32768.0


# ---------------------------------------------------------------------------------------------
# the loop through the core: synth -> finetune -> tune-w over (w, cfg) -> merge -> eval


def test_synth_finetune_tunew_merge_eval(fam, ckpts, stand_in, tmp_path, monkeypatch):
    from neon_cli.evaluate import evaluate
    from neon_cli.requests import EvalRequest, SeedPlan
    from neon_cli.finetune import finetune
    from neon_cli.merge import merge_checkpoints
    from neon_cli.metrics import feature_stats, frechet_distance
    from neon_cli.synth import load_synthetic, synthesize
    from neon_cli.tune import run_tune_w
    from neon_diffusers.scoring import write_pixel_stats

    pairs = _pairs(ckpts, "seed_block=4")
    S = tmp_path / "S"
    synthesize("var", ckpts[0], num=24, out_dir=S, shard_size=12, batch=8, set_pairs=pairs, report=Report("synth"))
    rep = Report("finetune")
    res = finetune("var", ckpts[0], S, budget=32, lr=1e-3, batch=8, save_every=16, out_dir=tmp_path / "ft",
                   set_pairs=pairs, report=rep)
    assert [Path(s["path"]).name for s in res["snapshots"]] == ["ar-ckpt-images_16.pth", "ar-ckpt-images_32.pth"]
    assert rep.settings["train_config"]["warmup"] == 32  # the paper's ramp over the whole run
    assert res["precision"] == "fp32 (--set fp16=1: mixed precision runs on CUDA only)"  # what ran on this CPU
    enc = rep.settings["encoded"]
    assert enc["shards_encoded"] == 2 and Path(enc["folder"]).parent == S
    images, labels, _ = load_synthetic(S)
    from safetensors.torch import load_file

    cached = torch.cat([load_file(str(Path(enc["folder"]) / f"shard-0000{k}.safetensors"))["data"] for k in (0, 1)])
    assert torch.equal(cached, fam.encode(_load(fam, ckpts), images))
    stamp = os.stat(Path(enc["folder"]) / "shard-00000.safetensors").st_mtime_ns
    rep2 = Report("finetune")
    with pytest.raises(UsageError, match="--recipe paper: .* give --recipe paper-d16 or paper-d36"):  # a tiny stand-in depth
        finetune("var", ckpts[0], S, budget=8, lr=None, out_dir=tmp_path / "ft2", set_pairs=pairs, recipe="paper",
                 report=Report("x"))
    finetune("var", ckpts[0], S, budget=8, lr=1e-3, batch=8, out_dir=tmp_path / "ft2", set_pairs=pairs, report=rep2,
             recipe="paper-d36")
    assert rep2.settings["recipe"] == "paper-d36" and rep2.settings["train_config"]["warmup"] == 8
    assert rep2.settings["resolved_settings"]["fp16"] == 1 and rep2.settings["resolved_settings"]["twd"] == 0.0
    assert rep2.settings["encoded"]["shards_encoded"] == 0  # the tokens are computed once
    assert os.stat(Path(enc["folder"]) / "shard-00000.safetensors").st_mtime_ns == stamp

    final = Path(res["final"])
    var = _fresh(stand_in, final)  # VAR's loader reads neon's snapshots
    assert fam.read_metadata(str(final))["finetune_images"] == "32"
    base_sd = torch.load(ckpts[0], weights_only=True)
    self_sd = torch.load(final, weights_only=True)
    assert any(not torch.equal(base_sd[k], self_sd[k]) for k in base_sd if base_sd[k].is_floating_point())

    stats = tmp_path / "ref.npz"
    write_pixel_stats(S, stats)
    tuned = tmp_path / "tuned.pth"
    out = run_tune_w("var", ckpts[0], [final], bounds=(0.0, 2.0), gamma=(0.5, 3.0), num_samples=12, batch=12,
                     set_pairs=pairs, output=tuned, write_anyway=True, require_improvement=False,  # a 12-image run need not beat the base
                     ref_stats=stats, report=Report("tune-w"))
    chosen = out["chosen"]
    assert out["mode"] == "quadratic" and 0.0 <= chosen["w"] <= 2.0 and 0.5 - 1e-9 <= chosen["gamma"] <= 3.0 + 1e-9
    assert {e["gamma"] for e in out["evaluations"]} != {1.5}  # cfg was searched
    tuned_sd = torch.load(tuned, weights_only=True)
    _fresh(stand_in, tuned)
    assert fam.read_metadata(str(tuned))["neon.cfg"] == repr(float(chosen["gamma"]))
    for k, r in base_sd.items():
        if r.is_floating_point() and torch.isfinite(r).all():
            torch.testing.assert_close(tuned_sd[k], r - chosen["w"] * (self_sd[k] - r), rtol=1e-6, atol=1e-7)

    merged = tmp_path / "merged.pth"
    merge_checkpoints(ckpts[0], final, [1.5], [merged], report=Report("merge"))
    _fresh(stand_in, merged)
    monkeypatch.setenv("NEON_REF_STATS", str(stats))
    metrics = evaluate(EvalRequest("var", merged, SeedPlan(seed=0, num=8), tuple(pairs), batch=8), report=Report("eval"))
    model = fam.load(str(merged), settings=resolve_settings(fam, pairs))
    fake = fam.sample(model, torch.arange(8), torch.arange(8) % 4, resolve_settings(fam, pairs))
    fake = fake.reshape(8, -1).double().numpy() / 255
    real = images.reshape(24, -1).double().numpy() / 255
    want = frechet_distance(*feature_stats(fake), real.mean(0), np.cov(real, rowvar=False))
    assert metrics["pixel_fid"] == pytest.approx(want, rel=1e-6)


def test_finetune_resume_equals_uninterrupted(ckpts, tmp_path):
    from neon_cli.finetune import finetune
    from neon_cli.synth import synthesize

    pairs = _pairs(ckpts, "seed_block=4")
    S = tmp_path / "S"
    synthesize("var", ckpts[0], num=12, out_dir=S, shard_size=12, batch=12, set_pairs=pairs, report=Report("s"))
    args = dict(budget=24, lr=1e-3, batch=4, save_every=8, set_pairs=pairs)
    a = finetune("var", ckpts[0], S, out_dir=tmp_path / "a", report=Report("f"), **args)

    class Kill(Exception):
        pass

    def killer(task, done, total=None, **info):
        if task == "finetune" and done >= 12:
            raise Kill

    with pytest.raises(Kill):
        finetune("var", ckpts[0], S, out_dir=tmp_path / "b", report=Report("f"), progress=killer, **args)
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)["images_seen"] == 8
    b = finetune("var", ckpts[0], S, out_dir=tmp_path / "b", report=Report("f"), **args)
    x, y = torch.load(a["final"], weights_only=True), torch.load(b["final"], weights_only=True)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert [s["images_seen"] for s in b["snapshots"]] == [8, 16, 24]


def test_merge_of_var_state_dicts_keeps_the_mask_and_loads_strict(stand_in, ckpts, tmp_path):
    from neon_cli.merge import merge_checkpoints

    base = torch.load(ckpts[0], weights_only=True)
    assert torch.isinf(base["attn_bias_for_masking"]).any() and base["lvl_1L"].dtype == torch.int64
    torch.manual_seed(1)
    selftrained = {k: (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() and torch.isfinite(v).all() else v.clone()
                   for k, v in base.items()}
    selftrained["attn_bias_for_masking"] = torch.where(torch.isinf(base["attn_bias_for_masking"]), -torch.inf, 0.5)
    torch.save(selftrained, tmp_path / "s.pth")
    merge_checkpoints(ckpts[0], tmp_path / "s.pth", [2.0], [tmp_path / "m.pth"], report=Report("merge"))
    merged = torch.load(tmp_path / "m.pth", weights_only=True)
    _fresh(stand_in, tmp_path / "m.pth")  # loads with strict=True
    mask = merged["attn_bias_for_masking"]
    assert torch.equal(torch.isinf(mask), torch.isinf(base["attn_bias_for_masking"])) and not torch.isnan(mask).any()
    assert torch.equal(mask[torch.isfinite(mask)], torch.full_like(mask[torch.isfinite(mask)], -1.0))  # 0 - 2 (0.5 - 0)
    assert torch.equal(merged["lvl_1L"], base["lvl_1L"]) and merged["lvl_1L"].dtype == torch.int64
    k = "blocks.0.attn.mat_qkv.weight"
    torch.testing.assert_close(merged[k], base[k] - 2.0 * (selftrained[k] - base[k]), rtol=1e-6, atol=1e-7)


def test_snapshot_names_and_metadata(fam, ckpts, stand_in, tmp_path):
    assert fam.snapshot_name(250368) == "ar-ckpt-images_250368.pth"
    model = _load(fam, ckpts)
    fam.save(model, str(tmp_path / "x.pth"), {"finetune_images": "7"})
    assert fam.read_metadata(str(tmp_path / "x.pth")) == {"finetune_images": "7"}
    assert fam.read_metadata(str(ckpts[0])) == {}
    _fresh(stand_in, tmp_path / "x.pth")
    assert json.dumps(fam.read_metadata(str(tmp_path / "x.pth")))


def test_metric_is_inception_fid_with_a_detector(fam, tmp_path, monkeypatch):
    from neon_diffusers.scoring import INCEPTION_METRICS, PIXEL_METRICS

    assert tuple(fam.metrics) == PIXEL_METRICS  # no detector: pixel FID, the first metric tune-w minimises
    monkeypatch.setenv("NEON_INCEPTION", str(tmp_path / "inception-2015-12-05.pt"))
    assert tuple(fam.metrics) == INCEPTION_METRICS and fam.metrics[0] == "fid"
