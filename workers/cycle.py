"""One turn of the online loop: new feedback → reward model → PPO increment → gate → publish → settle.

Plain functions over a Redis client and the settings, so the Celery task (`workers/tasks.py`), the CLI
(`alignd train cycle`) and the tests run the same code. The steps, following InstructGPT (Ouyang et al. 2022) run
online (Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF", sec. 4.5, iterated online RLHF):

1. Take the training lock (store/lock.py): one cycle at a time; its fencing token guards every publish.
2. Settle what a dead cycle left behind (workers/settle.py), then read the new feedback through the `trainer`
   consumer group (store/feedback.py), reclaiming events a dead cycle left pending, and record them in flight.
3. Reward stage: retrain the reward model on *all* comparisons (store/comparisons.py), from the SFT trunk. It becomes
   the new reward version only if its held-out accuracy does not regress against the previous reward model measured
   on the same held-out prompts (the split is a seeded hash of the prompt). Reward versions are checkpoints too
   (`checkpoints/rm-vN`, sha256 manifest), tracked in Redis.
4. Policy stage: PPO increments (training/ppo.py) from the current policy against the current reward model,
   KL-regularised toward the SFT reference. The trainer state (critic, optimisers, KL controller, RNG) is resumed
   from the previous cycle when that cycle's policy is still the current version, else started fresh.
5. Gate stage (workers/gate.py): on held-out prompts sampled as users get them, the candidate must beat the current
   policy under the reward model, stay within the KL, degeneracy and length budgets, and pass the world's regression
   checks. If it fails, the policy from halfway through PPO is gated the same way and published in its place if it
   passes (PPO against a fixed reward model tends to overshoot into its errors late).
6. Publish stage: `workers.publish.publish_version(expected_current=<start version>, fencing_token=<lock token>)`,
   so a stale run or a run overtaken by a rollback cannot publish; or record the gate failure (fenced as well).
7. Settle (workers/settle.py), in the `finally` of every path: acknowledge the events if this cycle's version was
   made current or its gate failure recorded, else return them to the queue. A cycle that dies without reaching
   its `finally` (hard time limit, kill -9) is settled by the next one with the same rule.

The stages share a `CycleRun`; between them `failpoints.hit` (workers/failpoints.py) lets a test inject a fault at
a named moment. The reward model always retrains on all comparisons, so an acknowledged event keeps shaping later
reward models; acknowledgement only means "this event has been accounted for in a version or a recorded gate
failure".

    alignd train cycle --json            # one cycle, synchronously, in this process
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import redis

from core import names
from core.config import Settings
from store import feedback, keys, registry
from store.comparisons import all_comparisons, comparisons_for_events
from store.completions import sample_prompts
from store.lock import FencedLock
from store.registry import reference_version
from store.stats import feedback_stats
from workers import failpoints
from workers import settle as settlement
from workers.cycle_config import CYCLE_FILE, CycleConfig, GateConfig, UpdateConfig, load_cycle_config, with_suites
from workers.gate import config_for, gate, harmful_rate, is_degenerate, without_outcomes
from workers.gate import evaluate as evaluate_gate_metrics
from workers.publish import checkpoint_path, publish_version

__all__ = [
    "CYCLE_FILE",
    "CycleConfig",
    "CycleError",
    "GateConfig",
    "UpdateConfig",
    "check_arena",
    "gate",
    "harmful_rate",
    "is_degenerate",
    "load_cycle_config",
    "rollback",
    "run_cycle",
    "run_ppo",
    "train_reward",
]

log = logging.getLogger("alignd.cycle")

USER_PROMPT_POOL = 512  # user prompts sampled once per cycle; PPO batches draw from this pool
PPO_STATE_DIR = "ppo"  # under ALIGND_HOME: the PPO trainer state of the current version
Progress = Callable[[str, dict[str, Any]], None]


def log_progress(stage: str, info: dict[str, Any]) -> None:
    """The default progress callback: one log line per stage."""
    log.info("%s %s", stage, info)


class CycleError(Exception):
    """A cycle could not run (no policy, no preference data); nothing was published or acknowledged."""


def _stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class CycleRun:
    """What the stages of one cycle share: inputs, then each stage's results."""

    r: redis.Redis
    settings: Settings
    cfg: CycleConfig
    lock: FencedLock
    start_version: int
    events: list[feedback.FeedbackEvent]
    trigger: str
    progress: Progress
    # reward stage
    ref_version: int = 0
    ref_path: str = ""
    reward: dict[str, Any] = field(default_factory=dict)
    reliability: dict[str, Any] | None = None  # annotator reliability the policy update used (dpo/kto)
    rm_version: int | None = None
    reward_fn: Any = None
    ppo_reward_fn: Any = None  # reward_fn, plus the grader reward when reward.grader_weight is on
    ref_model: Any = None  # the SFT reference: a frozen copy, or the LoRA policy's base (training.lora.ReferenceView)
    lora: bool = False  # the policy update trains a LoRA adapter on the frozen reference (CycleConfig.update.adapter)
    parent_adapter: dict[str, Any] | None = None  # LoRA: the current version's adapter weights, for the gate
    value_init: Any = None  # the reward model, whose trunk initialises a fresh critic
    # policy stage
    trainer: Any = None
    halfway: tuple[int, dict[str, Any]] | None = None  # (steps, policy weights) for the gate's fallback
    ppo_info: dict[str, Any] = field(default_factory=dict)
    # gate stage
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    cand_eval: dict[str, Any] = field(default_factory=dict)
    parent_eval: dict[str, Any] = field(default_factory=dict)
    fallback_steps: int | None = None

    @property
    def token(self) -> int:
        return self.lock.token

    def failpoint(self, name: str) -> None:
        failpoints.hit(self.settings.failpoints, name)

    def check_lock(self, when: str) -> None:
        if self.lock.lost.is_set() or not self.lock.held():
            raise registry.RegistryConflict(f"the training lock was lost {when} (a newer run holds it)")

    def provenance(self) -> dict[str, Any]:
        comparisons, rated = comparisons_for_events(self.r, self.events)
        info = {
            "events": len(self.events),
            "new_comparisons": len(comparisons),
            "new_rated": len(rated),
            "by_type": dict(Counter(e.type for e in self.events)),
        }
        if self.events:
            info |= {"first_id": self.events[0].stream_id, "last_id": self.events[-1].stream_id}
        return {
            "parent": self.start_version,
            "reward_version": self.rm_version,
            "reference_version": self.ref_version,
            "feedback": info,
            "annotators": dict(Counter(e.user for e in self.events)),
            # who shaped this version and how much each counted: the policy update's table (dpo/kto), else the
            # reward model's (absent when the reward model was not retrained this cycle)
            "reliability": self.reliability or self.reward.get("reliability"),
        }


# ---------------------------------------------------------------------------------------------------- the cycle


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
    "gate_failed", "publish_failed" (the checkpoint could not be written), "skipped" (fewer than `min_events` new
    events) or "conflict" (overtaken). Raises store.lock.LockBusy when another cycle runs and CycleError when it
    cannot run at all."""
    cfg = with_suites(cfg or load_cycle_config(settings), settings)  # a bad suite file fails before any work
    if failpoints.parse(settings.failpoints):  # a misspelt failpoint fails here, before any feedback is taken
        log.warning(
            "failpoints armed (ALIGND_FAILPOINTS=%r): this cycle will be faulted on purpose", settings.failpoints
        )
    lock = FencedLock(r, names.TRAIN_LOCK, ttl_ms=int(cfg.lock_ttl_s * 1000))
    lock.acquire()
    try:
        return _cycle(
            r, settings, cfg, lock, trigger=trigger, min_events=min_events, progress=progress or log_progress
        )
    finally:
        lock.release()


def _cycle(
    r: redis.Redis,
    settings: Settings,
    cfg: CycleConfig,
    lock: FencedLock,
    *,
    trigger: str,
    min_events: int,
    progress: Progress,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    token = lock.token
    recovered = settlement.recover(r, token)
    start_version = registry.current_version(r)
    if start_version is None:
        raise CycleError("no policy version is registered: run `alignd bootstrap` first")
    waiting = feedback.unconsumed_count(r)
    if waiting < min_events:
        return {
            "status": "skipped",
            "reason": f"{waiting} new feedback events, fewer than {min_events}",
            "cycle": token,
            "current": start_version,
            "recovered": recovered,
        }
    events = feedback.read_new(r, f"cycle-{token}", cfg.max_events, claim_idle_ms=0)  # we hold the lock: any
    events.sort(key=lambda e: _stream_key(e.stream_id))  # pending entry belongs to a dead or fenced-off cycle
    settlement.begin(r, token, events, start_version)
    progress("feedback", {"events": len(events), "recovered": recovered})
    run = CycleRun(r, settings, cfg, lock, start_version, events, trigger, progress)
    why = "ended by an exception before settling"
    try:
        run.failpoint("after_feedback")
        report = _train_and_publish(run)
        why = report["status"]
    except registry.RegistryConflict as exc:  # a rollback or a newer run got there first: the events stay unused
        for meta in registry.list_versions(r):
            if meta.get("cycle") == token and not registry.was_published(r, meta["version"]):
                registry.update_version(r, meta["version"], status="rejected", rejected_reason=str(exc))
        registry.record_event(r, "cycle_conflict", cycle=token, reason=str(exc), parent=start_version)
        why = f"conflict: {exc}"
        return {
            "status": "conflict",
            "reason": str(exc),
            "cycle": token,
            "current": registry.current_version(r),
            "recovered": recovered,
        }
    except BaseException as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise
    finally:  # the one place a cycle's events are settled, whatever happened above (workers/settle.py)
        settled = settlement.settle(r, token, by=token, why=why)
    report.update(cycle=token, recovered=recovered, settled=settled, seconds=time.perf_counter() - t0, trigger=trigger)
    return report


def _train_and_publish(run: CycleRun, retrain_reward: bool = True) -> dict[str, Any]:
    from training.model import autocast

    with autocast(run.settings.torch_device()):  # bf16 on a CUDA device (ALIGND_DEVICE), fp32 elsewhere
        _stage_reward(run, retrain_reward)
        run.failpoint("after_reward")
        _stage_policy(run)
        run.failpoint("after_ppo")
        _stage_gate(run)
        run.failpoint("after_gate")
    return _stage_publish(run)


def _stage_reward(run: CycleRun, retrain: bool) -> None:
    """Retrain the reward model (unless `retrain` is off), then load the current one and the SFT reference."""
    from training.graders import load_suites
    from training.model import load_causal_lm
    from training.ppo import grader_reward_fn, reward_model_fn
    from training.reward import load_reward_model

    r, settings = run.r, run.settings
    device = settings.torch_device()
    run.ref_version = reference_version(r, run.start_version)
    run.ref_path = str(settings.checkpoint(registry.get_version(r, run.ref_version)["path"]))
    run.reward = (
        train_reward(r, settings, run.cfg, run.lock, ref_path=run.ref_path, progress=run.progress)
        if retrain
        else {"accepted": False, "reason": "not retrained", "version": registry.current_reward_version(r)}
    )
    run.rm_version = registry.current_reward_version(r)
    if run.rm_version is None:
        raise CycleError("no reward model yet: there is no preference data (send feedback first)")
    rm_meta = registry.get_reward_version(r, run.rm_version)
    rm, rm_tok = load_reward_model(settings.checkpoint(rm_meta["path"]), device, resolve_base=settings.checkpoint)
    run.reward_fn = reward_model_fn(rm, rm_tok, uncertainty_penalty=run.cfg.reward.uncertainty_penalty)
    run.value_init = rm
    run.ppo_reward_fn = run.reward_fn
    if run.cfg.reward.grader_weight > 0:  # the gate keeps judging by the learned reward alone
        suites, weight = load_suites(run.cfg.eval.suites), run.cfg.reward.grader_weight
        run.ppo_reward_fn = grader_reward_fn(run.reward_fn, suites, weight)
    run.lora = _use_lora(run)
    if not run.lora:  # LoRA: the reference is the policy's own base, loaded once in the policy stage
        run.ref_model, _ = load_causal_lm(run.ref_path, device)


def _use_lora(run: CycleRun) -> bool:
    """LoRA or full fine-tuning for this cycle's policy update (CycleConfig.update.adapter). LoRA continues an
    adapter version, or starts one on the reference itself; a version fully fine-tuned from it cannot be expressed
    as the reference plus an adapter, so it is updated in full."""
    from training.lora import adapter_base, parameter_count

    mode, update = run.cfg.update.adapter, run.cfg.update
    if mode == "full":
        return False
    current = run.settings.checkpoint(registry.get_version(run.r, run.start_version)["path"])
    if adapter_base(current) is None and run.start_version != run.ref_version:
        log.info(
            "cycle %s: v%s is a full fine-tune of v%s; this update is full too",
            run.token,
            run.start_version,
            run.ref_version,
        )
        return False
    return mode == "lora" or parameter_count(run.ref_path) >= update.lora_min_parameters


def _ppo_state_dir(settings: Settings, stored: str) -> Path:
    """The folder a stored PPO state path names: relative to ALIGND_HOME (so a moved home resumes); an absolute path
    from before, when gone, is looked up by name under this home."""
    p = Path(stored)
    if not p.is_absolute():
        return settings.home / p
    if not p.exists() and (settings.home / PPO_STATE_DIR / p.name).is_dir():
        return settings.home / PPO_STATE_DIR / p.name
    return p


def _stage_policy(run: CycleRun) -> None:
    """PPO increments from the current policy (resuming the trainer state when it belongs to it)."""
    from training.lora import load_policy
    from training.ppo import PPOTrainer, ValueModel

    r, settings, cfg, update = run.r, run.settings, run.cfg, run.cfg.update
    if update.algorithm != "ppo":
        _preference_update(run)
        return
    device = settings.torch_device()
    state = json.loads(r.get(keys.ppo_state()) or "null")
    state_dir = _ppo_state_dir(settings, state["path"]) if state else None
    resumed = bool(state and state.get("version") == run.start_version and state_dir.is_dir())
    current_path = settings.checkpoint(registry.get_version(r, run.start_version)["path"])
    if run.lora:
        resumed, trainer = False, _lora_trainer(run, current_path)  # a few-MB adapter: no state worth resuming
    elif resumed:
        trainer = PPOTrainer.load_state(
            state_dir, ref=run.ref_model, reward_fn=run.ppo_reward_fn, cfg=cfg.ppo, device=device
        )
    else:
        policy, tokenizer = load_policy(current_path, device, resolve_base=settings.checkpoint)
        trainer = PPOTrainer(
            cfg.ppo, policy, run.ref_model, run.ppo_reward_fn, tokenizer, ValueModel.from_model(run.value_init)
        )
    run.trainer = trainer
    sampler, n_user_prompts = _prompt_sampler(r, trainer.tokenizer, cfg)
    t_ppo, steps = time.perf_counter(), []
    while len(steps) < update.steps:
        elapsed = time.perf_counter() - t_ppo
        if steps and elapsed * (len(steps) + 1) / len(steps) > update.seconds:
            break  # the next step would overrun the budget (a step of the built-in model is ~10-20 s on 2 cores)
        if run.lock.lost.is_set():
            raise registry.RegistryConflict("the training lock was lost during PPO (a newer run holds it)")
        steps.append(trainer.step(trainer.sample_prompts(sampler)))
        run.progress("ppo", steps[-1])
        if (
            cfg.gate.fallback
            and run.halfway is None
            and (2 * len(steps) >= update.steps or 2 * (time.perf_counter() - t_ppo) >= update.seconds)
        ):
            run.halfway = len(steps), _snapshot(trainer.policy)
    run.ppo_info = {
        "algorithm": "ppo",  # every update names itself, as DPO/KTO's do (the version's `source` comes from it)
        "steps": len(steps),
        "total_steps": trainer.step_count,
        "resumed": resumed,
        "seconds": time.perf_counter() - t_ppo,
        "user_prompt_pool": n_user_prompts,
        "last": steps[-1] if steps else {},
        "reward_first": steps[0]["reward"] if steps else None,
        "reward_last": steps[-1]["reward"] if steps else None,
    }


def _lora_trainer(run: CycleRun, current_path: Path):
    """A PPO trainer on a LoRA adapter over the frozen reference: the current version's adapter continued, or a
    fresh one on the reference itself; the reference is the same base with the adapter off, the critic the reward
    model's trunk with an adapter of its own. One copy of the base in memory instead of three."""
    from training.ppo import PPOTrainer, ValueModel

    policy, tokenizer = _lora_policy(run, current_path)
    critic = ValueModel.from_model(run.value_init, lora=run.cfg.lora)  # shares the reward model's trunk weights
    return PPOTrainer(run.cfg.ppo, policy, None, run.ppo_reward_fn, tokenizer, critic)


def _lora_policy(run: CycleRun, current_path: Path):
    """(LoRA policy, tokenizer): the current version's adapter continued, or a fresh one on the reference itself;
    sets the run's reference (the base with the adapter off) and the parent's adapter weights for the gate."""
    from training.lora import ReferenceView, adapter_state, add_adapter, load_policy
    from training.model import load_causal_lm

    settings, device = run.settings, run.settings.torch_device()
    if run.start_version == run.ref_version:
        base, tokenizer = load_causal_lm(run.ref_path, device)
        policy = add_adapter(base, run.cfg.lora)
    else:
        policy, tokenizer = load_policy(current_path, device, resolve_base=settings.checkpoint, trainable=True)
    run.parent_adapter = adapter_state(policy)
    run.ref_model = ReferenceView(policy)
    return policy, tokenizer


def _preference_data(run: CycleRun) -> tuple[list, list, dict[str, int]]:
    """This cycle's new comparisons and thumbs (on-policy: answers of the current version) plus a seeded replay of
    up to `update.replay` older ones, as training items."""
    from training.data import Comparison, Rated

    new_c, new_r = comparisons_for_events(run.r, run.events)
    all_c, all_r = all_comparisons(run.r)
    fresh = {json.dumps(x, sort_keys=True) for x in new_c + new_r}
    older = [x for x in all_c + all_r if json.dumps(x, sort_keys=True) not in fresh]
    rng = random.Random(run.cfg.seed + run.token)
    replay = rng.sample(older, min(len(older), run.cfg.update.replay))
    items = new_c + new_r + replay
    comparisons = [Comparison.from_dict(x) for x in items if "chosen" in x]
    rated = [Rated.from_dict(x) for x in items if "chosen" not in x]
    # reliability is estimated on all feedback (the overlap items of every cycle), then applied to this cycle's items
    table = annotator_reliability(
        [Comparison.from_dict(x) for x in all_c], [Rated.from_dict(x) for x in all_r], apply=False
    )
    if run.cfg.reward.annotator_weights:
        for x in [*comparisons, *rated]:
            x.weight = table["annotators"].get(x.annotator or "", {}).get("weight", 1.0)
    run.reliability = table | {"applied": run.cfg.reward.annotator_weights}
    return comparisons, rated, {"new": len(new_c) + len(new_r), "replay": len(replay)}


def _preference_update(run: CycleRun) -> None:
    """DPO or KTO (update.algorithm) from the current policy against the SFT reference, on `_preference_data`; the
    gate and publish that follow are the same as after PPO (there is no halfway policy to fall back to)."""
    from types import SimpleNamespace

    from training.lora import load_policy
    from training.preference import dpo_items, train_dpo, train_kto

    algorithm, settings = run.cfg.update.algorithm, run.settings
    current_path = settings.checkpoint(registry.get_version(run.r, run.start_version)["path"])
    if run.lora:
        policy, tokenizer = _lora_policy(run, current_path)
        reference = None  # the adapter switched off (training/preference.py)
    else:
        policy, tokenizer = load_policy(current_path, settings.torch_device(), resolve_base=settings.checkpoint)
        reference = run.ref_model
    comparisons, rated, counts = _preference_data(run)
    requested = algorithm
    if algorithm == "dpo" and rated and not dpo_items(comparisons):
        # only thumbs on single answers: no pair for DPO, but KTO learns from exactly that (training/preference.py);
        # waiting for comparisons instead would leave a thumbs-only deployment untrained for ever
        algorithm = "kto"
    graded = _grader_items(run, policy, tokenizer, algorithm, counts)
    if algorithm == "dpo":
        comparisons += graded
    else:
        rated += graded
    t0 = time.perf_counter()
    try:
        if algorithm == "dpo":
            policy, metrics = train_dpo(run.cfg.dpo, policy, tokenizer, comparisons, reference=reference)
        else:
            policy, metrics = train_kto(run.cfg.kto, policy, tokenizer, comparisons, rated, reference=reference)
    except ValueError as exc:  # nothing this algorithm can learn from (e.g. only ties): the events wait for more
        raise CycleError(f"{algorithm}: {exc}") from None
    run.trainer = SimpleNamespace(policy=policy, tokenizer=tokenizer)
    run.ppo_info = {
        "algorithm": algorithm,
        **({"requested": requested} if requested != algorithm else {}),
        "steps": metrics.get("steps", 0),
        "seconds": time.perf_counter() - t0,
        "data": counts,
        "metrics": metrics,
        "resumed": False,
    }
    run.progress(algorithm, run.ppo_info)


def _grader_items(run: CycleRun, policy, tokenizer, algorithm: str, counts: dict[str, Any]) -> list:
    """With graders as reward (reward.grader_weight > 0, update.grader_prompt_share > 0): the current policy's own
    answers to grader-suite prompts, ranked by the graders, as DPO pairs or KTO examples (training/grader_pairs.py).
    The suite prompts are `grader_prompt_share` of the update's prompts, counting this cycle's new labelled items as
    the rest, as PPO counts its rollout prompts. `counts` gains what was sampled."""
    from training.grader_pairs import (
        GraderPairsConfig,
        grader_comparisons,
        grader_rated,
        sample_graded,
        suite_prompts,
        summary,
    )
    from training.graders import load_suites

    share, weight = run.cfg.update.grader_prompt_share, run.cfg.reward.grader_weight
    if share <= 0 or weight <= 0:
        return []
    n = suite_prompts(counts["new"], share)
    cfg = GraderPairsConfig(prompts=n, max_new_tokens=run.cfg.ppo.max_new_tokens, seed=run.cfg.seed + run.token)
    graded = sample_graded(policy, tokenizer, load_suites(run.cfg.eval.suites), cfg)
    items = grader_comparisons(graded, weight) if algorithm == "dpo" else grader_rated(graded, weight)
    counts["grader"] = summary(graded) | {"items": len(items), "weight": weight}
    return items


def _snapshot(policy) -> dict[str, Any]:
    """The trainable state of a policy: its adapter (a few MB) or every weight."""
    from training.lora import adapter_state, is_adapted

    if is_adapted(policy):
        return adapter_state(policy)
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def _restore(policy, snapshot: dict[str, Any]) -> None:
    from training.lora import is_adapted, load_adapter_state

    if is_adapted(policy):
        load_adapter_state(policy, snapshot)
    else:
        policy.load_state_dict(snapshot)


def _evaluation(run: CycleRun, model, tok, ecfg) -> dict[str, Any]:
    return evaluate_gate_metrics(model, tok, ecfg, reference=run.ref_model, reward_fn=run.reward_fn)


def _stage_gate(run: CycleRun) -> None:
    """Candidate vs the current policy (and the SFT reference) on a fresh held-out set; halfway fallback."""
    import torch

    from training.lora import load_policy

    # a fresh evaluation set (and sampling seed) per cycle, shared by both policies (workers/cycle_config.py)
    ecfg = dataclass_replace(run.cfg.eval, seed=run.cfg.eval.seed + run.token)
    trainer, steps = run.trainer, run.ppo_info["steps"]
    with torch.no_grad():
        run.cand_eval = _evaluation(run, trainer.policy, trainer.tokenizer, ecfg)
        parent_tok = trainer.tokenizer
        if run.lora:  # the parent is the same base with the adapter it started from
            candidate = _snapshot(trainer.policy)
            _restore(trainer.policy, run.parent_adapter)
            run.parent_eval = _evaluation(run, trainer.policy, parent_tok, ecfg)
            _restore(trainer.policy, candidate)
        else:
            current_path = run.settings.checkpoint(registry.get_version(run.r, run.start_version)["path"])
            parent_model, parent_tok = load_policy(
                current_path, run.settings.torch_device(), resolve_base=run.settings.checkpoint
            )
            run.parent_eval = _evaluation(run, parent_model, parent_tok, ecfg)
        ref_eval = (
            run.parent_eval
            if run.ref_version == run.start_version
            else _evaluation(run, run.ref_model, parent_tok, ecfg)
        )
    gcfg = config_for(run.cfg.gate, run.cfg.update.algorithm)
    passed, reasons, numbers = gate(run.cand_eval, run.parent_eval, gcfg, reference=ref_eval)
    if not passed and run.halfway is not None and run.halfway[0] < steps:
        # PPO against a fixed reward model can overshoot into its errors late in the run (harmful compliance rose in
        # a third of demo cycles); the policy from halfway through is a candidate too, checked by the same gate
        _restore(trainer.policy, run.halfway[1])
        with torch.no_grad():
            half_eval = _evaluation(run, trainer.policy, trainer.tokenizer, ecfg)
        half_passed, half_reasons, half_numbers = gate(half_eval, run.parent_eval, gcfg, reference=ref_eval)
        if half_passed:
            run.fallback_steps = run.halfway[0]
            passed, run.cand_eval = True, half_eval
            numbers = {
                **half_numbers,
                "fallback": {
                    "steps": run.fallback_steps,
                    "of": steps,
                    "full_run_reasons": reasons,
                    "full_run": numbers,
                },
            }
            reasons = []
        else:
            reasons = reasons + [f"(halfway, after {run.halfway[0]} steps: {'; '.join(half_reasons)})"]
    numbers["eval_seed"] = ecfg.seed
    if passed:
        run.ppo_info["published_steps"] = run.fallback_steps or steps
    run.passed, run.reasons, run.numbers = passed, reasons, numbers
    run.progress("gate", {"passed": passed, "reasons": reasons, **numbers})


def _stage_publish(run: CycleRun) -> dict[str, Any]:
    """Publish the candidate, or record the gate failure; either is what makes the events used (settle)."""
    from training.lora import folder_digest, save_adapter

    run.check_lock("before publishing")
    base = run.provenance()
    if not run.passed:
        settlement.record_gate_failure(run.r, run.token, reasons=run.reasons, gate=run.numbers, **base)
        run.failpoint("after_gate_failed")
        return {
            "status": "gate_failed",
            "reasons": run.reasons,
            "gate": run.numbers,
            "current": run.start_version,
            "reward": run.reward,
            "ppo": run.ppo_info,
            **base,
        }
    meta = {
        "source": (run.ppo_info or {}).get("algorithm", run.cfg.update.algorithm),  # ppo, dpo or kto: what made it
        "cycle": run.token,
        "trigger": run.trigger,
        **base,
        "metrics": {
            **without_outcomes(run.cand_eval),
            "gate": run.numbers,
            "parent_eval": without_outcomes(run.parent_eval),
        },
        "reward": {k: run.reward.get(k) for k in ("accepted", "version", "previous", "metrics", "reason")},
        "ppo": run.ppo_info,
    }
    policy, tok = run.trainer.policy, run.trainer.tokenizer
    if run.lora:
        meta["adapter"] = {"base_version": run.ref_version, **asdict(run.cfg.lora)}

    def save(d: Path) -> None:
        run.failpoint("in_checkpoint")
        if run.lora:  # the adapter alone, naming the base it was trained on (training/lora.py)
            save_adapter(
                policy, d, base=run.settings.stored_path(run.ref_path), base_digest=folder_digest(run.ref_path)
            )
        else:
            policy.save_pretrained(d)
        tok.save_pretrained(d)
        run.failpoint("in_publish")

    try:
        version = publish_version(
            run.r, run.settings, save, meta, expected_current=run.start_version, fencing_token=run.token
        )
    except Exception as exc:
        failed = _publish_failed(run, exc)
        if failed is None:
            raise
        return {**failed, "reward": run.reward, "ppo": run.ppo_info, **base}
    run.failpoint("after_publish")
    run.progress("published", {"version": version})
    _save_ppo_state(run, version)
    return {
        "status": "published",
        "version": version,
        "path": str(checkpoint_path(run.settings, version)),
        "gate": run.numbers,
        "reward": run.reward,
        "ppo": run.ppo_info,
        "metrics": without_outcomes(run.cand_eval),
        **base,
    }


def _publish_failed(run: CycleRun, exc: Exception) -> dict[str, Any] | None:
    """A checkpoint that could not be written (disk full, I/O error): record why and report it, so the operator
    sees the reason, not a stack trace. The writer removed its temporary folder; the current version serves on.
    Returns None for any other error (it propagates)."""
    text = f"{type(exc).__name__}: {exc}"
    if not (isinstance(exc, OSError) or "I/O error" in text or "No space left" in text):
        return None
    root = run.settings.checkpoints_dir
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    reason = (
        f"writing the new version's checkpoint under {root} failed ({text}); {free} bytes free there. "
        f"Free space (or set ALIGND_CHECKPOINT_ROOT); the events return to the queue for the next cycle"
    )
    registry.record_event(run.r, "publish_failed", cycle=run.token, reason=reason, parent=run.start_version)
    log.error("cycle %s: %s", run.token, reason)
    return {"status": "publish_failed", "reason": reason, "current": registry.current_version(run.r)}


def _save_ppo_state(run: CycleRun, version: int) -> None:
    """One state folder per version, so a rollback to an older version can never resume a newer version's state; a
    halfway fallback saves none (the trainer's optimisers and critic belong to the full run): the next cycle starts
    PPO afresh from this version."""
    if run.fallback_steps is not None or run.lora or run.cfg.update.algorithm != "ppo":
        return
    home = run.settings.home
    state_dir = run.trainer.save_state(home / PPO_STATE_DIR / f"state-v{version}")
    run.r.set(keys.ppo_state(), json.dumps({"version": version, "path": str(state_dir.relative_to(home))}))
    for old in state_dir.parent.glob("state-v*"):
        if old != state_dir and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def annotator_reliability(comparisons: list, rated: list, *, apply: bool) -> dict[str, Any]:
    """Each annotator's reliability over all derived feedback (training/reliability.py); with `apply`, every item's
    `weight` becomes its annotator's. What the provenance of a reward model and a version records."""
    from training.reliability import estimate, labels_from, table_dict, weigh

    table = estimate(labels_from(comparisons, rated))
    if apply:
        weigh([*comparisons, *rated], table)
    return {"applied": apply, "annotators": table_dict(table)}


def train_reward(
    r: redis.Redis,
    settings: Settings,
    cfg: CycleConfig,
    lock: FencedLock,
    *,
    data: tuple[list[dict], list[dict]] | None = None,
    ref_path: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Retrain on all comparisons (or `data` = (comparison dicts, rated dicts)); register and switch to the new
    reward version unless it regresses. Needs the training lock (its token fences the switch)."""
    from training.checkpoint import write_checkpoint
    from training.data import Comparison, Rated
    from training.lora import folder_digest
    from training.model import load_causal_lm
    from training.reward import (
        evaluate,
        load_reward_model,
        save_reward_model,
        split_by_prompt,
        train_reward_model,
    )

    progress = progress or log_progress
    if ref_path is None:
        current = registry.current_version(r)
        if current is None:
            raise CycleError("no policy version is registered: run `alignd bootstrap` first")
        ref_path = str(settings.checkpoint(registry.get_version(r, reference_version(r, current))["path"]))
    comparisons, rated = data if data is not None else all_comparisons(r)
    previous = registry.current_reward_version(r)
    if not comparisons and not rated:
        return {"accepted": False, "reason": "no preference data", "version": previous}
    items_c = [Comparison.from_dict(c) for c in comparisons]
    items_r = [Rated.from_dict(x) for x in rated]
    rcfg = cfg.reward
    reliability = annotator_reliability(items_c, items_r, apply=rcfg.annotator_weights)
    _, tokenizer = load_causal_lm(ref_path)
    tokenizer.padding_side = "right"  # reward.encode pads by hand; this only matters for tokenizer.pad callers
    lora = cfg.lora if _reward_lora(cfg, ref_path) else None
    init = None if lora is not None else _reward_init(r, settings, rcfg, previous, ref_path)  # an adapter: fresh
    model, metrics = train_reward_model(rcfg, items_c, items_r, base=init or ref_path, tokenizer=tokenizer, lora=lora)
    metrics["warm_start"] = init is not None
    report: dict[str, Any] = {
        "metrics": metrics,
        "n_comparisons": len(items_c),
        "n_rated": len(items_r),
        "previous": previous,
        "reliability": reliability,
    }
    if previous is not None:
        prev_meta = registry.get_reward_version(r, previous) or {}
        prev_path = settings.checkpoint(prev_meta["path"])
        prev_model, prev_tok = load_reward_model(prev_path, resolve_base=settings.checkpoint)
        _, heldout = split_by_prompt(items_c + items_r, rcfg.heldout_fraction, rcfg.seed)
        prev_acc = evaluate(prev_model, prev_tok, heldout, rcfg)["accuracy"]
        new_acc = metrics["heldout_accuracy"]
        report["previous_heldout_accuracy"] = prev_acc
        if new_acc is None or (prev_acc is not None and new_acc < prev_acc - cfg.gate.reward_tolerance):
            report |= {
                "accepted": False,
                "version": previous,
                "reason": f"held-out accuracy {new_acc} regresses vs reward v{previous} ({prev_acc}) "
                f"on the same held-out pairs",
            }
            progress("reward", report)
            return report
    version = registry.allocate_reward_version(r)
    path = settings.checkpoints_dir / f"rm-v{version}"
    manifest = {
        "kind": "reward_model",
        "version": version,
        "base": settings.stored_path(ref_path),
        "metrics": metrics,
        "n_comparisons": len(items_c),
        "n_rated": len(items_r),
        "reliability": reliability,
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
    report |= {"accepted": True, "version": version, "path": str(path)}
    progress("reward", report)
    return report


def _reward_init(r: redis.Redis, settings: Settings, rcfg, previous: int | None, ref_path: str) -> str | None:
    """The previous accepted reward model's folder when `reward.warm_start` is on and it was trained on the same
    base with as many heads (a new bootstrap or a changed `reward.heads` starts fresh); else None."""
    if not rcfg.warm_start or previous is None:
        return None
    meta = registry.get_reward_version(r, previous) or {}
    if meta.get("base") != settings.stored_path(ref_path) or meta.get("metrics", {}).get("heads", 1) != rcfg.heads:
        return None
    return str(settings.checkpoint(meta["path"]))


def _reward_lora(cfg: CycleConfig, ref_path: str | Path) -> bool:
    """LoRA or full training for the reward model (CycleConfig.reward.adapter); "auto" follows the policy update's
    choice for this base (update.adapter, update.lora_min_parameters)."""
    from training.lora import parameter_count

    mode = cfg.reward.adapter if cfg.reward.adapter != "auto" else cfg.update.adapter
    return mode == "lora" or (mode == "auto" and parameter_count(ref_path) >= cfg.update.lora_min_parameters)


def _prompt_sampler(r: redis.Redis, tokenizer, cfg: CycleConfig):
    """PPO prompts: recent user prompts (short enough), a share of grader suite prompts (update.grader_prompt_share),
    topped up with world prompts outside the held-out family."""
    from training.graders import load_suites
    from training.world import sample_task

    def fits(messages) -> bool:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= cfg.update.max_user_prompt_tokens

    pool = [
        messages
        for messages in sample_prompts(r, USER_PROMPT_POOL, random.Random(cfg.seed))
        if messages and messages[-1].get("role") == "user" and fits(messages)
    ]
    graded = []
    if cfg.update.grader_prompt_share > 0:
        for suite in load_suites(cfg.eval.suites):
            convs = (_as_messages(it.prompt) for it in suite.items)
            graded += [m for m in convs if fits(m)]

    def sampler(n: int, rng: random.Random) -> list[list[dict[str, str]]]:
        g = round(n * cfg.update.grader_prompt_share) if graded else 0
        k = min(round(n * cfg.update.user_prompt_share), n - g) if pool else 0
        prompts = [graded[rng.randrange(len(graded))] for _ in range(g)]
        prompts += [pool[rng.randrange(len(pool))] for _ in range(k)]
        prompts += [[{"role": "user", "content": sample_task(rng).prompt}] for _ in range(n - g - k)]
        return prompts

    return sampler, len(pool)


def _as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def run_ppo(
    r: redis.Redis, settings: Settings, cfg: CycleConfig, *, progress: Progress | None = None
) -> dict[str, Any]:
    """PPO increments against the current reward model, gated and published, without reading feedback
    (`alignd train ppo`). Same lock, stages, gate and publish path as a cycle; no events, so nothing to settle."""
    failpoints.parse(settings.failpoints)
    cfg = with_suites(cfg, settings)
    cfg = dataclass_replace(cfg, update=dataclass_replace(cfg.update, algorithm="ppo"))  # whatever the cycle's is
    lock = FencedLock(r, names.TRAIN_LOCK, ttl_ms=int(cfg.lock_ttl_s * 1000))
    lock.acquire()
    try:
        start_version = registry.current_version(r)
        if start_version is None:
            raise CycleError("no policy version is registered: run `alignd bootstrap` first")
        run = CycleRun(r, settings, cfg, lock, start_version, [], "ppo", progress or log_progress)
        try:
            report = _train_and_publish(run, retrain_reward=False)
        except registry.RegistryConflict as exc:
            return {"status": "conflict", "reason": str(exc), "current": registry.current_version(r)}
        return {**report, "cycle": lock.token}
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------- arena


def check_arena(r: redis.Redis, settings: Settings, cfg: CycleConfig) -> dict[str, Any]:
    """Roll the current version back to its parent when its live arena win rate against it is below
    `settings.arena_rollback_below` over at least `cfg.arena_min_votes` votes (run by beat: `alignd.arena_watch`)."""
    current = registry.current_version(r)
    if current is None:
        return {"status": "no_policy"}
    parent = (registry.get_version(r, current) or {}).get("parent")
    if parent is None:
        return {"status": "no_parent", "current": current}
    live = registry.arena_result(feedback_stats(r)["pairs"], current, parent)
    if live is not None:
        registry.update_version(r, current, live_win_rate=live)
    if not settings.arena or live is None or live["votes"] < cfg.arena_min_votes:
        return {"status": "watching", "current": current, "live": live}
    if live["win_rate"] >= settings.arena_rollback_below:
        return {"status": "ok", "current": current, "live": live}
    reason = (
        f"live arena win rate {live['win_rate']:.3f} vs v{parent} over {live['votes']} votes is below "
        f"{settings.arena_rollback_below}"
    )
    try:
        registry.set_current(
            r,
            parent,
            expected=current,
            event="rollback",
            detail={"from": current, "reason": reason, "automatic": True},
        )
    except registry.RegistryConflict as exc:
        return {"status": "conflict", "reason": str(exc)}
    registry.update_version(r, current, status="rolled_back", rolled_back_reason=reason)
    return {"status": "rolled_back", "from": current, "to": parent, "reason": reason, "live": live}


def rollback(r: redis.Redis, version: int, *, reason: str = "operator") -> dict[str, Any]:
    """Make an earlier (registered, not refused-everywhere) version current again through the registry's CAS."""
    meta = registry.get_version(r, version)
    if meta is None:
        raise KeyError(f"version {version} is not in the registry")
    current = registry.current_version(r)
    previous = registry.set_current(
        r, version, expected=current, event="rollback", detail={"from": current, "reason": reason}
    )
    return {"current": version, "previous": previous}


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
