"""Online DPO's data (training/onpolicy.py): the policy's own answers, ordered by a judge whose preference is known,
become pairs kept by their judged margin; their weight scales their part of the DPO loss, 0 leaves DPO where the
people's pairs alone take it, and rounds of sample → judge → DPO move a tiny model toward what the judge prefers."""

from __future__ import annotations

import random

import pytest
import torch

from tests.training.test_preference import margin, sum_pairs
from tests.utils.tiny import tiny_model, tiny_sft_model, tiny_tokenizer
from training.data import Comparison
from training.evaluate import generate_responses
from training.graders import Suite, parse_items
from training.onpolicy import Judged, OnPolicyConfig, draw, judged_comparisons, sample_judged, summary
from training.ppo import grader_reward_fn
from training.preference import DPOConfig, _Scorer, dpo_batch, train_dpo

NUMBER = [{"role": "user", "content": "Say a number."}]
SEVEN = {"id": "n", "prompt": "Say a number.", "grader": {"type": "regex", "pattern": "7"}}
SEVENS = Suite("mine", "mine.jsonl", tuple(parse_items([(1, SEVEN)], "mine.jsonl")))


def _sevens_judge():
    """A judge whose preference is known: a real grader (an answer with a 7 scores 1) over a reward model of 0."""
    return grader_reward_fn(lambda prompts, responses: torch.zeros(len(responses)), [SEVENS], 1.0)


def _shorter_judge(prompts, responses) -> torch.Tensor:
    return -torch.tensor([float(len(r)) for r in responses])  # a reward model that likes brevity, 1 per character


def test_pairs_are_the_policys_own_answers_ordered_by_the_judge():
    tok, policy = tiny_tokenizer(), tiny_sft_model("gpt2")
    cfg = OnPolicyConfig(prompts=24, samples=3, max_new_tokens=12, min_margin=0.0, seed=5)
    prompts = [NUMBER] * 24
    judged = sample_judged(policy, tok, prompts, _sevens_judge(), cfg)
    # the answers are the policy's own samples at its temperature (the same seed draws the same ones)
    again = generate_responses(
        policy, tok, [NUMBER] * 72, max_new_tokens=12, batch_size=cfg.batch_size, do_sample=True, seed=5
    )
    assert [a for j in judged for a in j.answers] == again
    assert all(j.scores == [float("7" in a) for a in j.answers] for j in judged)
    pairs = judged_comparisons(judged, min_margin=0.5, weight=0.25)
    mixed = [j for j in judged if len(set(j.scores)) > 1]
    assert pairs and len(pairs) == len(mixed)  # one pair per prompt the judge separates, none where it cannot
    assert all("7" in c.chosen and "7" not in c.rejected for c in pairs)  # ordered as the judge prefers
    assert {c.weight for c in pairs} == {0.25} and {c.annotator for c in pairs} == {"judge"}
    assert all(c.meta["scores"] == [1.0, 0.0] for c in pairs)
    assert summary(judged, pairs)["pairs"] == len(pairs) and summary(judged, pairs)["answers"] == 72


def test_the_margin_keeps_only_the_pairs_the_judge_separates_enough():
    judged = [
        Judged(NUMBER, ["a b c", "a", "a b"], _shorter_judge(None, ["a b c", "a", "a b"]).tolist()),  # gap 4
        Judged(NUMBER, ["ab", "a"], [-2.0, -1.0]),  # gap 1
        Judged(NUMBER, ["same", "same"], [-4.0, -4.0]),  # nothing to prefer
    ]
    kept = judged_comparisons(judged, min_margin=2.0, weight=1.0)
    assert [(c.chosen, c.rejected) for c in kept] == [("a", "a b c")]  # best over worst, the middle one unused
    assert [(c.chosen, c.rejected) for c in judged_comparisons(judged, 0.0, 1.0)] == [("a", "a b c"), ("a", "ab")]
    assert judged_comparisons(judged, 5.0, 1.0) == []
    assert summary(judged, kept)["mean_kept_margin"] == 4.0
    with pytest.raises(ValueError):
        OnPolicyConfig(samples=1)
    prompts = [[{"role": "user", "content": str(i % 3)}] for i in range(9)]
    assert sorted(p[0]["content"] for p in draw(prompts, 5, random.Random(0))) == ["0", "1", "2"]  # distinct


def _grads(policy, scorer, batch, cfg) -> torch.Tensor:
    policy.zero_grad(set_to_none=True)
    dpo_batch(scorer, batch, cfg)[0].backward()
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


def test_the_weight_scales_the_judged_pairs_part_of_the_loss():
    """A batch's loss is sum(w loss) / sum(w): a judged pair at weight w counts w people's pairs."""
    torch.manual_seed(0)
    tok, policy, reference = tiny_tokenizer(), tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=2)
    cfg = DPOConfig(beta=0.5)
    scorer = _Scorer(policy, reference, tok, cfg.max_length)  # policy != reference: the losses have gradients
    people = sum_pairs(4, seed=1)
    judged = [Comparison(c.prompt, c.rejected, c.chosen, weight=1.0) for c in sum_pairs(4, seed=2)]
    g_people, g_judged = _grads(policy, scorer, people, cfg), _grads(policy, scorer, judged, cfg)
    for w in (0.0, 0.5, 2.0):
        batch = people + [Comparison(c.prompt, c.chosen, c.rejected, weight=w) for c in judged]
        expected = (4 * g_people + w * 4 * g_judged) / (4 + 4 * w)
        assert torch.allclose(_grads(policy, scorer, batch, cfg), expected, atol=1e-5), w


def test_zero_weight_judged_pairs_teach_nothing_and_full_weight_ones_count_as_peoples():
    """Judged pairs that contradict the people's: at weight 0 DPO goes where the people's pairs take it, at weight 1
    they undo it (train_only: they are trained on, never held out)."""
    people = sum_pairs(8, seed=3)

    def judged(w: float) -> list[Comparison]:
        return [Comparison(c.prompt, c.rejected, c.chosen, group=f"j{i}", weight=w) for i, c in enumerate(people)]

    cfg = DPOConfig(lr=1e-3, epochs=None, max_seconds=None, max_steps=3, batch_size=16, heldout_fraction=0.0)
    start = margin(tiny_sft_model("gpt2"), people)
    moved = {}
    for w in (None, 0.0, 1.0):
        model, metrics = train_dpo(
            cfg, tiny_sft_model("gpt2"), tiny_tokenizer(), people, train_only=judged(w) if w is not None else []
        )
        moved[w] = margin(model, people) - start
        assert metrics["n_train"] == 8 + (8 if w is not None else 0)
    assert moved[None] > 0.5
    assert abs(moved[0.0] - moved[None]) < 0.1 * moved[None]
    assert abs(moved[1.0]) < 0.2 * moved[None], moved


def test_rounds_of_judged_pairs_move_the_policy_toward_the_judges_preference():
    """Online DPO on the tiny SFT model with a judge that wants a 7: three rounds of sample → judge → DPO raise the
    share of answers that have one (no person's label involved)."""
    torch.manual_seed(0)
    tok, policy = tiny_tokenizer(), tiny_sft_model("gpt2")
    judge = _sevens_judge()

    def pass_rate(model) -> float:
        judged = sample_judged(model, tok, [NUMBER] * 128, judge, OnPolicyConfig(prompts=128, samples=2, seed=99))
        return sum(s for j in judged for s in j.scores) / 256

    before = pass_rate(policy)
    for round_ in range(3):
        judged = sample_judged(policy, tok, [NUMBER] * 32, judge, OnPolicyConfig(prompts=32, samples=4, seed=round_))
        pairs = judged_comparisons(judged, min_margin=0.5, weight=1.0)
        budget = {"lr": 1e-3, "max_steps": 8, "epochs": None, "max_seconds": None, "heldout_fraction": 0.0}
        policy, _ = train_dpo(DPOConfig(beta=0.1, **budget), policy, tok, [], train_only=pairs)
    after = pass_rate(policy)
    assert after > before + 0.1, (before, after)  # measured 0.18 → 0.32; sampling noise on 256 answers is ~0.03
