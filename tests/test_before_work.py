"""Everything a command needs is checked before the first sample (issue 22, items 5 and 7):
impossible sizes, options a family ignores, missing reference statistics, a --key naming
nothing; inspect reports every shard of a sharded pickle folder; a family's snapshot suffix comes
from its save; errors from torch or a family are one line naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Plain:
    """A class of the test module: torch.load(weights_only=True) refuses it."""


def _sharded_bin(folder: Path, marker: Path) -> None:
    """A pytorch_model.bin.index.json folder of two pickle shards; the second also calls os.system."""
    folder.mkdir()
    torch.save({"a.weight": torch.ones(2, 2)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.weight": torch.zeros(3), "extra": _Evil(marker)}, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a.weight": "pytorch_model-00001-of-00002.bin", "b.weight": "pytorch_model-00002-of-00002.bin"}}))


def test_inspect_reports_the_globals_and_warning_of_every_shard(tmp_path):
    marker = tmp_path / "PWNED"
    _sharded_bin(tmp_path / "m", marker)
    data = json.loads(invoke("inspect", tmp_path / "m", "--json", "-q").stdout)
    assert data["warnings"] == ["this file would run os.system on load (shard pytorch_model-00002-of-00002.bin)"]
    shards = data["shards"]
    assert list(shards) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert shards["pytorch_model-00001-of-00002.bin"]["warnings"] == []
    kinds = {g["name"]: g["kind"] for g in shards["pytorch_model-00002-of-00002.bin"]["globals"]}
    assert kinds[f"{os.system.__module__}.system"] == "dangerous"
    merged = {g["name"]: g["count"] for g in data["globals"]}
    assert merged["torch._utils._rebuild_tensor_v2"] == 2  # one tensor per shard, summed
    assert data["weights"]["tensors"] == 2 and not marker.exists()
    human = invoke("inspect", tmp_path / "m", "-q")  # warnings go to stderr in every mode (issue 22 item 5)
    assert "warning: this file would run os.system on load (shard pytorch_model-00002-of-00002.bin)" in human.stderr
    assert "warning:" not in human.stdout


def test_inspect_key_that_names_nothing_is_an_error(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "step": 3}, tmp_path / "c.pt")
    res = invoke("inspect", tmp_path / "c.pt", "--key", "nosuch", "-q", code=2)
    assert "--key nosuch: no entry 'nosuch'" in res.output and "c.pt" in res.output
    data = json.loads(invoke("inspect", tmp_path / "c.pt", "--key", "model", "--json", "-q").stdout)
    assert data["weights"]["key"] == "model" and data["weights"]["tensors"] == 1
    data = json.loads(invoke("inspect", tmp_path / "c.pt", "--json", "-q").stdout)  # no --key: found on its own
    assert data["weights"]["key"] == "model"


def test_synth_refuses_sizes_beyond_disk_or_shards_before_loading(tmp_path, monkeypatch):
    from neon_cli import synth

    res = invoke("synth", "digits", "-n", "9223372036854775808", "-o", tmp_path / "S", "-q", code=3)
    assert "--num-images 9223372036854775808: S needs at least 83,010,348,331,692,982,272 bytes" in res.output
    assert f"free on {tmp_path}" in res.output and not (tmp_path / "S").exists()
    res = invoke("synth", "digits", "-n", "9223372036854775809", "-o", tmp_path / "S", "-q", code=2)
    assert "--seed" in res.output  # beyond the seeds: validate.seed's error
    monkeypatch.setattr(synth, "MAX_SHARDS", 4)
    res = invoke("synth", "digits", "-n", "50", "--shard-size", "10", "-o", tmp_path / "S", "-q", code=2)
    assert "--num-images 50 with --shard-size 10: 5 shards, more than 4; give a larger --shard-size" in res.output
    # what a resumed run already holds counts as made
    free = 10 * synth.MIN_BYTES_PER_IMAGE
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": free})())
    synth.check_size(10, 5, tmp_path / "new")
    with pytest.raises(Exception, match=r"--num-images 11: S needs at least 99 bytes .* more than the 90 bytes free"):
        synth.check_size(11, 5, tmp_path / "new")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "shard-00000.safetensors").write_bytes(b"x" * 9)
    synth.check_size(11, 5, tmp_path / "old")


# ---------------------------------------------------------------------------------- scoring files


def test_reference_statistics_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    """eval / tune-w on an image family without reference statistics: the error comes before the
    model is even loaded (a folder that is no pipeline at all), so before any sample."""
    from neon_cli.errors import UsageError
    from neon_cli.evaluate import evaluate
    from neon_cli.requests import EvalRequest, SeedPlan
    from neon_cli.report import Report
    from neon_cli.tune import run_tune_w

    monkeypatch.delenv("NEON_REF_STATS", raising=False)
    (tmp_path / "not-a-pipeline").mkdir()
    (tmp_path / "snap").mkdir()
    with pytest.raises(UsageError, match="NEON_REF_STATS: set it to the reference pixel statistics"):
        evaluate(EvalRequest("diffusers", tmp_path / "not-a-pipeline", SeedPlan(seed=0, num=4), batch=4), report=Report("eval"))
    with pytest.raises(UsageError, match="NEON_REF_STATS: set it"):
        run_tune_w("diffusers", tmp_path / "not-a-pipeline", [tmp_path / "snap"], bounds=(0.0, 1.0), num_samples=4,
                   report=Report("tune-w"))
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    res = invoke("eval", "diffusers", "--model", tmp_path / "not-a-pipeline", "--ref-stats", tmp_path / "bad.npz",
                 "--num-samples", "4", "-q", code=2)
    assert "bad.npz" in res.output and "not-a-pipeline" not in res.output


def test_an_option_the_family_ignores_is_refused_by_name(tmp_path):
    (tmp_path / "ref.npz").write_bytes(b"x")
    res = invoke("eval", "digits", "--ref-stats", tmp_path / "ref.npz", "--num-samples", "4", "-q", code=2)
    assert "--ref-stats: family 'digits' does not use reference statistics" in res.output
    res = invoke("eval", "gaussian", "--detector", tmp_path / "ref.npz", "--num-samples", "4", "-q", code=2)
    assert "--detector: family 'gaussian' does not use an Inception detector" in res.output


def test_a_family_that_does_not_declare_its_scoring_files_is_not_checked():
    from neon_cli.errors import UsageError
    from neon_cli.scoring import check_family_scoring

    calls = []

    class Declared:
        scoring_files = ("ref_stats",)
        metrics = ("fid",)

        def check_scoring(self):
            calls.append(1)

    check_family_scoring(object(), "third-party", "det.pt", "ref.npz")  # no attribute: no opinion
    check_family_scoring(Declared(), "d", None, "ref.npz")
    assert calls == [1]
    with pytest.raises(UsageError, match="--detector: family 'd' does not use an Inception detector"):
        check_family_scoring(Declared(), "d", "det.pt", None)


# ---------------------------------------------------------------------------------- snapshot suffix, clean errors

PICKLE_FAMILY = '''
import torch
from neon_cli.family import Setting


class PickleToy:
    """The toy family of tests/fixtures/toyfam, but its save writes a torch.save pickle."""
    name = "pickletoy"
    description = "test family: save writes a pickle"
    settings = (Setting("temperature", 0.8, float, "noise scale", low=0.0, high=5.0),)
    guidance = None
    num_classes = 0
    default_model = None
    metrics = ("mean",)
    train_defaults = {"batch": 16, "lr": 0.05}

    def new(self):
        m = torch.nn.Module()
        m.mu = torch.nn.Parameter(torch.full((16,), 0.5))
        return m

    def load(self, path):
        m = self.new()
        m.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        return m.eval()

    def save(self, model, path, metadata):
        torch.save({"state_dict": model.state_dict(), "metadata": dict(metadata)}, path)

    def read_metadata(self, path):
        return torch.load(path, weights_only=True)["metadata"]

    def sample(self, model, seeds, labels, settings):
        z = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return ((model.mu + 0.1 * z).clamp(0, 1) * 255).round().to(torch.uint8).reshape(-1, 1, 4, 4)

    def loss(self, model, images, labels, generator):
        return ((images.reshape(len(images), 16).float() / 255 - model.mu) ** 2).mean()

    def make_optimizer(self, params, lr):
        return torch.optim.SGD(params, lr=lr)

    def score(self, images, labels):
        return {"mean": float(images.float().mean())}


family = PickleToy()
'''


def test_snapshot_suffix_comes_from_the_familys_save(tmp_path):
    """A family that names no suffix and whose save writes a pickle gets .pt snapshots, which its
    own load reads back (torch.load reads a .safetensors name as safetensors, whatever the bytes)."""
    from neon_cli.family import get_family, load_model
    from neon_cli.finetune import sniff_suffix

    (tmp_path / "pickletoy.py").write_text(PICKLE_FAMILY)
    spec = f"{tmp_path / 'pickletoy.py'}:family"
    fam = get_family(spec)
    fam.save(fam.new(), str(tmp_path / "base.pt"), {"train_images": "1000"})
    invoke("synth", spec, "--model", tmp_path / "base.pt", "-n", "32", "-o", tmp_path / "S", "-q")
    invoke("finetune", spec, "--model", tmp_path / "base.pt", "--data", tmp_path / "S", "--budget", "32",
           "--save-every", "16", "-o", tmp_path / "ft", "-q")
    snaps = sorted(p.name for p in (tmp_path / "ft").iterdir() if p.name.startswith("theta_s"))
    assert snaps == ["theta_s-000000016.pt", "theta_s-000000032.pt"]
    assert not [p for p in (tmp_path / "ft").iterdir() if "probe" in p.name]
    assert load_model(fam, tmp_path / "ft" / snaps[-1]).mu.shape == (16,)
    # the sniffer itself, on every format it names
    from safetensors.torch import save_file

    save_file({"a": torch.ones(1)}, str(tmp_path / "f1"))
    torch.save({"a": torch.ones(1)}, tmp_path / "f2")
    torch.save({"a": torch.ones(1)}, tmp_path / "f3", _use_new_zipfile_serialization=False)
    import pickle

    (tmp_path / "f4").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    (tmp_path / "f5").write_bytes(b"plain text")
    got = [sniff_suffix(tmp_path / f) for f in ("f1", "f2", "f3", "f4", "f5", "S")]
    assert got == [".safetensors", ".pt", ".pt", ".pkl", "", ""]


def test_errors_from_torch_or_a_family_are_one_clean_line_naming_the_file(tmp_path):
    from neon_cli.errors import clean_line, exception_line

    torch.save({"x": _Plain()}, tmp_path / "full.pt")
    try:
        torch.load(tmp_path / "full.pt", weights_only=True)
    except Exception as exc:  # torch's multi-line message with terminal escapes
        assert "\x1b[" in str(exc) and "\n" in str(exc)
        line = exception_line(exc)
    assert line.startswith("torch.load(weights_only=True) refused it: Unsupported global: GLOBAL ")
    assert "_Plain" in line and "\x1b" not in line and "\n" not in line and "two options" not in line
    long = clean_line("\x1b[1mbold\x1b[0m " + "word " * 100, limit=50)
    assert long.startswith("bold word") and long.endswith(" …") and len(long) <= 52 and "\x1b" not in long

    # a family whose load raises something that is not a NeonError: exit 2, one line, the file named
    (tmp_path / "pickletoy.py").write_text(PICKLE_FAMILY)
    spec = f"{tmp_path / 'pickletoy.py'}:family"
    (tmp_path / "m.safetensors").write_bytes(b"\x00" * 64)  # torch.load reads the name as safetensors
    res = invoke("eval", spec, "--model", tmp_path / "m.safetensors", "--num-samples", "4", "-q", code=2)
    err = res.output.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'm.safetensors'}: family 'pickletoy' could not load it (" in err[0]


def test_flow_family_on_a_full_module_pickle_says_why_in_one_line(real_fixture, tmp_path):
    f = real_fixture("torchcfm-2d", "8gaussian-moons_cfm_v1.pt")
    res = invoke("synth", "flow", "--model", f, "-n", "4", "-o", tmp_path / "S", "-q", code=2)
    line = res.output.strip()
    assert "\x1b" not in line and "\n" not in line
    assert f"{f}: not a readable torch checkpoint (torch.load(weights_only=True) refused it: Unsupported global: " \
           "GLOBAL torchcfm.models.models.MLP was not an allowed global by default)" in line
