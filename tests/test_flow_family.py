"""The ``flow`` family on tiny randomly initialised torchcfm UNetModelWrappers made here (8x8 RGB).

References: torchcfm's own classes (UNetModelWrapper, the flow matchers), torchdiffeq's odeint, and
explicit formulas (Euler steps, x_t = t x1 + (1 - t) x0, u_t = x1 - x0). Checkpoints imitate
torchcfm's ``train_cifar10.py`` container ``{net_model, ema_model, sched, optim, step}`` with
``module.`` prefixes. Runs in CI (the ``flow`` extra + ``pip install --no-deps torchcfm``): outside
CI the module is skipped when those are missing, in CI (``CI`` set) that is an error.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

if any(importlib.util.find_spec(m) is None for m in ("torchcfm", "torchdiffeq", "ot")) and not os.environ.get("CI"):
    pytest.skip("torchcfm/torchdiffeq/pot not installed (see docs/families.md)", allow_module_level=True)

from torchcfm.conditional_flow_matching import ConditionalFlowMatcher  # noqa: E402
from torchcfm.models.unet.unet import UNetModelWrapper  # noqa: E402
from torchdiffeq import odeint  # noqa: E402

from neon_cli.errors import CheckpointError, FamilyError  # noqa: E402
from neon_cli.family import get_family  # noqa: E402
from neon_cli.report import Report  # noqa: E402
from neon_flow import io as FIO  # noqa: E402
from neon_flow import sampling as FS  # noqa: E402

ARGS = {"dim": [3, 8, 8], "num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2],
        "attention_resolutions": "4", "num_heads": 1, "dropout": 0.1}
EULER = {"solver": "euler", "steps": 5, "atol": 1e-5, "rtol": 1e-5, "batch_solve": False}
DOPRI = {"solver": "dopri5", "steps": 100, "atol": 1e-4, "rtol": 1e-4, "batch_solve": False}

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(seed: int = 0, **extra) -> UNetModelWrapper:
    """A random tiny network; the ADM-style zero-initialised layers get random weights too, so the
    velocity field (and every test on it) is not identically zero."""
    torch.manual_seed(seed)
    args = {**ARGS, **extra}
    net = UNetModelWrapper(**{**args, "dim": tuple(args["dim"])}).eval()
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return net


def torchcfm_checkpoint(path, net: torch.nn.Module, ema: torch.nn.Module, sidecar: dict | None = None, prefix: str = "module.") -> str:
    """A container as train_cifar10.py --parallel writes it (DataParallel: 'module.' keys)."""
    wrap = lambda m: {prefix + k: v for k, v in m.state_dict().items()}  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda s: min(s, 5000) / 5000)
    torch.save({"net_model": wrap(net), "ema_model": wrap(ema), "sched": sched.state_dict(), "optim": opt.state_dict(),
                "step": 20000}, str(path))
    if sidecar is not None:
        FIO.sidecar_path(path).write_text(json.dumps(sidecar))
    return str(path)


@pytest.fixture(scope="module")
def fam():
    return get_family("flow")


@pytest.fixture(scope="module")
def base_pt(tmp_path_factory):
    d = tmp_path_factory.mktemp("flow")
    return torchcfm_checkpoint(d / "icfm_tiny_weights_step_20000.pt", tiny_net(seed=1), tiny_net(seed=0),
                               {"model_args": ARGS, "train": {"matcher": "icfm", "hflip": False}})


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_load_takes_ema_model_strips_module_and_reads_sidecar(fam, base_pt):
    net = fam.load(base_pt)
    ema = tiny_net(seed=0)
    for k, v in ema.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    info = net.neon_flow
    assert info["key"] == "ema_model" and info["source"].endswith(".pt.json")
    assert info["train"] == {"matcher": "icfm", "sigma": 0.0, "hflip": False}
    assert fam.read_metadata(base_pt) == {"torchcfm_step": "20000"}
    assert fam.num_classes == 0


def test_model_argument_sources_and_errors(fam, tmp_path, monkeypatch):
    plain = torchcfm_checkpoint(tmp_path / "otcfm_cifar10_weights_step_5.pt", tiny_net(), tiny_net(), sidecar=None, prefix="")
    with pytest.raises(CheckpointError, match=r"otcfm_cifar10_weights_step_5\.pt\.json"):
        fam.load(plain)  # not the CIFAR-10 example's network, and no sidecar: the error names the file to write
    monkeypatch.setattr(FIO, "CIFAR10_ARGS", dict(ARGS))  # the example-default path, with a tiny "example" network
    net = fam.load(plain)
    assert net.neon_flow["source"] == "cifar10-example" and net.neon_flow["train"]["matcher"] == "otcfm"
    # the names train_cifar10.py writes and torchcfm's released weights carry
    assert [FIO.matcher_from_name(f"{m}_cifar10_weights_step_400000.pt") for m in ("otcfm", "icfm", "cfm", "fm", "si")] == \
        ["otcfm", "icfm", "icfm", "fm", "si"]
    assert FIO.matcher_from_name("weights.pt") == "otcfm"
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        fam.load(str(tmp_path / "bad.pt"))
    torch.save({"optim": {}}, str(tmp_path / "empty.pt"))
    with pytest.raises(CheckpointError, match="no state dict"):
        fam.load(str(tmp_path / "empty.pt"))
    side = torchcfm_checkpoint(tmp_path / "x.pt", tiny_net(), tiny_net(), {"model_args": {**ARGS, "num_channels": 64}})
    with pytest.raises(CheckpointError, match="do not fit"):
        fam.load(side)
    FIO.sidecar_path(side).write_text(json.dumps({"model_args": ARGS, "train": {"matcher": "sb"}}))
    with pytest.raises(CheckpointError, match="matcher"):
        fam.load(side)


def test_save_is_a_torchcfm_container(fam, base_pt, tmp_path):
    net = fam.load(base_pt)
    out = tmp_path / "theta.pt"
    fam.save(net, str(out), {"train_images": "256"})
    ck = torch.load(str(out), weights_only=True)
    assert set(ck) == {"net_model", "ema_model", "step", "neon"}
    assert ck["neon"]["model_args"] == ARGS and fam.read_metadata(str(out))["train_images"] == "256"
    # compute_fid.py's loading: UNetModelWrapper(...).load_state_dict(checkpoint["ema_model"])
    native = tiny_net(seed=5)
    native.load_state_dict(ck["ema_model"])
    for k, v in net.state_dict().items():
        assert torch.equal(native.state_dict()[k], v)
    assert fam.load(str(out)).neon_flow["source"] == "container"  # no sidecar needed any more


# ---------------------------------------------------------------------------------------------
# sampling


def test_euler_is_explicit_euler_from_per_seed_noise(fam, base_pt):
    net = fam.load(base_pt)
    seeds = torch.tensor([3, 8, 21])
    got = fam.sample(net, seeds, None, EULER)
    x = torch.stack([torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    assert (got.int() - FS.to_uint8(x).int()).abs().float().mean() > 5  # the flow moved the noise
    with torch.no_grad():
        for i in range(5):
            t = i / 5
            x = x + (1 / 5) * net(torch.full((3,), t), x)
    want = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)  # compute_fid.py
    assert (got.int() - want.int()).abs().max() <= 1 and (got == want).float().mean() > 0.99


def test_dopri5_per_image_and_batch_solve_follow_torchdiffeq(fam, base_pt):
    net = fam.load(base_pt)
    seeds = torch.tensor([0, 1, 2, 3])
    x0 = FS.initial_noise(seeds, (3, 8, 8))
    f = lambda t, x: net(t.expand(x.shape[0]), x)  # noqa: E731
    span = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        solo = torch.cat([odeint(f, x0[i:i + 1], span, method="dopri5", atol=1e-4, rtol=1e-4)[-1] for i in range(4)])
        batch = odeint(f, x0, span, method="dopri5", atol=1e-4, rtol=1e-4)[-1]
    assert torch.equal(fam.sample(net, seeds, None, DOPRI), FS.to_uint8(solo))
    assert torch.equal(fam.sample(net, seeds, None, {**DOPRI, "batch_solve": True}), FS.to_uint8(batch))


@pytest.mark.parametrize("settings", [EULER, DOPRI])
def test_image_depends_only_on_its_seed(fam, base_pt, settings):
    net = fam.load(base_pt)
    seeds = torch.arange(10, 15)
    together = fam.sample(net, seeds, None, settings)
    alone = torch.cat([fam.sample(net, seeds[i:i + 1], None, settings) for i in range(5)])
    assert (together.int() - alone.int()).abs().max() <= 1
    assert (fam.sample(net, seeds + 100, None, settings) != together).any()


def test_class_conditional_network_needs_labels(fam, tmp_path):
    net = tiny_net(class_cond=True, num_classes=3)
    path = torchcfm_checkpoint(tmp_path / "c.pt", net, net, {"model_args": {**ARGS, "class_cond": True, "num_classes": 3}})
    assert fam.model_num_classes(path) == 3
    loaded = fam.load(path)
    assert fam.num_classes == 3
    with pytest.raises(FamilyError, match="labels are required"):
        fam.sample(loaded, torch.arange(2), None, EULER)
    a = fam.sample(loaded, torch.arange(2), torch.tensor([0, 0]), EULER)
    b = fam.sample(loaded, torch.arange(2), torch.tensor([2, 2]), EULER)
    assert a.shape == (2, 3, 8, 8) and not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# training recipe


def test_icfm_loss_is_the_flow_matching_mse(fam, base_pt):
    net = fam.load(base_pt)  # train: icfm, sigma 0, no flip
    net.eval()  # dropout off: the reference below calls the network again
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    got = fam.loss(net, images, None, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    x1 = images.float() / 127.5 - 1
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand(6, generator=g)
    eps = torch.randn(x1.shape, generator=g)  # drawn, multiplied by sigma = 0
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    want = ((net(t, xt) - (x1 - x0)) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # and torchcfm's own matcher on the same draws
    fm = ConditionalFlowMatcher(sigma=0.0)
    t2, xt2, ut2 = fm.sample_location_and_conditional_flow(x0, x1, t=t)
    torch.testing.assert_close(((net(t2, xt2) - ut2) ** 2).mean(), want)
    assert eps.shape == x1.shape


def test_otcfm_pairs_come_from_the_exact_ot_plan(fam, base_pt):
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

    fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)
    pi = fm.ot_sampler.get_map(x0, x1)
    i, j = FS.ot_pairs(fm, x0, x1, torch.Generator().manual_seed(1))
    assert all(pi[a, b] > 0 for a, b in zip(i.tolist(), j.tolist()))  # every pair is in the plan's support
    i2, j2 = FS.ot_pairs(fm, x0, x1, torch.Generator().manual_seed(1))
    assert torch.equal(i, i2) and torch.equal(j, j2)  # a function of the generator, not of numpy's RNG
    # with equal uniform marginals the exact plan is a permutation: each x0 has exactly one partner
    assert (pi > 0).sum() == 16


def test_optimizer_is_clipped_adam(fam):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt, ref = fam.make_optimizer(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    x = torch.randn(8, 4) * 100
    for m in (a, b):
        (m(x) ** 2).sum().backward()
    assert torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0) > 1.0
    opt.step()
    ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    assert fam.train_defaults["ema_halflife_images"] == 887184  # 0.9999 per 128-image step: 128 ln 0.5 / ln 0.9999


# ---------------------------------------------------------------------------------------------
# the whole loop through the core: load -> synth -> finetune -> merge -> reload in torchcfm


def test_synth_finetune_merge_reload_in_torchcfm(fam, base_pt, tmp_path, monkeypatch):
    from neon_cli.finetune import finetune
    from neon_cli.merge import merge_checkpoints
    from neon_cli.synth import load_synthetic, synthesize
    from neon_cli.tune import run_tune_w

    S = tmp_path / "S"
    synthesize("flow", base_pt, num=10, out_dir=S, shard_size=6, batch=4, set_pairs=["steps=4"], report=Report("synth"))
    images, labels, _ = load_synthetic(S)
    assert images.shape == (10, 3, 8, 8) and labels is None
    direct = fam.sample(fam.load(base_pt), torch.arange(10), None, {**EULER, "steps": 4})
    assert (images.int() - direct.int()).abs().max() <= 1

    FT = tmp_path / "ft"
    res = finetune("flow", base_pt, S, budget=8, lr=1e-3, out_dir=FT, batch=4, save_every=4, warmup=0, ema_halflife=8,
                   report=Report("finetune"))
    snaps = [s["path"] for s in res["snapshots"]]
    assert [os.path.basename(s) for s in snaps] == ["theta_s-000000004.pt", "theta_s-000000008.pt"]
    theta_s = torch.load(snaps[-1], weights_only=True)
    assert theta_s["neon"]["metadata"]["finetune_images"] == "8"

    # neon merge on the .pt containers: it finds ema_model, matches 'module.' keys of theta_r with theta_s's
    out = tmp_path / "neon.pt"
    w = 1.25
    merge_checkpoints(base_pt, snaps[-1], [w], [out], report=Report("merge"))
    base_ck = torch.load(base_pt, weights_only=True)
    merged_ck = torch.load(str(out), weights_only=True)
    for k, r in base_ck["ema_model"].items():
        s = theta_s["ema_model"][k[len("module."):]]
        torch.testing.assert_close(merged_ck["ema_model"][k], r + w * (r - s), rtol=1e-6, atol=1e-7)
        assert torch.equal(merged_ck["net_model"][k], base_ck["net_model"][k])  # the raw weights stay theta_r's
    assert set(merged_ck) >= {"net_model", "ema_model", "sched", "optim", "step"}

    # reload in torchcfm exactly as compute_fid.py does, and sample with torchdiffeq
    native = UNetModelWrapper(**{**ARGS, "dim": (3, 8, 8)})
    native.load_state_dict({k[7:]: v for k, v in merged_ck["ema_model"].items()})
    native.eval()
    x0 = FS.initial_noise(torch.arange(3), (3, 8, 8))
    with torch.no_grad():
        traj = odeint(lambda t, x: native(t, x), x0, torch.linspace(0, 1, 5), method="euler")
    native_images = (traj[-1] * 127.5 + 128).clip(0, 255).to(torch.uint8)
    # the family reads the merged file as it is: neon merge carried theta_r's sidecar to neon.pt.json
    assert FIO.sidecar_path(out).read_text() == FIO.sidecar_path(base_pt).read_text()
    ours = fam.sample(fam.load(str(out)), torch.arange(3), None, {**EULER, "steps": 4})
    assert (ours.int() - native_images.int()).abs().max() <= 1

    # tune-w over w with the pixel-FID fallback, writing the best merge through family.save
    from neon_diffusers.scoring import write_pixel_stats

    write_pixel_stats(S, tmp_path / "px.npz")
    monkeypatch.setenv("NEON_REF_STATS", str(tmp_path / "px.npz"))
    best = tmp_path / "best.pt"
    results = run_tune_w("flow", base_pt, [snaps[-1]], bounds=(0.0, 2.0), max_evals=3, num_samples=6, batch=6,
                         set_pairs=["steps=2"], output=best, write_anyway=True, require_improvement=False, report=Report("tune-w"))
    assert results["metric"] == "pixel_fid" and len(results["evaluations"]) == 3 + 1  # 3 Brent points + the base (w = 0)
    assert [e["phase"] for e in results["evaluations"]].count("base") == 1 and results["base"]["w"] == 0.0
    chosen = torch.load(str(best), weights_only=True)
    assert chosen["neon"]["metadata"]["neon.w"] == repr(float(results["chosen"]["w"]))
