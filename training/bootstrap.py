"""Build alignd's default assistant from nothing: tokenizer → small GPT-2 → SFT on the built-in world → checkpoint.

No Hub download: the tokenizer is trained on the world's corpus and the model is built from a `transformers` config.
The SFT demonstrations are deliberately imperfect (mistakes, needless refusals, rambling; `world.DemoNoise`), so the
assistant is useful but leaves measurable room for the feedback loop.

    alignd bootstrap [--seconds 120] [--json]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from training import world
from training.evaluate import EvalConfig, evaluate_policy
from training.model import build_model, count_parameters, tiny_config
from training.sft import SFTConfig, train_sft
from training.tokenizer import train_tokenizer


@dataclass
class BootstrapConfig:
    arch: str = "gpt2"  # the built-in assistant (docs/design.md): 4 layers, 192 wide, ~2 M parameters
    vocab_size: int = 1024  # byte-level BPE; small vocab keeps the embedding a minor share of the parameters
    n_layer: int = 4
    d_model: int = 192
    n_head: int = 4
    context: int = 256  # built-in conversations are < 100 tokens; room for a few turns
    n_conversations: int = 40_000  # more distinct demos than 120 s of steps can visit: no memorisation
    corpus_size: int = 6000  # texts for the tokenizer
    seed: int = 0
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(n_per_family=20))


def bootstrap(
    cfg: BootstrapConfig, progress: Callable[[int, dict], None] | None = None
) -> tuple[torch.nn.Module, object, dict]:
    """Train the default assistant; returns (model, tokenizer, report). The caller saves it as a checkpoint."""
    tokenizer = train_tokenizer(world.corpus_texts(cfg.corpus_size, seed=cfg.seed), cfg.vocab_size)
    config = tiny_config(
        cfg.arch,
        len(tokenizer),
        n_layer=cfg.n_layer,
        d_model=cfg.d_model,
        n_head=cfg.n_head,
        context=cfg.context,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = build_model(config, seed=cfg.seed)
    conversations = world.sft_conversations(cfg.n_conversations, seed=cfg.seed)
    sft_metrics = train_sft(cfg.sft, model, tokenizer, conversations, progress=progress)
    evaluation = evaluate_policy(model, tokenizer, cfg.eval)
    report = {"parameters": count_parameters(model), "arch": cfg.arch, "sft": sft_metrics, "eval": evaluation}
    return model, tokenizer, report
