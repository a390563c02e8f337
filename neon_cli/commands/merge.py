"""``neon merge``: θ_Neon = θ_r − w (θ_s − θ_r) between two checkpoint files (family-agnostic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from neon_cli.commands._common import JsonOpt, QuietOpt, ReportOpt, run
from neon_cli.requests import MergeRequest


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_cmd(
        base: Path = typer.Argument(..., help="theta_r, the base checkpoint: .safetensors, .pt/.pth/.bin/.ckpt, .pkl, a sharded or diffusers folder.", show_default=False),
        selftrained: Path = typer.Argument(..., help="theta_s, the self-trained checkpoint (same keys, shapes, dtypes), or a LoRA on theta_r (diffusers, peft or kohya .safetensors, or its folder).", show_default=False),
        w: str = typer.Option(..., "--w", help="Neon weight w; a comma list (0.5,1.0,1.6) writes one output per w in one pass."),
        output: str = typer.Option(..., "-o", "--out", help="Output: name.safetensors, name.pt / name.pkl (theta_r's own file with the merged weights), or a folder; '{w}' is replaced by each weight."),
        key: Optional[str] = typer.Option(None, "--key", metavar="PATH", help="Where the state dict is in a container, dotted (ema, model_ema, trainer.var_wo_ddp). Default: found automatically."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype of floating tensors: float32, bfloat16, float16, float64. Default: theta_r's."),
        exclude: Optional[List[str]] = typer.Option(None, "--exclude", metavar="REGEX", help="Copy keys matching REGEX from theta_r instead of merging (repeatable)."),
        allow_missing: bool = typer.Option(False, "--allow-missing", help="Copy keys only theta_r has; ignore keys only theta_s has (default: error naming the key)."),
        shard_size: Optional[str] = typer.Option(None, "--shard-size", metavar="SIZE", help="Write a sharded safetensors folder with shards of at most SIZE (2GB, 500MB, 1.5GiB)."),
        as_lora: bool = typer.Option(False, "--as-lora", help="theta_s is a LoRA: write the Neon LoRA (-w folded into B) as a .safetensors file instead of the fused pipeline folder."),
        lora_format: str = typer.Option("diffusers", "--lora-format", help="Layout of a LoRA output: diffusers (load_lora_weights) or kohya (A1111, ComfyUI, sd-scripts)."),
        allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Write the output even when a merged value is inf/NaN (default: refused, exit 2, naming the first such tensor)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate inputs, keys, shapes, dtypes and outputs from headers; write only the report."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", hidden=True, help="Accepted and ignored: merge reads every pickle without running it."),
        report: Optional[Path] = ReportOpt,
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
    ) -> None:
        """Merge theta_Neon = theta_r - w (theta_s - theta_r) into a new checkpoint (any family).

        Float32 arithmetic (float64 for float64), cast back to theta_r's dtype or --dtype. Copied from theta_r bit for bit: non-float tensors, tensors equal in both inputs, non-finite entries, BatchNorm running statistics and --exclude matches (paper App. C). A merged value that becomes inf/NaN (a huge --w, an fp16 overflow) is refused, exit 2, naming the tensor, unless --allow-nonfinite.

        No code of either file runs: torch archives, legacy torch.save files and pickles (EDM .pkl, full-module torch.save, training states with argparse.Namespace) are read by an inert unpickler, and a .pt/.pkl output is theta_r's own file with only the merged tensor bytes replaced, so it loads in the original code exactly as theta_r did. Folders (sharded, diffusers pipelines with unet/, unet_ema/, scheduler/) are merged component by component and their configs copied.

        Streams block by block (memory: a few blocks, not the checkpoint); several --w are written in one read of the inputs; each output is written under a temporary name and renamed when complete. The report lists what was copied and why, |theta_s - theta_r|, and the precision lost to rounding.

        Example:

        \b
          neon merge base.safetensors ft.safetensors --w 1.6 -o neon.safetensors
          neon merge base.pt ft.pt --w 0.5,1.0,1.6 -o 'neon-w{w}.pt' --report r.json
          neon merge ckpt/ ckpt-ft/ --w 1.6 -o neon/ --shard-size 2GB --dtype float32
          neon merge network-snapshot.pkl edm-ft.pkl --w 1 -o neon.pkl --key ema
          neon merge ddpm-pipe/ ft/theta_s-000131072/ --w 1 -o neon-pipe/
          neon merge var.pth ft.pth --w 1.6 -o n.pth --key trainer.var_wo_ddp
          neon merge sd-pipe/ lora/pytorch_lora_weights.safetensors --w 1 -o neon-pipe/
          neon merge sd-pipe/ lora.safetensors --w 1 --as-lora --lora-format kohya -o neon-lora.safetensors

        With a LoRA as theta_s (theta_s = theta_r + s B A) the merge is exact in LoRA space: theta_r - w s B A, fused into theta_r's pipeline folder (diffusers' fuse_lora(lora_scale=-w)) or, with --as-lora, the same LoRA with B scaled by -w. Two LoRAs on one checkpoint (theta_r and theta_s both LoRAs) give the exact rank r_r + r_s concatenation (never factor-wise).
        """
        req = MergeRequest.from_flags(base, selftrained, w, output, shard_size=shard_size, report=report, key=key, dtype=dtype,
                                      exclude=exclude, allow_missing=allow_missing, as_lora=as_lora, lora_format=lora_format,
                                      dry_run=dry_run, allow_nonfinite=allow_nonfinite, trust_pickle=trust_pickle)

        def fn(report: Any, progress: Any) -> dict[str, Any]:
            from neon_cli.merge import merge

            return merge(req, report=report, progress=progress)

        run("merge", fn, settings=req.settings(), report=report, json_out=json_out, quiet=quiet, show=_show,
            dry_run=dry_run, dry_run_calls_fn=True, plan=req.plan)


def _show(res: dict[str, Any], console: Any) -> None:
    """Human summary on stdout (rich)."""
    from rich.table import Table

    from neon_cli.commands._common import _escape, _stderr_console

    err = _stderr_console()  # warnings and hints go to stderr in every mode; stdout holds only the results
    for msg in res.get("warnings") or []:
        err.print(f"[yellow]neon merge: warning:[/yellow] {_escape(msg)}", highlight=False, soft_wrap=True)
    if "output_kind" in res:  # theta_s was a LoRA (neon_cli.lora.merge_lora)
        mods = ", ".join(f"{c} {n}" for c, n in sorted(res["lora_modules"].items()))
        console.print(f"LoRA ({res['lora_format_in']}): {mods} modules, ranks {res['lora_ranks']}, scales {res['lora_scales']}; "
                      f"{res['formula']}", highlight=False)
        for o in res["outputs"]:
            console.print(f"  w={o['w']:g} -> {o['path']} ({'dry run: nothing written' if res['dry_run'] else res['output_kind']})",
                          highlight=False)
        return
    if res.get("dry_run"):
        planned = res.get("planned", {})
        parts = ", ".join(f"{k} {v}" for k, v in sorted(planned.items()))
        console.print(f"dry run: {res['tensors_total']} tensors ({parts}); would write {len(res['outputs'])} output(s) of "
                      f"{res['output_bytes_each'] / 1e6:.1f} MB; nothing written", highlight=False)
        for o in res["outputs"]:
            console.print(f"  w={o['w']:g} -> {o['path']}", highlight=False)
        plan = res.get("plan") or {}
        console.print(f"plan: reads {len(plan.get('reads', []))} path(s), writes {len(plan.get('writes', []))} "
                      "(--dry-run --json lists them with their roles)", highlight=False)
        return
    prec = res.get("precision", {})
    table = Table(title=f"neon merge ({res.get('seconds', 0):.2f} s)", title_justify="left")
    table.add_column("w", justify="right")
    table.add_column("effective w", justify="right")
    table.add_column("non-finite results", justify="right")
    table.add_column("output")
    for k, o in enumerate(res["outputs"]):
        eff = (prec.get("effective_w") or [None] * (k + 1))[k]
        nf = sum((res.get("nonfinite_results") or [{}])[k].get("tensors", {}).values())
        table.add_row(f"{o['w']:g}", "-" if eff is None else f"{eff:.4g}", str(nf), o["path"])
    console.print(table)
    copied = res.get("copied") or {}
    parts = ", ".join(f"{k} {v}" for k, v in sorted(copied.items()))
    console.print(f"merged {res['merged']} tensors; copied from theta_r {sum(copied.values())}" + (f" ({parts})" if parts else ""), highlight=False)
    if res.get("relative_delta") is not None:
        eq = prec.get("equal_fraction")
        console.print(
            f"|theta_s - theta_r| / |theta_r| = {res['relative_delta']:.3g}"
            + (f"; {100 * eq:.1f}% of elements identical in both inputs" if eq is not None else "")
            + f" (output {', '.join(prec.get('output_dtypes') or [])})",
            highlight=False,
        )
    if res.get("nonfinite_kept"):
        console.print(f"non-finite entries kept from theta_r in {len(res['nonfinite_kept'])} tensor(s)", highlight=False)
    if any(r.get("tensors") for r in res.get("nonfinite_results") or []):  # only with --allow-nonfinite
        err.print("[red]neon merge: warning:[/red] some merged values are not finite (--allow-nonfinite; see the report's "
                  "nonfinite_results)", highlight=False, soft_wrap=True)
    if prec.get("suggest_dtype"):
        err.print(
            f"[yellow]hint:[/yellow] half precision loses much of the update ({100 * (prec.get('equal_fraction') or 0):.0f}% of "
            f"elements equal in both inputs, realised w off by up to {100 * prec.get('max_relative_w_error', 0):.1f}%): "
            f"write the output with --dtype {prec['suggest_dtype']}",
            highlight=False, soft_wrap=True,
        )
