"""On-policy preference data from graders, for DPO and KTO.

PPO has a reward to which a grader's score can be added (`training/ppo.py` `grader_reward_fn`); DPO and KTO have
none. They get the graders' judgement the way iterative reasoning preference optimisation does (Pang et al. 2024,
"Iterative Reasoning Preference Optimization"): the current policy answers grader-suite prompts several times, each
answer is scored by its item's grader, and on every prompt where the scores differ the best-scoring answer is
preferred to each lower-scoring one (DPO pairs); for KTO, answers that pass are desirable and the others are not.
Prompts on which every answer scored the same teach nothing and give no pair. The items carry `weight` (the
cycle's `reward.grader_weight`) and `annotator` "grader:<suite>", so provenance tells them from people's labels.

    python -m pytest tests/training/test_grader_pairs.py -q
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.data import Comparison, Rated
from training.evaluate import generate_responses
from training.graders import Item, Suite, score_item


@dataclass
class GraderPairsConfig:
    """How many suite prompts one cycle samples, and how."""

    prompts: int = 64  # suite items drawn (with replacement) per cycle
    samples: int = 4  # answers per prompt: at 4, a prompt answered right half the time gives pairs 7 times in 8
    max_new_tokens: int = 64
    temperature: float = 1.0  # the policy's own distribution, as on-policy preference data needs
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.samples < 2 or self.temperature <= 0:
            raise ValueError(f"GraderPairsConfig out of range: {self}")


MIN_SUITE_PROMPTS = 8


def suite_prompts(new_items: int, share: float) -> int:
    """Suite prompts for one update: `share` of its prompts, counting the cycle's `new_items` labelled items as the
    rest (at least MIN_SUITE_PROMPTS). At share 1 nothing else counts, and the sampler's default number is drawn."""
    if share >= 1:
        return max(MIN_SUITE_PROMPTS, GraderPairsConfig.prompts)
    return max(MIN_SUITE_PROMPTS, math.ceil(new_items * share / (1 - share)))


@dataclass
class Graded:
    """One suite prompt, the policy's answers to it and their grader scores."""

    suite: str
    item: Item
    answers: list[str]
    scores: list[float]

    @property
    def prompt(self) -> list[dict[str, str]]:
        p = self.item.prompt
        return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)


def sample_graded(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, suites: Sequence[Suite], cfg: GraderPairsConfig
) -> list[Graded]:
    """`cfg.prompts` items drawn uniformly from all suites' items, each answered `cfg.samples` times and graded."""
    pool = [(s.name, it) for s in suites for it in s.items]
    if not pool:
        return []
    rng = random.Random(cfg.seed)
    drawn = [pool[rng.randrange(len(pool))] for _ in range(cfg.prompts)]
    prompts = [it.prompt for _, it in drawn for _ in range(cfg.samples)]
    answers = generate_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        do_sample=True,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
    out = []
    for i, (suite, item) in enumerate(drawn):
        texts = answers[i * cfg.samples : (i + 1) * cfg.samples]
        out.append(Graded(suite, item, texts, [score_item(item, t) for t in texts]))
    return out


def grader_comparisons(graded: Sequence[Graded], weight: float = 1.0) -> list[Comparison]:
    """DPO pairs: on each prompt, the first best-scoring answer over every distinct answer that scored lower."""
    pairs = []
    for n, g in enumerate(graded):
        best = max(range(len(g.answers)), key=lambda i: g.scores[i])
        worse = {g.answers[i]: g.scores[i] for i in range(len(g.answers)) if g.scores[i] < g.scores[best]}
        for text, score in worse.items():
            pairs.append(
                Comparison(
                    g.prompt,
                    g.answers[best],
                    text,
                    group=f"grader-{n}",
                    source=f"grader:{g.suite}:{g.item.id}",
                    annotator=f"grader:{g.suite}",
                    meta={"scores": [g.scores[best], score]},
                    weight=weight,
                )
            )
    return pairs


def grader_rated(graded: Sequence[Graded], weight: float = 1.0) -> list[Rated]:
    """KTO examples: every answer on a prompt whose answers scored differently, desirable when it passes its item's
    threshold (answers to prompts all right or all wrong are left out, as for DPO: they mostly restate the mean)."""
    return [
        Rated(
            g.prompt,
            text,
            score >= g.item.pass_threshold,
            group=f"grader-{n}",
            source=f"grader:{g.suite}:{g.item.id}",
            annotator=f"grader:{g.suite}",
            meta={"score": score},
            weight=weight,
        )
        for n, g in enumerate(graded)
        if len(set(g.scores)) > 1
        for text, score in zip(g.answers, g.scores)
    ]


def summary(graded: Sequence[Graded]) -> dict[str, float | int]:
    """What the sampled answers say about the policy: prompts, answers, mean pass rate, prompts with mixed scores."""
    answers = [(s, g.item.pass_threshold) for g in graded for s in g.scores]
    return {
        "prompts": len(graded),
        "answers": len(answers),
        "pass_rate": sum(s >= t for s, t in answers) / len(answers) if answers else 0.0,
        "mixed_prompts": sum(len(set(g.scores)) > 1 for g in graded),
    }
