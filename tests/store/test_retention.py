"""Retention against a real redis-server: completions expire unless voted on, feedback records expire after their
window, and the feedback log is trimmed only where training has settled it."""

from __future__ import annotations

from store import feedback as fb
from store import keys, retention
from store.completions import save_completion
from tests.store.test_feedback import LIMITS, NOW, add_completion, submit

TTL = fb.FeedbackLimits(per_minute=1000, per_day=10_000, max_comment_chars=50, records_ttl_s=3600)


def test_a_completion_expires_unless_it_gets_a_vote(r):
    for cid in ("quiet", "voted"):
        record = add_completion(r, cid, n=1)
        save_completion(r, record, ttl_s=600)
        assert 0 < r.ttl(keys.completion(cid)) <= 600
    accepted = submit(r, {"completion_id": "voted", "type": "thumbs", "choice": 0, "value": "up"}, limits=TTL)
    assert r.ttl(keys.completion("voted")) == -1 and 0 < r.ttl(keys.completion("quiet")) <= 600
    assert 0 < r.ttl(keys.feedback_idempotency(accepted.event.id)) <= 3600
    assert 0 < r.ttl(keys.feedback_history("voted", "thumbs:0", "alice")) <= 3600
    assert r.ttl(keys.feedback_latest("voted")) == -1  # the latest vote is training data: kept


def _ids(r) -> list[str]:
    return [i for i, _ in r.xrange(keys.feedback_stream())]


def test_the_log_is_trimmed_up_to_the_first_unsettled_entry_only(r):
    add_completion(r, "c", n=1)
    for i in range(10):
        submit(r, {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up", "user": f"u{i}"})
    assert retention.trim_settled_feedback(r, keep_s=0) == 0  # never read: nothing settled
    ids = _ids(r)
    taken = fb.read_new(r, "w1", 6)  # 6 delivered: 0-5 pending, 6-9 never delivered
    fb.ack(r, [taken[0], taken[1], taken[3]])  # 0, 1, 3 settled; 2 is still held by a cycle
    before = fb.unconsumed_count(r)
    assert retention.trim_settled_feedback(r, keep_s=0) == 2
    assert _ids(r) == ids[2:] and fb.unconsumed_count(r) == before == 7
    assert retention.trim_settled_feedback(r, keep_s=3600, now=NOW) == 0  # too young: kept for a day by default
    fb.ack(r, taken)
    assert retention.trim_settled_feedback(r, keep_s=0) == 4  # up to the first never-delivered entry
    assert _ids(r) == ids[6:] and fb.unconsumed_count(r) == 4
    rest = fb.read_new(r, "w1", 10)
    assert [e.stream_id for e in rest] == ids[6:]  # the consumer group goes on where it was
    fb.ack(r, rest)
    assert retention.trim_settled_feedback(r, keep_s=0) == 4 and fb.unconsumed_count(r) == 0
    submit(r, {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "down"}, limits=LIMITS)
    assert fb.unconsumed_count(r) == 1 and len(fb.read_new(r, "w1", 10)) == 1
