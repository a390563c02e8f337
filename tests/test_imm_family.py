"""The ``imm`` family through the stand-in IMM checkout ``tests/fixtures/imm_repo`` (no lumalabs/imm here).

Formulas checked numerically: IMM's pushforward sampling x_{i+1} = x_i - (t_i - t_{i+1}) sigma_d F
with F = F_uncond + w (F_cond - F_uncond) on the uniform grid t_i = T + i (eps - T) / N (Zhou et al.
2025, Euler-FM parameterisation, c_in = 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)), stride time
embedding), the EDM rho = 7 grid in eta = t / (1 - t), the seeding convention (``randn * sigma_d``
after one ``torch.manual_seed`` per block), the loss being the checkout's ``IMMLoss`` on
``encoder.encode`` latents, im256.yaml's optimiser and EMA (0.9999 per step of 512 images), and the
snapshot format ``dict(ema=...)`` that IMM's ``generate_images.py`` loads.
``benchmarks/verify_imm.py`` runs the same comparisons against real clones.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import invoke
from neon_cli.errors import CheckpointError, FamilyError, UsageError
from neon_cli.family import get_family, load_model, resolve_settings

REPO = Path(__file__).resolve().parent / "fixtures" / "imm_repo"
NET = dict(img_resolution=4, img_channels=4, label_dim=10, model_type="DiT", hidden_size=16, depth=1, patch_size=2,
           noise_schedule="fm", f_type="euler_fm", temb_type="stride", time_scale=1000, sigma_data=0.5, T=0.994, eps=0.0)
TOPS = ("dnnlib", "torch_utils", "training")

pytestmark = pytest.mark.usefixtures("one_thread")


def _forget_checkout():
    for name in list(sys.modules):
        if name.split(".")[0] in TOPS or name.startswith("_imported_module_"):
            sys.modules.pop(name, None)
    while str(REPO) in sys.path:
        sys.path.remove(str(REPO))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """theta_r (an IMMPrecond pickle made with the stand-in's persistence, as IMM's are) and a tiny
    diffusers AutoencoderKL folder standing for sd-vae-ft-ema."""
    import diffusers

    _forget_checkout()
    sys.path.insert(0, str(REPO))
    from training.preconds import IMMPrecond

    d = tmp_path_factory.mktemp("imm")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = IMMPrecond(**NET)
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                      layers_per_block=1, norm_num_groups=4, sample_size=8)
    with open(d / "imm-base.pkl", "wb") as fh:
        pickle.dump({"ema": net, "augment_pipe": None, "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset"}}, fh)
    vae.save_pretrained(d / "sd-vae")
    _forget_checkout()
    yield {"dir": d, "base": d / "imm-base.pkl", "vae": d / "sd-vae"}
    _forget_checkout()


@pytest.fixture(autouse=True)
def _repo_env(monkeypatch):
    monkeypatch.setenv("NEON_IMM_REPO", str(REPO))


@pytest.fixture(scope="module")
def fam():
    return get_family("imm")


def settings(fam, files, **over):
    s = resolve_settings(fam, [f"vae={files['vae']}", "num_steps=2", "seed_block=4"], train=True)
    s.update(over)
    return s


def test_metadata_is_read_without_running_the_file(fam, files, tmp_path):
    marker = tmp_path / "ran"
    src = f"open({str(marker)!r}, 'w').write('x')\nclass Net:\n    pass\n"
    meta = {"type": "class", "version": 6, "module_src": src, "class_name": "Net",
            "state": {"label_dim": 7, "img_channels": 4, "img_resolution": 32, "_init_kwargs": {"a": 1}}}

    class Rec:
        def __reduce__(self):
            return (_reconstruct, (meta,))

    def _reconstruct(m):  # stands for torch_utils.persistence._reconstruct_persistent_obj; never called here
        raise AssertionError("the inert reader called the reconstructor")

    _reconstruct.__module__, _reconstruct.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    pkg, mod = type(sys)("torch_utils"), type(sys)("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _reconstruct
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": mod})
    try:
        blob = pickle.dumps({"ema": Rec(), "neon": {"finetune_images": "2048"}})
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    (tmp_path / "net.pkl").write_bytes(blob)
    assert fam.model_num_classes(str(tmp_path / "net.pkl")) == 7
    assert fam.read_metadata(str(tmp_path / "net.pkl")) == {"finetune_images": "2048"}
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_model(fam, tmp_path / "net.pkl", settings=settings(fam, files))
    assert not marker.exists()
    assert fam.model_num_classes(str(files["base"])) == 10
    torch.save({"ema": {}}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="zip archive"):
        fam.model_num_classes(str(tmp_path / "state.pt"))
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"net": 1}))
    with pytest.raises(CheckpointError, match=r"not an IMM network pickle \(expected pickle\.dump\(dict\(ema="):
        fam.read_metadata(str(tmp_path / "dict.pkl"))


def _expected_latents(net, z, onehot, steps, cfg):
    """Independent pushforward (module docstring) with the network's F."""
    sd = net.sigma_data
    t = torch.linspace(net.T, net.eps, steps + 1, dtype=torch.float64)
    x = z.to(torch.float64)
    for t_cur, t_next in zip(t[:-1], t[1:]):
        c_in = 1 / (sd * np.sqrt((1 - float(t_cur)) ** 2 + float(t_cur) ** 2))
        tt = torch.full((len(x),), float(t_cur)) * 1000
        ss = torch.full((len(x),), float(t_cur - t_next)) * 1000
        xin = (c_in * x).float()
        F_c = net.model(xin, tt, ss, class_labels=onehot).double()
        F_u = net.model(xin, tt, ss, class_labels=torch.zeros_like(onehot)).double()
        x = x - (t_cur - t_next) * sd * (F_u + cfg * (F_c - F_u))
    return x


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_pushforward_is_imms_few_step_map(fam, files, steps, monkeypatch):
    net = load_model(fam, files["base"], settings=settings(fam, files), trust_pickle=True)
    enc = net._neon_imm.encoder
    seen, calls = [], []
    real = enc.decode
    monkeypatch.setattr(enc, "decode", lambda x: (seen.append(x.clone()), real(x))[1])
    real_model = net.model.forward
    monkeypatch.setattr(net.model, "forward", lambda *a, **k: (calls.append(a[0].shape[0]), real_model(*a, **k))[1])
    s = settings(fam, files, num_steps=steps, cfg=1.7)
    images = fam.sample(net, torch.arange(4, 8), None, s)  # block 1: torch.manual_seed(4), labels 4..7
    assert calls == [8] * steps  # NFE = T, each on the doubled (uncond, cond) batch
    calls.clear()
    z = torch.randn([4, 4, 4, 4], generator=torch.Generator().manual_seed(4)) * 0.5
    onehot = torch.nn.functional.one_hot(torch.arange(4, 8), 10).float()
    want = _expected_latents(net, z, onehot, steps, 1.7)
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-6)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert torch.equal(images, real(want))


def test_time_grids_and_restart(fam, files):
    from neon_imm.sampling import time_grid

    net = load_model(fam, files["base"], settings=settings(fam, files), trust_pickle=True)
    torch.testing.assert_close(time_grid(net, 4, "uniform", torch.float64, "cpu"), torch.linspace(0.994, 0.0, 5, dtype=torch.float64))
    eta_max = 0.994 / (1 - 0.994)
    i = torch.arange(5, dtype=torch.float64)
    eta = (eta_max ** (1 / 7) + i / 4 * (0.0 - eta_max ** (1 / 7))) ** 7
    torch.testing.assert_close(time_grid(net, 4, "edm", torch.float64, "cpu"), eta / (1 + eta))
    s = settings(fam, files, num_steps=1)
    one = fam.sample(net, torch.arange(4), None, s)
    assert torch.equal(one, fam.sample(net, torch.arange(4), None, {**s, "sampler": "restart"}))  # one step: the same jump
    assert not torch.equal(fam.sample(net, torch.arange(4), None, {**s, "num_steps": 3, "sampler": "restart"}),
                           fam.sample(net, torch.arange(4), None, {**s, "num_steps": 3}))


def test_an_image_depends_on_its_seed_block_only(fam, files):
    net = load_model(fam, files["base"], settings=settings(fam, files), trust_pickle=True)
    s = settings(fam, files)
    state = torch.get_rng_state()
    all_ = fam.sample(net, torch.arange(10), torch.arange(10) % 10, s)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(fam.sample(net, torch.tensor([6, 1]), torch.tensor([6, 1]), s), all_[[6, 1]])
    assert not torch.equal(fam.sample(net, torch.arange(4), torch.arange(4), {**s, "seed_block": 2}), all_[:4])


def test_loss_is_the_checkouts_immloss(fam, files, tmp_path):
    from neon_cli.repo import cuda_calls_on_cpu, seeded_global_rng
    from neon_imm import checkout

    net = load_model(fam, files["base"], settings=settings(fam, files), trust_pickle=True, purpose="train").train()
    assert all(p.requires_grad for p in net.parameters())  # IMM's training loop: requires_grad_(True)
    aux = net._neon_imm
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(8) % 10
    raw = fam.encode(net, images)
    assert raw.shape == (8, 8, 4, 4) and raw.dtype == torch.float32
    l_img = fam.loss(net, images, labels, torch.Generator().manual_seed(5))
    l_raw = fam.loss(net, raw, labels, torch.Generator().manual_seed(5))
    torch.testing.assert_close(l_img, l_raw)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))

    class DDP:
        module = net

        def __call__(self, *a, **k):
            return net(*a, **k)

    with cuda_calls_on_cpu(True), seeded_global_rng(seed):
        want, _ = aux.loss_fn(net=DDP(), images=aux.encoder.encode(raw), labels=torch.nn.functional.one_hot(labels, 10).float(),
                              augment_pipe=None, device=torch.device("cpu"))
    torch.testing.assert_close(l_raw, want.mean())
    l_raw.backward()
    with pytest.raises(FamilyError, match="matrix_size=4"):
        fam.loss(net, raw[:6], labels[:6], torch.Generator())
    with pytest.raises(FamilyError, match="not loaded for training"):
        fam.loss(load_model(fam, files["base"], settings=settings(fam, files), trust_pickle=True), raw, labels, torch.Generator())
    upstream = tmp_path / "imm"
    for f in checkout.MARKERS:
        (upstream / f).parent.mkdir(parents=True, exist_ok=True)
        (upstream / f).write_text("")
    with pytest.raises(FamilyError, match="lumalabs/imm ships no training code"):
        checkout.make_loss(upstream, {}, 4)
    with pytest.raises(UsageError, match="--set train_config"):
        load_model(fam, files["base"], settings=settings(fam, files, train_config="nope.yaml"), trust_pickle=True, purpose="train")


def test_optimizer_and_schedule_are_im256_yamls(fam, files):
    net = load_model(fam, files["base"], settings=settings(fam, files), trust_pickle=True, purpose="train")
    opt = fam.make_optimizer(net.parameters(), 1e-6)
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW) and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and g["weight_decay"] == 0.0
    d = fam.train_defaults
    assert d["lr"] == 1e-6 and d["batch"] == 512 and d["warmup_images"] == 0
    assert 0.5 ** (512 / d["ema_halflife_images"]) == pytest.approx(0.9999, abs=1e-10)
    assert fam.snapshot_name(1_966_080) == "network-snapshot-001966.pkl"


def _cli(*args, code=0):
    return invoke(*args, code=code)


def _load_as_imm(path):
    """IMM's generate_images.py: pickle.load(f)['ema'] copied into a fresh network (require_all)."""
    sys.path.insert(0, str(REPO))
    try:
        from torch_utils import misc
        from training.preconds import IMMPrecond

        with open(path, "rb") as fh:
            data = pickle.load(fh)
        net = IMMPrecond(**NET)
        misc.copy_params_and_buffers(src_module=data["ema"], dst_module=net, require_all=True)
        return data, net
    finally:
        sys.path.remove(str(REPO))


def test_synth_finetune_tune_per_T_merge_eval(fam, files, tmp_path):
    from neon_diffusers.scoring import write_pixel_stats

    sets = ["--set", f"vae={files['vae']}", "--set", "seed_block=4"]
    _cli("synth", "imm", "--model", files["base"], "--num-images", 8, "-o", tmp_path / "S", "--batch", 4, "--shard-size", 4,
         "--trust-pickle", "--set", "num_steps=8", "--set", "cfg=1.5", *sets)
    write_pixel_stats(tmp_path / "S", tmp_path / "ref.npz")
    _cli("finetune", "imm", "--model", files["base"], "--data", tmp_path / "S", "--budget", 2000, "--batch", 500, "--lr", 1e-4,
         "--save-every", 1000, "-o", tmp_path / "ft", "--trust-pickle", *sets)
    snaps = sorted((tmp_path / "ft").glob("network-snapshot-*.pkl"))
    assert [p.name for p in snaps] == ["network-snapshot-000001.pkl", "network-snapshot-000002.pkl"]
    data, _ = _load_as_imm(snaps[-1])
    assert set(data) == {"ema", "augment_pipe", "dataset_kwargs", "neon"} and data["neon"]["finetune_images"] == "2000"
    assert not hasattr(data["ema"], "_neon_imm") and not data["ema"].training
    base, _ = _load_as_imm(files["base"])
    key = "model.final_layer.weight"
    ft_w, base_w = data["ema"].state_dict()[key], base["ema"].state_dict()[key]
    assert not torch.equal(ft_w, base_w)

    for steps in (1, 2):  # the paper's Figure 7: w (and gamma) tuned per number of steps T
        _cli("tune-w", "imm", "--base", files["base"], "--selftrained", snaps[-1], "--gamma", 1.0, 2.5, "--bounds", 0, 3,
             "--num-samples", 8, "--batch", 8, "--ref-stats", tmp_path / "ref.npz", "--trust-pickle", "--set", f"num_steps={steps}",
             "--report", tmp_path / f"tune{steps}.json", "-o", tmp_path / f"neon-T{steps}.pkl", "--write-anyway", *sets,
             code=(0, 5))  # 5: a tiny run need not beat the base; -o is written either way
        rep = json.loads((tmp_path / f"tune{steps}.json").read_text())
        assert rep["status"] == ("ok" if rep["results"]["improved"] else "no_improvement")
        assert rep["settings"]["resolved_settings"]["num_steps"] == steps
        assert all(np.isfinite(e["value"]) for e in rep["results"]["evaluations"])
        tuned, _ = _load_as_imm(tmp_path / f"neon-T{steps}.pkl")
        w = rep["results"]["chosen"]["w"]
        torch.testing.assert_close(tuned["ema"].state_dict()[key], base_w - w * (ft_w - base_w))

    _cli("merge", files["base"], snaps[-1], "--w", 2.0, "-o", tmp_path / "merged.pkl", "--key", "ema", "--trust-pickle")
    merged, _ = _load_as_imm(tmp_path / "merged.pkl")
    torch.testing.assert_close(merged["ema"].state_dict()[key], base_w - 2.0 * (ft_w - base_w))
    _cli("eval", "imm", "--model", tmp_path / "merged.pkl", "--num-samples", 8, "--batch", 8, "--ref-stats", tmp_path / "ref.npz",
         "--trust-pickle", "--set", "num_steps=2", "--report", tmp_path / "eval.json", *sets)
    metrics = json.loads((tmp_path / "eval.json").read_text())["results"]["metrics"]
    assert np.isfinite(metrics["pixel_fid"])


def test_merge_reads_imm_pickles_without_running_them(fam, files, tmp_path, monkeypatch):
    """neon merge on IMM persistence pickles (no --trust-pickle, the checkout not importable):
    the output loads in IMM's own loader and equals theta_r - w (theta_s - theta_r)."""
    data, base_net = _load_as_imm(files["base"])
    selftrained = tmp_path / "network-snapshot-000001.pkl"
    with torch.no_grad():
        for p in data["ema"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    with open(selftrained, "wb") as fh:
        pickle.dump(data, fh)
    _, ft_net = _load_as_imm(selftrained)
    monkeypatch.delenv("NEON_IMM_REPO")
    _forget_checkout()
    out = tmp_path / "merged.pkl"
    _cli("merge", files["base"], selftrained, "--w", 0.5, "-o", out, "--key", "ema")
    assert not any(name.split(".")[0] in TOPS for name in sys.modules), "merge imported the checkout"
    _, merged = _load_as_imm(out)
    ft = ft_net.state_dict()
    for k, r in base_net.state_dict().items():
        expect = r - 0.5 * (ft[k] - r) if r.is_floating_point() else r
        torch.testing.assert_close(merged.state_dict()[k], expect, rtol=0, atol=1e-6)
    assert out.stat().st_size == files["base"].stat().st_size  # theta_r's own container, tensor bytes replaced


def test_a_lumalabs_pickle_trains_with_the_checkouts_network_class(fam, files, tmp_path):
    """lumalabs/imm's pickles carry an IMMPrecond source without the training methods IMMLoss calls
    (``sample_eta_t``). Like the Neon repository's training_loop.py (construct the network, then
    copy_params_and_buffers from the pickle's ``ema``), neon trains the checkout's class with the
    pickle's tensors; a config network block that does not match is refused, naming it."""
    src = (REPO / "training" / "preconds.py").read_text()
    assert "def sample_eta_t" in src
    (tmp_path / "luma_preconds.py").write_text(src.replace("def sample_eta_t", "def _not_in_lumalabs"))
    _forget_checkout()
    sys.path[:0] = [str(REPO), str(tmp_path)]
    try:
        import luma_preconds

        with torch.random.fork_rng():
            torch.manual_seed(3)
            luma = luma_preconds.IMMPrecond(**NET)
        with open(tmp_path / "luma.pkl", "wb") as fh:
            pickle.dump({"ema": luma, "augment_pipe": None, "dataset_kwargs": {}}, fh)
        want = {k: v.clone() for k, v in luma.state_dict().items()}
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("luma_preconds", None)
        _forget_checkout()
    as_sampled = load_model(fam, tmp_path / "luma.pkl", settings=settings(fam, files), trust_pickle=True)
    assert not hasattr(as_sampled, "sample_eta_t")  # the pickle's own class: what failed with exit 4 before
    net = load_model(fam, tmp_path / "luma.pkl", settings=settings(fam, files), trust_pickle=True, purpose="train")
    assert hasattr(net, "sample_eta_t") and type(net).__module__ == "training.preconds"
    assert dict(net.init_kwargs) == dict(as_sampled.init_kwargs)
    got = net.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], v) for k, v in want.items())
    raw = fam.encode(net, torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))
    assert torch.isfinite(fam.loss(net, raw, torch.arange(4), torch.Generator().manual_seed(0)))
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((REPO / "configs" / "im256.yaml").read_text() + "\nnetwork:\n  class_name: training.preconds.IMMPrecond\n"
                   "  model_type: DiT\n  hidden_size: 8\n  depth: 1\n  patch_size: 2\n")
    with pytest.raises(FamilyError, match=r"--set train_config: .*bad.yaml: network .* differs from the pickled IMMPrecond"):
        load_model(fam, tmp_path / "luma.pkl", settings=settings(fam, files, train_config=str(cfg)), trust_pickle=True,
                   purpose="train")
    cfg.write_text(cfg.read_text().replace("hidden_size: 8", "hidden_size: 16") + "  noise_schedule: fm\n  f_type: euler_fm\n"
                   "  temb_type: stride\n  time_scale: 1000\n")
    from_cfg = load_model(fam, tmp_path / "luma.pkl", settings=settings(fam, files, train_config=str(cfg)), trust_pickle=True,
                          purpose="train")
    assert all(torch.equal(from_cfg.state_dict()[k], v) for k, v in want.items()) and hasattr(from_cfg, "sample_eta_t")
