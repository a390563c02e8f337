"""Functions a reader can hold in their head (issue 25 item 3): no function over MAX_LINES lines or
MAX_PARAMS parameters (a request object counts as one; ``self``/``cls`` do not) in the files
listed, measured from their syntax tree (``ast``: first decorator to last line, docstring included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FILES = [
    "neon_cli/merge.py",
    "neon_cli/align.py",
    "neon_cli/export.py",
    "neon_cli/inspection.py",
    "neon_cli/requests.py",
    "neon_cli/plan.py",
    "neon_cli/commands/_common.py",
    "neon_cli/commands/boundary.py",
    "neon_cli/commands/logs.py",
    "neon_cli/commands/completion.py",
    "neon_cli/lora.py",
    "neon_cli/demo.py",
    "neon_cli/tune/run.py",
    "neon_cli/tune/plan.py",
    "neon_cli/tune/joint.py",
    "neon_cli/tune/quadratic.py",
    "neon_cli/tune/snapshots.py",
    "neon_cli/synth.py",
    "neon_cli/fid.py",
    "neon_cli/inception.py",
    "neon_cli/evaluate.py",
    "neon_cli/finetune.py",
    "neon_cli/train.py",
]
MAX_LINES = 80
MAX_PARAMS = 8

#: Functions allowed over a limit, each with the reason; an entry that no longer exceeds fails the test.
ALLOWED = {
    ("neon_cli/commands/boundary.py", "run"): "10 keyword parameters: every command module calls it this way, "
                                              "and the modules of tune, synth, finetune, eval, fid, demo are being "
                                              "rewritten on other branches; it takes a request in the next round",
    ("neon_cli/evaluate.py", "__init__"): "Evaluator: 9 parameters; tune/scorer.py, the autoregressive plugin and "
                                          "tests call it positionally; to take a SeedPlan next",
}


def measure(source: str) -> list[tuple[str, int, int]]:
    """(qualified name, lines, parameters) of every function in ``source``, nested ones included."""
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                params = len(names) + (a.vararg is not None) + (a.kwarg is not None)
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                out.append((prefix + child.name, child.end_lineno - first + 1, params))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def test_measure_counts_lines_and_parameters():
    src = "class A:\n    def f(self, a, b=1, *c, d, **e):\n        x = 1\n\n        return x\n\n\n@dec\ndef g():\n    def h(p): pass\n"
    assert measure(src) == [("A.f", 4, 5), ("g", 3, 0), ("g.h", 1, 1)]


def test_functions_are_short():
    too_long = []
    still_needed = set()
    for rel in FILES:
        for name, lines, params in measure((ROOT / rel).read_text()):
            if lines > MAX_LINES or params > MAX_PARAMS:
                key = (rel, name.rsplit(".", 1)[-1])
                if key in ALLOWED:
                    still_needed.add(key)
                else:
                    too_long.append(f"{rel}: {name}: {lines} lines, {params} parameters")
    assert not too_long, f"functions over {MAX_LINES} lines or {MAX_PARAMS} parameters: {too_long}"
    assert still_needed == set(ALLOWED), f"no longer over a limit, remove from ALLOWED: {set(ALLOWED) - still_needed}"
