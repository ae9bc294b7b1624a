"""Two deployments on one Redis database (ALIGND_KEY_PREFIX): a real Celery worker of one runs a training task, and
afterwards no key of the database lies outside the two prefixes (Celery's queues, bindings and results included),
neither deployment sees the other's registry or feedback, and the worker never takes the other's task."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import celery
import pytest

from core.config import get_settings
from store import feedback, keys, registry
from tests.workers.helpers import (
    ROOT,
    env_for,
    make_settings,
    publish_tiny,
    seed_feedback,
    start_worker,
    stop,
    wait_for,
)

pytestmark = pytest.mark.slow

PREFIXES = ("dep-a", "dep-b")


@contextlib.contextmanager
def deployment(monkeypatch, prefix: str):
    """This test process acting as the deployment `prefix` (its settings read ALIGND_KEY_PREFIX like any process)."""
    monkeypatch.setenv("ALIGND_KEY_PREFIX", prefix)
    get_settings.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv("ALIGND_KEY_PREFIX")
        get_settings.cache_clear()


def _enqueue(settings, prefix: str) -> str:
    """`alignd train cycle --enqueue`, the operator's way to send a cycle, as deployment `prefix`."""
    cmd = [sys.executable, "-m", "alignd.cli", "train", "cycle", "--enqueue", "--min-events", "1000", "--json"]
    env = env_for(settings, ALIGND_KEY_PREFIX=prefix)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["task_id"]


def test_two_prefixes_share_a_redis_database_and_nothing_else(r, redis_url, tmp_path, monkeypatch):
    a = make_settings(tmp_path / "a", redis_url)
    b = make_settings(tmp_path / "b", redis_url)
    with deployment(monkeypatch, "dep-a"):
        publish_tiny(r, a)
        seed_feedback(r, 3)
        assert registry.current_version(r) == 1 and feedback.unconsumed_count(r) == 3
    with deployment(monkeypatch, "dep-b"):
        assert registry.current_version(r) is None and registry.list_versions(r) == []
        assert feedback.unconsumed_count(r) == 0 and r.xlen(keys.feedback_stream()) == 0
        publish_tiny(r, b, seed=1)
        assert registry.version_path(b, r, 1).is_relative_to(b.home)

    worker = start_worker(a, tmp_path / "worker.log", ALIGND_KEY_PREFIX="dep-a")
    try:
        wait_for(lambda: r.exists("dep-a:train:config_schema"), 90, what="worker A ready")
        task_b = _enqueue(b, "dep-b")  # nobody works for B: its message must wait in B's queue
        task_a = _enqueue(a, "dep-a")
        reader = celery.Celery(
            broker=redis_url,
            backend=redis_url,
            broker_transport_options={"global_keyprefix": "dep-a:celery:"},
            result_backend_transport_options={"global_keyprefix": "dep-a:celery:"},
        )
        try:
            result = reader.AsyncResult(task_a).get(timeout=120)
        finally:
            reader.close()
        assert result["status"] == "skipped" and "3 new feedback events" in result["reason"], result
        assert json.loads(r.get(f"dep-a:task:result:{task_a}"))["status"] == "skipped"
        assert r.llen("dep-b:celery:train") == 1 and task_b in r.lindex("dep-b:celery:train", 0)
        assert not r.exists(f"dep-b:task:result:{task_b}")
    finally:
        stop(worker)

    everything = sorted(r.scan_iter(count=1000))
    assert any(k.startswith("dep-a:celery:") for k in everything)  # Celery wrote keys, under A's prefix
    outside = [k for k in everything if not k.startswith(tuple(f"{p}:" for p in PREFIXES))]
    assert outside == [], f"keys outside both prefixes: {outside}"
    with deployment(monkeypatch, "dep-b"):
        assert feedback.unconsumed_count(r) == 0 and registry.current_version(r) == 1
        assert registry.get_version(r, 1)["path"] == "v1" and not r.exists(keys.train_inflight())


def test_a_prefix_with_spaces_or_glob_characters_is_refused():
    from pydantic import ValidationError

    from core.config import Settings

    for bad in ("", "my app", "alignd*", "a?b", "[x]"):
        with pytest.raises(ValidationError, match="ALIGND_KEY_PREFIX"):
            Settings(key_prefix=bad)
    assert Settings(key_prefix="team-7.alignd").key_prefix == "team-7.alignd"
