"""On-policy preference pairs labelled by a judge: the data of Online DPO (Guo et al. 2024, "Direct Language Model
Alignment from Online AI Feedback"; TRL's `OnlineDPOTrainer`).

The current policy answers each prompt `samples` times at its own temperature; a judge scores every answer, and on
each prompt the best-scored answer is preferred to the worst-scored one when their scores differ by at least
`min_margin` (one pair per prompt, so the number of prompts is the number of pairs at most). The pairs join the
people's comparisons in the DPO batch at their own `weight` (training/preference.py weighs each pair's loss by it),
with annotator "judge" and the two scores in `meta`, so provenance and the reliability table tell them from
people's labels. Identical answers, or answers the judge cannot separate, give no pair.

The judge is a reward function `(prompts, responses) -> scores (B,)` as PPO's (training/ppo.py): in alignd the
reward model the cycle just trained, plus the graders' score on prompts that are a grader suite's items
(`grader_reward_fn`). Why a margin: a small reward model orders a correct answer over a plausible wrong one about
half the time (bench/probe_reward.py), so a pair it barely separates is a coin flip taught as a preference.

    python -m pytest tests/training/test_onpolicy.py -q
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.data import Comparison, Message
from training.evaluate import generate_responses

Judge = Callable[[list[list[Message]], list[str]], torch.Tensor]  # (prompts, responses) -> scores (B,)


@dataclass
class OnPolicyConfig:
    """How many prompts one update samples, how, and which judged pairs it keeps."""

    prompts: int = 32  # prompts answered; each gives at most one pair
    samples: int = 2  # answers per prompt: Guo et al.'s two; more widen best-vs-worst at the cost of generation
    max_new_tokens: int = 48  # as PPO's rollouts (CycleConfig ppo.max_new_tokens)
    temperature: float = 1.0  # the policy's own distribution: on-policy data, not a greedy answer repeated
    min_margin: float = 0.5  # judge units (a reward model's are standard deviations on the reference answers)
    weight: float = 0.5  # loss weight of a judged pair; a person's pair weighs 1 (or its reliability weight)
    batch_size: int = 64  # sequences per generate call
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.samples < 2 or self.temperature <= 0 or self.min_margin < 0 or self.weight < 0:
            raise ValueError(f"OnPolicyConfig out of range: {self}")


@dataclass
class Judged:
    """One prompt, the policy's answers to it and the judge's scores."""

    prompt: list[Message]
    answers: list[str]
    scores: list[float]

    @property
    def margin(self) -> float:
        return max(self.scores) - min(self.scores)


def sample_judged(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[Message]],
    judge: Judge,
    cfg: OnPolicyConfig,
) -> list[Judged]:
    """Each of `prompts` (at most `cfg.prompts`) answered `cfg.samples` times by `model` and scored by `judge`."""
    prompts = [list(p) for p in prompts[: cfg.prompts]]
    if not prompts:
        return []
    flat = [p for p in prompts for _ in range(cfg.samples)]  # (N * k,) prompt i's answers at i*k .. i*k + k-1
    answers = generate_responses(
        model,
        tokenizer,
        flat,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        do_sample=True,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
    with torch.no_grad():
        scores = judge(flat, answers).float().tolist()
    k = cfg.samples
    return [Judged(p, answers[i * k : (i + 1) * k], scores[i * k : (i + 1) * k]) for i, p in enumerate(prompts)]


def judged_comparisons(judged: Sequence[Judged], min_margin: float, weight: float) -> list[Comparison]:
    """DPO pairs: on each prompt the best-scored answer over the worst, when the scores differ by >= `min_margin`
    (and by more than nothing) and the texts differ."""
    pairs = []
    for n, j in enumerate(judged):
        best = max(range(len(j.answers)), key=lambda i: j.scores[i])
        worst = min(range(len(j.answers)), key=lambda i: j.scores[i])
        gap = j.scores[best] - j.scores[worst]
        if gap <= 0 or gap < min_margin or j.answers[best] == j.answers[worst]:
            continue
        pairs.append(
            Comparison(
                j.prompt,
                j.answers[best],
                j.answers[worst],
                group=f"judged-{n}",
                source="judge",
                annotator="judge",
                meta={"scores": [j.scores[best], j.scores[worst]]},
                weight=weight,
            )
        )
    return pairs


def summary(judged: Sequence[Judged], pairs: Sequence[Comparison]) -> dict[str, float | int | None]:
    """What was sampled and kept: prompts, answers, pairs, the judge's mean best-minus-worst margin over all prompts
    and over the kept pairs."""
    kept = [c.meta["scores"][0] - c.meta["scores"][1] for c in pairs]
    return {
        "prompts": len(judged),
        "answers": sum(len(j.answers) for j in judged),
        "pairs": len(pairs),
        "mean_margin": sum(j.margin for j in judged) / len(judged) if judged else None,
        "mean_kept_margin": sum(kept) / len(kept) if kept else None,
    }


def draw(prompts: Sequence[list[Message]], n: int, rng: random.Random) -> list[list[Message]]:
    """Up to `n` distinct prompts from `prompts` (a recent-prompt sample may repeat one), in a seeded order."""
    unique = list({tuple((m["role"], m["content"]) for m in p): p for p in prompts}.values())
    rng.shuffle(unique)
    return unique[:n]
