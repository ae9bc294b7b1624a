"""LoRA adapters (training/lora.py): the reference is the base exactly, training moves only the adapter, a saved
adapter applied to its base (merged or not) reproduces the trained policy, and a different base is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.utils.tiny import tiny_model, tiny_tokenizer
from training.checkpoint import write_checkpoint
from training.lora import (
    BaseMismatch,
    LoRAConfig,
    add_adapter,
    apply_adapter,
    folder_digest,
    linear_weights,
    merged_copy,
    reference_mode,
    save_adapter,
    trainable_parameters,
)

ARCHS = ("gpt2", "llama")


def _ids() -> torch.Tensor:
    tok = tiny_tokenizer()
    text = (
        tok.apply_chat_template(
            [{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True, tokenize=False
        )
        + "The answer is 7."
    )
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def _train_steps(model, ids: torch.Tensor, steps: int = 5) -> None:
    """A few steps of next-token loss on one sequence: enough to move a rank-4 adapter."""
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_training_moves_only_the_adapter_and_the_reference_is_the_base(arch):
    base = tiny_model(arch, seed=3)
    frozen = copy.deepcopy(base)
    ids = _ids()
    with torch.no_grad():
        base_logits = frozen(input_ids=ids).logits
    policy = add_adapter(base, LoRAConfig(rank=4, alpha=8))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    _train_steps(policy, ids)
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)  # the base did not move
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    with torch.no_grad():
        trained = policy(input_ids=ids).logits
        with reference_mode(policy):
            ref = policy(input_ids=ids).logits
    assert not torch.allclose(trained, base_logits, atol=1e-4)  # the adapter learned something
    torch.testing.assert_close(ref, base_logits, rtol=0, atol=0)  # adapter off = the base, bit for bit


@pytest.mark.parametrize("merge", [True, False])
def test_saved_adapter_reproduces_the_policy_and_refuses_another_base(tmp_path, merge):
    tok = tiny_tokenizer()
    base = tiny_model("llama", seed=5)
    base_dir = write_checkpoint(
        lambda d: (base.save_pretrained(d), tok.save_pretrained(d)), tmp_path / "v1", {"version": 1}
    )
    policy = add_adapter(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8))
    ids = _ids()
    _train_steps(policy, ids)
    save_adapter(policy, tmp_path / "adapter", base="v1", base_digest=folder_digest(base_dir))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 0.5 * sum(
        f.stat().st_size for f in base_dir.glob("*.safetensors")
    )

    restored = apply_adapter(tiny_model("llama", seed=5), tmp_path / "adapter", base_dir, merge=merge)
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=1e-4, atol=1e-5)

    other = tiny_model("llama", seed=6)
    other_dir = write_checkpoint(
        lambda d: (other.save_pretrained(d), tok.save_pretrained(d)), tmp_path / "v9", {"version": 9}
    )
    with pytest.raises(BaseMismatch, match="digest"):
        apply_adapter(other, tmp_path / "adapter", other_dir, merge=merge)


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)


@pytest.mark.parametrize("arch", ARCHS)  # GPT-2's Conv1D stores weights transposed (peft's fan_in_fan_out)
def test_direct_merge_equals_peft_and_shares_the_rest_with_the_base(tmp_path, arch):
    base = tiny_model(arch, seed=7)
    pristine = copy.deepcopy(base)
    policy = add_adapter(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8))
    ids = _ids()
    _train_steps(policy, ids)
    save_adapter(policy, tmp_path / "adapter", base="v1", base_digest="unused")
    spare = {name: torch.zeros_like(w) for name, w in linear_weights(base).items()}

    merged = merged_copy(base, tmp_path / "adapter", spare)
    expected = policy.merge_and_unload()
    for name, w in expected.state_dict().items():  # the same weights as peft's merge, to rounding of one addmm
        torch.testing.assert_close(merged.state_dict()[name], w, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert (
            merged.generate(input_ids=ids, max_new_tokens=8, do_sample=False).tolist()
            == expected.generate(input_ids=ids, max_new_tokens=8, do_sample=False).tolist()
        )
    adapted = {n for n, w in merged.named_parameters() if w.data_ptr() != base.get_parameter(n).data_ptr()}
    assert adapted and adapted <= set(linear_weights(base))  # only adapted weights are new memory …
    assert all(merged.get_parameter(n).data_ptr() == spare[n].data_ptr() for n in adapted)  # … the spare's
    for name, w in pristine.state_dict().items():  # and the base it shares the rest with did not change
        torch.testing.assert_close(base.state_dict()[name], w, rtol=0, atol=0)


def test_direct_merge_leaves_other_adapter_kinds_to_peft(tmp_path):
    base = tiny_model("llama", seed=7)
    dora = add_adapter(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8))
    dora.peft_config["default"].use_dora = True  # recorded in adapter_config.json: what the direct path refuses
    save_adapter(dora, tmp_path / "dora", base="v1", base_digest="unused")
    assert merged_copy(base, tmp_path / "dora") is None
