"""Identity by content: what resume, caches and "same run" checks compare (issue 22, item 7).

A run's identity never includes where a file lies, only its bytes: sha256 of a file, and of a
folder the hash of its members (:func:`neon_cli.fsutil.sha256_path`). So a project folder moved
elsewhere, a byte-identical base model at another path, or the embedded default reached through
another install (``pip install .`` then ``pip install -e .``) resumes the same run.

* :func:`setting_hashes` / :func:`content_settings`: inference settings whose value is a file or
  folder (VAR's, xAR's and IMM's ``vae``) enter identities as ``"sha256:<hex>"`` of its content;
* :func:`synthetic_set_sha256`: a synthetic set's identity, the canonical JSON of its manifest
  (every shard's sha256, the model's sha256, the settings, seeds) without any path in it.

Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from neon_cli.errors import DataError
from neon_cli.fsutil import sha256_path

#: the synth manifest's key holding :func:`setting_hashes` (absent when no setting is a path)
SETTINGS_SHA256 = "settings_sha256"

_MEMO: dict[tuple[str, tuple[Any, ...]], str] = {}


def _stamp(path: Path) -> tuple[Any, ...]:
    """What changes when a file or any member of a folder is rewritten (size, mtime in ns, inode)."""
    if path.is_dir():
        return tuple(sorted((str(f.relative_to(path)), *_stamp(f)) for f in path.rglob("*") if f.is_file()))
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def content_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (of a folder: of its members, :func:`neon_cli.fsutil.sha256_path`),
    remembered in this process while the file's size, mtime and inode stay the same (a tune-w run
    asks for the same VAE once per candidate)."""
    p = Path(path).resolve()
    key = (str(p), _stamp(p))
    if key not in _MEMO:
        _MEMO[key] = sha256_path(p)
    return _MEMO[key]


def setting_hashes(family: Any, settings: Mapping[str, Any]) -> dict[str, str]:
    """``{name: sha256}`` for each string setting of ``family`` (its ``settings`` and
    ``train_settings``, :class:`neon_cli.family.Setting` with ``type`` str) whose value names an
    existing file or folder; empty when none does."""
    specs = {s.name: s for s in [*getattr(family, "settings", ()), *(getattr(family, "train_settings", ()) or ())]}
    out = {}
    for name, value in settings.items():
        spec = specs.get(name)
        if spec is not None and spec.type is str and isinstance(value, str) and value and os.path.exists(value):
            out[name] = content_sha256(value)
    return out


def content_settings(settings: Mapping[str, Any], hashes: Mapping[str, str]) -> dict[str, Any]:
    """``settings`` with each value named in ``hashes`` replaced by ``"sha256:<hex>"``."""
    return {k: (f"sha256:{hashes[k]}" if k in hashes else v) for k, v in settings.items()}


def family_content_settings(family: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`content_settings` of ``settings`` with the hashes of ``family``'s path settings."""
    return content_settings(settings, setting_hashes(family, settings))


def manifest_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a synth manifest (schema ``neon.synth/1``) that say what the set *is*: all of
    it except the model's path and ``checkouts`` (where the official code lay, its commit and dirty
    state: provenance, not content; the shards' sha256 are the content); path-valued settings as their sha256 when the manifest records
    them (:data:`SETTINGS_SHA256`)."""
    out = {k: v for k, v in manifest.items() if k not in (SETTINGS_SHA256, "checkouts")}  # checkouts: provenance
    if isinstance(out.get("model"), Mapping):
        out["model"] = {k: v for k, v in out["model"].items() if k != "path"}
    if isinstance(out.get("settings"), Mapping):
        out["settings"] = content_settings(out["settings"], manifest.get(SETTINGS_SHA256) or {})
    return out


def synthetic_set_sha256(folder: str | os.PathLike[str]) -> str:
    """The identity of the synthetic set in ``folder``: sha256 (hex) of the canonical JSON (sorted
    keys, no spaces) of :func:`manifest_identity` of its ``manifest.json``. Equal for a copy of
    the set anywhere, or one made from a byte-identical model at another path. Raises DataError
    naming the manifest when it is not a JSON object."""
    f = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{f}: not a readable synthetic-set manifest ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{f}: not a synthetic-set manifest (expected a JSON object)")
    canon = json.dumps(manifest_identity(manifest), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()
