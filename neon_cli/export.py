"""``neon export``: a ``neon synth`` set written in another tool's dataset layout.

Format ``edm-zip``: the layout of EDM's (and StyleGAN2-ADA's / StyleGAN3's) ``dataset_tool.py``, which
EDM's ``train.py --data`` reads with ``training.dataset.ImageFolderDataset``: an uncompressed zip
(``ZIP_STORED``) of uncompressed PNGs named ``{i:08d}[:5]/img{i:08d}.png`` (image i of the set, i.e.
seed ``seed + i``) and ``dataset.json`` = ``{"labels": [["00000/img00000000.png", label], ...]}``
(``{"labels": null}`` for an unconditional set), plus ``neon.json`` (the set's manifest sha256,
family, settings and the seed of every file; EDM lists it but reads only images and dataset.json).
So the same S can be fine-tuned with the official ``train.py --transfer ... --data S.zip --cond=1``
and its ``network-snapshot-*.pkl`` files brought back to ``neon tune-w``.

Format ``imagefolder`` (a folder): ``{i:08d}.png`` per image and ``metadata.jsonl`` with one line
``{"file_name": "00000000.png", "text": PROMPT}`` per image (``"label"`` instead of ``"text"`` for a
class-labelled set; ``file_name`` alone for an unconditional one): the layout Hugging Face
``datasets``' ``imagefolder`` loads, so diffusers' ``train_text_to_image.py --train_data_dir OUT``
(caption column ``text``) trains on it; beside each image ``{i:08d}.txt`` holds its prompt, the
caption files kohya's sd-scripts read (``--caption_extension .txt``). The prompts are those a
``t2i`` set keeps in its manifest (``conditioning``), indexed by the shards' labels.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from neon_cli.errors import DataError, UsageError
from neon_cli.progress import ProgressFn, null_progress
from neon_cli.requests import ExportRequest

FORMATS = ("edm-zip", "imagefolder")


def edm_name(i: int) -> str:
    """``dataset_tool.py``'s archive name of image ``i``: ``00000/img00000000.png``."""
    s = f"{int(i):08d}"
    return f"{s[:5]}/img{s}.png"


def _png(image: Any, pil: Any) -> bytes:
    """One uint8 [C, H, W] image (C 1 or 3) as an uncompressed PNG (dataset_tool.py's compress_level=0)."""
    hwc = image.transpose(1, 2, 0)
    img = pil.fromarray(hwc[:, :, 0], "L") if hwc.shape[2] == 1 else pil.fromarray(hwc, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def _labels_and_seeds(data_dir: Path, manifest: dict[str, Any]) -> tuple[list[int] | None, list[int]]:
    from safetensors import safe_open

    labels: list[int] = []
    seeds: list[int] = []
    has_labels = True
    for sh in manifest["shards"]:
        f = data_dir / sh["file"]
        try:
            with safe_open(str(f), framework="np") as st:
                keys = set(st.keys())
                if "seeds" in keys:
                    seeds.extend(int(s) for s in st.get_tensor("seeds"))
                if "labels" in keys:
                    labels.extend(int(v) for v in st.get_tensor("labels"))
                else:
                    has_labels = False
        except Exception as exc:
            raise DataError(f"{f}: unreadable shard ({type(exc).__name__}: {exc})") from None
    return (labels if has_labels else None), seeds


def export(request: ExportRequest, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Write the complete synthetic set ``request.data`` as ``request.out`` in format ``request.fmt``
    (module docstring).

    Args:
        request: a :class:`neon_cli.requests.ExportRequest` (validated here): ``data``, a finished
            ``neon synth`` directory (manifest.json + shards), uint8 images [N, C, H, W] with C 1
            or 3 and H == W; ``out``, the ``.zip`` to write (``edm-zip``) or the folder
            (``imagefolder``), atomically (a temporary name renamed when complete; an existing
            folder is refused); ``fmt``, ``"edm-zip"`` or ``"imagefolder"``.

    Returns ``{"path", "format", "num_images", "labels", "sha256"}``. Raises UsageError (unknown
    format, ``-o`` not a .zip, output inside the input, Pillow missing), DataError (unfinished or
    unreadable set, images that are not uint8 square RGB/grayscale).
    """
    from neon_cli.fsutil import atomic_path, exclusive_lock, sha256_file

    request.validate()
    data_dir, out, fmt = Path(request.data), Path(request.out), request.fmt
    if fmt == "imagefolder":
        return export_imagefolder(data_dir, out, report=report, progress=progress)
    manifest, source, pil = _open_set(data_dir, out, "edm-zip", square=True)
    mf = data_dir / "manifest.json"
    n = len(source)
    labels, seeds = _labels_and_seeds(data_dir, manifest)
    report.add_input("synthetic_set", mf)
    names = [edm_name(i) for i in range(n)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, "-o"), atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            progress("export", 0, n, unit="img")
            for start in range(0, n, 256):
                batch = source.read(start, min(n, start + 256))
                for j, image in enumerate(batch):
                    z.writestr(names[start + j], _png(image, pil))
                progress("export", start + len(batch), n, unit="img")
            z.writestr("dataset.json", json.dumps({"labels": [[nm, lab] for nm, lab in zip(names, labels)] if labels is not None else None}))
            z.writestr("neon.json", json.dumps({
                "schema": "neon.export/1", "format": fmt, "synthetic_set": str(data_dir),
                "manifest_sha256": sha256_file(mf), "family": manifest.get("family"), "settings": manifest.get("settings"),
                "files": [{"file": nm, "seed": s} for nm, s in zip(names, seeds)] if len(seeds) == n else None,
            }, sort_keys=True))
    digest = sha256_file(out)
    report.add_output("export", out, sha256=digest)
    results = {"path": str(out), "format": fmt, "num_images": n, "labels": labels is not None, "sha256": digest}
    report.results.update(results)
    return results


def _open_set(data_dir: Path, out: Path, what: str, *, square: bool = False) -> tuple[dict[str, Any], Any, Any]:
    """(manifest, SynthSource, PIL.Image) of a finished set of uint8 RGB or grayscale images (H == W
    with ``square``); the errors of :func:`export`, naming the format ``what``."""
    from neon_cli.fsutil import check_outputs
    from neon_cli.inception import SynthSource

    mf = data_dir / "manifest.json"
    if not mf.is_file():
        hint = " (unfinished: rerun the same 'neon synth' command to complete it)" if (data_dir / "plan.json").exists() else ""
        raise DataError(f"DATA: {data_dir} has no manifest.json{hint}")
    check_outputs({"DATA": data_dir}, {"-o": out})
    try:
        import PIL.Image as pil
    except ImportError:
        raise UsageError(f"export --format {what} writes PNG files: install Pillow (pip install pillow)") from None
    try:
        manifest = json.loads(mf.read_text())
    except (ValueError, RecursionError) as exc:  # empty, truncated or nested too deep
        raise DataError(f"DATA: {mf}: not a readable neon synth manifest ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"DATA: {mf}: not a neon synth manifest (a JSON {type(manifest).__name__}, not an object)")
    source = SynthSource(data_dir)
    shape = manifest.get("image_shape") or []
    if manifest.get("image_dtype") != "uint8" or len(shape) != 3 or shape[0] not in (1, 3) or (square and shape[1] != shape[2]):
        raise DataError(f"DATA: {data_dir} holds {manifest.get('image_dtype')} samples of shape {shape}; "
                        f"{what} needs uint8 {'square ' if square else ''}RGB or grayscale images [C, H, W]")
    return manifest, source, pil


def export_imagefolder(data_dir: Path, out: Path, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """``neon export --format imagefolder`` (module docstring): PNGs, ``metadata.jsonl`` and kohya
    ``.txt`` captions in the folder ``out``, written under a temporary name and renamed.

    Returns ``{"path", "format", "num_images", "labels", "captions"}``. Raises UsageError (``-o``
    exists or is inside the input, Pillow missing), DataError (unfinished set, non-uint8 images, a
    label outside the manifest's prompts).
    """
    from neon_cli.fsutil import atomic_path, exclusive_lock, sha256_file

    if out.exists():
        raise UsageError(f"-o: {out} exists; imagefolder writes a new folder")
    manifest, source, pil = _open_set(data_dir, out, "imagefolder")
    n = len(source)
    labels, seeds = _labels_and_seeds(data_dir, manifest)
    cond = manifest.get("conditioning") or {}
    prompts = [p["prompt"] for p in cond.get("prompts") or []] if cond.get("kind") == "prompts" else None
    if prompts is not None and labels is None:
        raise DataError(f"DATA: {data_dir}: the manifest lists prompts but the shards hold no labels")
    report.add_input("synthetic_set", data_dir / "manifest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with exclusive_lock(out, "-o"), atomic_path(out) as tmp:
        tmp.mkdir()
        progress("export", 0, n, unit="img")
        for start in range(0, n, 256):
            batch = source.read(start, min(n, start + 256))
            for j, image in enumerate(batch):
                i = start + j
                name = f"{i:08d}.png"
                (tmp / name).write_bytes(_png(image, pil))
                row: dict[str, Any] = {"file_name": name}
                if prompts is not None:
                    lab = int(labels[i])
                    if not 0 <= lab < len(prompts):
                        raise DataError(f"DATA: image {i} has prompt index {lab}, outside the manifest's {len(prompts)} prompts")
                    row["text"] = prompts[lab]
                    (tmp / f"{i:08d}.txt").write_text(prompts[lab] + "\n", encoding="utf-8")
                elif labels is not None:
                    row["label"] = int(labels[i])
                rows.append(row)
            progress("export", start + len(batch), n, unit="img")
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        (tmp / "neon.json").write_text(json.dumps({
            "schema": "neon.export/1", "format": "imagefolder", "synthetic_set": str(data_dir),
            "manifest_sha256": sha256_file(data_dir / "manifest.json"), "family": manifest.get("family"),
            "settings": manifest.get("settings"),
            "files": [{"file": r["file_name"], "seed": s} for r, s in zip(rows, seeds)] if len(seeds) == n else None,
        }, sort_keys=True))
    report.add_output("export", out / "metadata.jsonl")
    results = {"path": str(out), "format": "imagefolder", "num_images": n, "labels": labels is not None,
               "captions": prompts is not None}
    report.results.update(results)
    return results
