"""DPO and KTO on tiny models: response-only log-probs, what data each uses, and that a known preference is learned
while the reference stays frozen."""

from __future__ import annotations

import random

import pytest
import torch

from tests.utils.tiny import tiny_sft_model, tiny_tokenizer
from training.data import Comparison, Rated
from training.evaluate import sequence_logprobs
from training.preference import (
    DPOConfig,
    KTOConfig,
    _ids,
    dpo_items,
    evaluate_dpo,
    kto_items,
    kto_lambda_u,
    response_logprobs,
    train_dpo,
    train_kto,
)


def ask(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {a} plus {b}?"}]


def sum_pairs(n: int, seed: int = 0) -> list[Comparison]:
    """The known preference: the correct sum over an off-by-one answer of the same form."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append(Comparison(ask(a, b), f"The answer is {a + b}.", f"The answer is {a + b + 1}.", group=str(i)))
    return out


@torch.no_grad()
def margin(model, pairs: list[Comparison]) -> float:
    """Mean log p(chosen) - log p(rejected) under `model`: how much more likely the preferred answer is."""
    tok = tiny_tokenizer()
    chosen = response_logprobs(model, tok, [(c.prompt, c.chosen) for c in pairs], 256)
    rejected = response_logprobs(model, tok, [(c.prompt, c.rejected) for c in pairs], 256)
    return float((chosen - rejected).mean())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_response_logprobs_mask_the_prompt_and_match_teacher_forcing():
    model, tok = tiny_sft_model("llama", steps=30), tiny_tokenizer()
    prompts = [ask(1, 2), [{"role": "system", "content": "Be brief."}] + ask(3, 4)]
    responses = ["The answer is 3.", "seven, I think"]
    split = [_ids(tok, p, r, 256) for p, r in zip(prompts, responses)]
    for ids, n in split:
        assert ids[-1] == tok.eos_token_id  # up to and including EOS, not the newline after it
        assert tok.decode(ids[-n:-1]) in responses
    ours = response_logprobs(model, tok, list(zip(prompts, responses)), 256)
    reference = sequence_logprobs(
        model, [ids[:-n] for ids, n in split], [ids[-n:] for ids, n in split], pad_token_id=tok.pad_token_id
    )
    assert torch.allclose(ours, torch.tensor(reference), atol=1e-4)
    truncated, n = _ids(tok, [{"role": "user", "content": "What is one plus two? " * 20}], "The answer is 3.", 24)
    assert len(truncated) == 24 and n == split[0][1]  # a long prompt loses its start, the response stays whole


def test_which_items_dpo_and_kto_learn_from():
    p = ask(1, 1)
    pairs = [
        Comparison(p, "2", "3"),
        Comparison(p, "2", "2", label="tie"),
        Comparison(p, "2", "4", label="tie"),
        Comparison(p, "5", "6", label="both_bad"),
        Comparison(p, "2", "3", group="g"),
    ]
    assert [c.label for c in dpo_items(pairs)] == ["pref", "tie", "both_bad", "pref"]
    thumbs = kto_items(pairs, [Rated(p, "2", True), Rated(p, "7", False)])
    assert sorted((x.response, x.good) for x in thumbs) == [
        ("2", True),
        ("3", False),
        ("5", False),
        ("6", False),
        ("7", False),
    ]
    assert kto_lambda_u(KTOConfig(), thumbs) == pytest.approx(1 / 4)  # one up, four down: both kinds weigh 1
    assert kto_lambda_u(KTOConfig(lambda_u=0.7), thumbs) == 0.7
    with pytest.raises(ValueError, match="'best'"):
        dpo_items([Comparison(p, "2", "3", label="best")])
    with pytest.raises(ValueError, match="budget"):
        DPOConfig(epochs=None, max_seconds=None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dpo_makes_the_preferred_answer_more_likely_and_leaves_the_reference_alone(arch):
    policy, reference = tiny_sft_model(arch, steps=30), tiny_sft_model(arch, steps=30)
    pairs = sum_pairs(48)
    cfg = DPOConfig(beta=0.5, lr=1e-3, batch_size=8, epochs=None, max_seconds=None, max_steps=12)
    before, ref_before, params = margin(policy, pairs), snapshot(reference), snapshot(policy)
    baseline = evaluate_dpo(policy, tiny_tokenizer(), pairs, cfg, reference=reference)
    assert baseline["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference: no implicit reward yet
    model, metrics = train_dpo(cfg, policy, tiny_tokenizer(), pairs, reference=reference)
    assert model is policy and metrics["steps"] == 12
    assert margin(policy, pairs) > before + 0.5
    assert metrics["train"]["accuracy"] > 0.5 and metrics["train"]["reward_margin"] > 0
    assert metrics["heldout"]["reward_margin"] > metrics["heldout_before"]["reward_margin"]
    assert all(not torch.equal(params[k], v) for k, v in policy.named_parameters())
    assert all(torch.equal(ref_before[k], v) for k, v in reference.named_parameters())


def test_dpo_ties_and_both_bad_pairs_pull_together_and_push_down():
    policy = tiny_sft_model("gpt2", steps=30)
    bad = [
        Comparison(ask(a, a), f"The answer is {a + 5}.", f"The answer is {a + 6}.", label="both_bad") for a in range(8)
    ]
    cfg = DPOConfig(beta=0.5, lr=1e-3, batch_size=8, epochs=None, max_seconds=None, max_steps=6, heldout_fraction=0.0)
    _, metrics = train_dpo(cfg, policy, tiny_tokenizer(), bad)
    after = evaluate_dpo(policy, tiny_tokenizer(), bad, cfg, reference=tiny_sft_model("gpt2", steps=30))
    assert metrics["train"]["n_pref"] == 0 and metrics["train"]["accuracy"] is None
    assert after["loss"] < metrics["train"]["loss"] and after["loss"] < 0.6931  # both now below the reference
    ties = [Comparison(ask(a, 1), f"The answer is {a + 1}.", f"The answer is {a + 1}!", label="tie") for a in range(8)]
    policy = tiny_sft_model("gpt2", steps=30)
    ref = tiny_sft_model("gpt2", steps=30)
    # start from a policy that prefers one side, then ties must shrink the gap
    train_dpo(
        DPOConfig(beta=0.5, lr=1e-3, batch_size=8, epochs=None, max_seconds=None, max_steps=4, heldout_fraction=0.0),
        policy,
        tiny_tokenizer(),
        [Comparison(c.prompt, c.chosen, c.rejected) for c in ties],
        reference=ref,
    )
    gap = evaluate_dpo(policy, tiny_tokenizer(), ties, cfg, reference=ref)["loss"]
    train_dpo(cfg, policy, tiny_tokenizer(), ties, reference=ref)
    assert evaluate_dpo(policy, tiny_tokenizer(), ties, cfg, reference=ref)["loss"] < gap / 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kto_on_thumbs_makes_the_thumbed_up_answer_more_likely(arch):
    policy, reference = tiny_sft_model(arch, steps=30), tiny_sft_model(arch, steps=30)
    pairs = sum_pairs(48, seed=1)
    rng = random.Random(0)
    rated = [
        Rated(c.prompt, c.chosen, True, group=c.group)
        if rng.random() < 0.3
        else Rated(c.prompt, c.rejected, False, group=c.group)
        for c in pairs
    ]  # unpaired and imbalanced
    cfg = KTOConfig(beta=0.5, lr=1e-3, batch_size=8, epochs=None, max_seconds=None, max_steps=12)
    before, ref_before, params = margin(policy, pairs), snapshot(reference), snapshot(policy)
    _, metrics = train_kto(cfg, policy, tiny_tokenizer(), rated=rated, reference=reference)
    assert metrics["steps"] == 12 and metrics["lambda_u"] < 1.0  # fewer ups than downs: downs weigh less each
    assert margin(policy, pairs) > before + 0.25
    assert metrics["train"]["reward_gap"] > 0 and metrics["train"]["z0"] >= 0
    assert all(not torch.equal(params[k], v) for k, v in policy.named_parameters())
    assert all(torch.equal(ref_before[k], v) for k, v in reference.named_parameters())


def test_dpo_with_lora_uses_the_base_without_adapters_as_reference():
    peft = pytest.importorskip("peft")
    base = tiny_sft_model("gpt2", steps=30)
    frozen = snapshot(base)
    policy = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    pairs = sum_pairs(32, seed=2)
    before = margin(policy, pairs)
    cfg = DPOConfig(beta=0.5, lr=1e-2, batch_size=8, epochs=None, max_seconds=None, max_steps=12)
    _, metrics = train_dpo(cfg, policy, tiny_tokenizer(), pairs)
    assert margin(policy, pairs) > before + 0.2 and metrics["train"]["reward_margin"] > 0
    with policy.disable_adapter():
        assert margin(policy, pairs) == pytest.approx(before, abs=1e-4)  # the reference is the untouched base
    base_names = {
        k: k.replace("base_model.model.", "").replace(".base_layer", "")
        for k, _ in policy.named_parameters()
        if "lora_" not in k
    }
    assert base_names and all(
        torch.equal(frozen[base_names[k]], v) for k, v in policy.named_parameters() if k in base_names
    )


def test_zero_weight_pairs_teach_dpo_nothing():
    """A contrarian's flipped pairs at weight 0 leave DPO where the honest pairs alone take it; at weight 1 they undo
    it. (Parameters are not compared bit for bit: padding to another batch width changes float rounding, and Adam
    turns a rounding-sized gradient into a full-sized step.)"""
    honest = sum_pairs(8, seed=3)

    def flipped(w: float) -> list[Comparison]:
        return [Comparison(c.prompt, c.rejected, c.chosen, group=f"x{i}", weight=w) for i, c in enumerate(honest)]

    cfg = DPOConfig(lr=1e-3, epochs=None, max_seconds=None, max_steps=3, batch_size=16, heldout_fraction=0.0)
    start = margin(tiny_sft_model("gpt2"), honest)
    moved = {}
    for name, data in {"honest": honest, "weight 0": honest + flipped(0.0), "weight 1": honest + flipped(1.0)}.items():
        model, _ = train_dpo(cfg, tiny_sft_model("gpt2"), tiny_tokenizer(), data)
        moved[name] = margin(model, honest) - start
    assert moved["honest"] > 0.5
    assert abs(moved["weight 0"] - moved["honest"]) < 0.1 * moved["honest"]
    assert abs(moved["weight 1"]) < 0.2 * moved["honest"], moved
