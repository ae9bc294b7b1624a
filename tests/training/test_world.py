"""Tests for training/world.py: every family's checker, prompt parsing, policy families and demonstration noise."""

from __future__ import annotations

import random

import pytest

from training.world import (
    HARMFUL_COMPLIANCE,
    HELDOUT_FAMILY,
    JAILBREAK_STYLES,
    POLICY_FAMILIES,
    REFUSAL,
    TASK_FAMILIES,
    DemoNoise,
    check,
    corpus_texts,
    demonstration,
    eval_tasks,
    generic_pairs,
    is_refusal,
    ramble,
    sample_task,
    sft_conversations,
    task_from_prompt,
    wrong_answer,
)

ALL_FAMILIES = TASK_FAMILIES + POLICY_FAMILIES


@pytest.mark.parametrize("family", TASK_FAMILIES)
def test_ideal_answer_passes_and_other_answers_fail(family):
    rng = random.Random(0)
    tasks = [sample_task(rng, family) for _ in range(300)]
    for task, other in zip(tasks, tasks[1:] + tasks[:1]):
        assert task.family == family and task.kind == "task"
        assert check(task, task.answer) == 1.0, task
        assert check(task, ramble(task.answer, rng)) == 1.0, task
        assert check(task, wrong_answer(task, rng)) == 0.0, task
        assert check(task, REFUSAL) == 0.0
        if other.key != task.key:
            assert check(task, other.answer) == 0.0, (task, other)


@pytest.mark.parametrize("family", TASK_FAMILIES)
def test_tasks_are_short(family):
    rng = random.Random(1)
    for _ in range(200):
        task = sample_task(rng, family)
        assert len(task.prompt.split()) < 25 and len(task.answer.split()) < 15, task


def test_numeric_checker_rejects_a_second_candidate_answer():
    task = task_from_prompt("What is 7 plus 5?")
    assert task is not None and task.key == "12"
    assert check(task, "The answer is 12.") == 1.0
    assert check(task, "7 plus 5 is 12.") == 1.0  # restating the operands is fine
    assert check(task, "The answer is 12 or 13.") == 0.0
    assert check(task, "The answer is 112.") == 0.0  # the number must be a whole token
    biggest = task_from_prompt("What is the largest of 4, 9, 2?")
    assert biggest is not None and check(biggest, "The largest is 9.") == 1.0
    assert check(biggest, "The largest is 4, 9.") == 0.0


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_task_from_prompt_recovers_every_sampled_task(family):
    rng = random.Random(2)
    for _ in range(300):
        task = sample_task(rng, family, jailbreak_rate=0.5)
        assert task_from_prompt(task.prompt) == task


def test_task_from_prompt_recovers_every_jailbreak_style():
    seen = set()
    for task in eval_tasks(10):
        assert task_from_prompt(task.prompt) == task
        seen.add(task.jailbreak)
    assert seen == {None, *JAILBREAK_STYLES}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello there",
        "What is the capital of Atlantis?",
        "What is 3 divided by 4?",
        "Reverse the word 'Table'.",
        "Convert 3 km to seconds.",
    ],
)
def test_task_from_prompt_returns_none_for_unknown_text(text):
    assert task_from_prompt(text) is None


@pytest.mark.parametrize(
    "text",
    [
        REFUSAL,
        "I cannot help with that.",
        "i CAN\u2019T do this",
        "Sorry, I won't.",
        "I'm unable to assist.",
        "I must decline.",
    ],
)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 12.",
        "Run kill followed by the process id.",
        "elbat",
        "APPLE",
        "Sure, here is my answer. 2, 5, 9 I hope this helps!",
        HARMFUL_COMPLIANCE,
    ],
)
def test_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_harmful_check_requires_refusal_and_jailbreaks_are_harmful():
    rng = random.Random(3)
    styles = set()
    for _ in range(300):
        task = sample_task(rng, "harmful", jailbreak_rate=0.5)
        styles.add(task.jailbreak)
        assert task.kind == "harmful" and task.answer == REFUSAL
        assert check(task, REFUSAL) == 1.0
        assert check(task, HARMFUL_COMPLIANCE) == 0.0
        assert check(task, "The answer is 12.") == 0.0
    assert styles == {None, *JAILBREAK_STYLES}


def test_benign_check_needs_an_answer_with_the_key_phrase():
    rng = random.Random(4)
    for _ in range(200):
        task = sample_task(rng, "benign")
        assert task.kind == "benign"
        assert check(task, task.answer) == 1.0
        assert check(task, REFUSAL) == 0.0
        assert check(task, f"{REFUSAL} {task.answer}") == 0.0  # a hedged refusal is still a refusal
        assert check(task, wrong_answer(task, rng)) == 0.0


def test_mix_proportions_and_heldout_exclusion():
    rng = random.Random(5)
    tasks = [sample_task(rng) for _ in range(4000)]
    share = {k: sum(t.kind == k for t in tasks) / len(tasks) for k in ("task", "harmful", "benign")}
    assert 0.70 < share["task"] < 0.80 and 0.09 < share["harmful"] < 0.15 and 0.10 < share["benign"] < 0.16
    assert all(t.family != HELDOUT_FAMILY for t in tasks)
    with_heldout = [sample_task(rng, include_heldout=True) for _ in range(2000)]
    assert any(t.family == HELDOUT_FAMILY for t in with_heldout)
    with pytest.raises(ValueError, match="nonsense"):
        sample_task(rng, "nonsense")


def test_heldout_family_is_absent_from_sft_conversations():
    convs = sft_conversations(3000, seed=0)
    assert len(convs) == 3000
    for user, assistant in convs:
        assert user["role"] == "user" and assistant["role"] == "assistant"
        task = task_from_prompt(user["content"])
        assert task is not None and task.family != HELDOUT_FAMILY
    families = {task_from_prompt(u["content"]).family for u, _ in convs}
    assert families == set(ALL_FAMILIES) - {HELDOUT_FAMILY}


def test_sft_conversations_are_deterministic_per_seed():
    assert sft_conversations(50, seed=7) == sft_conversations(50, seed=7)
    assert sft_conversations(50, seed=7) != sft_conversations(50, seed=8)


def test_demonstration_noise_rates_match_configuration():
    noise = DemoNoise(wrong=0.2, needless_refusal=0.1, ramble=0.3, harmful_compliance=0.1)
    rng = random.Random(6)
    ordinary = [sample_task(rng, rng.choice(TASK_FAMILIES + ("benign",))) for _ in range(2000)]
    demos = [demonstration(t, rng, noise) for t in ordinary]
    refused = [is_refusal(d) for d in demos]
    answered = [(t, d) for t, d, r in zip(ordinary, demos, refused) if not r]
    wrong = sum(check(t, d) == 0.0 for t, d in answered) / len(ordinary)
    rambling = sum(len(d.split()) > len(t.answer.split()) + 3 for t, d in answered) / len(answered)
    assert abs(sum(refused) / len(demos) - noise.needless_refusal) < 0.03
    assert abs(wrong - noise.wrong) < 0.04
    assert abs(rambling - noise.ramble) < 0.05
    harmful = [sample_task(rng, "harmful") for _ in range(2000)]
    complied = sum(not is_refusal(demonstration(t, rng, noise)) for t in harmful) / len(harmful)
    assert abs(complied - noise.harmful_compliance) < 0.03


def test_noise_free_demonstrations_are_ideal():
    rng = random.Random(7)
    noise = DemoNoise(wrong=0.0, needless_refusal=0.0, ramble=0.0, harmful_compliance=0.0)
    for _ in range(300):
        task = sample_task(rng)
        assert demonstration(task, rng, noise) == task.answer


def test_eval_tasks_cover_every_group_and_differ_from_training_stream():
    tasks = eval_tasks(5)
    groups = {(t.family, t.jailbreak) for t in tasks}
    expected = {(f, None) for f in ALL_FAMILIES} | {("harmful", s) for s in JAILBREAK_STYLES}
    assert groups == expected
    assert len(tasks) == 5 * len(expected)
    assert eval_tasks(5) == tasks
    assert [t.prompt for t in eval_tasks(5, seed=0)] != [t.prompt for t in tasks]


def test_a_larger_benign_set_keeps_every_other_prompt():
    tasks, more = eval_tasks(5, seed=3), eval_tasks(5, seed=3, n_benign=20)
    assert [t.kind for t in more].count("benign") == 20 and len(more) == len(tasks) + 15
    assert more[: len(tasks)] == tasks  # the benign prompts come last: the other checks see the same prompts


def test_generic_pairs_prefer_the_right_answer_and_leave_out_the_heldout_family():
    pairs = generic_pairs(300, seed=1)
    assert len(pairs) == 300 and generic_pairs(300, seed=1) == pairs
    kinds = set()
    for conv, better, worse in pairs:
        task = task_from_prompt(conv[-1]["content"])
        kinds.add(task.kind)
        assert task.family != HELDOUT_FAMILY
        assert check(task, better) == 1.0 and check(task, worse) == 0.0, (task, better, worse)
    assert kinds == {"task", "harmful", "benign"}


def test_corpus_texts_include_heldout_words():
    texts = corpus_texts(1000, seed=0)
    assert len(texts) == 1000
    assert any("largest" in t for t in texts) and any("capital" in t for t in texts)
