"""The engine's continuous batching against plain Hugging Face `generate`, on GPT-2 and Llama tiny configs."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from service.engine import Engine, Policy, SamplingParams
from tests.utils.tiny import tiny_model, tiny_tokenizer

PROMPTS = [
    "Say a number.",
    "Hello, how are you?",
    "What is two plus three?",
    "Say a word.",
    "red green",
    "The answer is",
    "Thank you!",
    "one two three four five six seven eight nine ten",
]


def _policy(arch: str, version: int = 1, seed: int = 0) -> Policy:
    return Policy(version=version, model=tiny_model(arch, seed=seed), tokenizer=tiny_tokenizer(), context=256)


def _hf_greedy(policy: Policy, prompt: str, max_new: int) -> str:
    ids = torch.tensor([policy.encode_chat([{"role": "user", "content": prompt}])])
    out = policy.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=policy.tokenizer.eos_token_id,
        pad_token_id=policy.tokenizer.pad_token_id,
    )
    return policy.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_concurrent_greedy_matches_hf_generate(arch):
    policy = _policy(arch)
    engine = Engine(policy, max_batch_size=4)  # smaller than the request count: rows leave and join mid-flight
    engine.start()
    try:
        params = [SamplingParams(temperature=0, max_tokens=6 + 3 * (i % 4)) for i in range(len(PROMPTS))]
        handles = [engine.submit([{"role": "user", "content": p}], sp) for p, sp in zip(PROMPTS, params)]
        results = [h.wait() for h in handles]
    finally:
        engine.stop()
    for prompt, sp, (text, finish, n) in zip(PROMPTS, params, results):
        assert text == _hf_greedy(policy, prompt, sp.max_tokens), prompt
        assert finish in ("stop", "length") and 1 <= n <= sp.max_tokens


def test_seeded_sampling_is_reproducible_and_stop_strings_cut():
    policy = _policy("gpt2")
    engine = Engine(policy)
    engine.start()
    try:
        msgs = [{"role": "user", "content": "Say a number."}]
        a = engine.generate(msgs, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7))
        b = engine.generate(msgs, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7))
        assert a == b
        text, _, _ = a
        assert len(text) >= 2
        stop = text[1:3]
        cut, finish, _ = engine.generate(
            msgs, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7, stop=[stop])
        )
        assert finish == "stop" and cut == text[: text.find(stop)]
    finally:
        engine.stop()


def test_swap_pins_running_requests_to_their_version_and_frees_the_old_one():
    old, new = _policy("gpt2", version=1, seed=0), _policy("llama", version=2, seed=1)
    engine = Engine(old)
    engine.start()
    try:
        msgs = [{"role": "user", "content": "Say a word."}]
        first = engine.submit(msgs, SamplingParams(temperature=0, max_tokens=40))
        engine.swap(new)
        second = engine.submit(msgs, SamplingParams(temperature=0, max_tokens=5))
        assert (first.version, second.version) == (1, 2)
        text1, _, _ = first.wait()
        text2, _, _ = second.wait()
        assert text1 == _hf_greedy(old, "Say a word.", 40)
        assert text2 == _hf_greedy(new, "Say a word.", 5)
        done = threading.Event()
        for _ in range(100):
            if engine.loaded_versions() == [2]:
                done.set()
                break
            threading.Event().wait(0.02)
        assert done.is_set(), engine.loaded_versions()
    finally:
        engine.stop()


def test_sampler_draws_from_the_tempered_top_p_distribution():
    """The inverse-CDF sampler against the exact distribution: temperature, top_p and greedy rows together."""
    from types import SimpleNamespace

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    rows = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_p=0.9), SamplingParams(temperature=0)]
    n = 20000
    batch = SimpleNamespace(
        next_logits=logits.repeat(len(rows) * n, 1),
        seqs=[SimpleNamespace(params=p, generator=None) for p in rows for _ in range(n)],
    )
    draws = Engine._sample(None, batch).view(len(rows), n)
    freq = [torch.bincount(d, minlength=5).float() / n for d in draws]
    assert torch.allclose(freq[0], torch.softmax(logits, -1), atol=0.015)
    tempered = torch.softmax(logits / 0.5, -1)  # [0.83, 0.11, 0.04, ...]: top_p 0.9 keeps the first two tokens
    kept = tempered.clone()
    keep = (tempered.cumsum(-1) - tempered) < 0.9
    kept[~keep] = 0
    assert torch.allclose(freq[1], kept / kept.sum(), atol=0.015)
    assert bool((draws[1] < 2).all())  # never a token top_p removed, the last one included
    assert bool((draws[2] == 0).all())


def test_casting_a_served_model_leaves_the_base_it_shares_tensors_with_alone():
    """An adapter version shares all but its merged weights with the cached base (training/lora.py merged_copy):
    serving it in bfloat16 must not turn the base's shared tensors into bfloat16 too (a mixed-dtype base then breaks
    the next adapter's merge)."""
    policy = _policy("llama")
    base = policy.model
    shared = copy.deepcopy(base, {id(t): t for t in [*base.parameters(), *base.buffers()]})
    served = Policy(version=2, model=shared, tokenizer=policy.tokenizer).prepared(torch.bfloat16)
    assert served.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in served.model.parameters())
    assert all(p.dtype == torch.float32 for p in base.parameters())


def test_bf16_engine_matches_bf16_hf_greedy():
    """The serving dtype: weights and KV cache in bfloat16, logits sampled in float32; greedy output is HF's own
    bfloat16 greedy output, batched and one at a time."""
    policy = _policy("llama").prepared(torch.bfloat16)
    assert policy.dtype == torch.bfloat16
    engine = Engine(policy, max_batch_size=4)
    engine.start()
    try:
        handles = [
            engine.submit([{"role": "user", "content": p}], SamplingParams(temperature=0, max_tokens=12))
            for p in PROMPTS
        ]
        results = [h.wait() for h in handles]
    finally:
        engine.stop()
    for prompt, (text, _, _) in zip(PROMPTS, results):
        assert text == _hf_greedy(policy, prompt, 12), prompt


def test_incremental_detokenisation_equals_decoding_the_whole_output():
    """Random token streams, including bytes that split UTF-8 characters across tokens: the text the engine builds
    a few tokens at a time is exactly the whole output decoded at once."""
    from service.engine import _Seq

    policy = _policy("gpt2")
    tok = policy.tokenizer
    g = torch.Generator().manual_seed(0)
    multibyte = tok("é ü 中文 🙂", add_special_tokens=False)["input_ids"]
    for _ in range(20):
        ids = torch.randint(0, len(tok), (40,), generator=g).tolist()
        ids[5:5] = multibyte
        seq = _Seq(None, [1], SamplingParams(), policy)
        for i, token in enumerate(ids):
            seq.add_token(token, tok)
            assert not seq.text.endswith("\ufffd") and tok.decode(ids[: i + 1], skip_special_tokens=True).startswith(
                seq.text
            )
        seq.flush(tok)
        assert seq.text == tok.decode(ids, skip_special_tokens=True)


def test_the_engine_runs_torch_on_its_own_thread_count_and_leaves_the_callers_alone():
    """torch's OpenMP backend keeps a thread count (and a worker pool) per thread: the serving process runs its
    main and loading threads on one, and only the engine's thread on the configured count (core/config.py
    apply_torch_threads), even when another thread sets its own count before the engine's first op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(_policy("gpt2"), max_batch_size=2, threads=2)
    seen: list[int] = []
    engine.on_step = lambda rows: seen.append(torch.get_num_threads())
    engine.start()
    time.sleep(0.2)  # the engine thread has set its count and waits for work

    def follower() -> None:  # as the API's registry follower does, before the engine's first step
        torch.set_num_threads(1)
        torch.ones(8) + 1

    other = threading.Thread(target=follower)
    other.start()
    other.join()
    try:
        engine.generate([{"role": "user", "content": PROMPTS[0]}], SamplingParams(temperature=0, max_tokens=4))
        assert seen and set(seen) == {2}
        assert torch.get_num_threads() == 1  # the caller's own count did not change
    finally:
        engine.stop()
        torch.set_num_threads(before)
