"""Verify neon's ``xar`` family against a real xAR checkout (outside CI).

    git clone https://github.com/OliverRensu/xAR ~/xAR          # or the xAR/ folder of SinaAlemohammad/Neon
    python -m venv venv-xar && . venv-xar/bin/activate
    pip install torch numpy scipy einops safetensors typer rich scikit-learn && pip install --no-deps timm==1.0.8
    pip install --no-deps -e /path/to/neon
    python benchmarks/verify_xar.py --repo ~/xAR

It builds a tiny real xAR with the checkout's own ``models.xar.xAR`` class (width 64, one encoder
and one decoder block, 2 heads; xAR's fixed 256 x 256 layout: 16 x 16 tokens of 16 channels in 4
clusters) and MAR's real ``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``, both with
random weights, written to a temporary folder (deleted at the end; nothing made by xAR's code is
kept), then checks:

1. sampling: ``family.sample`` for a block of seeds equals what xAR's scripts do for one batch,
   run here with the checkout's objects (``torch.manual_seed(S)``, ``model.sample_tokens``,
   ``vae.decode(z / 0.2325)``, ``(x + 1) / 2`` then the Neon repository's truncation or
   ``eval.py``'s rounding), bit for bit, for two blocks and two CFG scales; a subset of seeds
   gives the same images;
2. loss: ``family.encode`` equals ``vae.encode(Normalize(ToTensor(x)))`` for the image and its
   mirror (MAR's cached ``moments`` / ``moments_flip``); ``family.loss`` on the cached moments
   equals train_new.py's chain (flip draw, ``DiagonalGaussianDistribution(moments).sample() *
   0.2325``, ``model(x, labels)``) under the same seed; one optimiser step of neon's recipe equals
   ``AdamW(misc.add_weight_decay(model, 0.02), betas=(0.9, 0.96))`` after ``clip_grad_norm_(1.0)``
   (what ``NativeScalerWithGradNormCount`` does with its scaler off, as on CPU);
3. files: a ``main_mar.py``-style checkpoint ``{model, model_ema, optimizer, epoch, scaler, args:
   Namespace}`` loads without ``--trust-pickle``; ``neon finetune`` snapshots load as the Neon
   repository's ``calculate_fid.py`` loads them (``torch.load(weights_only=True)``,
   ``ckpt.get('model_ema', ckpt.get('state_dict', ckpt))``, ``load_state_dict(strict=True)``),
   and a ``neon merge`` of the plain base with a snapshot loads as xAR's ``eval.py`` loads a file
   (``load_state_dict(torch.load(path))``), its -inf ``mask`` kept.

4. labels (issue 24): ``--labels xar`` equals the labels xAR's own ``engine_xar.evaluate`` (``eval.py``)
   hands ``sample_tokens`` (run with a recording stand-in model; 2,000 and 5,000 images of 1,000
   classes), and with ``--neon-repo`` the Neon repository's ``xAR/calculate_fid.py``
   ``prepare_labels``. ``--only-labels`` runs this check alone. Measured (OliverRensu/xAR 121e9c93,
   SinaAlemohammad/Neon 76496c3f): 0 of 2,000 and 0 of 5,000 labels differ from either (23 s).

On CPU, xAR's ``.cuda()`` calls are made no-ops while its code runs
(:func:`neon_cli.repo.cuda_calls_on_cpu`, as the family does), ``flash_attn`` (imported, unused)
is stubbed by the family when missing, and if ``torchvision`` cannot be imported (a CUDA wheel
against a CPU torch) an empty stand-in is registered, because timm imports it at module level;
xAR's model code uses none of it. Prints one line per check; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import importlib.abc
import importlib.machinery
import shutil
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch

TINY = dict(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=64, decoder_depth=1,
            decoder_num_heads=2, mlp_ratio=2.0)
BUILD = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, class_num=1000)
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def stub_torchvision_if_broken() -> bool:
    """Register an empty ``torchvision`` (every attribute a placeholder class) if it cannot be imported."""
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]

    class Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Meta(name, (), {})

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Meta(name, (), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            m = Stub(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())
    return True


TOKENS: dict[str, list] = {"neon": [], "official": []}


def official_batch(model, vae, labels, seed, flow_steps, cfg, rounding):
    """One batch as xAR's scripts make it (calculate_fid.py / generate_dataset.py; eval.py rounds)."""
    import numpy as np

    from neon_cli.repo import cuda_calls_on_cpu

    with cuda_calls_on_cpu(True), torch.no_grad():
        torch.manual_seed(seed)
        z = model.sample_tokens(num_steps=flow_steps, cfg=cfg, label=labels)
        TOKENS["official"].append(z / 0.2325)  # what vae.decode receives
        imgs = vae.decode(z / 0.2325)
        imgs = (imgs + 1) / 2
    if rounding == "round":
        arr = np.round(np.clip(imgs.numpy().transpose([0, 2, 3, 1]) * 255, 0, 255)).astype(np.uint8)
        return torch.from_numpy(arr).permute(0, 3, 1, 2)
    return imgs.mul(255).clamp_(0, 255).byte()


def check_labels(repo: Path, neon_repo: Path | None) -> None:
    """``--labels xar`` against the labels xAR's ``eval.py`` samples: ``engine_xar.evaluate`` itself,
    run on CPU with a recording stand-in for the model's ``sample_tokens`` (only the labels it is
    given matter here), a zero VAE, its CUDA / distributed / sleep / cv2 calls no-ops; and, with
    ``neon_repo``, the Neon repository's ``xAR/calculate_fid.py`` ``prepare_labels``."""
    import importlib
    import importlib.util

    from neon_cli import labels as L
    from neon_cli.repo import cuda_calls_on_cpu

    stubs = {name: types.ModuleType(name) for name in ("cv2", "torch_fidelity") if importlib.util.find_spec(name) is None}
    stubs.get("cv2", types.SimpleNamespace()).__dict__.update(imwrite=lambda *a, **k: True)
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        engine = importlib.import_module("engine_xar")
        calc = None
        if neon_repo is not None:
            spec = importlib.util.spec_from_file_location("neon_xar_calculate_fid", neon_repo / "xAR" / "calculate_fid.py")
            calc = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(calc)
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    seen: list[int] = []

    class Recorder:
        def sample_tokens(self, num_steps, cfg=1.0, label=None):
            seen.extend(label.tolist())
            return torch.zeros(len(label), 1, 1, 1)

        def eval(self):
            return self

    class ZeroVAE:
        def decode(self, z):
            return torch.zeros(len(z), 3, 2, 2)

    k = 1000
    for n, bsz in ((2000, 64), (5000, 256)):
        seen.clear()
        args = types.SimpleNamespace(num_images=n, num_iter=64, output_dir=tempfile.mkdtemp(prefix="verify-xar-eval-"),
                                     evaluate=True, class_num=k, img_size=256)
        saved_sync, saved_barrier, saved_time = torch.cuda.synchronize, torch.distributed.barrier, engine.time
        torch.cuda.synchronize, torch.distributed.barrier = (lambda *a, **kw: None), (lambda *a, **kw: None)
        engine.time = types.SimpleNamespace(sleep=lambda s: None)
        try:
            with cuda_calls_on_cpu(True), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                engine.evaluate(Recorder(), ZeroVAE(), args, 0, batch_size=bsz, log_writer=None, cfg=1.0, flow_steps=3)
        finally:
            torch.cuda.synchronize, torch.distributed.barrier, engine.time = saved_sync, saved_barrier, saved_time
            shutil.rmtree(args.output_dir, ignore_errors=True)
        ours = L.check("xar", n, k).seeds_labels()[1]
        check(f"--labels xar = eval.py's labels ({n} images, eval_bsz {bsz})", ours == seen[:n],
              f"{sum(a != b for a, b in zip(ours, seen[:n]))} of {n} differ; {len(seen)} sampled (eval.py pads its last batch)")
        if calc is not None:
            theirs = calc.prepare_labels(n, k, bsz, 1)[0][:n].tolist()
            check(f"--labels xar = Neon calculate_fid.py prepare_labels ({n} images)", ours == theirs,
                  f"{sum(a != b for a, b in zip(ours, theirs))} of {n} differ")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", required=True, type=Path, help="xAR checkout (OliverRensu/xAR or Neon's xAR/)")
    ap.add_argument("--flow-steps", type=int, default=4)
    ap.add_argument("--block", type=int, default=2, help="seed_block (images per official batch)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one, deleted)")
    ap.add_argument("--neon-repo", type=Path, default=None,
                    help="a SinaAlemohammad/Neon clone: also check --labels xar against its xAR/calculate_fid.py")
    ap.add_argument("--only-labels", action="store_true", help="run the labels check (4.) alone")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stubbed = stub_torchvision_if_broken()
    print(f"torch {torch.__version__}; torchvision {'stubbed' if stubbed else 'real'}; repo {args.repo}")
    repo = args.repo.resolve()
    work = Path(args.keep or tempfile.mkdtemp(prefix="verify-xar-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from neon_cli.family import get_family, load_model, resolve_settings
        from neon_xar import checkout

        xar_mod, vae_mod = checkout.modules(checkout.find({"repo": str(repo)}))
        check_labels(repo, args.neon_repo.resolve() if args.neon_repo else None)
        if args.only_labels:
            print(f"{sum(r[1] for r in RESULTS)}/{len(RESULTS)} checks passed in {time.time() - t0:.0f} s")
            return 1 if not all(r[1] for r in RESULTS) else 0
        xar_mod.xar_verify = lambda **kw: xar_mod.xAR(**TINY, **kw)  # a tiny builder, registered at run time only
        torch.manual_seed(0)
        model = xar_mod.xar_verify(**BUILD, attn_dropout=0.1, proj_dropout=0.1).eval()
        with torch.no_grad():  # xAR zero-initialises nothing that matters here; make adaLN non-trivial
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        vae = vae_mod.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)).eval()
        torch.save(model.state_dict(), work / "xAR-verify.pth")
        torch.save({"model": vae.state_dict()}, work / "kl16-verify.ckpt")
        print(f"tiny xAR: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; VAE "
              f"{sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M")
        fam = get_family("xar")
        pairs = [f"repo={repo}", f"vae={work / 'kl16-verify.ckpt'}", f"flow_steps={args.flow_steps}",
                 f"seed_block={args.block}", "arch=xar_verify"]
        s = resolve_settings(fam, pairs)
        net = load_model(fam, work / "xAR-verify.pth", settings=s)
        check("arch auto-detected", checkout.choose_arch(xar_mod, model.state_dict(), net._neon_xar.kwargs, "auto", "-")
              == "xar_verify", net._neon_xar.arch)
        # 1. sampling ----------------------------------------------------------------------------
        B = args.block
        fam_vae = net._neon_xar.vae
        real_decode = fam_vae.decode
        fam_vae.decode = lambda z: (TOKENS["neon"].append(z.clone()), real_decode(z))[1]
        for cfg in (1.0, 2.7):
            for rounding in ("truncate", "round"):
                ss = {**s, "cfg": cfg, "rounding": rounding}
                TOKENS["neon"].clear(), TOKENS["official"].clear()
                got = fam.sample(net, torch.arange(0, 2 * B), torch.arange(0, 2 * B) % 1000, ss)
                for b in range(2):
                    want = official_batch(model, vae, torch.arange(b * B, (b + 1) * B) % 1000, b * B, args.flow_steps, cfg, rounding)
                    diff = int((got[b * B:(b + 1) * B].int() - want.int()).abs().max())
                    dz = float((TOKENS["neon"][b] - TOKENS["official"][b]).abs().max())
                    check(f"sample block {b} cfg={cfg} {rounding} == official", diff == 0 and dz == 0.0,
                          f"max |diff| = {diff} (uint8), {dz:.3g} (latents)")
                if cfg == 2.7 and rounding == "truncate":
                    sub = fam.sample(net, torch.tensor([2 * B - 1, 0]), torch.tensor([(2 * B - 1) % 1000, 0]), ss)
                    check("subset of seeds == same images", torch.equal(sub, got[[2 * B - 1, 0]]))
        # 2. loss --------------------------------------------------------------------------------
        train = load_model(fam, work / "xAR-verify.pth", settings=resolve_settings(fam, pairs, train=True), purpose="train").train()
        images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        labels = torch.tensor([3, 997])
        cached = fam.encode(train, images)
        x = images.float().div(255).sub(0.5).div(0.5)  # ToTensor, Normalize([0.5]*3, [0.5]*3)
        with torch.no_grad():
            want = torch.cat([vae.encode(x).parameters, vae.encode(x.flip(dims=[3])).parameters], 1)
        d = float((cached - want).abs().max())
        check("encode == vae.encode moments (+ mirror)", d == 0.0, f"max |diff| = {d:.3g}")
        from neon_cli.repo import cuda_calls_on_cpu, seeded_global_rng

        gen_seed = 7
        got = fam.loss(train, cached, labels, torch.Generator().manual_seed(gen_seed))
        seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(gen_seed)))
        with cuda_calls_on_cpu(True), seeded_global_rng(seed):
            keep = (torch.rand(2) < 0.5).view(2, 1, 1, 1)
            m, mf = cached.chunk(2, 1)
            xs = vae_mod.DiagonalGaussianDistribution(torch.where(keep, m, mf)).sample().mul_(0.2325)
            want = train(xs, labels)
        got, want = got.detach(), want.detach()
        check("loss == model(x, labels) of train_new.py's chain", float(got) == float(want),
              f"neon {float(got):.8f} xAR {float(want):.8f}")
        util_misc = __import__("importlib").import_module("util.misc")
        a, b = copy.deepcopy(train), copy.deepcopy(train)
        opt_a = fam.make_optimizer(a.parameters(), 1e-3)
        opt_b = torch.optim.AdamW(util_misc.add_weight_decay(b, 0.02), lr=1e-3, betas=(0.9, 0.96))
        for net_, opt_ in ((a, opt_a), (b, opt_b)):
            for p in net_.parameters():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 3
            if opt_ is opt_b:
                torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
            opt_.step()
        d = max(float((pa.detach() - pb.detach()).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))
        check("optimiser step == AdamW(add_weight_decay) + clip 1.0", d == 0.0, f"max |diff| = {d:.3g}")
        # 3. files -------------------------------------------------------------------------------
        ema = {k: (v + 0.01 if v.is_floating_point() and torch.isfinite(v).all() else v) for k, v in model.state_dict().items()}
        torch.save({"model": model.state_dict(), "model_ema": ema, "optimizer": {}, "epoch": 1, "scaler": {},
                    "args": argparse.Namespace(model="xar_verify", blr=1e-6)}, work / "checkpoint-last.pth")
        loaded = load_model(fam, work / "checkpoint-last.pth", settings=s)
        check("main_mar.py checkpoint {.., args: Namespace} loads (model_ema), no --trust-pickle",
              torch.equal(loaded.state_dict()["z_proj.weight"], ema["z_proj.weight"]))
        from typer.testing import CliRunner

        from neon_cli.commands import app

        def cli(*a):
            res = CliRunner().invoke(app, [str(x) for x in a])
            if res.exit_code != 0:
                raise RuntimeError(f"neon {a[0]} failed: {res.output[-2000:]} {res.exception!r}")

        sets = [x for p in pairs for x in ("--set", p)]
        cli("synth", "xar", "--model", work / "xAR-verify.pth", "--num-images", 4, "-o", work / "S", "--batch", B, "--shard-size", 4, *sets)
        cli("finetune", "xar", "--model", work / "xAR-verify.pth", "--data", work / "S", "--budget", 4, "--batch", 2, "--lr", 1e-4,
            "--warmup", 2, "--save-every", 2, "-o", work / "ft", *sets)
        for snap in sorted((work / "ft").glob("checkpoint-*.pth")):
            ck = torch.load(snap, map_location="cpu", weights_only=True)  # calculate_fid.py's load_checkpoint
            state = ck.get("model_ema", ck.get("state_dict", ck))
            fresh = xar_mod.xar_verify(**BUILD, attn_dropout=0.1, proj_dropout=0.1)
            res = fresh.load_state_dict(state, strict=True)
            check(f"{snap.name} loads as calculate_fid.py loads it", not res.missing_keys and not res.unexpected_keys)
        snap = work / "ft" / "checkpoint-4.pth"
        cli("merge", work / "xAR-verify.pth", snap, "--w", 1.6, "-o", work / "merged.pth")
        merged = torch.load(work / "merged.pth", map_location="cpu")  # eval.py: load_state_dict(torch.load(path))
        fresh = xar_mod.xar_verify(**BUILD, attn_dropout=0.1, proj_dropout=0.1)
        fresh.load_state_dict(merged)
        base = model.state_dict()
        ft = torch.load(snap, weights_only=True)["model_ema"]
        d = float((merged["pred.weight"] - (base["pred.weight"] - 1.6 * (ft["pred.weight"] - base["pred.weight"]))).abs().max())
        check("merged .pth loads as eval.py loads it; theta_r - w (theta_s - theta_r)", d < 1e-6, f"max |diff| = {d:.3g}")
        check("mask buffer (-inf) kept", torch.equal(merged["mask"], base["mask"]) and bool(torch.isinf(merged["mask"]).any()))
        out = fam.sample(load_model(fam, work / "merged.pth", settings=s), torch.arange(B), None, s)
        want = official_batch(fresh.eval(), vae, torch.arange(B), 0, args.flow_steps, 2.7, "truncate")
        check("merged model samples == official on the merged file", torch.equal(out, want))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in RESULTS if not r[1]]
    print(f"{len(RESULTS) - len(bad)}/{len(RESULTS)} checks passed in {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
