"""The model registry: which policy versions exist, which one is current, and what happened to them.

Versions are immutable metadata (checkpoint path, parent, reward-model version, feedback provenance, evaluation
metrics). The current version changes only by compare-and-set in a Lua script, which also checks the caller's fencing
token against the training lock's latest token, so a stale or duplicated run can never publish over a newer version.
Each change is appended to an events stream and announced on a pub/sub channel.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from core import names
from store import keys

# KEYS: current, versions, events, fence counter, channel, published set
# ARGV: version, expected current ("" = don't check), fencing token ("" = don't check), event JSON
_SET_CURRENT = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return {0, 'unknown version'} end
local cur = redis.call('GET', KEYS[1]) or ''
if ARGV[2] ~= '' and cur ~= ARGV[2] then return {0, 'current is ' .. cur .. ', expected ' .. ARGV[2]} end
if ARGV[3] ~= '' then
  local latest = redis.call('GET', KEYS[4]) or '0'
  if tonumber(ARGV[3]) ~= tonumber(latest) then
    return {0, 'stale fencing token ' .. ARGV[3] .. ' (latest ' .. latest .. ')'}
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[6], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'event', ARGV[4])
redis.call('PUBLISH', KEYS[5], ARGV[1])
return {1, cur}
"""


class RegistryConflict(Exception):
    """The compare-and-set lost: another publish or rollback happened first, or the run's lock is stale."""


def allocate_version(r: redis.Redis) -> int:
    return int(r.incr(keys.registry_counter()))


def add_version(r: redis.Redis, version: int, meta: dict[str, Any]) -> None:
    """Record a version's metadata (once: versions are immutable; `update_version` adds status notes)."""
    body = {**meta, "version": version, "created": meta.get("created", time.time())}
    if not r.hsetnx(keys.registry_versions(), str(version), json.dumps(body)):
        raise RegistryConflict(f"version {version} is already registered")


def update_version(r: redis.Redis, version: int, **fields: Any) -> None:
    """Merge status fields (e.g. `refused`, `live_win_rate`) into a version's metadata."""
    raw = r.hget(keys.registry_versions(), str(version))
    if raw is None:
        raise KeyError(version)
    body = json.loads(raw)
    body.update(fields)
    r.hset(keys.registry_versions(), str(version), json.dumps(body))


def get_version(r: redis.Redis, version: int) -> dict[str, Any] | None:
    raw = r.hget(keys.registry_versions(), str(version))
    return json.loads(raw) if raw else None


def lineage_reference(metas: dict[int, dict[str, Any]], version: int) -> int:
    """The SFT (or registered base) model that `version` descends from: what PPO stays close to and what the report
    compares with. `metas` maps version → metadata; a broken lineage falls back to the oldest version."""
    seen: set[int] = set()
    v: int | None = version
    while v is not None and v not in seen and v in metas:
        seen.add(v)
        if metas[v].get("source") in ("sft", "base"):
            return v
        v = metas[v].get("parent")
    return min(metas)


def reference_version(r: redis.Redis, version: int) -> int:
    """`lineage_reference` over the registry's versions."""
    return lineage_reference({int(m["version"]): m for m in list_versions(r)}, version)


def list_versions(r: redis.Redis) -> list[dict[str, Any]]:
    return sorted((json.loads(v) for v in r.hvals(keys.registry_versions())), key=lambda m: m["version"])


def current_version(r: redis.Redis) -> int | None:
    raw = r.get(keys.registry_current())
    return int(raw) if raw else None


def set_current(r: redis.Redis, version: int, *, expected: int | None | str = "any", fencing_token: int | None = None,
                event: str = "published", detail: dict[str, Any] | None = None) -> int | None:
    """Make `version` current if the current one is still `expected` (None: no current yet; "any": don't check)
    and, with `fencing_token`, if no newer lock holder exists. Returns the previous version; raises
    RegistryConflict."""
    exp = "" if expected == "any" else ("" if expected is None else str(expected))
    if expected is None and r.exists(keys.registry_current()):
        raise RegistryConflict(f"a current version exists already ({current_version(r)})")
    ev = json.dumps({"event": event, "version": version, "at": time.time(), **(detail or {})})
    ok, info = r.eval(_SET_CURRENT, 6, keys.registry_current(), keys.registry_versions(), keys.registry_events(),
                      keys.fence(names.TRAIN_LOCK), keys.registry_channel(), keys.registry_published(), str(version),
                      exp,
                      "" if fencing_token is None else str(fencing_token), ev)
    if not int(ok):
        raise RegistryConflict(f"cannot make version {version} current: {info}")
    return int(info) if info else None


def record_event(r: redis.Redis, event: str, **detail: Any) -> None:
    """Append to the (trimmed) events stream; an event about a training cycle is also kept by cycle token."""
    body = json.dumps({"event": event, "at": time.time(), **detail})
    pipe = r.pipeline(transaction=True)
    pipe.xadd(keys.registry_events(), {"event": body}, maxlen=10_000, approximate=True)
    if detail.get("cycle") is not None:
        pipe.hset(keys.registry_cycle_events(), f"{detail['cycle']}:{event}", body)
    pipe.execute()


def cycle_event(r: redis.Redis, cycle: int, event: str) -> dict[str, Any] | None:
    """The `event` (e.g. "gate_failed") recorded for training cycle `cycle`, or None; not bounded by the stream."""
    raw = r.hget(keys.registry_cycle_events(), f"{cycle}:{event}")
    return json.loads(raw) if raw else None


def events(r: redis.Redis, count: int = 100) -> list[dict[str, Any]]:
    return [json.loads(f["event"]) for _, f in r.xrevrange(keys.registry_events(), count=count)]


# --- additions for the online loop: event lookup, reward-model versions


def find_events(r: redis.Redis, count: int = 10_000, **match: Any) -> list[dict[str, Any]]:
    """Recent events (newest first) whose fields equal every `match` item, e.g. `find_events(r, cycle=7)`."""
    return [e for e in events(r, count) if all(e.get(k) == v for k, v in match.items())]


def was_published(r: redis.Redis, version: int) -> bool:
    """Whether `version` ever became current (its "published" event is written by the same script as the switch)."""
    if r.sismember(keys.registry_published(), str(version)) or current_version(r) == version:
        return True
    # registries written before the published set existed: their recent history is in the events stream
    return not r.exists(keys.registry_published()) and bool(find_events(r, event="published", version=version))


# KEYS: current reward version, reward versions, fence counter; ARGV: version, fencing token ("" = don't check)
_SET_REWARD = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return {0, 'unknown reward version'} end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= tonumber(redis.call('GET', KEYS[3]) or '0') then
  return {0, 'stale fencing token ' .. ARGV[2]}
end
local prev = redis.call('GET', KEYS[1]) or ''
redis.call('SET', KEYS[1], ARGV[1])
return {1, prev}
"""


def allocate_reward_version(r: redis.Redis) -> int:
    return int(r.incr(keys.reward_counter()))


def add_reward_version(r: redis.Redis, version: int, meta: dict[str, Any]) -> None:
    body = {**meta, "version": version, "created": meta.get("created", time.time())}
    if not r.hsetnx(keys.reward_versions(), str(version), json.dumps(body)):
        raise RegistryConflict(f"reward version {version} is already registered")


def get_reward_version(r: redis.Redis, version: int) -> dict[str, Any] | None:
    raw = r.hget(keys.reward_versions(), str(version))
    return json.loads(raw) if raw else None


def list_reward_versions(r: redis.Redis) -> list[dict[str, Any]]:
    return sorted((json.loads(v) for v in r.hvals(keys.reward_versions())), key=lambda m: m["version"])


def current_reward_version(r: redis.Redis) -> int | None:
    raw = r.get(keys.reward_current())
    return int(raw) if raw else None


def set_current_reward(r: redis.Redis, version: int, *, fencing_token: int | None = None) -> int | None:
    """Make a reward version the one PPO uses; with `fencing_token`, only while that training lock is the latest."""
    ok, info = r.eval(_SET_REWARD, 3, keys.reward_current(), keys.reward_versions(), keys.fence(names.TRAIN_LOCK),
                      str(version), "" if fencing_token is None else str(fencing_token))
    if not int(ok):
        raise RegistryConflict(f"cannot make reward version {version} current: {info}")
    return int(info) if info else None


# --- live arena win rates and the version listing (GET /admin/versions, `alignd versions`)


def arena_result(pairs: dict[str, dict[str, Any]], version: int, other: int) -> dict[str, Any] | None:
    """`version`'s live record against `other` from store.stats' arena pairs ('hi_vs_lo', seen from the higher
    version): win_rate counts ties as half. None without votes."""
    hi, lo = max(version, other), min(version, other)
    p = pairs.get(f"{hi}_vs_{lo}")
    if not p:
        return None
    wins, losses = (p["wins"], p["losses"]) if version == hi else (p["losses"], p["wins"])
    votes = wins + losses + p["ties"]
    if not votes:
        return None
    return {"vs": other, "win_rate": (wins + p["ties"] / 2) / votes, "votes": votes, "wins": wins,
            "losses": losses, "ties": p["ties"], "both_bad": p.get("both_bad", 0)}


def describe(r: redis.Redis, n_events: int = 20) -> dict[str, Any]:
    """Every version with provenance, metrics, status (current, available, refused, abandoned, rolled_back …) and
    live arena win rate against its parent; the reward-model versions; the latest registry events."""
    from store.stats import feedback_stats

    pairs = feedback_stats(r)["pairs"]
    current = current_version(r)
    data = []
    for meta in list_versions(r):
        v = int(meta["version"])
        if v == current:
            status = "current"
        else:
            status = meta.get("status") or ("refused" if meta.get("refused") else "available")
        parent = meta.get("parent")
        live = arena_result(pairs, v, int(parent)) if parent is not None else None
        data.append({**meta, "status": status, "live_win_rate": live})
    return {"object": "list", "current": current, "data": data,
            "reward": {"current": current_reward_version(r), "versions": list_reward_versions(r)},
            "events": events(r, n_events)}
