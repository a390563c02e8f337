"""A stranger's clone passes the README's test command (issue 22, item 6): tests that need
../shared/fixtures skip (naming the folder) without it and fail under CI's variable; no test has a
wall-clock limit a slow machine trips; README, pyproject.toml, docs and .ci/run agree on versions
and install commands."""

from __future__ import annotations

import ast
import re
import shlex
import sys
from pathlib import Path

import pytest

import conftest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tests run on 3.11+
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {name: (ROOT / name).read_text() for name in ("README.md", "docs/families.md", ".ci/run")}


def test_shared_fixture_skips_naming_the_folder_or_fails_when_required(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "SHARED_FIXTURES", tmp_path / "absent")
    monkeypatch.delenv(conftest.REQUIRE_FIXTURES, raising=False)
    with pytest.raises(pytest.skip.Exception, match=re.escape(str(tmp_path / "absent"))):
        conftest.shared_fixture("torchcfm-2d")
    monkeypatch.setenv(conftest.REQUIRE_FIXTURES, "1")
    with pytest.raises(pytest.fail.Exception, match="NEON_REQUIRE_FIXTURES is set"):
        conftest.shared_fixture("torchcfm-2d")
    (tmp_path / "absent" / "torchcfm-2d").mkdir(parents=True)
    assert conftest.shared_fixture("torchcfm-2d") == tmp_path / "absent" / "torchcfm-2d"


def test_ci_requires_the_fixtures_and_runs_the_readme_test_command():
    ci = [ln.strip() for ln in TEXTS[".ci/run"].splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    req = ci.index(f"export {conftest.REQUIRE_FIXTURES}=1")
    assert req < next(i for i, ln in enumerate(ci) if "pytest" in ln)
    readme_cmd = next(ln for ln in TEXTS["README.md"].splitlines() if ln.endswith("python3 -m pytest -q"))
    ci_cmds = [ln for ln in ci if ln.startswith("python3 -m p")]
    norm = [" ".join(w for w in shlex.split(c) if w != "-q" or c.endswith("pytest -q")) for c in ci_cmds]
    assert norm == [" ".join(shlex.split(c)) for c in readme_cmd.split(" && ")]


def _short_timeouts(path: Path) -> list[str]:
    """Calls in a test file given a literal ``timeout=`` under an hour, and literal defaults of a
    parameter named ``timeout`` under an hour."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "timeout" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, (int, float)):
                    if kw.value.value < 3600:
                        bad.append(f"{path.name}:{node.lineno}: timeout={kw.value.value}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args[len(node.args.args) - len(node.args.defaults):]
            for a, d in zip(args, node.args.defaults):
                if "timeout" in a.arg and isinstance(d, ast.Constant) and isinstance(d.value, (int, float)) and d.value < 3600:
                    bad.append(f"{path.name}:{node.lineno}: {a.arg}={d.value}")
    return bad


def test_no_test_has_a_wall_clock_limit_a_slow_machine_trips(tmp_path):
    bad = [b for p in sorted((ROOT / "tests").glob("*.py")) for b in _short_timeouts(p)]
    assert not bad, f"use cli_helpers.run_guarded (an hour, $NEON_TEST_TIMEOUT) instead: {bad}"
    probe = tmp_path / "probe.py"
    probe.write_text("import subprocess\nsubprocess.run(['x'], timeout=900)\n")
    assert _short_timeouts(probe) == ["probe.py:2: timeout=900"]  # the scan finds what it is for


def _torch_floor() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"torch\b", d)]
    return re.fullmatch(r"torch>=([\d.]+)", spec.replace(" ", "")).group(1)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def test_readme_pyproject_docs_and_ci_agree_on_versions_and_install_commands():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = _torch_floor()
    said = re.findall(r"torch ≥ ?([\d.]+)|torch *>= *([\d.]+)", TEXTS["README.md"] + TEXTS["docs/families.md"])
    assert said and {a or b for a, b in said} == {floor}, f"pyproject.toml requires torch>={floor}; the docs say {said}"
    pins = {f: set(re.findall(r"torch==([\d.]+)", t)) for f, t in TEXTS.items() if "torch==" in t}
    assert len(set().union(*pins.values())) == 1, pins  # one tested torch everywhere
    (pin,) = set().union(*pins.values())
    assert _version(pin) >= _version(floor)
    assert f"the tests are run with {pin}" in " ".join(TEXTS["README.md"].split())
    extras = set(project["optional-dependencies"])
    for name, text in TEXTS.items():
        for line in text.splitlines():
            for cmd in re.findall(r"pip install ([^`#\n&]+)", line):
                words = [w.strip("'\"") for w in shlex.split(cmd.strip()) if not w.startswith("-")]
                for w in words:
                    # not on PyPI: the package and its extras install from the clone ('.' / '.[x]')
                    assert not w.startswith(project["name"]), f"{name}: {line.strip()!r} installs {w} from an index"
                    if w.startswith(".["):
                        assert set(w[2:-1].split(",")) <= extras, f"{name}: {w} names an extra pyproject.toml lacks"


def test_no_install_hint_names_the_package_on_an_index():
    """Error hints and docs say where extras come from: the clone ('.[diffusers]'), not PyPI."""
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    files = [*ROOT.glob("neon_cli/**/*.py"), *ROOT.glob("plugins/**/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]
    bad = [f"{f.relative_to(ROOT)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
           if re.search(rf"pip install ['\"]?{re.escape(name)}\b", line)]
    assert not bad, f"pip install {name}... fails (not on PyPI): {bad}"
