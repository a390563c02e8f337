"""``neon finetune --recipe``: the recipes' numbers against the Neon paper's scripts
(SinaAlemohammad/Neon: edm/run_cifar10.sh, edm/run_ffhq.sh, VAR/*/run_var_imagenet_*.sh,
xAR/run_xarb.sh, xAR/run_xarl.sh, imm/configs/im256.yaml), the warm-up forms and the short-budget
warning. The families' end-to-end runs with a recipe are in test_edm_family / test_var_family."""

from __future__ import annotations

import pytest

from neon_cli.errors import UsageError
from neon_cli.family import get_family
from neon_cli.finetune import _default_warmup, recipe_plan, short_budget_warnings
from neon_cli.train import TrainConfig


def test_paper_recipes_are_the_scripts_numbers():
    edm, var, xar = get_family("edm"), get_family("var"), get_family("xar")
    name, train, st = recipe_plan(edm, "paper-cifar10", None)
    assert (train["lr"], train["batch"], train["warmup_images"], train["ema_halflife_images"]) == (1e-4, 512, 10_000_000, 500_000)
    assert st == {"precond": "edm", "augment": 0.12, "dropout": 0.13}
    _, train, st = recipe_plan(edm, "paper-ffhq", None)
    assert (train["lr"], train["batch"]) == (4e-6, 256) and st == {"precond": "edm", "augment": 0.15, "dropout": 0.05}
    assert recipe_plan(edm, "default", None) == ("default", dict(edm.train_defaults), {})
    _, train, st = recipe_plan(var, "paper-d36", None)
    assert (train["lr"], train["batch"], train["warmup_images"]) == (1e-6, 24, "budget") and st == {"fp16": 1, "twd": 0.0}
    assert recipe_plan(var, "paper-d16", None)[1:] == ({**var.train_defaults}, {"fp16": 1, "twd": 0.0})  # AdamW ran with wd 0
    imm = get_family("imm")  # im256.yaml: lr 1e-6 with no ramp, batch 512, EMA beta 0.9999 per step of 512
    _, train, _ = recipe_plan(imm, "paper", None)
    assert (train["lr"], train["batch"], train["warmup_images"]) == (1e-6, 512, 0)
    assert 0.5 ** (512 / train["ema_halflife_images"]) == pytest.approx(0.9999, abs=1e-9)
    _, train, _ = recipe_plan(xar, "paper-b", None)
    # 256 = --batch_size 32 x 8 GPUs; lr = blr * 256 / 256; EMA 0.9999 per step: half-life 256 ln 0.5 / ln 0.9999 images
    assert (train["lr"], train["batch"], train["warmup_images"]) == (1e-6, 256, "epochs:250")
    assert 0.5 ** (256 / train["ema_halflife_images"]) == pytest.approx(0.9999, abs=1e-9)
    assert recipe_plan(xar, "paper-l", None)[1]["warmup_images"] == "epochs:10000"
    with pytest.raises(UsageError, match=r"--recipe paper-x: family 'xar' has no such recipe \(known: default, paper-b, paper-l\)"):
        recipe_plan(xar, "paper-x", None)
    with pytest.raises(UsageError, match="--recipe paper: family 'digits' has no such recipe"):
        recipe_plan(get_family("digits"), "paper", None)


def test_warmup_forms_and_short_budget_warning():
    assert _default_warmup("epochs:250", 10**9, 30_000) == 7_500_000  # xAR-B: 250 passes over |S| = 30k
    assert _default_warmup("budget", 1234) == 1234 and _default_warmup(5000, 1234) == 5000 and _default_warmup(None, 9) == 0
    cfg = TrainConfig(budget=999_999, lr=1e-4, batch=512, warmup=10_000_000, ema_halflife=500_000)
    (msg,) = short_budget_warnings(cfg, "paper-cifar10")  # 10% of the 10 M-image ramp is 1 M; the EMA is covered
    assert msg.startswith("--budget 999999 is 10.00% of recipe 'paper-cifar10''s lr warm-up (10000000 images)")
    cfg.budget = 1_000_000
    assert short_budget_warnings(cfg, "x") == []
    cfg.budget, cfg.warmup = 49_999, 0
    assert "EMA half-life (500000 images)" in short_budget_warnings(cfg, "x")[0]


def test_checkout_provenance_is_gits_commit_and_dirty_state(tmp_path):
    import subprocess

    from neon_cli.repo import git_state

    assert git_state(tmp_path) == {"path": str(tmp_path), "commit": None, "dirty": None, "toplevel": None}  # not a work tree
    repo = tmp_path / "edm"
    (repo / "training").mkdir(parents=True)
    (repo / "training" / "loss.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(repo) == {"path": str(repo), "commit": head, "dirty": False, "toplevel": str(repo.resolve())}
    (repo / "training" / "loss.py").write_text("x = 2\n")
    assert git_state(repo)["dirty"] is True and git_state(repo / "training")["commit"] == head


def test_mismatch_lines_name_class_loss_settings_and_kwargs():
    from neon_cli.mismatch import compare

    r = {"class": "IMMPrecond", "init_kwargs": {"T": 0.994, "dropout": 0.0}, "loss": "IMMLoss", "loss_state": {"a": 2, "k": 12}}
    assert compare(r, dict(r)) == [] and compare(r, None) == []
    s = {**r, "init_kwargs": {"T": 0.99, "dropout": 0.1}, "loss_state": {"a": 1, "k": 12}}
    assert compare(r, s) == ["training loss settings differ (IMMLoss): a 2 vs 1",
                             "network configuration (init_kwargs) differs: T 0.994 vs 0.99"]  # dropout is training-only
    assert compare(r, {**r, "loss": "EDMLoss"}) == ["training loss differs: theta_r's loss_fn is IMMLoss, theta_s's is EDMLoss"]
