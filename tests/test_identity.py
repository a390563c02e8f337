"""Identity by content (issue 22, item 7): resume, caches and "same run" checks compare content
hashes, never paths. A moved project folder, a byte-identical base at another path (the embedded
default reached through another install), or a VAE setting moved elsewhere resumes cleanly."""

from __future__ import annotations

import hashlib
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from neon_cli.errors import DataError, UsageError
from neon_cli.family import Setting
from neon_cli.finetune import finetune
from neon_cli.fsutil import sha256_file
from neon_cli.identity import content_settings, family_content_settings, setting_hashes, synthetic_set_sha256
from neon_cli.report import Report
from neon_cli.synth import synthesize
from neon_cli.tune.cache import evaluation_key


def _synth(out, model, pairs=()):
    synthesize("toy", model, num=40, out_dir=out, shard_size=16, batch=8, set_pairs=list(pairs), report=Report("synth"))


def _ft(base, S, out, budget):
    return finetune("toy", base, S, budget=budget, lr=0.05, out_dir=out, batch=16, save_every=48, report=Report("finetune"))


def test_moved_project_and_base_copied_elsewhere_resume_cleanly(toyfam, toy_base, tmp_path):
    """The demo's failure: S made from the base at one path, finetune's state recording S; the
    same base reached at another path (pip install . then -e .) re-runs synth (which rewrites the
    manifest with the new path) and finetune must resume, not refuse 'another run'."""
    a = tmp_path / "a" / "base.safetensors"
    a.parent.mkdir()
    shutil.copy(toy_base, a)
    proj = tmp_path / "proj"
    _synth(proj / "S", a)
    short = _ft(a, proj / "S", proj / "ft", budget=48)
    assert [s["images_seen"] for s in short["snapshots"]] == [48]
    ident = synthetic_set_sha256(proj / "S")
    first = (proj / "ft" / "theta_s-000000048.safetensors").stat()

    moved = tmp_path / "elsewhere" / "proj"
    moved.parent.mkdir()
    shutil.move(str(proj), str(moved))
    b = tmp_path / "b" / "copy.safetensors"
    b.parent.mkdir()
    shutil.copy(a, b)
    a.unlink()  # the old path is gone altogether
    before = (moved / "S" / "manifest.json").read_bytes()
    _synth(moved / "S", b)  # every shard present: nothing sampled, the manifest now names b
    after = (moved / "S" / "manifest.json").read_bytes()
    assert before != after and str(b).encode() in after  # the file changed, its identity did not
    assert synthetic_set_sha256(moved / "S") == ident
    longer = _ft(b, moved / "S", moved / "ft", budget=144)
    assert [s["images_seen"] for s in longer["snapshots"]] == [48, 96, 144]
    assert (moved / "ft" / "theta_s-000000048.safetensors").stat().st_mtime_ns == first.st_mtime_ns  # resumed, not re-made

    direct = _ft(b, moved / "S", tmp_path / "direct", budget=144)  # an uninterrupted run: the same weights
    x, y = load_file(longer["final"]), load_file(direct["final"])
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    md = json.loads((moved / "ft" / "finetune.json").read_text())
    assert md["synthetic_set"]["sha256"] == ident


def test_another_set_is_still_another_run(toyfam, toy_base, tmp_path):
    _synth(tmp_path / "S", toy_base)
    _synth(tmp_path / "S2", toy_base, pairs=["temperature=1.0"])
    assert synthetic_set_sha256(tmp_path / "S") != synthetic_set_sha256(tmp_path / "S2")
    _ft(toy_base, tmp_path / "S", tmp_path / "ft", budget=48)
    with pytest.raises(UsageError, match=r"train_state\.pt: training state of another run: its synthetic_set_sha256"):
        _ft(toy_base, tmp_path / "S2", tmp_path / "ft", budget=96)


def test_a_state_of_an_older_neon_still_resumes(toyfam, toy_base, tmp_path):
    """Older neon recorded S as the sha256 of the manifest file's bytes."""
    S = tmp_path / "S"
    _synth(S, toy_base)
    _ft(toy_base, S, tmp_path / "ft", budget=48)
    f = tmp_path / "ft" / "train_state.pt"
    state = torch.load(f, weights_only=True)
    assert state["provenance"]["synthetic_set_sha256"] == synthetic_set_sha256(S)
    state["provenance"]["synthetic_set_sha256"] = sha256_file(S / "manifest.json")
    torch.save(state, f)
    res = _ft(toy_base, S, tmp_path / "ft", budget=96)
    assert [s["images_seen"] for s in res["snapshots"]] == [48, 96]
    state["provenance"]["synthetic_set_sha256"] = "0" * 64  # neither identity: refused
    torch.save(state, f)
    with pytest.raises(UsageError, match="another run"):
        _ft(toy_base, S, tmp_path / "ft", budget=144)


def test_synthetic_set_identity_is_the_manifest_without_paths(tmp_path):
    m = {"schema": "neon.synth/1", "model": {"path": "/x/base.pt", "sha256": "ab"}, "settings": {"vae": "/x/vae"},
         "settings_sha256": {"vae": "cd"}, "shards": [{"file": "shard-00000.safetensors", "sha256": "ef"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    want = {"schema": "neon.synth/1", "model": {"sha256": "ab"}, "settings": {"vae": "sha256:cd"},
            "shards": [{"file": "shard-00000.safetensors", "sha256": "ef"}]}
    canon = json.dumps(want, sort_keys=True, separators=(",", ":"))
    assert synthetic_set_sha256(tmp_path) == hashlib.sha256(canon.encode()).hexdigest()
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(DataError, match=r"manifest\.json: not a synthetic-set manifest"):
        synthetic_set_sha256(tmp_path)


def test_a_path_setting_is_known_by_its_content(tmp_path):
    """VAR's/xAR's/IMM's ``vae`` setting: a copy elsewhere is the same key; other bytes another."""
    fam = SimpleNamespace(settings=(Setting("vae", None, str), Setting("cfg", 1.5, float), Setting("mode", "x", str)))
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "w.bin").write_bytes(b"vae weights")
    shutil.copytree(tmp_path / "v1", tmp_path / "v2")
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "w.bin").write_bytes(b"other weights")
    one, two, three = ({"vae": str(tmp_path / v), "cfg": 2.0, "mode": "euler"} for v in ("v1", "v2", "v3"))
    assert set(setting_hashes(fam, one)) == {"vae"} and setting_hashes(fam, {"vae": None, "cfg": 2.0}) == {}
    assert family_content_settings(fam, one) == family_content_settings(fam, two) != family_content_settings(fam, three)
    assert family_content_settings(fam, one)["mode"] == "euler"  # a string that names no file stays as it is
    key = {"family": "f"}
    k1, k2 = (evaluation_key(key, model="m", selftrained="s", w=1.0, settings=family_content_settings(fam, s),
                             guidance="cfg", seed=0, num_samples=8) for s in (one, two))
    assert k1 == k2 and k1["settings"]["vae"].startswith("sha256:")
    assert content_settings({"vae": "/p", "cfg": 1}, {"vae": "ab"}) == {"vae": "sha256:ab", "cfg": 1}


def test_synth_plan_compares_a_path_setting_by_content(tmp_path, monkeypatch):
    """A synth run re-made with its VAE at another path is the same plan (no 'another settings')."""
    from neon_cli import synth as synth_mod
    from neon_cli.identity import manifest_identity

    old = {"family": "f", "settings": {"vae": "/old/vae"}, "settings_sha256": {"vae": "cd"}, "model": {"sha256": "m"}}
    new = {"family": "f", "settings": {"vae": "/new/vae"}, "settings_sha256": {"vae": "cd"}, "model": {"sha256": "m"}}
    assert manifest_identity(old) == manifest_identity(new)
    (tmp_path / "plan.json").write_text(json.dumps(old))
    (tmp_path / "shard-00000.safetensors").write_bytes(b"x")
    synth_mod._check_plan(tmp_path, new)  # no error
    other = {**new, "settings_sha256": {"vae": "ee"}}
    with pytest.raises(DataError, match="another settings"):
        synth_mod._check_plan(tmp_path, other)
    # a plan.json of an older neon (no settings_sha256): its settings as given, as before
    (tmp_path / "plan.json").write_text(json.dumps({k: v for k, v in old.items() if k != "settings_sha256"}))
    synth_mod._check_plan(tmp_path, {**new, "settings": {"vae": "/old/vae"}})
    with pytest.raises(DataError, match="another settings"):
        synth_mod._check_plan(tmp_path, new)
