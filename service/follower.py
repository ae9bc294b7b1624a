"""The registry follower: every API process serves whatever version the registry says is current.

A background thread subscribes to the registry's pub/sub channel (a hint that wakes it at once) and reads the
current version every `settings.poll_seconds` (the truth: a missed message, a Redis restart or a process started
late all converge on the next poll). A new version is loaded in this thread — `service.loader.load_version`
verifies the sha256 manifest and runs a smoke test bounded by `settings.smoke_test_timeout_s`, so a policy whose
forward fails or hangs cannot stop this thread following the registry — and only then handed to `Engine.swap`,
which switches between batch steps: requests in flight finish on their version, new ones use the new one, the old
weights are freed once drained. A corrupt or unloadable checkpoint, or one failing its smoke test, is refused:
logged, kept in `state.extras["refused"]` (shown by /readyz and /admin/versions), written to the version's registry
entry and the events stream, and the old version keeps serving. A refusal for a transient reason (the smoke test
timing out on a busy machine) is retried after `TRANSIENT_RETRY_S`, doubling up to `TRANSIENT_RETRY_MAX_S`; any
refused version is tried once more when the registry makes it current again (an operator's rollback to it).

Every pass (and before each load) writes the process's heartbeat (`store.registry.note_serving`): the versions it
holds, the one it serves, the registry's current one and since when it has been behind it. `alignd gc` keeps what is
held; /readyz of every process answers 503 when one lags past `service.skew.grace_s` (service/skew.py).

A request that read the old current version just before a swap still runs on it: the chat route hands the engine
the `Policy` object it read, which keeps those weights alive until that request is done.

Arena mode (`settings.arena`): the parent of the current version is loaded too and pinned, and
`state.extras["arena_pair"] = (current, parent)` lets two-choice chat requests get one answer from each
(service/routes/chat.py). Automatic rollback on a low live win rate runs in the workers (beat task
`alignd.arena_watch`), once for the deployment rather than once per API process; this follower then follows it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis

from core.threads import set_thread_torch_threads
from service.deps import AppState
from service.engine import Policy
from service.loader import SmokeTestTimeout, load_version
from store import keys, registry

log = logging.getLogger("alignd.follower")

ERROR_BACKOFF_S = 1.0  # after a Redis error, wait before reconnecting
TRANSIENT_RETRY_S = 30.0  # first retry of a version refused for a timeout; a load takes seconds, so this is cheap
TRANSIENT_RETRY_MAX_S = 600.0


class Follower:
    def __init__(self, state: AppState):
        self.state = state
        self.engine = state.engine
        self.settings = state.settings
        self.r: redis.Redis = state.redis
        self.refused: dict[int, str] = state.extras.setdefault("refused", {})
        self.who = f"{socket.gethostname()}:{os.getpid()}"
        self.swaps = 0
        self.syncs = 0  # loop passes that reached the registry
        self._arena_pins: set[int] = set()
        self._retry: dict[int, tuple[float, float]] = {}  # transiently refused version → (retry at, next delay)
        self._last_target: int | None = None
        self._behind: tuple[int, float] | None = None  # (registry's current version, wall time first seen behind)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Follower:
        self._thread = threading.Thread(target=self._run, name="alignd-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # --- the loop
    def _run(self) -> None:
        set_thread_torch_threads(1)  # loads versions: no thread pool beside the engine's (core/config.py says why)
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.r.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(keys.registry_channel())
                self.sync()
                self.syncs += 1
                pubsub.get_message(timeout=self.settings.poll_seconds)  # returns early when a version is announced
                while pubsub.get_message(timeout=0) is not None:  # several announcements: one sync is enough
                    pass
            except Exception as exc:  # never let the follower die: the next poll retries
                log.warning("registry follower: %s: %s", type(exc).__name__, exc)
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
                    pubsub = None
                self._stop.wait(ERROR_BACKOFF_S)
        if pubsub is not None:
            pubsub.close()

    def sync(self) -> None:
        """Bring this process to the registry's current version (and its arena parent); one step of the loop."""
        target = registry.current_version(self.r)
        self._note_behind(target)
        if target is not None and self._may_try(target) and target != self.engine.current_version:
            if target not in self.engine.policies:
                self._beat(target)  # a load takes a while: /readyz can tell a process loading from a stuck one
            policy = self._obtain(target)
            if policy is not None:
                self.refused.pop(target, None)
                self._retry.pop(target, None)
                old = self.engine.current_version
                self.engine.swap(policy)
                self.swaps += 1
                log.info("now serving policy version %s (was %s)", target, old)
        self._last_target = target
        if self.settings.arena:
            self._arena()
        self._note_behind(target)
        self._beat(target)

    def _note_behind(self, target: int | None) -> None:
        """Since when this process serves another version than the registry's current one (None: it serves it)."""
        if target is None or target == self.engine.current_version:
            self._behind = None
        elif self._behind is None or self._behind[0] != target:
            self._behind = (target, time.time())

    def _beat(self, target: int | None) -> None:
        """The heartbeat: what this process holds (`alignd gc` keeps it) and serves (/readyz compares processes)."""
        registry.note_serving(
            self.r,
            self.who,
            self.engine.loaded_versions(),
            current=self.engine.current_version,
            target=target,
            behind_since=self._behind[1] if self._behind else None,
            refused=self.refused.get(target) if target is not None else None,
        )

    # --- helpers
    def _may_try(self, version: int) -> bool:
        """Not refused; or refused but made current again since (a rollback to it); or transiently refused and due."""
        if version not in self.refused or version != self._last_target:
            return True
        due = self._retry.get(version)
        return due is not None and time.monotonic() >= due[0]

    def _obtain(self, version: int) -> Policy | None:
        """The version loaded and verified, reusing a copy the engine already holds (an arena parent)."""
        held = self.engine.policies.get(version)
        if held is not None:
            return held
        try:
            return load_version(self.r, self.settings, version, self.engine)
        except Exception as exc:  # corrupt files, missing folder, bad config, failed smoke test: refuse it
            self._refuse(version, exc)
            return None

    def _refuse(self, version: int, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SmokeTestTimeout):
            delay = self._retry.get(version, (0.0, TRANSIENT_RETRY_S))[1]
            self._retry[version] = (time.monotonic() + delay, min(2 * delay, TRANSIENT_RETRY_MAX_S))
            reason += f" (transient: retried in {delay:g} s)"
        else:
            self._retry.pop(version, None)
        self.refused[version] = reason
        log.error("refusing policy version %s: %s (still serving %s)", version, reason, self.engine.current_version)
        try:
            registry.update_version(self.r, version, refused=reason, refused_by=self.who, refused_at=time.time())
        except KeyError:
            pass
        registry.record_event(self.r, "refused", version=version, reason=reason, by=self.who)

    def _arena(self) -> None:
        current = self.engine.current_version
        parent = (registry.get_version(self.r, current) or {}).get("parent")
        if parent is None or parent in self.refused:
            self.state.extras["arena_pair"] = None
            self._arena_pins = set()
            self.engine.pin(self._arena_pins)
            return
        if self._arena_pins != {parent}:
            self._arena_pins = {parent}
            self.engine.pin(self._arena_pins)  # pinned before it is added, so the engine cannot release it between
        if parent not in self.engine.loaded_versions():
            policy = self._obtain(parent)
            if policy is None:
                self.state.extras["arena_pair"] = None
                return
            self.engine.add_policy(policy)
        self.state.extras["arena_pair"] = (current, parent)


def start_follower(state: AppState) -> Follower:
    return Follower(state).start()
