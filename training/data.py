"""Preference data as the training library sees it: comparisons and single rated responses.

`store/` derives these from user feedback (as plain dicts with the same field names, since `store/` does not import
`training/`); `Comparison.from_dict` / `Rated.from_dict` turn them into these dataclasses.

How each kind is used by the reward model (README "How feedback is used"):
- `label="pref"`: Bradley–Terry pair, chosen over rejected, optional margin.
- `label="tie"`: the two rewards are pulled together (BT with target probability 0.5).
- `label="both_bad"`: both rewards are pushed below 0 (pointwise logistic term with target "bad").
- `Rated` (unpaired thumbs): pointwise logistic term on the single reward (up → good, down → bad).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}


@dataclass
class Comparison:
    prompt: list[Message]  # the conversation up to (not including) the compared assistant turn
    chosen: str
    rejected: str
    label: Literal["pref", "tie", "both_bad"] = "pref"
    margin: float = 0.0  # BT margin (e.g. rank distance); 0 means plain BT
    group: str | None = None  # pairs from one rank (or one completion) share a group and stay in one batch
    source: str = ""  # feedback event id(s) it came from, for provenance
    annotator: str | None = None  # user id of who gave the feedback
    meta: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0  # loss multiplier: the annotator's reliability weight (training/reliability.py)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Comparison:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Rated:
    prompt: list[Message]
    response: str
    good: bool  # thumbs up
    group: str | None = None
    source: str = ""
    annotator: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0  # loss multiplier, as Comparison.weight

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rated:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_key(prompt: list[Message]) -> str:
    """A stable key for a prompt, used to split train/held-out by prompt rather than by pair."""
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in prompt)
