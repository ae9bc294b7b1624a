"""One-coin Dawid–Skene reliability (training/reliability.py) on simulated pools with planted bad annotators."""

from __future__ import annotations

import random

import pytest

from training.data import Comparison, Rated
from training.reliability import Label, ReliabilityConfig, estimate, labels_from, weigh, weight_of

HONEST = {"h1": 0.9, "h2": 0.85, "h3": 0.8, "h4": 0.75, "h5": 0.7, "h6": 0.8}
PLANTED = {"spammer": 0.5, "contrarian": 0.2}


def simulated_pool(accuracy: dict[str, float], items: int, per_item: int, single: int, seed: int) -> list[Label]:
    """`items` questions each answered by `per_item` random annotators, plus `single` answered by one each."""
    rng = random.Random(seed)
    names, labels = list(accuracy), []
    for k in range(items + single):
        truth = rng.random() < 0.5
        for a in rng.sample(names, per_item if k < items else 1):
            labels.append(Label(f"q{k}", a, truth if rng.random() < accuracy[a] else not truth))
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_spammer_and_contrarian_are_recovered_and_honest_accuracies_are_close(seed):
    truth = HONEST | PLANTED
    table = estimate(simulated_pool(truth, items=3000, per_item=3, single=2000, seed=seed))
    assert set(table) == set(truth)
    for name, p in HONEST.items():
        assert abs(table[name].accuracy - p) < 0.06, (name, table[name])
        assert table[name].identified and table[name].weight > 0.5
    assert abs(table["spammer"].accuracy - 0.5) < 0.08
    assert table["contrarian"].accuracy < 0.35
    lowest = sorted(table.values(), key=lambda r: r.weight)[:2]
    assert {r.annotator for r in lowest} == set(PLANTED) and all(r.weight < 0.3 for r in lowest)
    assert table["contrarian"].weight == 0.0
    # the weights order the honest annotators as their true accuracies do (ties of truth aside)
    assert table["h1"].weight > table["h3"].weight > table["h5"].weight


def test_without_overlap_nothing_is_identified_and_everyone_keeps_the_prior():
    table = estimate(simulated_pool(HONEST | PLANTED, items=0, per_item=2, single=500, seed=0))
    cfg = ReliabilityConfig()
    assert all(not r.identified and r.accuracy == cfg.prior_accuracy and r.weight == 1.0 for r in table.values())
    assert sum(r.labels for r in table.values()) == 500 and all(r.overlap == 0 for r in table.values())


def test_a_reference_labeller_makes_single_labelled_items_count():
    rng, labels, reference = random.Random(3), [], {}
    for k in range(800):
        truth = rng.random() < 0.5
        who, p = ("good", 0.9) if k % 2 else ("spammer", 0.5)
        labels.append(Label(f"q{k}", who, truth if rng.random() < p else not truth))
        reference[f"q{k}"] = truth if rng.random() < 0.85 else not truth  # e.g. a model's verdict
    assert not any(r.identified for r in estimate(labels).values())
    table = estimate(labels, reference=reference)
    assert table["good"].identified and table["spammer"].identified
    assert abs(table["good"].accuracy - 0.9) < 0.06 and abs(table["spammer"].accuracy - 0.5) < 0.08
    assert table["good"].weight > 1.0 and table["spammer"].weight < 0.3


def test_weight_is_clipped_log_odds_relative_to_the_prior():
    cfg = ReliabilityConfig()
    assert weight_of(cfg.prior_accuracy, cfg) == pytest.approx(1.0)
    assert weight_of(0.5, cfg) == 0.0 and weight_of(0.1, cfg) == 0.0
    assert weight_of(0.999, cfg) == pytest.approx(weight_of(cfg.weight_cap_accuracy, cfg))
    with pytest.raises(ValueError, match="prior_accuracy"):
        ReliabilityConfig(prior_accuracy=0.5)


def test_labels_from_feedback_items_and_weigh():
    prompt = [{"role": "user", "content": "q"}]

    def pair(who: str, chosen: int, rejected: int, label: str = "pref") -> Comparison:
        meta = {"completion_id": "c1", "chosen_index": chosen, "rejected_index": rejected}
        return Comparison(prompt, "a", "b", label=label, annotator=who, meta=meta)

    comparisons = [
        pair("x", 0, 1),
        pair("y", 1, 0),
        pair("x", 1, 0),
        pair("z", 0, 1, "tie"),
        Comparison(prompt, "a", "b"),
    ]
    rated = [Rated(prompt, "a", True, annotator="y", meta={"completion_id": "c1", "index": 0})]
    labels = labels_from(comparisons, rated)
    assert sorted((lab.item, lab.annotator, lab.value) for lab in labels) == [
        ("c1:pair:0:1", "x", True),  # x's first answer; its repeat of the same question is dropped
        ("c1:pair:0:1", "y", False),
        ("c1:thumb:0", "y", True),
    ]
    table = estimate(labels)
    table["x"].weight = 0.25
    weigh(comparisons + rated, table)
    assert [c.weight for c in comparisons] == [0.25, table["y"].weight, 0.25, 1.0, 1.0]
