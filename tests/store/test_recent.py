"""Bounded reads of preference data (store/recent.py) against a real redis-server: the window is the most recent
votes' items, equal to the full scan when everything fits, and a cycle's data stage reads no more completions than
the window holds, however many are stored (counted by the server itself: INFO commandstats)."""

from __future__ import annotations

import json

from store import keys
from store.comparisons import all_comparisons, feedback_comparisons
from store.exchange import import_preferences
from store.recent import recent_feedback, window
from tests.store.test_exchange import seed
from tests.workers.helpers import seed_feedback
from workers import data as training_data


def _stored(items) -> list[str]:
    comparisons, rated = items
    return [json.dumps(x.stored(), sort_keys=True) for x in [*comparisons, *rated]]


def _calls(r, *commands: str) -> int:
    stats = r.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in commands)


def test_when_everything_fits_the_window_is_the_full_scan(r, tmp_path):
    seed(r)  # every kind of vote: 13 items on 5 completions
    path = tmp_path / "more.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
            )
            + "\n"
            for i in range(4)
        )
    )
    assert import_preferences(r, path)["imported"] == 4
    assert _stored(window(r, 10_000)) == _stored(all_comparisons(r))
    assert _stored(window(r, None)) == _stored(all_comparisons(r))
    assert _stored(recent_feedback(r, 10_000)) == _stored(feedback_comparisons(r))
    n_feedback = len(_stored(feedback_comparisons(r)))
    # the imports fill what the feedback leaves: the most recent two of four
    partial = window(r, n_feedback + 2)
    assert [c.chosen for c in partial[0][-2:]] == ["yes", "yes"] and len(_stored(partial)) == n_feedback + 2
    assert {c.prompt[0]["content"] for c in partial[0][-2:]} == {"q2", "q3"}
    # a store whose completions were never indexed is indexed once, with the same result
    r.delete(keys.feedback_recent())
    assert _stored(window(r, 10_000)) == _stored(all_comparisons(r))
    assert r.zcard(keys.feedback_recent()) == r.scard(keys.feedback_completions()) == 5


def test_a_cycles_data_stage_reads_at_most_the_window(r):
    seed_feedback(r, 60)  # 60 completions, one pairwise comparison each, all settled by earlier cycles
    newest = seed_feedback(r, 5, seed=9)  # what this cycle takes
    r.config_resetstat()
    data = training_data.from_events(r, newest, limit=20)
    # 5 completions for the new events, then at most 20 for the history: not the 65 stored
    assert _calls(r, "get") <= 5 + 20 and _calls(r, "hgetall") <= 5 + 20
    assert len(data.comparisons) == 5 and len(data.history_comparisons) == 20 and data.source["history"] == 20
    # the window is the most recent votes: this cycle's five are in it
    window_ids = {c.group for c in data.history_comparisons}
    assert {e.completion_id for e in newest} <= window_ids
    recent = r.zrevrange(keys.feedback_recent(), 0, 19)
    assert window_ids == set(recent)
    r.config_resetstat()
    everything = training_data.from_events(r, newest, limit=None)  # unbounded: every completion is read
    assert len(everything.history_comparisons) == 65 and _calls(r, "get") >= 65
