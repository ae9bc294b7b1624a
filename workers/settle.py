"""Feedback accounting of the training cycle: one rule, applied in one place, decides what happens to the events a
cycle read — every path of the cycle (published, gate failed, exception, Celery soft time limit) ends in `settle`,
and the next cycle applies the same `settle` to the record of a cycle that died (hard time limit, kill -9).

The rule looks at what happened, never at which line raised:

* the cycle's version was made current (`registry.was_published`), or its gate failure was recorded
  (`registry.cycle_event(r, token, "gate_failed")`), or that its events held nothing to learn from
  (`"nothing_new"`: comments, votes a later revision replaced): the events were used → acknowledge them;
* otherwise they were not used → leave them pending in the consumer group, where the next cycle's `read_new`
  reclaims them; versions the cycle registered but never made current are marked abandoned.

These facts are written by fenced scripts (the registry's compare-and-set, `record_gate_failure` below): once a newer
lock token exists, a cycle can add neither, so whoever settles a record — the cycle itself in its `finally`, or the
next lock holder in `recover` — reaches the same verdict. Settling is idempotent (acknowledge, note, then delete the
record; a crash in between repeats harmlessly), so each event is used by exactly one published version or recorded
gate failure, or returned to the queue: never both, never lost. The ids a used record held are kept under
`<token>:feedback_ids` in the registry's cycle events (about 17 bytes an event, a fraction of the feedback log
entry it replaces once the log is trimmed), so an audit can check that no event was used twice.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import redis

from store import feedback, keys, registry, retention


def begin(r: redis.Redis, token: int, events: list[feedback.FeedbackEvent], start_version: int) -> None:
    """Record the events a cycle took, before it uses them (the record is what `settle` settles)."""
    r.hset(
        keys.train_inflight(),
        str(token),
        json.dumps(
            {
                "ids": [e.stream_id for e in events],
                "from_version": start_version,
                "started": time.time(),
                "host": socket.gethostname(),
            }
        ),
    )


def record_gate_failure(r: redis.Redis, token: int, **detail: Any) -> None:
    """The "gate_failed" cycle event, written only while `token` is the training lock's latest: a cycle fenced off
    (its lock expired and a newer cycle may already have reclaimed its events) cannot claim them as used."""
    registry.record_event(r, "gate_failed", fencing_token=token, cycle=token, **detail)


def record_nothing_new(r: redis.Redis, token: int, **detail: Any) -> None:
    """The "nothing_new" cycle event (the events gave no comparison or rating), fenced as `record_gate_failure`."""
    registry.record_event(r, "nothing_new", fencing_token=token, cycle=token, **detail)


def verdict(r: redis.Redis, token: int) -> tuple[bool, list[int], list[int]]:
    """(used, versions of cycle `token` that were made current, its versions that never were)."""
    theirs = [int(m["version"]) for m in registry.list_versions(r) if m.get("cycle") == token]
    published = [v for v in theirs if registry.was_published(r, v)]
    used = bool(published) or any(
        registry.cycle_event(r, token, e) is not None for e in ("gate_failed", "nothing_new")
    )
    return used, published, [v for v in theirs if v not in published]


def settle(r: redis.Redis, token: int, *, by: int, why: str, archive_dir: Path | None = None) -> dict[str, Any] | None:
    """Apply the rule to cycle `token`'s in-flight record (by the cycle itself or, `by` another token, in recovery),
    then trim the settled log (archived first to `archive_dir`, ALIGND_FEEDBACK_ARCHIVE_DIR, when set).
    Returns what was done, or None when there is no record (already settled)."""
    raw = r.hget(keys.train_inflight(), str(token))
    if raw is None:
        return None
    ids = json.loads(raw)["ids"]
    used, published, unpublished = verdict(r, token)
    acked = feedback.ack(r, ids) if used else 0
    for v in unpublished:  # registered but never current: mark, so no one mistakes it for a release
        meta = registry.get_version(r, v) or {}
        if not meta.get("status"):
            registry.update_version(r, v, status="abandoned", abandoned_reason=f"cycle {token}: {why}")
    if used:
        registry.record_cycle_data(r, token, "feedback_ids", ids)
    registry.record_event(
        r, "cycle_settled", cycle=token, by=by, used=used, events=len(ids), acked=acked, versions=published, why=why
    )
    r.hdel(keys.train_inflight(), str(token))
    # the log up to the oldest unsettled event has done its work
    retention.trim_settled_feedback(r, archive_dir=archive_dir)
    return {"used": used, "events": len(ids), "acked": acked, "released": 0 if used else len(ids)}


def recover(r: redis.Redis, token: int, *, archive_dir: Path | None = None) -> dict[str, int]:
    """Settle the records of cycles that died before settling (hard time limit, kill -9). Run by a cycle holding
    the lock as `token`: every older token is dead or fenced off, so its facts are final."""
    out = {"acked": 0, "released": 0}
    for raw_token in r.hkeys(keys.train_inflight()):
        t = int(raw_token)
        if t >= token:
            continue
        why = f"died before settling; recovered by cycle {token}"
        done = settle(r, t, by=token, why=why, archive_dir=archive_dir)
        if done is not None:
            out["acked"] += done["acked"]
            out["released"] += done["released"]
    return out
