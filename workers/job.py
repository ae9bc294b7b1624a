"""What the stages of one training run share: its inputs, fixed when the run starts under the training lock.

Every entry point — the feedback cycle (`alignd train cycle`, the beat-triggered Celery task) and `alignd train
ppo|dpo|kto` — opens a `Job` and hands it to the same stages (workers/cycle.py lists them); each stage returns a
typed result that the next one takes. The job holds no stage's result, so what a stage no longer needs can be freed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from core.config import Settings
from store import registry
from store.lock import FencedLock
from workers import failpoints
from workers.cycle_config import CycleConfig

log = logging.getLogger("alignd.cycle")

Progress = Callable[[str, dict[str, Any]], None]


def log_progress(stage: str, info: dict[str, Any]) -> None:
    """The default progress callback: one log line per stage."""
    log.info("%s %s", stage, info)


class CycleError(Exception):
    """A run could not start or learn (no policy, no preference data); nothing was published or acknowledged."""


@dataclass
class Job:
    """One run's inputs: where it stores, its configuration, the lock whose token fences its writes, and the policy
    version it starts from (and that version's SFT reference, which every update stays close to)."""

    r: redis.Redis
    settings: Settings
    cfg: CycleConfig
    lock: FencedLock
    start_version: int
    ref_version: int
    trigger: str  # what started it: "beat", "cli", "ppo", "dpo", "kto", "manual" (recorded in the version)
    progress: Progress = log_progress
    retrain_reward: bool = True  # the cycle retrains the reward model on all comparisons; the others use the current
    gated: bool = True  # off only by `alignd train dpo|kto --no-gate`: publish without the gate's checks

    @property
    def token(self) -> int:
        return self.lock.token

    @property
    def algorithm(self) -> str:
        return self.cfg.update.algorithm

    @property
    def device(self) -> str:
        return self.settings.torch_device()

    @property
    def current_path(self) -> Path:
        """The checkpoint folder of the version this run starts from."""
        return registry.version_path(self.settings, self.r, self.start_version)

    @property
    def ref_path(self) -> str:
        """The checkpoint folder of the SFT reference (the base an adapter is trained on)."""
        return str(registry.version_path(self.settings, self.r, self.ref_version))

    def failpoint(self, name: str) -> None:
        failpoints.hit(self.settings.failpoints, name)

    def check_lock(self, when: str) -> None:
        if self.lock.lost.is_set() or not self.lock.held():
            raise registry.RegistryConflict(f"the training lock was lost {when} (a newer run holds it)")


def open_job(
    r: redis.Redis, settings: Settings, cfg: CycleConfig, lock: FencedLock, *, trigger: str, **options: Any
) -> Job:
    """A job starting from the current version; CycleError when no version is registered."""
    start = registry.current_version(r)
    if start is None:
        raise CycleError("no policy version is registered: run `alignd bootstrap` first")
    return Job(r, settings, cfg, lock, start, registry.reference_version(r, start), trigger, **options)
