"""The cycle with LoRA policy updates (CycleConfig.update.adapter = "lora"): a version is published as an adapter
naming its base, the next cycle continues that adapter against the same base, and what the API process loads (the
adapter merged into its base) answers exactly as the trained adapter does."""

from __future__ import annotations

import pytest
import torch

from service.loader import load_version
from store import registry
from tests.workers.helpers import make_settings, publish_tiny, seed_feedback, tiny_overrides
from training.checkpoint import CheckpointError, verify_checkpoint
from training.lora import BaseCache, BaseMismatch, adapter_base, load_policy
from workers.cycle import run_cycle
from workers.cycle_config import CycleConfig


def lora_cycle() -> CycleConfig:
    return CycleConfig.from_dict(tiny_overrides(**{"update.adapter": "lora", "lora.rank": 4, "lora.alpha": 8}))


@pytest.mark.slow
def test_lora_cycles_publish_adapters_that_continue_and_serve_like_the_trained_policy(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    v1 = publish_tiny(r, settings)
    seed_feedback(r, 12)
    first = run_cycle(r, settings, lora_cycle())
    assert first["status"] == "published", first
    v2 = first["version"]
    meta = registry.get_version(r, v2)
    folder = settings.checkpoint(meta["path"])
    manifest = verify_checkpoint(folder)
    assert meta["adapter"]["base_version"] == v1 and meta["adapter"]["rank"] == 4
    assert adapter_base(folder)["base"] == registry.get_version(r, v1)["path"]  # relative: the home can move
    assert "adapter_model.safetensors" in manifest["files"] and "model.safetensors" not in manifest["files"]
    base_bytes = (settings.checkpoint(registry.get_version(r, v1)["path"]) / "model.safetensors").stat().st_size
    assert (folder / "adapter_model.safetensors").stat().st_size < 0.5 * base_bytes

    # the API's load (adapter merged into a copy of its base) answers as the adapter applied in place does
    served = load_version(r, settings, v2)
    adapted, tok = load_policy(folder, "cpu", resolve_base=settings.checkpoint, merge=False)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        greedy = adapted.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        torch.testing.assert_close(
            served.model(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )
    assert served.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False).tolist() == greedy.tolist()

    # the next cycle continues this adapter, still against v1 (the reference is the base with the adapter off)
    seed_feedback(r, 12, seed=1)
    second = run_cycle(r, settings, lora_cycle())
    assert second["status"] == "published", second
    meta3 = registry.get_version(r, second["version"])
    assert meta3["parent"] == v2 and meta3["reference_version"] == v1 and meta3["adapter"]["base_version"] == v1
    assert second["update"]["resumed"] is False  # an adapter trainer starts afresh from the published adapter

    # the API keeps the verified base in memory (service.loader.BASES): the next adapter swap reads only the adapter
    folder3 = settings.checkpoint(meta3["path"])
    expected, _ = load_policy(folder3, "cpu", resolve_base=settings.checkpoint)
    base_weights = settings.checkpoint(registry.get_version(r, v1)["path"]) / "model.safetensors"
    base_weights.rename(base_weights.with_suffix(".moved"))
    served3 = load_version(r, settings, second["version"])  # the base file is gone: only the cache can supply it
    with torch.no_grad():
        torch.testing.assert_close(served3.model(input_ids=ids).logits, expected(input_ids=ids).logits)
    with pytest.raises(CheckpointError, match="missing"):  # a fresh cache verifies the base, and finds it gone
        load_policy(folder3, "cpu", resolve_base=settings.checkpoint, base_cache=BaseCache())


def test_an_adapter_refuses_a_base_that_changed(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    seed_feedback(r, 8)
    report = run_cycle(
        r, settings, CycleConfig.from_dict(tiny_overrides(**{"update.adapter": "lora", "update.steps": 1}))
    )
    assert report["status"] == "published", report
    base = settings.checkpoint(registry.get_version(r, 1)["path"])
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes: still the same base
    load_policy(
        settings.checkpoint(registry.get_version(r, report["version"])["path"]),
        "cpu",
        resolve_base=settings.checkpoint,
    )
    manifest = base / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"model.safetensors": "', '"model.safetensors": "0'))
    with pytest.raises(BaseMismatch, match="digest"):
        load_policy(
            settings.checkpoint(registry.get_version(r, report["version"])["path"]),
            "cpu",
            resolve_base=settings.checkpoint,
        )
