"""``neon plugins``: the installed families."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from neon_cli.commands._common import DryRunOpt, ReportOpt, run
from neon_cli.requests import PluginsRequest


def register(app: typer.Typer) -> None:
    @app.command("plugins")
    def plugins(
        json_out: bool = typer.Option(False, "--json", help="Print JSON (name, distribution, version, settings, metrics with definitions, train_defaults)."),
        report: Optional[Path] = ReportOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """List the families found under the entry-point group 'neon.families'.

        A plugin that fails to load is listed with its error instead of breaking the CLI. The report's results hold the same list under "families". The table shows each family's metrics with their direction (↓ lower, ↑ higher is better); --json also gives each metric's one-line definition ("metric_info": what it measures, on which detector or classifier, against which reference), deprecated metric names ("metric_aliases"), and the fine-tuning recipe ("train_defaults": lr, batch, ema_halflife_images, warmup_images; "train_settings") beside the inference settings ("settings").

        Example:

        \b
            neon plugins --json
            neon plugins --report plugins.json
        """

        req = PluginsRequest(report)

        def fn(report: Any, progress: Any) -> list[dict[str, Any]]:
            from neon_cli.family import list_families

            return list_families(req, report=report, progress=progress)

        # --json: the list itself on success (the plan on --dry-run), {"status", "exit_code", "error"} on a failure
        run("plugins", fn, settings=req.settings(), report=report, quiet=True, show=_show, dry_run=dry_run,
            json_out=json_out, json_result=True, plan=req.plan)


def _show(infos: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    arrow = {"lower is better": "↓", "higher is better": "↑"}
    t = Table("family", "distribution", "version", "settings", "metrics (↓ lower, ↑ higher is better)", "status")
    for i in infos:
        settings = ", ".join(f"{s['name']}={s['default']}" for s in i["settings"])
        metrics = " ".join(m["name"] + arrow.get(m["direction"], "") for m in i["metric_info"] if m["active"])
        t.add_row(i["name"], str(i["distribution"]), str(i["version"]), settings, metrics,
                  "ok" if i["loaded"] else f"[red]{i['error']}")
    console.print(t)
