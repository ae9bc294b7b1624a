"""Operator endpoints under /admin (admin key only)."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter

from service.deps import AdminDep, AppState, StateDep
from store.feedback import last_event_id
from store.recent import recent_feedback
from store.stats import feedback_stats
from training.reliability import from_dicts, table_dict

router = APIRouter(prefix="/admin", tags=["admin"])
_reliability_lock = threading.Lock()  # one estimate at a time; concurrent callers wait for it and reuse it
RELIABILITY_WINDOW = 20_000  # items of the most recent votes the estimate reads: a cycle's default reward window


def _reliability(state: AppState) -> dict[str, Any]:
    """Per-annotator reliability over the most recent current votes (training/reliability.py; at most
    RELIABILITY_WINDOW items, store/recent.py), recomputed only when a vote arrived since."""
    with _reliability_lock:
        newest = last_event_id(state.redis)
        cached = state.extras.get("reliability")
        if cached is None or cached[0] != newest:
            comparisons, rated = recent_feedback(state.redis, RELIABILITY_WINDOW)
            cached = (newest, {"annotators": table_dict(from_dicts(comparisons, rated))})
            state.extras["reliability"] = cached
        return cached[1]


@router.get("/stats")
def stats(state: StateDep, _: AdminDep) -> dict[str, Any]:
    """Feedback counts by type, user and version, thumbs-up rates, arena win rates, unconsumed events, and each
    annotator's estimated reliability (accuracy, weight in training, labels, overlap labels), lowest weight first."""
    out = feedback_stats(state.redis)
    out["reliability"] = _reliability(state)
    return out
