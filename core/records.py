"""Preference data as every layer sees it: a comparison of two answers, or one rated answer.

`store/comparisons.py` derives these from user feedback (and `store/exchange.py` reads them from preference files);
`training/` learns from them; `workers/` hands them from one to the other unchanged. They live in the ground
package because both store and training import them and neither imports the other.

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


class _Record:
    """What both kinds share: built from and written as plain dicts (Redis, preference files)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | _Record):
        if isinstance(d, cls):
            return d
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stored(self) -> dict[str, Any]:
        """Every field but the training weight, which is set per run (what store/exchange.py writes and hashes)."""
        return {k: v for k, v in asdict(self).items() if k != "weight"}


@dataclass
class Comparison(_Record):
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

    @property
    def identity(self) -> tuple:
        """The same label derived twice (a cycle's new items and its history) has the same identity."""
        return ("comparison", self.group, self.source, self.annotator, self.chosen, self.rejected, self.label)


@dataclass
class Rated(_Record):
    prompt: list[Message]
    response: str
    good: bool  # thumbs up
    group: str | None = None
    source: str = ""
    annotator: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0  # loss multiplier, as Comparison.weight

    @property
    def identity(self) -> tuple:
        return ("rated", self.group, self.source, self.annotator, self.response, self.good)
