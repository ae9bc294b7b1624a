"""Publishing a checkpoint as a registry version (`publish_version`: the cycle, `alignd bootstrap`, `alignd train
sft`), and the publish stage of a training run (`publish_candidate`): the gated candidate becomes a version, fenced
by the training lock's token and by the version the run started from, or its gate failure is recorded."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis

from core.config import Settings
from store import registry
from training.checkpoint import write_checkpoint
from workers import settle as settlement
from workers.data import TrainingData
from workers.gate import without_outcomes
from workers.gate_stage import Verdict
from workers.job import Job
from workers.reward_stage import Rewards
from workers.update import Candidate

log = logging.getLogger("alignd.cycle")
REWARD_KEYS = ("accepted", "version", "previous", "metrics", "reason")  # of the reward stage's report, in a version


def checkpoint_path(settings: Settings, version: int) -> Path:
    return settings.checkpoints_dir / f"v{version}"


def publish_version(
    r: redis.Redis,
    settings: Settings,
    save_fn,
    meta: dict[str, Any],
    *,
    expected_current: int | None | str = "any",
    fencing_token: int | None = None,
) -> int:
    """Write a checkpoint (atomic, sha256 manifest), register it, and make it current by compare-and-set.

    `meta` carries provenance and metrics: parent, reward_version, feedback, annotators, metrics, source.
    """
    version = registry.allocate_version(r)
    path = checkpoint_path(settings, version)
    write_checkpoint(save_fn, path, {**meta, "version": version})
    registry.add_version(r, version, {**meta, "path": settings.stored_path(path), "created": time.time()})
    registry.set_current(
        r, version, expected=expected_current, fencing_token=fencing_token, detail={"parent": meta.get("parent")}
    )
    return version


def provenance(job: Job, data: TrainingData, rewards: Rewards, cand: Candidate) -> dict[str, Any]:
    """Where a version (or a refused candidate) came from: parent, reward model, reference, data, who labelled it."""
    return {
        "parent": job.start_version,
        "reward_version": rewards.version,
        "reference_version": job.ref_version,
        "feedback": data.feedback(),
        "data": data.source | _judged(cand),
        "annotators": data.annotators(),
        # who shaped this version and how much each counted: the policy update's table (dpo/kto), else the
        # reward model's (absent when the reward model was not retrained)
        "reliability": cand.reliability or rewards.report.get("reliability"),
    }


def _judged(cand: Candidate) -> dict[str, Any]:
    """The judge's on-policy pairs the update trained on beside the people's labels, their weight and the reward
    version that judged them (dpo with update.onpolicy_pairs; workers/preference.py): absent when none were (the
    option off, or no reward model yet: `update.data.onpolicy` says why)."""
    onpolicy = cand.info.get("data", {}).get("onpolicy")
    if not onpolicy or not onpolicy.get("pairs"):
        return {}
    return {
        "judged_pairs": onpolicy["pairs"],
        "judged_weight": onpolicy["weight"],
        "judged_by_reward_version": onpolicy["judge_reward_version"],
    }


def publish_candidate(
    job: Job, data: TrainingData, rewards: Rewards, cand: Candidate, verdict: Verdict
) -> dict[str, Any]:
    """Publish the candidate, or record the gate failure; either is what makes a cycle's events used (settle)."""
    job.check_lock("before publishing")
    base = provenance(job, data, rewards, cand)
    outcome = {"reward": rewards.report, "update": cand.info, **base}
    if not verdict.passed:
        settlement.record_gate_failure(
            job.r, job.token, source=cand.info["algorithm"], reasons=verdict.reasons, gate=verdict.numbers, **base
        )
        job.failpoint("after_gate_failed")
        status = {"status": "gate_failed", "reasons": verdict.reasons, "gate": verdict.numbers}
        return status | {"current": job.start_version} | outcome
    meta = _version_meta(job, rewards, cand, verdict) | base
    try:
        version = publish_version(
            job.r, job.settings, _saver(job, cand), meta, expected_current=job.start_version, fencing_token=job.token
        )
    except Exception as exc:
        failed = _publish_failed(job, exc)
        if failed is None:
            raise
        return failed | outcome
    job.failpoint("after_publish")
    job.progress("published", {"version": version})
    path = str(checkpoint_path(job.settings, version))
    published = {"status": "published", "version": version, "path": path, "gate": verdict.numbers}
    return published | {"metrics": without_outcomes(verdict.candidate)} | outcome


def _version_meta(job: Job, rewards: Rewards, cand: Candidate, verdict: Verdict) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "source": cand.info["algorithm"],  # ppo, dpo or kto: what made it
        "cycle": job.token,
        "trigger": job.trigger,
        "reward": {k: rewards.report.get(k) for k in REWARD_KEYS},
        "update": cand.info,
    }
    if verdict.skipped:
        meta |= {"metrics": {}, "gate": "skipped (--no-gate)"}
    else:
        gated = {"gate": verdict.numbers, "parent_eval": without_outcomes(verdict.parent)}
        meta["metrics"] = without_outcomes(verdict.candidate) | gated
    if cand.lora:
        meta["adapter"] = {"base_version": job.ref_version, **asdict(job.cfg.lora)}
    return meta


def update_info(meta: dict[str, Any]) -> dict[str, Any]:
    """A version's policy-update record: "update", or where versions published before it had one ("ppo" for every
    algorithm from the cycle, the algorithm's name from `alignd train dpo|kto`)."""
    return meta.get("update") or meta.get("ppo") or meta.get(str(meta.get("source"))) or {}


def _saver(job: Job, cand: Candidate):
    from training.lora import folder_digest, save_adapter

    def save(d: Path) -> None:
        job.failpoint("in_checkpoint")
        if cand.lora:  # the adapter alone, naming the base it was trained on (training/lora.py)
            ref = job.ref_path
            save_adapter(cand.policy, d, base=job.settings.stored_path(ref), base_digest=folder_digest(ref))
        else:
            cand.policy.save_pretrained(d)
        cand.tokenizer.save_pretrained(d)
        job.failpoint("in_publish")

    return save


def _publish_failed(job: Job, exc: Exception) -> dict[str, Any] | None:
    """A checkpoint that could not be written (disk full, I/O error): record why and report it, so the operator
    sees the reason, not a stack trace. The writer removed its temporary folder; the current version serves on.
    Returns None for any other error (it propagates)."""
    text = f"{type(exc).__name__}: {exc}"
    if not (isinstance(exc, OSError) or "I/O error" in text or "No space left" in text):
        return None
    root = job.settings.checkpoints_dir
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    reason = (
        f"writing the new version's checkpoint under {root} failed ({text}); {free} bytes free there. "
        f"Free space (or set ALIGND_CHECKPOINT_ROOT); the events return to the queue for the next cycle"
    )
    registry.record_event(job.r, "publish_failed", cycle=job.token, reason=reason, parent=job.start_version)
    log.error("cycle %s: %s", job.token, reason)
    return {"status": "publish_failed", "reason": reason, "current": registry.current_version(job.r)}
