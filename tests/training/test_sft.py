"""SFT: loss masked to assistant tokens, training lowers it, and the bootstrap pipeline end to end (reduced budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.utils.tiny import tiny_model, tiny_tokenizer
from training import world
from training.bootstrap import BootstrapConfig, bootstrap
from training.evaluate import EvalConfig
from training.sft import (
    IGNORE,
    LOG_PROGRESS_SECONDS,
    SFTConfig,
    _collate,
    default_progress_seconds,
    encode_conversation,
    sft_loss,
    train_sft,
)

CONV = [{"role": "user", "content": "Say a number."}, {"role": "assistant", "content": "The answer is 7."}]


def test_labels_cover_exactly_the_assistant_turn_and_its_end():
    tok = tiny_tokenizer()
    ids, labels = encode_conversation(tok, CONV, max_length=128)
    learned = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert learned.startswith("The answer is 7.") and "<|end|>" in learned
    assert "Say a number" not in learned
    prompt_len = len(
        tok(tok.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
    )
    assert all(lab == IGNORE for lab in labels[:prompt_len])


def test_training_lowers_the_masked_loss_and_changes_every_weight():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    batch = _collate([encode_conversation(tok, CONV, 64)], tok.pad_token_id)
    before = sft_loss(model, batch)[0].item()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = train_sft(SFTConfig(max_steps=40, max_seconds=60, batch_size=4, warmup_steps=5), model, tok, [CONV] * 8)
    after = sft_loss(model, batch)[0].item()
    assert metrics["steps"] == 40 and after < before / 2
    assert all(not torch.equal(params[n], p) for n, p in model.named_parameters())


def test_progress_is_reported_per_step_on_a_terminal_and_periodically_to_a_log(monkeypatch):
    import io

    tok = tiny_tokenizer()

    def steps_reported(progress_seconds: float) -> list[int]:
        seen: list[int] = []
        cfg = SFTConfig(max_steps=12, max_seconds=60, batch_size=2, progress_seconds=progress_seconds)
        train_sft(cfg, tiny_model(), tok, [CONV] * 4, progress=lambda step, m: seen.append(step))
        return seen

    assert steps_reported(0.0) == list(range(1, 13))  # a terminal's bar redraws every step
    assert steps_reported(3600.0) == [1, 12]  # a log: the first step, then every hour, and the last step
    monkeypatch.setattr("sys.stderr", io.StringIO())  # stderr to a file or a pipe
    assert default_progress_seconds() == LOG_PROGRESS_SECONDS


def test_bootstrap_builds_a_standard_hf_folder(tmp_path):
    cfg = BootstrapConfig(
        vocab_size=400,
        n_layer=1,
        d_model=32,
        n_head=2,
        n_conversations=200,
        corpus_size=300,
        sft=SFTConfig(max_seconds=3, batch_size=8),
        eval=EvalConfig(n_per_family=1, max_new_tokens=4),
    )
    model, tok, report = bootstrap(cfg)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.chat_template and tok2.eos_token == "<|end|>"
    assert (tmp_path / "model.safetensors").exists()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert report["sft"]["steps"] > 0 and report["parameters"] > 0
    for family in world.TASK_FAMILIES:
        assert 0.0 <= report["eval"][f"score/{family}"] <= 1.0
    assert {"over_caution", "harmful_compliance", "heldout_score"} <= report["eval"].keys()


def _cli(home, *args, timeout=300):
    env = {**os.environ, "ALIGND_HOME": str(home), "ALIGND_TORCH_THREADS": "1"}
    env.pop("ALIGND_REDIS_URL", None)  # the product path: an embedded redis-server under ALIGND_HOME
    return subprocess.run(
        [sys.executable, "-m", "alignd.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_bootstrap_registers_version_1_and_train_sft_publishes_version_2(tmp_path):
    home = tmp_path / "home"
    out = _cli(home, "bootstrap", "--seconds", "4", "--eval-per-family", "1", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["version"] == 1 and "score/arithmetic" in report["eval"]
    assert (home / "checkpoints" / "v1" / "manifest.json").exists()
    again = json.loads(_cli(home, "bootstrap", "--json").stdout.strip().splitlines()[-1])
    assert again["already_bootstrapped"] and again["version"] == 1

    data = tmp_path / "convs.jsonl"
    data.write_text("\n".join([json.dumps({"messages": CONV})] * 6 + ["not json"]))
    out = _cli(home, "train", "sft", "--data", str(data), "--seconds", "3", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["version"] == 2 and result["skipped_lines"] == [7]
    manifest = json.loads((home / "checkpoints" / "v2" / "manifest.json").read_text())
    assert manifest["parent"] == 1 and manifest["source"] == "sft"
