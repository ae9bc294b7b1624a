"""Version skew between API processes, for /readyz: every process of a deployment should serve the registry's
current version, and one that does not for longer than a swap takes is reported by every process's /readyz. While
the processes are split (some serve the current version, a lagging one another) /readyz is 503: callers get
different models depending on the process they reach. When every live process lags alike (each refused the same
corrupt version) /readyz stays 200 and lists them: they serve the previous version consistently, which is what a
refusal promises, and a load balancer taking every process out would turn one bad checkpoint into an outage.

A swap in progress is normal: a follower reads the new current version at once (pub/sub) or within one poll, then
loads and smoke-tests it before it serves it. `grace_s` allows five polls (a missed announcement, a Redis blip and
its reconnect back-off) plus `smoke_test_timeout_s`, the bound the loader itself puts on the slowest accepted smoke
test: a process behind for longer than that has refused the version, is stuck loading it, or stopped following.
Each heartbeat says since when its process has been behind (its own clock: the first read of the new version); a
process that has not read the registry's current version yet is judged by the age of its last heartbeat.
"""

from __future__ import annotations

from typing import Any

from core.config import Settings

POLLS = 5


def grace_s(settings: Settings) -> float:
    return POLLS * settings.poll_seconds + settings.smoke_test_timeout_s


def report(beats: dict[str, dict[str, Any]], current: int | None, now: float, grace: float) -> dict[str, Any] | None:
    """None when no process lags past `grace`; else {current, grace_s, serving: process → version, lagging: process
    → why, split: whether live processes serve different versions (then /readyz is 503)}."""
    lag = lagging(beats, current, now, grace)
    if not lag:
        return None
    serving = {who: beat.get("current") for who, beat in sorted(beats.items())}
    split = len(set(serving.values())) > 1
    return {"current": current, "grace_s": grace, "serving": serving, "lagging": lag, "split": split}


def lagging(beats: dict[str, dict[str, Any]], current: int | None, now: float, grace: float) -> dict[str, str]:
    """Process → why it counts as serving another version than `current` for longer than `grace` seconds."""
    out: dict[str, str] = {}
    if current is None:
        return out
    for who, beat in sorted(beats.items()):
        if beat.get("current") == current:
            continue
        seen = beat.get("target") == current and beat.get("behind_since") is not None
        since = beat["behind_since"] if seen else beat.get("at", now)
        if now - since <= grace:
            continue
        why = f"serves v{beat.get('current')}, not the current v{current}, "
        if seen:
            why += f"for {now - since:.0f} s"
            refused = beat.get("refused")
            why += f" (refused: {refused})" if refused else f" (loading it; holds {beat.get('versions')})"
        else:
            why += f"and has not read the registry for {now - since:.0f} s (its follower is stuck)"
        out[who] = why
    return out
