"""Shared fixtures. The third-party test family under tests/fixtures/toyfam is put on sys.path
(and PYTHONPATH for subprocesses) so that it is discovered through its own dist-info entry point,
exactly like an installed plugin distribution."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

TOYFAM = Path(__file__).resolve().parent / "fixtures" / "toyfam"
#: third-party checkpoints kept beside the checkout, never in it (see that folder's README)
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real"
#: set (to 1) by .ci/run: a missing SHARED_FIXTURES then fails the tests that need it instead of skipping them
REQUIRE_FIXTURES = "NEON_REQUIRE_FIXTURES"


def shared_fixture(*parts: str) -> Path:
    """The path of a third-party fixture under ``../shared/fixtures/real/`` (beside the checkout).

    When the file is absent the calling test is skipped with a reason naming the folder, or fails
    when ``$NEON_REQUIRE_FIXTURES`` is set (CI sets it, so these tests always run there)."""
    path = SHARED_FIXTURES.joinpath(*parts)
    if not path.exists():
        why = (f"needs the third-party fixture {path} (the folder {SHARED_FIXTURES} beside the checkout "
               f"is absent or incomplete)")
        if os.environ.get(REQUIRE_FIXTURES, "") not in ("", "0"):
            pytest.fail(f"{why}; ${REQUIRE_FIXTURES} is set, so it must be there", pytrace=False)
        pytest.skip(why)
    return path


@pytest.fixture
def real_fixture():
    """``real_fixture("torchcfm-2d", "x.pt")``: :func:`shared_fixture` for a test (skip or fail when absent)."""
    return shared_fixture


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch):
    monkeypatch.delenv("NEON_FAMILIES", raising=False)
    monkeypatch.delenv("NEON_DEBUG", raising=False)
    monkeypatch.delenv("NEON_INCEPTION", raising=False)
    monkeypatch.delenv("NEON_REF_STATS", raising=False)
    monkeypatch.delenv("NEON_LOG_FORMAT", raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: they run fastest single-threaded and do not
    fight other jobs for the 2 cores."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def toyfam(monkeypatch):
    """The toy third-party family made discoverable; yields the family object."""
    monkeypatch.syspath_prepend(str(TOYFAM))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TOYFAM), os.environ.get("PYTHONPATH", "")]))
    importlib.invalidate_caches()
    import neon_toyfam

    yield neon_toyfam.family
    sys.modules.pop("neon_toyfam", None)


@pytest.fixture
def toy_base(toyfam, tmp_path):
    """A toy theta_r checkpoint: mu = 0.5, sigma = exp(-1.5) (its samples are too narrow at temperature 0.8)."""
    path = tmp_path / "toy-base.safetensors"
    toyfam.save(toyfam.new(), str(path), {"train_images": "1000"})
    return path


@pytest.fixture(scope="session")
def digits():
    from neon_cli.family import get_family

    return get_family("digits")
