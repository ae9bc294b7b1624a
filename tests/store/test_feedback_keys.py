"""Per-key bounds of store/feedback.py against a real redis-server: no `user` value escapes the key's totals, its
daily annotator cap or its one arena vote per completion; a completion requested for a named user is that user's."""

from __future__ import annotations

import pytest

from store import feedback as fb
from store.stats import feedback_stats
from tests.store.test_feedback import NOW, add_completion, snapshot, submit

KEYED = fb.FeedbackLimits(
    per_minute=1000, per_day=10_000, max_comment_chars=50, key_per_minute=5, key_per_day=8, key_annotators=3
)


def test_rotating_user_values_cannot_exceed_the_key_totals(r):
    add_completion(r, "c", n=1)
    accepted = refused = 0
    for i in range(20):  # a new invented person each time: every per-person counter is fresh
        try:
            submit(r, {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up"}, limits=KEYED)
            submit(r, {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up", "user": f"p{i}"},
                   limits=KEYED)  # fmt: skip
            accepted += 2
        except fb.FeedbackRateLimited as exc:
            assert "of this key" in exc.message
            refused += 1
    assert accepted <= KEYED.key_per_minute + 1 and refused > 0
    total_in_minute = feedback_stats(r)["events"]["total"]
    assert total_in_minute == KEYED.key_per_minute
    later = NOW + 120  # a later minute of the same day: the daily total still holds
    n_day = total_in_minute
    for _ in range(20):
        try:
            submit(r, {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "down"}, limits=KEYED, now=later)
            n_day += 1
        except fb.FeedbackRateLimited:
            break
    assert n_day == KEYED.key_per_day


def test_one_key_votes_as_a_bounded_number_of_people_per_day(r):
    add_completion(r, "c", n=1)
    for i in range(3):
        submit(r, {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up", "user": f"p{i}"},
               limits=KEYED)  # fmt: skip
    before = snapshot(r)
    with pytest.raises(fb.FeedbackRateLimited, match="distinct `user` values"):
        submit(r, {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up", "user": "p9"}, limits=KEYED)
    assert snapshot(r) == before  # refused: nothing written
    # a known person of the key goes on; a trusted annotation tool has no annotator cap
    submit(r, {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "down", "user": "p1"}, limits=KEYED)
    submit(r, {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up", "user": "p9"}, limits=KEYED,
           trusted=True)  # fmt: skip


def test_invented_users_of_one_key_hold_one_arena_vote_per_completion(r):
    add_completion(r, "a", n=2, versions=[2, 1])
    for i in range(30):  # 30 invented people all say the new version lost
        submit(r, {"completion_id": "a", "type": "pairwise", "winner": 1, "user": f"fake{i}"})
    assert feedback_stats(r)["pairs"]["2_vs_1"]["losses"] == 1
    submit(r, {"completion_id": "a", "type": "pairwise", "winner": 0, "user": "fake3"})  # the key's latest vote wins
    pair = feedback_stats(r)["pairs"]["2_vs_1"]
    assert (pair["wins"], pair["losses"]) == (1, 0)
    # another key, and a trusted tool's people, count apart
    add_completion(r, "b", n=2, versions=[2, 1], user="bob")
    submit(r, {"completion_id": "b", "type": "pairwise", "winner": 1}, user="bob")
    add_completion(r, "t", n=2, versions=[1, 2], user="tool")
    for i in range(3):
        submit(r, {"completion_id": "t", "type": "pairwise", "winner": 1, "user": f"rater{i}"}, user="tool",
               trusted=True)  # fmt: skip
    pair = feedback_stats(r)["pairs"]["2_vs_1"]
    assert (pair["wins"], pair["losses"]) == (4, 1)


def test_a_completion_for_a_named_user_is_that_users_to_vote_on(r):
    record = add_completion(r, "c", n=1)
    record.params["client_user"] = "carol"
    from store.completions import save_completion

    save_completion(r, record)
    body = {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up"}
    for other in (None, "dave"):
        with pytest.raises(fb.NotYourCompletion, match="same `user`"):
            submit(r, body | ({"user": other} if other else {}))
    assert submit(r, body | {"user": "carol"}).event.user == "alice/carol"
    assert submit(r, body | {"user": "dave"}, trusted=True).event.user == "alice/dave"
    assert submit(r, body | {"user": "erin"}, user="admin", is_admin=True).event.user == "erin"
