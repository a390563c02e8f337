"""The ``diffusers`` family on tiny randomly initialised UNet2DModels made here (8x8 RGB, ~45k parameters).

Reference library: diffusers itself. Sampling is compared bit for bit with ``DDPMPipeline`` /
``DDIMPipeline`` given a list of per-image generators; the loss with train_unconditional.py's
formulas; the folders written are reloaded with ``UNet2DModel.from_pretrained`` /
``DDPMPipeline.from_pretrained``. Runs in CI (the ``diffusers`` extra): outside CI the module is
skipped when diffusers is not installed, in CI (``CI`` set) a missing diffusers is an error.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("diffusers") is None and not os.environ.get("CI"):
    pytest.skip("diffusers not installed (pip install '.[diffusers]')", allow_module_level=True)

from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from neon_cli.errors import CheckpointError, DataError, FamilyError, UsageError  # noqa: E402
from neon_cli.family import get_family  # noqa: E402
from neon_cli.metrics import feature_stats, frechet_distance  # noqa: E402
from neon_cli.report import Report  # noqa: E402
from neon_diffusers import io as DIO  # noqa: E402
from neon_diffusers import sampling as DS  # noqa: E402
from neon_diffusers import scoring as SC  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

SETTINGS = {"scheduler": "ddpm", "steps": 6, "eta": 0.0, "guidance": 1.0}


def tiny_unet(num_class_embeds: int | None = None, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds,
    ).eval()


def save_pipe(unet: UNet2DModel, path, **sched) -> str:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=40, **sched)).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_pipe(tiny_unet(), tmp_path_factory.mktemp("d") / "base")


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory):
    return save_pipe(tiny_unet(num_class_embeds=4, seed=1), tmp_path_factory.mktemp("d") / "cond")


@pytest.fixture(scope="module")
def fam():
    return get_family("diffusers")


def pipeline_images(pipe, seeds, **kw) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = pipe(batch_size=len(seeds), generator=gens, output_type="np", **kw).images
    return torch.from_numpy((out * 255).round().astype("uint8")).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# sampling


def test_sample_equals_diffusers_pipelines(fam, base_dir):
    unet = fam.load(base_dir)
    seeds = torch.tensor([0, 5, 17, 123])
    pipe = DDPMPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    ours = fam.sample(unet, seeds, None, SETTINGS)
    assert ours.dtype == torch.uint8 and ours.shape == (4, 3, 8, 8)
    assert torch.equal(ours, pipeline_images(pipe, seeds.tolist(), num_inference_steps=6))
    ddim = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    for eta in (0.0, 0.7):
        ours = fam.sample(unet, seeds, None, {**SETTINGS, "scheduler": "ddim", "steps": 5, "eta": eta})
        assert torch.equal(ours, pipeline_images(ddim, seeds.tolist(), num_inference_steps=5, eta=eta))


@pytest.mark.parametrize("settings", [SETTINGS, {**SETTINGS, "scheduler": "ddim", "eta": 0.5, "guidance": 2.5}])
def test_image_depends_only_on_its_seed(fam, cond_dir, settings):
    unet = fam.load(cond_dir)
    seeds, labels = torch.arange(40, 46), torch.tensor([0, 1, 2, 0, 1, 2])
    together = fam.sample(unet, seeds, labels, settings)
    alone = torch.cat([fam.sample(unet, seeds[i:i + 1], labels[i:i + 1], settings) for i in range(6)])
    assert (together.int() - alone.int()).abs().max() <= 1  # batch-shape rounding at most one level
    reordered = fam.sample(unet, seeds.flip(0), labels.flip(0), settings).flip(0)
    assert (together.int() - reordered.int()).abs().max() <= 1
    assert (fam.sample(unet, seeds + 1000, labels, settings) != together).any()


@pytest.mark.parametrize("gamma", [0.0, 1.0, 3.0])
def test_guidance_is_cfg_of_the_unet_outputs(fam, cond_dir, gamma):
    unet = fam.load(cond_dir)
    info = unet.neon_info
    assert (info.num_classes, info.null_class) == (3, 3) and fam.num_classes == 3
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        c = unet(x, 7, class_labels=labels).sample
        u = unet(x, 7, class_labels=torch.full_like(labels, 3)).sample
        got = DS.guided_output(unet, x, torch.tensor(7), labels, gamma, info.null_class)
    torch.testing.assert_close(got, u + gamma * (c - u), rtol=1e-5, atol=1e-6)


def test_sample_checks_labels_and_guidance(fam, base_dir, cond_dir):
    unc, cond = fam.load(base_dir), fam.load(cond_dir)
    seeds = torch.arange(2)
    with pytest.raises(FamilyError, match="labels are required"):
        fam.sample(cond, seeds, None, SETTINGS)
    with pytest.raises(FamilyError, match="unconditional"):
        fam.sample(unc, seeds, torch.zeros(2, dtype=torch.int64), SETTINGS)
    with pytest.raises(FamilyError, match="guidance"):
        fam.sample(unc, seeds, None, {**SETTINGS, "guidance": 2.0})


# ---------------------------------------------------------------------------------------------
# training recipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_train_unconditional_objective(fam, tmp_path, prediction_type):
    path = save_pipe(tiny_unet(), tmp_path / "p", prediction_type=prediction_type)
    unet = fam.load(path)
    images = torch.randint(0, 256, (5, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    got = fam.loss(unet, images, None, torch.Generator().manual_seed(7))
    # the same draws, in the documented order, through diffusers' own scheduler
    g = torch.Generator().manual_seed(7)
    x0 = images.float() / 255 * 2 - 1  # ToTensor + Normalize([0.5], [0.5])
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 40, (5,), generator=g)
    sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    out = unet(sched.add_noise(x0, noise, t), t).sample
    if prediction_type == "epsilon":
        want = F.mse_loss(out, noise)
    elif prediction_type == "v_prediction":
        want = F.mse_loss(out, sched.get_velocity(x0, noise, t))
    else:
        a = sched.alphas_cumprod[t].reshape(5, 1, 1, 1)
        want = (a / (1 - a) * (out - x0) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got.requires_grad


def test_loss_drops_labels_to_the_null_class(fam, cond_dir, monkeypatch):
    unet = fam.load(cond_dir)
    seen = []
    monkeypatch.setattr(unet, "forward", lambda x, t, **k: seen.append(k["class_labels"].clone()) or (torch.zeros_like(x),))
    labels = torch.zeros(2000, dtype=torch.int64)
    images = torch.zeros(2000, 3, 8, 8, dtype=torch.uint8)
    with torch.no_grad():
        fam.loss(unet, images, labels, torch.Generator().manual_seed(0))
    dropped = float((seen[0] == 3).double().mean())
    assert set(seen[0].unique().tolist()) == {0, 3}
    assert abs(dropped - DS.LABEL_DROPOUT) < 0.03  # Binomial(2000, 0.1): sd 0.0067


def test_optimizer_is_clipped_adamw(fam):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt = fam.make_optimizer(a.parameters(), 1e-2)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    x = torch.randn(8, 4) * 100
    for m in (a, b):
        (m(x) ** 2).sum().backward()
    assert torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0) > 1.0  # large: clipping matters
    opt.step()
    ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    assert opt.state_dict()["param_groups"][0]["betas"] == (0.95, 0.999)


# ---------------------------------------------------------------------------------------------
# folders


def test_layouts_bare_unet_checkpoint_with_ema_and_errors(fam, tmp_path, base_dir):
    # a pipeline's unet/ subfolder on its own: the scheduler is found in ../scheduler
    sub = DIO.resolve(os.path.join(base_dir, "unet"))
    assert sub.scheduler_config["num_train_timesteps"] == 40
    # train_unconditional.py's accelerate checkpoint: unet/ + unet_ema/ (EMAModel), scheduler in the output dir
    out_dir = tmp_path / "run"
    raw = tiny_unet(seed=3)
    save_pipe(raw, out_dir)
    ema_net = tiny_unet(seed=4)
    ema = EMAModel(ema_net.parameters(), model_cls=UNet2DModel, model_config=ema_net.config)
    ckpt = out_dir / "checkpoint-500"
    raw.save_pretrained(str(ckpt / "unet"))
    ema.save_pretrained(str(ckpt / "unet_ema"))
    loaded = fam.load(str(ckpt))
    lay = DIO.resolve(ckpt)
    assert lay.ema and lay.unet_dir.name == "unet_ema" and lay.scheduler_source.endswith(os.path.join("run", "scheduler", "scheduler_config.json"))
    for k, v in ema_net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a bare UNet folder with no scheduler anywhere: train_unconditional's DDPMScheduler(1000)
    bare = tmp_path / "bare"
    tiny_unet().save_pretrained(str(bare))
    assert fam.load(str(bare)).neon_info.scheduler_config == DIO.DEFAULT_SCHEDULER
    assert DS.make_scheduler(fam.load(str(bare)).neon_info, "ddpm").config.num_train_timesteps == 1000
    with pytest.raises(CheckpointError, match="is a folder"):
        fam.load(os.path.join(base_dir, "model_index.json"))
    with pytest.raises(CheckpointError, match="no UNet folder"):
        fam.load(str(tmp_path))
    other = tmp_path / "other"
    tiny_unet().save_pretrained(str(other))
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="UNet2DModel only"):
        fam.load(str(other))


def test_class_convention_from_neon_json(fam, tmp_path):
    path = tmp_path / "c"
    save_pipe(tiny_unet(num_class_embeds=4), path)
    assert fam.model_num_classes(str(path)) == 3
    (path / "neon.json").write_text(json.dumps({"num_classes": 4, "null_class": None}))
    unet = fam.load(str(path))
    assert (unet.neon_info.num_classes, unet.neon_info.null_class) == (4, None) and fam.num_classes == 4
    with pytest.raises(FamilyError, match="no null class"):
        fam.sample(unet, torch.arange(2), torch.tensor([0, 3]), {**SETTINGS, "guidance": 2.0})
    (path / "neon.json").write_text(json.dumps({"num_classes": 9}))
    with pytest.raises(CheckpointError, match="do not fit"):
        fam.load(str(path))


def test_save_writes_loadable_pipeline(fam, cond_dir, tmp_path):
    unet = fam.load(cond_dir)
    out = tmp_path / "saved"
    fam.save(unet, str(out), {"train_images": "640"})
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "neon.json", "scheduler", "unet"]
    assert fam.read_metadata(str(out)) == {"train_images": "640"}
    assert json.loads((out / "neon.json").read_text())["null_class"] == 3
    pipe = DDPMPipeline.from_pretrained(str(out))
    for k, v in unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v), k
    assert pipe.scheduler.config.num_train_timesteps == 40
    with pytest.raises(UsageError, match="not an empty folder"):
        fam.save(unet, str(out), {})


# ---------------------------------------------------------------------------------------------
# the whole loop through the core: load -> synth -> finetune -> merge -> reload in diffusers


def test_synth_finetune_merge_reload_in_diffusers(fam, cond_dir, tmp_path, monkeypatch):
    from neon_cli.evaluate import evaluate
    from neon_cli.requests import EvalRequest, SeedPlan
    from neon_cli.finetune import finetune
    from neon_cli.synth import load_synthetic, synthesize

    pairs = ["scheduler=ddim", "steps=4", "guidance=2.0"]
    S = tmp_path / "S"
    synthesize("diffusers", cond_dir, num=12, out_dir=S, shard_size=8, batch=5, set_pairs=pairs, report=Report("synth"))
    images, labels, _ = load_synthetic(S)
    assert images.shape == (12, 3, 8, 8) and labels.tolist() == [i % 3 for i in range(12)]
    settings = {**SETTINGS, "scheduler": "ddim", "steps": 4, "guidance": 2.0}
    assert (images.int() - fam.sample(fam.load(cond_dir), torch.arange(12), labels, settings).int()).abs().max() <= 1

    FT = tmp_path / "ft"
    res = finetune("diffusers", cond_dir, S, budget=8, lr=1e-3, out_dir=FT, batch=4, save_every=4, warmup=0,
                   report=Report("finetune"))
    snaps = [s["path"] for s in res["snapshots"]]
    assert [os.path.basename(s) for s in snaps] == ["theta_s-000000004", "theta_s-000000008"]
    assert fam.read_metadata(snaps[-1])["finetune_images"] == "8"
    base_sd = UNet2DModel.from_pretrained(cond_dir, subfolder="unet").state_dict()
    self_sd = UNet2DModel.from_pretrained(snaps[-1], subfolder="unet").state_dict()
    assert any(not torch.equal(base_sd[k], self_sd[k]) for k in base_sd)

    out = tmp_path / "neon"
    w = 1.5
    rep = Report("merge")
    DIO.merge_folders(cond_dir, snaps[-1], w, out, report=rep)
    assert rep.outputs and rep.outputs[0]["path"].startswith(str(out))
    merged = UNet2DModel.from_pretrained(str(out), subfolder="unet").state_dict()
    for k, r in base_sd.items():
        torch.testing.assert_close(merged[k], r + w * (r - self_sd[k]), rtol=1e-6, atol=1e-7)
    # the merged folder is a DDPMPipeline folder: diffusers samples it, and so does the family, identically
    pipe = DDIMPipeline.from_pretrained(str(out))
    assert isinstance(pipe.unet, UNet2DModel) and fam.load(str(out)).neon_info.null_class == 3
    assert fam.read_metadata(str(out))["neon.w"] == "1.5"
    seeds, lab = torch.arange(3), torch.tensor([0, 1, 2])
    neon_images = fam.sample(fam.load(str(out)), seeds, lab, {**settings, "guidance": 1.0})
    with torch.no_grad():  # the conditional DDIM loop written out with the pipeline's own modules
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        x = torch.cat([torch.randn((1, 3, 8, 8), generator=g) for g in gens])
        pipe.scheduler.set_timesteps(4)
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t, class_labels=lab).sample, t, x, eta=0.0, generator=gens).prev_sample
    assert torch.equal(neon_images, ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8))

    # pixel-FID fallback scoring through neon eval's library function, against the formula
    stats = tmp_path / "pixels.npz"
    info = SC.write_pixel_stats(S, stats)
    assert info == {"path": str(stats), "num_images": 12, "dim": 192}
    monkeypatch.setenv("NEON_REF_STATS", str(stats))
    metrics = evaluate(EvalRequest("diffusers", out, SeedPlan(seed=0, num=6), tuple(pairs), batch=6), report=Report("eval"))
    model = fam.load(str(out))
    fake = fam.sample(model, torch.arange(6), torch.arange(6) % 3, settings).reshape(6, -1).double().numpy() / 255
    real = images.reshape(12, -1).double().numpy() / 255
    want = frechet_distance(*feature_stats(fake), real.mean(0), np.cov(real, rowvar=False))
    assert metrics["pixel_fid"] == pytest.approx(want, rel=1e-6)  # streamed vs np.cov statistics


def test_merge_folders_refuses_existing_output(base_dir, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(UsageError, match="exists"):
        DIO.merge_folders(base_dir, base_dir, 1.0, tmp_path / "exists", report=Report("merge"))


# ---------------------------------------------------------------------------------------------
# metrics


def test_metric_configuration(fam, tmp_path, monkeypatch):
    assert fam.metrics == ("pixel_fid",)
    imgs = torch.randint(0, 256, (400, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with pytest.raises(UsageError, match="NEON_REF_STATS"):
        fam.score(imgs, None)
    np.save(tmp_path / "imgs.npy", imgs.numpy())
    SC.write_pixel_stats(tmp_path / "imgs.npy", tmp_path / "px.npz")
    monkeypatch.setenv("NEON_REF_STATS", str(tmp_path / "px.npz"))
    assert fam.score(imgs, None)["pixel_fid"] == pytest.approx(0.0, abs=1e-8)  # same set (N > D): distance 0
    assert fam.score(imgs[:200], None)["pixel_fid"] > 0.1
    with pytest.raises(DataError, match="192-d statistics but the images have 64"):
        fam.score(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), None)
    monkeypatch.setenv("NEON_INCEPTION", str(tmp_path / "inception-2015-12-05.pt"))
    assert fam.metrics[0] == "fid"
