"""The ``t2i`` family on a tiny Stable Diffusion pipeline built here from configs with random weights
(``tests/t2i_tiny.py``: UNet2DConditionModel, CLIPTextModel + CLIPTokenizer from a vocabulary written
by the test, AutoencoderKL, DDIM scheduler; 8x8 images).

Reference libraries: diffusers (the pipeline's own call for sampling, ``from_pretrained`` /
``load_lora_weights`` / ``fuse_lora`` for what neon writes), the training script's formulas
(train_text_to_image.py: latents, noise, add_noise, text_encoder(input_ids)[0], MSE) for the loss,
transformers' CLIPModel forward for the CLIP score. One module-scoped pipeline and synthetic set.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if any(importlib.util.find_spec(m) is None for m in ("diffusers", "transformers", "peft")) and not os.environ.get("CI"):
    pytest.skip("t2i needs diffusers, transformers, peft (pip install 'neon-cli[t2i]')", allow_module_level=True)

from cli_helpers import invoke  # noqa: E402
from t2i_tiny import build_sd, write_tokenizer_files  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]

TRAIN = ["a red cat", "the blue dog", '{"prompt": "a green tree", "negative_prompt": "blurry"}']
EVAL = ["a yellow bird", "the white house"]
SYNTH = ["--set", "steps=3", "--set", "guidance=3"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    build_sd(root / "sd")
    (root / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL) + "\n")
    invoke("synth", "t2i", "--model", root / "sd", "-n", 6, "--batch", 4, "--set", f"prompts={root / 'train.txt'}", *SYNTH,
           "-o", root / "S")
    return root


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_sd(path):
    return {k: v.clone() for k, v in _pipe(path).unet.state_dict().items()}


def test_prompt_files(tmp_path):
    from neon_cli.errors import UsageError
    from neon_t2i.prompts import read_prompts

    f = tmp_path / "p.txt"
    f.write_text('plain one\n\n{"prompt": "two", "negative_prompt": "bad"}\n{"prompt": "three"}\n')
    assert read_prompts(f) == [{"prompt": "plain one", "negative_prompt": ""}, {"prompt": "two", "negative_prompt": "bad"},
                               {"prompt": "three", "negative_prompt": ""}]
    g = tmp_path / "bad.txt"
    g.write_text('ok\n{"prompt": 3}\n')
    with pytest.raises(UsageError, match=r"bad.txt:2"):
        read_prompts(g)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UsageError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")


def test_synth_is_the_pipeline_call_and_keeps_prompts(work):
    """Image i: seed i, prompt i mod P; bits equal to the pipeline called on the same batch with one
    generator per image; the manifest keeps the prompts and the shards the prompt indices."""
    from safetensors.torch import load_file

    m = json.loads((work / "S" / "manifest.json").read_text())
    prompts = m["conditioning"]["prompts"]
    assert [p["prompt"] for p in prompts] == ["a red cat", "the blue dog", "a green tree"]
    assert prompts[2]["negative_prompt"] == "blurry" and m["num_classes"] == 3
    shard = load_file(str(work / "S" / m["shards"][0]["file"]))
    assert shard["labels"].tolist() == [i % 3 for i in range(6)] and shard["seeds"].tolist() == list(range(6))
    pipe = _pipe(work / "sd")
    out = pipe(prompt=[prompts[i % 3]["prompt"] for i in range(4)], negative_prompt=[prompts[i % 3]["negative_prompt"] for i in range(4)],
               generator=[torch.Generator().manual_seed(i) for i in range(4)], num_inference_steps=3, guidance_scale=3.0,
               output_type="np").images
    ref = torch.from_numpy((out * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)
    assert shard["images"].shape == (6, 3, 8, 8) and shard["images"].dtype == torch.uint8
    assert torch.equal(shard["images"][:4], ref)


def test_export_imagefolder(work, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    invoke("export", work / "S", "--format", "imagefolder", "-o", tmp_path / "folder")
    rows = [json.loads(ln) for ln in (tmp_path / "folder" / "metadata.jsonl").read_text().splitlines()]
    names = ["a red cat", "the blue dog", "a green tree"]
    assert rows == [{"file_name": f"{i:08d}.png", "text": names[i % 3]} for i in range(6)]
    assert (tmp_path / "folder" / "00000004.txt").read_text().strip() == names[1]
    images = load_file(str(work / "S" / "shard-00000.safetensors"))["images"]
    png = np.asarray(Image.open(tmp_path / "folder" / "00000005.png"))
    assert np.array_equal(png, images[5].permute(1, 2, 0).numpy())
    invoke("export", work / "S", "--format", "imagefolder", "-o", tmp_path / "folder", code=2)  # never overwritten
    res = invoke("synth", "t2i", "--model", work / "sd", "-n", 2, "-o", tmp_path / "S2", code=2)  # no prompt file
    assert "--set prompts" in res.output and not (tmp_path / "S2" / "plan.json").exists()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_is_train_text_to_image(work, prediction):
    """The loss equals train_text_to_image.py's steps redone here with the same random draws."""
    import torch.nn.functional as F
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.utils.torch_utils import randn_tensor

    from neon_t2i import family

    model = family.load(str(work / "sd"), settings={}, purpose="train")
    model.pipe.scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config, prediction_type=prediction)
    prompts = [{"prompt": t, "negative_prompt": ""} for t in ("a red cat", "the blue dog", "a green tree")]
    family.use_synthetic_set(model, {"conditioning": {"kind": "prompts", "prompts": prompts}})
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([2, 0, 1])
    moments = family.encode(model, images)
    got = family.loss(model, moments, labels, torch.Generator().manual_seed(7))

    pipe, gen = model.pipe, torch.Generator().manual_seed(7)
    with torch.no_grad():
        dist = pipe.vae.encode(images.float() / 255 * 2 - 1).latent_dist
        latents = DiagonalGaussianDistribution(dist.parameters).sample(generator=gen) * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([prompts[i]["prompt"] for i in labels], max_length=pipe.tokenizer.model_max_length,
                             padding="max_length", truncation=True, return_tensors="pt").input_ids
        ehs = pipe.text_encoder(ids, return_dict=False)[0]
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        noise = randn_tensor(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (3,), generator=gen)
        target = noise if prediction == "epsilon" else sched.get_velocity(latents, noise, t)
        pred = model.unet(sched.add_noise(latents, noise, t), t, ehs, return_dict=False)[0]
        ref = F.mse_loss(pred.float(), target.float())
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-6)
    got.backward()  # the UNet is what trains
    assert any(p.grad is not None for p in model.unet.parameters())


def test_full_finetune_merge_reload(work, tmp_path):
    invoke("finetune", "t2i", "--model", work / "sd", "-d", work / "S", "-b", 8, "--batch", 4, "-o", tmp_path / "ft")
    snap = tmp_path / "ft" / "theta_s-000000008"
    meta = json.loads((snap / "neon.json").read_text())
    assert meta["train_prompts"] == ["a red cat", "the blue dog", "a green tree"] and meta["finetune_images"] == "8"
    base, ft = _pipe(work / "sd"), _pipe(snap)  # diffusers loads the snapshot as it is
    assert any(not torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), ft.unet.state_dict().values()))
    for part in ("vae", "text_encoder"):  # frozen
        assert all(torch.equal(a, b) for a, b in zip(getattr(base, part).state_dict().values(), getattr(ft, part).state_dict().values()))
    invoke("merge", work / "sd", snap, "--w", 1.5, "-o", tmp_path / "neon")
    merged = _pipe(tmp_path / "neon")
    r, s, n = base.unet.state_dict(), ft.unet.state_dict(), merged.unet.state_dict()
    for k in r:
        torch.testing.assert_close(n[k], r[k] - 1.5 * (s[k] - r[k]))
    out = merged(prompt="a yellow bird", generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 8, 8, 3) and np.isfinite(out).all()


def test_lora_finetune_is_a_diffusers_lora(work, tmp_path):
    from safetensors.torch import load_file

    from neon_t2i import family

    invoke("finetune", "t2i", "--model", work / "sd", "-d", work / "S", "-b", 8, "--batch", 4, "--set", "lora_rank=2",
           "--lr", 1e-2, "-o", tmp_path / "ftl")
    snap = tmp_path / "ftl" / "theta_s-000000008"
    state = load_file(str(snap / "pytorch_lora_weights.safetensors"))
    assert state and all(k.startswith("unet.") and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")) for k in state)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    meta = json.loads((snap / "neon.json").read_text())
    assert meta["lora_rank"] == 2 and Path(meta["lora_base"]) == (work / "sd").resolve()
    base = _unet_sd(work / "sd")
    pipe = _pipe(work / "sd")
    pipe.load_lora_weights(str(snap))  # diffusers reads it as it is
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    dense = family.load(str(snap), settings={}).state_dict()  # theta_s for merge / tune-w: base + s B A
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = state[f"unet.{key}.lora_A.weight"], state[f"unet.{key}.lora_B.weight"]
    torch.testing.assert_close(fused[key + ".weight"], base[key + ".weight"] + b @ a)  # alpha / r = 1
    for k, v in fused.items():
        torch.testing.assert_close(dense["unet." + k], v)
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert changed and all(k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")) for k in changed)


def _tiny_clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(1)
    write_tokenizer_files(folder / "tok")
    tok = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"), model_max_length=16)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(str(folder))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(str(folder))


def test_clip_score_definition(tmp_path):
    """100 * max(cos, 0) per image, averaged; cos from CLIPModel's forward (image_embeds, text_embeds)."""
    from transformers import CLIPModel, CLIPProcessor

    from neon_t2i.clip import ClipScorer

    _tiny_clip(tmp_path / "clip")
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    texts = ["a red cat", "the dog", "a tree", "the the", "a cat"]
    scorer = ClipScorer(tmp_path / "clip")
    model = CLIPModel.from_pretrained(str(tmp_path / "clip")).eval()
    proc = CLIPProcessor.from_pretrained(str(tmp_path / "clip"))
    with torch.no_grad():
        out = model(**proc(text=texts, images=[x.permute(1, 2, 0).numpy() for x in images], return_tensors="pt", padding=True))
    cos = (out.image_embeds * out.text_embeds).sum(-1)  # both L2-normalised by CLIPModel
    np.testing.assert_allclose(scorer.per_image(images, texts), (100 * cos.clamp(min=0)).numpy(), rtol=1e-4, atol=1e-4)
    assert scorer(images, texts) == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-4, abs=1e-4)


def test_tune_w_on_eval_prompts(work, tmp_path, monkeypatch):
    """tune-w searches (w, gamma) with pixel FID and CLIP score on evaluation prompts; prompts of S are refused."""
    from neon_diffusers.scoring import write_pixel_stats

    invoke("finetune", "t2i", "--model", work / "sd", "-d", work / "S", "-b", 4, "--batch", 4, "-o", tmp_path / "ft")
    snap = tmp_path / "ft" / "theta_s-000000004"
    write_pixel_stats(work / "S", tmp_path / "pixels.npz")
    _tiny_clip(tmp_path / "clip")
    monkeypatch.setenv("NEON_CLIP", str(tmp_path / "clip"))
    args = ["tune-w", "t2i", "--base", work / "sd", "-s", snap, "-n", 4, "--batch", 4, "--ref-stats", tmp_path / "pixels.npz",
            "--set", "steps=2", "--gamma", 1.5, 4, "--max-evals", 9]
    invoke(*args, "--set", f"prompts={work / 'train.txt'}", code=2)  # S's own prompts: refused
    invoke(*args, "--set", f"prompts={work / 'eval.txt'}", "--report", tmp_path / "tune.json", "-o", tmp_path / "neon",
           "--write-anyway", code=(0, 5))
    rep = json.loads((tmp_path / "tune.json").read_text())
    res = rep["results"]
    assert rep["status"] == ("ok" if res["improved"] else "no_improvement")
    assert res["metric"] == "pixel_fid" and all({"pixel_fid", "clip_score"} <= set(e["metrics"]) for e in res["evaluations"] if "metrics" in e)
    assert any(e["gamma"] != res["evaluations"][0]["gamma"] for e in res["evaluations"])  # gamma is searched
    best = res["baselines"]["best"]  # the headline's base: theta_r at its own best gamma in the box
    assert best["gamma_bounds"] == [1.5, 4.0] and best["value"] <= res["baselines"]["default"]["value"]
    w = res["chosen"]["w"]
    r, s, n = _unet_sd(work / "sd"), _unet_sd(snap), _unet_sd(tmp_path / "neon")
    k = "conv_in.weight"
    torch.testing.assert_close(n[k], r[k] - w * (s[k] - r[k]))


def test_sdxl_sample_and_loss(tmp_path):
    """SDXL: the pipeline's call, and train_text_to_image_sdxl.py's conditioning (penultimate hidden
    states of both encoders concatenated, text_encoder_2's pooled output, time ids (H, W, 0, 0, H, W))."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.utils.torch_utils import randn_tensor

    from t2i_tiny import build_sdxl
    from neon_t2i import family

    build_sdxl(tmp_path / "xl")
    (tmp_path / "p.txt").write_text("a red cat\nthe dog\n")
    settings = {"prompts": str(tmp_path / "p.txt"), "steps": 2, "guidance": 3.0, "resolution": 0, "dtype": "float32"}
    model = family.load(str(tmp_path / "xl"), settings=settings)
    got = family.sample(model, torch.arange(3), torch.arange(3) % 2, settings)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "xl"))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=["a red cat", "the dog", "a red cat"], generator=[torch.Generator().manual_seed(i) for i in range(3)],
               num_inference_steps=2, guidance_scale=3.0, output_type="np").images
    assert torch.equal(got, torch.from_numpy((ref * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))

    train = family.load(str(tmp_path / "xl"), settings={}, purpose="train")
    family.use_synthetic_set(train, {"conditioning": {"kind": "prompts", "prompts": family.prompts(settings)}})
    labels = torch.tensor([1, 0, 1])
    loss = family.loss(train, got, labels, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        p = train.pipe
        latents = DiagonalGaussianDistribution(p.vae.encode(got.float() / 127.5 - 1).latent_dist.parameters).sample(generator=gen)
        latents = latents * p.vae.config.scaling_factor
        texts = [["a red cat", "the dog"][i] for i in labels]
        embeds = []
        for tok, enc in ((p.tokenizer, p.text_encoder), (p.tokenizer_2, p.text_encoder_2)):
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            embeds.append(out.hidden_states[-2])
            pooled = out[0]
        sched = DDPMScheduler.from_config(p.scheduler.config)
        noise = randn_tensor(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (3,), generator=gen)
        time_ids = torch.tensor([[8, 8, 0, 0, 8, 8]] * 3, dtype=torch.float32)
        pred = train.unet(sched.add_noise(latents, noise, t), t, torch.cat(embeds, -1),
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
    torch.testing.assert_close(loss.detach(), F.mse_loss(pred, noise), rtol=1e-5, atol=1e-6)
