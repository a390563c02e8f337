"""Verify neon's ``var`` family against a real checkout of FoundationVision/VAR (outside CI).

    git clone https://github.com/FoundationVision/VAR ~/VAR          # needs a git work tree: its
    python -m venv venv-var && . venv-var/bin/activate              # arg_util runs `git rev-parse`
    pip install torch numpy scipy safetensors typer rich scikit-learn huggingface_hub pytz typed-argument-parser
    pip install --no-deps -e /path/to/neon
    python benchmarks/verify_var.py --repo ~/VAR

It builds a tiny VAR with the checkout's own ``build_vae_var`` (depth 2, so width 128; a 64-token
codebook of 8 channels, VQVAE ch 32, scales 1-2-3-4, i.e. 64x64 images, 10 classes), gives the
VQVAE finite random weights (``build_vae_var`` leaves it uninitialised: real runs load
``vae_ch160v4096z32.pth``), writes both as plain state dicts into a temporary folder (deleted at
the end; nothing produced by VAR's code is kept), then checks:

1. sampling: ``family.sample`` equals VAR's ``autoregressive_infer_cfg(B=seed_block, label_B,
   g_seed=first seed of the block, cfg, top_k, top_p, more_smooth)`` called directly, bit for
   bit, for several settings; any subset of seeds gives the same images as the whole range;
2. loss: ``family.loss`` on a fixed batch of uint8 images equals the loss ``VARTrainer.train_step``
   hands to its ``AmpOptimizer`` (captured there) with the same class-dropout draw, and
   ``family.encode``'s tokens equal ``vae.img_to_idxBl``; one optimiser step of neon's recipe
   (``VarAdamW``: VAR's groups, weight decay 0.05, clip 2, fp32 on CPU) equals VAR's
   ``AmpOptimizer.backward_clip_step`` with ``filter_params`` groups and ``lr_wd_annealing``'s
   weight decay;
3. files: a trainer checkpoint ``{'trainer': VARTrainer.state_dict(), 'args': Namespace}`` loads in
   neon without ``--trust-pickle``; neon's fine-tune snapshots (``ar-ckpt-images_N.pth``), a
   ``neon merge`` output and a ``tune-w -o`` output load into VAR with
   ``load_state_dict(torch.load(f), strict=True)``, the -inf mask and the int64 ``lvl_1L`` kept.

4. labels (``--neon-repo``, a clone of SinaAlemohammad/Neon; issue 24): the Neon repository's own
   ``VAR/VAR_imagenet_256/generate_dataset.py`` ``main`` is run on CPU on the tiny model (its
   ``build_vae_var`` call answered with the tiny architecture, its checkpoints the tiny files under
   its names, a 10-class ``imagenet_class_to_idx.json`` in its working folder, ``torch.distributed``
   calls no-ops); every ``(label, g_seed, position, B)`` of its ``autoregressive_infer_cfg`` calls
   and every PNG it writes (``--cfg 1.25 --top_p 0.95``; ``--top_k 0``, the tiny codebook having 64
   entries) are compared with ``neon synth``'s sampling under ``--labels var`` with
   ``seed_block`` = its ``--batch_size`` (4 per class in batches of 2; and the paper's
   ``--num_images 1`` with the default batch 64, ``seed_block=1``).
5. paper protocol: :func:`check_paper_protocol` (``--recipe paper``'s lr, weight decay 0 and one
   step against the Neon repository's ``train.py``; give ``--repo .../Neon/VAR/VAR_imagenet_256``).
   Measured (a ``git archive`` of SinaAlemohammad/Neon 76496c3 ``VAR/VAR_imagenet_256``, committed
   into a scratch git repository for its ``arg_util``; torch 2.13.0+cpu): lr 5e-6 in both, loss
   |diff| 0, parameters max |diff| 0 after one step (moved up to 5.0e-6); all 20 checks passed.

Prints one line per check and exits 1 if any fails. Runs in about a minute on 2 CPU cores.

Measured (FoundationVision/VAR 78b95394, SinaAlemohammad/Neon 76496c3f, torch 2.13.0+cpu, a shared
2-core machine): all 23 checks pass; item 4: 0 of 40 and 0 of 10 (label, g_seed, position, B)
differ, and neon's images equal generate_dataset.py's PNGs (max |diff| 0).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import tempfile
from pathlib import Path

import torch

_REPO = Path(".")
TINY = dict(patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, share_quant_resi=4, num_classes=10, depth=2,
            flash_if_available=False, fused_if_available=False)


def build_real(repo: Path, seed: int = 0):
    """(vae, var) from the checkout's build_vae_var, the VQVAE given finite random weights."""
    from models import build_vae_var  # the checkout, put on sys.path by main()

    from neon_var.io import _init_hooks_restored

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()), _init_hooks_restored():
        vae, var = build_vae_var(device="cpu", **TINY)
    for m in vae.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Embedding, torch.nn.Linear)):
            torch.nn.init.normal_(m.weight, std=0.1)
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.ones_(m.weight)
        if getattr(m, "bias", None) is not None:
            torch.nn.init.zeros_(m.bias)
    return vae.eval(), var.eval()


def fresh_real(var_path: Path, vae_path: Path):
    """A second VAR built independently and loaded the way VAR's own scripts load checkpoints."""
    from models import build_vae_var

    from neon_var.io import _init_hooks_restored

    with contextlib.redirect_stdout(io.StringIO()), _init_hooks_restored():
        vae, var = build_vae_var(device="cpu", **TINY)
    vae.load_state_dict(torch.load(vae_path, map_location="cpu"), strict=True)
    var.load_state_dict(torch.load(var_path, map_location="cpu"), strict=True)
    return vae.eval(), var.eval()


@contextlib.contextmanager
def quiet_var():
    """VAR's scripts install a ``print`` that takes ``force=``/``clean=`` (utils/misc.py) before they
    call its helpers; this silences VAR's messages the same way for the duration of a call."""
    import builtins

    saved = builtins.print
    builtins.print = lambda *a, force=False, clean=False, **k: None
    try:
        yield
    finally:
        builtins.print = saved


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, name: str, ok: bool, detail: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        self.failed += not ok


def check_sampling(check: Checks, family, model, var_path, vae_path) -> None:
    from neon_var.sampling import to_uint8

    _, var = fresh_real(var_path, vae_path)
    nc = TINY["num_classes"]
    cases = [
        {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "more_smooth": False, "seed_block": 4},  # VAR's FID protocol
        {"cfg": 1.25, "top_k": 20, "top_p": 0.95, "more_smooth": False, "seed_block": 5},  # Neon's S settings
        {"cfg": 4.0, "top_k": 0, "top_p": 0.0, "more_smooth": True, "seed_block": 3},
    ]
    for st in cases:
        block = st["seed_block"]
        seeds = torch.arange(0, 3 * block)
        labels = seeds % nc
        neon = family.sample(model, seeds, labels, st)
        ref = []
        for b in range(3):
            top_k = 0 if st["top_k"] >= TINY["V"] else st["top_k"]
            with torch.inference_mode():
                img = var.autoregressive_infer_cfg(B=block, label_B=labels[b * block:(b + 1) * block], g_seed=b * block,
                                                   cfg=st["cfg"], top_k=top_k, top_p=st["top_p"], more_smooth=st["more_smooth"])
            ref.append(to_uint8(img))
        ref = torch.cat(ref)
        diff = (neon.int() - ref.int()).abs().max().item()
        check(f"sample == autoregressive_infer_cfg {st}", torch.equal(neon, ref),
              f"{len(seeds)} images {tuple(neon.shape[1:])}, max |diff| {diff}")
        pick = torch.tensor([block * 2 + 1, 1, block])
        sub = family.sample(model, pick, pick % nc, st)
        check(f"image depends only on its seed block (seed_block={block})", torch.equal(sub, neon[pick]),
              f"seeds {pick.tolist()} alone == rows of the whole range")


class _NoDDP(torch.nn.Module):
    """What VARTrainer expects as ``var`` on one process (train.py's NullDDP does the same)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.require_backward_grad_sync = False

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _official_modules() -> dict:
    """The checkout's trainer pieces: VARTrainer, misc, AmpOptimizer, filter_params, lr_wd_annealing."""
    here = os.getcwd()
    os.chdir(_REPO)  # utils/arg_util.py asks git for the checkout's branch and commit when imported
    try:
        from trainer import VARTrainer
        from utils import misc
        from utils.amp_sc import AmpOptimizer
        from utils.lr_control import filter_params, lr_wd_annealing
    finally:
        os.chdir(here)
    return {"VARTrainer": VARTrainer, "misc": misc, "AmpOptimizer": AmpOptimizer, "filter_params": filter_params,
            "lr_wd_annealing": lr_wd_annealing}


def _var_trainer(vae, var, *, lr: float, step_lr: float, clip: float, anneal_wd: float | None = None):
    """VAR's VARTrainer on (vae, var) with its optimiser: filter_params groups, AmpOptimizer(AdamW(lr,
    weight_decay=0, betas=(0.9, 0.95)), grad_clip=clip), weight decay set by lr_wd_annealing (to
    ``anneal_wd``) only when given, then the step's lr ``step_lr``. Returns (trainer, captured):
    ``captured["loss"]`` is the loss its next train_step backpropagates."""
    o = _official_modules()
    with quiet_var():
        names, paras, groups = o["filter_params"](var, nowd_keys={
            "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
            "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul"})
    opt = o["AmpOptimizer"](mixed_precision=0, optimizer=torch.optim.AdamW(groups, lr=lr, weight_decay=0, betas=(0.9, 0.95)),
                            names=names, paras=paras, grad_clip=clip)
    if anneal_wd is not None:
        o["lr_wd_annealing"]("lin0", opt.optimizer, lr, anneal_wd, anneal_wd, 0, 0, 100, wp0=0.005, wpe=0.01)
    for g in opt.optimizer.param_groups:
        g["lr"] = step_lr
    with quiet_var():
        trainer = o["VARTrainer"](device="cpu", patch_nums=TINY["patch_nums"], resos=tuple(16 * p for p in TINY["patch_nums"]),
                                  vae_local=vae, var_wo_ddp=var, var=_NoDDP(var), var_opt=opt, label_smooth=0.0)
    captured = {}
    inner = opt.backward_clip_step

    def capture(stepping, loss):
        captured["loss"] = loss.detach().clone()
        return inner(stepping=stepping, loss=loss)

    opt.backward_clip_step = capture
    return trainer, captured


def check_loss_and_step(check: Checks, family, model, var_path, vae_path) -> None:
    misc = _official_modules()["misc"]
    from neon_var.training import images_to_pm1

    vae, var = fresh_real(var_path, vae_path)
    var.train()
    gen = torch.Generator().manual_seed(123)
    B = 6
    images = torch.randint(0, 256, (B, 3, 64, 64), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, TINY["num_classes"], (B,), generator=gen)
    lr, twd, tclip = 1e-3, 0.05, 2.0

    # VAR: filter_params groups, AdamW(0.9, 0.95), AmpOptimizer fp32 with clip 2, weight decay set by lr_wd_annealing
    # the fine-tune's lr at this step (neon's core sets it the same way)
    trainer, captured = _var_trainer(vae, var, lr=lr, step_lr=lr, clip=tclip, anneal_wd=twd)

    # neon: the family's loss and optimiser on its own model (same weights)
    m = copy.deepcopy(model)
    from neon_var.training import AmpState, tag_parameters

    tag_parameters(m, AmpState(0), {"twd": twd, "tclip": tclip})
    m.train()
    neon_opt = family.make_optimizer(m.parameters(), lr)
    for g in neon_opt.param_groups:
        g["lr"] = lr
    step_gen = torch.Generator().manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7)))
    neon_loss = family.loss(m, images, labels, step_gen)

    torch.manual_seed(seed)  # the same class-dropout and drop-path draws inside VAR's forward
    with quiet_var():
        trainer.train_step(it=0, g_it=1, stepping=True, metric_lg=misc.MetricLogger(), tb_lg=None,
                           inp_B3HW=images_to_pm1(images), label_B=labels, prog_si=-1, prog_wp_it=1)
    var_loss = captured["loss"]
    check("loss == VARTrainer.train_step's loss", torch.equal(neon_loss.detach(), var_loss),
          f"neon {neon_loss.item():.7f}, VAR {var_loss.item():.7f}, |diff| {abs(neon_loss.item() - var_loss.item()):.2e}")
    tokens = family.encode(m, images)
    ref_tokens = torch.cat(vae.img_to_idxBl(images_to_pm1(images)), 1)
    check("encode == vae.img_to_idxBl (all scales)", torch.equal(tokens.long(), ref_tokens),
          f"tokens {tuple(tokens.shape)} {tokens.dtype}")
    ft = family.loss(m, tokens, labels, torch.Generator().manual_seed(7))
    check("loss on cached tokens == loss on images", torch.equal(ft.detach(), neon_loss.detach()), f"{ft.item():.7f}")

    neon_opt.zero_grad(set_to_none=True)
    neon_loss.backward()
    neon_opt.step()
    worst = max((a - b).abs().max().item() for a, b in zip(m.var.state_dict().values(), var.state_dict().values())
                if a.is_floating_point())
    check("one optimiser step == AmpOptimizer step (groups, wd 0.05, clip 2)", worst <= 1e-6,
          f"max |param diff| {worst:.2e} after lr {lr:g}")


def check_paper_protocol(check: Checks, family, model, var_path, vae_path) -> None:
    """5. ``neon finetune var --recipe paper`` against the Neon repository's ``VAR/VAR_imagenet_256/
    train.py`` (give ``--repo .../Neon/VAR/VAR_imagenet_256``): its optimiser is
    ``AmpOptimizer(AdamW(filter_params groups, lr=tlr, weight_decay=0, betas=(0.9, 0.95)),
    grad_clip=tclip)`` and ``lr_wd_annealing`` is never called (so weight decay stays 0); each step
    sets ``lr = target_lr * min(images_seen, total_images) / total_images``. One step at
    images_seen = 768 of total_images = 1536 (lr = 5e-6 with the paper's target 1e-5) on the same
    batch, against neon's ``paper-d16`` recipe (its ``twd`` 0, the core loop's ramp over the budget)."""
    misc = _official_modules()["misc"]
    from neon_cli.finetune import _default_warmup, recipe_plan
    from neon_var.training import AmpState, images_to_pm1, tag_parameters

    name, train, st = recipe_plan(family, "paper-d16", None)
    total, seen = 1536, 768
    warmup = _default_warmup(train["warmup_images"], total)
    lr_neon = train["lr"] * min(1.0, seen / warmup)  # neon_cli.train.train_loop's schedule
    lr_var = train["lr"] * min(seen, total) / total  # the paper's train.py, --target_lr 1e-5
    vae, var = fresh_real(var_path, vae_path)
    var.train()
    gen = torch.Generator().manual_seed(321)
    images = torch.randint(0, 256, (6, 3, 64, 64), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, TINY["num_classes"], (6,), generator=gen)
    trainer, captured = _var_trainer(vae, var, lr=train["lr"], step_lr=lr_var, clip=2.0)
    m = copy.deepcopy(model)
    tag_parameters(m, AmpState(0), {"twd": st["twd"], "tclip": 2.0})  # fp16=1 runs fp32 on CPU, in both
    m.train()
    neon_opt = family.make_optimizer(m.parameters(), train["lr"])
    for g in neon_opt.param_groups:
        g["lr"] = lr_neon
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(9)))
    neon_loss = family.loss(m, images, labels, torch.Generator().manual_seed(9))
    torch.manual_seed(seed)
    with quiet_var():
        trainer.train_step(it=0, g_it=1, stepping=True, metric_lg=misc.MetricLogger(), tb_lg=None,
                           inp_B3HW=images_to_pm1(images), label_B=labels, prog_si=-1, prog_wp_it=1)
    neon_opt.zero_grad(set_to_none=True)
    neon_loss.backward()
    neon_opt.step()
    worst = max((a - b).abs().max().item() for a, b in zip(m.var.state_dict().values(), var.state_dict().values())
                if a.is_floating_point())
    ref = fresh_real(var_path, vae_path)[1].state_dict()
    moved = max((a - ref[k]).abs().max().item() for k, a in var.state_dict().items() if a.is_floating_point())
    check(f"paper protocol ({name}): loss and one step == the paper's train.py step",
          lr_neon == lr_var and torch.equal(neon_loss.detach(), captured["loss"]) and worst <= 1e-6,
          f"lr {lr_neon:g} (train.py {lr_var:g}); loss |diff| {abs(neon_loss.item() - captured['loss'].item()):.2e}; "
          f"max |param diff| {worst:.2e} (the step moved them up to {moved:.2e}); weight decay {st['twd']}")


def check_files(check: Checks, family, tmp: Path, var_path: Path, vae_path: Path, repo: Path) -> None:
    from neon_cli.finetune import finetune
    from neon_cli.merge import merge_checkpoints
    from neon_cli.report import Report
    from neon_cli.synth import synthesize
    from neon_cli.tune import run_tune_w

    pairs = [f"repo={repo}", f"vae={vae_path}", "seed_block=4"]
    # a trainer checkpoint with args as a Namespace: read without --trust-pickle
    vae, var = fresh_real(var_path, vae_path)
    trainer_ckpt = tmp / "ar-ckpt-last.pth"
    torch.save({"epoch": 1, "iter": 0, "trainer": {"config": {"patch_nums": TINY["patch_nums"]},
                                                     "var_wo_ddp": var.state_dict(), "vae_local": vae.state_dict(),
                                                     "var_opt": {"optimizer": {}}},
                "args": argparse.Namespace(depth=2, pn="1_2_3_4", tblr=1e-4)}, trainer_ckpt)
    from neon_cli.family import resolve_settings

    st = resolve_settings(family, pairs)
    a = family.load(str(trainer_ckpt), settings={**st, "vae": str(trainer_ckpt)})
    b = family.load(str(var_path), settings=st)
    same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    check("trainer checkpoint (trainer.var_wo_ddp, trainer.vae_local, args Namespace) loads", same,
          "weights_only=True with argparse.Namespace allowed, equal to the plain state dicts")

    S = tmp / "S"
    synthesize("var", var_path, num=24, out_dir=S, shard_size=12, batch=8, set_pairs=pairs + ["top_k=20"], report=Report("synth"))
    ft = finetune("var", var_path, S, budget=24, lr=1e-3, batch=8, save_every=8, out_dir=tmp / "ft",
                  set_pairs=pairs, report=Report("finetune"))
    names = [Path(s["path"]).name for s in ft["snapshots"]]
    check("fine-tune snapshots named by images seen", names == ["ar-ckpt-images_8.pth", "ar-ckpt-images_16.pth",
                                                                  "ar-ckpt-images_24.pth"], ", ".join(names))
    merged = tmp / "merged.pth"
    merge_checkpoints(var_path, ft["final"], [1.5], [merged], report=Report("merge"))
    # tune-w only has to write its winner here: score by a cheap stand-in metric (the mean grey
    # level's distance to 0.5), not a 12288-d pixel FID
    cls, saved = type(family), type(family).metrics
    cls.metrics = ("grey",)
    family.score = lambda images, labels: {"grey": abs(images.float().mean().item() / 255 - 0.5)}
    family.check_scoring = lambda: None  # the stand-in metric needs no reference statistics
    tuned = tmp / "tuned.pth"
    try:
        run_tune_w("var", var_path, [ft["final"]], bounds=(0.0, 2.0), gamma=(1.0, 3.0), num_samples=8, batch=8,
                   set_pairs=pairs + ["top_k=20"], output=tuned, write_anyway=True, require_improvement=False,  # the file, not the gain, is checked
                   report=Report("tune-w"))
    finally:
        cls.metrics = saved
        del family.score, family.check_scoring
    base = torch.load(var_path, map_location="cpu")
    for f in [Path(s["path"]) for s in ft["snapshots"]] + [merged, tuned]:
        _, fresh = fresh_real(var_path, vae_path)
        try:
            sd = torch.load(f, map_location="cpu")  # VAR's own loading (generate_and_fid_neon.py unwraps the same way)
            sd = sd.get("trainer", sd).get("var_wo_ddp", sd) if isinstance(sd, dict) else sd
            fresh.load_state_dict(sd, strict=True)
            kept = torch.equal(sd["attn_bias_for_masking"], base["attn_bias_for_masking"]) and \
                torch.equal(sd["lvl_1L"], base["lvl_1L"]) and sd["lvl_1L"].dtype == torch.int64
            check(f"VAR loads {f.name} (strict=True)", kept, "-inf mask and int64 lvl_1L as in theta_r")
        except Exception as exc:  # report, do not stop
            check(f"VAR loads {f.name} (strict=True)", False, f"{type(exc).__name__}: {exc}")


def check_labels(check: Checks, family, tmp: Path, var_path: Path, vae_path: Path, neon_repo: Path) -> None:
    """Item 4 of the module docstring: ``--labels var`` against the Neon repository's generate_dataset.py."""
    import importlib.util
    import json
    import shutil
    import types

    import numpy as np
    from PIL import Image

    from neon_cli import labels as L
    from neon_cli.family import resolve_settings

    script = neon_repo / "VAR" / "VAR_imagenet_256" / "generate_dataset.py"
    nc = TINY["num_classes"]
    settings = resolve_settings(family, [f"repo={_REPO}", f"vae={vae_path}", "cfg=1.25", "top_k=0", "top_p=0.95"])  # the tiny codebook (64) < 900
    model = family.load(str(var_path), settings=settings)
    for per_class, batch, block in ((4, 2, 2), (1, 64, 1)):
        work = tmp / f"generate_dataset-{per_class}-{batch}"
        (work / "imagenet").mkdir(parents=True)
        (work / "imagenet" / "imagenet_class_to_idx.json").write_text(json.dumps({f"c{i:02d}": i for i in range(nc)}))
        shutil.copy(var_path, work / "var_d16.pth")  # the names the script loads (and would otherwise download)
        shutil.copy(vae_path, work / "vae_ch160v4096z32.pth")
        calls = []

        def tiny_build(**_kw):
            vae, var = fresh_real(var_path, vae_path)
            infer = var.autoregressive_infer_cfg

            def recorded(B, label_B, g_seed, **kw):
                calls.append((B, label_B.tolist(), g_seed))
                return infer(B=B, label_B=label_B, g_seed=g_seed, **kw)

            var.autoregressive_infer_cfg = recorded
            return vae, var

        real_models = sys.modules.get("models")
        sys.modules["models"] = types.SimpleNamespace(build_vae_var=tiny_build)  # its import-time `from models import`
        try:
            spec = importlib.util.spec_from_file_location(f"neon_generate_dataset_{per_class}", script)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        finally:
            sys.modules["models"] = real_models
        mod.dist = types.SimpleNamespace(is_initialized=lambda: False, barrier=lambda: None, destroy_process_group=lambda: None)
        saved = (torch.nn.Linear.reset_parameters, torch.nn.LayerNorm.reset_parameters, sys.argv, os.getcwd())
        try:
            os.chdir(work)
            sys.argv = ["generate_dataset.py", "--out_dir", str(work / "out"), "--num_images", str(per_class),
                        "--batch_size", str(batch), "--cfg", "1.25", "--top_k", "0", "--top_p", "0.95", "--seed", "0"]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                mod.main()
        finally:
            torch.nn.Linear.reset_parameters, torch.nn.LayerNorm.reset_parameters, sys.argv, cwd = saved
            os.chdir(cwd)
        theirs = [(lab, g, j, B) for B, labs, g in calls for j, lab in enumerate(labs)]
        plan = L.check("var", per_class * nc, nc, family, seed=0)
        seeds, labels = plan.seeds_labels()
        with L.active(plan):
            draws = L.block_draws(seeds, labels, block, nc)
        ours = sorted(((labels[i], first, j, len(lab), i) for first, lab, asked in draws for j, idx in asked.items() for i in idx),
                      key=lambda r: r[-1])
        ours = [r[:4] for r in ours]
        check(f"--labels var = generate_dataset.py ({per_class}/class, --batch_size {batch}, seed_block {block})",
              ours == theirs, f"{len(theirs)} images: (label, g_seed, position, B) of {len(calls)} calls; "
                              f"{sum(a != b for a, b in zip(ours, theirs))} differ")
        with L.active(plan):
            imgs = family.sample(model, torch.tensor(seeds), torch.tensor(labels), {**settings, "seed_block": block})
        diff = 0
        for i, (s, c) in enumerate(zip(seeds, labels)):
            png = np.array(Image.open(work / "out" / "train" / f"c{c:02d}" / f"{s:05d}.png"))
            diff = max(diff, int(np.abs(imgs[i].permute(1, 2, 0).numpy().astype(int) - png.astype(int)).max()))
        check(f"--labels var images = generate_dataset.py's PNGs ({per_class}/class)", diff == 0,
              f"{len(seeds)} images: max |neon - PNG| = {diff} (uint8)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True, help="a git checkout of FoundationVision/VAR")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--neon-repo", type=Path, default=None,
                    help="a clone of SinaAlemohammad/Neon: also check --labels var against its VAR generate_dataset.py")
    ap.add_argument("--only-labels", action="store_true", help="run the labels check (item 4) alone")
    args = ap.parse_args(argv)
    repo = args.repo.expanduser().resolve()
    if not (repo / "models" / "var.py").is_file():
        print(f"--repo: {repo} is not a checkout of FoundationVision/VAR (no models/var.py)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    global _REPO
    _REPO = repo
    sys.path.insert(0, str(repo))
    os.environ.pop("NEON_REF_STATS", None)
    os.environ.pop("NEON_INCEPTION", None)
    from neon_cli.family import get_family, resolve_settings

    family = get_family("var")
    check = Checks()
    with tempfile.TemporaryDirectory(prefix="verify-var-") as d:
        tmp = Path(d)
        vae, var = build_real(repo)
        var_path, vae_path = tmp / "var_tiny.pth", tmp / "vae_tiny.pth"
        torch.save(var.state_dict(), var_path)
        torch.save(vae.state_dict(), vae_path)
        settings = resolve_settings(family, [f"repo={repo}", f"vae={vae_path}"])
        model = family.load(str(var_path), settings=settings)
        info = {k: model.info[k] for k in ("depth", "patch_nums", "num_classes", "V", "Cvae", "ch", "share_quant_resi")}
        check("architecture read from the shapes", info == {k: TINY[k] for k in info}, str(info))
        check("reset_parameters restored after build_vae_var",
              "reset_parameters" in torch.nn.Linear.__dict__ and torch.nn.Linear.reset_parameters.__name__ == "reset_parameters",
              "torch.nn.Linear.reset_parameters is torch's own again")
        if not args.only_labels:
            check_sampling(check, family, model, var_path, vae_path)
            check_loss_and_step(check, family, model, var_path, vae_path)
            check_files(check, family, tmp, var_path, vae_path, repo)
            check_paper_protocol(check, family, model, var_path, vae_path)
        if args.neon_repo is not None:
            check_labels(check, family, tmp, var_path, vae_path, args.neon_repo.expanduser().resolve())
    print(f"{'all checks passed' if not check.failed else f'{check.failed} check(s) FAILED'}")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
