"""``neon inspect``: a checkpoint's container tree, where its weights are, what loading it would run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from neon_cli.commands._common import DryRunOpt, JsonOpt, QuietOpt, ReportOpt, run
from neon_cli.requests import InspectRequest


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        checkpoint: Path = typer.Argument(..., help="Any checkpoint neon merge reads: .safetensors, .pt/.pth/.bin/.ckpt, .pkl, a (sharded or diffusers) folder.", show_default=False),
        key: Optional[str] = typer.Option(None, "--key", metavar="PATH", help="Check that this dotted path holds the weights (as neon merge --key)."),
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        dry_run: bool = DryRunOpt,
    ) -> None:
        """Show what a checkpoint holds without running any of it (safe on any file).

        Prints the container tree (class names, plain values, tensors with shape, dtype, bytes and shared storages), which --key neon merge would pick (ema, model_ema, ema_model, trainer.var_wo_ddp, ...), and every global a normal torch.load / pickle.load would resolve, warning about calls that do anything but rebuild tensors ("this file would run os.system on load").

        Example:

        \b
          neon inspect network-snapshot.pkl
          neon inspect checkpoint-last.pth --json | jq .weights
          neon inspect ddpm-pipeline/ --report inspect.json
        """
        req = InspectRequest(checkpoint, key, report)

        def fn(report: Any, progress: Any) -> dict[str, Any]:
            from neon_cli.inspection import inspect_checkpoint

            return inspect_checkpoint(req, report=report, progress=progress)

        run("inspect", fn, settings=req.settings(), report=report, json_out=json_out, quiet=quiet, show=_show, dry_run=dry_run,
            plan=req.plan)


def _show(res: dict[str, Any], console: Any) -> None:
    """Human summary on stdout (rich)."""
    parts = res.get("components")
    if parts:
        for comp, r in parts.items():
            console.print(f"[bold]{comp}/[/bold]", highlight=False)
            _show_one(r, console, "  ")
    else:
        _show_one(res, console, "")
    from neon_cli.commands._common import _escape, _stderr_console

    err = _stderr_console()  # warnings go to stderr in every mode
    for w in res.get("warnings") or []:
        err.print(f"[red]neon inspect: warning:[/red] {_escape(w)}", highlight=False, soft_wrap=True)


def _show_one(res: dict[str, Any], console: Any, indent: str) -> None:
    console.print(f"{indent}{res['path']}: {res.get('encoding')}" + (f", {res['bytes']:,} bytes" if res.get("bytes") else ""), highlight=False)
    for line in _lines(res.get("tree"), indent + "  ", 0):
        console.print(line, highlight=False, markup=False)
    wt = res.get("weights")
    if wt:
        where = f"--key {wt['key']}" if wt.get("key") else "the whole file"
        console.print(f"{indent}weights neon merge would use: {where} ({wt['tensors']} tensors, {wt['bytes']:,} bytes)"
                      + (f"; also: {', '.join(wt['alternatives'])}" if wt.get("alternatives") else ""), highlight=False)
    elif res.get("weights_error"):
        console.print(f"{indent}no weights found: {res['weights_error']}", highlight=False)
    gl = res.get("globals") or []
    if gl:
        console.print(f"{indent}globals a normal load resolves:", highlight=False)
        for g in gl:
            console.print(f"{indent}  {g['name']} x{g['count']}: {g['kind']}" + (f" ({g['why']})" if g.get("why") and g["kind"] != "tensor" else ""),
                          highlight=False, markup=False)


def _lines(node: Any, indent: str, depth: int, name: str = "", limit: list[int] | None = None) -> list[str]:
    limit = limit if limit is not None else [200]
    out: list[str] = []
    if node is None or limit[0] <= 0:
        return out
    limit[0] -= 1
    label = f"{name}: " if name else ""
    t = node.get("type")
    if t == "tensor":
        out.append(f"{indent}{label}tensor {node['dtype']} {node['shape']} ({node['bytes']:,} B){' shared storage' if node.get('shared') else ''}")
    elif t == "object":
        out.append(f"{indent}{label}{node['class']}" + (" (module)" if node.get("module") else "")
                   + (f" [embedded source {node['module_src']['characters']:,} characters]" if node.get("persistent") else ""))
        for section in ("parameters", "buffers", "modules", "attributes", "entries"):
            for k, v in (node.get(section) or {}).items():
                out += _lines(v if isinstance(v, dict) else {"type": "value", "value": v}, indent + "  ", depth + 1, k, limit)
    elif t in ("dict", "OrderedDict", "list", "tuple", "set", "frozenset"):
        out.append(f"{indent}{label}{t} ({node['len']})")
        items = node.get("items")
        pairs = items.items() if isinstance(items, dict) else enumerate(items or [])
        for k, v in pairs:
            out += _lines(v, indent + "  ", depth + 1, str(k), limit)
    elif t == "safetensors":
        for k, v in node.get("tensors", {}).items():
            out.append(f"{indent}{k}: tensor {v['dtype']} {v['shape']}")
    else:
        out.append(f"{indent}{label}{node.get('value', t)}")
    return out
