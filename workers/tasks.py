"""Celery tasks: thin, idempotent wrappers over `workers/cycle.py`.

- `alignd.maybe_train` (beat, every ALIGND_CYCLE_SECONDS): enqueue a cycle when at least ALIGND_MIN_NEW_FEEDBACK
  events wait and no cycle is running or queued.
- `alignd.train_cycle` (the `train` queue; POST /admin/train, `alignd train cycle --enqueue`): one cycle.
  Idempotent by task id: a redelivered message whose run finished returns the stored result; deliveries are
  counted in Redis and a task delivered more than `alignd_max_deliveries` times is abandoned and recorded.
  `overrides` address CycleConfig fields as nested JSON or dotted keys (workers/cycle_config.py). However the
  cycle ends — result, exception, soft time limit — its feedback is settled by workers/settle.py; a hard time limit
  or a lost worker leaves that to the next cycle (same rule).
- `alignd.arena_watch` (beat, every minute): roll back a version whose live arena win rate against its parent is
  below ALIGND_ARENA_ROLLBACK_BELOW (with a minimum number of votes).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import uuid
from typing import Any

import redis

from core import names
from core.config import Settings, get_settings
from core.threads import api_busy, busy_dir, follow_load
from store import keys, registry
from store.client import connect
from store.feedback import unconsumed_count
from store.lock import LockBusy, lock_holder
from workers.arena import check_arena
from workers.celery_app import app
from workers.cycle import CycleError, run_cycle
from workers.cycle_config import load_cycle_config

log = logging.getLogger("alignd.tasks")

RECORD_TTL_S = 7 * 24 * 3600  # delivery counters and results outlive any redelivery (visibility timeout: hours)


@functools.cache
def _redis(url: str) -> redis.Redis:
    return connect(url)


def context() -> tuple[Settings, redis.Redis]:
    return get_settings(), _redis(app.conf.broker_url)


@app.task(name=names.MAYBE_TRAIN)
def maybe_train(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    settings, r = context()
    waiting = unconsumed_count(r)
    if waiting < settings.min_new_feedback:
        return {"status": "waiting", "unconsumed": waiting, "needed": settings.min_new_feedback}
    if lock_holder(r, names.TRAIN_LOCK) is not None:
        return {"status": "running", "unconsumed": waiting}
    if not r.set(keys.train_queued(), "beat", nx=True, ex=int(app.conf.task_time_limit) * 2):
        return {"status": "queued", "unconsumed": waiting}
    result = train_cycle.apply_async(
        kwargs={"trigger": "beat", "min_events": settings.min_new_feedback, "overrides": overrides}
    )
    return {"status": "enqueued", "task_id": result.id, "unconsumed": waiting}


@app.task(name=names.TRAIN_CYCLE, bind=True)
def train_cycle(
    self, trigger: str = "manual", min_events: int = 0, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    settings, r = context()
    task_id = self.request.id or f"local-{uuid.uuid4().hex}"
    done = r.get(keys.task_result(task_id))
    if done:  # a redelivery of a finished task: answer, do not train again
        return json.loads(done)
    attempts = int(r.incr(keys.task_attempts(task_id)))
    r.expire(keys.task_attempts(task_id), RECORD_TTL_S)
    try:
        if attempts > app.conf.alignd_max_deliveries:
            registry.record_event(
                r,
                "cycle_abandoned",
                task=task_id,
                attempts=attempts,
                reason="delivered too many times; each delivery lost its worker",
            )
            result: dict[str, Any] = {"status": "abandoned", "attempts": attempts}
        else:
            result = _run_cycle(settings, r, task_id, trigger, min_events, overrides)
        result["attempts"] = attempts
        r.set(keys.task_result(task_id), json.dumps(result, default=str), ex=RECORD_TTL_S)
        return json.loads(json.dumps(result, default=str))
    finally:
        r.delete(keys.train_queued())


def _run_cycle(
    settings: Settings, r: redis.Redis, task_id: str, trigger: str, min_events: int, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    try:
        cfg = load_cycle_config(settings, overrides)
    except ValueError as exc:  # a bad key or value in cycle.json or the overrides: say which, train nothing
        registry.record_event(r, "cycle_failed", task=task_id, reason=f"cycle configuration: {exc}")
        return {"status": "error", "reason": f"cycle configuration: {exc}"}
    settings.apply_torch_threads()
    follow = settings.training_threads_follow()  # every core while the API idles, half while it serves
    threads = follow_load(api_busy(busy_dir(settings.home)), *follow) if follow else contextlib.nullcontext()
    try:
        with threads:
            return run_cycle(r, settings, cfg, trigger=trigger, min_events=min_events)
    except LockBusy as exc:
        return {"status": "busy", "reason": str(exc)}
    except CycleError as exc:
        registry.record_event(r, "cycle_failed", task=task_id, reason=str(exc))
        return {"status": "error", "reason": str(exc)}
    except Exception as exc:  # SoftTimeLimitExceeded too: the cycle settled its feedback before this
        registry.record_event(r, "cycle_failed", task=task_id, reason=f"{type(exc).__name__}: {exc}")
        raise


@app.task(name=names.ARENA_WATCH)
def arena_watch() -> dict[str, Any]:
    settings, r = context()
    return check_arena(r, settings, load_cycle_config(settings))
