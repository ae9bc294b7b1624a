"""The labelled items a training run learns from, derived once and handed down the stages.

A cycle's are the comparisons and rated answers derived from the feedback events it took (store/comparisons.py),
beside the history: the most recent `reward.max_comparisons` of all of them (store/recent.py; what the reward
model retrains on and what DPO/KTO replay), so a cycle's reads are bounded however much was ever voted; `alignd
train dpo|kto` takes a preference file's items or the same window of Redis's; `alignd train ppo` learns from none
(it optimises the current reward model). Provenance — what the items were, who labelled them — is computed here,
from the same lists the stages train on. The users' recent prompts, which PPO rolls out on and on-policy DPO
samples, are read here too (`user_prompts`).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from core.records import Comparison, Rated
from store.comparisons import comparisons_for_events
from store.completions import sample_prompts
from store.feedback import FeedbackEvent
from store.recent import window


@dataclass
class TrainingData:
    """New items (what this run has to learn from), the history they belong to, and where they came from."""

    comparisons: list[Comparison] = field(default_factory=list)
    rated: list[Rated] = field(default_factory=list)
    history_comparisons: list[Comparison] = field(default_factory=list)  # all of them, the new ones included
    history_rated: list[Rated] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # the version's "data" provenance
    events: list[FeedbackEvent] = field(default_factory=list)  # the feedback events the new items came from
    replay: bool = False  # DPO/KTO add a replay of older history items (a cycle's, iterative DPO)

    @property
    def empty(self) -> bool:
        return not self.comparisons and not self.rated

    def feedback(self) -> dict[str, Any]:
        """The feedback events behind this run (the version's "feedback" provenance)."""
        info: dict[str, Any] = {
            "events": len(self.events),
            "new_comparisons": len(self.comparisons) if self.events else 0,
            "new_rated": len(self.rated) if self.events else 0,
            "by_type": dict(Counter(e.type for e in self.events)),
        }
        if self.events:
            info |= {"first_id": self.events[0].stream_id, "last_id": self.events[-1].stream_id}
        return info

    def annotators(self) -> dict[str, int]:
        """Who labelled what this run learns from: feedback events per user, or items per annotator."""
        if self.events:
            return dict(Counter(e.user for e in self.events))
        return dict(Counter(x.annotator for x in [*self.comparisons, *self.rated] if x.annotator))


def from_events(r: redis.Redis, events: list[FeedbackEvent], limit: int | None) -> TrainingData:
    """A cycle's data: the items `events` give (a revised vote gives its revision's), and as history the most
    recent `limit` items (store/recent.py; None: all), read only when there is something new."""
    new_c, new_r = comparisons_for_events(r, events)
    source = {"feedback_events": len(events), "comparisons": len(new_c), "rated": len(new_r)}
    data = TrainingData(new_c, new_r, source=source, events=events, replay=True)
    if not data.empty:
        data.history_comparisons, data.history_rated = window(r, limit)
        data.source["history"] = len(data.history_comparisons) + len(data.history_rated)
    return data


def from_store(r: redis.Redis, limit: int | None = None) -> TrainingData:
    """The most recent `limit` comparisons and rated items in Redis (feedback, then imports; None: every one), all
    of them new to this run."""
    comparisons, rated = window(r, limit)
    source = {"redis": True, "comparisons": len(comparisons), "rated": len(rated)}
    return TrainingData(comparisons, rated, comparisons, rated, source)


def from_items(comparisons: list[Comparison], rated: list[Rated], source: dict[str, Any]) -> TrainingData:
    """Items read from a preference file (store/exchange.py `read_preferences`)."""
    return TrainingData(comparisons, rated, comparisons, rated, source)


def annotator_reliability(comparisons: list, rated: list, *, apply: bool) -> dict[str, Any]:
    """Each annotator's reliability over `comparisons` and `rated` (training/reliability.py); with `apply`, every
    item's `weight` becomes its annotator's. What the provenance of a reward model and a version records."""
    from training.reliability import estimate, labels_from, table_dict, weigh

    table = estimate(labels_from(comparisons, rated))
    if apply:
        weigh([*comparisons, *rated], table)
    return {"applied": apply, "annotators": table_dict(table)}


def prompt_fits(tokenizer, messages: list[dict[str, str]], max_tokens: int) -> bool:
    """Whether `messages` in the chat template, ready for the answer, is at most `max_tokens` long (prompt and answer
    must fit the context)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_tokens


def user_prompts(r: redis.Redis, tokenizer, n: int, max_tokens: int, rng: random.Random) -> list[list[dict[str, str]]]:
    """Up to `n` prompts drawn from the users' recent ones (store/completions.py), those ending in a user turn and at
    most `max_tokens` long (`prompt_fits`)."""
    drawn = sample_prompts(r, n, rng)
    return [m for m in drawn if m and m[-1].get("role") == "user" and prompt_fits(tokenizer, m, max_tokens)]
