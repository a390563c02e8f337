"""Tiny text-to-image pipelines built from configs with random weights (no download), for the t2i tests
and benchmarks/verify_t2i.py: a small ``UNet2DConditionModel``, ``CLIPTextModel`` + ``CLIPTokenizer``
(its vocabulary and merges written here), ``AutoencoderKL`` and a scheduler, saved with
``save_pretrained`` in the Stable Diffusion layout."""

from __future__ import annotations

import json
from pathlib import Path


def write_tokenizer_files(folder: Path) -> None:
    """A CLIP BPE vocabulary of the lower-case letters (with and without the word-end marker) and
    two merges, enough to tokenize any prompt of lower-case words."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters] + ["th", "the</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")


def build_sd(folder: Path, *, seed: int = 0, prediction_type: str = "epsilon", size: int = 8) -> Path:
    """Save a tiny ``StableDiffusionPipeline`` (random weights, seeded) at ``folder``; returns it."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=size)
    tok_dir = Path(folder).parent / (Path(folder).name + "-tokfiles")
    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return Path(folder)


def build_sdxl(folder: Path, *, seed: int = 0, size: int = 8) -> Path:
    """Save a tiny ``StableDiffusionXLPipeline`` (two text encoders, ``text_time`` conditioning) at
    ``folder``; the sizes follow diffusers' own SDXL pipeline tests (cross-attention 32 + 32,
    pooled 32 + 6 x 8 time ids)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=32,
        norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=size)
    tok_dir = Path(folder).parent / (Path(folder).name + "-tokfiles")
    write_tokenizer_files(tok_dir)
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    cfg = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
    te1 = CLIPTextModel(CLIPTextConfig(**cfg))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(folder))
    return Path(folder)
