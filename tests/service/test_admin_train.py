"""POST /admin/train checks its overrides against the keys the workers published, before enqueuing anything."""

from __future__ import annotations

import pytest

from core.config import Settings
from service.app import create_app
from store import registry
from store.train_config import publish_schema
from tests.conftest import LiveServer

SCHEMA = {"max_events": 10_000, "seed": 0, "ppo.lr": 1e-5, "ppo.epochs": 2, "gate.min_reward_gain": 0.0,
          "eval.suites": [], "update.seconds": None}  # fmt: skip


@pytest.fixture
def admin(tmp_path, redis_url, r):
    settings = Settings(home=tmp_path, api_keys="ka:alice", admin_key="kadmin")
    with LiveServer(create_app(settings, redis_url)) as live, live.client("kadmin") as http:
        yield http


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"ppo.nonsense": 1}, "unknown key 'ppo.nonsense'"),
        ({"ppo": {"lr": "fast"}}, "ppo.lr='fast'"),
        ({"gate.min_reward_gain": -1.0}, "not a tuning field"),
        ({"eval": {"suites": ["/etc/graders.jsonl"]}}, "not a tuning field"),
    ],
)
def test_bad_or_unsafe_overrides_are_422_and_nothing_is_enqueued(admin, r, overrides, words):
    publish_schema(r, SCHEMA)
    before = r.dbsize()
    answer = admin.post("/admin/train", json={"overrides": overrides})
    assert answer.status_code == 422, answer.text
    err = answer.json()["error"]
    assert err["code"] == "invalid_overrides" and words in err["message"] and "ppo.lr" in err["message"]
    assert r.dbsize() == before  # no task message, no event


def test_unsafe_overrides_need_the_flag_and_are_recorded(admin, r):
    publish_schema(r, SCHEMA)
    answer = admin.post("/admin/train", json={"overrides": {"gate.min_reward_gain": -1.0}, "unsafe": True})
    assert answer.status_code == 202 and "overrides_checked" not in answer.json()
    event = registry.find_events(r, event="unsafe_overrides")[-1]
    assert event["keys"] == ["gate.min_reward_gain"]
    assert admin.post("/admin/train", json={"overrides": {"ppo": {"lr": 3e-5}}}).status_code == 202
