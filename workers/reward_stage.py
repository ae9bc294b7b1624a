"""Reward stage: retrain the reward model on recent comparisons, then load the current one for the stages after it.

The reward model retrains from the SFT trunk (or warm-starts from the previous accepted model) on the most recent
`reward.max_comparisons` comparisons and rated answers (store/recent.py; the cycle's history, workers/data.py). It
becomes the new reward version only if its held-out accuracy does not regress against the previous reward model
measured on the same held-out prompts (the split is a seeded hash of the prompt). Reward versions are checkpoints
too (`checkpoints/rm-vN`, sha256 manifest), tracked in Redis.

    alignd train reward [--data FILE]       # this stage alone
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import Any

import redis

from core.config import Settings
from core.records import Comparison, Rated
from store import registry
from store.lock import FencedLock
from store.recent import window
from workers.cycle_config import CycleConfig
from workers.data import TrainingData, annotator_reliability
from workers.job import CycleError, Job, Progress, log_progress
from workers.update import reward_adapter


@dataclass
class Rewards:
    """The reward stage's result: what happened to the reward model, and the current one as reward functions,
    loaded by the first stage that scores with it (`load`): a DPO/KTO update never does, so its training does not
    hold a reward model beside the policy; the gate loads it after."""

    report: dict[str, Any]  # the retraining's report (accepted, version, metrics), or why it was not retrained
    version: int | None  # the current reward version (None: none yet; only a DPO/KTO update can run without one)
    model: Any = None  # the current reward model: the trunk a fresh PPO critic starts from
    score: Any = None  # its reward function (training/ppo.py reward_model_fn): what the gate judges by
    update_score: Any = None  # what PPO optimises: `score`, plus the graders' when reward.grader_weight is on

    def load(self, job: Job) -> Rewards:
        """Load the current reward model (once); nothing when there is none."""
        from training.graders import load_suites
        from training.ppo import grader_reward_fn, reward_model_fn
        from training.reward import load_reward_model

        if self.version is None or self.model is not None:
            return self
        path = registry.reward_path(job.settings, job.r, self.version)
        self.model, tok = load_reward_model(path, job.device, resolve_base=job.settings.checkpoint)
        self.score = reward_model_fn(self.model, tok, uncertainty_penalty=job.cfg.reward.uncertainty_penalty)
        self.update_score = self.score
        if job.cfg.reward.grader_weight > 0:  # the gate keeps judging by the learned reward alone
            suites, weight = load_suites(job.cfg.eval.suites), job.cfg.reward.grader_weight
            self.update_score = grader_reward_fn(self.score, suites, weight)
        return self

    def release(self) -> None:
        """Drop the model (its trunk is as large as the policy's) once no later stage scores with it."""
        self.model = self.score = self.update_score = None
        gc.collect()


def run(job: Job, data: TrainingData) -> Rewards:
    """Retrain (a cycle) or keep the current reward model; PPO without one is a CycleError."""
    if not job.retrain_reward:
        rewards = current(job)
    else:
        history = (data.history_comparisons, data.history_rated)
        report = train_reward(
            job.r, job.settings, job.cfg, job.lock, data=history, ref_path=job.ref_path, progress=job.progress
        )
        gc.collect()  # the training run's model, optimiser and activations
        rewards = Rewards(report, registry.current_reward_version(job.r))
    if rewards.version is None and job.algorithm == "ppo":
        raise CycleError("no reward model yet: there is no preference data (send feedback first)")
    return rewards


def current(job: Job) -> Rewards:
    """The current reward model, not retrained (`alignd train …`; the on-policy judge of an update that runs beside
    the retraining)."""
    version = registry.current_reward_version(job.r)
    return Rewards({"accepted": False, "reason": "not retrained", "version": version}, version)


def train_reward(
    r: redis.Redis,
    settings: Settings,
    cfg: CycleConfig,
    lock: FencedLock,
    *,
    data: tuple[list[Comparison], list[Rated]] | None = None,
    ref_path: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Retrain on the most recent `reward.max_comparisons` items (or `data` = (comparisons, rated)); register and
    switch to the new reward version
    unless it regresses. Needs the training lock (its token fences the switch)."""
    progress = progress or log_progress
    if ref_path is None:
        current = registry.current_version(r)
        if current is None:
            raise CycleError("no policy version is registered: run `alignd bootstrap` first")
        ref_path = str(registry.version_path(settings, r, registry.reference_version(r, current)))
    comparisons, rated = data if data is not None else window(r, cfg.reward.max_comparisons)
    previous = registry.current_reward_version(r)
    if not comparisons and not rated:
        return {"accepted": False, "reason": "no preference data", "version": previous}
    model, tokenizer, report, lora = _fit(r, settings, cfg, ref_path, comparisons, rated, previous)
    if previous is not None:
        refusal = _regression(r, settings, cfg, previous, comparisons + rated, report)
        if refusal is not None:
            progress("reward", report | refusal)
            return report | refusal
    report |= _register(r, settings, lock, model, tokenizer, report, ref_path, lora)
    progress("reward", report)
    return report


def _fit(r, settings: Settings, cfg: CycleConfig, ref_path: str, comparisons, rated, previous: int | None):
    """(model, tokenizer, report, LoRA config or None): one training run of the reward model."""
    from training.model import load_causal_lm
    from training.reward import train_reward_model

    rcfg = cfg.reward
    reliability = annotator_reliability(comparisons, rated, apply=rcfg.annotator_weights)
    _, tokenizer = load_causal_lm(ref_path)
    tokenizer.padding_side = "right"  # reward.encode pads by hand; this only matters for tokenizer.pad callers
    lora = cfg.lora if reward_adapter(cfg, ref_path) else None
    init = None if lora is not None else _warm_start(r, settings, rcfg, previous, ref_path)  # an adapter: fresh
    model, metrics = train_reward_model(
        rcfg, comparisons, rated, base=init or ref_path, tokenizer=tokenizer, lora=lora
    )
    metrics["warm_start"] = init is not None
    report = {
        "metrics": metrics,
        "n_comparisons": len(comparisons),
        "n_rated": len(rated),
        "previous": previous,
        "reliability": reliability,
    }
    return model, tokenizer, report, lora


def _regression(r, settings: Settings, cfg: CycleConfig, previous: int, items: list, report: dict) -> dict | None:
    """The refusal when the new model's held-out accuracy is below the previous model's on the same held-out pairs
    (beyond gate.reward_tolerance); None when it may become current. Records the previous accuracy in `report`."""
    from training.reward import evaluate, load_reward_model, split_by_prompt

    prev_model, prev_tok = load_reward_model(
        registry.reward_path(settings, r, previous), resolve_base=settings.checkpoint
    )
    _, heldout = split_by_prompt(items, cfg.reward.heldout_fraction, cfg.reward.seed)
    prev_acc = evaluate(prev_model, prev_tok, heldout, cfg.reward)["accuracy"]
    del prev_model
    new_acc = report["metrics"]["heldout_accuracy"]
    report["previous_heldout_accuracy"] = prev_acc
    if new_acc is not None and (prev_acc is None or new_acc >= prev_acc - cfg.gate.reward_tolerance):
        return None
    reason = f"held-out accuracy {new_acc} regresses vs reward v{previous} ({prev_acc}) on the same held-out pairs"
    return {"accepted": False, "version": previous, "reason": reason}


def _register(r, settings: Settings, lock: FencedLock, model, tokenizer, report: dict, ref_path: str, lora):
    """Write the new reward checkpoint, register it and make it current (fenced by the lock's token)."""
    from training.checkpoint import write_checkpoint
    from training.lora import folder_digest
    from training.reward import save_reward_model

    version = registry.allocate_reward_version(r)
    path = settings.checkpoints_dir / f"rm-v{version}"
    manifest = {
        "kind": "reward_model",
        "version": version,
        "base": settings.stored_path(ref_path),
        **{k: report[k] for k in ("metrics", "n_comparisons", "n_rated", "reliability")},
        "cycle": lock.token,
    }
    if lora is not None:  # the adapter and score head alone, naming the SFT base they were trained on
        manifest["adapter"] = asdict(lora)
    digest = folder_digest(ref_path) if lora is not None else None
    write_checkpoint(
        lambda d: save_reward_model(model, tokenizer, d, base=manifest["base"], base_digest=digest), path, manifest
    )
    registry.add_reward_version(r, version, {**manifest, "path": settings.stored_path(path)})
    registry.set_current_reward(r, version, fencing_token=lock.token)
    return {"accepted": True, "version": version, "path": str(path)}


def _warm_start(r: redis.Redis, settings: Settings, rcfg, previous: int | None, ref_path: str) -> str | None:
    """The previous accepted reward model's folder when `reward.warm_start` is on and it was trained on the same
    base with as many heads (a new bootstrap or a changed `reward.heads` starts fresh); else None."""
    if not rcfg.warm_start or previous is None:
        return None
    meta = registry.get_reward_version(r, previous) or {}
    if meta.get("base") != settings.stored_path(ref_path) or meta.get("metrics", {}).get("heads", 1) != rcfg.heads:
        return None
    return str(registry.reward_path(settings, r, previous))
