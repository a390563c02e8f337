"""neon_cli/checkpoint/ has no import circle (issue 25, item 4): the dtype table lives in
``dtypes.py`` and the inert stand-ins in ``inert.py``, which core, the unpickler and the readers
import without importing each other."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from cli_helpers import run_guarded

PKG = Path(__file__).resolve().parents[1] / "neon_cli" / "checkpoint"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def imports_of(path: Path, package: str = "neon_cli.checkpoint") -> set[str]:
    """The modules of ``package`` that the file imports anywhere (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .core import y
                base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            # from the package: a submodule by name, or anything else from its __init__
            names = [f"{mod}.{a.name}" if (path.parent / f"{a.name}.py").exists() else mod for a in node.names] \
                if mod == package else [mod]
        for n in names:
            if n == package:
                found.add("__init__")  # the package itself, which imports every submodule
            elif n.startswith(package + "."):
                found.add(n[len(package) + 1:].split(".")[0])
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports) as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle_in_the_checkpoint_package():
    graph = {m: imports_of(PKG / f"{m}.py") for m in MODULES}
    assert cycle(graph) is None, f"import circle: {' -> '.join(cycle(graph))}"
    assert not [m for m, v in graph.items() if "__init__" in v], "a submodule imports the package (its __init__ imports it back)"
    # the finder finds what it is for: core <-> unpickler, as it was, is a circle
    assert cycle({**graph, "dtypes": graph["dtypes"] | {"unpickler"}}) is not None
    assert graph["dtypes"] == set() and graph["inert"] == {"dtypes"}
    assert "unpickler" not in graph["core"] and "core" not in graph["unpickler"]


@pytest.mark.parametrize("module", MODULES)
def test_each_checkpoint_module_imports_alone_in_a_fresh_interpreter(module):
    # the package's __init__ runs first either way; importing the module first of all in a new
    # interpreter is what a partially initialised circle would break
    code = (f"import importlib, sys\nm = importlib.import_module('neon_cli.checkpoint.{module}')\n"
            "print('torch' in sys.modules)")
    res = run_guarded([sys.executable, "-c", code], f"import neon_cli.checkpoint.{module}", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False"  # none of them imports torch at import time


def test_the_old_names_still_resolve():
    from neon_cli.checkpoint import core, dtypes, inert, unpickler

    assert core.DTYPES is dtypes.DTYPES and core.parse_dtype is dtypes.parse_dtype
    assert unpickler.TensorRef is inert.TensorRef and unpickler.Inert is inert.Inert and core.TensorRef is inert.TensorRef
