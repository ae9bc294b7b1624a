"""DPO / KTO update (update.algorithm "dpo" | "kto"): preference optimisation straight from the labels.

The policy trains from the current version against its SFT ancestor (training/preference.py; Rafailov et al. 2023,
Ethayarajh et al. 2024) on the run's new items (workers/data.py) — a cycle's adds a seeded replay of up to
`update.replay` older ones (iterative DPO), `alignd train dpo|kto` learns from a file or everything in Redis — each
weighted by its annotator's reliability when reward.annotator_weights is on. DPO with only thumbs to learn from
trains with KTO, which learns from exactly that. With graders as reward, the policy's own answers to grader-suite
prompts, ranked by the graders, join the items (training/grader_pairs.py); with update.generic_share, generic
instruction-following preferences from the built-in world do (every family but the held-out one). With
`update.onpolicy_pairs`, DPO also learns from the current policy's answers to recent user prompts, judged by the reward
model (and the graders on suite prompts): Online DPO's pairs (training/onpolicy.py), at `update.onpolicy_weight`. The
judge is the reward model the cycle just trained, or, where it retrains beside the update (`update.reward_beside`),
the one current when the cycle began.

    alignd train dpo [--data FILE]       # or: alignd train kto …; both run the cycle's stages after the update
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from typing import Any

from core.records import Comparison, Rated
from workers.data import TrainingData, annotator_reliability, user_prompts
from workers.job import CycleError, Job
from workers.reward_stage import Rewards
from workers.update import Candidate, load_policy, stretched_preference


def run(job: Job, data: TrainingData, lora: bool, rewards: Rewards) -> Candidate:
    """Train DPO or KTO on `data`; a CycleError when nothing in it is learnable by the algorithm (e.g. only ties).
    `rewards` (workers/reward_stage.py) judges the on-policy pairs, when they are on."""
    from training.preference import dpo_items, train_dpo, train_kto

    cand = load_policy(job, lora)
    comparisons, rated, counts, cand.reliability = _items(job, data)
    requested = algorithm = job.algorithm
    if algorithm == "dpo" and rated and not dpo_items(comparisons):
        # only thumbs on single answers: no pair for DPO, but KTO learns from exactly that (training/preference.py);
        # waiting for comparisons instead would leave a thumbs-only deployment untrained for ever
        algorithm = "kto"
    graded = _grader_items(job, cand, algorithm, counts)
    graded += _generic_items(job, algorithm, len(comparisons) + len(rated), counts)
    judged = _judged_items(job, cand, rewards, counts) if algorithm == "dpo" else []
    reference = None if lora else cand.reference  # LoRA: the adapter switched off is the reference
    cfg = stretched_preference(job.cfg.update, job.cfg.dpo if algorithm == "dpo" else job.cfg.kto)
    t0 = time.perf_counter()
    try:
        if algorithm == "dpo":
            cand.policy, metrics = train_dpo(
                cfg, cand.policy, cand.tokenizer, comparisons + graded, reference=reference, train_only=judged
            )
        else:
            cand.policy, metrics = train_kto(
                cfg, cand.policy, cand.tokenizer, comparisons, rated + graded, reference=reference
            )
    except ValueError as exc:  # nothing this algorithm can learn from (e.g. only ties): the events wait for more
        raise CycleError(f"{algorithm}: {exc}") from None
    cand.info = {
        "algorithm": algorithm,
        **({"requested": requested} if requested != algorithm else {}),
        "steps": metrics.get("steps", 0),
        "seconds": time.perf_counter() - t0,
        "data": counts,
        "config": asdict(cfg),
        "metrics": metrics,
        "resumed": False,
    }
    job.progress(algorithm, cand.info)
    return cand


def _items(job: Job, data: TrainingData) -> tuple[list, list, dict[str, Any], dict[str, Any]]:
    """(comparisons, rated, counts, reliability): the new items plus, for a cycle, a seeded replay of older ones.
    Reliability is estimated on the whole history (the overlap items of every cycle), then applied to these."""
    older: list = []
    if data.replay:
        fresh = {x.identity for x in [*data.comparisons, *data.rated]}
        older = [x for x in [*data.history_comparisons, *data.history_rated] if x.identity not in fresh]
    rng = random.Random(job.cfg.seed + job.token)
    replay = rng.sample(older, min(len(older), job.cfg.update.replay))
    comparisons = data.comparisons + [x for x in replay if isinstance(x, Comparison)]
    rated = data.rated + [x for x in replay if isinstance(x, Rated)]
    applied = job.cfg.reward.annotator_weights
    table = annotator_reliability(data.history_comparisons, data.history_rated, apply=False)
    if applied:
        for x in [*comparisons, *rated]:
            x.weight = table["annotators"].get(x.annotator or "", {}).get("weight", 1.0)
    counts = {"new": len(data.comparisons) + len(data.rated), "replay": len(replay)}
    return comparisons, rated, counts, table | {"applied": applied}


def _grader_items(job: Job, cand: Candidate, algorithm: str, counts: dict[str, Any]) -> list:
    """With graders as reward (reward.grader_weight > 0, update.grader_prompt_share > 0): the current policy's own
    answers to grader-suite prompts, ranked by the graders, as DPO pairs or KTO examples (training/grader_pairs.py).
    The suite prompts are `grader_prompt_share` of the update's prompts, counting this run's new labelled items as
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

    share, weight = job.cfg.update.grader_prompt_share, job.cfg.reward.grader_weight
    if share <= 0 or weight <= 0:
        return []
    n = suite_prompts(counts["new"], share)
    cfg = GraderPairsConfig(prompts=n, max_new_tokens=job.cfg.ppo.max_new_tokens, seed=job.cfg.seed + job.token)
    graded = sample_graded(cand.policy, cand.tokenizer, load_suites(job.cfg.eval.suites), cfg)
    items = grader_comparisons(graded, weight) if algorithm == "dpo" else grader_rated(graded, weight)
    counts["grader"] = summary(graded) | {"items": len(items), "weight": weight}
    return items


def _generic_items(job: Job, algorithm: str, n_items: int, counts: dict[str, Any]) -> list:
    """`update.generic_share` of the update's items as generic instruction-following preferences from the built-in
    world (training/world.py `generic_pairs`, held-out family excluded): DPO pairs, or for KTO the better answer as
    desirable and the worse as undesirable. A regulariser from outside the users' labels, aimed at the held-out
    family (a skill no user label trains); `counts` gains how many joined."""
    from training.world import generic_pairs

    share = job.cfg.update.generic_share
    if share <= 0 or n_items == 0:
        return []
    n = round(n_items * share / (1 - share))  # of new + replay + generic, `share` is generic
    pairs = generic_pairs(n if algorithm == "dpo" else -(-n // 2), seed=job.cfg.seed + job.token)
    meta = {"source": "world:generic", "annotator": "generic:world"}
    if algorithm == "dpo":
        items = [Comparison(p, good, bad, group=f"generic-{i}", **meta) for i, (p, good, bad) in enumerate(pairs)]
    else:
        items = [
            Rated(p, text, good, group=f"generic-{i}", **meta)
            for i, (p, better, worse) in enumerate(pairs)
            for text, good in ((better, True), (worse, False))
        ]
    counts["generic"] = len(items)
    return items


def _judged_items(job: Job, cand: Candidate, rewards: Rewards, counts: dict[str, Any]) -> list:
    """Online DPO (update.onpolicy_pairs > 0, update.onpolicy_weight > 0): the current policy answers recent user
    prompts, the reward model `rewards` names (plus graders on suite prompts: `rewards.update_score`) judges them,
    and the pairs it separates by update.onpolicy_min_margin join the batch (training/onpolicy.py). The reward model
    is released after judging, so DPO trains without it beside the policy (the gate loads the current one). `counts`
    gains what was sampled and used, or why nothing was."""
    from training.onpolicy import OnPolicyConfig, draw, judged_comparisons, sample_judged, summary

    update = job.cfg.update
    if update.onpolicy_pairs <= 0 or update.onpolicy_weight <= 0:
        return []
    info: dict[str, Any] = {
        "weight": update.onpolicy_weight,
        "min_margin": update.onpolicy_min_margin,
        "judge_reward_version": rewards.version,
    }
    if rewards.version is None:
        counts["onpolicy"] = info | {"pairs": 0, "skipped": "no reward model to judge with"}
        return []
    t0 = time.perf_counter()
    seed = job.cfg.seed + job.token
    recent = user_prompts(
        job.r, cand.tokenizer, 4 * update.onpolicy_pairs, update.max_user_prompt_tokens, random.Random(seed)
    )
    prompts = draw(recent, update.onpolicy_pairs, random.Random(seed))
    if not prompts:
        counts["onpolicy"] = info | {"pairs": 0, "skipped": "no recent user prompts"}
        return []
    cfg = OnPolicyConfig(
        prompts=len(prompts),
        samples=update.onpolicy_samples,
        max_new_tokens=job.cfg.ppo.max_new_tokens,
        min_margin=update.onpolicy_min_margin,
        weight=update.onpolicy_weight,
        seed=seed,
    )
    judged = sample_judged(cand.policy, cand.tokenizer, prompts, rewards.load(job).update_score, cfg)
    rewards.release()
    pairs = judged_comparisons(judged, cfg.min_margin, cfg.weight)
    counts["onpolicy"] = info | summary(judged, pairs) | {"seconds": time.perf_counter() - t0}
    job.progress("onpolicy", counts["onpolicy"])
    return pairs
