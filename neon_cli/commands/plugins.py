"""``neon plugins``: the installed families."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    @app.command("plugins")
    def plugins(json_out: bool = typer.Option(False, "--json", help="Print JSON (name, distribution, version, settings).")) -> None:
        """List the families found under the entry-point group 'neon.families'.

        A plugin that fails to load is listed with its error instead of breaking the CLI.

        Example:

        \b
            neon plugins --json
        """
        from neon_cli.family import discover

        infos = [i.to_json() for i in discover().values()]
        if json_out:
            print(json.dumps(infos, indent=2, default=str))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table("family", "distribution", "version", "settings", "status")
        for i in infos:
            settings = ", ".join(f"{s['name']}={s['default']}" for s in i["settings"])
            t.add_row(i["name"], str(i["distribution"]), str(i["version"]), settings, "ok" if i["loaded"] else f"[red]{i['error']}")
        Console().print(t)
