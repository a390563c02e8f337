"""The inference settings a tuned model carries with it (issue 16, item 6).

``neon tune-w -o FILE`` records the settings it chose (gamma, and every other setting it searched
or was given) in the output's metadata under :data:`SETTINGS_KEY`, as JSON. Commands that sample
from a checkpoint (``neon synth``, ``eval``, ``demo``, ``tune-w``) start from those recorded
settings instead of the family's defaults; ``--set KEY=VALUE`` still overrides each of them.
Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

#: Metadata key of the recorded settings (a JSON object: setting name -> value).
SETTINGS_KEY = "neon.settings"
#: Metadata key naming the settings tune-w searched (a JSON list), for the record.
SEARCHED_KEY = "neon.searched"


def recorded_settings(family: Any, path: str | Path | None) -> dict[str, Any]:
    """The settings recorded in the metadata of the checkpoint at ``path`` (empty when none).

    Reads ``family.read_metadata(path)[SETTINGS_KEY]``; keeps the names the family knows
    (``family.settings``) whose values pass the setting's own check (:meth:`Setting.check`), so a
    file made by another version of a family cannot smuggle a bad value in. A checkpoint without
    the key, a family without ``read_metadata``, unreadable metadata or malformed JSON give {}.
    """
    if path is None or not hasattr(family, "read_metadata"):
        return {}
    try:
        raw = (family.read_metadata(str(path)) or {}).get(SETTINGS_KEY)
        data = json.loads(raw) if raw else {}
    except Exception:  # metadata is advisory: a file that cannot say simply records nothing
        return {}
    if not isinstance(data, dict):
        return {}
    specs = {s.name: s for s in getattr(family, "settings", ())}
    out: dict[str, Any] = {}
    for name, value in data.items():
        spec = specs.get(name)
        if spec is None:
            continue
        try:
            value = spec.type(value) if spec.type is not bool else bool(value)
            spec.check(value)
        except Exception:
            continue
        out[name] = value
    return out


def model_settings(family: Any, path: str | Path | None, set_pairs: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, used): the family's defaults, updated by the settings recorded in ``path``
    (:func:`recorded_settings`), then by ``--set KEY=VALUE`` pairs (which win).

    ``used`` holds the recorded settings that took effect (not overridden by ``--set``), for the
    one line a command prints about them (:func:`recorded_message`). Raises FamilyError naming
    the key for a bad ``--set`` pair (:func:`neon_cli.family.resolve_settings`).
    """
    from neon_cli.family import resolve_settings

    rec = recorded_settings(family, path)
    explicit = resolve_settings(family, set_pairs)  # validates every pair
    given = {p.split("=", 1)[0].strip() for p in set_pairs if "=" in p}
    settings = {**explicit, **{k: v for k, v in rec.items() if k not in given}}
    used = {k: v for k, v in rec.items() if k not in given}
    return settings, used


def recorded_message(path: str | Path, used: Mapping[str, Any]) -> str | None:
    """``"sampling with the settings recorded in best.safetensors: guidance=2.059 (--set overrides)"``,
    or None when nothing recorded took effect."""
    if not used:
        return None
    text = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(used.items()))
    return f"sampling with the settings recorded in {Path(path).name}: {text} (--set KEY=VALUE overrides)"


def apply_recorded(family: Any, path: str | Path | None, set_pairs: Sequence[str], report: Any = None,
                   progress: Any = None, task: str = "settings") -> dict[str, Any]:
    """:func:`model_settings` for a command: returns the settings; says which recorded ones took
    effect in one line (``progress(task, 0, None, message=...)``) and in
    ``report.settings["recorded_settings"]``. The one call synth, eval, demo and tune-w make."""
    settings, used = model_settings(family, path, set_pairs)
    if report is not None:
        report.settings["recorded_settings"] = used or None
    msg = recorded_message(path, used) if path is not None else None
    if msg and progress is not None:
        progress(task, 0, None, message=msg)
    return settings
