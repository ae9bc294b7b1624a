"""The loop through a real Celery worker process: feedback over HTTP → POST /admin/train → a cycle on the worker →
the new version served (system_fingerprint); and kill -9 of the worker mid-cycle loses and reuses nothing."""

from __future__ import annotations

import json
import signal

import pytest

from service.app import create_app
from service.engine import Engine
from service.loader import load_version
from store import feedback as fb
from store import keys, registry
from tests.conftest import LiveServer
from tests.workers.helpers import (
    ADMIN_KEY,
    celery_client,
    chat,
    make_settings,
    publish_tiny,
    seed_feedback,
    start_worker,
    stop,
    wait_for,
    write_cycle_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def home(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    write_cycle_config(settings.home)
    publish_tiny(r, settings)
    return settings


def _result(redis_url: str, task_id: str, timeout: float) -> dict:
    client = celery_client(redis_url, backend=True)
    try:
        return client.AsyncResult(task_id).get(timeout=timeout)
    finally:
        client.close()


def test_feedback_to_a_new_served_version_through_the_worker(r, redis_url, home, tmp_path):
    worker = start_worker(home, tmp_path / "worker.log")
    engine = Engine(load_version(r, home, 1), max_batch_size=8)
    try:
        with LiveServer(create_app(home, redis_url, engine)) as server:
            alice, admin = server.client("sk-test-alice"), server.client(ADMIN_KEY)
            for i in range(12):
                resp = chat(alice, f"What is {i % 10} plus {i // 3}?", n=2, temperature=1.0, seed=i)
                assert resp.status_code == 200 and resp.json()["system_fingerprint"] == "alignd-v1"
                fb_resp = alice.post(
                    "/v1/feedback", json={"completion_id": resp.json()["id"], "type": "pairwise", "winner": i % 2}
                )
                assert fb_resp.status_code == 201, fb_resp.text
            wait_for(lambda: r.get("alignd:train:config_schema"), 60, what="the worker's config schema")
            typo = admin.post("/admin/train", json={"overrides": {"ppo.nonsense": 1}})  # checked before enqueuing
            assert typo.status_code == 422 and "ppo.nonsense" in typo.json()["error"]["message"]
            queued = admin.post("/admin/train", json={"overrides": {"seed": 0}})
            assert queued.status_code == 202, queued.text
            report = _result(redis_url, queued.json()["task_id"], timeout=180)
            assert report["status"] == "published" and report["version"] == 2, report
            wait_for(lambda: chat(alice).json()["system_fingerprint"] == "alignd-v2", 30, what="v2 served")
            listing = admin.get("/admin/versions").json()
            v2 = next(v for v in listing["data"] if v["version"] == 2)
            assert listing["current"] == 2 and v2["status"] == "current"
            assert v2["feedback"]["events"] == 12 and v2["annotators"] == {"alice": 12}
            assert v2["reward_version"] == listing["reward"]["current"] == 1
            assert fb.unconsumed_count(r) == 0
    finally:
        stop(worker)


def test_kill_9_mid_cycle_loses_nothing_and_uses_nothing_twice(r, redis_url, home, tmp_path):
    seed_feedback(r, 10)
    worker = start_worker(home, tmp_path / "worker1.log")
    sender = celery_client(redis_url)
    slow = {"update.steps": 100_000, "update.seconds": 600.0}  # the cycle sits in PPO until it is killed
    try:
        sender.send_task("alignd.train_cycle", kwargs={"overrides": slow}, queue="train")
        # in PPO: the events are taken (in flight) and the new reward model is registered
        wait_for(
            lambda: r.hlen(keys.train_inflight()) == 1 and registry.current_reward_version(r),
            120,
            what="the cycle to reach PPO",
        )
    finally:
        stop(worker, signal.SIGKILL)  # the whole worker, parent and pool child, at once
    assert registry.current_version(r) == 1 and [m["version"] for m in registry.list_versions(r)] == [1]
    assert not (home.checkpoints_dir / "v2").exists()  # no partial version anywhere
    assert fb.unconsumed_count(r) == 10 and fb.pending_count(r) == 10  # pending, not lost

    seed_feedback(r, 2, seed=7)
    # the dead worker's lock expires after its TTL (3 s here); a cycle sent before that answers "busy"
    wait_for(lambda: not r.exists(keys.lock("train")), 30, what="the dead worker's lock to expire")
    worker = start_worker(home, tmp_path / "worker2.log")
    try:
        task = sender.send_task("alignd.train_cycle", queue="train")
        report = _result(redis_url, task.id, timeout=180)
    finally:
        stop(worker)
        sender.close()
    assert report["status"] == "published" and report["version"] == 2, report
    assert report["recovered"] == {"acked": 0, "released": 10}
    assert registry.get_version(r, 2)["feedback"]["events"] == 12  # the 10 reclaimed + the 2 new, each once
    assert fb.unconsumed_count(r) == 0 and fb.pending_count(r) == 0
    assert json.loads(r.get(keys.ppo_state()))["version"] == 2
