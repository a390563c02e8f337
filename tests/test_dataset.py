"""Streaming S from its shards (neon_cli.dataset) and the cached data order (neon_cli.train.DataOrder).

References: the rows of the in-memory concatenation of the shards (what load_synthetic built
before), and the data order as the first version drew it, a fresh ``randperm(n)`` for every batch
(written out here), which the resume tests' bit-identity rests on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neon_cli.dataset import encoded_set, open_synthetic
from neon_cli.errors import DataError
from neon_cli.fsutil import sha256_file
from neon_cli.train import DataOrder, TrainConfig, batch_indices, train_loop


def _write_set(folder: Path, images: torch.Tensor, labels: torch.Tensor | None, shard: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, a in enumerate(range(0, len(images), shard)):
        b = min(len(images), a + shard)
        t = {"images": images[a:b].contiguous(), "seeds": torch.arange(a, b)}
        if labels is not None:
            t["labels"] = labels[a:b].contiguous()
        f = folder / f"shard-{k:05d}.safetensors"
        save_file(t, str(f))
        shards.append({"file": f.name, "start": a, "count": b - a, "sha256": sha256_file(f)})
    (folder / "manifest.json").write_text(json.dumps({"schema": "neon.synth/1", "shards": shards}))
    return folder


def _old_batch_indices(n, seed, start, size):
    """The first version's data order: a new randperm(n) for every batch."""
    out, pos = [], start
    while len(out) < size:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        take = perm[off: off + size - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.int16])
def test_rows_equal_the_in_memory_set(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(23, 3, 2, 2, generator=g) * 100).to(dtype)
    labels = torch.randint(0, 10, (23,), generator=g)
    data = open_synthetic(_write_set(tmp_path / "S", images, labels, shard=5))
    assert len(data) == 23 and data.inputs.row_shape == (3, 2, 2) and data.inputs.dtype == dtype
    idx = torch.tensor([22, 0, 4, 5, 5, 17, 9, 0])  # any order, repeats, across shards
    x, y = data.batch(idx)
    assert torch.equal(x, images[idx]) and torch.equal(y, labels[idx])
    assert torch.equal(data.inputs.block(3, 19), images[3:19])
    assert data.inputs.rows(torch.empty(0, dtype=torch.int64)).shape == (0, 3, 2, 2)
    with pytest.raises(IndexError):
        data.inputs.rows(torch.tensor([23]))
    data.close()


def test_open_synthetic_errors_name_the_file(tmp_path):
    S = _write_set(tmp_path / "S", torch.zeros(10, 1, 2, 2, dtype=torch.uint8), None, shard=4)
    assert open_synthetic(S).labels is None
    mf = json.loads((S / "manifest.json").read_text())
    mf["shards"][1]["count"] = 3
    (S / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(DataError, match="shard-00001.safetensors holds 4 images, manifest says 3"):
        open_synthetic(S)
    mf["shards"][1]["count"] = 4
    (S / "manifest.json").write_text(json.dumps(mf))
    f = S / "shard-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(DataError, match="shard-00002.safetensors: .*truncated"):
        open_synthetic(S)
    f.write_bytes(b"junk")
    with pytest.raises(DataError, match="shard-00002.safetensors: unreadable shard"):
        open_synthetic(S)
    f.unlink()
    with pytest.raises(DataError, match="shard-00002.safetensors listed in the manifest is missing"):
        open_synthetic(S)
    (S / "manifest.json").unlink()
    (S / "plan.json").write_text("{}")
    with pytest.raises(DataError, match="no manifest.json .*unfinished"):
        open_synthetic(S)


@pytest.mark.parametrize("n,size", [(37, 5), (37, 16), (37, 40), (10, 3)])
def test_data_order_is_the_first_versions_order(n, size):
    order = DataOrder(n, seed=3)
    for start in range(0, 5 * n, size):  # several epochs, batches straddling their boundaries
        assert torch.equal(order.indices(start, size), _old_batch_indices(n, 3, start, size)), start
    assert torch.equal(batch_indices(n, 3, 7, 50), _old_batch_indices(n, 3, 7, 50))
    assert len(order._perms) <= 2 and order.permutation(4).dtype == torch.int32  # one epoch kept, 4 bytes an image


def test_streamed_training_equals_in_memory_training(toyfam, toy_base, tmp_path):
    import copy

    base = toyfam.load(str(toy_base))
    g = torch.Generator().manual_seed(1)
    images = torch.rand(30, 1, 4, 4, generator=g)
    data = open_synthetic(_write_set(tmp_path / "S", images, None, shard=7))
    cfg = TrainConfig(budget=100, lr=0.05, batch=16, seed=2)
    a = train_loop(toyfam, copy.deepcopy(base), images, None, cfg)
    b = train_loop(toyfam, copy.deepcopy(base), data, None, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class _Halves:
    """A family whose training inputs are the images halved (counts its encode calls)."""

    name = "halves"

    def __init__(self):
        self.calls = 0

    def encode_key(self, model, settings):
        return f"halves-{settings['k']}"

    def encode(self, model, images):
        self.calls += len(images)
        return images.float() / 2


def test_encoded_set_is_computed_once_and_kept_beside_S(tmp_path, monkeypatch):
    images = torch.arange(11 * 4, dtype=torch.uint8).reshape(11, 1, 2, 2)
    labels = torch.arange(11) % 3
    S = _write_set(tmp_path / "S", images, labels, shard=4)
    fam = _Halves()
    enc, info = encoded_set(fam, None, open_synthetic(S), {"k": 1}, batch=3)
    assert fam.calls == 11 and info["shards_encoded"] == 3 and Path(info["folder"]) == S / "encoded-halves-1"
    idx = torch.tensor([10, 1, 4])
    x, y = enc.batch(idx)
    assert torch.equal(x, images[idx].float() / 2) and torch.equal(y, labels[idx])
    assert json.loads((S / "encoded-halves-1" / "encoded.json").read_text())["schema"] == "neon.encoded/1"

    enc, info = encoded_set(fam, None, open_synthetic(S), {"k": 1})
    assert fam.calls == 11 and info["shards_encoded"] == 0  # reused
    encoded_set(fam, None, open_synthetic(S), {"k": 2})
    assert fam.calls == 22  # another key: another encoding

    # a shard of S replaced (new sha256 in the manifest): only that one is encoded again
    new = images.clone()
    new[4:8] = 200
    _write_set(S, new, labels, shard=4)
    enc, info = encoded_set(fam, None, open_synthetic(S), {"k": 1})
    assert info["shards_encoded"] == 1 and torch.equal(enc.inputs.block(0, 11), new.float() / 2)

    monkeypatch.setattr("neon_cli.dataset._writable", lambda folder: folder.parent != S)  # S read-only
    enc, info = encoded_set(fam, None, open_synthetic(S), {"k": 3}, fallback_dir=tmp_path / "out")
    assert Path(info["folder"]) == tmp_path / "out" / "encoded-halves-3"
    with pytest.raises(DataError, match="cannot write the encoded set"):
        encoded_set(fam, None, open_synthetic(S), {"k": 4})
