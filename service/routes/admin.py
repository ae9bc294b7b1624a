"""Operator endpoints under /admin (admin key only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.deps import AdminDep, StateDep
from store.stats import feedback_stats

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/stats")
def stats(state: StateDep, _: AdminDep) -> dict[str, Any]:
    """Feedback counts by type, user and version, thumbs-up rates, arena win rates and unconsumed events."""
    return feedback_stats(state.redis)
