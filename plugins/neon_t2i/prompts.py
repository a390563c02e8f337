"""Prompt files of the ``t2i`` family (no torch).

A prompt file holds one prompt per line, or JSON lines ``{"prompt": "...", "negative_prompt": "..."}``
(``negative_prompt`` optional); empty lines are skipped. Image i of a plan uses prompt
``(seed + i) mod P`` (the plan's label), so any rank or batch split gives the same set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from neon_cli.errors import UsageError

_CACHE: dict[tuple[str, float, int], list[dict[str, str]]] = {}


def read_prompts(path: str | Path, flag: str = "--set prompts") -> list[dict[str, str]]:
    """``[{"prompt": str, "negative_prompt": str}, ...]`` of the file at ``path`` (module docstring).

    Raises UsageError naming ``flag`` and the file (and the line) when the file is missing, empty,
    or a JSON line is malformed or has no string ``prompt``.
    """
    p = Path(str(path)).expanduser()
    if not str(path) or not p.is_file():
        raise UsageError(f"{flag}: prompt file {str(path)!r} does not exist")
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime, st.st_size)
    if key in _CACHE:
        return _CACHE[key]
    out: list[dict[str, str]] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError as exc:
                raise UsageError(f"{flag}: {p}:{n}: not valid JSON ({exc})") from None
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            neg = obj.get("negative_prompt", "") if isinstance(obj, dict) else None
            if not isinstance(prompt, str) or not isinstance(neg, (str, type(None))):
                raise UsageError(f"{flag}: {p}:{n}: a JSON line needs a string 'prompt' (and optionally 'negative_prompt')")
            out.append({"prompt": prompt, "negative_prompt": neg or ""})
        else:
            out.append({"prompt": text, "negative_prompt": ""})
    if not out:
        raise UsageError(f"{flag}: prompt file {p} holds no prompt")
    _CACHE[key] = out
    return out


def prompts_sha256(prompts: list[dict[str, str]]) -> str:
    """sha256 of the prompts' canonical JSON (not of the file: formatting does not matter)."""
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()


def check_disjoint(eval_prompts: list[dict[str, str]], train_prompts: list[Any], where: str) -> None:
    """UsageError when an evaluation prompt is one of the prompts S was made from (``train_prompts``,
    as recorded in a snapshot's ``neon.json``): scores on them would reward memorising S."""
    train = {t["prompt"] if isinstance(t, dict) else str(t) for t in train_prompts}
    shared = [p["prompt"] for p in eval_prompts if p["prompt"] in train]
    if shared:
        raise UsageError(f"--set prompts: {len(shared)} evaluation prompt(s) are prompts of the synthetic set "
                         f"{where} was fine-tuned on (e.g. {shared[0]!r}); evaluate on prompts disjoint from S's")
