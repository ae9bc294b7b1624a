"""Feedback statistics for operators (GET /admin/stats), read in O(1) from counters the acceptance script keeps.

Two families of counters, both moved atomically inside the acceptance script (store/feedback.py):
- "events" counts every accepted event, revisions included (what users sent; what the rate limits count).
- "votes" counts the current votes only: a revision subtracts the counters of the vote it replaces and adds its
  own, so a user who changes their mind three times still holds one vote. Thumbs-up rates and arena win rates are
  computed from these.
Arena pairs ("3_vs_2") come from pairwise votes and rank pairs whose two choices were produced by different policy
versions, seen from the higher version: win_rate = (wins + ties / 2) / (wins + losses + ties), where ties counts
"tie" and "both_bad" votes (neither version was preferred; both_bad is also reported on its own).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import redis

from store import keys
from store.feedback import pending_count, unconsumed_count


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _breakdown(counters: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"total": counters.get("total", 0), "by_type": {}, "by_user": {}, "by_version": {}}
    for field, n in counters.items():
        kind, _, name = field.partition(":")
        if n and kind in ("type", "user", "version"):
            out[f"by_{kind}"][name] = n
    return out


def feedback_stats(r: redis.Redis) -> dict[str, Any]:
    events = {f: int(n) for f, n in r.hgetall(keys.feedback_stats("events")).items()}
    votes = {f: int(n) for f, n in r.hgetall(keys.feedback_stats("votes")).items()}
    thumbs: dict[str, dict[str, Any]] = defaultdict(lambda: {"up": 0, "down": 0})
    pairs: dict[str, dict[str, Any]] = defaultdict(lambda: {"wins": 0, "losses": 0, "ties": 0, "both_bad": 0})
    for field, n in votes.items():
        kind, _, rest = field.partition(":")
        if kind == "thumbs":
            version, _, value = rest.rpartition(":")
            thumbs[version][value] += n
        elif kind == "arena":
            pair, _, outcome = rest.rpartition(":")
            if outcome == "win":
                pairs[pair]["wins"] += n
            elif outcome == "loss":
                pairs[pair]["losses"] += n
            else:  # tie or both_bad: neither version preferred
                pairs[pair]["ties"] += n
                if outcome == "both_bad":
                    pairs[pair]["both_bad"] += n
    for t in thumbs.values():
        t["up_rate"] = _rate(t["up"], t["up"] + t["down"])
    for p in pairs.values():
        p["win_rate"] = _rate(p["wins"] + p["ties"] / 2, p["wins"] + p["losses"] + p["ties"])
    return {
        "object": "feedback.stats",
        "events": _breakdown(events),
        "votes": _breakdown(votes),
        "thumbs": {v: thumbs[v] for v in sorted(thumbs, key=int) if thumbs[v]["up"] + thumbs[v]["down"]},
        "pairs": {p: pairs[p] for p in sorted(pairs) if pairs[p]["wins"] + pairs[p]["losses"] + pairs[p]["ties"]},
        "unconsumed": unconsumed_count(r),
        "pending": pending_count(r),
        "imported": r.hlen(keys.imported_items()),
    }
