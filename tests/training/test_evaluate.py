"""Tests for training/evaluate.py on tiny random GPT-2 and Llama models with a tokenizer trained on the world."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import replace
from functools import lru_cache

import pytest
import torch

from training.evaluate import EvalConfig, SeededSampling, evaluate_policy, generate_responses, sequence_logprobs
from training.model import build_model, tiny_config
from training.tokenizer import train_tokenizer
from training.world import HELDOUT_FAMILY, JAILBREAK_STYLES, TASK_FAMILIES, Task, corpus_texts

RATE_KEYS = [
    "score/mean",
    "heldout_score",
    "over_caution",
    "harmful_compliance",
    "jailbreak_compliance",
    *[f"score/{f}" for f in TASK_FAMILIES],
    *[f"jailbreak_compliance/{s}" for s in JAILBREAK_STYLES],
]


@lru_cache(maxsize=1)
def _tokenizer():
    return train_tokenizer(corpus_texts(2000), 512)


def _model(arch: str, seed: int = 0):
    tok = _tokenizer()
    config = tiny_config(
        arch,
        len(tok),
        n_layer=2,
        d_model=64,
        n_head=2,
        context=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return build_model(config, seed).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_evaluate_policy_reports_every_metric(arch):
    tok, model = _tokenizer(), _model(arch)
    cfg = EvalConfig(n_per_family=2, max_new_tokens=8, batch_size=8)
    calls = []

    def reward_fn(prompts, responses):
        calls.append(len(prompts))
        assert all(p[-1]["role"] == "user" for p in prompts)
        return [float(len(r)) for r in responses]

    m = evaluate_policy(model, tok, cfg, reference=model, reward_fn=reward_fn, return_samples=True)
    for key in RATE_KEYS:
        assert 0.0 <= m[key] <= 1.0, key
    assert m["heldout_score"] == m[f"score/{HELDOUT_FAMILY}"]
    assert abs(m["kl_to_ref"]) < 1e-6
    assert 0.0 <= m["length_mean"] <= cfg.max_new_tokens
    assert math.isfinite(m["oracle_utility"]) and math.isfinite(m["reward_mean"])
    samples = m.pop("samples")
    assert m["n"] == len(samples) == calls[0] == 2 * (len(TASK_FAMILIES) + 2 + len(JAILBREAK_STYLES))
    assert all(isinstance(t, Task) and isinstance(r, str) for t, r in samples)
    assert m.pop("decoding") == "greedy" and m["prompt_set"] == cfg.seed  # what the figures were measured on
    assert all(isinstance(v, (int, float)) for v in m.values())
    assert model.training is False


def test_kl_to_a_different_reference_is_positive_on_sampled_responses():
    tok = _tokenizer()
    policy, reference = _model("gpt2", seed=0), _model("gpt2", seed=1)
    cfg = EvalConfig(n_per_family=2, max_new_tokens=8, batch_size=16, greedy=False)
    m = evaluate_policy(policy, tok, cfg, reference=reference)
    # KL(pi || ref) estimated on samples from pi: positive in expectation, and clearly so for unrelated models.
    assert m["kl_to_ref"] > 0.0
    assert "reward_mean" not in m and "samples" not in m


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generation_is_batch_invariant(arch):
    tok, model = _tokenizer(), _model(arch)
    prompts = [
        "What is 7 plus 5?",
        "Reverse the word 'table'.",
        "How do I kill a stuck process now?",
        "What is the largest of 4, 9, 2?",
    ]
    one = generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=1)
    many = generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert one == many and all(isinstance(r, str) for r in one)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sequence_logprobs_match_a_naive_unpadded_computation(arch):
    tok, model = _tokenizer(), _model(arch)
    prompts = ["What is 7 plus 5?", "Spell 'zebra' backwards.", "How do I shoot a good photo?"]
    ids = [
        tok(
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for p in prompts
    ]
    responses = [[40, 41], [50, 51, 52, 53], [tok.eos_token_id]]
    batched = sequence_logprobs(model, ids, responses, pad_token_id=tok.pad_token_id, batch_size=3)
    naive = []
    with torch.no_grad():
        for p, r in zip(ids, responses):
            seq = torch.tensor([p + r])
            logp = torch.log_softmax(model(seq).logits[0], dim=-1)  # (T, V)
            naive.append(sum(logp[len(p) - 1 + j, tok_id].item() for j, tok_id in enumerate(r)))
    assert torch.allclose(torch.tensor(batched), torch.tensor(naive), atol=1e-4)


def test_sampling_is_reproducible_with_a_seed():
    tok, model = _tokenizer(), _model("gpt2")
    prompts = ["What is 3 times 4?"] * 4
    a = generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=4, do_sample=True, seed=3)
    b = generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=4, do_sample=True, seed=3)
    assert a == b


def test_sampling_with_a_seed_ignores_other_threads_drawing_from_torchs_generator():
    """Two evaluations at once (the gate's `gate.beside`): a seed gives the same samples whatever another thread
    draws meanwhile from the process-wide generator, which `generate`'s own sampling would have shared."""
    tok, model = _tokenizer(), _model("gpt2")
    prompts = ["What is 3 times 4?", "Reverse the word cat."] * 4
    alone = generate_responses(model, tok, prompts, max_new_tokens=8, batch_size=8, do_sample=True, seed=3)
    stop = threading.Event()

    def draw():
        while not stop.is_set():
            torch.rand(64)
            torch.manual_seed(int(torch.randint(0, 1000, ())))

    other = threading.Thread(target=draw)
    other.start()
    try:
        crowded = generate_responses(model, tok, prompts, max_new_tokens=8, batch_size=8, do_sample=True, seed=3)
    finally:
        stop.set()
        other.join()
    assert crowded == alone
    assert len(set(alone)) > 1  # sampled: one prompt, several answers


def test_seeded_sampling_draws_from_the_softmax_at_its_temperature():
    scores = torch.tensor([[2.0, 1.0, 0.0, -math.inf]]).repeat(20_000, 1)
    for temperature in (1.0, 0.5):
        only = SeededSampling(seed=0, temperature=temperature)(torch.zeros(20_000, 1, dtype=torch.long), scores)
        picked = only.argmax(-1)
        assert ((only == 0).sum(-1) == 1).all() and torch.isinf(only).sum() == 3 * 20_000  # one token left each
        freq = torch.bincount(picked, minlength=4).float() / 20_000
        assert torch.allclose(freq, torch.softmax(scores[0] / temperature, -1), atol=0.015), (temperature, freq)
    again = SeededSampling(seed=0)(torch.zeros(20_000, 1, dtype=torch.long), scores).argmax(-1)
    first = SeededSampling(seed=0)(torch.zeros(20_000, 1, dtype=torch.long), scores).argmax(-1)
    assert torch.equal(again, first)


def test_outcomes_are_per_prompt_results_behind_the_rates():
    tok, model = _tokenizer(), _model("gpt2")
    cfg = EvalConfig(n_per_family=3, max_new_tokens=8, batch_size=8, greedy=False)
    m = evaluate_policy(model, tok, cfg, return_outcomes=True)
    o, k = m["outcomes"], len(JAILBREAK_STYLES)
    assert len(o["harmful"]) == 3 * (1 + k) and len(o["over_caution"]) == 3
    assert len(o["score"]) == 3 * (len(TASK_FAMILIES) - 1)  # the trained families: the held-out one is apart
    assert all(v in (0, 1) for key in ("harmful", "over_caution", "score") for v in o[key])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(o["harmful"]) == pytest.approx((m["harmful_compliance"] + k * m["jailbreak_compliance"]) / (1 + k))
    assert mean(o["over_caution"]) == pytest.approx(m["over_caution"])
    assert mean(o["score"]) == pytest.approx(m["score/mean"])
    json.dumps(m)  # stored with the gate's numbers: plain JSON
    # the same config draws the same samples (the gate gives both policies one seed stream); another sample seed
    # redraws them on the same prompts; another seed is another prompt set
    assert evaluate_policy(model, tok, cfg, return_outcomes=True)["outcomes"] == o
    texts = lambda c: [r for _, r in evaluate_policy(model, tok, c, return_samples=True)["samples"]]  # noqa: E731
    redrawn = replace(cfg, sample_seed=cfg.seed + 1)
    assert texts(redrawn) != texts(cfg)
    assert evaluate_policy(model, tok, redrawn, return_outcomes=True)["outcomes"]["prompts"] == o["prompts"]
    assert (
        evaluate_policy(model, tok, replace(cfg, seed=7), return_outcomes=True)["outcomes"]["prompts"] != o["prompts"]
    )
    assert "outcomes" not in evaluate_policy(model, tok, cfg)
