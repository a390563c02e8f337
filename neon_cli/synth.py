"""``neon synth``: the synthetic set S sampled from theta_r with its inference settings kappa
(paper Algorithm 1, step 1), as resumable tensor shards plus a manifest.

Layout of the output directory::

    plan.json                 what is being made (family, model sha256, settings, seeds, shard size)
    shard-00000.safetensors   images [n, ...] as the family samples them (uint8 [n, C, H, W] for
                              image families, float32 [n, D] for the Gaussian toys), labels int64 [n],
                              seeds int64 [n]
    ...
    manifest.json             written last: plan + every shard's sha256 (schema neon.synth/1) + "checkouts":
                              the official checkouts used (path, commit, dirty), null for none

Image i (0-based) uses seed ``seed + i`` and, for class-conditional families, label
``(seed + i) % num_classes`` (``--labels balanced``), or the seed and label of another protocol
(``--labels edm|var|xar``: the paper systems' own, :mod:`neon_cli.labels`), recorded in the plan
and manifest (``label_protocol``); a rerun with another protocol is refused like another seed.
Shard k holds images ``k*shard_size .. (k+1)*shard_size - 1`` and is sampled in batches aligned
to its start, so the batch composition, and therefore every image bit, does not depend on which process or how many ranks made it. Each shard is written under a
temporary name and renamed when complete, so after an interruption a rerun of the same command
makes only the missing shards. Under torchrun, shard k is made by rank ``k % world_size`` and rank 0
writes the manifest after a barrier. While a run writes, ``.neon.lock`` in the directory is held
(``fcntl.flock``): a second run on the same directory is refused instead of mixing its shards in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neon_cli.errors import DataError, UsageError
from neon_cli.fsutil import atomic_path, sha256_file, write_json
from neon_cli.progress import ProgressFn, null_progress

SCHEMA = "neon.synth/1"


#: what one image of S takes on disk at the very least: its int64 seed and one byte of image
MIN_BYTES_PER_IMAGE = 9
#: more shards than this is a --shard-size mistake (the shard list is held in memory)
MAX_SHARDS = 1_000_000


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def check_size(num: int, shard_size: int, out_dir: Path) -> None:
    """Refuse, before any work, a set that cannot be made: more bytes than the file system of
    ``out_dir`` has free, counting :data:`MIN_BYTES_PER_IMAGE` per image less what ``out_dir``
    already holds (a resumed run) (ResourceError naming ``--num-images`` and the folder), or more
    than :data:`MAX_SHARDS` shards (UsageError naming ``--shard-size``)."""
    import shutil

    from neon_cli.errors import ResourceError

    where = Path(out_dir).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    have = sum(f.stat().st_size for f in Path(out_dir).glob("shard-*.safetensors")) if Path(out_dir).is_dir() else 0
    need = num * MIN_BYTES_PER_IMAGE - have
    free = shutil.disk_usage(where).free
    if need > free:
        raise ResourceError(f"--num-images {num}: S needs at least {need:,} bytes ({MIN_BYTES_PER_IMAGE} per image: "
                            f"its int64 seed and a byte of image), more than the {free:,} bytes free on {where}")
    shards = -(-num // shard_size)
    if shards > MAX_SHARDS:
        raise UsageError(f"--num-images {num} with --shard-size {shard_size}: {shards:,} shards, more than "
                         f"{MAX_SHARDS:,}; give a larger --shard-size")


def synthesize(family_name: str, model_path: Path | None = None, *, report: Any, progress: ProgressFn = null_progress,
               **options: Any) -> dict[str, Any]:
    """Keyword form of :func:`run_synth` (tests, benchmarks and ``neon demo`` call it): ``options``
    are ``num``, ``out_dir``, ``seed`` (0), ``set_pairs`` (()), ``shard_size`` (1000), ``batch``
    (500), ``trust_pickle`` (False), ``labels`` (None), the fields of
    :class:`~neon_cli.requests.SynthRequest`. Returns the manifest dict; raises as :func:`run_synth`."""
    from neon_cli.requests import SeedPlan, SynthRequest, Trust

    o = dict(options)
    req = SynthRequest(family_name, model_path, o.pop("out_dir"), SeedPlan(seed=o.pop("seed", 0), num=o.pop("num")),
                       tuple(o.pop("set_pairs", ())), trust=Trust(pickle=o.pop("trust_pickle", False)), **o)
    return run_synth(req, report=report, progress=progress)


def run_synth(request: Any, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Sample ``request.draw.num`` images from ``request.model`` into ``request.out`` (see the module
    docstring); ``request``: a :class:`~neon_cli.requests.SynthRequest`.

    ``request.trust.pickle``: passed to the family's ``load`` (``--trust-pickle``; see
    :func:`neon_cli.family.load_model`). Before any work: every number is checked
    (:meth:`~neon_cli.requests.SynthRequest.validate`: ``--num-images``, ``--shard-size``, ``--batch``
    >= 1; seeds within 0 .. 2**63 - 1; a size the disk or the shard list cannot hold,
    :func:`check_size`; ``--set`` values finite and in range), and ``-o`` / ``--report`` may not be
    the model (:func:`neon_cli.fsutil.check_outputs`). ``out`` is locked for the run (a second run on
    it is refused with a one-line error); ``labels`` is the class-label protocol (``--labels``,
    None: ``balanced``; :func:`neon_cli.labels.check`); ``plan.json`` is written only once the model
    has loaded, and a plan of a run that made no shard yet is replaced, so a failed run never blocks
    its fix. Returns the manifest dict. Raises UsageError for bad numbers or paths, DataError if
    ``out`` holds shards of a different plan (another model, settings or seeds).
    """
    import torch  # noqa: F401  (imported before the checks, as always: a refused run's report names its version)

    from neon_cli.dist import main_rank_lock, run_on_main
    from neon_cli.family import get_family, model_path as resolve_model, plugin_version
    from neon_cli.fsutil import remove_stale_tmp_in
    from neon_cli.tune.recorded import apply_recorded

    req = request.validate()
    family = get_family(req.family)
    report.family = plugin_version(req.family)
    path = resolve_model(family, req.model)
    settings = apply_recorded(family, path, list(req.set_pairs), report, progress, "synth")  # tune-w's choice, then --set
    out_dir = req.out
    report.check_outputs({"--model": path}, {"-o": out_dir})
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o: {out_dir} exists and is not a directory")
    with main_rank_lock(out_dir, "-o", folder=True):
        run_on_main(remove_stale_tmp_in, out_dir)  # partial shards of a killed run: under the lock no live run owns one
        plan, label_plan = _set_plan(req, family, path, settings, report)
        run_on_main(_check_plan, out_dir, plan)
        shards, mine = _make_shards(req, family, path, settings, plan, label_plan, report, progress)
        manifest = _finish(out_dir, family, plan, shards, report)
    report.results.update(num_images=req.draw.num, shards_made=len(mine), out_dir=str(out_dir))
    return manifest


def _set_plan(req: Any, family: Any, path: Path, settings: dict[str, Any], report: Any) -> tuple[dict[str, Any], Any]:
    """(plan.json's content, the label plan) of ``req``; records the model as an input."""
    from neon_cli import labels as label_protocols
    from neon_cli.evaluate import classes_of
    from neon_cli.identity import SETTINGS_SHA256, setting_hashes

    model_sha = report.add_input("model", path)
    num_classes = classes_of(family, path, settings)
    label_plan = label_protocols.check(req.labels, req.draw.num, num_classes, family, seed=req.draw.seed)
    plan = {
        "schema": SCHEMA,
        "family": family.name,
        "model": {"path": str(path), "sha256": model_sha},
        "settings": settings,
        "seed": req.draw.seed,
        "num": req.draw.num,
        "shard_size": req.shard_size,
        "labels": label_plan.text(),
        "label_protocol": label_plan.protocol,
        "num_classes": num_classes,
    }
    conditioning = getattr(family, "synth_conditioning", None)
    if callable(conditioning):  # what the labels index, kept with S (t2i: the prompts)
        plan["conditioning"] = conditioning(settings)
    hashes = setting_hashes(family, settings)  # a setting naming a file (a VAE) is known by its content
    if hashes:
        plan[SETTINGS_SHA256] = hashes
    report.settings.update(resolved_settings=settings)
    report.results["labels"] = label_plan.protocol
    return plan, label_plan


def _make_shards(req: Any, family: Any, path: Path, settings: dict[str, Any], plan: dict[str, Any], label_plan: Any,
                 report: Any, progress: ProgressFn) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Sample this rank's missing shards (shard k: rank ``k % world``); returns (all shards, this
    rank's made), each ``(k, start, count)``. Writes plan.json (rank 0) once the model has loaded."""
    from neon_cli.dist import barrier, device, rank_world
    from neon_cli.family import load_model

    num, shard_size, out_dir = req.draw.num, req.shard_size, req.out
    rank, world = rank_world()
    shards = [(k, k * shard_size, min(shard_size, num - k * shard_size)) for k in range((num + shard_size - 1) // shard_size)]
    todo = [s for s in shards if not (out_dir / shard_name(s[0])).exists()]
    mine = [s for s in todo if s[0] % world == rank]
    report.results.update(shards_total=len(shards), shards_present=len(shards) - len(todo))
    # rank 0 loads the model whenever shards are missing, so plan.json (written next) only ever
    # describes a set whose model loaded
    need_model = bool(mine) or (rank == 0 and bool(todo))
    model = load_model(family, path, settings=settings, trust_pickle=req.trust.pickle).to(device()) if need_model else None
    if rank == 0 and not (out_dir / "plan.json").exists():
        write_json(out_dir / "plan.json", plan)
    barrier()
    meta = {"family": family.name, "settings": json.dumps(settings, sort_keys=True), "model_sha256": plan["model"]["sha256"]}
    done = [sum(c for k, _, c in shards) - sum(c for _, _, c in mine)]
    progress("synth", done[0], num, unit="img")

    def tick(n: int) -> None:
        done[0] += n
        progress("synth", done[0], num, unit="img")

    for k, start, count in mine:
        _make_shard(req, family, model, settings, label_plan, (k, start, count), meta, tick)
    barrier()
    return shards, mine


def _make_shard(req: Any, family: Any, model: Any, settings: dict[str, Any], label_plan: Any, shard: tuple[int, int, int],
                meta: dict[str, Any], tick: Any) -> None:
    """Sample shard ``(k, start, count)`` in batches of ``req.batch`` aligned to its start and
    write it under a temporary name (``tick(n)`` after each batch of n images)."""
    import torch
    from safetensors.torch import save_file

    from neon_cli import labels as label_protocols

    k, start, count = shard
    batch = req.batch
    seeds, labels = label_protocols.plan_tensors(label_plan, family, model, start, count)
    chunks = []
    with torch.inference_mode(), label_protocols.active(label_plan):
        for i in range(0, count, batch):
            lab = labels[i:i + batch] if labels is not None else None
            chunks.append(family.sample(model, seeds[i:i + batch], lab, settings))
            tick(min(batch, count - i))
    images = torch.cat(chunks).contiguous()
    tensors = {"images": images, "seeds": seeds.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    with atomic_path(req.out / shard_name(k)) as tmp:
        # one metadata key: safetensors stores __metadata__ from a hash map, so several keys would
        # come out in a random order and identical shards would not be identical files
        save_file(tensors, str(tmp), metadata={"neon": json.dumps({**meta, "start": start, "count": count}, sort_keys=True)})


def _finish(out_dir: Path, family: Any, plan: dict[str, Any], shards: list[tuple[int, int, int]], report: Any) -> dict[str, Any]:
    """Rank 0 hashes every shard and writes manifest.json (written last); every rank gets the manifest."""
    from neon_cli.dist import broadcast_object, rank_world

    manifest = dict(plan)
    if rank_world()[0] == 0:
        manifest["shards"] = []
        for k, start, count in shards:
            f = out_dir / shard_name(k)
            manifest["shards"].append({"file": f.name, "start": start, "count": count, "sha256": sha256_file(f)})
        first = _read_shard(out_dir / shard_name(0))
        manifest["image_shape"] = list(first["images"].shape[1:])
        manifest["image_dtype"] = str(first["images"].dtype).replace("torch.", "")
        from neon_cli.repo import provenance

        manifest["checkouts"] = provenance([family.name]) or None  # official code the family ran: path, commit, dirty state
        write_json(out_dir / "manifest.json", manifest)
        report.add_output("synthetic_set", out_dir / "manifest.json")
    return broadcast_object(manifest)


def _check_plan(out_dir: Path, plan: dict[str, Any]) -> None:
    """Refuse to mix shards of two different plans in one directory (run on rank 0 alone).

    A ``plan.json`` that differs from ``plan`` is an error when shards of it exist; with no shard
    made yet (a run that failed before its first shard) it is simply replaced later.
    """
    f = out_dir / "plan.json"
    if not f.exists():
        return
    try:
        old = json.loads(f.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(f"-o: {f} is not readable JSON ({exc}); delete it or use a new -o directory") from None
    from neon_cli.identity import SETTINGS_SHA256, manifest_identity

    # by content: the model's and any path setting's sha256, never their paths (a plan of an older
    # neon, without the settings' sha256, is compared with this one's settings as given)
    old_id = manifest_identity(old)
    new_id = manifest_identity(plan if SETTINGS_SHA256 in old else {k: v for k, v in plan.items() if k != SETTINGS_SHA256})
    differs = [key for key in ("family", "settings", "seed", "shard_size", "num", "conditioning") if old_id.get(key) != new_id.get(key)]
    if old.get("label_protocol", "balanced") != plan.get("label_protocol", "balanced"):  # plans before --labels: balanced
        differs.append("label_protocol")
    if (old.get("model") or {}).get("sha256") != plan["model"]["sha256"]:
        differs.append("model")
    if not differs:
        return
    if not any(out_dir.glob("shard-*.safetensors")):
        f.unlink()  # nothing of the old plan was made: it goes; this run's plan is written once its model loads
        return
    key = differs[0]
    if key == "model":
        raise DataError(f"-o: {out_dir} holds a synthetic set made from another model (sha256 differs); use a new -o directory")
    raise DataError(f"-o: {out_dir} holds a synthetic set made with another {key} "
                    f"({old.get(key)!r} != {plan.get(key)!r}); use a new -o directory")


def _read_shard(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise DataError(f"{path}: unreadable shard ({exc})") from None


def load_synthetic(data_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(images uint8 [N, C, H, W], labels int64 [N] or None, manifest) of a complete synthetic set,
    all in memory (``neon align``, tests; ``neon finetune`` streams it instead:
    :func:`neon_cli.dataset.open_synthetic`).

    Raises DataError naming the directory if the manifest is missing (an unfinished synth run:
    rerun ``neon synth`` to complete it), a listed shard is missing or unreadable, or its image count
    differs from the manifest (shards are not re-hashed here: that would read S twice).
    """
    import torch

    from neon_cli.dataset import open_synthetic

    data = open_synthetic(data_dir)
    try:
        n = len(data)
        images = data.inputs.block(0, n)
        labels = data.labels.to(torch.int64) if data.labels is not None else None
    finally:
        data.close()
    return images, labels, data.manifest
