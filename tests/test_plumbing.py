"""The shared plumbing every command and repo-backed family builds on: families named by file,
load keywords, repository discovery, output-vs-input checks, output locks, numeric checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from neon_cli.errors import FamilyError, UsageError


FAMILY_FILE = textwrap.dedent('''
    from neon_cli.family import Setting

    class Fam:
        name = "filefam"
        settings = (Setting("repo", None, str),)
        num_classes = 0
        calls = []

        def load(self, path, *, settings=None, purpose="sample"):
            self.calls.append((path, dict(settings or {}), purpose))
            return "model"

        def save(self, model, path, metadata): ...
        def sample(self, model, seeds, labels, settings): ...
        def loss(self, model, images, labels, generator): ...
        def make_optimizer(self, params, lr): ...
        def score(self, images, labels): ...

    family = Fam()
    other = Fam()
''')


def test_family_by_file_and_module(tmp_path, monkeypatch):
    from neon_cli.family import get_family, load_model, plugin_version

    f = tmp_path / "my_family.py"
    f.write_text(FAMILY_FILE)
    fam = get_family(f"{f}:family")
    assert fam.name == "filefam"
    assert get_family(str(f)) is fam  # ATTR defaults to 'family'; the file is imported once
    assert get_family(f"{f}:other") is not fam
    # module:attr once the folder is importable
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_family("my_family:other").name == "filefam"
    # load keywords: only those the family's load declares are passed
    assert load_model(fam, "ck.pt", settings={"repo": "/r"}, trust_pickle=True, purpose="train") == "model"
    assert fam.calls[-1] == ("ck.pt", {"repo": "/r"}, "train")
    pv = plugin_version(f"{f}:family")
    assert pv["source"] == str(f) and len(pv["sha256"]) == 64


def test_family_spec_errors(tmp_path):
    from neon_cli.family import get_family

    with pytest.raises(FamilyError, match="does not exist"):
        get_family(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad_fam.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(FamilyError, match="importing .* failed: RuntimeError: boom"):
        get_family(f"{bad}:family")
    ok = tmp_path / "ok_fam.py"
    ok.write_text(FAMILY_FILE)
    with pytest.raises(FamilyError, match="has no attribute 'missing'"):
        get_family(f"{ok}:missing")
    with pytest.raises(FamilyError, match="unknown family 'nosuch'"):
        get_family("nosuch")


def test_load_model_plain_family():
    from neon_cli.family import load_model

    class Old:
        def load(self, path):
            return ("loaded", path)

    assert load_model(Old(), Path("x.pt"), settings={"a": 1}, trust_pickle=True) == ("loaded", "x.pt")


def test_setting_refuses_non_finite():
    from neon_cli.family import Setting

    s = Setting("guidance", 2.0, float, low=0.0)
    for text in ("nan", "inf", "-inf"):
        with pytest.raises(FamilyError, match="--set guidance: must be a finite number"):
            s.parse(text)
    assert s.parse("1.5") == 1.5


def test_find_repo(tmp_path, monkeypatch):
    from neon_cli import repo

    markers = ("pkg_a/core.py", "pkg_a/__init__.py")
    r = tmp_path / "clone"
    (r / "pkg_a").mkdir(parents=True)
    (r / "pkg_a" / "__init__.py").write_text("")
    (r / "pkg_a" / "core.py").write_text("VALUE = 42\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("NEON_TOYREPO_REPO", raising=False)
    with pytest.raises(FamilyError, match=r"needs a checkout of X/y: give --set repo=PATH or set NEON_TOYREPO_REPO=PATH \(git clone https://x\)"):
        repo.find_repo("toyrepo", {}, markers=markers, what="X/y", url="https://x")
    with pytest.raises(FamilyError, match="--set repo: .* is not a checkout of X/y \\(missing pkg_a/core.py"):
        repo.find_repo("toyrepo", {"repo": str(tmp_path)}, markers=markers, what="X/y", url="https://x")
    monkeypatch.setenv("NEON_TOYREPO_REPO", str(tmp_path / "missing"))
    with pytest.raises(FamilyError, match="NEON_TOYREPO_REPO: .* is not a folder"):
        repo.find_repo("toyrepo", {}, markers=markers, what="X/y", url="https://x")
    monkeypatch.setenv("NEON_TOYREPO_REPO", str(r))
    found = repo.find_repo("toyrepo", {}, markers=markers, what="X/y", url="https://x")
    assert found == r.resolve() and sys.path[0] == str(r.resolve())
    try:
        assert repo.import_module(found, "pkg_a.core").VALUE == 42
        # another checkout with the same package names is refused, not mixed in
        r2 = tmp_path / "clone2"
        (r2 / "pkg_a").mkdir(parents=True)
        with pytest.raises(FamilyError, match="already imported from"):
            repo.import_module(r2, "pkg_a.core")
        # importable already: found without the setting or the variable
        monkeypatch.delenv("NEON_TOYREPO_REPO")
        assert repo.find_repo("toyrepo", None, markers=markers, what="X/y", url="u") == r.resolve()
    finally:
        sys.modules.pop("pkg_a.core", None)
        sys.modules.pop("pkg_a", None)


def test_check_outputs_same_file_in_every_spelling(tmp_path, monkeypatch):
    from neon_cli.fsutil import check_outputs

    base = tmp_path / "base.safetensors"
    base.write_bytes(b"x")
    os.link(base, tmp_path / "hard")
    os.symlink(base, tmp_path / "soft")
    monkeypatch.chdir(tmp_path)
    for spelling in ("base.safetensors", "./base.safetensors", str(base), "hard", "soft", "sub/../base.safetensors"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(UsageError, match="^--report: .* is also the input --base"):
            check_outputs({"--base": base}, {"--report": Path(spelling)})
    folder = tmp_path / "S"
    folder.mkdir()
    with pytest.raises(UsageError, match="^--report: .* is inside the input --data"):
        check_outputs({"--data": folder}, {"--report": folder / "r.json"})
    with pytest.raises(UsageError, match="^--plot: .* is also the output of --report"):
        check_outputs({}, {"--report": tmp_path / "r", "--plot": Path("r")})
    check_outputs({"--base": base, "--x": None}, {"--report": tmp_path / "other.json", "-o": None})


def test_exclusive_lock_refuses_a_second_writer(tmp_path):
    from neon_cli.fsutil import exclusive_lock

    code = ("import sys; from neon_cli.fsutil import exclusive_lock\n"
            "from neon_cli.errors import UsageError\n"
            f"try:\n    with exclusive_lock({str(tmp_path / 'S')!r}, folder=True): print('got it')\n"
            "except UsageError as e: print(e)\n")
    with exclusive_lock(tmp_path / "S", folder=True) as lp:
        assert lp == tmp_path / "S" / ".neon.lock"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.startswith(f"-o: {tmp_path / 'S'} is being written by another neon run (pid {os.getpid()} on ")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "got it"  # released with the holder


def test_remove_stale_tmp(tmp_path):
    from neon_cli.fsutil import remove_stale_tmp, tmp_name

    out = tmp_path / "out.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.safetensors.tmp-{dead.pid}"
    stale.write_bytes(b"partial")
    live = tmp_name(out)
    live.write_bytes(b"mine")
    assert remove_stale_tmp(out) == [stale]
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("fn,args,message", [
    ("finite", ("--lr", float("inf")), "--lr: must be a finite number, got inf"),
    ("positive", ("--lr", "nan"), "--lr: must be a finite number > 0, got nan"),
    ("positive", ("--lr", 0), "--lr: must be > 0, got 0"),
    ("positive_int", ("--batch", 0), "--batch: must be >= 1, got 0"),
    ("integer", ("--num", 2.5), "--num: expected an integer, got 2.5"),
    ("seed", ("--seed", 2**63), "--seed: seeds must stay within 0 .. 2\\*\\*63 - 1, got"),
    ("seed", ("--seed", -1), "--seed: must be >= 0, got -1"),
])
def test_validate_messages(fn, args, message):
    from neon_cli import validate

    with pytest.raises(UsageError, match="^" + message):
        getattr(validate, fn)(*args)


def test_validate_accepts():
    from neon_cli import validate

    assert validate.finite("--w", "-0.5", low=-1, low_open=True) == -0.5
    assert validate.seed("--seed", 2**63 - 10, count=10) == 2**63 - 10
    with pytest.raises(UsageError, match="with 11 consecutive seeds"):
        validate.seed("--seed", 2**63 - 10, count=11)
