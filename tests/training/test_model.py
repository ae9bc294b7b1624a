"""Model construction (training/model.py): loading through the Hugging Face path is safe from two threads at once,
which a cycle needs when the reward model retrains beside the policy update (core/threads.py `beside`)."""

from __future__ import annotations

import threading

import torch

from tests.utils.tiny import tiny_model, tiny_tokenizer
from training.model import load_causal_lm
from training.reward import build_reward_model


def test_two_threads_loading_models_at_once_both_get_the_saved_weights(tmp_path):
    """transformers patches process-wide state while it builds a model; unserialised, two threads loading at once
    leave each other meta tensors (every load failed in a run without the lock)."""
    tok = tiny_tokenizer()
    folders = {}
    for arch in ("gpt2", "llama"):
        model = tiny_model(arch, seed=3)
        model.save_pretrained(tmp_path / arch)
        tok.save_pretrained(tmp_path / arch)
        folders[arch] = model.state_dict()
    errors: list[str] = []
    start = threading.Barrier(2)

    def policy_loads() -> None:
        start.wait()
        for _ in range(15):
            try:
                model, _ = load_causal_lm(tmp_path / "gpt2")
                state = model.state_dict()
                assert all(torch.equal(state[k], v) for k, v in folders["gpt2"].items())
            except Exception as exc:  # noqa: BLE001 - collected and asserted below, with the thread's other failures
                errors.append(f"policy: {exc!r}")

    def reward_builds() -> None:
        start.wait()
        for _ in range(15):
            try:
                rm = build_reward_model(tmp_path / "llama", tok)
                trunk = rm.base_model.state_dict()
                assert all(
                    torch.equal(trunk[k.removeprefix("model.")], v)
                    for k, v in folders["llama"].items()
                    if k.startswith("model.")
                )
                assert torch.isfinite(rm.score.weight).all()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"reward: {exc!r}")

    threads = [threading.Thread(target=policy_loads), threading.Thread(target=reward_builds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
