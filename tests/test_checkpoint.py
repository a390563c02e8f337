"""neon_cli.checkpoint: layouts read, the streaming safetensors writer, sharding, errors naming files."""

from __future__ import annotations

import argparse
import json
import pickle
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neon_cli.checkpoint import (
    SafetensorsWriter,
    TensorSpec,
    index_json,
    open_checkpoint,
    parse_dtype,
    parse_size,
    safetensors_header,
    sha256_tree,
    shard_file_names,
    shard_layout,
)
from neon_cli.errors import CheckpointError, UsageError
from neon_cli.fsutil import sha256_path


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "w.f32": torch.randn(3, 4, generator=g),
        "w.f16": torch.randn(9, generator=g).to(torch.float16),
        "w.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "step": torch.tensor(1234, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(5, dtype=torch.int32),
        "u8": torch.arange(3, dtype=torch.uint8),
        "scalar": torch.tensor(0.5),
        "empty": torch.zeros(0, 4),
    }


# ---------------------------------------------------------------------------------- writer


def test_streaming_writer_bytes_equal_safetensors_save_file(tmp_path):
    """Header-first writer, tensors fed in row blocks, gives the very bytes of save_file."""
    tensors = _mixed()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    out = tmp_path / "ours.safetensors"
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]  # torch dtypes are accepted
    wr = SafetensorsWriter(out, specs, {"format": "pt"})
    for spec in wr.order:
        t = tensors[spec.name]
        if t.dim() >= 1 and t.shape[0] > 2:  # in blocks of 2 rows
            for a in range(0, t.shape[0], 2):
                wr.write(spec.name, t[a : a + 2])
        elif t.numel():
            wr.write(spec.name, t)
    digest = wr.close()
    assert out.read_bytes() == ref.read_bytes()
    assert digest == sha256_path(out)
    back = load_file(str(out))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_writer_alignment_and_metadata(tmp_path):
    tensors = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(5, dtype=torch.float64), "c": torch.ones(1, dtype=torch.bfloat16)}
    head, order = safetensors_header([TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"k": "v é"})
    assert [s.name for s in order] == ["b", "c", "a"]  # dtype alignment descending
    assert (len(head) - 8) % 8 == 0
    hdr = json.loads(head[8:].decode())
    for name, entry in hdr.items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % tensors[name].element_size() == 0
    assert hdr["__metadata__"] == {"k": "v é"}
    with pytest.raises(CheckpointError, match="str to str"):
        safetensors_header([], {"k": 1})  # type: ignore[dict-item]


def test_writer_refuses_wrong_order_extra_bytes_and_incomplete(tmp_path):
    specs = [TensorSpec("a", "float32", (4,)), TensorSpec("b", "float32", (2,))]
    wr = SafetensorsWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(CheckpointError, match="out of order"):
        wr.write("b", torch.zeros(2))
    with pytest.raises(CheckpointError, match="more bytes"):
        wr.write("a", torch.zeros(5))
    with pytest.raises(CheckpointError, match="declared"):
        wr.write("a", torch.zeros(4, dtype=torch.float64))
    wr.write("a", torch.zeros(4))
    with pytest.raises(CheckpointError, match="'b' was not written"):
        wr.close()


def test_shard_layout_and_index():
    specs = [TensorSpec(f"t{i}", "float32", (n,)) for i, n in enumerate([10, 10, 40, 5, 5])]
    shards = shard_layout(specs, 100)  # 40, 40, 160 (alone), 20+20
    assert [[s.name for s in g] for g in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert shard_file_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert shard_file_names(1) == ["model.safetensors"]
    idx = index_json({"b": "y", "a": "x"}, 123, {"extra": 1})
    assert idx == {"metadata": {"extra": 1, "total_size": 123}, "weight_map": {"a": "x", "b": "y"}}


@pytest.mark.parametrize(
    "text,value",
    [("2GB", 2_000_000_000), ("500MB", 500_000_000), ("1.5GiB", int(1.5 * 2**30)), ("5G", 5 * 10**9), ("123", 123), ("10kB", 10_000), ("1 MiB", 2**20)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="--shard-size"):
        parse_size(text)


def test_parse_dtype():
    assert parse_dtype("bf16") == "bfloat16" and parse_dtype(torch.float32) == "float32" and parse_dtype(None) is None
    with pytest.raises(UsageError, match="--dtype int8"):
        parse_dtype("int8")


def test_sha256_tree_matches_fsutil(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"xyz")
    (tmp_path / ".hidden").write_bytes(b"ignored")
    import hashlib

    known = {tmp_path / "a.bin": hashlib.sha256(b"abc").hexdigest()}
    assert sha256_tree(tmp_path, known) == sha256_tree(tmp_path) == sha256_path(tmp_path)


def test_flat_pt_output_tensors_have_separate_storages(tmp_path):
    from neon_cli.merge import _RawTensorFile

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16)}
    rf = _RawTensorFile(tmp_path / "raw")
    for k, v in tensors.items():
        rf.begin(TensorSpec(k, v.dtype, tuple(v.shape)))
        rf.write(k, v.view(torch.int16).numpy() if v.dtype == torch.bfloat16 else v.numpy())
    got = rf.tensors()
    ptrs = set()
    for k, v in tensors.items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype
        assert got[k].untyped_storage().nbytes() == v.nbytes and got[k].data_ptr() % 64 == 0
        ptrs.add(got[k].untyped_storage().data_ptr())
    assert len(ptrs) == 3
    save_file(got, str(tmp_path / "resaved.safetensors"))  # no shared-storage complaint


# ---------------------------------------------------------------------------------- readers


def test_safetensors_reader_rows_and_metadata(tmp_path):
    tensors = _mixed()
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p), metadata={"family": "digits"})
    with open_checkpoint(p) as ck:
        assert ck.layout == "safetensors" and ck.metadata == {"family": "digits"} and ck.key is None
        assert set(ck.names()) == set(tensors)
        assert ck.specs["w.bf16"] == TensorSpec("w.bf16", "bfloat16", (7, 5))
        assert (ck.rows("w.bf16", 2, 5) == tensors["w.bf16"][2:5].view(torch.int16).numpy().view("u2")).all()
        assert torch.equal(ck.tensor("step"), tensors["step"])


def test_sharded_folder_and_index_path(tmp_path):
    tensors = {f"layer{i}.weight": torch.randn(4, 3) for i in range(5)}
    folder = tmp_path / "hf"
    folder.mkdir()
    names = list(tensors)
    wm = {}
    for j, part in enumerate([names[:2], names[2:]]):
        fname = f"model-0000{j + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
        wm.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json(wm, 5 * 48)))
    for path in (folder, folder / "model.safetensors.index.json"):
        with open_checkpoint(path) as ck:
            assert ck.layout == "sharded" and sorted(ck.names()) == sorted(names)
            assert ck.shards["layer3.weight"] == "model-00002-of-00002.safetensors"
            for k, v in tensors.items():
                assert torch.equal(ck.tensor(k), v)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: no such file"):
        open_checkpoint(folder)


def test_torch_reader_is_memory_mapped_and_finds_ema(tmp_path):
    sd = {"a.weight": torch.randn(64, 64), "a.bias": torch.randn(64)}
    other = {"a.weight": torch.zeros(64, 64), "a.bias": torch.zeros(64)}
    p = tmp_path / "edm.pt"
    torch.save({"model": other, "ema": sd, "step": 7, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, p)
    with open_checkpoint(p) as ck:
        assert ck.layout == "torch" and ck.key == "ema" and ck.alternatives == ["model"]
        assert torch.equal(ck.tensor("a.weight"), sd["a.weight"])
        assert ck.container["step"] == 7
        # the tensor's bytes lie in a mapping of the file itself (/proc/self/maps)
        assert _mapped_file(ck.array("a.weight").__array_interface__["data"][0]) == str(p)


def _mapped_file(addr: int) -> str | None:
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


def test_torch_reader_key_paths_prefix_and_ambiguity(tmp_path):
    var = OrderedDict((f"module.blocks.{i}.w", torch.randn(2, 2)) for i in range(3))
    vae = {"enc.w": torch.randn(2)}
    p = tmp_path / "var.pth"
    torch.save({"trainer": {"var_wo_ddp": var, "vae_local": vae}, "epoch": 3}, p)
    with open_checkpoint(p) as ck:  # VAR's layout: var_wo_ddp is the known name
        assert ck.key == "trainer.var_wo_ddp" and ck.alternatives == ["trainer.vae_local"]
    torch.save({"trainer": {"gen": var, "disc": vae}}, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"several state dicts found \(trainer.gen, trainer.disc\); choose one with --key"):
        open_checkpoint(tmp_path / "two.pth")
    with open_checkpoint(p, key="trainer.var_wo_ddp") as ck:
        assert ck.key == "trainer.var_wo_ddp" and ck.prefix == "module."
        assert ck.names() == ["blocks.0.w", "blocks.1.w", "blocks.2.w"]
        assert ck.raw_name("blocks.1.w") == "module.blocks.1.w"
        assert torch.equal(ck.tensor("blocks.1.w"), var["module.blocks.1.w"])
    with pytest.raises(CheckpointError, match=r"var.pth: --key trainer.nope: no entry 'nope' under trainer"):
        open_checkpoint(p, key="trainer.nope")
    with pytest.raises(CheckpointError, match="no state dict of tensors found"):
        torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "empty.pt")
        open_checkpoint(tmp_path / "empty.pt")


def test_dotted_key_component(tmp_path):
    p = tmp_path / "dots.pt"
    torch.save({"net.ema": {"w": torch.ones(2)}, "net": {"w": torch.zeros(2)}}, p)
    with open_checkpoint(p, key="net.ema") as ck:
        assert torch.equal(ck.tensor("w"), torch.ones(2))


def test_pickled_objects_read_without_trust_pickle(tmp_path):
    p = tmp_path / "xar.pth"
    sd = {"w": torch.randn(3)}
    torch.save({"model": sd, "model_ema": sd, "args": argparse.Namespace(lr=1.0)}, p)
    with open_checkpoint(p) as ck:
        assert ck.key == "model_ema" and ck.container["args"].qualname == "argparse.Namespace"
        assert ck.container["args"].attributes() == {"lr": 1.0}
        assert torch.equal(ck.tensor("w"), sd["w"])


def test_plain_pickle_with_module(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    p = tmp_path / "network-snapshot.pkl"
    with open(p, "wb") as fh:
        pickle.dump({"ema": net, "augment_pipe": None, "dataset_kwargs": {"res": 32}}, fh)
    with open_checkpoint(p) as ck:
        assert ck.layout == "pickle" and ck.key == "ema"
        assert ck.names() == list(net.state_dict())
        assert torch.equal(ck.tensor("0.weight"), net[0].weight.detach())
        assert torch.equal(ck.tensor("1.num_batches_tracked"), net[1].num_batches_tracked)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("keep", [0.5, 0.999, 5])
def test_truncated_files_name_the_file(tmp_path, suffix, keep):
    tensors = {"w": torch.randn(256, 64), "b": torch.randn(64)}
    full = tmp_path / f"full{suffix}"
    (save_file(tensors, str(full)) if suffix == ".safetensors" else torch.save(tensors, full))
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError) as err:
        with open_checkpoint(cut) as ck:
            for n in ck.names():
                ck.array(n).sum()
    assert str(cut) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_bad_index(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such file"):
        open_checkpoint(tmp_path / "nope.pt")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a valid sharded-checkpoint index"):
        open_checkpoint(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../escape.safetensors"}}')
    with pytest.raises(CheckpointError, match="shard name '../escape.safetensors' must be a plain file name"):
        open_checkpoint(d)


def test_key_optional_for_flat_selftrained(tmp_path):
    p = tmp_path / "flat.safetensors"
    save_file({"w": torch.ones(2)}, str(p))
    with open_checkpoint(p, key="ema", key_optional=True) as ck:
        assert ck.key is None and ck.names() == ["w"] and "whole state dict" in ck.notes[0]
    with pytest.raises(CheckpointError, match="--key ema: no tensor name starts with 'ema.'"):
        open_checkpoint(p, key="ema")
    # safetensors --key selects a name prefix, the rest is listed as outside
    q = tmp_path / "both.safetensors"
    save_file({"ema.w": torch.ones(2), "model.w": torch.zeros(2)}, str(q))
    with open_checkpoint(q, key="ema") as ck:
        assert ck.names() == ["w"] and [s.name for s in ck.outside] == ["model.w"]
        assert torch.equal(ck.tensor("w"), torch.ones(2))
        with safe_open(str(q), "pt") as fh:
            assert fh.keys() == ["ema.w", "model.w"]


def test_sharded_pytorch_bin_index(tmp_path):
    """pytorch_model.bin.index.json (Hugging Face .bin shards) is read through torch.load."""
    tensors = {f"h.{i}.w": torch.randn(3, 2) for i in range(4)}
    folder = tmp_path / "hfbin"
    folder.mkdir()
    names = list(tensors)
    wm = {}
    for j, part in enumerate([names[:3], names[3:]]):
        fname = f"pytorch_model-0000{j + 1}-of-00002.bin"
        torch.save({k: tensors[k] for k in part}, folder / fname)
        wm.update({k: fname for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 96}, "weight_map": wm}))
    with open_checkpoint(folder) as ck:
        assert ck.layout == "torch" and sorted(ck.names()) == sorted(names)
        assert all(torch.equal(ck.tensor(k), v) for k, v in tensors.items())
        assert [f.name for f in ck.files] == ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
