"""store/feedback.py against a real redis-server: acceptance, idempotency, revisions, limits, the consumer group."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from store import feedback as fb
from store import keys
from store.completions import ChoiceRecord, CompletionRecord, save_completion

BODY = TypeAdapter(fb.FeedbackIn)
COMMENT = 'é "q" \\ \x00 🙂 "}'  # quotes, a backslash, NUL and an astral character go through the Lua splice
LIMITS = fb.FeedbackLimits(per_minute=1000, per_day=10_000, max_comment_chars=50)
SECONDS_INTO_MINUTE = 10
NOW = 1_700_000_000 // 60 * 60 + SECONDS_INTO_MINUTE + 0.25  # a fixed clock, hours from UTC midnight


def add_completion(
    r, cid: str, user: str = "alice", n: int = 2, versions: list[int] | None = None
) -> CompletionRecord:
    versions = versions or [1] * n
    record = CompletionRecord(
        id=cid,
        user=user,
        messages=[{"role": "user", "content": f"question {cid}"}],
        choices=[
            ChoiceRecord(index=i, text=f"answer {i} of {cid}", finish_reason="stop", version=versions[i])
            for i in range(n)
        ],
        version=max(versions),
    )
    save_completion(r, record)
    return record


def submit(r, body: dict, user: str = "alice", limits: fb.FeedbackLimits = LIMITS, now: float = NOW, **kw):
    return fb.submit_feedback(r, BODY.validate_python(body), user=user, limits=limits, now=now, **kw)


def snapshot(r) -> dict[str, bytes]:
    """Every key with its serialized value: equal snapshots mean nothing was written."""
    raw = r.connection_pool.connection_kwargs
    dump = r.__class__(  # DUMP needs a bytes client
        host=raw["host"],
        port=raw["port"],
        db=raw.get("db", 0),
        username=raw.get("username"),
        password=raw.get("password"),
    )
    try:
        return {k: dump.dump(k) for k in dump.keys("*")}
    finally:
        dump.close()


def test_each_type_is_logged_with_versions_and_revision_one(r):
    add_completion(r, "c2", n=2, versions=[4, 3])
    add_completion(r, "c3", n=3)
    a = submit(r, {"completion_id": "c2", "type": "thumbs", "choice": 1, "value": "down", "comment": COMMENT})
    b = submit(r, {"completion_id": "c2", "type": "pairwise", "winner": "both_bad"})
    c = submit(r, {"completion_id": "c3", "type": "rank", "ranking": [2, 0, 1], "feedback_id": "my.id:1"})
    assert [x.replayed for x in (a, b, c)] == [False, False, False]
    assert c.event.id == "my.id:1" and a.event.id.startswith("fb-")
    logged = [fb.FeedbackEvent.model_validate_json(f["event"]) for _, f in r.xrange(keys.feedback_stream())]
    assert [(e.type, e.revision) for e in logged] == [("thumbs", 1), ("pairwise", 1), ("rank", 1)]
    assert logged[0].comment == COMMENT and logged[0].choice_versions == [4, 3] and logged[0].value == "down"
    assert logged[1].winner == "both_bad" and logged[2].ranking == [2, 0, 1]
    assert a.response() == {
        "id": a.event.id,
        "object": "feedback",
        "completion_id": "c2",
        "type": "thumbs",
        "revision": 1,
        "created": int(NOW),
    }


def test_retry_with_same_feedback_id_gets_the_first_answer_and_adds_nothing(r):
    add_completion(r, "c1")
    body = {"completion_id": "c1", "type": "pairwise", "winner": 0, "feedback_id": "retry-1"}
    first = submit(r, body)
    before = snapshot(r)
    again = submit(r, body, now=NOW + 5)
    assert again.replayed and again.response() == first.response()
    assert snapshot(r) == before


def test_same_feedback_id_with_another_body_or_user_conflicts(r):
    add_completion(r, "c1")
    submit(r, {"completion_id": "c1", "type": "pairwise", "winner": 0, "feedback_id": "f1"})
    with pytest.raises(fb.FeedbackIdConflict):
        submit(r, {"completion_id": "c1", "type": "pairwise", "winner": 1, "feedback_id": "f1"})
    with pytest.raises(fb.FeedbackIdConflict):
        submit(
            r,
            {"completion_id": "c1", "type": "pairwise", "winner": 0, "feedback_id": "f1"},
            user="admin",
            is_admin=True,
        )


def test_a_second_vote_revises_the_first_and_history_is_kept(r):
    add_completion(r, "c1", versions=[2, 1])
    for winner in (0, "tie", 1):
        last = submit(r, {"completion_id": "c1", "type": "pairwise", "winner": winner})
    assert last.event.revision == 3
    latest = fb.latest_votes(r, "c1")
    assert [(v.winner, v.revision) for v in latest] == [(1, 3)]
    assert [v.winner for v in fb.vote_history(r, "c1", "pairwise", "alice")] == [0, "tie", 1]
    assert r.xlen(keys.feedback_stream()) == 3
    votes, events = r.hgetall(keys.feedback_stats("votes")), r.hgetall(keys.feedback_stats("events"))
    assert events["total"] == "3" and votes["total"] == "1"
    assert votes["arena:2_vs_1:loss"] == "1" and votes["arena:2_vs_1:win"] == "0" and votes["arena:2_vs_1:tie"] == "0"


def test_thumbs_on_two_choices_are_two_votes_and_a_thumb_on_the_same_choice_revises(r):
    add_completion(r, "c1")
    submit(r, {"completion_id": "c1", "type": "thumbs", "choice": 0, "value": "up"})
    submit(r, {"completion_id": "c1", "type": "thumbs", "choice": 1, "value": "down"})
    third = submit(r, {"completion_id": "c1", "type": "thumbs", "choice": 0, "value": "down"})
    assert third.event.revision == 2
    assert sorted((v.choice, v.value) for v in fb.latest_votes(r, "c1")) == [(0, "down"), (1, "down")]
    votes = r.hgetall(keys.feedback_stats("votes"))  # the revision moved its vote from up to down
    assert (votes["thumbs:1:up"], votes["thumbs:1:down"], votes["total"]) == ("0", "2", "2")


@pytest.mark.parametrize(
    "body, user, error, param",
    [
        (
            {"completion_id": "nope", "type": "thumbs", "choice": 0, "value": "up"},
            "alice",
            fb.CompletionNotFound,
            None,
        ),
        ({"completion_id": "c2", "type": "thumbs", "choice": 0, "value": "up"}, "bob", fb.NotYourCompletion, None),
        ({"completion_id": "c2", "type": "thumbs", "choice": 2, "value": "up"}, "alice", fb.InvalidFeedback, "choice"),
        ({"completion_id": "c3", "type": "pairwise", "winner": 0}, "alice", fb.InvalidFeedback, "type"),
        ({"completion_id": "c1", "type": "pairwise", "winner": 0}, "alice", fb.InvalidFeedback, "type"),
        ({"completion_id": "c1", "type": "rank", "ranking": [0, 0]}, "alice", fb.InvalidFeedback, "type"),
        ({"completion_id": "c3", "type": "rank", "ranking": [0, 1]}, "alice", fb.InvalidFeedback, "ranking"),
        ({"completion_id": "c3", "type": "rank", "ranking": [0, 1, 1]}, "alice", fb.InvalidFeedback, "ranking"),
        ({"completion_id": "c3", "type": "rank", "ranking": [0, 1, 3]}, "alice", fb.InvalidFeedback, "ranking"),
        (
            {"completion_id": "c2", "type": "pairwise", "winner": 0, "comment": "x" * 51},
            "alice",
            fb.InvalidFeedback,
            "comment",
        ),
    ],
)
def test_bad_feedback_is_refused_and_changes_nothing(r, body, user, error, param):
    for n in (1, 2, 3):
        add_completion(r, f"c{n}", n=n)
    before = snapshot(r)
    with pytest.raises(error) as exc:
        submit(r, body, user=user)
    assert snapshot(r) == before
    if param:
        assert exc.value.param == param


@pytest.mark.parametrize(
    "body",
    [
        {"completion_id": "c", "type": "thumbs", "choice": -1, "value": "up"},
        {"completion_id": "c", "type": "thumbs", "choice": True, "value": "up"},
        {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "meh"},
        {"completion_id": "c", "type": "pairwise", "winner": 2},
        {"completion_id": "c", "type": "pairwise", "winner": True},
        {"completion_id": "c", "type": "rank", "ranking": [1.0, 0]},
        {"completion_id": "c", "type": "stars", "value": 5},
        {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up", "feedback_id": "has space"},
        {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up", "feedback_id": "x" * 129},
        {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up", "surprise": 1},
    ],
)
def test_malformed_bodies_do_not_validate(body):
    with pytest.raises(ValidationError):
        BODY.validate_python(body)


def test_admin_may_vote_on_any_completion(r):
    add_completion(r, "c1", user="alice")
    accepted = submit(r, {"completion_id": "c1", "type": "pairwise", "winner": 1}, user="admin", is_admin=True)
    assert accepted.event.user == "admin"


def test_rate_limit_per_minute_counts_only_accepted_events(r):
    add_completion(r, "c1", n=3)
    limits = fb.FeedbackLimits(per_minute=3, per_day=100, max_comment_chars=10)
    with pytest.raises(fb.InvalidFeedback):  # refused requests do not use up the budget
        submit(r, {"completion_id": "c1", "type": "thumbs", "choice": 5, "value": "up"}, limits=limits)
    for i in range(3):
        submit(
            r,
            {"completion_id": "c1", "type": "thumbs", "choice": i, "value": "up", "feedback_id": f"m{i}"},
            limits=limits,
        )
    before = snapshot(r)
    with pytest.raises(fb.FeedbackRateLimited) as exc:
        submit(r, {"completion_id": "c1", "type": "thumbs", "choice": 0, "value": "down"}, limits=limits)
    assert exc.value.retry_after == 60 - SECONDS_INTO_MINUTE  # the rest of the window, rounded up
    assert snapshot(r) == before
    # a retry of an accepted event is still answered, and the next minute has a fresh budget
    assert submit(
        r, {"completion_id": "c1", "type": "thumbs", "choice": 0, "value": "up", "feedback_id": "m0"}, limits=limits
    ).replayed
    submit(r, {"completion_id": "c1", "type": "thumbs", "choice": 0, "value": "down"}, limits=limits, now=NOW + 60)
    with pytest.raises(fb.FeedbackRateLimited):
        submit(r, {"completion_id": "c1", "type": "thumbs", "choice": 0, "value": "up"}, user="alice", limits=limits)


def test_daily_cap_holds_across_minutes_and_resets_at_utc_midnight(r):
    add_completion(r, "c1")
    limits = fb.FeedbackLimits(per_minute=100, per_day=4, max_comment_chars=10)
    for minute in range(4):
        submit(
            r, {"completion_id": "c1", "type": "pairwise", "winner": minute % 2}, limits=limits, now=NOW + 60 * minute
        )
    with pytest.raises(fb.FeedbackRateLimited) as exc:
        submit(r, {"completion_id": "c1", "type": "pairwise", "winner": 0}, limits=limits, now=NOW + 600)
    assert "UTC" in exc.value.message and 0 < exc.value.retry_after <= 86_400
    next_day = (NOW // 86_400 + 1) * 86_400 + 5
    submit(r, {"completion_id": "c1", "type": "pairwise", "winner": 0}, limits=limits, now=next_day)
    assert r.xlen(keys.feedback_stream()) == 5


def test_consumer_group_delivers_once_reclaims_from_dead_consumers_and_counts(r):
    add_completion(r, "c1", n=3)
    for i in range(3):
        submit(r, {"completion_id": "c1", "type": "thumbs", "choice": i, "value": "up"})
    assert fb.unconsumed_count(r) == 3 and fb.pending_count(r) == 0
    dead = fb.read_new(r, "worker-a", 2)  # worker-a dies before acking
    assert [e.choice for e in dead] == [0, 1]
    live = fb.read_new(r, "worker-b", 10)
    assert [e.choice for e in live] == [2]  # entries pending elsewhere are not delivered twice while fresh
    assert fb.pending_count(r) == 3 and fb.unconsumed_count(r) == 3
    assert fb.ack(r, live) == 1
    reclaimed = fb.read_new(r, "worker-b", 10, claim_idle_ms=0)
    assert [e.stream_id for e in reclaimed] == [e.stream_id for e in dead]
    assert fb.ack(r, [e.stream_id for e in reclaimed]) == 2
    assert fb.ack(r, [e.stream_id for e in reclaimed]) == 0  # acking twice counts once
    assert fb.unconsumed_count(r) == 0 and fb.pending_count(r) == 0
    assert fb.read_new(r, "worker-b", 10, claim_idle_ms=0) == []
    submit(r, {"completion_id": "c1", "type": "rank", "ranking": [0, 1, 2]})
    assert fb.unconsumed_count(r) == 1


def test_unconsumed_count_agrees_with_the_group_state(r):
    add_completion(r, "c1", n=3)
    for i in range(7):
        submit(r, {"completion_id": "c1", "type": "thumbs", "choice": i % 3, "value": "up"})
    read = fb.read_new(r, "w", 4)
    fb.ack(r, read[:3])
    group = r.xinfo_groups(keys.feedback_stream())[0]
    undelivered = len(r.xrange(keys.feedback_stream(), min=f"({group['last-delivered-id']}", max="+"))
    assert fb.unconsumed_count(r) == undelivered + group["pending"] == 4


def test_every_refusal_status_of_the_script_has_its_own_error():
    """Each status ACCEPT_LUA can return maps to a named error; none falls through to another's (the daily cap)."""
    import re

    statuses = set(re.findall(r"return \{'(\w+)'", fb.ACCEPT_LUA)) - {"accepted", "replay"}
    expected = {
        "not_found": fb.CompletionNotFound,
        "forbidden": fb.NotYourCompletion,
        "bad_choice": fb.InvalidFeedback,
        "bad_pairwise": fb.InvalidFeedback,
        "bad_rank": fb.InvalidFeedback,
        "bad_ranking": fb.InvalidFeedback,
        "conflict": fb.FeedbackIdConflict,
        "rate_minute": fb.FeedbackRateLimited,
        "rate_day": fb.FeedbackRateLimited,
        "not_your_user": fb.NotYourCompletion,
        "key_minute": fb.FeedbackRateLimited,
        "key_day": fb.FeedbackRateLimited,
        "annotators": fb.FeedbackRateLimited,
    }
    assert statuses == set(expected)
    bodies = {
        "bad_choice": {"type": "thumbs", "choice": 3, "value": "up"},
        "bad_ranking": {"type": "rank", "ranking": [1, 1]},
    }
    for status in sorted(statuses):
        body = BODY.validate_python({"completion_id": "c", **bodies.get(status, {"type": "pairwise", "winner": 0})})
        with pytest.raises(fb.FeedbackError) as info:
            fb._outcome([status, 2], body, "fb-1", LIMITS, NOW)
        assert type(info.value) is expected[status], status
        if status == "rate_minute":
            assert "per minute" in info.value.message and info.value.retry_after == 60 - SECONDS_INTO_MINUTE
        elif status == "rate_day":
            assert "daily feedback cap" in info.value.message
        elif status == "key_minute":
            assert "of this key" in info.value.message and "per minute" in info.value.message
        elif status in ("key_day", "annotators"):
            assert "daily feedback cap of this key" in info.value.message
        else:
            assert "cap" not in info.value.message and "rate" not in info.value.message


def test_an_unknown_script_status_is_a_server_error_naming_it(r):
    """A Redis running another release's script (injected: one answering 'rate_week') is a server fault, not a 429."""
    add_completion(r, "c1")
    fb._scripts.setdefault(r, {})["accept"] = r.register_script("return {'rate_week', 3}")
    try:
        with pytest.raises(fb.FeedbackScriptError, match="unknown status 'rate_week'") as info:
            submit(r, {"completion_id": "c1", "type": "pairwise", "winner": 0})
    finally:
        fb._scripts[r].pop("accept")
    assert not isinstance(info.value, fb.FeedbackError)  # the API maps only FeedbackError to 4xx
    assert submit(r, {"completion_id": "c1", "type": "pairwise", "winner": 0}).event.revision == 1
