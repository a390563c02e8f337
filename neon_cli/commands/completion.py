"""Shell completion of neon's arguments: FAMILY names and ``--set KEY=VALUE`` (typer's ``autocompletion``).

Nothing here imports a plugin module that is not cheap to import, and any failure completes
nothing. The completion scripts in ``completions/`` are generated from the app (README "Shell
completion").
"""

from __future__ import annotations

import os
from typing import Any, Optional

import typer


def _family_on_line(ctx: Any) -> Optional[str]:
    """The FAMILY (argument or ``--family``) typed so far on the line being completed.

    While completing ``--set VALUE`` the parser stops at the value-less ``--set``, so the words
    typed before it (``$COMP_WORDS`` for bash, ``$_TYPER_COMPLETE_ARGS`` for zsh/fish) are parsed
    again without it.
    """
    import shlex

    name = (ctx.params or {}).get("family")
    if name or ctx.command is None:
        return name
    raw = os.environ.get("_TYPER_COMPLETE_ARGS") or os.environ.get("COMP_WORDS") or ""
    try:
        words = shlex.split(raw)
    except ValueError:
        words = raw.split()
    if ctx.info_name in words:
        words = words[words.index(ctx.info_name) + 1:]
    if "--set" in words:
        words = words[: len(words) - 1 - words[::-1].index("--set")]
    try:
        sub = ctx.command.make_context(ctx.info_name, words, resilient_parsing=True)
    except Exception:
        return None
    return sub.params.get("family")


def complete_setting(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Shell completion for ``--set KEY=VALUE``: the family's setting names (``guidance=``, ...).

    The family is the command's FAMILY argument (or ``--family``) already on the line; only
    entry-point families are asked (a family given as a file path is not imported on TAB). Plugin
    modules must be cheap to import (no torch: the built-in ones import only ``neon_cli.family``).
    ``finetune`` also completes the family's ``train_settings``. After ``KEY=``, a setting with
    choices completes its values. Any failure completes nothing.
    """
    try:
        from neon_cli.family import family_names, get_family

        name = _family_on_line(ctx)
        if not name or name not in family_names():
            return []
        fam = get_family(name)
        settings = list(getattr(fam, "settings", []) or [])
        if ctx.command is not None and ctx.command.name == "finetune":
            settings += list(getattr(fam, "train_settings", []) or [])
        key, sep, _ = incomplete.partition("=")
        if sep:
            for st in settings:
                if st.name == key and getattr(st, "choices", None):
                    return [(f"{key}={c}", _short(st.help or "")) for c in st.choices if f"{key}={c}".startswith(incomplete)]
            return []
        return [(f"{st.name}=", _short(f"default {st.default}: {st.help or ''}")) for st in settings if st.name.startswith(incomplete)]
    except Exception:  # completion never fails loudly
        return []


def _short(text: str, width: int = 56) -> str:
    """A completion help text short enough that no shell's menu (or typer's fish output) wraps it."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def complete_labels(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion for ``--labels``: the label protocols of :mod:`neon_cli.labels` with their sources."""
    from neon_cli.labels import PROTOCOLS, SOURCES

    return [(p, _short(SOURCES[p])) for p in PROTOCOLS if p.startswith(incomplete)]


def complete_family(incomplete: str) -> list[str]:
    """Shell completion for FAMILY: entry-point names, without importing any plugin."""
    from neon_cli.family import family_names

    return [n for n in family_names() if n.startswith(incomplete)]
