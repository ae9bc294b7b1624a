"""Acknowledged feedback survives `kill -9` of the embedded redis-server (AOF with appendfsync always)."""

from __future__ import annotations

import os
import signal

import pytest
from pydantic import TypeAdapter

from core.redis_server import EmbeddedRedis
from store import feedback as fb
from store import keys
from store.client import connect
from store.comparisons import all_comparisons
from store.completions import ChoiceRecord, CompletionRecord, save_completion

BODY = TypeAdapter(fb.FeedbackIn)
LIMITS = fb.FeedbackLimits(per_minute=100_000, per_day=1_000_000, max_comment_chars=100)
N_EVENTS = 300


def test_acknowledged_feedback_survives_sigkill_of_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    r = connect(url)
    try:
        for c in range(10):
            save_completion(
                r,
                CompletionRecord(
                    id=f"c{c}",
                    user="alice",
                    version=1,
                    messages=[{"role": "user", "content": f"q{c}"}],
                    choices=[ChoiceRecord(index=i, text=f"a{i}", finish_reason="stop", version=1) for i in range(3)],
                ),
            )
        accepted = []
        for i in range(N_EVENTS):
            kind = ("thumbs", "rank")[i % 2]
            body = (
                {"type": "thumbs", "choice": i % 3, "value": ("up", "down")[i % 2]}
                if kind == "thumbs"
                else {"type": "rank", "ranking": [i % 3, (i + 1) % 3, (i + 2) % 3]}
            )
            accepted.append(
                fb.submit_feedback(
                    r,
                    BODY.validate_python({"completion_id": f"c{i % 10}", "feedback_id": f"d-{i}", **body}),
                    user="alice",
                    limits=LIMITS,
                )
            )
        consumed = fb.read_new(r, "w", 50)
        fb.ack(r, consumed[:20])
        comparisons_before = all_comparisons(r)
        port = server.port
        os.kill(server.process.pid, signal.SIGKILL)  # no shutdown, no final fsync: only what was acknowledged
        server.process.wait()
    finally:
        r.close()

    restarted = EmbeddedRedis(tmp_path / "redis", port=port)
    r = connect(restarted.start())
    try:
        logged = {fb.FeedbackEvent.model_validate_json(f["event"]).id for _, f in r.xrange(keys.feedback_stream())}
        assert logged == {a.event.id for a in accepted}
        assert r.xlen(keys.feedback_stream()) == N_EVENTS
        assert all_comparisons(r) == comparisons_before
        assert fb.pending_count(r) == 30 and fb.unconsumed_count(r) == N_EVENTS - 20
        assert int(r.hget(keys.feedback_stats("events"), "total")) == N_EVENTS
        # idempotency records survived too: a retry after the crash adds nothing
        retry = fb.submit_feedback(
            r,
            BODY.validate_python(
                {"completion_id": "c0", "feedback_id": "d-0", "type": "thumbs", "choice": 0, "value": "up"}
            ),
            user="alice",
            limits=LIMITS,
        )
        assert retry.replayed and r.xlen(keys.feedback_stream()) == N_EVENTS
    finally:
        r.close()
        restarted.stop()


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_production_refuses_a_redis_that_evicts_keys(r, policy):
    from store.client import durability_warnings, warn_if_not_durable

    assert warn_if_not_durable(r, production=True) == []  # the test Redis: AOF always, noeviction
    r.config_set("maxmemory-policy", policy)
    try:
        assert any("maxmemory-policy" in p for p in durability_warnings(r))
        assert warn_if_not_durable(r) != []  # development: a warning only
        with pytest.raises(RuntimeError, match="maxmemory-policy"):
            warn_if_not_durable(r, production=True)
    finally:
        r.config_set("maxmemory-policy", "noeviction")
