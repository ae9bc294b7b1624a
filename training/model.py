"""Model construction and loading through the standard Hugging Face path.

alignd's default assistant is a small GPT-2 built from a `transformers` config (no Hub download); any local
folder with a causal LM and a tokenizer that has a chat template loads through the same `from_pretrained` calls.
Tests build tiny random models of more than one architecture with `tiny_config`.

    python -c "from training.model import tiny_config; print(tiny_config('llama', 1024))"
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

ARCHITECTURES = ("gpt2", "llama")


def tiny_config(
    arch: str,
    vocab_size: int,
    *,
    n_layer: int = 4,
    d_model: int = 192,
    n_head: int = 4,
    context: int = 512,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
):
    """A small causal-LM config of architecture `arch` (gpt2 or llama); the default is alignd's ~2 M model."""
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=context,
            n_embd=d_model,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,  # tiny data, short runs: dropout only slows learning
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            intermediate_size=d_model * 8 // 3,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=max(1, n_head // 2),
            max_position_embeddings=context,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


# transformers builds a model by patching process-wide state for the duration (torch.nn.init's functions become
# no-ops, torch.linspace and the default dtype change; transformers' "Local pretrained models cannot be loaded with
# multithreading"): two threads building at once restore each other's patches, leaving meta tensors or uninitialised
# weights. Every construction through transformers or peft in training/ holds it, so two stages can run at once
# (core/threads.py `beside`). Reentrant: a construction may build another inside it.
CONSTRUCTION = threading.RLock()


def build_model(config, seed: int = 0) -> PreTrainedModel:
    with CONSTRUCTION:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def load_causal_lm(
    path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any local Hugging Face causal-LM folder; refuses tokenizers without a chat template."""
    tokenizer = load_tokenizer(path)
    with CONSTRUCTION:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    model.to(device).eval()
    return model, tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A model folder's tokenizer, left-padding, with a pad token; refuses one without a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not tokenizer.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template; alignd needs one to format conversations")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def autocast(device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device that has bf16 (Ampere and later), nothing elsewhere: weights and optimiser
    states stay fp32, matmuls run in bf16 (the usual mixed-precision recipe of TRL and OpenRLHF). CPU training stays
    fp32: bf16 autocast on CPU is slower than fp32 on CPUs without AMX."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
