"""Graders as reward for DPO and KTO (training/grader_pairs.py): the policy's own answers, ranked by a grader, become
pairs (DPO) or desirable/undesirable examples (KTO), and training on them makes a tiny model pass its grader more."""

from __future__ import annotations

import pytest
import torch

from tests.utils.tiny import tiny_sft_model, tiny_tokenizer
from training.grader_pairs import (
    Graded,
    GraderPairsConfig,
    grader_comparisons,
    grader_rated,
    sample_graded,
    suite_prompts,
    summary,
)
from training.graders import Suite, parse_items
from training.preference import DPOConfig, KTOConfig, train_dpo, train_kto


def _suite(*specs: dict) -> Suite:
    return Suite("mine", "mine.jsonl", tuple(parse_items(list(enumerate(specs, start=1)), "mine.jsonl")))


SEVENS = _suite({"id": "n", "prompt": "Say a number.", "grader": {"type": "regex", "pattern": "7"}})


def test_pairs_and_examples_from_graded_answers():
    exact = _suite(
        {"id": "a", "prompt": "What is 2 plus 2?", "grader": {"type": "exact", "answer": "4"}},
        {"id": "b", "prompt": "Hi", "grader": {"type": "exact", "answer": "Hello"}},
    ).items
    graded = [
        Graded("mine", exact[0], ["4", "5", "4", "6", "5"], [1.0, 0.0, 1.0, 0.0, 0.0]),
        Graded("mine", exact[1], ["Hey", "Yo"], [0.0, 0.0]),  # all wrong: nothing to prefer
    ]
    pairs = grader_comparisons(graded, weight=2.0)
    # the first best answer over each distinct worse one; repeated texts pair once
    assert [(c.chosen, c.rejected) for c in pairs] == [("4", "5"), ("4", "6")]
    assert all(c.prompt == [{"role": "user", "content": "What is 2 plus 2?"}] for c in pairs)
    assert {c.weight for c in pairs} == {2.0} and {c.annotator for c in pairs} == {"grader:mine"}
    assert {c.source for c in pairs} == {"grader:mine:a"} and len({c.group for c in pairs}) == 1
    rated = grader_rated(graded, weight=0.5)
    assert [(x.response, x.good) for x in rated] == [("4", 1), ("5", 0), ("4", 1), ("6", 0), ("5", 0)]
    assert {x.weight for x in rated} == {0.5}
    assert summary(graded) == {"prompts": 2, "answers": 7, "pass_rate": 2 / 7, "mixed_prompts": 1}
    with pytest.raises(ValueError):
        GraderPairsConfig(samples=1)


def test_suite_prompts_are_the_share_of_the_update_counting_new_items_as_the_rest():
    assert suite_prompts(60, 0.25) == 20  # 20 of 80 prompts
    assert suite_prompts(0, 0.25) == suite_prompts(3, 0.25) == 8  # never fewer than 8
    assert suite_prompts(100, 0.5) == 100
    assert suite_prompts(100, 1.0) == GraderPairsConfig().prompts  # nothing else counts: the sampler's default


def _pass_rate(model, n: int = 128) -> float:
    graded = sample_graded(model, tiny_tokenizer(), [SEVENS], GraderPairsConfig(prompts=n, samples=2, seed=99))
    return summary(graded)["pass_rate"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_training_on_grader_ranked_answers_raises_the_pass_rate(arch, algorithm):
    """A grader wants a 7 in the tiny SFT model's number; three rounds of sample → grade → DPO/KTO raise the share of
    answers that have one."""
    torch.manual_seed(0)
    tok, policy = tiny_tokenizer(), tiny_sft_model(arch)
    before = _pass_rate(policy)
    for round_ in range(3):
        graded = sample_graded(policy, tok, [SEVENS], GraderPairsConfig(prompts=32, samples=4, seed=round_))
        budget = {"lr": 1e-3, "max_steps": 8, "epochs": None, "max_seconds": None, "heldout_fraction": 0.0}
        if algorithm == "dpo":
            pairs = grader_comparisons(graded)
            assert pairs and all(p.meta["scores"][0] > p.meta["scores"][1] for p in pairs)
            policy, _ = train_dpo(DPOConfig(beta=0.1, **budget), policy, tok, pairs)
        else:
            policy, _ = train_kto(KTOConfig(beta=0.1, **budget), policy, tok, [], grader_rated(graded))
    after = _pass_rate(policy)
    assert after > before + 0.15, (before, after)
