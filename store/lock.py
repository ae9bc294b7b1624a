"""A Redis lock with a heartbeat and a fencing token (Kleppmann, "How to do distributed locking", 2016).

Acquiring is one Lua script: if the lock key is free, INCR the fencing counter `keys.fence(name)` and SET the lock
to that token with a TTL. A heartbeat thread extends the TTL only while the key still holds our token (Lua), so a
holder that was paused past its TTL cannot extend a lock someone else now holds. The token is what makes the lock
safe rather than merely exclusive: `registry.set_current` refuses a publish whose token is not the latest one, so a
stale holder (paused, partitioned, or killed and replaced) can never publish over a newer run.

    with FencedLock(r, "train", ttl_ms=30_000) as lock:   # raises LockBusy if another run holds it
        ... publish_version(..., fencing_token=lock.token)
"""

from __future__ import annotations

import logging
import threading

import redis

from store import keys

log = logging.getLogger("alignd.lock")

# KEYS: lock, fence counter; ARGV: ttl ms → the new token, or nil when held by someone else
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
"""
# KEYS: lock; ARGV: token, ttl ms → 1 if extended
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LockBusy(Exception):
    """Another holder has the lock."""


class FencedLock:
    def __init__(self, r: redis.Redis, name: str, ttl_ms: int = 30_000, heartbeat_s: float | None = None):
        self.r, self.name, self.ttl_ms = r, name, ttl_ms
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else ttl_ms / 3000  # three beats per TTL
        self.token: int | None = None
        self.lost = threading.Event()  # set when a heartbeat finds the lock gone: stop work, publishing will fail
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> int:
        token = self.r.eval(_ACQUIRE, 2, keys.lock(self.name), keys.fence(self.name), self.ttl_ms)
        if token is None:
            raise LockBusy(
                f"lock {self.name!r} is held (token {self.r.get(keys.lock(self.name))}); "
                f"a run is in progress — wait for it or for its TTL of {self.ttl_ms} ms after a crash"
            )
        self.token = int(token)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.name}", daemon=True)
        self._thread.start()
        return self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.extend():
                    log.error("lock %s (token %s) was lost; this run can no longer publish", self.name, self.token)
                    self.lost.set()
                    return
            except redis.RedisError as exc:  # a blip: the next beat retries well within the TTL
                log.warning("lock heartbeat failed: %s", exc)

    def extend(self) -> bool:
        return bool(self.r.eval(_EXTEND, 1, keys.lock(self.name), str(self.token), self.ttl_ms))

    def held(self) -> bool:
        """Still ours: our token in the lock key, and no newer token issued."""
        return (
            self.r.get(keys.lock(self.name)) == str(self.token)
            and int(self.r.get(keys.fence(self.name)) or 0) == self.token
        )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.token is not None:
            self.r.eval(_RELEASE, 1, keys.lock(self.name), str(self.token))

    def __enter__(self) -> FencedLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(r: redis.Redis, name: str) -> int | None:
    """Token of the current holder of `name`, or None when free."""
    raw = r.get(keys.lock(name))
    return int(raw) if raw else None
