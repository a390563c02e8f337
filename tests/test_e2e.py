"""``neon demo`` end to end on the digits family: the paper's protocol and its report.

It checks the paper's central claim on real data: theta_r - w (theta_s - theta_r) with w chosen by
the metric beats theta_r on disjoint seeds (paper Alg. 1; Table 1's direction of change). The
installed console script's pipeline (synth, finetune, tune-w, merge, eval from a shell) is run by
``tests/test_readme.py`` on the README's own commands.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner


@pytest.mark.slow
def test_demo_reports_the_required_results(tmp_path):
    """The paper's protocol: S at the base's own best gamma, Neon against the base at its default
    and at its best gamma and against the same budget on real data, on disjoint seeds."""
    from neon_cli.commands import app

    rep = tmp_path / "demo.json"
    res = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "d"), "--num-synthetic", "1000", "--budget", "8192",
                                   "--num-samples", "300", "--confirm-samples", "600", "--report", str(rep), "-q"])
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())["results"]
    assert r["num_synthetic"] == 1000 and r["budget_fraction"] == pytest.approx(8192 / 2**20)
    steps = r["steps"]
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
    ft = json.loads((tmp_path / "d" / "ft" / "finetune.json").read_text())
    ctl = json.loads((tmp_path / "d" / "control" / "ft" / "finetune.json").read_text())
    assert ctl["budget_images"] == ft["budget_images"] and ctl["config"] == ft["config"]
    assert r["control"][m] > 0 and r["num_real"] == 1000
    tuned = steps["tune-w"]["results"]
    assert tuned["confirmation"]["seeds"][0] == 10_000_000 + 300  # disjoint from the search seeds
    assert (tmp_path / "d" / "neon.safetensors").exists() == bool(r["paths"]["neon"])
    out = " ".join(res.stdout.split())
    assert "than the base at its best γ" in out and "real images" in out and "Neon w" in out
    assert "│ fd_digits" in res.stdout and "Neon fd_digits" in out and not re.search(r"\bfid\b", out)
