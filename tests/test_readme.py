"""Every shell example in README.md runs, from a temporary directory, so the README cannot go stale.

The run block is also the end-to-end test of the installed ``neon`` console script: the pipeline
(synth, finetune, tune-w, merge, eval) must beat the base on disjoint seeds, the by-hand merge must
equal tune-w's ``-o``, and ``neon demo`` must follow the paper's protocol (:func:`check_demo_report`).

Each fenced ``bash`` block of the README is preceded by one marker line (an HTML comment, invisible
on GitHub):

* ``<!-- readme-test: run -->``: the block's commands run here, in order, in one temporary
  directory shared by all run blocks (so the pipeline's ``runs/S`` made by one line is there for
  the next), never the repository root, with the installed ``neon`` on PATH. Sizes are shrunk by
  :data:`SMALL` (flag -> value) so the whole README runs in about two minutes on 2 cores
  (the fine-tuning budget stays as printed: the snapshot names follow from it); every other
  argument is exactly as printed. Each command must exit 0 (or the code its line's comment
  announces: ``# exit 5`` for a tune-w whose candidate need not beat the base at these sizes).
* ``<!-- readme-test: skip REASON -->``: not run here, with the reason (your own files, a clone
  of an official repository, a GPU, Slurm, or another test that runs it, named).

A block without a marker fails :func:`test_every_bash_block_is_marked`, so a new example is either
run or explicitly excused.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from cli_helpers import run_guarded

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: flag -> value used instead of the README's (only sizes: counts of images, samples, evaluations)
SMALL = {
    "--num-images": "1000",
    "--num-samples": "400",
    "--confirm-samples": "500",
    "--num-synthetic": "1000",
    "--max-evals": "5",
    "--save-every": "20000",
    "--budget-fraction": "0.01",
}

MARK = re.compile(r"<!--\s*readme-test:\s*(run|skip)\b\s*(.*?)\s*-->")


def bash_blocks() -> list[tuple[int, str, str, str]]:
    """(line number, marker kind or '', marker reason, block text) of every ```bash block."""
    lines = README.read_text().splitlines()
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            body = []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            m = MARK.search(prev)
            out.append((start + 1, m.group(1) if m else "", m.group(2) if m else "", "\n".join(body)))
        i += 1
    return out


def command_lines(block: str) -> list[tuple[str, int]]:
    """(command line, expected exit code) of each command of ``block``: continuation lines joined,
    :data:`SMALL` applied; comment-only lines dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.search(r"#\s*exit (\d+)", line)
        for flag, value in SMALL.items():
            line = re.sub(rf"(?<=\s){re.escape(flag)}\s+\S+", f"{flag} {value}", line)
        out.append((line, int(m.group(1)) if m else 0))
    return out


def neon_argv(line: str) -> list[str]:
    """The arguments after ``neon`` (or ``-m neon_cli [--]``) on ``line``, up to a pipe or ``;``."""
    try:
        argv = shlex.split(line, comments=True)
    except ValueError:
        return []
    for stop in ("|", ";", "&&", ">"):
        if stop in argv:
            argv = argv[: argv.index(stop)]
    if "neon" in argv:
        return argv[argv.index("neon") + 1:]
    if "neon_cli" in argv:
        return [a for a in argv[argv.index("neon_cli") + 1:] if a != "--"]
    return []


def test_every_bash_block_is_marked():
    unmarked = [line for line, kind, _, _ in bash_blocks() if not kind]
    assert not unmarked, f"README.md bash blocks without a readme-test marker at lines {unmarked}"
    skipped = [(line, why) for line, kind, why, _ in bash_blocks() if kind == "skip"]
    assert all(why for _, why in skipped), f"a skip marker needs its reason: {skipped}"


def test_readme_blocks_name_only_existing_commands_and_options():
    """Every ``neon ...`` line of every block (run or skipped) names a real command and real
    options of it, so even the examples that cannot run here stay true to the CLI."""
    import typer

    from neon_cli.commands import app

    group = typer.main.get_command(app)
    bad = []
    for line, _, _, block in bash_blocks():
        for text, _ in command_lines(block):
            argv = neon_argv(text)
            if not argv or argv[0].startswith("-"):
                continue
            cmd = group.commands.get(argv[0])
            if cmd is None:
                bad.append((line, argv[0], "no such command"))
                continue
            names = {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", ())) if o.startswith("-")}
            for tok in argv[1:]:
                if tok.startswith("-") and tok not in ("-", "--") and not re.fullmatch(r"-\d.*", tok):
                    if tok.split("=", 1)[0] not in names:
                        bad.append((line, argv[0], tok))
    assert not bad, f"README examples name unknown commands/options: {bad}"


@pytest.mark.slow
def test_readme_run_blocks_run_from_a_temporary_directory(tmp_path):
    neon = shutil.which("neon") or str(Path(sys.executable).with_name("neon"))
    assert Path(neon).exists(), "the installed 'neon' console script is needed (pip install -e .)"
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(neon).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               NEON_LOG_FORMAT="plain")
    env.pop("NEON_INCEPTION", None)
    env.pop("NEON_REF_STATS", None)
    ran, printed = 0, ""
    for line, kind, _, block in bash_blocks():
        if kind != "run":
            continue
        script = ["set -u"]
        texts = command_lines(block)
        for i, (text, code) in enumerate(texts):
            script.append(text)
            script.append(f'rc=$?; if [ $rc -ne {code} ]; then echo "NEON-README-FAIL {i} $rc" >&2; exit 99; fi')
            ran += 1
        res = run_guarded(["bash", "-c", "\n".join(script)], f"README block at line {line}", cwd=tmp_path, env=env,
                          capture_output=True, text=True)
        m = re.search(r"NEON-README-FAIL (\d+) (\d+)", res.stderr)
        where = f"README block at line {line}, command {texts[int(m.group(1))][0]!r}: exit {m.group(2)}" if m else ""
        assert res.returncode == 0, f"{where}\n{res.stderr[-3000:]}"
        printed += res.stdout
    assert ran >= 10
    # the pipeline's outcome, not just its exit codes: the tuned model beats the base on seeds
    # disjoint from the search's (tune-w's confirmation)
    from safetensors.numpy import load_file

    rep = json.loads((tmp_path / "tune.json").read_text())["results"]
    conf = rep["confirmation"]
    assert rep["improved"] and conf["relative_improvement"] > 0.1 and not conf["contradicts"], conf
    # neon merge with tune-w's w, by hand, is tune-w's -o tensor for tensor
    a, b = (load_file(str(tmp_path / "runs" / f)) for f in ("neon.safetensors", "neon-by-hand.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    check_demo_report(tmp_path / "demo.json", tmp_path / "runs" / "demo")
    out = " ".join(printed.split())  # the demo's table and headline, as a user reads them
    assert "than the base at its best γ" in out and "real images" in out and "Neon w" in out
    assert "│ fd_digits" in printed and "Neon fd_digits" in out
    demo_table = printed[printed.index("Neon on the embedded default"):]
    assert "│ class_accuracy " in demo_table and "…" not in demo_table  # names are never cut at 80 columns


def check_demo_report(report: Path, work: Path) -> None:
    """``neon demo`` follows the paper's protocol: S at the base's own best gamma, Neon against the
    base at its default and at its best gamma and against the same budget on real data, every
    number on seeds disjoint from the search's (the README block's demo line made these files)."""
    r = json.loads(report.read_text())["results"]
    steps = r["steps"]
    assert r["num_synthetic"] == int(SMALL["--num-synthetic"])
    assert r["budget_fraction"] == pytest.approx(r["budget_images"] / 2**20, rel=1e-3)
    # S was synthesized at the base's best gamma, which beats the default gamma 2 on the search seeds
    assert r["gamma_default"] == 2.0 and r["gamma_S"] == r["gamma_base_best"] != 2.0
    assert steps["synth"]["settings"]["resolved_settings"]["guidance"] == r["gamma_S"]
    bl = steps["base-gamma"]["results"]["baselines"]
    assert bl["best"]["value"] < bl["default"]["value"]
    m = r["metric"]
    assert m == "fd_digits" and "fid" not in r["neon"]  # digits' classifier distance is not called FID
    assert r["gain_vs_best"] == pytest.approx(1 - r["neon"][m] / r["base_best"][m])
    assert r["gain_vs_default"] == pytest.approx(1 - r["neon"][m] / r["base_default"][m])
    assert r["neon"][m] < r["base_default"][m]
    # the control: the same budget and recipe on the real digits
    ft = json.loads((work / "ft" / "finetune.json").read_text())
    ctl = json.loads((work / "control" / "ft" / "finetune.json").read_text())
    assert ctl["budget_images"] == ft["budget_images"] and ctl["config"] == ft["config"]
    assert r["control"][m] > 0 and r["num_real"] > 0
    tuned = steps["tune-w"]["results"]
    assert tuned["confirmation"]["seeds"][0] == 10_000_000 + int(SMALL["--num-samples"])  # disjoint from the search
    assert (work / "neon.safetensors").exists() == bool(r["paths"]["neon"])
