"""From feedback to preference data: the comparisons and rated responses the reward model trains on.

Typed records, `core.records.Comparison` / `Rated` (the ground package's, so training learns from them as returned).
Only the latest vote of each (completion, slot, user) counts; a revision replaces its vote, the log keeps both.
The prompt is the completion's request messages; the responses are its choices' texts.

How each feedback type is used:
- pairwise: winner 0/1 → one pair (chosen = winner, rejected = the other, label "pref", margin 0); "tie" and
  "both_bad" → one pair labelled "tie" / "both_bad" (chosen = choice 0, rejected = choice 1; the order means nothing).
- rank of K choices → all K·(K−1)/2 pairs (each better-ranked choice over each worse one), label "pref",
  margin = rank distance − 1 (0 for neighbours, so a rank of two equals a pairwise vote; 1 for one choice
  between them …), all with group = completion id so they stay in one batch.
- thumbs: per user and completion, every choice with thumbs up is paired (label "pref", margin 0) with every
  choice with thumbs down; a thumb with no opposite thumb becomes a single rated response (good = up).
A "pref" pair whose two texts are identical becomes a "tie" whatever the vote said: two samples of a confident
policy are often the same text, and a ranking must still put one of them first (measured in one demo run: 34 % of
all rank pairs were identical twins, so their arbitrary order was a third of the reward model's data and its
held-out accuracy measured mostly noise).
Every record carries group (completion id), source (feedback id; "a,b" for a pair made of two thumbs),
annotator (user) and meta with the completion id, the feedback type, the choice indices and their policy versions
(chosen_version / rejected_version, or version for rated), from which arena win rates are computed.
Imported comparisons (store/exchange.py) are included by `all_comparisons` as they were imported. Every function
here reads everything; store/recent.py reads a bounded window of the most recent items.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable

import redis

from core.records import Comparison, Rated
from store import keys
from store.completions import CompletionRecord
from store.feedback import FeedbackEvent

BATCH = 500  # completions fetched per pipeline round trip


def rank_pairs(ranking: list[int]) -> list[tuple[int, int, int]]:
    """(better, worse, rank distance) for every pair of a ranking given best first: K·(K−1)/2 of them."""
    return [(ranking[i], ranking[j], j - i) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]


def _pair(
    record: CompletionRecord,
    chosen: int,
    rejected: int,
    *,
    label: str,
    margin: float,
    source: str,
    annotator: str,
    kind: str,
) -> Comparison:
    by_index = {c.index: c for c in record.choices}
    c, r = by_index[chosen], by_index[rejected]
    if label == "pref" and c.text == r.text:
        label, margin = "tie", 0  # one text cannot beat itself: the order a voter gave identical twins is noise
    return Comparison(
        prompt=[dict(m) for m in record.messages],
        chosen=c.text,
        rejected=r.text,
        label=label,
        margin=float(margin),
        group=record.id,
        source=source,
        annotator=annotator,
        meta={
            "completion_id": record.id,
            "type": kind,
            "chosen_index": chosen,
            "rejected_index": rejected,
            "chosen_version": c.version,
            "rejected_version": r.version,
        },
    )


def _rated(record: CompletionRecord, vote: FeedbackEvent) -> Rated:
    choice = next(c for c in record.choices if c.index == vote.choice)
    return Rated(
        prompt=[dict(m) for m in record.messages],
        response=choice.text,
        good=vote.value == "up",
        group=record.id,
        source=vote.id,
        annotator=vote.user,
        meta={"completion_id": record.id, "type": "thumbs", "index": choice.index, "version": choice.version},
    )


def derive(
    record: CompletionRecord, votes: Iterable[FeedbackEvent], fresh: set[str] | None = None
) -> tuple[list[Comparison], list[Rated]]:
    """Comparisons and rated responses from the latest `votes` on one completion.

    With `fresh` (feedback ids), only output that involves a fresh vote is returned: a thumbs pair where either
    thumb is fresh, a rated thumb that is fresh, a pairwise/rank vote that is fresh.
    """
    comparisons: list[Comparison] = []
    rated: list[Rated] = []
    thumbs: dict[str, list[FeedbackEvent]] = defaultdict(list)

    def wanted(*ids: str) -> bool:
        return fresh is None or any(i in fresh for i in ids)

    for vote in votes:
        if vote.type == "thumbs":
            thumbs[vote.user].append(vote)
        elif vote.type == "pairwise" and wanted(vote.id):
            if vote.winner in ("tie", "both_bad"):
                comparisons.append(
                    _pair(
                        record, 0, 1, label=vote.winner, margin=0, source=vote.id, annotator=vote.user, kind="pairwise"
                    )
                )
            else:
                comparisons.append(
                    _pair(
                        record,
                        vote.winner,
                        1 - vote.winner,
                        label="pref",
                        margin=0,
                        source=vote.id,
                        annotator=vote.user,
                        kind="pairwise",
                    )
                )
        elif vote.type == "rank" and wanted(vote.id):
            for better, worse, distance in rank_pairs(vote.ranking):
                comparisons.append(
                    _pair(
                        record,
                        better,
                        worse,
                        label="pref",
                        margin=distance - 1,
                        source=vote.id,
                        annotator=vote.user,
                        kind="rank",
                    )
                )
    for user in sorted(thumbs):
        ups = sorted((v for v in thumbs[user] if v.value == "up"), key=lambda v: v.choice)
        downs = sorted((v for v in thumbs[user] if v.value == "down"), key=lambda v: v.choice)
        for up in ups:
            for down in downs:
                if wanted(up.id, down.id):
                    comparisons.append(
                        _pair(
                            record,
                            up.choice,
                            down.choice,
                            label="pref",
                            margin=0,
                            source=f"{up.id},{down.id}",
                            annotator=user,
                            kind="thumbs",
                        )
                    )
        if not ups or not downs:
            rated += [_rated(record, v) for v in ups + downs if wanted(v.id)]
    return comparisons, rated


def records_and_votes(r: redis.Redis, completion_ids: list[str]):
    """(record, latest votes) for each completion id that still has a record, fetched in pipelined batches."""
    for start in range(0, len(completion_ids), BATCH):
        chunk = completion_ids[start : start + BATCH]
        pipe = r.pipeline(transaction=False)
        for cid in chunk:
            pipe.get(keys.completion(cid))
            pipe.hgetall(keys.feedback_latest(cid))
        replies = pipe.execute()
        for raw, latest in zip(replies[0::2], replies[1::2], strict=True):
            if raw is None:
                continue
            votes = [FeedbackEvent.model_validate_json(latest[f]) for f in sorted(latest)]
            yield CompletionRecord.model_validate_json(raw), votes


def comparisons_for_events(r: redis.Redis, events: list[FeedbackEvent]) -> tuple[list[Comparison], list[Rated]]:
    """Preference data from a batch of new events (e.g. from `read_new`), using the current latest votes.

    An event a later revision has replaced gives nothing (its replacement does); a new thumb also pairs with the
    same user's earlier opposite thumbs on that completion.
    """
    fresh = {e.id for e in events}
    completion_ids = sorted({e.completion_id for e in events})
    comparisons: list[Comparison] = []
    rated: list[Rated] = []
    for record, votes in records_and_votes(r, completion_ids):
        c, s = derive(record, votes, fresh)
        comparisons += c
        rated += s
    return comparisons, rated


def imported(r: redis.Redis) -> tuple[list[Comparison], list[Rated]]:
    """Comparisons and rated responses imported by store/exchange.py, in import order."""
    return imported_items_from(r, r.lrange(keys.imported_order(), 0, -1))


def imported_items_from(r: redis.Redis, order: list[str]) -> tuple[list[Comparison], list[Rated]]:
    """The imported items with these content ids, in this order."""
    comparisons: list[Comparison] = []
    rated: list[Rated] = []
    for start in range(0, len(order), BATCH):
        for raw in r.hmget(keys.imported_items(), order[start : start + BATCH]):
            if raw is None:
                continue
            item = json.loads(raw)
            if item.pop("kind") == "comparison":
                comparisons.append(Comparison.from_dict(item))
            else:
                rated.append(Rated.from_dict(item))
    return comparisons, rated


def feedback_comparisons(r: redis.Redis) -> tuple[list[Comparison], list[Rated]]:
    """Preference data from the latest votes on every completion that has any, ordered by completion id."""
    comparisons: list[Comparison] = []
    rated: list[Rated] = []
    completion_ids = sorted(r.smembers(keys.feedback_completions()))
    for record, votes in records_and_votes(r, completion_ids):
        c, s = derive(record, votes)
        comparisons += c
        rated += s
    return comparisons, rated


def all_comparisons(r: redis.Redis) -> tuple[list[Comparison], list[Rated]]:
    """Everything the reward model retrains on: (comparisons, rated) from the latest votes, then imported data."""
    comparisons, rated = feedback_comparisons(r)
    imp_comparisons, imp_rated = imported(r)
    return comparisons + imp_comparisons, rated + imp_rated
