"""workers/tasks.py run in-process (Celery's `apply`): idempotent by task id, deliveries capped, beat's trigger."""

from __future__ import annotations

import json

import pytest

from core.config import get_settings
from store import keys, registry
from tests.workers.helpers import env_for, make_settings, publish_tiny, seed_feedback, write_cycle_config


@pytest.fixture
def tasks(r, redis_url, tmp_path, monkeypatch):
    settings = make_settings(tmp_path / "home", redis_url)
    for k, v in env_for(settings, ALIGND_MIN_NEW_FEEDBACK="5").items():
        if k.startswith("ALIGND_"):
            monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    from workers import tasks as module

    monkeypatch.setattr(module.app.conf, "broker_url", redis_url)  # the module may have been imported before
    write_cycle_config(settings.home)
    publish_tiny(r, settings)
    yield module
    get_settings.cache_clear()


def test_a_redelivered_task_returns_its_result_instead_of_training_again(r, tasks):
    seed_feedback(r, 8)
    first = tasks.train_cycle.apply(kwargs={"trigger": "test"}, task_id="task-a").get()
    assert first["status"] == "published" and first["version"] == 2 and first["attempts"] == 1
    seed_feedback(r, 8, seed=1)  # new work exists, but a redelivery of task-a must not consume it
    again = tasks.train_cycle.apply(kwargs={"trigger": "test"}, task_id="task-a").get()
    assert again == first
    assert registry.current_version(r) == 2 and int(r.get(keys.task_attempts("task-a"))) == 1


def test_deliveries_past_the_cap_are_abandoned_and_recorded(r, tasks):
    seed_feedback(r, 8)
    cap = tasks.app.conf.alignd_max_deliveries
    r.set(keys.task_attempts("task-b"), cap)  # it has lost its worker `cap` times already
    out = tasks.train_cycle.apply(task_id="task-b").get()
    assert out["status"] == "abandoned" and out["attempts"] == cap + 1
    assert registry.find_events(r, event="cycle_abandoned", task="task-b")
    assert registry.current_version(r) == 1


def test_beat_enqueues_one_cycle_only_when_enough_feedback_waits(r, tasks):
    seed_feedback(r, 4)
    assert tasks.maybe_train.apply().get()["status"] == "waiting"  # ALIGND_MIN_NEW_FEEDBACK=5
    seed_feedback(r, 1, seed=3)
    out = tasks.maybe_train.apply().get()
    assert out["status"] == "enqueued" and r.exists(keys.train_queued())
    assert tasks.maybe_train.apply().get()["status"] == "queued"  # no second cycle while one waits
    message = json.loads(r.lindex(keys.celery_prefix() + "train", 0))  # waiting on the broker's train queue
    assert message["headers"]["task"] == "alignd.train_cycle" and message["headers"]["id"] == out["task_id"]
