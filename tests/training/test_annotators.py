"""Tests for training/annotators.py: utilities, label noise, ranking, pools and the oracle win rate."""

from __future__ import annotations

import random

import pytest

from training.annotators import ORACLE, STYLES, Annotator, annotator_pool, oracle_win_rate
from training.world import HARMFUL_COMPLIANCE, REFUSAL, TASK_FAMILIES, ramble, sample_task, wrong_answer


def _tasks(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [sample_task(rng, rng.choice(TASK_FAMILIES)) for _ in range(n)]


def test_noise_free_oracle_prefers_ideal_over_wrong():
    rng = random.Random(0)
    for task in _tasks(300):
        wrong = wrong_answer(task, rng)
        assert ORACLE.utility(task, task.answer) > ORACLE.utility(task, wrong)
        assert ORACLE.compare(task, task.answer, wrong, rng) == 0
        assert ORACLE.compare(task, wrong, task.answer, rng) == 1
        assert ORACLE.thumbs(task, task.answer, rng) == "up" and ORACLE.thumbs(task, wrong, rng) == "down"


def test_correctness_dominates_every_style():
    rng = random.Random(1)
    for style in STYLES:
        judge = Annotator(style, style, noise=0.0)
        for task in _tasks(100, seed=2):
            wrong = ramble(wrong_answer(task, rng), rng)
            assert judge.utility(task, task.answer) > judge.utility(task, wrong), (style, task)


def test_brevity_and_detail_disagree_on_rambling():
    rng = random.Random(3)
    brevity, detail = Annotator("b", "brevity", noise=0.0), Annotator("d", "detail", noise=0.0)
    for task in _tasks(200, seed=4):
        long = ramble(task.answer, rng)
        assert brevity.compare(task, task.answer, long, rng) == 0
        assert detail.compare(task, task.answer, long, rng) == 1


def test_policy_preferences():
    rng = random.Random(5)
    strict, balanced = Annotator("s", "strict", noise=0.0), Annotator("b", "balanced", noise=0.0)
    harmful = sample_task(rng, "harmful")
    benign = sample_task(rng, "benign")
    for judge in (strict, balanced, ORACLE):
        assert judge.compare(harmful, REFUSAL, HARMFUL_COMPLIANCE, rng) == 0
        assert judge.compare(benign, benign.answer, REFUSAL, rng) == 0
    # Strict annotators find harmful compliance much worse and over-refusal milder than the balanced ones.
    assert strict.utility(harmful, HARMFUL_COMPLIANCE) < balanced.utility(harmful, HARMFUL_COMPLIANCE)
    assert strict.utility(benign, REFUSAL) > balanced.utility(benign, REFUSAL)


def test_ties_and_both_bad():
    rng = random.Random(6)
    judge = Annotator("n", "balanced", noise=0.5)
    for task in _tasks(100, seed=7):
        assert judge.compare(task, task.answer, task.answer, rng) == "tie"
        assert judge.compare(task, wrong_answer(task, rng), REFUSAL, rng) == "both_bad"


@pytest.mark.parametrize("noise", [0.0, 0.25])
def test_label_noise_flips_about_that_share(noise):
    rng = random.Random(8)
    judge = Annotator("x", "balanced", noise=noise)
    tasks = _tasks(2000, seed=9)
    flips = sum(judge.compare(t, t.answer, wrong_answer(t, rng), rng) == 1 for t in tasks) / len(tasks)
    thumbs_flips = sum(judge.thumbs(t, t.answer, rng) == "down" for t in tasks) / len(tasks)
    assert abs(flips - noise) < 0.04 and abs(thumbs_flips - noise) < 0.04


def test_rank_returns_a_permutation_and_is_exact_without_noise():
    rng = random.Random(10)
    noisy, exact = Annotator("n", "balanced", noise=0.25), Annotator("e", "balanced", noise=0.0)
    for task in _tasks(200, seed=11):
        responses = [wrong_answer(task, rng), ramble(task.answer, rng), REFUSAL, task.answer]
        assert sorted(noisy.rank(task, responses, rng)) == list(range(4))
        order = exact.rank(task, responses, rng)
        assert order[:2] == [3, 1]


def test_annotator_pool():
    pool = annotator_pool("balanced, brevity,detail,strict,brevity", noise=0.1)
    assert [a.name for a in pool] == [
        "sim-balanced-1",
        "sim-brevity-1",
        "sim-detail-1",
        "sim-strict-1",
        "sim-brevity-2",
    ]
    assert all(a.noise == 0.1 for a in pool)
    assert annotator_pool("oracle")[0].noise == 0.0
    planted = annotator_pool("balanced,balanced@0.5,brevity@0.8", noise=0.2)
    expected = [("sim-balanced-1", 0.2), ("sim-balanced-2", 0.5), ("sim-brevity-1", 0.8)]
    assert [(a.name, a.noise) for a in planted] == expected
    with pytest.raises(ValueError, match="after '@'"):
        annotator_pool("balanced@lots")
    with pytest.raises(ValueError, match="noise"):
        annotator_pool("balanced@1.5")
    with pytest.raises(ValueError, match="grumpy"):
        annotator_pool("balanced,grumpy")
    with pytest.raises(ValueError):
        annotator_pool(" , ")
    with pytest.raises(ValueError, match="grumpy"):
        Annotator("x", "grumpy")


def test_oracle_win_rate_of_identical_responses_is_one_half():
    tasks = _tasks(100, seed=12)
    rng = random.Random(13)
    responses = [task.answer if rng.random() < 0.5 else wrong_answer(task, rng) for task in tasks]
    result = oracle_win_rate(tasks, responses, responses)
    assert result["win_rate"] == 0.5 and result["n"] == 100
    assert result["ci_low"] <= 0.5 <= result["ci_high"]


def test_oracle_win_rate_of_ideal_over_mixed_responses():
    tasks = _tasks(200, seed=14)
    rng = random.Random(15)
    mixed = [task.answer if i % 2 else wrong_answer(task, rng) for i, task in enumerate(tasks)]
    result = oracle_win_rate(tasks, [t.answer for t in tasks], mixed, rng=random.Random(0))
    assert result["win_rate"] == pytest.approx(0.75)
    assert result["ci_low"] < 0.75 < result["ci_high"] and result["ci_high"] - result["ci_low"] < 0.2
    with pytest.raises(ValueError):
        oracle_win_rate(tasks, mixed, mixed[:-1])
