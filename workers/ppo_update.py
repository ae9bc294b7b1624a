"""PPO update (update.algorithm "ppo"): increments from the current policy against the current reward model.

InstructGPT's PPO (Ouyang et al. 2022; training/ppo.py), KL-regularised toward the SFT reference. The trainer
state (critic, optimisers, KL controller, RNG) is resumed from the previous cycle when that cycle's policy is still
the current version, else started fresh; a LoRA policy always starts afresh from its published adapter. Prompts are
recent user prompts, a share of grader-suite prompts and world prompts outside the held-out family. The policy from
halfway through is kept for the gate's fallback (workers/gate_stage.py).

    alignd train ppo --steps 4                 # PPO alone, gated and published, no new feedback
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import redis

from core.config import Settings
from store import keys, registry
from workers.cycle_config import CycleConfig
from workers.data import prompt_fits, user_prompts
from workers.job import Job
from workers.update import Candidate, load_policy, snapshot, stretched

USER_PROMPT_POOL = 512  # user prompts sampled once per cycle; PPO batches draw from this pool
PPO_STATE_DIR = "ppo"  # under ALIGND_HOME: the PPO trainer state of the current version


def run(job: Job, rewards, lora: bool) -> Candidate:
    """PPO steps until `update.steps` or the `update.seconds` budget (both stretched by `update.stretch`); the
    candidate carries the trainer."""
    cand, resumed = _trainer(job, rewards.load(job), lora)
    trainer, update = cand.trainer, job.cfg.update
    sampler, n_user_prompts = prompt_sampler(job.r, trainer.tokenizer, job.cfg)
    seconds, max_steps = stretched(update, update.seconds, update.steps)
    t0, steps = time.perf_counter(), []
    while len(steps) < max_steps:
        elapsed = time.perf_counter() - t0
        if steps and elapsed * (len(steps) + 1) / len(steps) > seconds:
            break  # the next step would overrun the budget (a step of the built-in model is ~10-20 s on 2 cores)
        if job.lock.lost.is_set():
            raise registry.RegistryConflict("the training lock was lost during PPO (a newer run holds it)")
        steps.append(trainer.step(trainer.sample_prompts(sampler)))
        job.progress("ppo", steps[-1])
        halfway = 2 * len(steps) >= max_steps or 2 * (time.perf_counter() - t0) >= seconds
        if job.cfg.gate.fallback and cand.halfway is None and halfway:
            cand.halfway = len(steps), snapshot(trainer.policy)
    cand.info = {
        "algorithm": "ppo",  # every update names itself (the version's `source` comes from it)
        "steps": len(steps),
        "total_steps": trainer.step_count,
        "resumed": resumed,
        "seconds": time.perf_counter() - t0,
        "user_prompt_pool": n_user_prompts,
        "last": steps[-1] if steps else {},
        "reward_first": steps[0]["reward"] if steps else None,
        "reward_last": steps[-1]["reward"] if steps else None,
    }
    return cand


def _trainer(job: Job, rewards, lora: bool) -> tuple[Candidate, bool]:
    """(candidate holding a PPO trainer, whether its state was resumed). LoRA: an adapter over the frozen
    reference, the critic the reward model's trunk with an adapter of its own — one copy of the base in memory, not
    three."""
    from training.model import load_causal_lm
    from training.ppo import PPOTrainer, ValueModel

    cfg = job.cfg
    if lora:
        cand = load_policy(job, lora=True)
        critic = ValueModel.from_model(rewards.model, lora=cfg.lora)  # shares the reward model's trunk weights
        cand.trainer = PPOTrainer(cfg.ppo, cand.policy, None, rewards.update_score, cand.tokenizer, critic)
        return cand, False  # a few-MB adapter: no state worth resuming
    state_dir = _resumable_state(job)
    if state_dir is None:
        cand = load_policy(job, lora=False)
        critic = ValueModel.from_model(rewards.model)
        cand.trainer = PPOTrainer(cfg.ppo, cand.policy, cand.reference, rewards.update_score, cand.tokenizer, critic)
        return cand, False
    reference, _ = load_causal_lm(job.ref_path, job.device)
    trainer = PPOTrainer.load_state(
        state_dir, ref=reference, reward_fn=rewards.update_score, cfg=cfg.ppo, device=job.device
    )
    return Candidate(trainer.policy, trainer.tokenizer, reference, False, None, trainer=trainer), True


def _resumable_state(job: Job) -> Path | None:
    """The saved trainer state of the version this run starts from, if there is one."""
    state = json.loads(job.r.get(keys.ppo_state()) or "null")
    if not state or state.get("version") != job.start_version:
        return None
    state_dir = _state_dir(job.settings, state["path"])
    return state_dir if state_dir.is_dir() else None


def _state_dir(settings: Settings, stored: str) -> Path:
    """The folder a stored PPO state path names: relative to ALIGND_HOME (so a moved home resumes); an absolute path
    from before, when gone, is looked up by name under this home."""
    p = Path(stored)
    if not p.is_absolute():
        return settings.home / p
    if not p.exists() and (settings.home / PPO_STATE_DIR / p.name).is_dir():
        return settings.home / PPO_STATE_DIR / p.name
    return p


def save_state(job: Job, cand: Candidate, version: int, fallback: bool) -> None:
    """One state folder per published version, so a rollback to an older version can never resume a newer
    version's state. None for a LoRA or DPO/KTO update, nor after a halfway fallback (the trainer's optimisers and
    critic belong to the full run): the next cycle then starts PPO afresh from this version."""
    if fallback or cand.lora or cand.trainer is None:
        return
    home = job.settings.home
    state_dir = cand.trainer.save_state(home / PPO_STATE_DIR / f"state-v{version}")
    job.r.set(keys.ppo_state(), json.dumps({"version": version, "path": str(state_dir.relative_to(home))}))
    for old in state_dir.parent.glob("state-v*"):
        if old != state_dir and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def prompt_sampler(r: redis.Redis, tokenizer, cfg: CycleConfig):
    """PPO prompts: recent user prompts (short enough), a share of grader suite prompts (update.grader_prompt_share),
    topped up with world prompts outside the held-out family. Returns (sampler, number of user prompts in the pool)."""
    from training.graders import load_suites
    from training.world import sample_task

    max_tokens = cfg.update.max_user_prompt_tokens
    pool = user_prompts(r, tokenizer, USER_PROMPT_POOL, max_tokens, random.Random(cfg.seed))
    graded = []
    if cfg.update.grader_prompt_share > 0:
        for suite in load_suites(cfg.eval.suites):
            convs = (_as_messages(it.prompt) for it in suite.items)
            graded += [m for m in convs if prompt_fits(tokenizer, m, max_tokens)]

    def sampler(n: int, rng: random.Random) -> list[list[dict[str, str]]]:
        g = round(n * cfg.update.grader_prompt_share) if graded else 0
        k = min(round(n * cfg.update.user_prompt_share), n - g) if pool else 0
        prompts = [graded[rng.randrange(len(graded))] for _ in range(g)]
        prompts += [pool[rng.randrange(len(pool))] for _ in range(k)]
        prompts += [[{"role": "user", "content": sample_task(rng).prompt}] for _ in range(n - g - k)]
        return prompts

    return sampler, len(pool)


def _as_messages(prompt: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
