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
    human = invoke("inspect", tmp_path / "m", "-q").stdout
    assert "warning: this file would run os.system on load (shard pytorch_model-00002-of-00002.bin)" in human


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
