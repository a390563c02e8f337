"""The ``xar`` family through the stand-in xAR checkout ``tests/fixtures/xar_repo`` (no OliverRensu/xAR here).

Formulas checked numerically: the per-cluster Euler-Maruyama steps of the linear path
x_t = (1 - t) x + t e (velocity v, score s = (-(1 - t) v - x) / t, drift d = v - t s =
(2 - t) v + x, noise sqrt(2 t |dt|) e, t from 1 to 0.04 then 0), xAR's CFG ramp
``(cfg - 1) * k / (clusters - 1) + 1`` over the clusters, the seeding convention (one
``torch.manual_seed`` per block of seeds), train_new.py's optimiser (AdamW 0.9/0.96, weight decay
0.02 on matrices only, clipping 1.0) and EMA (0.9999 per step of 256 images), and the snapshot
layout ``{'model_ema': ...}`` that the Neon repository's loader reads. ``benchmarks/verify_xar.py``
runs the same comparisons against a real clone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import invoke
from neon_cli.errors import CheckpointError, FamilyError, UsageError
from neon_cli.family import get_family, load_model, resolve_settings

REPO = Path(__file__).resolve().parent / "fixtures" / "xar_repo"
KW = dict(img_size=8, vae_stride=2, vae_embed_dim=4, class_num=10)

pytestmark = pytest.mark.usefixtures("one_thread")


def _forget_checkout():
    for name in list(sys.modules):
        if name == "models" or name.startswith("models."):
            sys.modules.pop(name, None)
    while str(REPO) in sys.path:
        sys.path.remove(str(REPO))


@pytest.fixture(scope="module")
def stand_in():
    """The stand-in's modules (imported as a user's script would), forgotten afterwards."""
    _forget_checkout()
    sys.path.insert(0, str(REPO))
    import models.sampler
    import models.vae
    import models.xar

    yield models.xar, models.vae, models.sampler
    _forget_checkout()


@pytest.fixture(autouse=True)
def _repo_env(monkeypatch):
    monkeypatch.setenv("NEON_XAR_REPO", str(REPO))


@pytest.fixture(scope="module")
def files(stand_in, tmp_path_factory):
    """A tiny theta_r (plain state dict, as the released xAR-B.pth) and a KL VAE ({'model': sd})."""
    xar, vae_mod, _ = stand_in
    d = tmp_path_factory.mktemp("xar")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = xar.xar_tiny(**KW)
        vae = vae_mod.AutoencoderKL(embed_dim=4, ch_mult=(1, 2))
    torch.save(net.state_dict(), d / "xAR-T.pth")
    torch.save({"model": vae.state_dict()}, d / "kl.ckpt")
    return {"dir": d, "base": d / "xAR-T.pth", "vae": d / "kl.ckpt"}


@pytest.fixture(scope="module")
def fam():
    return get_family("xar")


def settings(fam, files, **over):
    s = resolve_settings(fam, [f"vae={files['vae']}", "flow_steps=3", "seed_block=4"], train=True)
    s.update(over)
    return s


def test_reads_every_xar_checkpoint_layout(fam, files, stand_in):
    from neon_xar.checkout import read_checkpoint

    sd = torch.load(files["base"], weights_only=True)
    ema = {k: v + 1 if v.is_floating_point() and v.isfinite().all() else v for k, v in sd.items()}
    d = files["dir"]
    # main_mar.py's training checkpoint: the Namespace is read, nothing runs; the weights are model_ema
    torch.save({"model": sd, "model_ema": ema, "optimizer": {}, "epoch": 3, "scaler": {}, "args": argparse.Namespace(blr=1e-6)},
               d / "checkpoint-last.pth")
    got, _, key = read_checkpoint(d / "checkpoint-last.pth")
    assert key == "model_ema" and torch.equal(got["z_proj.weight"], ema["z_proj.weight"])
    got, _, key = read_checkpoint(files["base"])
    assert key is None and torch.equal(got["z_proj.weight"], sd["z_proj.weight"])
    assert fam.model_num_classes(str(files["base"])) == 10

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from the file",))

    torch.save({"model_ema": sd, "args": argparse.Namespace(x=Evil())}, d / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: holds Python objects") as err:
        read_checkpoint(d / "evil.pth")
    assert "\n" not in str(err.value)
    torch.save({"epoch": 1}, d / "empty.pth")
    with pytest.raises(CheckpointError, match="no xAR weights"):
        read_checkpoint(d / "empty.pth")


def test_architecture_from_the_checkpoint_shapes(fam, files):
    net = load_model(fam, files["base"], settings=settings(fam, files))
    assert net._neon_xar.arch == "xar_tiny"
    assert net._neon_xar.kwargs == {**KW, "patch_size": 1, "attn_dropout": 0.1, "proj_dropout": 0.1, "label_drop_prob": 0.1}
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    with pytest.raises(CheckpointError, match="does not fit xar_base"):
        load_model(fam, files["base"], settings=settings(fam, files, arch="xar_base"))
    with pytest.raises(FamilyError, match="no builder 'xar_nope'"):
        load_model(fam, files["base"], settings=settings(fam, files, arch="xar_nope"))


def test_missing_vae_or_checkout_is_one_line(fam, files, monkeypatch):
    monkeypatch.delenv("NEON_XAR_VAE", raising=False)
    with pytest.raises(UsageError, match=r"--set vae=PATH: .*NEON_XAR_VAE"):
        load_model(fam, files["base"], settings=resolve_settings(fam, []))
    monkeypatch.delenv("NEON_XAR_REPO")
    saved = {k: v for k, v in sys.modules.items() if k == "models" or k.startswith("models.")}
    path = list(sys.path)
    _forget_checkout()
    try:
        with pytest.raises(FamilyError, match="NEON_XAR_REPO=PATH"):
            load_model(fam, files["base"], settings=settings(fam, files))
    finally:
        sys.modules.update(saved)
        sys.path[:] = path


def _expected_tokens(net, labels, seed, cfg, steps, velocity):
    """Independent Euler-Maruyama with xAR's CFG ramp for an analytic velocity (module docstring)."""
    K, n, C = net.clusters, net.seq_len // net.clusters, net.token_embed_dim
    B = len(labels)
    t_steps = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(K):
        w = (cfg - 1) * k / (K - 1) + 1
        x = torch.randn([B, n, C], generator=gen).to(torch.float64)

        def drift(x, t):
            v_c = velocity(x.float(), labels).double()
            v_u = velocity(x.float(), torch.full_like(labels, net.num_classes)).double()
            v = v_u + w * (v_c - v_u) if w > 1 else v_c
            return (2 - t) * v + x

        for i in range(steps - 1):
            t, dt = t_steps[i], t_steps[i + 1] - t_steps[i]
            e = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            x = x + drift(x, t) * dt + torch.sqrt(2 * t) * e * torch.sqrt(dt.abs())
        x = x + (t_steps[-1] - t_steps[-2]) * drift(x, t_steps[-2])
        out.append(x.float())
    return net.unclusterify(torch.cat(out, dim=1))


def test_sampler_is_euler_maruyama_with_the_cfg_ramp(fam, files, stand_in, monkeypatch):
    _, _, sampler = stand_in
    net = load_model(fam, files["base"], settings=settings(fam, files))
    A = 0.3
    b = torch.linspace(-1, 1, net.num_classes + 1)

    def velocity(x, labels):
        return A * x + b[labels.long()].view(-1, 1, 1)

    n = net.seq_len // net.clusters
    monkeypatch.setattr(net, "sample_inference", lambda tokens, labels, times, mask=None: velocity(tokens[:, -n:], labels))
    seen_cfg = []
    real = sampler.euler_maruyama_sampler
    monkeypatch.setattr(sampler, "euler_maruyama_sampler", lambda *a, **k: (seen_cfg.append(k["cfg_scale"]), real(*a, **k))[1])
    decoded = []
    vae = net._neon_xar.vae
    real_decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z: (decoded.append(z.clone()), real_decode(z))[1])
    s = settings(fam, files, cfg=3.0, flow_steps=4)
    images = fam.sample(net, torch.arange(4, 8), None, s)  # block 1 of seed_block 4: torch.manual_seed(4)
    assert seen_cfg == pytest.approx([1.0, 5 / 3, 7 / 3, 3.0])
    want = _expected_tokens(net, torch.arange(4, 8) % 10, 4, 3.0, 4, velocity)
    torch.testing.assert_close(decoded[0] * 0.2325, want, rtol=1e-5, atol=1e-5)
    x = (real_decode(want / 0.2325) + 1) / 2
    assert (images.int() - x.mul(255).clamp(0, 255).to(torch.uint8).int()).abs().max() <= 1
    rounded = fam.sample(net, torch.arange(4, 8), None, {**s, "rounding": "round"})
    assert torch.equal(rounded, torch.round(torch.clamp(real_decode(decoded[0]).add(1).div(2) * 255, 0, 255)).to(torch.uint8))


def test_an_image_depends_on_its_seed_block_only(fam, files):
    net = load_model(fam, files["base"], settings=settings(fam, files))
    s = settings(fam, files, flow_steps=3)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    all_ = fam.sample(net, torch.arange(0, 10), torch.arange(0, 10) % 10, s)
    assert torch.equal(torch.get_rng_state(), torch_state) and np.array_equal(np.random.get_state()[1], np_state)
    part = fam.sample(net, torch.tensor([7, 5, 6]), torch.tensor([7, 5, 6]), s)
    assert torch.equal(part, all_[[7, 5, 6]])
    assert all_.shape == (10, 3, 8, 8) and all_.dtype == torch.uint8
    other = fam.sample(net, torch.arange(0, 4), torch.arange(0, 4), {**s, "seed_block": 2})
    assert not torch.equal(other, all_[:4])


def test_loss_is_xars_own_and_the_cache_gives_the_same_batches(fam, files, stand_in):
    from neon_cli.repo import cuda_calls_on_cpu, seeded_global_rng

    _, vae_mod, _ = stand_in
    net = load_model(fam, files["base"], settings=settings(fam, files), purpose="train").train()
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3, 4])
    cached = fam.encode(net, images)
    vae = net._neon_xar.vae
    x = images.float().div(255).sub(0.5).div(0.5)
    torch.testing.assert_close(cached, torch.cat([vae.encode(x).parameters, vae.encode(x.flip(3)).parameters], 1))
    assert "xar-vae-" in fam.encode_key(net, {})
    l_img = fam.loss(net, images, labels, torch.Generator().manual_seed(11))
    l_enc = fam.loss(net, cached, labels, torch.Generator().manual_seed(11))
    torch.testing.assert_close(l_img, l_enc, rtol=1e-5, atol=1e-6)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(11)))
    with cuda_calls_on_cpu(True), seeded_global_rng(seed):
        keep = (torch.rand(4) < 0.5).view(4, 1, 1, 1)
        m, mf = cached.chunk(2, 1)
        z = vae_mod.DiagonalGaussianDistribution(torch.where(keep, m, mf)).sample().mul_(0.2325)
        want = net(z, labels)
    torch.testing.assert_close(l_enc, want)
    l_enc.backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(FamilyError, match="class-conditional"):
        fam.loss(net, images, None, torch.Generator())


def test_optimizer_and_schedule_are_train_new_pys(fam, files):
    net = load_model(fam, files["base"], settings=settings(fam, files), purpose="train")
    opt = fam.make_optimizer(net.parameters(), 1e-6)
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.02
    assert all(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim > 1 for p in decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(net.parameters()))
    assert decay["betas"] == (0.9, 0.96) and isinstance(opt, torch.optim.AdamW)
    for p in net.parameters():
        p.grad = torch.full_like(p, 10.0)
    opt.step()
    assert float(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))) == pytest.approx(1.0, rel=1e-4)
    d = fam.train_defaults
    assert d["lr"] == 1e-6 * 256 / 256 and d["batch"] == 256 and d["warmup_images"] == 7 * 2**20
    assert 0.5 ** (d["batch"] / d["ema_halflife_images"]) == pytest.approx(0.9999, abs=1e-10)
    from neon_xar.training import ema_halflife_images

    assert ema_halflife_images(256) == d["ema_halflife_images"]


def _cli(*args, code=0):
    return invoke(*args, code=code)


def test_synth_finetune_tune_merge_eval(fam, files, stand_in, tmp_path):
    from neon_diffusers.scoring import write_pixel_stats

    xar, _, _ = stand_in
    sets = ["--set", f"vae={files['vae']}", "--set", "flow_steps=3", "--set", "seed_block=4"]
    _cli("synth", "xar", "--model", files["base"], "--num-images", 8, "-o", tmp_path / "S", "--batch", 4, "--shard-size", 4, *sets)
    write_pixel_stats(tmp_path / "S", tmp_path / "ref.npz")
    _cli("finetune", "xar", "--model", files["base"], "--data", tmp_path / "S", "--budget", 16, "--batch", 4, "--lr", 1e-4,
         "--warmup", 8, "--save-every", 8, "--ema-halflife", 16, "-o", tmp_path / "ft", *sets)
    snaps = sorted((tmp_path / "ft").glob("checkpoint-*.pth"))
    assert [p.name for p in snaps] == ["checkpoint-16.pth", "checkpoint-8.pth"]
    # the Neon repository's loader: torch.load(weights_only=True), ckpt.get('model_ema', ...), strict load
    ck = torch.load(snaps[0], weights_only=True)
    assert set(ck) == {"model_ema", "neon"} and ck["neon"]["finetune_images"] == "16"
    model = xar.xar_tiny(**KW)
    model.load_state_dict(ck.get("model_ema", ck.get("state_dict", ck)), strict=True)
    state = torch.load(tmp_path / "ft" / "train_state.pt", weights_only=True)
    assert torch.equal(ck["model_ema"]["z_proj.weight"], state["ema"]["z_proj.weight"])  # the EMA, not the raw weights
    base = torch.load(files["base"], weights_only=True)
    assert not torch.equal(ck["model_ema"]["z_proj.weight"], base["z_proj.weight"])

    res = _cli("tune-w", "xar", "--base", files["base"], "--selftrained", snaps[0], "--gamma", 1.0, 3.0, "--bounds", 0, 2,
               "--num-samples", 8, "--batch", 8, "--ref-stats", tmp_path / "ref.npz", "-o", tmp_path / "neon.pth", "--write-anyway",
               "--report", tmp_path / "tune.json", *sets, code=(0, 5))  # 5: a tiny run need not beat the base
    rep = json.loads((tmp_path / "tune.json").read_text())["results"]
    assert rep["mode"] == "quadratic" and len({e["gamma"] for e in rep["evaluations"]}) > 2
    assert all(np.isfinite(e["value"]) for e in rep["evaluations"])
    chosen = rep["chosen"]
    tuned = torch.load(tmp_path / "neon.pth", weights_only=True)["model_ema"]
    w = chosen["w"]
    want = base["z_proj.weight"] - w * (ck["model_ema"]["z_proj.weight"] - base["z_proj.weight"])
    torch.testing.assert_close(tuned["z_proj.weight"], want)
    assert res.exit_code == (0 if rep["improved"] else 5)  # 5: written anyway, Neon did not beat the base

    _cli("merge", files["base"], snaps[0], "--w", 1.5, "-o", tmp_path / "merged.pth")
    merged = torch.load(tmp_path / "merged.pth", weights_only=True)  # theta_r's layout: a plain state dict (eval.py)
    model.load_state_dict(merged, strict=True)
    torch.testing.assert_close(merged["pred.weight"], base["pred.weight"] - 1.5 * (ck["model_ema"]["pred.weight"] - base["pred.weight"]))
    assert torch.equal(merged["mask"], base["mask"]) and torch.isinf(merged["mask"]).any()
    _cli("eval", "xar", "--model", tmp_path / "merged.pth", "--num-samples", 8, "--batch", 8, "--ref-stats", tmp_path / "ref.npz",
         "--report", tmp_path / "eval.json", *sets)
    metrics = json.loads((tmp_path / "eval.json").read_text())["results"]["metrics"]
    assert np.isfinite(metrics["pixel_fid"]) and metrics["pixel_fid"] > 0


def test_repo_helpers_for_batch_seeded_code():
    from neon_cli.repo import cuda_calls_on_cpu, sample_by_seed_blocks, seeded_global_rng

    calls = []

    def draw(first, labels):
        calls.append((first, labels.tolist()))
        return torch.arange(first, first + 4).view(4, 1, 1, 1).to(torch.uint8)

    out = sample_by_seed_blocks(torch.tensor([9, 2, 3]), torch.tensor([5, 6, 7]), 4, 10, draw)
    assert out.flatten().tolist() == [9, 2, 3]
    assert calls == [(0, [0, 1, 6, 7]), (8, [8, 5, 0, 1])]  # requested labels, plan labels (seed % 10) for the rest
    with pytest.raises(ValueError, match=">= 0"):
        sample_by_seed_blocks(torch.tensor([-1]), None, 4, 10, draw)
    before = (torch.Tensor.cuda, torch.cuda.get_rng_state)
    with cuda_calls_on_cpu(True):
        x = torch.ones(2)
        assert x.cuda() is x and torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
    assert (torch.Tensor.cuda, torch.cuda.get_rng_state) == before
    state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    with seeded_global_rng(5):
        a = (torch.rand(3), np.random.rand(3))
    with seeded_global_rng(5):
        b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert torch.equal(torch.get_rng_state(), state) and np.array_equal(np.random.get_state()[1], np_state)


def test_flow_steps_below_what_xars_sampler_runs_are_refused(fam):
    """xAR's euler_maruyama_sampler needs num_steps >= 3 (2 re-fills the KV cache in its last step,
    1 leaves its loop index unbound): refused by name before any model is loaded."""
    for bad in ("2", "1"):
        with pytest.raises(FamilyError, match=f"--set flow_steps: {bad} is below the minimum 3"):
            resolve_settings(fam, [f"flow_steps={bad}"])
    assert resolve_settings(fam, ["flow_steps=3"])["flow_steps"] == 3
