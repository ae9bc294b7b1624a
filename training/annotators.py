"""Simulated annotators: programmatic people who compare, rate and rank responses in the built-in world.

They stand in for the users of alignd in tests, benchmarks and the simulated-feedback loop. Each has a
noise-free utility (correctness by `training.world.check` dominates; a style term adds a taste for brevity or
detail, or a strict content policy) and answers with label noise, as AlpacaFarm (Dubois et al., 2023) emulates
human disagreement with 25 % flipped pairwise labels. `ORACLE` is the noise-free judge used to score policies
(`oracle_win_rate`), never as a source of training feedback.

    python -c "from training.annotators import annotator_pool; print(annotator_pool('balanced,brevity'))"
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from training.world import Task, check, is_refusal

STYLES = ("oracle", "balanced", "brevity", "detail", "strict")

# Utility scale: a correct response is worth 1, a wrong one 0; every style term stays below 1 in size so that
# correctness always dominates taste.
GOOD_THRESHOLD = 0.5  # utility below this is "bad": thumbs down, and a pair of two such is "both_bad"
TIE_EPS = 1e-9  # utilities this close are a tie (identical responses, or equally long correct ones)
LENGTH_WEIGHT = {"oracle": -0.01, "balanced": -0.01, "strict": -0.01, "brevity": -0.03, "detail": 0.03}  # per word
LENGTH_CAP = {"oracle": 40, "balanced": 40, "strict": 40, "brevity": 30, "detail": 25}  # words; bounds the term
HARMFUL_COMPLIANCE_UTILITY = {"strict": -2.0}  # complying with a harmful request; others use the default below
DEFAULT_HARMFUL_COMPLIANCE_UTILITY = -0.5  # worse than a mere mistake
OVER_REFUSAL_UTILITY = {"strict": 0.4}  # refusing a fine request: strict annotators find it only mildly bad
BOOTSTRAP_SAMPLES = 1000  # resamples for the win-rate confidence interval


@dataclass
class Annotator:
    name: str
    style: str  # one of STYLES
    noise: float = 0.25  # label flip probability; AlpacaFarm emulates human disagreement with 25 % flips

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown annotator style {self.style!r}; expected one of {STYLES}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"annotator noise must be a probability in [0, 1], got {self.noise}")

    def utility(self, task: Task, response: str) -> float:
        """Noise-free preference score: correctness (0/1) plus a policy adjustment plus a bounded length term."""
        value = check(task, response)
        refused = is_refusal(response)
        if task.kind == "harmful" and not refused:
            value = HARMFUL_COMPLIANCE_UTILITY.get(self.style, DEFAULT_HARMFUL_COMPLIANCE_UTILITY)
        elif task.kind != "harmful" and refused:
            value = OVER_REFUSAL_UTILITY.get(self.style, 0.0)
        words = min(len(response.split()), LENGTH_CAP[self.style])
        return value + LENGTH_WEIGHT[self.style] * words

    def compare(self, task: Task, a: str, b: str, rng: random.Random) -> int | str:
        """0 if `a` is better, 1 if `b` is, "tie" or "both_bad"; the 0/1 label is flipped with prob `noise`."""
        ua, ub = self.utility(task, a), self.utility(task, b)
        if ua < GOOD_THRESHOLD and ub < GOOD_THRESHOLD:
            return "both_bad"
        if abs(ua - ub) <= TIE_EPS:
            return "tie"
        label = 0 if ua > ub else 1
        return 1 - label if rng.random() < self.noise else label

    def thumbs(self, task: Task, response: str, rng: random.Random) -> str:
        """ "up" for a good response, "down" for a bad one, flipped with prob `noise`."""
        good = self.utility(task, response) >= GOOD_THRESHOLD
        if rng.random() < self.noise:
            good = not good
        return "up" if good else "down"

    def rank(self, task: Task, responses: Sequence[str], rng: random.Random) -> list[int]:
        """Indices of `responses` from best to worst; each adjacent pair is swapped with prob `noise`. Responses of
        equal utility come in random order: a person has no reason to prefer the first shown."""
        tiebreak = [rng.random() for _ in responses]
        order = sorted(range(len(responses)), key=lambda i: (-self.utility(task, responses[i]), tiebreak[i]))
        for i in range(len(order) - 1):
            if rng.random() < self.noise:
                order[i], order[i + 1] = order[i + 1], order[i]
        return order


ORACLE = Annotator("oracle", "oracle", noise=0.0)


def annotator_pool(spec: str, noise: float = 0.25) -> list[Annotator]:
    """Annotators from a comma list of styles ("balanced,brevity,detail,strict"), named sim-<style>-<k>.

    An entry may set its own noise as style@noise: "balanced@0.5" is a spammer (labels at random), "balanced@0.8"
    a contrarian (mostly the opposite of what it thinks), for planting bad annotators in a pool
    (training/reliability.py must find them). An "oracle" entry is noise-free whatever `noise` says: that is what
    makes it the oracle.
    """
    entries = [s.strip() for s in spec.split(",") if s.strip()]
    if not entries:
        raise ValueError(f"empty annotator spec {spec!r}; give a comma list of styles from {STYLES}")
    parsed = []
    for entry in entries:
        style, _, own = entry.partition("@")
        try:
            parsed.append((style, float(own) if own else noise))
        except ValueError:
            raise ValueError(f"annotator entry {entry!r}: the part after '@' must be a noise in [0, 1]") from None
    bad = [s for s, _ in parsed if s not in STYLES]
    if bad:
        raise ValueError(f"unknown annotator style(s) {bad} in {spec!r}; expected styles from {STYLES}")
    pool, seen = [], dict.fromkeys(STYLES, 0)
    for style, own_noise in parsed:
        seen[style] += 1
        pool.append(Annotator(f"sim-{style}-{seen[style]}", style, 0.0 if style == "oracle" else own_noise))
    return pool


def oracle_win_rate(
    tasks: Sequence[Task], responses_a: Sequence[str], responses_b: Sequence[str], rng: random.Random | None = None
) -> dict[str, float]:
    """Share of tasks on which ORACLE prefers a over b (ties count 0.5), with a 95 % percentile-bootstrap CI."""
    if not (len(tasks) == len(responses_a) == len(responses_b)):
        raise ValueError(
            f"need one response of each side per task, got {len(tasks)} tasks, "
            f"{len(responses_a)} and {len(responses_b)} responses"
        )
    if not tasks:
        raise ValueError("oracle_win_rate needs at least one task")
    rng = rng or random.Random(0)
    wins = []
    for task, a, b in zip(tasks, responses_a, responses_b):
        ua, ub = ORACLE.utility(task, a), ORACLE.utility(task, b)
        wins.append(0.5 if abs(ua - ub) <= TIE_EPS else float(ua > ub))
    n = len(wins)
    means = sorted(sum(rng.choices(wins, k=n)) / n for _ in range(BOOTSTRAP_SAMPLES))
    return {
        "win_rate": sum(wins) / n,
        "ci_low": means[int(0.025 * BOOTSTRAP_SAMPLES)],
        "ci_high": means[int(0.975 * BOOTSTRAP_SAMPLES) - 1],
        "n": n,
    }
