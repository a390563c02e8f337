"""Verify neon's ``imm`` family against a real IMM checkout (outside CI).

    git clone https://github.com/lumalabs/imm ~/imm                   # sampling
    git clone https://github.com/SinaAlemohammad/Neon ~/Neon          # its imm/ folder adds training
    python -m venv venv-imm && . venv-imm/bin/activate
    pip install torch numpy scipy einops pyyaml omegaconf hydra-core "diffusers<0.32" safetensors typer rich scikit-learn tqdm pillow
    pip install --no-deps timm==1.0.8 && pip install --no-deps -e /path/to/neon
    python benchmarks/verify_imm.py --repo ~/imm            # sampling checks (lumalabs: float64 steps)
    python benchmarks/verify_imm.py --repo ~/Neon/imm       # sampling (fp16 mode), loss and file checks

IMM and the Neon repository share their package names (``dnnlib``, ``torch_utils``, ``training``),
so one run verifies one checkout. The script builds a tiny real ``training.preconds.IMMPrecond``
(the checkout's ``DiT`` at width 64, one block, patch 2, on 4 x 4 latents of 4 channels, 1000
classes, the ImageNet-256 model's schedule: fm, euler_fm, stride time embedding, T 0.994, eps 0)
with random weights, pickled by the checkout's ``torch_utils.persistence`` as IMM's files are, and a
tiny random diffusers ``AutoencoderKL`` (4 levels: factor 8, 32 x 32 images) standing for
``sd-vae-ft-ema``, all in a temporary folder deleted at the end (nothing made by IMM's code is
kept). The encoder is the checkout's own ``configs/im256_generate_images.yaml`` ``encoder`` with
``vae_name`` pointed at that folder. Checks:

1. sampling: ``family.sample`` for a block of seeds equals the checkout's
   ``generate_images.pushforward_generator_fn`` (and ``restart_generator_fn`` where the script has
   it) run as the script runs one batch (``torch.manual_seed(S)``, ``net.get_init_noise``, one-hot
   labels, ``encoder.decode``), bit for bit, for T = 1, 2, 4, 8 and two guidance scales, in the
   checkout's precision (lumalabs: ``precision=float64``; the Neon repository: ``precision=fp16``,
   which is float32 on CPU where its CUDA autocast is off);
2. loss (when the checkout has ``training/loss.py``): ``family.encode`` equals
   ``encoder.encode_pixels``; ``family.loss`` equals the training loop's ``loss_fn(net=ddp,
   images=encoder.encode(raw), labels, augment_pipe=None, device).mean()`` with ``configs/im256.yaml``'s
   ``IMMLoss``, under the same seed; one optimiser step equals the config's
   ``construct_class_by_name(params, **optimizer)``;
4. paper protocol (Neon repository only): see :func:`paper_protocol` (``--lumalabs ~/imm``: on a
   pickle made by lumalabs/imm's code);
   measured (``--repo`` Neon 76496c3 ``imm/``, ``--lumalabs`` lumalabs/imm c9473e93, both from
   ``git archive``; torch 2.13.0+cpu): the lumalabs pickle's class has no ``sample_eta_t``; neon's
   loss 0.0446908936 equals the training loop's and the parameters after one AdamW step (lr 1e-6)
   are equal (max |diff| 0; moved up to 1.0e-6); 18/18 checks in 170 s;
3. files: neon's ``network-snapshot-*.pkl`` and a ``neon merge`` output load as
   ``generate_images.py`` loads a network (``pickle.load(f)['ema']`` into a network built from the
   config with ``misc.copy_params_and_buffers(require_all=True)``), and sample as the checkout does;
   the merge is theta_r - w (theta_s - theta_r). Whether ``neon merge`` reads the pickles without
   ``--trust-pickle`` (the inert reader of the checkpoint issue) is reported, not required.

On CPU: ``torch.compile`` (which IMM's ``load_stability_vae`` applies with ``max-autotune``) is
replaced by the identity, ``torchvision`` (imported by lumalabs's script for its grid image) is
stubbed when it cannot be imported, and the loss's ``torch.cuda.get_rng_state`` acts on the CPU
generator (:func:`neon_cli.repo.cuda_calls_on_cpu`, as the family does). Prints one line per
check; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify_xar import RESULTS, check, stub_torchvision_if_broken  # noqa: E402

NET = dict(img_resolution=4, img_channels=4, label_dim=1000, model_type="DiT", patch_size=2, hidden_size=64, depth=1,
           num_heads=2, s_embed=True, noise_schedule="fm", f_type="euler_fm", temb_type="stride", time_scale=1000,
           sigma_data=0.5, eps=0.0, T=0.994)


LUMA_PICKLE = r'''
import pickle, sys, torch
sys.path.insert(0, sys.argv[4])
from verify_xar import stub_torchvision_if_broken  # timm (imported by IMM's DiT) imports torchvision
stub_torchvision_if_broken()
sys.path.insert(0, sys.argv[1])
from training.preconds import IMMPrecond
assert not any(m.startswith("neon") for m in sys.modules)
torch.manual_seed(5)
net = IMMPrecond(**eval(sys.argv[3]))
with torch.no_grad():
    for p in net.parameters():
        p.add_(torch.randn_like(p) * 0.05)
pickle.dump({"ema": net.eval().requires_grad_(False), "augment_pipe": None, "dataset_kwargs": {}}, open(sys.argv[2], "wb"))
print("has sample_eta_t:", hasattr(net, "sample_eta_t"))
'''


def tiny_train_config(repo, work) -> tuple[Path, dict]:
    """The checkout's ``configs/im256.yaml`` with its ``network`` block (DiT-XL/2) set to the tiny
    verification network: neon builds the training network from it, as the training loop does."""
    import yaml

    from neon_imm import checkout

    base = checkout.read_config(repo, "im256.yaml", "im256.yaml", "train_config")[0]
    iface = ("img_resolution", "img_channels", "label_dim")
    cfg = {**base, "network": {"class_name": "training.preconds.IMMPrecond",
                               **{k: v for k, v in NET.items() if k not in iface}, "mixed_precision": "fp16"}}
    (work / "im256-tiny.yaml").write_text(yaml.safe_dump(cfg))
    return work / "im256-tiny.yaml", cfg


def paper_protocol(args, work, repo, fam, pairs, dnnlib, misc, encoder) -> None:
    """4. ``neon finetune imm --recipe paper`` against the Neon repository's ``training_loop.py``
    on one batch: its network (``construct_class_by_name(**config.network, **interface_kwargs)``,
    then ``misc.copy_params_and_buffers(data['ema'], net, require_all=False)``), ``IMMLoss`` of the
    config, ``loss.mean().backward()`` and one step of the config's optimizer (AdamW lr 1e-6; the
    GradScaler is off on CPU). The config is ``im256.yaml`` with its ``network`` block set to the
    tiny DiT (im256.yaml's own is DiT-XL/2). With ``--lumalabs``, the pickle is made by
    lumalabs/imm's code in a subprocess (its IMMPrecond source, pickled in the file, lacks the
    training methods), which is what failed before neon rebuilt the network from the checkout."""
    import subprocess

    from neon_cli.family import load_model, resolve_settings
    from neon_cli.finetune import recipe_plan
    from neon_cli.repo import cuda_calls_on_cpu, seeded_global_rng

    pkl = work / "imm-verify.pkl"
    if args.lumalabs is not None:
        pkl = work / "luma.pkl"
        r = subprocess.run([sys.executable, "-c", LUMA_PICKLE, str(args.lumalabs.resolve()), str(pkl), repr(NET),
                            str(Path(__file__).resolve().parent)],
                           capture_output=True, text=True)
        if r.returncode:
            check("lumalabs/imm made the pickle", False, r.stderr.strip().splitlines()[-1][:200])
            return
        print(f"INFO  lumalabs/imm pickle: {r.stdout.strip()}")
    tiny, cfg = tiny_train_config(repo, work)
    name, train_defaults, recipe_settings = recipe_plan(fam, "paper", pkl)
    s = resolve_settings(fam, pairs, {**recipe_settings, "train_config": str(tiny)}, train=True)
    ours = load_model(fam, pkl, settings=s, trust_pickle=True, purpose="train").train()
    with open(pkl, "rb") as fh:
        data = pickle.load(fh)
    with torch.random.fork_rng():
        theirs = dnnlib.util.construct_class_by_name(**cfg["network"], img_resolution=NET["img_resolution"],
                                                     img_channels=NET["img_channels"], label_dim=NET["label_dim"],
                                                     num_classes=NET["label_dim"])
    theirs.train().requires_grad_(True)
    misc.copy_params_and_buffers(src_module=data["ema"], dst_module=theirs, require_all=False)
    theirs.use_mixed_precision = False  # the CUDA fp16 autocast is off on CPU; neon's loss runs in float32
    loss_fn = dnnlib.util.construct_class_by_name(**cfg["loss"], device="cpu", vae=encoder)
    opt_t = dnnlib.util.construct_class_by_name(params=theirs.parameters(), **cfg["optimizer"])
    opt_o = fam.make_optimizer(ours.parameters(), float(train_defaults["lr"]))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(11))
    lab = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    raw = fam.encode(ours, images)
    got = fam.loss(ours, raw, lab, torch.Generator().manual_seed(4))
    got.backward()
    opt_o.step()
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(4)))

    class DDP:
        module = theirs

        def __call__(self, *a, **k):
            return theirs(*a, **k)

    with cuda_calls_on_cpu(True), seeded_global_rng(seed):
        ref, _ = loss_fn(net=DDP(), images=encoder.encode(raw), labels=torch.nn.functional.one_hot(lab, 1000).float(),
                         augment_pipe=None, device=torch.device("cpu"))
    ref.mean().backward()
    opt_t.step()
    d = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(ours.parameters(), theirs.parameters()))
    moved = max(float((b.detach() - a.detach()).abs().max()) for a, b in zip(data["ema"].parameters(), theirs.parameters()))
    check(f"paper protocol ({'lumalabs pickle' if args.lumalabs else 'Neon pickle'}): recipe {name}, lr {train_defaults['lr']}",
          type(ours).__module__ == "training.preconds" and float(got) == float(ref.mean()) and d == 0.0,
          f"loss neon {float(got):.10f} vs training_loop {float(ref.mean()):.10f}; after one AdamW step parameters max |diff| "
          f"{d:.3g} (the step moved them up to {moved:.3g})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", required=True, type=Path, help="lumalabs/imm or the imm/ folder of SinaAlemohammad/Neon")
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temporary, deleted)")
    ap.add_argument("--lumalabs", type=Path, default=None,
                    help="a lumalabs/imm clone: check 4 then fine-tunes a pickle made by its code (in a subprocess)")
    args = ap.parse_args()
    t0 = time.time()
    # diffusers' AutoencoderKL imports transformers' image processors, which compare torchvision's version: load it
    # before a torchvision stand-in (for timm) exists, which has no version
    import diffusers.models.autoencoders.autoencoder_kl  # noqa: F401

    stubbed = stub_torchvision_if_broken()
    torch.compile = lambda model=None, *a, **k: model if model is not None else (lambda m: m)  # CPU: no inductor
    repo = args.repo.resolve()
    neon_repo = (repo / "training" / "loss.py").is_file()
    precision = "fp16" if neon_repo else "float64"
    print(f"torch {torch.__version__}; torchvision {'stubbed' if stubbed else 'real'}; repo {repo} "
          f"({'Neon imm/ (training code)' if neon_repo else 'lumalabs/imm (no training code)'}); precision={precision}")
    work = Path(args.keep or tempfile.mkdtemp(prefix="verify-imm-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        import diffusers
        from neon_cli.family import get_family, load_model, resolve_settings
        from neon_cli.repo import cuda_calls_on_cpu, seeded_global_rng
        from neon_imm import checkout

        checkout.find({"repo": str(repo)})
        dnnlib = checkout.module(repo, "dnnlib")
        misc = checkout.module(repo, "torch_utils.misc")
        preconds = checkout.module(repo, "training.preconds")
        spec = importlib.util.spec_from_file_location("imm_generate_images", repo / "generate_images.py")
        gen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gen)
        torch.manual_seed(0)
        net = preconds.IMMPrecond(**NET)
        with torch.no_grad():  # DiT zero-initialises adaLN and the final layer: make F non-trivial
            for n, p in net.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        net.eval().requires_grad_(False)
        with open(work / "imm-verify.pkl", "wb") as fh:
            pickle.dump({"ema": net, "augment_pipe": None, "dataset_kwargs": {}}, fh)
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                      layers_per_block=1, norm_num_groups=4, sample_size=32)
        vae.save_pretrained(work / "sd-vae")
        enc_cfg = dict(checkout.read_config(repo, "im256_generate_images.yaml", "", "config")[0]["encoder"])
        enc_cfg["vae_name"] = str(work / "sd-vae")
        encoder = dnnlib.util.construct_class_by_name(**enc_cfg)
        print(f"tiny IMM: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters; encoder {enc_cfg['class_name']}")
        fam = get_family("imm")
        pairs = [f"repo={repo}", f"vae={work / 'sd-vae'}", f"seed_block={args.block}", f"precision={precision}"]
        s = resolve_settings(fam, pairs)
        mine = load_model(fam, work / "imm-verify.pkl", settings=s, trust_pickle=True)
        B = args.block

        latents: dict[str, list] = {"neon": [], "official": []}

        def official(network, seed, labels, steps, cfg, fn):
            with torch.no_grad():
                torch.manual_seed(seed)
                z = network.get_init_noise([len(labels), network.img_channels, network.img_resolution, network.img_resolution], "cpu")
                c = torch.nn.functional.one_hot(labels, num_classes=network.label_dim).float()
                lat = fn(network, z, c, discretization="uniform", num_steps=steps, cfg_scale=cfg)
                latents["official"].append(lat.clone())
                return encoder.decode(lat.to("cpu"))

        fam_encoder = mine._neon_imm.encoder
        real_decode = fam_encoder.decode
        fam_encoder.decode = lambda x: (latents["neon"].append(x.clone()), real_decode(x))[1]

        # 1. sampling ----------------------------------------------------------------------------
        labels = torch.tensor([7, 207, 980, 3, 14, 281, 511, 928])[: 2 * B] if 2 * B <= 8 else torch.arange(2 * B)
        samplers = [("pushforward", gen.pushforward_generator_fn)]
        if hasattr(gen, "restart_generator_fn"):
            samplers.append(("restart", gen.restart_generator_fn))
        for name, fn in samplers:
            for steps in (1, 2, 4, 8):
                for cfg in (1.5, 2.2):
                    ss = {**s, "num_steps": steps, "cfg": cfg, "sampler": name}
                    latents["neon"].clear(), latents["official"].clear()
                    got = fam.sample(mine, torch.arange(2 * B), labels, ss)
                    diffs = []
                    for b in range(2):
                        want = official(net, b * B, labels[b * B:(b + 1) * B], steps, cfg, fn)
                        diffs.append(int((got[b * B:(b + 1) * B].int() - want.int()).abs().max()))
                    dl = max(float((a.double() - b.double()).abs().max()) for a, b in zip(latents["neon"], latents["official"]))
                    check(f"{name} T={steps} cfg={cfg} == generate_images.py", max(diffs) == 0 and dl == 0.0,
                          f"max |diff| = {max(diffs)} (uint8), {dl:.3g} (latents)")
        sub = fam.sample(mine, torch.tensor([2 * B - 1, 1]), labels[[2 * B - 1, 1]], s)
        check("subset of seeds == same images", torch.equal(sub, fam.sample(mine, torch.arange(2 * B), labels, s)[[2 * B - 1, 1]]))
        if not neon_repo:
            print("no training/loss.py: loss and fine-tune checks need the Neon repository's imm/ folder")
        else:
            # 2. loss ----------------------------------------------------------------------------
            tiny, _ = tiny_train_config(repo, work)  # neon trains the network built from the config (its DiT-XL/2: tiny here)
            train = load_model(fam, work / "imm-verify.pkl", settings=resolve_settings(fam, [*pairs, f"train_config={tiny}"], train=True),
                               trust_pickle=True, purpose="train").train()
            images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
            lab = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
            raw = fam.encode(train, images)
            with torch.no_grad():
                want = encoder.encode_pixels(images)
            check("encode == encoder.encode_pixels", torch.equal(raw, want.float()), f"shape {tuple(raw.shape)}")
            got = fam.loss(train, raw, lab, torch.Generator().manual_seed(3))
            seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)))
            cfg = checkout.read_config(repo, "im256.yaml", "im256.yaml", "train_config")[0]
            loss_fn = dnnlib.util.construct_class_by_name(**cfg["loss"], device="cpu", vae=encoder)

            class DDP:  # what the training loop hands the loss
                module = train

                def __call__(self, *a, **k):
                    return train(*a, **k)

            train.use_mixed_precision = False
            with cuda_calls_on_cpu(True), seeded_global_rng(seed):
                x = encoder.encode(raw)
                ref, _ = loss_fn(net=DDP(), images=x, labels=torch.nn.functional.one_hot(lab, 1000).float(),
                                 augment_pipe=None, device=torch.device("cpu"))
            got, ref = got.detach(), ref.detach()
            check("loss == IMMLoss(im256.yaml) of the training loop", float(got) == float(ref.mean()),
                  f"neon {float(got):.10f} IMM {float(ref.mean()):.10f}")
            a, b = copy.deepcopy(train), copy.deepcopy(train)
            opt_a = fam.make_optimizer(a.parameters(), 1e-3)
            opt_b = dnnlib.util.construct_class_by_name(params=b.parameters(), **{**cfg["optimizer"], "lr": 1e-3})
            for net_, opt_ in ((a, opt_a), (b, opt_b)):
                for p in net_.parameters():
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
                opt_.step()
            d = max(float((pa.detach() - pb.detach()).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))
            check("optimiser step == im256.yaml's optimizer", d == 0.0, f"max |diff| = {d:.3g}")
            # 3. files ---------------------------------------------------------------------------
            from typer.testing import CliRunner

            from neon_cli.commands import app

            def cli(*a):
                res = CliRunner().invoke(app, [str(x) for x in a])
                return res.exit_code, res.output[-1500:] + (repr(res.exception) if res.exception else "")

            sets = [x for p in pairs for x in ("--set", p)]
            rc, out = cli("synth", "imm", "--model", work / "imm-verify.pkl", "--num-images", 8, "-o", work / "S", "--batch", B,
                          "--trust-pickle", "--set", "num_steps=8", *sets)
            assert rc == 0, out
            rc, out = cli("finetune", "imm", "--model", work / "imm-verify.pkl", "--data", work / "S", "--budget", 1000, "--batch", 500,
                          "--set", f"train_config={tiny}",
                          "--lr", 1e-4, "-o", work / "ft", "--trust-pickle", *sets)
            assert rc == 0, out
            snap = work / "ft" / "network-snapshot-000001.pkl"

            def load_as_generate_images(path):
                with dnnlib.util.open_url(str(path), verbose=False) as f:
                    data = pickle.load(f)
                fresh = dnnlib.util.construct_class_by_name(class_name="training.preconds.IMMPrecond", **NET)
                misc.copy_params_and_buffers(src_module=data["ema"], dst_module=fresh, require_all=True)
                return fresh.eval().requires_grad_(False), data

            ft_net, data = load_as_generate_images(snap)
            check(f"{snap.name} loads as generate_images.py loads it", set(data) >= {"ema", "augment_pipe", "dataset_kwargs"})
            got = fam.sample(load_model(fam, snap, settings=s, trust_pickle=True), torch.arange(B), labels[:B], {**s, "num_steps": 2})
            want = official(ft_net, 0, labels[:B], 2, 1.5, gen.pushforward_generator_fn)
            check("snapshot samples == official on the snapshot", torch.equal(got, want))
            rc, out = cli("merge", work / "imm-verify.pkl", snap, "--w", 1.5, "--key", "ema", "--trust-pickle", "-o", work / "m.pkl")
            check("neon merge --trust-pickle", rc == 0, out if rc else "")
            m_net, _ = load_as_generate_images(work / "m.pkl")
            base_sd, ft_sd, m_sd = net.state_dict(), ft_net.state_dict(), m_net.state_dict()
            d = max(float((m_sd[k] - (base_sd[k] - 1.5 * (ft_sd[k] - base_sd[k]))).abs().max()) for k in base_sd)
            check("merged .pkl loads as generate_images.py loads it; theta_r - w (theta_s - theta_r)", d < 1e-6, f"max |diff| = {d:.3g}")
            got = fam.sample(load_model(fam, work / "m.pkl", settings=s, trust_pickle=True), torch.arange(B), labels[:B], {**s, "num_steps": 4})
            check("merged model samples == official on the merged file",
                  torch.equal(got, official(m_net, 0, labels[:B], 4, 1.5, gen.pushforward_generator_fn)))
            rc, out = cli("merge", work / "imm-verify.pkl", snap, "--w", 1.5, "--key", "ema", "-o", work / "m2.pkl")
            print(f"INFO  neon merge without --trust-pickle: {'works (inert reader)' if rc == 0 else 'refused: ' + next((ln.strip() for ln in out.splitlines() if 'trust-pickle' in ln or 'rror' in ln), out.strip()[:160])[:200]}")
            paper_protocol(args, work, repo, fam, pairs, dnnlib, misc, encoder)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in RESULTS if not r[1]]
    print(f"{len(RESULTS) - len(bad)}/{len(RESULTS)} checks passed in {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
