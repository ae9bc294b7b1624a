"""Redis key names. Every key alignd writes is built here, under one prefix (ALIGND_KEY_PREFIX, default "alignd"),
and Celery's broker and result keys live under `PREFIX:celery:`, so deployments with different prefixes can share one
Redis database without seeing each other's registry, feedback or tasks."""

from __future__ import annotations

from typing import Any

from core.config import get_settings


def prefix() -> str:
    """This process's key prefix (read per call from the one settings object, so a key is never built with a stale
    one)."""
    return get_settings().key_prefix


def celery_prefix() -> str:
    """What kombu's `global_keyprefix` puts before Celery's queues, bindings, unacked messages, fanout channels and
    task results."""
    return f"{prefix()}:celery:"


def celery_transport_options() -> dict[str, Any]:
    """The transport options that keep Celery's keys under `celery_prefix()`: every Celery app of alignd (the
    workers' config, and the API and CLI that only send tasks) must use them, for the broker and the result backend,
    or it would talk to another deployment's queues."""
    return {"global_keyprefix": celery_prefix()}


def completion(completion_id: str) -> str:
    return f"{prefix()}:completion:{completion_id}"


def prompts_stream() -> str:
    """Stream of user prompts (capped), sampled by PPO rollouts."""
    return f"{prefix()}:prompts"


def rate(kind: str, subject: str, window: str) -> str:
    return f"{prefix()}:rate:{kind}:{subject}:{window}"


# --- model registry
def registry_versions() -> str:
    """Hash: version → JSON metadata (path, parent, metrics, provenance, status)."""
    return f"{prefix()}:registry:versions"


def registry_current() -> str:
    return f"{prefix()}:registry:current"


def registry_counter() -> str:
    return f"{prefix()}:registry:next"


def registry_events() -> str:
    """Stream of registry events: published, rolled back, refused, gate failed."""
    return f"{prefix()}:registry:events"


def registry_published() -> str:
    """Set of every version that was ever current: history that does not depend on the trimmed events stream."""
    return f"{prefix()}:registry:published"


def registry_cycle_events() -> str:
    """Hash: 'cycle token:event' → the event's JSON, for events about one training cycle (gate_failed, conflict …);
    kept for good, so a cycle's outcome can be found however many events came after it."""
    return f"{prefix()}:registry:cycle_events"


def registry_channel() -> str:
    """Pub/sub channel announcing a new current version (a hint; polling `registry_current` is the truth)."""
    return f"{prefix()}:registry:changed"


def serving(who: str) -> str:
    """One API process's heartbeat ('host:pid'), with a TTL: JSON {versions it holds, current, the registry's current
    as it last read it, since when it is behind that, the beat's time}."""
    return f"{prefix()}:serving:{who}"


def serving_index() -> str:
    """Sorted set 'host:pid' → time of its last heartbeat, so readers find the live heartbeats without a SCAN."""
    return f"{prefix()}:serving_index"


def lock(name: str) -> str:
    return f"{prefix()}:lock:{name}"


def fence(name: str) -> str:
    """Monotonic fencing-token counter of lock `name`."""
    return f"{prefix()}:fence:{name}"


# --- feedback (store/feedback.py, store/comparisons.py, store/exchange.py, store/stats.py)


def feedback_stream() -> str:
    """The append-only feedback log (a Stream, trimmed only where settled); workers read it through a consumer
    group."""
    return f"{prefix()}:feedback:log"


def feedback_acked() -> str:
    """Count of log entries acknowledged by the consumer group (the log length minus this is the unconsumed work)."""
    return f"{prefix()}:feedback:acked"


def feedback_trimmed() -> str:
    """Count of acknowledged log entries trimmed away (store/retention.py)."""
    return f"{prefix()}:feedback:trimmed"


def feedback_idempotency(feedback_id: str) -> str:
    """Hash {fingerprint, event, stream_id} of the request that used `feedback_id`, for idempotent retries."""
    return f"{prefix()}:feedback:id:{feedback_id}"


def feedback_history(completion_id: str, slot: str, user: str) -> str:
    """Every vote (list of event JSON, oldest first) of one user on one slot of one completion; revision = position."""
    return f"{prefix()}:feedback:history:{completion_id}:{slot}:{user}"


def feedback_latest(completion_id: str) -> str:
    """Hash '<slot>|<user>' → the latest vote (event JSON) on one completion; comparisons derive from these."""
    return f"{prefix()}:feedback:latest:{completion_id}"


def feedback_vote_counters(completion_id: str) -> str:
    """Hash '<slot>|<user>' → the vote-counter fields (JSON list) the latest vote holds; a revision subtracts them."""
    return f"{prefix()}:feedback:counted:{completion_id}"


def key_annotators(key_user: str, day: str) -> str:
    """Set of the annotators one key voted as on one UTC day (capped: a key cannot invent unlimited people)."""
    return f"{prefix()}:feedback:annotators:{key_user}:{day}"


def feedback_completions() -> str:
    """Set of completion ids that have at least one vote."""
    return f"{prefix()}:feedback:completions"


def feedback_recent() -> str:
    """Sorted set: completion id → time (s) of its latest vote; the bounded reads of store/comparisons.py walk it
    newest first."""
    return f"{prefix()}:feedback:recent"


def feedback_stats(kind: str) -> str:
    """Counter hash: kind 'events' counts accepted events, kind 'votes' counts the current (latest) votes."""
    return f"{prefix()}:stats:feedback:{kind}"


def imported_items() -> str:
    """Hash content-hash → imported comparison/rated JSON (store/exchange.py)."""
    return f"{prefix()}:imported:items"


def imported_order() -> str:
    """List of content hashes in import order, so training sees imported data in a stable order."""
    return f"{prefix()}:imported:order"


# --- the online loop (workers/, store/lock.py)


def reward_versions() -> str:
    """Hash: reward-model version → JSON metadata (path, metrics, data counts, policy it was initialised from)."""
    return f"{prefix()}:registry:reward:versions"


def reward_current() -> str:
    """The reward-model version PPO trains against (changes only when a new one does not regress)."""
    return f"{prefix()}:registry:reward:current"


def reward_counter() -> str:
    return f"{prefix()}:registry:reward:next"


def train_inflight() -> str:
    """Hash: fencing token of a running cycle → JSON {stream ids it read, version it started from}; the next cycle
    uses it to tell events a killed run already published (ack them) from events it never used (reuse them)."""
    return f"{prefix()}:train:inflight"


def train_config_schema() -> str:
    """JSON {dotted CycleConfig key: default}: published by workers, read by the API to check overrides."""
    return f"{prefix()}:train:config_schema"


def train_queued() -> str:
    """Set while a cycle is enqueued or running, so beat does not enqueue a second one (expires on its own)."""
    return f"{prefix()}:train:queued"


def task_attempts(task_id: str) -> str:
    """Deliveries of one Celery task (acks_late redelivers after a lost worker; capped by the task)."""
    return f"{prefix()}:task:attempts:{task_id}"


def task_result(task_id: str) -> str:
    """Outcome of a finished task, so a redelivered message returns it instead of training again."""
    return f"{prefix()}:task:result:{task_id}"


def ppo_state() -> str:
    """JSON {version, path}: the PPO trainer state saved after publishing `version` (resumed while it is current)."""
    return f"{prefix()}:train:ppo_state"
