"""Issue 12 for tune-w and demo: outputs never touch inputs, the cache is locked, every number is
refused by name, the cache key names everything that determines a value, and every rank takes
rank 0's cache decision."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from neon_cli.errors import UsageError
from neon_cli.report import Report
from neon_cli.tune import EvalCache, run_tune_w
from tune_fakes import fam  # noqa: F401


def _run(fam, **kw):
    kw.setdefault("num_samples", 16)
    kw.setdefault("max_evals", 4)
    return run_tune_w("fake-tune", fam.paths["base"], [fam.paths["good"]], report=Report("t", argv=[]), **kw)


# ------------------------------------------------------------------------------------------------
# 12.1 / 12.3: outputs against inputs, locks
# ------------------------------------------------------------------------------------------------


def test_outputs_that_are_inputs_are_refused_before_any_work(fam, tmp_path):
    base, good = fam.paths["base"], fam.paths["good"]
    before = {p: p.read_bytes() for p in (base, good)}
    link = tmp_path / "hard.safetensors"
    os.link(base, link)
    (tmp_path / "det.pt").write_bytes(b"detector")
    cases = [
        (dict(cache=base), r"--cache: .*base.safetensors is also the input --base"),
        (dict(cache=tmp_path / "." / "ft" / ".." / "ft" / good.name), "--cache: .* is also the input --selftrained"),
        (dict(plot=link), "--plot: .* is also the input --base"),
        (dict(report_path=good), "--report: .* is also the input --selftrained"),
        (dict(output=tmp_path / "det.pt", detector=tmp_path / "det.pt"), "-o: .* is also the input --detector"),
        (dict(output=tmp_path / "o.safetensors", cache=tmp_path / "o.safetensors"), "is also the output of"),
    ]
    for kw, msg in cases:
        with pytest.raises(UsageError, match=msg):
            _run(fam, **kw)
    assert fam.sample_calls == 0
    assert all(p.read_bytes() == b for p, b in before.items())
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_cache_on_the_base_exit_2_base_unchanged(fam):
    base = fam.paths["base"]
    before = base.read_bytes()
    from neon_cli.commands import app

    r = CliRunner().invoke(app, ["tune-w", "fake-tune", "--base", str(base), "--selftrained", str(fam.paths["good"]),
                                 "--cache", str(base), "-q"])
    assert r.exit_code == 2 and "--cache" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert base.read_bytes() == before


def test_a_second_run_on_the_same_cache_or_output_is_refused(fam, tmp_path):
    from neon_cli.fsutil import exclusive_lock

    cache, out = tmp_path / "c.jsonl", tmp_path / "o.safetensors"
    with exclusive_lock(cache, "--cache"):  # another run holds it
        with pytest.raises(UsageError, match="--cache: .* is being written by another neon run"):
            _run(fam, cache=cache)
    with exclusive_lock(out, "-o"):
        with pytest.raises(UsageError, match="-o: .* is being written by another neon run"):
            _run(fam, output=out)
    assert fam.sample_calls == 0
    _run(fam, cache=cache, output=out)  # released: runs
    assert out.exists() and cache.exists()


# ------------------------------------------------------------------------------------------------
# 12.8: the cache key
# ------------------------------------------------------------------------------------------------


def test_cache_key_names_the_detector_and_reference_statistics(fam, tmp_path, monkeypatch):
    cache = tmp_path / "c.jsonl"
    a, b, a2 = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "copy-of-a.pt"
    a.write_bytes(b"detector A")
    b.write_bytes(b"detector B")
    a2.write_bytes(b"detector A")
    first = _run(fam, cache=cache, detector=a)
    assert first["n_cached"] == 0
    calls = fam.sample_calls
    other = _run(fam, cache=cache, detector=b)  # another detector: other numbers, measured again
    assert other["n_cached"] == 0 and fam.sample_calls > calls
    calls = fam.sample_calls
    same = _run(fam, cache=cache, detector=a2)  # same contents elsewhere: the same numbers
    assert same["n_cached"] == same["n_evals"] and fam.sample_calls == calls
    monkeypatch.setenv("NEON_INCEPTION", str(b))  # from the environment, not the flag: still in the key
    env = _run(fam, cache=cache)
    assert env["n_cached"] == env["n_evals"] and fam.sample_calls == calls
    refs = tmp_path / "ref.npz"
    refs.write_bytes(b"mu sigma")
    more = _run(fam, cache=cache, ref_stats=refs)
    assert more["n_cached"] == 0
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    assert {k["scoring"]["detector"] for k in keys} == {
        __import__("hashlib").sha256(x).hexdigest() for x in (b"detector A", b"detector B")}


def test_cache_key_has_the_batch_unless_the_family_is_batch_invariant(fam, tmp_path, monkeypatch):
    cache = tmp_path / "c.jsonl"
    _run(fam, cache=cache, batch=8)
    again = _run(fam, cache=cache, batch=16)  # images may depend on the batch: measured again
    assert again["n_cached"] == 0 and all(json.loads(x)["key"]["batch"] in (8, 16) for x in cache.read_text().splitlines())
    monkeypatch.setattr(type(fam), "batch_invariant", True, raising=False)
    cache2 = tmp_path / "c2.jsonl"
    _run(fam, cache=cache2, batch=8)
    inv = _run(fam, cache=cache2, batch=16)
    assert inv["n_cached"] == inv["n_evals"]
    assert all("batch" not in json.loads(x)["key"] for x in cache2.read_text().splitlines())


def test_cache_key_has_the_metric_version_and_a_record_without_the_metric_is_a_miss(fam, tmp_path, monkeypatch):
    cache = tmp_path / "c.jsonl"
    first = _run(fam, cache=cache)
    monkeypatch.setattr(type(fam), "metrics_version", "2", raising=False)
    second = _run(fam, cache=cache)  # the metric's definition changed: nothing reused
    assert second["n_cached"] == 0
    # records that lack the requested metric (e.g. written by a version that did not report it)
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    for rec in lines:
        rec["metrics"].pop("recall")
    cache.write_text("".join(json.dumps(r) + "\n" for r in lines))
    res = _run(fam, cache=cache, metric="recall")  # no KeyError: measured again
    assert res["n_cached"] == 0 and res["chosen"]["metrics"]["recall"] > 0
    dist = _run(fam, cache=cache)  # the records still serve the metric they hold
    assert dist["n_cached"] == dist["n_evals"] and dist["chosen"]["value"] == second["chosen"]["value"]
    store = EvalCache(cache)
    key = lines[0]["key"]
    assert store.get(key, "dist") is not None and store.get(key, "nope") is None


def test_digits_is_batch_invariant_bit_for_bit(digits):
    """The capability digits declares (its cache keys omit the batch) holds: same images whatever the batch."""
    from neon_cli.evaluate import sample_batched, seed_plan
    from neon_cli.family import resolve_settings

    assert digits.batch_invariant is True and digits.metrics_version
    model = digits.load(digits.default_model)
    settings = resolve_settings(digits, ["steps=3", "guidance=1.5"])
    seeds, labels = seed_plan(digits, 123, 60)
    a = sample_batched(digits, model, seeds, labels, settings, 60)
    b = sample_batched(digits, model, seeds, labels, settings, 7)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# 12.9: every rank takes rank 0's cache decision
# ------------------------------------------------------------------------------------------------


def test_non_zero_ranks_neither_read_nor_write_the_cache_and_follow_rank_0(fam, tmp_path, monkeypatch):
    """Rank 1 of a multi-node run whose cache is not on a shared file system: its local file holds
    hits rank 0 does not have. It must not read them (it would skip the sampling collectives rank 0
    enters) and must take rank 0's decision, broadcast."""
    import neon_cli.dist as dist
    from neon_cli.tune.scorer import Scorer

    cache = tmp_path / "local.jsonl"
    reference = _run(fam, cache=cache)  # a full local cache on "rank 1"'s disk
    size = cache.stat().st_size
    decisions = []

    def broadcast(obj, src=0):  # rank 0 (another node) says: miss, for every candidate
        decisions.append(obj)
        # cache decision, then the metrics and their jackknife replicates
        return None if len(decisions) % 2 else ({"dist": 0.5, "recall": 0.6}, {})

    monkeypatch.setattr(dist, "is_main", lambda: False)
    monkeypatch.setattr(dist, "broadcast_object", broadcast)
    seen_keys = []
    real_measure = Scorer._measure

    def measure(self, who, w, overrides, ev, key):
        seen_keys.append(key)
        return real_measure(self, who, w, overrides, ev, key)

    monkeypatch.setattr(Scorer, "_measure", measure)
    calls = fam.sample_calls
    res = _run(fam, cache=cache, require_improvement=False)  # (constant metrics: nothing beats the base)
    assert res["n_cached"] == 0 and res["cache"]["records"] == res["n_evals"]  # rank 0's miss, taken
    assert reference["n_cached"] == 0 and fam.sample_calls - calls == res["n_evals"]  # it sampled (joined the collectives) each time
    assert decisions[0::2] == [None] * len(seen_keys)  # it offered nothing from its own file
    assert cache.stat().st_size == size  # and appended nothing


def test_non_zero_ranks_take_rank_0_hits(fam, tmp_path, monkeypatch):
    import neon_cli.dist as dist

    monkeypatch.setattr(dist, "is_main", lambda: False)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: {"metrics": {"dist": 0.25, "recall": 0.5}, "seconds": 1.0})
    res = _run(fam, cache=tmp_path / "absent-here.jsonl", require_improvement=False)  # rank 0 has every record; this node has no file
    assert res["n_cached"] == res["n_evals"] and fam.sample_calls == 0
    assert not (tmp_path / "absent-here.jsonl").exists()


# ------------------------------------------------------------------------------------------------
# 12.5: numbers refused by name (tune-w and demo)
# ------------------------------------------------------------------------------------------------

TUNE_BAD = [
    (["--bounds", "nan", "1"], "--bounds"), (["--bounds", "0", "inf"], "--bounds"),
    (["--gamma", "1", "nan"], "--gamma"), (["--base-gamma", "inf", "2"], "--base-gamma"),
    (["--xtol", "0"], "--xtol"), (["--xtol", "nan"], "--xtol"), (["--max-evals", "0"], "--max-evals"),
    (["--rounds", "0"], "--rounds"), (["--refine", "-1"], "--refine"), (["--num-samples", "1"], "--num-samples"),
    (["--num-samples", "-5"], "--num-samples"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"), (["--seed", str(2**63 - 10)], "--seed"),
    (["--confirm-samples", "-1"], "--confirm-samples"), (["--confirm-samples", "1"], "--confirm-samples"),
    (["--batch", "0"], "--batch"),
    (["--abandon-margin", "nan"], "--abandon-margin"), (["--abandon-margin", "-0.1"], "--abandon-margin"),
    (["--plot-points", "-2"], "--plot-points"), (["--control-samples", "0"], "--control-samples"),
]


@pytest.mark.parametrize("args,flag", TUNE_BAD)
def test_tune_w_bad_numbers_exit_2_naming_the_flag(fam, args, flag):
    from neon_cli.commands import app

    r = CliRunner().invoke(app, ["tune-w", "fake-tune", "--base", str(fam.paths["base"]), "--selftrained",
                                 str(fam.paths["good"]), *args, "-q"])
    assert r.exit_code == 2, r.output
    assert flag in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert fam.sample_calls == 0


DEMO_BAD = [
    (["--num-synthetic", "0"], "--num-synthetic"), (["--budget", "0"], "--budget"),
    (["--budget-fraction", "nan"], "--budget-fraction"), (["--budget-fraction", "-1"], "--budget-fraction"),
    (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"), (["--gamma", "nan", "2"], "--gamma"),
    (["--gamma", "3", "2"], "--gamma"), (["--num-samples", "1"], "--num-samples"),
    (["--confirm-samples", "1"], "--confirm-samples"), (["--seed", str(2**64)], "--seed"),
    (["--max-evals", "0"], "--max-evals"), (["--max-evals", "3"], "--max-evals"),
]


@pytest.mark.parametrize("args,flag", DEMO_BAD)
def test_demo_bad_numbers_exit_2_naming_the_flag(tmp_path, args, flag):
    from neon_cli.commands import app

    r = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "d"), *args, "-q"])
    assert r.exit_code == 2, r.output
    assert flag in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_demo_output_folder_holding_the_base_is_refused(tmp_path, digits):
    from neon_cli.commands import app

    d = tmp_path / "d"
    d.mkdir()
    base = d / "neon.safetensors"  # the demo would write its Neon model over it
    base.write_bytes(open(digits.default_model, "rb").read())
    r = CliRunner().invoke(app, ["demo", "-o", str(d), "--base", str(base), "-q"])
    assert r.exit_code == 2 and "--base" in r.stderr
    assert base.read_bytes() == open(digits.default_model, "rb").read()
