"""Celery configuration of alignd (loaded by `workers/celery_app.py` with `config_from_object`).

Routing, time limits, delivery guarantees and the beat schedule live here, not in the tasks.

- Two queues: `train` (the training cycle; run it on a worker with `--concurrency 1`, prefetch 1, ideally a GPU
  machine) and `default` (light periodic tasks that must not wait behind a training run).
- acks_late + reject_on_worker_lost: a task is acknowledged when it finishes, so a worker that dies mid-cycle leaves
  the message to be delivered again; the tasks are idempotent (a finished task id returns its stored result) and
  count their deliveries in Redis, giving up after `alignd_max_deliveries` (a task that kills its worker every
  time, e.g. out of memory, must not loop forever).
- Celery's keys (queues, bindings, unacked messages, results) carry kombu's `global_keyprefix`, under
  ALIGND_KEY_PREFIX like alignd's own (store/keys.py).
- The Redis transport redelivers an unacknowledged message after `visibility_timeout`; it is longer than the hard
  time limit, so a long training run still in progress is never handed to a second worker.
"""

from __future__ import annotations

from kombu import Queue

from core import names
from core.config import get_settings
from core.redis_server import EmbeddedRedis
from store import keys

_settings = get_settings()


def resolve_redis_url() -> str:
    """ALIGND_REDIS_URL, or the embedded Redis that `alignd up` / `alignd worker` started under ALIGND_HOME."""
    if _settings.redis_url:
        return _settings.redis_url
    url = EmbeddedRedis(_settings.home / "redis").running_url()
    if url is None:
        raise RuntimeError(
            "no Redis for Celery: set ALIGND_REDIS_URL, or start workers with `alignd worker` / "
            "`alignd up`, which start the embedded Redis under ALIGND_HOME"
        )
    return url


broker_url = resolve_redis_url()
result_backend = broker_url
broker_connection_retry_on_startup = True

# a cycle is ~2 min on 2 cores; far beyond that something is wrong: SoftTimeLimitExceeded stops it cleanly (the
# cycle settles its feedback on the way out, workers/settle.py), the hard limit kills it (the lock TTL and the next
# cycle's recovery, the same settle rule, make that safe too; tests/workers/test_faults.py)
TRAIN_SOFT_LIMIT_S = 20 * 60
TRAIN_HARD_LIMIT_S = 25 * 60
VISIBILITY_TIMEOUT_S = 2 * 60 * 60  # > hard limit: an unacked message is redelivered only when its worker is gone
LIGHT_SOFT_LIMIT_S, LIGHT_HARD_LIMIT_S = 30, 60  # maybe_train / arena_watch read a few keys

task_default_queue = names.DEFAULT_QUEUE
task_queues = (Queue(names.DEFAULT_QUEUE), Queue(names.TRAIN_QUEUE))
task_routes = {names.TRAIN_CYCLE: {"queue": names.TRAIN_QUEUE}}
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1  # a training worker must not reserve a second cycle while running one
task_soft_time_limit = TRAIN_SOFT_LIMIT_S
task_time_limit = TRAIN_HARD_LIMIT_S
task_annotations = {
    name: {"soft_time_limit": LIGHT_SOFT_LIMIT_S, "time_limit": LIGHT_HARD_LIMIT_S}
    for name in (names.MAYBE_TRAIN, names.ARENA_WATCH)
}
# global_keyprefix (store/keys.py): queues, bindings, unacked messages and results under ALIGND_KEY_PREFIX too
broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S, **keys.celery_transport_options()}
result_backend_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S, **keys.celery_transport_options()}
result_expires = 7 * 24 * 3600
task_serializer = result_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
worker_send_task_events = True  # Flower shows tasks live
task_send_sent_event = True

alignd_max_deliveries = 3  # deliveries of one task id before it is abandoned (recorded as a registry event)

ARENA_WATCH_S = min(60, _settings.cycle_seconds)  # rolling back a bad version should not wait a whole cycle
beat_schedule = {
    "maybe-train": {
        "task": names.MAYBE_TRAIN,
        "schedule": float(_settings.cycle_seconds),
        "options": {"expires": float(_settings.cycle_seconds)},
    },  # a stale check is worthless
    "arena-watch": {
        "task": names.ARENA_WATCH,
        "schedule": float(ARENA_WATCH_S),
        "options": {"expires": float(ARENA_WATCH_S)},
    },
}
