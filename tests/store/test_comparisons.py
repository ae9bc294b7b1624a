"""store/comparisons.py: how each feedback type becomes comparisons and rated responses."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from core.records import Comparison, Rated
from store import feedback as fb
from store.comparisons import all_comparisons, comparisons_for_events, derive, rank_pairs
from store.completions import ChoiceRecord, CompletionRecord, save_completion
from store.stats import feedback_stats

BODY = TypeAdapter(fb.FeedbackIn)
LIMITS = fb.FeedbackLimits(per_minute=10_000, per_day=100_000, max_comment_chars=100)
COMPARISON_FIELDS = {"prompt", "chosen", "rejected", "label", "margin", "group", "source", "annotator", "meta"}
RATED_FIELDS = {"prompt", "response", "good", "group", "source", "annotator", "meta"}


def record(cid: str, n: int, versions: list[int] | None = None, user: str = "alice") -> CompletionRecord:
    versions = versions or list(range(n, 0, -1))
    return CompletionRecord(
        id=cid,
        user=user,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q {cid}"}],
        choices=[ChoiceRecord(index=i, text=f"a{i}", finish_reason="stop", version=versions[i]) for i in range(n)],
        version=max(versions),
    )


def vote(rec: CompletionRecord, body: dict, user: str = "alice", fid: str = "f") -> fb.FeedbackEvent:
    """An accepted event as the store logs it, built without Redis (for fast property tests)."""
    event = fb.prepare(
        BODY.validate_python({"completion_id": rec.id, **body}), user=user, max_comment_chars=100, now=time.time()
    )
    versions = [c.version for c in sorted(rec.choices, key=lambda c: c.index)]
    return fb.FeedbackEvent(
        **(event | {"id": fid, "revision": 1, "version": rec.version, "choice_versions": versions})
    )


def submit(r, rec: CompletionRecord, body: dict, user: str = "alice") -> fb.Accepted:
    return fb.submit_feedback(
        r, BODY.validate_python({"completion_id": rec.id, **body}), user=user, limits=LIMITS, is_admin=user == "admin"
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=8).flatmap(lambda k: st.permutations(list(range(k)))))
def test_rank_of_k_gives_all_pairs_each_consistent_with_the_ranking(ranking):
    k = len(ranking)
    rec = record("c", k)
    comparisons, rated = derive(rec, [vote(rec, {"type": "rank", "ranking": ranking})])
    position = {choice: p for p, choice in enumerate(ranking)}
    text_to_index = {c.text: c.index for c in rec.choices}
    assert len(comparisons) == k * (k - 1) // 2 and rated == []
    seen = set()
    for c in comparisons:
        better, worse = text_to_index[c.chosen], text_to_index[c.rejected]
        assert position[better] < position[worse]
        assert c.margin == position[worse] - position[better] - 1
        assert c.label == "pref" and c.group == "c" and (worse, better) not in seen
        assert (c.meta["chosen_version"], c.meta["rejected_version"]) == (
            rec.choices[better].version,
            rec.choices[worse].version,
        )
        seen.add((better, worse))
    wins = {i: sum(1 for b, _ in seen if b == i) for i in range(k)}  # a total order: k-1, k-2, …, 0 wins
    assert sorted(wins, key=wins.get, reverse=True) == list(ranking)


@given(st.permutations(list(range(5))))
def test_rank_pairs_distance_is_the_position_gap(ranking):
    for better, worse, distance in rank_pairs(ranking):
        assert ranking.index(worse) - ranking.index(better) == distance > 0


def test_pairwise_winner_tie_and_both_bad():
    rec = record("c", 2, versions=[5, 4])
    (win,), _ = derive(rec, [vote(rec, {"type": "pairwise", "winner": 1}, fid="w")])
    assert (win.chosen, win.rejected, win.label, win.margin) == ("a1", "a0", "pref", 0.0)
    assert win.prompt == rec.messages and win.source == "w" and win.annotator == "alice"
    assert win.meta | {} == {
        "completion_id": "c",
        "type": "pairwise",
        "chosen_index": 1,
        "rejected_index": 0,
        "chosen_version": 4,
        "rejected_version": 5,
    }
    for label in ("tie", "both_bad"):
        (c,), rated = derive(rec, [vote(rec, {"type": "pairwise", "winner": label})])
        assert c.label == label and {c.chosen, c.rejected} == {"a0", "a1"} and rated == []


def test_identical_texts_are_a_tie_whatever_the_vote_ordered():
    rec = record("twins", 3)
    rec.choices[2].text = rec.choices[0].text  # a confident policy sampled the same answer twice
    comparisons, _ = derive(rec, [vote(rec, {"type": "rank", "ranking": [2, 1, 0]})])
    by_pair = {(c.meta["chosen_index"], c.meta["rejected_index"]): c for c in comparisons}
    assert by_pair[(2, 0)].label == "tie" and by_pair[(2, 0)].margin == 0
    assert by_pair[(2, 1)].label == by_pair[(1, 0)].label == "pref" and by_pair[(2, 1)].margin == 0
    (pair,), _ = derive(rec, [vote(rec, {"type": "pairwise", "winner": 0})])
    assert pair.label == "pref"  # a0 and a1 differ
    rec2 = record("twins2", 2)
    rec2.choices[1].text = rec2.choices[0].text
    (pair,), _ = derive(rec2, [vote(rec2, {"type": "pairwise", "winner": 1})])
    assert pair.label == "tie"


def test_thumbs_pair_up_with_down_per_user_and_unpaired_thumbs_are_rated():
    rec = record("c", 3)
    votes = [
        vote(rec, {"type": "thumbs", "choice": 0, "value": "up"}, fid="u0"),
        vote(rec, {"type": "thumbs", "choice": 1, "value": "down"}, fid="d1"),
        vote(rec, {"type": "thumbs", "choice": 2, "value": "down"}, fid="d2"),
        vote(rec, {"type": "thumbs", "choice": 2, "value": "up"}, user="admin", fid="u2"),
    ]
    comparisons, rated = derive(rec, votes)
    assert sorted((c.chosen, c.rejected, c.source) for c in comparisons) == [
        ("a0", "a1", "u0,d1"),
        ("a0", "a2", "u0,d2"),
    ]
    assert [(s.response, s.good, s.annotator, s.meta["version"]) for s in rated] == [
        ("a2", True, "admin", rec.choices[2].version)
    ]
    assert all(isinstance(c, Comparison) and set(c.stored()) == COMPARISON_FIELDS for c in comparisons)
    assert all(isinstance(s, Rated) and set(s.stored()) == RATED_FIELDS for s in rated)


def test_only_latest_votes_count_and_events_batches_skip_superseded_ones(r):
    rec = record("c", 2)
    save_completion(r, rec)
    first = submit(r, rec, {"type": "pairwise", "winner": 0}).event
    up = submit(r, rec, {"type": "thumbs", "choice": 0, "value": "up"}).event
    consumed = fb.read_new(r, "w", 10)
    assert {e.id for e in consumed} == {first.id, up.id}
    fb.ack(r, consumed)
    second = submit(r, rec, {"type": "pairwise", "winner": 1}).event
    down = submit(r, rec, {"type": "thumbs", "choice": 1, "value": "down"}).event
    new = fb.read_new(r, "w", 10)
    comparisons, rated = comparisons_for_events(r, new + [first])  # `first` was revised: it gives nothing
    assert sorted((c.chosen, c.rejected, c.source) for c in comparisons) == [
        ("a0", "a1", f"{up.id},{down.id}"),
        ("a1", "a0", second.id),
    ]  # the new thumb pairs with the older one
    assert rated == []
    everything, rated = all_comparisons(r)
    assert sorted(c.source for c in everything) == sorted([second.id, f"{up.id},{down.id}"]) and rated == []


def test_all_comparisons_carry_provenance_and_versions_for_arena(r):
    arena = record("arena", 2, versions=[7, 6])
    ranked = record("ranked", 3)
    for rec in (arena, ranked):
        save_completion(r, rec)
    submit(r, arena, {"type": "pairwise", "winner": 0})
    submit(r, ranked, {"type": "rank", "ranking": [1, 2, 0]}, user="admin")
    submit(r, ranked, {"type": "thumbs", "choice": 0, "value": "down"})
    comparisons, rated = all_comparisons(r)
    assert len(comparisons) == 1 + 3 and len(rated) == 1
    for c in comparisons:
        assert c.source and c.annotator in ("alice", "admin") and c.group in ("arena", "ranked")
        assert isinstance(c.meta["chosen_version"], int) and isinstance(c.meta["rejected_version"], int)
    wins = [c for c in comparisons if c.group == "arena"]
    assert (wins[0].meta["chosen_version"], wins[0].meta["rejected_version"]) == (7, 6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(min_value=2, max_value=5).flatmap(
        lambda k: st.tuples(
            st.permutations(list(range(k))),
            st.lists(st.integers(1, 3), min_size=k, max_size=k),
            st.sampled_from([0, 1, "tie", "both_bad"]),
        )
    )
)
def test_arena_counters_of_the_script_agree_with_the_derived_comparisons(r, case):
    ranking, versions, winner = case
    r.flushdb()
    ranked, pair = record("ranked", len(ranking), versions), record("pair", 2, versions[:2])
    for rec in (ranked, pair):
        save_completion(r, rec)
    submit(r, ranked, {"type": "rank", "ranking": ranking})
    submit(r, pair, {"type": "pairwise", "winner": winner})
    expected: dict[str, dict[str, int]] = {}
    for c in all_comparisons(r)[0]:
        a, b = c.meta["chosen_version"], c.meta["rejected_version"]
        if a == b:
            continue
        counts = expected.setdefault(f"{max(a, b)}_vs_{min(a, b)}", {"wins": 0, "losses": 0, "ties": 0})
        counts["ties" if c.label != "pref" else "wins" if a > b else "losses"] += 1
    got = {p: {k: v[k] for k in ("wins", "losses", "ties")} for p, v in feedback_stats(r)["pairs"].items()}
    assert got == expected
