"""One turn of the online loop: new feedback → reward model → policy update → gate → publish → settle.

Plain functions over a Redis client and the settings, so the Celery task (`workers/tasks.py`), the CLI (`alignd
train cycle|ppo|dpo|kto`) and the tests run the same stages. The steps follow InstructGPT (Ouyang et al. 2022) run
online (Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", sec. 4.5, iterated online RLHF);
each stage is a module and returns a typed result the next one takes:

1. Take the training lock (store/lock.py): one run at a time; its fencing token guards every publish.
2. Settle what a dead cycle left behind (workers/settle.py), then read the new feedback through the `trainer`
   consumer group (store/feedback.py), reclaiming events a dead cycle left pending, and record them in flight. Their
   comparisons and rated answers are derived once (workers/data.py `TrainingData`); a cycle with nothing new to
   learn from records that and publishes nothing.
3. Reward (workers/reward_stage.py → `Rewards`): retrain the reward model on the most recent comparisons
   (`reward.max_comparisons`, store/recent.py); it becomes current only if it does not regress on held-out pairs.
   A DPO/KTO update does not train against it, so on the CPU the two run at once (`update.reward_beside`).
4. Update (workers/update.py → `Candidate`): LoRA or full (`use_adapter`), then PPO against the reward model
   (workers/ppo_update.py) or DPO / KTO from the labels (workers/preference.py), from the current policy and
   KL-regularised toward the SFT reference.
5. Gate (workers/gate_stage.py → `Verdict`): on fresh held-out prompts the candidate must pass workers/gate.py's
   checks against the current policy and the reference; a failed PPO candidate falls back to its halfway policy.
6. Publish (workers/publish.py `publish_candidate`), fenced by the lock's token and by the version the run started
   from, so a stale run or a run overtaken by a rollback cannot publish; or record the gate failure (fenced too).
   A published version is followed by checkpoint GC with keep-N (workers/gc.py `after_publish`, `ALIGND_GC_KEEP`).
7. Settle (workers/settle.py), in the `finally` of every path: acknowledge the events if this cycle's version was
   made current, its gate failure or its having nothing to learn was recorded, else return them to the queue.

`alignd train ppo` and `alignd train dpo|kto` (`run_training`) run stages 3-6 on no new feedback (PPO), a
preference file or all feedback in Redis, with the current reward model. Between stages `failpoints.hit`
(workers/failpoints.py) lets a test inject a fault at a named moment. Arena watch and rollback: workers/arena.py.

    alignd train cycle --json            # one cycle, synchronously, in this process
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict
from typing import Any

import redis

from core import names
from core.config import Settings
from core.threads import beside
from store import feedback, registry
from store.lock import FencedLock
from workers import data as training_data
from workers import failpoints, gate_stage, ppo_update, publish, reward_stage, update
from workers import gc as checkpoint_gc
from workers import settle as settlement
from workers.cycle_config import CycleConfig, load_cycle_config, with_suites
from workers.data import TrainingData
from workers.job import CycleError, Job, Progress, log_progress, open_job

__all__ = ["CycleError", "report_json", "run_cycle", "run_ppo", "run_preference", "run_training"]

log = logging.getLogger("alignd.cycle")


def run_cycle(
    r: redis.Redis,
    settings: Settings,
    cfg: CycleConfig | None = None,
    *,
    trigger: str = "manual",
    min_events: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run one cycle under the training lock; returns a JSON-able report with "status": "published",
    "gate_failed", "publish_failed" (the checkpoint could not be written), "nothing_new" (no new feedback to learn
    from), "skipped" (fewer than `min_events` new events) or "conflict" (overtaken). Raises store.lock.LockBusy
    when another run trains and CycleError when it cannot run at all."""
    cfg = with_suites(cfg or load_cycle_config(settings), settings)  # a bad suite file fails before any work
    if failpoints.parse(settings.failpoints):  # a misspelt failpoint fails here, before any feedback is taken
        log.warning(
            "failpoints armed (ALIGND_FAILPOINTS=%r): this cycle will be faulted on purpose", settings.failpoints
        )
    lock = FencedLock(r, names.TRAIN_LOCK, ttl_ms=int(cfg.lock_ttl_s * 1000))
    with lock:
        t0, token = time.perf_counter(), lock.token
        recovered = settlement.recover(r, token, archive_dir=settings.feedback_archive_dir)
        job = open_job(r, settings, cfg, lock, trigger=trigger, progress=progress or log_progress)
        waiting = feedback.unconsumed_count(r)
        if waiting < min_events:
            reason = f"{waiting} new feedback events, fewer than {min_events}"
            return {"status": "skipped", "reason": reason, "cycle": token, "current": job.start_version} | {
                "recovered": recovered
            }
        report = _settled_cycle(job, recovered)
        report.update(seconds=time.perf_counter() - t0, trigger=trigger)
        return report


def _stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _settled_cycle(job: Job, recovered: dict[str, int]) -> dict[str, Any]:
    """Take the new feedback, learn from it and settle it, whatever happens in between."""
    r, token = job.r, job.token
    events = feedback.read_new(r, f"cycle-{token}", job.cfg.max_events, claim_idle_ms=0)  # we hold the lock: any
    events.sort(key=lambda e: _stream_key(e.stream_id))  # pending entry belongs to a dead or fenced-off cycle
    settlement.begin(r, token, events, job.start_version)
    job.progress("feedback", {"events": len(events), "recovered": recovered})
    why = "ended by an exception before settling"
    try:
        job.failpoint("after_feedback")
        data = training_data.from_events(r, events, job.cfg.reward.max_comparisons)
        report = _nothing_new(job, data) if data.empty else pipeline(job, data)
        why = report["status"]
    except registry.RegistryConflict as exc:  # a rollback or a newer run got there first: the events stay unused
        why = f"conflict: {exc}"
        report = _conflict(job, exc)
    except BaseException as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise
    finally:  # the one place a cycle's events are settled, whatever happened above (workers/settle.py)
        settled = settlement.settle(r, token, by=token, why=why, archive_dir=job.settings.feedback_archive_dir)
    return report | {"cycle": token, "recovered": recovered, "settled": settled}


def _nothing_new(job: Job, data: TrainingData) -> dict[str, Any]:
    """No comparison or rating among the new events (none came, or only comments and votes a later revision
    replaced): training on the replay or the reward model alone would publish a version no user asked for."""
    reason = (
        f"none of the {len(data.events)} new feedback events gives a comparison or a rating"
        if data.events
        else "no new feedback"
    )
    settlement.record_nothing_new(job.r, job.token, reason=reason, feedback=data.feedback())
    job.progress("nothing_new", {"reason": reason})
    return {"status": "nothing_new", "reason": reason, "current": job.start_version, "feedback": data.feedback()}


def _conflict(job: Job, exc: Exception) -> dict[str, Any]:
    r = job.r
    for meta in registry.list_versions(r):
        if meta.get("cycle") == job.token and not registry.was_published(r, meta["version"]):
            registry.update_version(r, meta["version"], status="rejected", rejected_reason=str(exc))
    registry.record_event(r, "cycle_conflict", cycle=job.token, reason=str(exc), parent=job.start_version)
    return {"status": "conflict", "reason": str(exc), "current": registry.current_version(r)}


def pipeline(job: Job, data: TrainingData) -> dict[str, Any]:
    """Reward → update → gate → publish on `data`; each stage's result goes to the next, and what publishing does
    not need (reward model, reference, the parent's weights) is freed before the checkpoint is written."""
    from training.model import autocast

    with autocast(job.device):  # bf16 on a CUDA device (ALIGND_DEVICE), fp32 elsewhere
        rewards, cand = _reward_and_update(job, data)
        job.failpoint("after_ppo")
        verdict = gate_stage.run(job, rewards, cand)
        job.failpoint("after_gate")
    fallback = verdict.fallback_steps is not None
    if fallback or cand.lora:
        cand.trainer = None  # no trainer state matches the published weights: the next run starts afresh
    cand.release()
    rewards.release()
    report = publish.publish_candidate(job, data, rewards, cand, verdict)
    if report["status"] == "published":
        ppo_update.save_state(job, cand, report["version"], fallback)
        report["gc"] = checkpoint_gc.after_publish(job.r, job.settings)  # never raises: the version is out
    del cand
    gc.collect()
    return report


def _reward_and_update(job: Job, data: TrainingData) -> tuple[reward_stage.Rewards, update.Candidate]:
    """The reward stage, then the update against its result; or, for a DPO/KTO cycle on the CPU with a reward model
    already current (update.reward_beside), both at once on two threads (core/threads.py `beside`): the update does
    not need the new reward model, only its on-policy judge does, and the one current when the cycle began judges."""
    from training.model import autocast

    judge = reward_stage.current(job) if _reward_beside(job) else None
    if judge is None or judge.version is None:
        rewards = reward_stage.run(job, data)
        job.failpoint("after_reward")
        return rewards, update.run(job, data, rewards)

    def retrain() -> reward_stage.Rewards:
        with autocast(job.device):  # autocast is per thread
            return reward_stage.run(job, data)

    rewards, cand = beside(retrain, lambda: update.run(job, data, judge))
    job.failpoint("after_reward")
    return rewards, cand


def _reward_beside(job: Job) -> bool:
    """Whether the setting and the run allow it (a reward model to judge with is checked by the caller)."""
    return (
        job.cfg.update.reward_beside
        and job.retrain_reward
        and job.algorithm != "ppo"
        and not job.device.startswith("cuda")
    )


def run_training(
    r: redis.Redis,
    settings: Settings,
    cfg: CycleConfig,
    *,
    data: TrainingData | None = None,
    gated: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The cycle's stages without reading feedback: `cfg.update.algorithm` on `data` (DPO/KTO: a file's items or
    all feedback in Redis; PPO: none) against the current reward model, gated unless `gated` is off, published.
    No events are taken, so nothing is settled. CycleError when there is nothing to learn from."""
    failpoints.parse(settings.failpoints)
    cfg = with_suites(cfg, settings)
    algorithm = cfg.update.algorithm
    data = data or TrainingData()
    if algorithm != "ppo" and data.empty:
        raise CycleError(f"{algorithm}: nothing to learn from: no comparisons or rated answers")
    with FencedLock(r, names.TRAIN_LOCK, ttl_ms=int(cfg.lock_ttl_s * 1000)) as lock:
        progress = progress or log_progress
        job = open_job(r, settings, cfg, lock, trigger=algorithm, progress=progress, retrain_reward=False, gated=gated)
        try:
            report = pipeline(job, data)
        except registry.RegistryConflict as exc:
            return {"status": "conflict", "reason": str(exc), "current": registry.current_version(r)}
        return report | {"cycle": lock.token}


def run_ppo(
    r: redis.Redis, settings: Settings, cfg: CycleConfig, *, progress: Progress | None = None
) -> dict[str, Any]:
    """PPO increments against the current reward model, gated and published, without reading feedback (`alignd
    train ppo`): PPO whatever the cycle's algorithm."""
    return run_training(r, settings, cfg.with_update(algorithm="ppo"), progress=progress)


def run_preference(
    r: redis.Redis,
    settings: Settings,
    cfg: CycleConfig,
    algorithm: str,
    *,
    data: TrainingData | None = None,
    gated: bool = True,
) -> dict[str, Any]:
    """DPO or KTO (`alignd train dpo|kto`) on `data` (default: the most recent `reward.max_comparisons` items in
    Redis)."""
    if algorithm not in ("dpo", "kto"):
        raise ValueError(f"unknown preference algorithm {algorithm!r}; expected 'dpo' or 'kto'")
    data = data if data is not None else training_data.from_store(r, cfg.reward.max_comparisons)
    return run_training(r, settings, cfg.with_update(algorithm=algorithm), data=data, gated=gated)


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
