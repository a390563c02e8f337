"""Sharded checkpoints: a Hugging Face / diffusers ``*.index.json`` (``{"metadata": {...},
"weight_map": {tensor: shard}}``) and its shards, opened as one :class:`Checkpoint`.

Safetensors shards are mapped like single files (:mod:`~neon_cli.checkpoint.safetensors_io`);
``.bin`` shards are read inertly (:mod:`~neon_cli.checkpoint.torchfile`). Every shard name is
checked first (:func:`~neon_cli.checkpoint.folders.read_index`: no ``..``, absolute path or
subfolder, no symlink out of the folder), so an index can never make neon read or write outside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neon_cli.checkpoint.core import Checkpoint, TensorSpec
from neon_cli.checkpoint.folders import read_index
from neon_cli.checkpoint.safetensors_io import SafetensorsCheckpoint
from neon_cli.errors import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"


def open_index(index: Path, key: str | None = None, key_optional: bool = False) -> Checkpoint:
    """Open the sharded checkpoint of ``index`` (see module doc); CheckpointError naming the
    index or shard for a bad shard name, a missing shard or a tensor not in its shard."""
    weight_map, meta = read_index(index)
    folder = index.parent
    shard_names = list(dict.fromkeys(weight_map.values()))
    if all(Path(s).suffix.lower() == SAFETENSORS_SUFFIX for s in shard_names):
        ck: Any = SafetensorsCheckpoint(path=folder, layout="sharded", specs={}, files=[index], index_metadata=meta, encoding="sharded")
        raw: list[TensorSpec] = []
        try:
            for shard in shard_names:
                file = folder / shard
                expected = {k for k, v in weight_map.items() if v == shard}
                specs = ck.add_file(shard, file, only=expected)
                ck.files.append(file)
                present = {s.name for s in specs}
                missing = expected - present
                if missing:
                    raise CheckpointError(f"{file}: tensor {sorted(missing)[0]!r} listed in {index.name} is not in this shard")
                raw.extend(specs)
                for s in specs:
                    ck.shards[s.name] = shard
            ck.metadata = dict(ck.shard_metadata.get(shard_names[0], {}))
            ck.index_file = index
            ck._select_flat(raw, key, key_optional)
        except BaseException:
            ck.close()
            raise
        return ck
    return _open_bin_shards(index, folder, weight_map, shard_names, key, meta)


def _open_bin_shards(index: Path, folder: Path, weight_map: dict[str, str], shard_names: list[str], key: str | None, meta: dict) -> Checkpoint:
    """``pytorch_model.bin.index.json``: each shard read inertly; one Checkpoint over all of them."""
    from neon_cli.checkpoint.torchfile import TorchCheckpoint, open_torch

    if key:
        raise CheckpointError(f"{index}: --key is not supported for sharded .bin checkpoints")
    parts = []
    try:
        for shard in shard_names:
            parts.append(open_torch(folder / shard))
        ck = TorchCheckpoint(path=folder, layout="torch", specs={}, files=[index] + [folder / s for s in shard_names],
                             index_metadata=meta, encoding="bin-shards")
        ck.globals, ck.persistent, ck.storages, ck.protocol = {}, [], {}, 3
        raw = []
        for shard, part in zip(shard_names, parts):
            if part.key is not None or part.prefix:
                pass
            for n in part.names():
                stored = part.raw_name(n)
                if weight_map.get(stored) != shard:
                    continue
                ck.entries[stored] = part.entries[stored]
                ck.shards[stored] = shard
                raw.append(TensorSpec(stored, part.specs[n].dtype, part.specs[n].shape))
            ck._maps[shard] = part._maps.pop("file")
            for g, c in part.globals.items():
                ck.globals[g] = ck.globals.get(g, 0) + c
        ck._select_flat(raw, None)
        ck.bin_parts = parts
    except BaseException:
        for p in parts:
            p.close()
        raise

    def _array(raw: str) -> Any:
        from neon_cli.checkpoint.torchfile import tensor_view

        return tensor_view(ck._maps[ck.shards[raw]], ck.entries[raw])

    ck._array = _array  # type: ignore[method-assign]
    return ck
