"""Factories for tiny tokenizers and models, so tests train real models in seconds on one CPU core.

from tests.utils.tiny import tiny_model, tiny_tokenizer
model = tiny_model("llama", seed=1)
"""

from __future__ import annotations

from functools import lru_cache

from transformers import PreTrainedModel, PreTrainedTokenizerFast

from training.model import build_model, tiny_config
from training.tokenizer import train_tokenizer

WORDS = (
    "good bad yes no hello world say a number the answer is please thank you short long reply name colour "
    "red green blue cat dog sun moon one two three four five six seven eight nine ten what how why add plus minus"
).split()

TEXTS = (
    [f"The answer is {n}." for n in range(100)]
    + [f"{a} plus {b} is {a + b}." for a in range(10) for b in range(10)]
    + [" ".join(WORDS[i : i + 6]) for i in range(len(WORDS))]
    + ["Say a number.", "Say a word.", "That is good.", "That is bad.", "Hello, how are you?", "Thank you!"]
)

VOCAB_SIZE = 300  # bytes (256) + 6 special tokens + a few dozen merges: short enough to train instantly


@lru_cache(maxsize=1)
def _tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(TEXTS, vocab_size=VOCAB_SIZE)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The shared tiny tokenizer (trained once per process; callers get their own copy of the settings)."""
    tok = _tokenizer()
    tok.padding_side = "left"  # undo any caller that changed the cached instance
    return tok


def tiny_model(
    arch: str = "gpt2", seed: int = 0, n_layer: int = 2, d_model: int = 64, n_head: int = 2, context: int = 256
) -> PreTrainedModel:
    """A random causal LM of architecture `arch` ("gpt2" | "llama") matching `tiny_tokenizer()`, in eval mode."""
    tok = tiny_tokenizer()
    config = tiny_config(
        arch,
        len(tok),
        n_layer=n_layer,
        d_model=d_model,
        n_head=n_head,
        context=context,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return build_model(config, seed).eval()


def sft_example(rng) -> tuple[list[dict[str, str]], str]:
    """One (prompt, ideal response) pair of the tiny instruction task: add two digits, or say a number."""
    a, b = rng.randrange(10), rng.randrange(10)
    if rng.random() < 0.5:
        return [{"role": "user", "content": f"What is {a} plus {b}?"}], f"The answer is {a + b}."
    return [{"role": "user", "content": "Say a number."}], f"The answer is {10 * a + b}."


_SFT_CACHE: dict[tuple, dict] = {}


def tiny_sft_model(
    arch: str = "gpt2", seed: int = 0, steps: int = 60, lr: float = 3e-3, batch_size: int = 16, **kw
) -> PreTrainedModel:
    """`tiny_model` briefly fine-tuned on `sft_example` conversations, so it answers in a few tokens and emits EOS
    (a stand-in for an SFT policy). Weights are cached per arguments; each call returns a fresh model."""
    import random

    import torch

    key = (arch, seed, steps, lr, batch_size, tuple(sorted(kw.items())))
    model = tiny_model(arch, seed=seed, **kw)
    if key not in _SFT_CACHE:
        tok = tiny_tokenizer()
        rng = random.Random(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            texts = [
                tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
                for p, r in (sft_example(rng) for _ in range(batch_size))
            ]
            enc = tok(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)  # (B, T)
            loss = model(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        _SFT_CACHE[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_SFT_CACHE[key])
    return model.eval()
