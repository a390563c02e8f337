"""The ``t2i`` family with a LoRA θ_s (issue 26 item 3): a LoRA snapshot of ``neon finetune t2i --set
lora_rank=R`` (a folder: ``pytorch_lora_weights.safetensors`` + ``neon.json``) on the tiny Stable
Diffusion pipeline of ``tests/t2i_tiny.py``.

* ``neon tune-w`` through the family's ``load_with_lora`` / ``set_lora_scale`` hooks (peft adapter
  on θ_r's UNet, unmerged, scale −w) measures the same metric values as merging θ_r − w·s·B·A per
  candidate (the hooks switched off), on the same seeds; the UNet is loaded with the adapter once.
* ``neon merge PIPE SNAPSHOT --w W``: the fused pipeline equals the dense formula W0 − w·s·B·A and
  diffusers' ``fuse_lora(lora_scale=-w)`` (what the t2i ``load`` of a LoRA does at scale 1); the
  ``--as-lora`` file, read back by diffusers' ``load_lora_weights`` and fused at scale 1, is that
  same pipeline.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

if any(importlib.util.find_spec(m) is None for m in ("diffusers", "transformers", "peft")) and not os.environ.get("CI"):
    pytest.skip("t2i needs diffusers, transformers, peft (pip install 'neon-cli[t2i]')", allow_module_level=True)

from cli_helpers import invoke  # noqa: E402
from t2i_tiny import build_sd  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]

W = 1.5


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Base pipeline, S (4 images from 2 prompts), and one LoRA snapshot after 4 images (rank 2)."""
    root = tmp_path_factory.mktemp("t2ilora")
    build_sd(root / "sd")
    (root / "train.txt").write_text("a red cat\nthe blue dog\n")
    (root / "eval.txt").write_text("a yellow bird\nthe white house\n")
    invoke("synth", "t2i", "--model", root / "sd", "-n", 4, "--batch", 4, "--set", f"prompts={root / 'train.txt'}",
           "--set", "steps=2", "-o", root / "S")
    # lr 5e-2: B (zero at peft's gaussian init) moves far enough for the images to change
    invoke("finetune", "t2i", "--model", root / "sd", "-d", root / "S", "-b", 4, "--batch", 4, "--set", "lora_rank=2",
           "--lr", 5e-2, "-o", root / "ftl")
    return root, root / "ftl" / "theta_s-000000004"


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dense(work, w):
    """θ_r − w·s·B·A on the UNet, in float64 from the snapshot's factors (s = alpha / r = 1: the
    snapshot has no alpha, diffusers' default; neon.json records lora_alpha = lora_rank)."""
    from safetensors.torch import load_file

    root, snap = work
    meta = json.loads((snap / "neon.json").read_text())
    assert meta["lora_alpha"] == meta["lora_rank"] == 2
    lora = load_file(str(snap / "pytorch_lora_weights.safetensors"))
    base = {k: v.double() for k, v in _pipe(root / "sd").unet.state_dict().items()}
    for k in lora:
        if k.endswith(".lora_A.weight"):
            m = k[len("unet."): -len(".lora_A.weight")]
            base[m + ".weight"] -= w * (lora[f"unet.{m}.lora_B.weight"].double() @ lora[k].double())
    return base


def _close(got, ref, what):
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, rtol=0, atol=4 * torch.finfo(torch.float32).eps * (1 + float(v.abs().max())),
                                   msg=lambda m, k=k: f"{what} {k}: {m}")


def test_tune_w_by_adapter_scale_equals_merging(work, tmp_path, monkeypatch):
    """Adapter at scale −w (loaded once, re-scaled per candidate) vs θ_r − w·s·B·A merged per w:
    the same metrics at the same w on the same seeds (float32 rounding apart), the same choice (to 1e-2),
    and -o (written from the merged state dict either way) equals the dense formula."""
    from neon_diffusers.scoring import write_pixel_stats
    from neon_t2i import T2IFamily

    root, snap = work
    write_pixel_stats(root / "S", tmp_path / "pixels.npz")
    calls = {"load_with_lora": 0, "set_lora_scale": 0}
    hook_load, hook_scale = T2IFamily.load_with_lora, T2IFamily.set_lora_scale

    def counted_load(self, base_path, lora_path, scale, *, settings=None):
        calls["load_with_lora"] += 1
        return hook_load(self, base_path, lora_path, scale, settings=settings)

    def counted_scale(self, model, scale):
        calls["set_lora_scale"] += 1
        return hook_scale(self, model, scale)

    args = ["tune-w", "t2i", "--base", root / "sd", "-s", snap, "-n", 4, "--batch", 4, "--ref-stats", tmp_path / "pixels.npz",
            "--set", "steps=2", "--set", f"prompts={root / 'eval.txt'}", "--max-evals", 4, "--write-anyway",
            # a short stage 2 (at most 5 blocks of 4 images): the float32 rounding below moves the vertex, and
            # every later block's probes follow it further (12 blocks: 1.7e-2 apart in w)
            "--max-images", 64]
    runs = {}
    for name in ("adapter", "merge"):
        if name == "adapter":
            monkeypatch.setattr(T2IFamily, "load_with_lora", counted_load)
            monkeypatch.setattr(T2IFamily, "set_lora_scale", counted_scale)
        else:  # no hook: tune-w merges θ_r + s·B·A (neon_cli.lora.lora_state_dict) for every candidate
            monkeypatch.setattr(T2IFamily, "load_with_lora", None)
        invoke(*args, "--report", tmp_path / f"{name}.json", "-o", tmp_path / name, code=(0, 5))
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())["results"]
    ev = {k: [e for e in r["evaluations"] if e["model"] == "neon"] for k, r in runs.items()}
    # the same candidates in the same order (every Brent step; stage 2's probes until the refit's vertex,
    # which the rounding below moves by ~1e-3, then the probes that follow it and its own rows)
    assert len(ev["adapter"]) == len(ev["merge"])
    same = [(a, m) for a, m in zip(ev["adapter"], ev["merge"]) if a["phase"] == "brent" or abs(a["w"] - m["w"]) <= 1e-6]
    assert sum(a["phase"] == "brent" for a, _ in same) == sum(a["phase"] == "brent" for a in ev["adapter"]) >= 3
    assert sum(a["phase"] == "confirm" for a, _ in same) >= 3
    for a, m in same:
        assert a["w"] == pytest.approx(m["w"], abs=1e-6) and a["seed"] == m["seed"]
        assert set(a["metrics"]) == set(m["metrics"])
        for k in a["metrics"]:
            # the FID of 4 images (the square root of a rank-3 covariance) amplifies the float32 rounding
            # of the weights: measured up to 6.4e-5 (values) and 2.1e-3 (their jackknife SEs, from
            # 3-image replicates) at w = 1.375, a stage-2 probe; a wrong scale or sign moves them by O(1)
            tol = 1e-2 if k.endswith("_se") else 1e-4
            assert a["metrics"][k] == pytest.approx(m["metrics"][k], rel=tol), (k, a["w"], a["phase"])
    base_rows = [e["value"] for e in runs["adapter"]["evaluations"] if e["model"] == "base"]
    assert any(abs(e["value"] - base_rows[0]) > 1e-4 for e in ev["adapter"])  # the LoRA changes the images
    assert calls["load_with_lora"] == 1 and calls["set_lora_scale"] == len(ev["adapter"]) - 1
    # the same choice up to that rounding, which stage 2's refit (a fit over 4-image probes) carries into
    # the vertex (measured: 1e-3 in w); each -o is the dense formula at its own chosen w
    assert runs["adapter"]["chosen"]["w"] == pytest.approx(runs["merge"]["chosen"]["w"], abs=1e-2)
    for name in runs:
        _close(_pipe(tmp_path / name).unet.state_dict(), _dense(work, runs[name]["chosen"]["w"]), name)


def test_merge_lora_snapshot_fused_and_as_lora(work, tmp_path):
    """``neon merge PIPE SNAPSHOT_FOLDER --w W``: fused = dense formula = diffusers' fuse_lora(lora_scale=-w)
    (neon_t2i.pipeline.fuse_lora, which t2i's load() uses at scale 1); the other components are θ_r's;
    ``--as-lora`` loads in diffusers as that same fused pipeline."""
    from neon_t2i.pipeline import fuse_lora, load_pipeline

    root, snap = work
    invoke("merge", root / "sd", snap, "--w", W, "-o", tmp_path / "fused", "-q")
    fused = _pipe(tmp_path / "fused")
    got = fused.unet.state_dict()
    _close(got, _dense(work, W), "fused")
    ref = load_pipeline(root / "sd")
    fuse_lora(ref, snap, -W)
    for k, v in ref.unet.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)
    base = _pipe(root / "sd")
    for part in ("text_encoder", "vae"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(base, part).state_dict().values(),
                                                     getattr(fused, part).state_dict().values()))
    invoke("merge", root / "sd", snap, "--w", W, "--as-lora", "-o", tmp_path / "neon.safetensors", "-q")
    base.load_lora_weights(str(tmp_path / "neon.safetensors"))
    base.fuse_lora()
    base.unload_lora_weights()
    for k, v in base.unet.state_dict().items():
        torch.testing.assert_close(v, got[k], rtol=1e-6, atol=1e-6)


def test_adapter_hook_reads_a_kohya_lora_and_rescales(work, tmp_path):
    """The hook on θ_s's LoRA in the kohya/A1111 layout (``--w -1 --as-lora --lora-format kohya``
    writes the snapshot's own LoRA, B' = B): at scale −W the UNet computes what the fused
    ``neon merge --w W`` UNet computes; re-scaled to 0 it is θ_r's UNet exactly; the merge
    fallback's θ_s (:func:`neon_cli.lora.lora_state_dict`) is the snapshot folder's, bit for bit."""
    from neon_t2i import family

    root, snap = work
    invoke("merge", root / "sd", snap, "--w", -1, "--as-lora", "--lora-format", "kohya", "-o", tmp_path / "k.safetensors", "-q")
    invoke("merge", root / "sd", snap, "--w", W, "-o", tmp_path / "fused", "-q")
    model = family.load_with_lora(str(root / "sd"), str(tmp_path / "k.safetensors"), -W, settings={})
    gen = torch.Generator().manual_seed(0)
    x, ehs, t = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 5, 16, generator=gen), torch.tensor([10, 500])
    with torch.no_grad():
        got = model.unet(x, t, ehs).sample
        ref = _pipe(tmp_path / "fused").unet(x, t, ehs).sample
        base = _pipe(root / "sd").unet(x, t, ehs).sample
        assert (ref - base).abs().max() > 1e-3  # the LoRA matters
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        family.set_lora_scale(model, 0.0)
        assert torch.equal(model.unet(x, t, ehs).sample, base)
    # the merge fallback (and tune-w's -o) reads the kohya file against the 'unet.*' state dict alike
    from neon_cli.lora import lora_state_dict

    base_sd = family.load(str(root / "sd"), settings={}).state_dict()
    kohya, folder = lora_state_dict(base_sd, tmp_path / "k.safetensors"), lora_state_dict(base_sd, snap)
    assert any(not torch.equal(kohya[k], base_sd[k]) for k in base_sd)
    assert all(torch.equal(kohya[k], folder[k]) for k in base_sd)


def test_adapter_hook_refuses_a_text_encoder_lora(work, tmp_path):
    """θ_s of tune-w t2i is the UNet: a LoRA that also adapts the text encoder is refused by name
    (UsageError, exit 2) rather than applied in part."""
    from safetensors.torch import load_file, save_file

    from neon_cli.errors import UsageError
    from neon_t2i import family

    root, snap = work
    state = load_file(str(snap / "pytorch_lora_weights.safetensors"))
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"  # diffusers' key for CLIPTextModel
    state.update({f"{te}.lora_A.weight": torch.ones(2, 16), f"{te}.lora_B.weight": torch.ones(16, 2)})
    save_file(state, str(tmp_path / "te.safetensors"))
    with pytest.raises(UsageError, match="also adapts text_encoder"):
        family.load_with_lora(str(root / "sd"), str(tmp_path / "te.safetensors"), -W, settings={})
