"""Real-size model shapes for the benchmarks: a random-initialised Llama at SmolLM2-135M's shape, with alignd's own
tokenizer and chat template, saved as a checkpoint folder that `alignd bootstrap --base DIR` accepts.

No model hub: nothing is downloaded. The architecture is SmolLM2-135M's (hidden 576, 30 layers, 9 attention heads
over 3 KV heads, MLP 1536, tied embeddings, 2048 positions, 49,152-row embedding: 134.5 M parameters); the weights are
random, so the figures measure memory, bytes and compute, not quality. The tokenizer is bootstrap's (byte-level BPE
trained on the world's corpus, 1,024 entries by default; that corpus runs out of merges at ~2.1k, so a 49k BPE
cannot be trained on it): the embedding keeps SmolLM2's 49,152 rows, the rows past the tokenizer being padding as in
models whose vocab is rounded up (their ids decode to nothing). `--sft-seconds` optionally gives it a few seconds of
SFT on the world's conversations (training/sft.py), which starts pushing those rows down and teaches it the turn end.

    python bench/shapes.py --out /tmp/smollm2-135m [--sft-seconds 30] [--json]
    alignd bootstrap --base /tmp/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # embedding rows (the tokenizer may be smaller: the rest are padding rows)
    context: int
    tied: bool = True


SHAPES = {
    # HuggingFaceTB/SmolLM2-135M's config.json (LlamaForCausalLM): 134,515,008 parameters
    "smollm2-135m": Shape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, context=2048),
    # a few-layer cut of the same width, for tests of the builder
    "smollm2-135m-2l": Shape(hidden=576, layers=2, heads=9, kv_heads=3, intermediate=1536, vocab=49152, context=2048),
}


def shape_config(shape: Shape, tokenizer):
    from transformers import LlamaConfig

    if shape.vocab < len(tokenizer):
        raise ValueError(f"shape vocab {shape.vocab} is smaller than the tokenizer ({len(tokenizer)} entries)")
    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context,
        tie_word_embeddings=shape.tied,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_shape(name: str, *, tokenizer_vocab: int = 1024, corpus_size: int = 6000, seed: int = 0):
    """(model, tokenizer) of shape `name`: random weights, bootstrap's tokenizer (training/bootstrap.py)."""
    from training import world
    from training.model import build_model
    from training.tokenizer import train_tokenizer

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
    tokenizer = train_tokenizer(world.corpus_texts(corpus_size, seed=seed), tokenizer_vocab)
    model = build_model(shape_config(SHAPES[name], tokenizer), seed=seed)
    return model.eval(), tokenizer


def sft_briefly(model, tokenizer, seconds: float, seed: int = 0) -> dict:
    """A few seconds of SFT on the world's conversations (training/sft.py), at a learning rate a 100 M model takes."""
    from training import world
    from training.sft import SFTConfig, train_sft

    cfg = SFTConfig(lr=3e-4, warmup_steps=3, batch_size=8, max_seconds=seconds, max_length=96, seed=seed)
    metrics = train_sft(cfg, model, tokenizer, world.sft_conversations(2000, seed=seed))
    model.eval()
    return metrics


def save_shape(model, tokenizer, out: Path, manifest: dict) -> Path:
    from training.checkpoint import write_checkpoint

    return write_checkpoint(lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)), out, manifest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (must not exist)")
    ap.add_argument(
        "--tokenizer-vocab",
        type=int,
        default=1024,
        help="BPE size (bootstrap's 1024; the world's corpus tops out near 2.1k)",
    )
    ap.add_argument("--sft-seconds", type=float, default=0.0, help="SFT on the world's conversations (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()

    from training.model import count_parameters

    t0 = time.perf_counter()
    model, tok = build_shape(args.shape, tokenizer_vocab=args.tokenizer_vocab, seed=args.seed)
    sft = sft_briefly(model, tok, args.sft_seconds, args.seed) if args.sft_seconds > 0 else None
    manifest = {
        "source": "bench-shape",
        "shape": args.shape,
        "parent": None,
        "seed": args.seed,
        "random_init": True,
        "sft": sft,
    }
    save_shape(model, tok, args.out, manifest)
    bytes_ = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    out = {
        "shape": args.shape,
        "out": str(args.out),
        "parameters": count_parameters(model),
        "embedding_rows": model.config.vocab_size,
        "tokenizer_entries": len(tok),
        "sft": sft,
        "checkpoint_bytes": bytes_,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
