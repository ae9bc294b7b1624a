"""bench/shapes.py: the SmolLM2-135M shape has SmolLM2-135M's parameter count, and a built shape is a checkpoint
folder alignd loads as a base (chat template, tokenizer ids inside the embedding)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from bench.shapes import SHAPES, build_shape, save_shape, shape_config
from training.checkpoint import verify_checkpoint
from training.model import load_causal_lm
from training.tokenizer import train_tokenizer


def test_the_135m_shape_has_smollm2_135m_parameter_count():
    tok = train_tokenizer(["a small corpus for a tokenizer", "with a few words"], 300)
    with torch.device("meta"):  # the shape, without 540 MB of weights
        model = AutoModelForCausalLM.from_config(shape_config(SHAPES["smollm2-135m"], tok))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # HuggingFaceTB/SmolLM2-135M
    assert model.config.num_key_value_heads == 3 and model.config.tie_word_embeddings


def test_a_built_shape_is_a_base_alignd_loads(tmp_path):
    model, tok = build_shape("smollm2-135m-2l", corpus_size=300)
    assert model.config.vocab_size >= len(tok) and model.config.eos_token_id == tok.eos_token_id
    save_shape(model, tok, tmp_path / "base", {"source": "test"})
    assert verify_checkpoint(tmp_path / "base")["source"] == "test"
    loaded, loaded_tok = load_causal_lm(tmp_path / "base")  # what `alignd bootstrap --base` checks
    assert loaded_tok.chat_template and loaded.config.num_hidden_layers == 2
    ids = torch.tensor([loaded_tok("Hello")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
