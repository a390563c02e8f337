"""Exact Neon in LoRA space (``neon merge PIPELINE LORA``, :mod:`neon_cli.lora`) on a tiny pipeline made here.

The pipeline: a small ``UNet2DConditionModel`` and ``CLIPTextModel`` from configs (random
weights). θ_s is a LoRA made with peft (``LoraConfig``: r=4, alpha=8 on the UNet's attention
projections and resnet ``conv1`` (3x3 conv LoRA); r=2, alpha=1 on the text encoder's q/k/v/out
projections) and saved as diffusers' training scripts do (``get_peft_model_state_dict`` ->
``convert_state_dict_to_diffusers`` -> ``save_lora_weights`` with the adapter metadata).

References: the dense formula θ_r − w·s·B·A computed here in float64; diffusers itself
(``load_lora_weights`` + ``fuse_lora(lora_scale=...)``) for the fused pipeline and for loading
both LoRA layouts neon writes (diffusers and kohya).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

if any(importlib.util.find_spec(m) is None for m in ("diffusers", "peft", "transformers")) and not os.environ.get("CI"):
    pytest.skip("diffusers, peft and transformers are needed (pip install '.[lora]')", allow_module_level=True)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from cli_helpers import invoke  # noqa: E402
from neon_cli.lora import factorwise, negated, neon_cat, read_lora  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]

W = 1.5
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        vocab_size=50, max_position_embeddings=8, projection_dim=8, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))


def _save_lora(unet, te, folder, seed, r=4, alpha=8, te_r=2, te_alpha=1):
    """peft LoRA on copies of the pipeline's models, random A and B, saved as diffusers' scripts do."""
    import copy

    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet, te = copy.deepcopy(unet), copy.deepcopy(te)
    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=False))
    te.add_adapter(LoraConfig(r=te_r, lora_alpha=te_alpha, target_modules=TE_TARGETS, init_lora_weights=False))
    StableDiffusionLoraLoaderMixin.save_lora_weights(  # = StableDiffusionPipeline.save_lora_weights
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    unet, te = _unet(), _text_encoder()
    pipe = root / "pipe"
    unet.save_pretrained(pipe / "unet")
    te.save_pretrained(pipe / "text_encoder")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    lora = _save_lora(unet, te, root / "lora_s", seed=1)
    base_lora = _save_lora(unet, te, root / "lora_r", seed=2, r=4, alpha=4, te_r=2, te_alpha=2)
    return {"root": root, "pipe": pipe, "lora": lora, "base_lora": base_lora}


def _weights(folder):
    return {c: load_file(str(folder / f)) for c, f in FILES.items()}


class _Holder:
    """The LoRA half of a StableDiffusionPipeline (diffusers' own loader/fuser) over our two models."""

    def __init__(self, pipe, xl=False):
        from diffusers import UNet2DConditionModel
        from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
        from transformers import CLIPTextModel

        class H(StableDiffusionXLLoraLoaderMixin if xl else StableDiffusionLoraLoaderMixin):
            hf_device_map = None
            text_encoder_2 = None

            @property
            def components(self):
                return {"unet": self.unet, "text_encoder": self.text_encoder}

        self.h = H()
        self.h.unet = UNet2DConditionModel.from_pretrained(pipe / "unet")
        self.h.text_encoder = CLIPTextModel.from_pretrained(pipe / "text_encoder")

    def fused(self, lora, scale):
        self.h.load_lora_weights(str(lora), adapter_name="x")
        self.h.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale)
        self.h.unload_lora_weights()
        return {"unet": self.h.unet.state_dict(), "text_encoder": self.h.text_encoder.state_dict()}


def _dense(base, lora, w):
    """θ_r − w·s·B·A in float64 for every LoRA'd weight (the formula, independently of neon)."""
    out = {}
    for comp, mod, lay in lora.modules():
        a = lay.A.double().reshape(lay.rank, -1)
        b = lay.B.double().reshape(lay.B.shape[0], lay.rank)
        out[(comp, mod + ".weight")] = base[comp][mod + ".weight"].double() - w * lay.scale * (b @ a).reshape(lay.weight_shape())
    return out


def _close(a, b, what, ulps=4):
    """Equal within a few float32 roundings of the magnitude."""
    tol = ulps * torch.finfo(torch.float32).eps * max(1.0, float(b.double().abs().max()))
    err = float((a.double() - b.double()).abs().max())
    assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol:.3g}"


def test_scales_read_from_the_adapter_metadata(setup):
    lora = read_lora(setup["lora"])
    assert lora.format == "diffusers"
    scales = {(c, l.scale, l.rank) for c, _, l in lora.modules()}
    assert scales == {("unet", 8 / 4, 4), ("text_encoder", 1 / 2, 2)}  # alpha / r
    convs = [m for c, m, l in lora.modules() if l.A.dim() == 4]
    assert convs and all(lora.layers["unet"][m].weight_shape()[2:] == (3, 3) for m in convs)


def test_fused_equals_dense_formula_and_diffusers_fuse_lora(setup, tmp_path):
    invoke("merge", setup["pipe"], setup["lora"].parent, "--w", W, "-o", tmp_path / "neon", "-q")
    got, base = _weights(tmp_path / "neon"), _weights(setup["pipe"])
    lora = read_lora(setup["lora"])
    dense = _dense(base, lora, W)
    assert len(dense) == 40 + 4
    for comp in FILES:
        assert set(got[comp]) == set(base[comp])
        for k, t in got[comp].items():
            assert t.dtype == base[comp][k].dtype
            if (comp, k) in dense:
                _close(t, dense[(comp, k)], f"{comp}.{k}")
            else:
                assert torch.equal(t, base[comp][k]), k  # untouched tensors are θ_r's bits
    assert json.loads((tmp_path / "neon" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    ref = _Holder(setup["pipe"]).fused(setup["lora"].parent, -W)  # diffusers: fuse_lora(lora_scale=-w)
    for comp in FILES:
        for k, t in got[comp].items():
            _close(t, ref[comp][k], f"diffusers {comp}.{k}")  # same formula; a 3x3 conv's B·A differs in summation order


def test_fused_half_precision_is_the_float32_result_cast_once(setup, tmp_path):
    invoke("merge", setup["pipe"], setup["lora"], "--w", W, "-o", tmp_path / "f32", "-q")
    invoke("merge", setup["pipe"], setup["lora"], "--w", W, "-o", tmp_path / "bf16", "--dtype", "bfloat16", "-q")
    a, b = _weights(tmp_path / "f32"), _weights(tmp_path / "bf16")
    for comp in FILES:
        for k in a[comp]:
            assert torch.equal(a[comp][k].to(torch.bfloat16), b[comp][k]), k


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_as_lora_loads_in_diffusers_as_the_fused_model(setup, tmp_path, fmt):
    out = tmp_path / f"neon-{fmt}.safetensors"
    invoke("merge", setup["pipe"], setup["lora"], "--w", W, "--as-lora", "--lora-format", fmt, "-o", out, "-q")
    keys = set(load_file(str(out)))
    if fmt == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
        assert any(k.endswith(".alpha") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)
    else:
        assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in keys)
    # neon reads its own output back: A and alpha/r kept, B = -w B
    mods = {c: {n[:-7] for n in load_file(str(setup["pipe"] / f))} for c, f in FILES.items()}
    back, want = read_lora(out, mods), negated(read_lora(setup["lora"]), W)
    assert back.format == fmt and {(c, m) for c, m, _ in back.modules()} == {(c, m) for c, m, _ in want.modules()}
    for c, m, l in want.modules():
        got = back.layers[c][m]
        assert torch.equal(got.A, l.A) and torch.equal(got.B, l.B) and got.scale == pytest.approx(l.scale, rel=1e-12)
    # diffusers applies it as an ordinary LoRA at scale 1 = the dense Neon formula
    fused = _Holder(setup["pipe"]).fused(out, 1.0)
    dense = _dense(_weights(setup["pipe"]), read_lora(setup["lora"]), W)
    assert len(dense) == 44
    for (comp, k), t in dense.items():
        _close(fused[comp][k], t, f"{fmt}: {comp}.{k}")


def test_base_lora_cat_is_exact_and_factorwise_is_not(setup, tmp_path):
    """θ_r = W0 + s_r B_r A_r, θ_s = W0 + s_s B_s A_s: the output LoRA of rank r_r + r_s fused by
    diffusers equals W0 + (1+w) s_r B_r A_r − w s_s B_s A_s; combining A and B separately does not."""
    out = tmp_path / "cat.safetensors"
    invoke("merge", setup["base_lora"], setup["lora"], "--w", W, "-o", out, "-q")
    lr, ls = read_lora(setup["base_lora"]), read_lora(setup["lora"])
    cat = read_lora(out)
    w0 = _weights(setup["pipe"])
    want = {}
    for c, m, l in ls.modules():
        r = lr.layers[c][m]
        d = lambda x: (x.B.double().reshape(x.B.shape[0], x.rank) @ x.A.double().reshape(x.rank, -1)).reshape(x.weight_shape())
        want[(c, m)] = (1 + W) * r.scale * d(r) - W * l.scale * d(l)
        got = cat.layers[c][m]
        assert got.rank == r.rank + l.rank and got.scale == 1.0
        _close(got.delta(), want[(c, m)], f"cat {c}.{m}")
        wrong = factorwise(lr, ls, W).layers[c][m].delta().double()
        assert float((wrong - want[(c, m)]).abs().max()) > 0.1 * float(want[(c, m)].abs().max()), m
    fused = _Holder(setup["pipe"]).fused(out, 1.0)
    for (c, m), dw in want.items():
        _close(fused[c][m + ".weight"], w0[c][m + ".weight"].double() + dw, f"diffusers cat {c}.{m}")
    # neon_cat as a library call is the same LoRA
    again = neon_cat(lr, ls, W)
    assert all(torch.equal(again.layers[c][m].B.to(cat.layers[c][m].B.dtype), cat.layers[c][m].B) for c, m, _ in ls.modules())


def test_kohya_input_gives_the_same_fused_model(setup, tmp_path):
    """A kohya/A1111 file (lora_unet_*.lora_down/up/alpha) is read by module-name matching."""
    k = tmp_path / "k.safetensors"
    invoke("merge", setup["pipe"], setup["lora"], "--w", -1, "--as-lora", "--lora-format", "kohya", "-o", k, "-q")  # = θ_s's LoRA
    invoke("merge", setup["pipe"], k, "--w", W, "-o", tmp_path / "from-kohya", "-q")
    invoke("merge", setup["pipe"], setup["lora"], "--w", W, "-o", tmp_path / "from-diffusers", "-q")
    a, b = _weights(tmp_path / "from-kohya"), _weights(tmp_path / "from-diffusers")
    for comp in FILES:
        for name in a[comp]:
            assert torch.equal(a[comp][name], b[comp][name]), name


def test_bad_inputs_name_the_key_or_flag(setup, tmp_path):
    sd = load_file(str(setup["lora"]))
    bad = dict(sd)
    bad["unet.mid_block.nonsense.lora_A.weight"] = torch.zeros(4, 8)
    bad["unet.mid_block.nonsense.lora_B.weight"] = torch.zeros(8, 4)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    res = invoke("merge", setup["pipe"], tmp_path / "bad.safetensors", "--w", W, "-o", tmp_path / "o", code=2)
    assert "unet.mid_block.nonsense.lora_A.weight" in res.output and not (tmp_path / "o").exists()
    half = {k: v for k, v in sd.items() if not k.endswith("to_q.lora.up.weight")}
    save_file(half, str(tmp_path / "half.safetensors"))
    res = invoke("merge", setup["pipe"], tmp_path / "half.safetensors", "--w", W, "-o", tmp_path / "o", code=2)
    assert "lacks its B (up) factor" in res.output
    res = invoke("merge", setup["pipe"], setup["lora"], "--w", W, "-o", tmp_path / "o.safetensors", code=2)
    assert "pipeline folder" in res.output
    res = invoke("merge", setup["pipe"] / "unet", setup["pipe"] / "unet", "--w", W, "--as-lora", "-o", tmp_path / "x.safetensors", code=2)
    assert "--as-lora" in res.output and "not a LoRA" in res.output
    res = invoke("merge", setup["pipe"], setup["lora"], "--w", W, "--as-lora", "--lora-format", "lycoris", "-o", tmp_path / "x.safetensors", code=2)
    assert "--lora-format" in res.output
    dora = dict(sd)
    dora["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"] = torch.ones(8)
    save_file(dora, str(tmp_path / "dora.safetensors"))
    res = invoke("merge", setup["pipe"], tmp_path / "dora.safetensors", "--w", W, "-o", tmp_path / "o", code=2)
    assert "to_q.lora_magnitude_vector" in res.output and "DoRA" in res.output
    invoke("merge", setup["pipe"], setup["lora"], "--w", W, "-o", tmp_path / "dry", "--dry-run", "-q")
    assert not (tmp_path / "dry").exists() and not (tmp_path / "x.safetensors").exists()


FAMILY_FILE = os.path.join(os.path.dirname(__file__), "fixtures", "lorafam.py")


def test_tune_w_rescales_the_adapter_instead_of_merging(tmp_path):
    """A LoRA snapshot: tune-w scores θ_r with the adapter at scale −w (the family's load_with_lora
    once, then set_lora_scale per candidate); a family without the hooks merges θ_r + s·B·A per w.
    Both see the same metric at every w, choose the same w, and -o is θ_r − w·s·B·A."""
    from neon_cli.family import get_family
    from neon_cli.report import Report
    from neon_cli.tune import run_tune_w

    fam, plain = get_family(f"{FAMILY_FILE}:family"), get_family(f"{FAMILY_FILE}:plain")
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    fam.save(fam.new(), str(base), {})
    a, b = 0.5 * torch.randn(2, 16), 0.5 * torch.randn(16, 2)
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.proj.lora_A.weight": a, "unet.proj.lora_B.weight": b}, str(lora),
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 3})})  # s = 3/2
    runs = {}
    for name in ("family", "plain"):
        runs[name] = run_tune_w(f"{FAMILY_FILE}:{name}", base, [lora], bounds=(-1.0, 3.0), num_samples=64, max_evals=6,
                                abandon_margin=None, require_improvement=False, write_anyway=True,
                                output=tmp_path / f"{name}.safetensors", report=Report("tune-w"))
    ev = {k: [(e["w"], e["value"]) for e in r["evaluations"] if e["model"] == "neon"] for k, r in runs.items()}
    assert len(ev["family"]) >= 3 and len(ev["family"]) == len(ev["plain"])
    for (w1, x), (w2, y) in zip(ev["family"], ev["plain"]):  # unmerged vs merged: float32 rounding apart
        assert w1 == pytest.approx(w2, abs=1e-5) and x == pytest.approx(y, rel=1e-5)
    assert fam.calls["load_with_lora"] == 1 and fam.calls["set_lora_scale"] == len(ev["family"]) - 1
    w = runs["family"]["chosen"]["w"]
    assert w == pytest.approx(runs["plain"]["chosen"]["w"], abs=1e-5)
    w0 = load_file(str(base))["proj.weight"].double()
    for name in ("family", "plain"):
        w = runs[name]["chosen"]["w"]
        _close(load_file(str(tmp_path / f"{name}.safetensors"))["proj.weight"], w0 - w * 1.5 * (b.double() @ a.double()), name)


def test_diffusers_family_samples_the_rescaled_adapter_as_the_merged_unet(tmp_path):
    """The ``diffusers`` family's hook: UNet2DModel + peft LoRA at scale −w samples the images of
    the UNet merged by ``neon merge`` (θ_r − w·s·B·A)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from neon_cli.family import get_family

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8).eval()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=40)).save_pretrained(str(tmp_path / "base"))
    from peft import inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False), unet)
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    lora = tmp_path / "lora.safetensors"
    save_file(sd, str(lora), metadata={"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4})})
    invoke("merge", tmp_path / "base", lora, "--w", W, "-o", tmp_path / "neon", "-q")
    fam = get_family("diffusers")
    settings = {"scheduler": "ddpm", "steps": 4, "eta": 0.0, "guidance": 1.0}
    seeds = torch.arange(3)
    merged = fam.sample(fam.load(str(tmp_path / "neon")), seeds, None, settings)
    adapted = fam.load_with_lora(str(tmp_path / "base"), str(lora), 0.0)
    plain = fam.sample(adapted, seeds, None, settings)  # scale 0: θ_r
    assert torch.equal(plain, fam.sample(fam.load(str(tmp_path / "base")), seeds, None, settings))
    assert (plain.int() - merged.int()).abs().max() > 8
    fam.set_lora_scale(adapted, -W)
    got = fam.sample(adapted, seeds, None, settings)
    assert (got.int() - merged.int()).abs().max() <= 1  # uint8 images; unmerged vs merged rounding


def test_peft_folder_with_rank_alpha_patterns_and_rslora(setup, tmp_path):
    """A peft ``save_pretrained`` folder (adapter_config.json: rank_pattern, alpha_pattern,
    use_rslora): neon's scales are peft's own ``scaling``, and ``--w -1`` (θ_s itself) fused equals
    peft's ``merge_and_unload``."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"], rank_pattern={"to_q": 2},
                     alpha_pattern={"to_k": 3}, use_rslora=True, init_lora_weights=False)
    model = get_peft_model(UNet2DConditionModel.from_pretrained(setup["pipe"] / "unet"), cfg)
    model.save_pretrained(str(tmp_path / "peft"))
    peft_scales = {n.removeprefix("base_model.model."): m.scaling["default"]
                   for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    lora = read_lora(tmp_path / "peft")
    assert lora.format == "peft" and set(lora.layers) == {"unet"}
    assert {m: l.scale for m, l in lora.layers["unet"].items()} == pytest.approx(peft_scales, rel=1e-12)
    assert {round(s, 6) for s in peft_scales.values()} == {round(8 / 2 ** 0.5, 6), round(3 / 2, 6), round(8 / 2, 6)}
    theta_s = model.merge_and_unload().state_dict()
    invoke("merge", setup["pipe"], tmp_path / "peft", "--w", -1, "-o", tmp_path / "ts", "-q")
    got = load_file(str(tmp_path / "ts" / FILES["unet"]))
    for k, t in got.items():
        _close(t, theta_s[k], k)


def test_several_w_write_one_lora_each(setup, tmp_path):
    invoke("merge", setup["pipe"], setup["lora"], "--w", "0.5,2", "--as-lora", "-o", tmp_path / "n-{w}.safetensors", "-q")
    a, b = load_file(str(tmp_path / "n-0.5.safetensors")), load_file(str(tmp_path / "n-2.safetensors"))
    src = load_file(str(setup["lora"]))
    k = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(a[k + ".lora_A.weight"], src[k + ".lora.down.weight"])
    assert torch.equal(a[k + ".lora_B.weight"], -0.5 * src[k + ".lora.up.weight"])
    assert torch.equal(b[k + ".lora_B.weight"], -2 * src[k + ".lora.up.weight"])


def test_kohya_sdxl_block_names_read_as_diffusers_sdxl_loader_does(setup, tmp_path):
    """kohya's SDXL files name sgm blocks (input_blocks_1_1, output_blocks_2_1, in_layers_2): neon maps
    them (diffusers' block renumbering, then the sgm -> diffusers renames) to the modules diffusers'
    StableDiffusionXLLoraLoaderMixin.load_lora_weights patches, with the same weights."""
    torch.manual_seed(5)
    sd = {}
    for name, a, b in (("input_blocks_1_1_transformer_blocks_0_attn1_to_q", (2, 8), (8, 2)),
                       ("output_blocks_2_1_proj_in", (2, 8, 1, 1), (8, 2, 1, 1)),
                       ("input_blocks_1_0_in_layers_2", (2, 8, 3, 3), (8, 2, 1, 1))):
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(a)
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(b)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(tmp_path / "sgm.safetensors"))
    invoke("merge", setup["pipe"], tmp_path / "sgm.safetensors", "--w", -1, "-o", tmp_path / "ts", "-q")  # θ_s itself
    got, base = _weights(tmp_path / "ts")["unet"], _weights(setup["pipe"])["unet"]
    changed = sorted(k for k in got if not torch.equal(got[k], base[k]))
    assert changed == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                       "down_blocks.0.resnets.0.conv1.weight", "up_blocks.1.attentions.0.proj_in.weight"]
    ref = _Holder(setup["pipe"], xl=True).fused(tmp_path / "sgm.safetensors", 1.0)["unet"]
    for k in got:
        _close(got[k], ref[k], k)


def test_fused_result_not_finite_in_half_precision_is_refused(setup, tmp_path):
    """As ``neon merge``: a fused weight that overflows the output dtype is refused naming the tensor
    (nothing written) unless --allow-nonfinite."""
    sd = load_file(str(setup["lora"]))
    k = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"
    sd[k] = torch.full_like(sd[k], 1e4)
    save_file(sd, str(tmp_path / "big.safetensors"))
    res = invoke("merge", setup["pipe"], tmp_path / "big.safetensors", "--w", 100, "--dtype", "float16", "-o", tmp_path / "o", code=2)
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight" in res.output and not (tmp_path / "o").exists()
    invoke("merge", setup["pipe"], tmp_path / "big.safetensors", "--w", 100, "--dtype", "float16", "-o", tmp_path / "o",
           "--allow-nonfinite", "-q")
    got = load_file(str(tmp_path / "o" / FILES["unet"]))["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert got.dtype == torch.float16 and not torch.isfinite(got).all()
