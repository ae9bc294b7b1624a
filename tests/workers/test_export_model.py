"""`alignd export-model` through the real typer app: a LoRA version comes out as a plain HF folder (adapter merged
into its base) that answers exactly as the adapter applied in place, a full version comes out with its own weights,
and bad requests are refused with a non-zero exit."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from alignd.cli import app
from core.config import get_settings
from store import registry
from tests.workers.helpers import env_for, make_settings, publish_tiny, seed_feedback, tiny_overrides
from training.checkpoint import verify_checkpoint
from training.lora import load_policy
from training.model import load_causal_lm
from workers.cycle import run_cycle
from workers.cycle_config import CycleConfig


@pytest.fixture
def cli(r, redis_url, tmp_path, monkeypatch):
    settings = make_settings(tmp_path / "home", redis_url)
    for k, v in env_for(settings).items():
        if k.startswith("ALIGND_"):
            monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    publish_tiny(r, settings)
    runner = CliRunner()
    yield settings, lambda *args: runner.invoke(app, list(args), catch_exceptions=False)
    get_settings.cache_clear()


def logits(model, tok, text: str) -> torch.Tensor:
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_export_model_merges_a_lora_version_into_a_plain_hf_folder(r, cli, tmp_path):
    settings, run = cli
    seed_feedback(r, 8)
    report = run_cycle(
        r,
        settings,
        CycleConfig.from_dict(tiny_overrides(**{"update.adapter": "lora", "lora.rank": 4, "lora.alpha": 8})),
    )
    assert report["status"] == "published", report
    v2 = report["version"]
    out = tmp_path / "exported"
    res = run("export-model", str(v2), "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["merged_adapter"] is True

    manifest = verify_checkpoint(out)
    assert "model.safetensors" in manifest["files"] and "adapter_model.safetensors" not in manifest["files"]
    assert manifest["version"] == v2 and manifest["merged_adapter"]["digest"]
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # no peft, no alignd: a standard folder
    tok = AutoTokenizer.from_pretrained(str(out))
    adapted, _ = load_policy(
        settings.checkpoint(registry.get_version(r, v2)["path"]), "cpu", resolve_base=settings.checkpoint, merge=False
    )
    base, _ = load_causal_lm(settings.checkpoint(registry.get_version(r, 1)["path"]))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, tokenize=False
    )
    exported = logits(plain, tok, text)
    torch.testing.assert_close(exported, logits(adapted, tok, text), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(exported, logits(base, tok, text), atol=1e-6)  # the adapter's update is in it


def test_export_model_of_a_full_version_and_refusals(r, cli, tmp_path):
    settings, run = cli
    out = tmp_path / "v1"
    res = run("export-model", "1", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert verify_checkpoint(out)["merged_adapter"] is None
    model, tok = load_causal_lm(out)
    base, _ = load_causal_lm(settings.checkpoint(registry.get_version(r, 1)["path"]))
    torch.testing.assert_close(logits(model, tok, "Hello"), logits(base, tok, "Hello"), rtol=0, atol=0)

    again = run("export-model", "1", "--out", str(out))
    assert again.exit_code == 2 and "already exists" in again.output
    missing = run("export-model", "42", "--out", str(tmp_path / "v42"))
    assert missing.exit_code == 2 and "not in the registry" in missing.output
    assert not (tmp_path / "v42").exists()
