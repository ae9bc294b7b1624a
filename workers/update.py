"""Policy update stage: from the current version to a candidate, by PPO, DPO or KTO (CycleConfig.update.algorithm).

This module decides, for every entry point, whether the update trains a LoRA adapter on the frozen SFT reference or
every weight (`use_adapter`), loads the policy and its reference accordingly, and hands over to the algorithm:
workers/ppo_update.py (PPO against the reward model) or workers/preference.py (DPO / KTO from the labels). Either
returns a `Candidate`, which the gate (workers/gate_stage.py) and publish (workers/publish.py) take.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.cycle_config import CycleConfig, UpdateConfig
from workers.job import Job

log = logging.getLogger("alignd.cycle")


@dataclass
class Candidate:
    """The update's result: the candidate policy and what the gate and publish need to judge and store it."""

    policy: Any
    tokenizer: Any
    reference: Any  # the SFT reference (KL): a frozen copy, or the LoRA policy with its adapter off (ReferenceView)
    lora: bool  # the policy is an adapter on the reference, published as the adapter alone
    parent_adapter: dict[str, Any] | None  # LoRA: the current version's adapter weights, the gate's parent
    info: dict[str, Any] = field(default_factory=dict)  # what the update did (the version's "update" metadata)
    halfway: tuple[int, dict[str, Any]] | None = None  # PPO: (steps, trainable weights) for the gate's fallback
    trainer: Any = None  # PPO: the trainer, whose state the next cycle resumes (workers/ppo_update.py)
    reliability: dict[str, Any] | None = None  # DPO/KTO: the annotator reliability the items were weighted by

    def release(self) -> None:
        """Drop what publishing does not need: the reference, the fallback snapshot and the parent's adapter."""
        self.reference = self.halfway = self.parent_adapter = None


def use_adapter(job: Job) -> bool:
    """LoRA or full fine-tuning for this run's policy update (CycleConfig.update.adapter; "auto" is LoRA when the
    API serves through vLLM): the one decision every entry point follows. LoRA continues an adapter version, or
    starts one on the reference itself; a version fully fine-tuned from the reference cannot be expressed as the
    reference plus an adapter, so it is updated in full."""
    from training.lora import adapter_base, parameter_count

    mode = job.cfg.update.adapter
    vllm = job.settings.serving_engine(parameter_count(job.ref_path)) == "vllm"
    if mode == "full":
        if vllm:
            log.warning("update.adapter is full: vLLM will refuse the version (it swaps adapters, not whole models)")
        return False
    if adapter_base(job.current_path) is None and job.start_version != job.ref_version:
        log.info("v%s is a full fine-tune of v%s; this update is full too", job.start_version, job.ref_version)
        return False
    # served through vLLM, every version is an adapter of vLLM's base: the only kind it hot-swaps (docs/engines.md)
    return mode == "lora" or vllm or parameter_count(job.ref_path) >= job.cfg.update.lora_min_parameters


def reward_adapter(cfg: CycleConfig, ref_path: str | Path) -> bool:
    """LoRA or full training for the reward model (CycleConfig.reward.adapter); "auto" follows the policy update's
    setting for this base (update.adapter, update.lora_min_parameters)."""
    from training.lora import parameter_count

    mode = cfg.reward.adapter if cfg.reward.adapter != "auto" else cfg.update.adapter
    return mode == "lora" or (mode == "auto" and parameter_count(ref_path) >= cfg.update.lora_min_parameters)


def run(job: Job, data, rewards) -> Candidate:
    """The update `job.algorithm` names, on `data` (workers/data.py) against `rewards` (workers/reward_stage.py)."""
    from workers import ppo_update, preference

    lora = use_adapter(job)
    if job.algorithm == "ppo":
        cand = ppo_update.run(job, rewards, lora)
    else:
        cand = preference.run(job, data, lora, rewards)
    gc.collect()  # the training loop's optimiser state and activations, before the gate loads the parent
    return cand


def stretched(update: UpdateConfig, seconds: float | None, count: int | None) -> tuple[float | None, int | None]:
    """A budget (seconds; steps or epochs) times `update.stretch`: one rule for every algorithm, so the spare time
    the demo gives its last cycle reaches PPO, DPO and KTO alike, with the steps or epochs to use it."""
    s = update.stretch
    return (None if seconds is None else seconds * s, None if count is None else math.ceil(round(count * s, 6)))


def stretched_preference(update: UpdateConfig, cfg: Any) -> Any:
    """A DPOConfig / KTOConfig with its whole budget (max_seconds, epochs, max_steps) stretched."""
    max_seconds, epochs = stretched(update, cfg.max_seconds, cfg.epochs)
    max_steps = stretched(update, None, cfg.max_steps)[1]
    return dataclasses.replace(cfg, max_seconds=max_seconds, epochs=epochs, max_steps=max_steps)


def load_policy(job: Job, lora: bool) -> Candidate:
    """The current version as a trainable policy, with its reference: for LoRA the current adapter continued (or a
    fresh one on the reference itself) and the same base with the adapter off as reference, one copy of the base in
    memory; else a full copy of the current version and a frozen copy of the reference."""
    from training.lora import ReferenceView, adapter_state, add_adapter
    from training.lora import load_policy as load
    from training.model import load_causal_lm

    settings = job.settings
    if not lora:
        policy, tokenizer = load(job.current_path, job.device, resolve_base=settings.checkpoint)
        reference, _ = load_causal_lm(job.ref_path, job.device)
        return Candidate(policy, tokenizer, reference, False, None)
    if job.start_version == job.ref_version:
        base, tokenizer = load_causal_lm(job.ref_path, job.device)
        policy = add_adapter(base, job.cfg.lora)
    else:
        policy, tokenizer = load(job.current_path, job.device, resolve_base=settings.checkpoint, trainable=True)
    return Candidate(policy, tokenizer, ReferenceView(policy), True, adapter_state(policy))


def snapshot(policy) -> dict[str, Any]:
    """The trainable state of a policy: its adapter (a few MB) or every weight."""
    from training.lora import adapter_state, is_adapted

    if is_adapted(policy):
        return adapter_state(policy)
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def restore(policy, state: dict[str, Any]) -> None:
    from training.lora import is_adapted, load_adapter_state

    if is_adapted(policy):
        load_adapter_state(policy, state)
    else:
        policy.load_state_dict(state)
