"""Checkpoint garbage collection (workers/gc.py, `alignd gc`) on real folders and a real registry: it frees the old
versions and half-written temporary folders, and keeps every folder that is current, a parent, the SFT base, pinned,
among the newest, or held by an API process; a published cycle runs it by itself (ALIGND_GC_KEEP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from store import keys, registry
from tests.utils.tiny import tiny_model, tiny_sft_model, tiny_tokenizer
from tests.workers.helpers import env_for, make_settings, seed_feedback, tiny_overrides
from training.checkpoint import verify_checkpoint
from workers import gc
from workers.cycle import run_cycle
from workers.cycle_config import CycleConfig
from workers.publish import checkpoint_path, publish_version


def _publish(r, settings, source: str, parent: int | None) -> int:
    model, tok = tiny_model(n_layer=1, d_model=16, n_head=1), tiny_tokenizer()
    save = lambda d: (model.save_pretrained(d), tok.save_pretrained(d))  # noqa: E731
    return publish_version(r, settings, save, {"source": source, "parent": parent, "metrics": {}})


def _home(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    parent = None
    for i in range(8):  # v1 the SFT base, v2..v8 trained on each other
        parent = _publish(r, settings, "sft" if i == 0 else "ppo", parent)
    registry.set_current(r, 7, expected=8, event="rollback")  # v8: newest, rolled back; v7 current, v6 its parent
    registry.update_version(r, 3, pinned=True)
    registry.note_serving(r, "api-host:123", [4, 7])  # an API process still draining v4
    old_tmp = settings.checkpoints_dir / ".tmp-v9-killed"
    new_tmp = settings.checkpoints_dir / ".tmp-v9-writing"
    for tmp in (old_tmp, new_tmp):
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)
    os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))
    return settings, old_tmp, new_tmp


def test_gc_deletes_only_what_nothing_needs(r, redis_url, tmp_path):
    settings, old_tmp, new_tmp = _home(r, redis_url, tmp_path)
    dry = gc.plan(r, settings, keep=1)
    assert sorted(dry.deleted_versions) == [2, 5] and old_tmp in dry.delete and new_tmp not in dry.delete
    assert checkpoint_path(settings, 2).is_dir()  # a plan touches nothing
    done = gc.collect(r, settings, keep=1)
    assert done.bytes > 0
    for v in (2, 5):
        assert not checkpoint_path(settings, v).exists() and registry.get_version(r, v)["gc_deleted"]
    for v in (1, 3, 4, 6, 7, 8):
        verify_checkpoint(checkpoint_path(settings, v))  # intact, every byte
    assert not old_tmp.exists() and new_tmp.is_dir()
    reasons = {k.rsplit("/", 1)[-1]: why for k, why in done.keep.items()}
    assert reasons == {
        "v1": "sft version",
        "v3": "pinned",
        "v4": "served by api-host:123",
        "v6": "parent of the current version",
        "v7": "current",
        "v8": "among the newest 1",
    }
    assert gc.collect(r, settings, keep=1).delete == []  # idempotent


def test_alignd_gc_command(r, redis_url, tmp_path):
    settings, old_tmp, _ = _home(r, redis_url, tmp_path)
    cmd = [sys.executable, "-m", "alignd.cli", "gc", "--keep", "2", "--json"]
    dry = subprocess.run([*cmd, "--dry-run"], env=env_for(settings), capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] and sorted(planned["deleted_versions"]) == [2, 5] and old_tmp.exists()
    done = subprocess.run(cmd, env=env_for(settings), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["deleted_versions"] == planned["deleted_versions"]
    assert not checkpoint_path(settings, 5).exists() and checkpoint_path(settings, 7).is_dir()


def test_a_published_cycle_collects_with_keep_n_and_spares_every_protected_version(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url, gc_keep=1)
    model, tok = tiny_sft_model("gpt2", seed=0, steps=30), tiny_tokenizer()
    save = lambda d: (model.save_pretrained(d), tok.save_pretrained(d))  # noqa: E731
    parent = None
    for i in range(6):  # v1 the SFT base; v2..v6 each trained on the one before (the same weights will do)
        meta = {"source": "sft" if i == 0 else "ppo", "parent": parent, "metrics": {}, "reward_version": None}
        parent = publish_version(r, settings, save, meta)
    registry.update_version(r, 3, pinned=True)
    registry.note_serving(r, "api-host:9", [5, 6])  # an API process still draining v5
    seed_feedback(r, 12)
    report = run_cycle(r, settings, CycleConfig.from_dict(tiny_overrides()))
    assert report["status"] == "published" and report["version"] == 7
    # newest 1 = v7 (current), v6 its parent, v1 SFT, v3 pinned, v5 served: only v2 and v4 go
    assert report["gc"]["keep"] == 1 and sorted(report["gc"]["deleted_versions"]) == [2, 4]
    assert report["gc"]["bytes"] > 0
    for v in (2, 4):
        assert not checkpoint_path(settings, v).exists() and registry.get_version(r, v)["gc_deleted"]
    for v in (1, 3, 5, 6, 7):
        verify_checkpoint(checkpoint_path(settings, v))
    rm = registry.get_reward_version(r, registry.current_reward_version(r))
    verify_checkpoint(settings.checkpoint(rm["path"]))  # the current reward model too


def test_automatic_gc_is_off_at_keep_0_and_its_failure_is_logged_not_raised(r, redis_url, tmp_path, caplog):
    settings, old_tmp, _ = _home(r, redis_url, tmp_path)
    assert gc.after_publish(r, settings.model_copy(update={"gc_keep": 0})) is None
    assert old_tmp.exists() and checkpoint_path(settings, 2).is_dir()  # keep 0: nothing collected
    r.hset(keys.registry_versions(), "9", "{not json")  # a registry gc cannot read
    assert gc.after_publish(r, settings) is None
    assert "automatic checkpoint GC (keep 5) failed" in caplog.text
    assert checkpoint_path(settings, 2).is_dir()  # nothing deleted on a failed plan


def test_gc_never_touches_a_folder_a_rewritten_registry_points_outside_the_root(r, redis_url, tmp_path):
    settings, _, _ = _home(r, redis_url, tmp_path)
    victim = tmp_path / "victim" / "precious"  # a folder of someone else's
    victim.mkdir(parents=True)
    (victim / "model.safetensors").write_bytes(b"y" * 100)
    meta = registry.get_version(r, 2)
    r.hset(keys.registry_versions(), "2", json.dumps({**meta, "path": str(victim)}))
    meta5 = registry.get_version(r, 5)
    r.hset(keys.registry_versions(), "5", json.dumps({**meta5, "path": "/etc"}))
    done = gc.collect(r, settings, keep=1)
    assert victim.is_dir() and (victim / "model.safetensors").read_bytes() == b"y" * 100
    assert set(done.refused) == {str(victim), "/etc"} and 2 not in done.deleted_versions
    assert all(str(p).startswith(str(settings.checkpoints_dir)) for p in done.delete)
