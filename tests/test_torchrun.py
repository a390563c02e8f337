"""neon under torchrun without `--`: no option of a distributed command is one torchrun's parser
takes for its own, and the README's torchrun lines run as written (2 gloo ranks, tiny sizes),
with and without `--`."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import typer

from neon_cli.commands import app

from cli_helpers import run_guarded

ROOT = Path(__file__).resolve().parents[1]
#: the commands that run under torchrun (README "Clusters")
DISTRIBUTED = ["synth", "finetune", "eval", "tune-w", "ref-stats", "fid"]
#: neon's help options are torchrun's too; an exact -h/--help after the script goes to the script
#: (argparse REMAINDER) and is only ever typed alone
HELP = {"-h", "--help"}


def _torchrun_options() -> tuple[set[str], set[str]]:
    from torch.distributed.run import get_args_parser

    longs, shorts = set(), set()
    for action in get_args_parser()._actions:
        for opt in action.option_strings:
            (longs if opt.startswith("--") else shorts).add(opt)
    return longs, shorts


def _neon_options(cmd: str) -> list[str]:
    command = typer.main.get_command(app).commands[cmd]
    return [o for p in command.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)]


def test_torchrun_parser_is_what_the_rule_assumes():
    longs, shorts = _torchrun_options()
    assert {"--numa-binding", "--max-restarts", "--nproc-per-node", "--standalone"} <= longs
    assert {"-m", "-r", "-t"} <= shorts


@pytest.mark.parametrize("cmd", DISTRIBUTED)
def test_no_option_collides_with_torchrun(cmd):
    """No long option is a prefix of (or equal to) a torchrun long option (argparse's allow_abbrev
    would take it, or refuse it as ambiguous) and no short option is one of torchrun's."""
    longs, shorts = _torchrun_options()
    clashes = []
    for opt in _neon_options(cmd):
        if opt in HELP:
            continue
        if opt.startswith("--"):
            hit = sorted(t for t in longs if t.startswith(opt))
        else:
            hit = [opt] if opt in shorts else []
        if hit:
            clashes.append(f"{opt} ~ {', '.join(hit)}")
    assert not clashes, f"neon {cmd}: options torchrun would read as its own: {clashes}"


@pytest.mark.parametrize("cmd", DISTRIBUTED)
def test_torchrun_hands_every_option_to_neon(cmd):
    """What torchrun's own parser does with each option, alone and as --opt=value, with and without '--'."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    for opt in _neon_options(cmd):
        if opt in HELP:
            continue
        for tail in ([opt, "1"], [f"{opt}=1"] if opt.startswith("--") else [opt + "1"]):
            for dashdash in ([], ["--"]):
                argv = ["--standalone", "--nproc_per_node=2", "-m", "neon_cli", *dashdash, cmd, *tail]
                args = parser.parse_args(argv)
                assert args.training_script == "neon_cli" and args.training_script_args[-len(tail) - 1:] == [cmd, *tail], argv


def test_old_colliding_spellings_are_gone():
    assert "--num" not in _neon_options("synth") and "--num-images" in _neon_options("synth")
    assert "--max" not in _neon_options("eval") and "--max-metric" in _neon_options("eval")
    for cmd in ("synth", "finetune", "eval", "tune-w"):
        assert "-m" not in _neon_options(cmd)


# ----------------------------------------------------------------------------------------------
# the README's lines, run

#: sizes for the README's lines on 2 CPU ranks (flag -> value)
TINY = {"--num-images": "64", "--budget": "64", "--batch": "16", "--num-samples": "32", "--max-evals": "2"}


def readme_torchrun_lines() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Clusters: torchrun and Slurm"):]
    section = section[: section.index("\n## ", 5)]
    block = section[section.index("```bash") + 7: section.index("```", section.index("```bash") + 7)]
    joined = block.replace("\\\n", " ")
    return [shlex.split(ln) for ln in joined.splitlines() if ln.strip().startswith("torchrun ")]


def _tiny(argv: list[str], dashdash: bool) -> list[str]:
    out = []
    budget = TINY["--budget"]
    for i, tok in enumerate(argv):
        if i > 0 and argv[i - 1] in TINY:
            tok = TINY[argv[i - 1]]
        tok = re.sub(r"--nproc_per_node=\d+", "--nproc_per_node=2", tok)
        tok = re.sub(r"theta_s-\d+", f"theta_s-{int(budget):09d}", tok)
        out.append(tok)
    assert out[0] == "torchrun"
    k = out.index("neon_cli") + 1
    return [sys.executable, "-m", "torch.distributed.run", *out[1:k], *(["--"] if dashdash else []), *out[k:], "-q"]


def test_readme_shows_every_distributed_command():
    cmds = [argv[argv.index("neon_cli") + 1] for argv in readme_torchrun_lines()]
    assert cmds == ["synth", "finetune", "eval", "tune-w"]


@pytest.mark.parametrize("dashdash", [False, True], ids=["without --", "with --"])
def test_readme_lines_reach_neon_whole(dashdash):
    """torchrun's parser hands each README line's neon arguments to neon unchanged, either way."""
    from torch.distributed.run import get_args_parser

    for argv in readme_torchrun_lines():
        cmd = _tiny(argv, dashdash)
        args = get_args_parser().parse_args(cmd[3:])
        neon_args = argv[argv.index("neon_cli") + 1:]
        assert args.training_script == "neon_cli" and args.module
        assert [a for a in args.training_script_args if a != "--"] == _tiny(argv, False)[-len(neon_args) - 1:], cmd


@pytest.mark.slow
def test_readme_torchrun_lines_run(tmp_path):
    """The README's four lines, as written (no '--'), at tiny sizes on 2 gloo ranks; the same
    commands with '--' are what tests/test_distributed.py launches."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv in readme_torchrun_lines():
        cmd = _tiny(argv, False)
        res = run_guarded(cmd, f"neon {argv[0]} under torchrun", cwd=tmp_path, capture_output=True, text=True, env=env)
        if "tune-w" in argv and res.returncode != 0 and "no candidate beats the base" in res.stderr:
            # a 64-image fine-tune need not beat the base: neon exits 5 on every rank, which torchrun
            # (elastic) reports as its own exit 1; -o is not written
            assert "(exitcode: 5)" in res.stderr
            assert not (tmp_path / "neon.safetensors").exists()
            continue
        assert res.returncode == 0, (cmd, res.stderr[:3000])
        if "eval" in argv:
            assert json.loads(res.stdout)["metrics"]["fd_digits"] > 0
        if "tune-w" in argv:
            assert (tmp_path / "neon.safetensors").exists()
    assert len(json.loads((tmp_path / "S" / "manifest.json").read_text())["shards"]) == 1
    assert (tmp_path / "ft" / "theta_s-000000064.safetensors").exists()
    assert len((tmp_path / "tune.jsonl").read_text().splitlines()) >= 2
