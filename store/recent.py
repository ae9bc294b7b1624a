"""Bounded reads of the preference data: the most recent `limit` comparisons and rated answers, never a scan of
everything ever voted on.

The acceptance script (store/feedback.py) keeps a sorted set of the completions with votes, scored by the time of
each one's latest vote (`keys.feedback_recent`); a restored vote (store/archive.py) moves its completion there too.
`recent_feedback` walks it newest first, fetching only as many completions as the window can still hold (every
voted completion gives at least one item), and derives their items exactly as `store.comparisons` does, returned in
the same order (by completion id) — so when everything fits, the window equals `feedback_comparisons`. Imported
items (store/exchange.py) fill what the window has left, the most recently imported first, in import order.

A completion in the voted set without an index entry (a store written before the index was kept) is indexed on
the first bounded read, scored by its record's creation time: one pass, after which reads are bounded.

    window(r, 20_000)         # what a cycle's reward model retrains on (CycleConfig reward.max_comparisons)
"""

from __future__ import annotations

import redis

from core.records import Comparison, Rated
from store import keys
from store.comparisons import BATCH, all_comparisons, derive, imported_items_from, records_and_votes
from store.completions import CompletionRecord


def index_unindexed(r: redis.Redis) -> int:
    """Index voted completions the sorted set lacks (O(1) when none are missing); returns how many were added."""
    if r.zcard(keys.feedback_recent()) >= r.scard(keys.feedback_completions()):
        return 0
    added = 0
    cursor = 0
    while True:
        cursor, ids = r.sscan(keys.feedback_completions(), cursor, count=BATCH)
        if ids:
            scores = r.zmscore(keys.feedback_recent(), ids)
            missing = [cid for cid, s in zip(ids, scores, strict=True) if s is None]
            records = r.mget([keys.completion(cid) for cid in missing]) if missing else []
            created = {
                cid: CompletionRecord.model_validate_json(raw).created if raw else 0.0
                for cid, raw in zip(missing, records, strict=True)
            }
            if created:
                added += r.zadd(keys.feedback_recent(), created, nx=True)
        if int(cursor) == 0:
            return added


def recent_feedback(r: redis.Redis, limit: int) -> tuple[list[Comparison], list[Rated]]:
    """The items of the most recently voted completions, whole completions only, at most `limit` of them."""
    index_unindexed(r)
    chosen: list[tuple[str, list[Comparison], list[Rated]]] = []
    have, start, full = 0, 0, False
    while not full and have < limit:
        # each voted completion gives >= 1 item: never fetch more completions than the window can still hold
        ids = r.zrevrange(keys.feedback_recent(), start, start + min(BATCH, limit - have) - 1)
        if not ids:
            break
        start += len(ids)
        for record, votes in records_and_votes(r, ids):
            c, s = derive(record, votes)
            if have + len(c) + len(s) > limit:
                full = True  # a completion's items stay together (a ranking's pairs share a batch)
                break
            chosen.append((record.id, c, s))
            have += len(c) + len(s)
    comparisons: list[Comparison] = []
    rated: list[Rated] = []
    for _, c, s in sorted(chosen, key=lambda item: item[0]):  # the order of `feedback_comparisons`
        comparisons += c
        rated += s
    return comparisons, rated


def recent_imported(r: redis.Redis, limit: int) -> tuple[list[Comparison], list[Rated]]:
    """The `limit` most recently imported items, in import order."""
    if limit <= 0:
        return [], []
    return imported_items_from(r, r.lrange(keys.imported_order(), -limit, -1))


def window(r: redis.Redis, limit: int | None) -> tuple[list[Comparison], list[Rated]]:
    """At most `limit` items: the most recent feedback first, then the most recent imports; None: every item
    (`store.comparisons.all_comparisons`)."""
    if limit is None:
        return all_comparisons(r)
    comparisons, rated = recent_feedback(r, limit)
    imp_comparisons, imp_rated = recent_imported(r, limit - len(comparisons) - len(rated))
    return comparisons + imp_comparisons, rated + imp_rated
