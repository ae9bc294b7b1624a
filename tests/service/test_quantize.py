"""Int8 decode layers (service/quantize.py, `ALIGND_QUANTIZE=int8`): which layers are replaced, that the served
model's original stays untouched and shared, that few rows go through the int8 kernel and many through the original
weight bit for bit, and that the engine and the loader serve with them — on tiny models of two architectures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine import Engine, Policy, SamplingParams
from service.loader import load_version
from service.quantize import MAX_ROWS, Int8DecodeLinear, int8_decode_copy
from tests.utils.serving import make_settings, publish_tiny
from tests.utils.tiny import tiny_model, tiny_tokenizer

MSG = [{"role": "user", "content": "What is 2 plus 3?"}]


def _linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def _int8(model: nn.Module) -> int:
    return sum(isinstance(m, Int8DecodeLinear) for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_copy_replaces_linear_layers_and_shares_every_tensor_with_the_untouched_original(arch):
    model = tiny_model(arch, seed=3)
    before = {name: type(m) for name, m in model.named_modules()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    fast, replaced = int8_decode_copy(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # not a value changed
    # llama: 7 linear layers per block x 2 blocks + the output head, but down_proj's inner dimension (170) is not a
    # multiple of 32 and stays; GPT-2's blocks are Conv1D: only the head
    assert replaced == _int8(fast) == (13 if arch == "llama" else 1)
    assert _linears(fast) == (
        ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"] if arch == "llama" else []
    )
    assert {name: type(m) for name, m in model.named_modules()} == before  # the original keeps its modules
    originals = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert all(id(p) in originals for p in fast.parameters())  # nothing copied, nothing new to train or to drift
    for name, m in fast.named_modules():
        if isinstance(m, Int8DecodeLinear):
            w = model.get_submodule(name).weight.detach().float()
            restored = m.qweight.float() * m.scales.float()[:, None]
            # symmetric per-channel int8: every weight within half a step of its scale
            assert (restored - w).abs().le(m.scales.float()[:, None] * 0.502 + 1e-7).all()


def test_few_rows_use_int8_and_more_rows_the_original_weight_exactly():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    layer = Int8DecodeLinear(linear)
    for rows in (1, MAX_ROWS):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        exact = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == exact.shape
        err = (y.float() - exact).abs().max().item()
        assert 0 < err < 0.05 * exact.abs().max().item()  # the int8 path: close, not the same computation
    x = torch.randn(2, MAX_ROWS, 64, dtype=torch.bfloat16)  # 8 rows: the original weight
    assert torch.equal(layer(x), F.linear(x, linear.weight, linear.bias))
    x32 = torch.randn(1, 1, 64)  # float32 activations in, float32 out
    assert layer.to(torch.float32)(x32).dtype == torch.float32


def test_layers_the_kernel_cannot_take_are_left_as_they_are():
    """The kernel crashes the process on inner dimensions that are not multiples of 8; such layers stay nn.Linear."""
    model = nn.Sequential(nn.Linear(33, 64), nn.ReLU(), nn.Linear(64, 8))
    fast, replaced = int8_decode_copy(model)
    assert replaced == 1 and type(fast[0]) is nn.Linear and isinstance(fast[2], Int8DecodeLinear)
    assert fast(torch.randn(1, 33)).shape == (1, 8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_engine_decodes_through_the_int8_layers_close_to_the_plain_model(arch):
    plain = Policy(version=1, model=tiny_model(arch, seed=1), tokenizer=tiny_tokenizer()).prepared(torch.bfloat16)
    quant = Policy(version=1, model=plain.model, tokenizer=plain.tokenizer).prepared(quantize="int8")
    assert quant.fast is not None and quant.model is plain.model
    ids = torch.tensor([plain.encode_chat(MSG)])
    with torch.no_grad():
        a = plain.forward(input_ids=ids[:, :1]).logits.float()  # one position: the int8 path
        b = quant.forward(input_ids=ids[:, :1]).logits.float()
        full_a = plain.forward(input_ids=ids).logits  # the whole prompt: the original weights, bit for bit
        full_b = quant.forward(input_ids=ids).logits
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.1 * a.abs().max()
    assert torch.equal(full_a, full_b)
    engine = Engine(quant, max_batch_size=4)
    engine.start()
    try:
        text, finish, n = engine.generate(MSG, SamplingParams(temperature=0, max_tokens=16), timeout=30)
    finally:
        engine.stop()
    assert finish == "length" and n == 16 and text


def test_the_loader_serves_int8_and_keeps_the_loaded_model_plain(r, redis_url, tmp_path):
    settings = make_settings(tmp_path, quantize="int8", dtype="bfloat16")
    publish_tiny(redis_url, settings, arch="llama")
    policy = load_version(r, settings, 1)
    assert policy.dtype == torch.bfloat16
    assert policy.fast_ready.wait(30)  # built beside the swap, not before it
    assert _int8(policy.fast) == 13
    assert _int8(policy.model) == 0  # what a base cache would keep
    with pytest.raises(ValueError, match="quantize must be"):
        Policy(version=1, model=tiny_model("gpt2"), tokenizer=tiny_tokenizer()).prepared(quantize="int4")


def test_a_failed_int8_build_leaves_the_loaded_weights_serving(monkeypatch):
    import service.quantize

    def broken(model, max_rows=4):
        raise MemoryError("injected: no room for the int8 copy")

    monkeypatch.setattr(service.quantize, "int8_decode_copy", broken)
    policy = Policy(version=1, model=tiny_model("llama", seed=2), tokenizer=tiny_tokenizer())
    policy.prepared(quantize="int8", background=True)
    assert policy.fast_ready.wait(10) and policy.fast is None
    engine = Engine(policy, max_batch_size=2)
    engine.start()
    try:
        assert engine.generate(MSG, SamplingParams(temperature=0, max_tokens=4), timeout=30)[2] == 4
    finally:
        engine.stop()
