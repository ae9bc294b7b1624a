"""Rollbacks: automatic, when the current version loses the live arena against its parent, and by the operator.

Live win rates come from users' pairwise votes between two versions' answers (store/registry.py `arena_result`);
a rollback is the registry's compare-and-set, so it cannot cross a concurrent publish.

    alignd rollback 3                  # the operator's
"""

from __future__ import annotations

from typing import Any

import redis

from core.config import Settings
from store import registry
from store.stats import feedback_stats
from workers.cycle_config import CycleConfig


def check_arena(r: redis.Redis, settings: Settings, cfg: CycleConfig) -> dict[str, Any]:
    """Roll the current version back to its parent when its live arena win rate against it is below
    `settings.arena_rollback_below` over at least `cfg.arena_min_votes` votes (run by beat: `alignd.arena_watch`)."""
    current = registry.current_version(r)
    if current is None:
        return {"status": "no_policy"}
    parent = (registry.get_version(r, current) or {}).get("parent")
    if parent is None:
        return {"status": "no_parent", "current": current}
    live = registry.arena_result(feedback_stats(r)["pairs"], current, parent)
    if live is not None:
        registry.update_version(r, current, live_win_rate=live)
    if not settings.arena or live is None or live["votes"] < cfg.arena_min_votes:
        return {"status": "watching", "current": current, "live": live}
    if live["win_rate"] >= settings.arena_rollback_below:
        return {"status": "ok", "current": current, "live": live}
    reason = (
        f"live arena win rate {live['win_rate']:.3f} vs v{parent} over {live['votes']} votes is below "
        f"{settings.arena_rollback_below}"
    )
    try:
        registry.set_current(
            r,
            parent,
            expected=current,
            event="rollback",
            detail={"from": current, "reason": reason, "automatic": True},
        )
    except registry.RegistryConflict as exc:
        return {"status": "conflict", "reason": str(exc)}
    registry.update_version(r, current, status="rolled_back", rolled_back_reason=reason)
    return {"status": "rolled_back", "from": current, "to": parent, "reason": reason, "live": live}


def rollback(r: redis.Redis, version: int, *, reason: str = "operator") -> dict[str, Any]:
    """Make an earlier (registered, not refused-everywhere) version current again through the registry's CAS."""
    meta = registry.get_version(r, version)
    if meta is None:
        raise KeyError(f"version {version} is not in the registry")
    current = registry.current_version(r)
    previous = registry.set_current(
        r, version, expected=current, event="rollback", detail={"from": current, "reason": reason}
    )
    return {"current": version, "previous": previous}
