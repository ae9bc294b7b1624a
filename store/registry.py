"""The model registry: which policy and reward-model versions exist, which one is current, and what happened to them.

Versions are metadata (checkpoint path relative to the checkpoint root, parent, reward-model version, feedback
provenance, evaluation metrics) that is written once; `update_version` adds status notes. Policy and reward-model
versions live in two tables of the same shape (`_Table`). Every write that depends on what was read is one Lua
script, so API followers, the arena watch and training cycles in other processes never lose each other's writes: a
status update replaces a version's body only if it is still the body the merge was made from (else it merges again),
and the current version changes only by compare-and-set, which also checks the caller's fencing token against the
training lock's latest token, so a stale or duplicated run can never publish over a newer version. Each policy switch
is appended to an events stream and announced on a pub/sub channel.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from core import names
from core.config import Settings
from store import keys

EVENTS_MAXLEN = 10_000  # the events stream is recent history; `registry_published` and cycle events are kept for good

# KEYS: 1 current, 2 versions, 3 fence counter, and for the policy table 4 events, 5 channel, 6 published set
# ARGV: 1 version, 2 expected current ('*': don't check, '': no current yet), 3 fencing token ('': don't check),
#       4 event JSON, 5 events stream length (policy table)
_SET_CURRENT = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return {0, 'unknown version'} end
local cur = redis.call('GET', KEYS[1]) or ''
if ARGV[2] ~= '*' and cur ~= ARGV[2] then
  if ARGV[2] == '' then return {0, 'a current version exists already (' .. cur .. ')'} end
  if cur == '' then return {0, 'no version is current, expected ' .. ARGV[2]} end
  return {0, 'current is ' .. cur .. ', expected ' .. ARGV[2]}
end
if ARGV[3] ~= '' then
  local latest = redis.call('GET', KEYS[3]) or '0'
  if tonumber(ARGV[3]) ~= tonumber(latest) then
    return {0, 'stale fencing token ' .. ARGV[3] .. ' (latest ' .. latest .. ')'}
  end
end
redis.call('SET', KEYS[1], ARGV[1])
if #KEYS > 3 then
  redis.call('SADD', KEYS[6], ARGV[1])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[4])
  redis.call('PUBLISH', KEYS[5], ARGV[1])
end
return {1, cur}
"""

# KEYS: 1 versions; ARGV: 1 version, 2 the body read, 3 the merged body. Returns {1} when written, {0, body now}
# when another update came first (the caller merges into that one), {-1} for an unknown version. The merge is done in
# Python: Redis's cjson would re-encode the untouched fields lossily ([] becomes {}, floats keep 14 significant
# digits, integers above 10^14 turn to floats).
_REPLACE_IF_UNCHANGED = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {-1} end
if raw ~= ARGV[2] then return {0, raw} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1}
"""

UPDATE_ATTEMPTS = 1000  # each failed attempt means another writer's update landed: contention, never a livelock


class RegistryConflict(Exception):
    """The compare-and-set lost: another publish or rollback happened first, or the run's lock is stale."""


@dataclass(frozen=True)
class _Table:
    """One kind of version (policy or reward model): a hash of version → JSON metadata, a counter, a current one."""

    kind: str  # in messages: "version", "reward version"
    versions_key: Callable[[], str]  # key builders, called per use: the prefix is the settings', not the import's
    current_key_of: Callable[[], str]
    counter_key: Callable[[], str]
    history: bool  # policy switches are also written to the events stream, the published set and the channel

    @property
    def versions(self) -> str:
        return self.versions_key()

    @property
    def current_key(self) -> str:
        return self.current_key_of()

    @property
    def counter(self) -> str:
        return self.counter_key()

    def allocate(self, r: redis.Redis) -> int:
        return int(r.incr(self.counter))

    def add(self, r: redis.Redis, version: int, meta: dict[str, Any]) -> None:
        body = {**meta, "version": version, "created": meta.get("created", time.time())}
        if not r.hsetnx(self.versions, str(version), json.dumps(body)):
            raise RegistryConflict(f"{self.kind} {version} is already registered")

    def get(self, r: redis.Redis, version: int) -> dict[str, Any] | None:
        raw = r.hget(self.versions, str(version))
        return json.loads(raw) if raw else None

    def all(self, r: redis.Redis) -> list[dict[str, Any]]:
        return sorted((json.loads(v) for v in r.hvals(self.versions)), key=lambda m: m["version"])

    def current(self, r: redis.Redis) -> int | None:
        raw = r.get(self.current_key)
        return int(raw) if raw else None

    def update(self, r: redis.Redis, version: int, fields: dict[str, Any]) -> None:
        """Merge `fields` into the stored metadata; the write happens only if the body is still the one read, so a
        concurrent update of another field is never overwritten (the loser reads again and merges again)."""
        script = r.register_script(_REPLACE_IF_UNCHANGED)
        raw = r.hget(self.versions, str(version))
        for _ in range(UPDATE_ATTEMPTS):
            if raw is None:
                raise KeyError(f"{self.kind} {version} is not registered")
            merged = json.dumps({**json.loads(raw), **fields})
            answer = script(keys=[self.versions], args=[str(version), raw, merged])
            if int(answer[0]) == 1:
                return
            raw = answer[1] if int(answer[0]) == 0 else None
        raise RegistryConflict(
            f"{self.kind} {version}: {UPDATE_ATTEMPTS} concurrent updates in a row won over this one; retry"
        )

    def set_current(
        self,
        r: redis.Redis,
        version: int,
        *,
        expected: int | None | str,
        fencing_token: int | None,
        event: dict[str, Any] | None = None,
    ) -> int | None:
        exp = "*" if expected == "any" else ("" if expected is None else str(int(expected)))
        token = "" if fencing_token is None else str(fencing_token)
        script_keys = [self.current_key, self.versions, keys.fence(names.TRAIN_LOCK)]
        args = [str(version), exp, token]
        if self.history:
            script_keys += [keys.registry_events(), keys.registry_channel(), keys.registry_published()]
            args += [json.dumps(event or {}), str(EVENTS_MAXLEN)]
        ok, info = r.register_script(_SET_CURRENT)(keys=script_keys, args=args)
        if not int(ok):
            raise RegistryConflict(f"cannot make {self.kind} {version} current: {_text(info)}")
        return int(info) if info else None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


_POLICY = _Table("version", keys.registry_versions, keys.registry_current, keys.registry_counter, history=True)
_REWARD = _Table("reward version", keys.reward_versions, keys.reward_current, keys.reward_counter, history=False)


# --- policy versions


def allocate_version(r: redis.Redis) -> int:
    return _POLICY.allocate(r)


def add_version(r: redis.Redis, version: int, meta: dict[str, Any]) -> None:
    """Record a version's metadata (once: versions are immutable; `update_version` adds status notes)."""
    _POLICY.add(r, version, meta)


def update_version(r: redis.Redis, version: int, **fields: Any) -> None:
    """Merge status fields (e.g. `refused`, `live_win_rate`) into a version's metadata, atomically: concurrent
    updates of other fields by other processes are kept. Raises KeyError for an unknown version."""
    _POLICY.update(r, version, fields)


def get_version(r: redis.Redis, version: int) -> dict[str, Any] | None:
    return _POLICY.get(r, version)


def version_path(settings: Settings, r: redis.Redis, version: int) -> Path:
    """The checkpoint folder of policy `version` (its registry path resolved against the checkpoint root); KeyError
    for a version the registry does not hold."""
    meta = get_version(r, version)
    if meta is None:
        raise KeyError(f"policy version {version} is not in the registry")
    return settings.checkpoint(meta["path"])


def reward_path(settings: Settings, r: redis.Redis, version: int) -> Path:
    """The checkpoint folder of reward-model `version`, as `version_path`."""
    meta = get_reward_version(r, version)
    if meta is None:
        raise KeyError(f"reward version {version} is not in the registry")
    return settings.checkpoint(meta["path"])


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
    return _POLICY.all(r)


def current_version(r: redis.Redis) -> int | None:
    return _POLICY.current(r)


def set_current(
    r: redis.Redis,
    version: int,
    *,
    expected: int | None | str = "any",
    fencing_token: int | None = None,
    event: str = "published",
    detail: dict[str, Any] | None = None,
) -> int | None:
    """Make `version` current if the current one is still `expected` (None: no current yet; "any": don't check)
    and, with `fencing_token`, if no newer lock holder exists; every check and the switch are one script. Returns
    the previous version; raises RegistryConflict."""
    body = {"event": event, "version": version, "at": time.time(), **(detail or {})}
    return _POLICY.set_current(r, version, expected=expected, fencing_token=fencing_token, event=body)


# KEYS: fence counter, cycle events hash, events stream; ARGV: token, hash field, event JSON, stream cap
# → 1, or 0 when the token is not the training lock's latest
_RECORD_FENCED = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[3])
return 1
"""


def record_event(r: redis.Redis, event: str, *, fencing_token: int | None = None, **detail: Any) -> None:
    """Append to the (trimmed) events stream; an event about a training cycle is also kept by cycle token. With
    `fencing_token` (a cycle's lock token, which must then be `detail["cycle"]`), the event is written only while
    that token is the training lock's latest, else RegistryConflict: a fenced-off cycle cannot record an outcome."""
    body = json.dumps({"event": event, "at": time.time(), **detail}, default=str)
    if fencing_token is not None:
        done = r.eval(
            _RECORD_FENCED,
            3,
            keys.fence(names.TRAIN_LOCK),
            keys.registry_cycle_events(),
            keys.registry_events(),
            str(fencing_token),
            f"{detail['cycle']}:{event}",
            body,
            str(EVENTS_MAXLEN),
        )
        if not int(done):
            raise RegistryConflict(f"cannot record {event}: the training lock was lost (a newer run holds it)")
        return
    pipe = r.pipeline(transaction=True)
    pipe.xadd(keys.registry_events(), {"event": body}, maxlen=EVENTS_MAXLEN, approximate=True)
    if detail.get("cycle") is not None:
        pipe.hset(keys.registry_cycle_events(), f"{detail['cycle']}:{event}", body)
    pipe.execute()


def record_cycle_data(r: redis.Redis, cycle: int, name: str, value: Any) -> None:
    """Keep `value` (JSON) for training cycle `cycle` under `name`, for good (e.g. the feedback ids it used)."""
    r.hset(keys.registry_cycle_events(), f"{cycle}:{name}", json.dumps(value))


def cycle_event(r: redis.Redis, cycle: int, event: str) -> dict[str, Any] | None:
    """The `event` (e.g. "gate_failed") recorded for training cycle `cycle`, or None; not bounded by the stream."""
    raw = r.hget(keys.registry_cycle_events(), f"{cycle}:{event}")
    return json.loads(raw) if raw else None


def events(r: redis.Redis, count: int = 100) -> list[dict[str, Any]]:
    return [json.loads(f["event"]) for _, f in r.xrevrange(keys.registry_events(), count=count)]


# --- event lookup and publish history


def find_events(r: redis.Redis, count: int = 10_000, **match: Any) -> list[dict[str, Any]]:
    """Recent events (newest first) whose fields equal every `match` item, e.g. `find_events(r, cycle=7)`."""
    return [e for e in events(r, count) if all(e.get(k) == v for k, v in match.items())]


def was_published(r: redis.Redis, version: int) -> bool:
    """Whether `version` ever became current (its "published" event is written by the same script as the switch)."""
    if r.sismember(keys.registry_published(), str(version)) or current_version(r) == version:
        return True
    # registries written before the published set existed: their recent history is in the events stream
    return not r.exists(keys.registry_published()) and bool(find_events(r, event="published", version=version))


# --- reward-model versions


def allocate_reward_version(r: redis.Redis) -> int:
    return _REWARD.allocate(r)


def add_reward_version(r: redis.Redis, version: int, meta: dict[str, Any]) -> None:
    _REWARD.add(r, version, meta)


def get_reward_version(r: redis.Redis, version: int) -> dict[str, Any] | None:
    return _REWARD.get(r, version)


def list_reward_versions(r: redis.Redis) -> list[dict[str, Any]]:
    return _REWARD.all(r)


def current_reward_version(r: redis.Redis) -> int | None:
    return _REWARD.current(r)


def set_current_reward(r: redis.Redis, version: int, *, fencing_token: int | None = None) -> int | None:
    """Make a reward version the one PPO uses; with `fencing_token`, only while that training lock is the latest."""
    return _REWARD.set_current(r, version, expected="any", fencing_token=fencing_token)


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
    return {
        "vs": other,
        "win_rate": (wins + p["ties"] / 2) / votes,
        "votes": votes,
        "wins": wins,
        "losses": losses,
        "ties": p["ties"],
        "both_bad": p.get("both_bad", 0),
    }


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
    return {
        "object": "list",
        "current": current,
        "data": data,
        "reward": {"current": current_reward_version(r), "versions": list_reward_versions(r)},
        "events": events(r, n_events),
    }


# --- which versions the API processes hold (checkpoint garbage collection must keep them)

SERVING_TTL_S = 120  # a process that stops beating for this long holds nothing (followers beat every poll)


def note_serving(
    r: redis.Redis,
    who: str,
    versions: list[int],
    ttl_s: int = SERVING_TTL_S,
    *,
    current: int | None = None,
    target: int | None = None,
    behind_since: float | None = None,
    refused: str | None = None,
) -> None:
    """An API process's heartbeat: the versions it has loaded (current, arena parent, draining ones), the one it
    serves, the registry's current version as it last read it (`target`), since when it is behind that (None when it
    serves it) and why it refused it, if it did."""
    now = time.time()
    beat = {"versions": sorted(versions), "current": current, "target": target, "behind_since": behind_since}
    beat.update(refused=refused, at=now)
    pipe = r.pipeline(transaction=False)
    pipe.set(keys.serving(who), json.dumps(beat), ex=ttl_s)
    pipe.zadd(keys.serving_index(), {who: now})
    pipe.zremrangebyscore(keys.serving_index(), "-inf", now - ttl_s)
    pipe.execute()


def serving(r: redis.Redis) -> dict[str, list[int]]:
    """Process → versions it holds, for every process that beat within SERVING_TTL_S."""
    out = {}
    for key in r.scan_iter(match=keys.serving("*"), count=500):
        raw = r.get(key)
        if raw is not None:
            beat = json.loads(raw)
            out[key.removeprefix(keys.serving(""))] = beat["versions"] if isinstance(beat, dict) else beat
    return out


def heartbeats(r: redis.Redis) -> dict[str, dict[str, Any]]:
    """Process → its latest heartbeat (`note_serving`), for every process that beat within SERVING_TTL_S; reads
    the index and one key per process, never the keyspace (/readyz calls it)."""
    whos = r.zrangebyscore(keys.serving_index(), time.time() - SERVING_TTL_S, "+inf")
    raws = r.mget([keys.serving(w) for w in whos]) if whos else []
    return {w: json.loads(raw) for w, raw in zip(whos, raws, strict=True) if raw and raw.startswith("{")}
