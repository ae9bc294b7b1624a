"""A LoRA reward model (training/reward.py with `lora`): only the adapter and the score head train, it learns a
clear preference on tiny models of two architectures, it is saved as its adapter (a fraction of the full folder),
loads back to the same scores on its base, and refuses another base."""

from __future__ import annotations

import pytest
import torch

from tests.training.test_reward import good_bad_comparisons
from tests.utils.tiny import tiny_model, tiny_tokenizer
from training.checkpoint import write_checkpoint
from training.lora import BaseMismatch, LoRAConfig, adapter_base, folder_digest
from training.reward import RewardConfig, load_reward_model, save_reward_model, score, train_reward_model

ARCHS = ["gpt2", "llama"]


def _folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_reward_model_trains_only_adapter_and_head_and_round_trips(tmp_path, arch):
    tok = tiny_tokenizer()
    base = tiny_model(arch, seed=0)
    base_dir = write_checkpoint(lambda d: (base.save_pretrained(d), tok.save_pretrained(d)), tmp_path / "v1", {})
    frozen = {k: v.detach().clone() for k, v in base.named_parameters()}
    cfg = RewardConfig(lr=3e-3, epochs=3, batch_size=8, heldout_fraction=0.25, seed=0)
    data = good_bad_comparisons()
    rm, metrics = train_reward_model(cfg, data, base=base_dir, tokenizer=tok, lora=LoRAConfig(rank=4, alpha=8))
    assert metrics["heldout_accuracy"] >= 0.8, metrics
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)  # the trunk stays frozen
    trunk = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in rm.named_parameters()}
    for name, before in frozen.items():  # … and equal to the base it was read from
        if name.replace("lm_head", "") == name and name in trunk:
            assert torch.equal(trunk[name], before), name

    save_reward_model(rm, tok, tmp_path / "rm", base="v1", base_digest=folder_digest(base_dir))
    assert adapter_base(tmp_path / "rm")["base"] == "v1"
    assert _folder_bytes(tmp_path / "rm") < 0.5 * _folder_bytes(base_dir)
    loaded, loaded_tok = load_reward_model(tmp_path / "rm")  # the base is found beside it, as in a checkpoint root
    prompts, responses = [c.prompt for c in data[:8]], [c.chosen for c in data[:8]]
    torch.testing.assert_close(score(loaded, loaded_tok, prompts, responses), score(rm, tok, prompts, responses))

    other = tiny_model(arch, seed=1)
    write_checkpoint(lambda d: (other.save_pretrained(d), tok.save_pretrained(d)), tmp_path / "v9", {})
    with pytest.raises(BaseMismatch, match="digest"):
        load_reward_model(tmp_path / "rm", resolve_base=lambda _: tmp_path / "v9")


def test_a_lora_reward_model_is_saved_with_its_base():
    with pytest.raises(ValueError, match="base"):
        rm, _ = train_reward_model(
            RewardConfig(epochs=1, batch_size=8),
            good_bad_comparisons(8),
            base=tiny_model("llama"),
            tokenizer=tiny_tokenizer(),
            lora=LoRAConfig(rank=2),
        )
        save_reward_model(rm, tiny_tokenizer(), "/nonexistent-never-written")


def test_reward_adapter_mode_is_validated():
    with pytest.raises(ValueError, match="adapter"):
        RewardConfig(adapter="half")
