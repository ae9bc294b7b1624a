"""LoRA adapters on a frozen base (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), via peft.

What a real-size model changes: a cycle that fine-tunes every weight holds the policy, a reference copy and
optimiser states for all of them, and every publish writes (and every API process loads) a full copy. With LoRA the
policy is the frozen base plus a few MB of low-rank updates; the reference is the same base with the adapter switched
off (`reference_mode`, no second copy, as OpenRLHF and TRL + PEFT do); a version is published as its adapter, whose
manifest names the digest of the base it was trained on, so a follower refuses an adapter meant for another base.

    from training.lora import LoRAConfig, add_adapter
    policy = add_adapter(model, LoRAConfig(rank=16))       # only the adapter's parameters train
    with reference_mode(policy): ref_logits = policy(ids).logits
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft's save_pretrained writes
BASE_FILE = "base.json"  # beside the adapter: the base's folder (as the registry names it) and digest


@dataclass
class LoRAConfig:
    rank: int = 16  # r: 8-64 is the usual range for RLHF/DPO on 100 M-8 B models (OpenRLHF --lora_rank 16-64)
    alpha: int = 32  # scale alpha/r = 2: the update's size stays comparable when the rank changes
    dropout: float = 0.0  # RL and preference updates are small and few; dropout only adds noise to the ratio terms
    target_modules: list[str] | str = field(default="all-linear")  # every linear layer but the output head (QLoRA)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")

    def peft(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM")


def add_adapter(model: PreTrainedModel, cfg: LoRAConfig) -> PeftModel:
    """Freeze `model` and wrap it with a fresh LoRA adapter (B = 0, so the wrapped model starts equal to the base)."""
    return get_peft_model(model, cfg.peft())


def is_adapted(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def reference_mode(model: torch.nn.Module) -> Iterator[None]:
    """The reference policy of a LoRA policy: the same module with its adapter switched off — exactly the base's
    outputs, with no second copy of the weights in memory."""
    if not is_adapted(model):
        raise TypeError("reference_mode needs a LoRA-adapted model (training.lora.add_adapter)")
    with model.disable_adapter():
        yield


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def folder_digest(path: str | Path) -> str:
    """A digest that names a model folder's weights: the sha256 of its alignd manifest's file list when it has one
    (already hashed at publish), else of its weight files. Adapters record it to refuse a mismatched base."""
    path = Path(path)
    manifest = path / "manifest.json"
    h = hashlib.sha256()
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files") or {}
        weights = {k: v for k, v in files.items() if k.endswith((".safetensors", ".bin", "config.json"))}
        h.update(json.dumps(weights, sort_keys=True).encode())
        return h.hexdigest()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + [path / "config.json"]:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def save_adapter(model: PeftModel, dest: str | Path, *, base: str, base_digest: str) -> None:
    """Write the adapter (peft's safetensors + config) and `base.json` naming the base it belongs to."""
    dest = Path(dest)
    model.save_pretrained(str(dest))
    (dest / BASE_FILE).write_text(json.dumps({"base": base, "digest": base_digest}, indent=2))


def adapter_base(path: str | Path) -> dict[str, str] | None:
    """{"base", "digest"} of an adapter folder, or None when the folder is a full model."""
    f = Path(path) / BASE_FILE
    return json.loads(f.read_text()) if f.is_file() else None


class BaseMismatch(Exception):
    """An adapter was trained on another base than the one offered."""


def apply_adapter(base: PreTrainedModel, adapter_dir: str | Path, base_dir: str | Path, *,
                  merge: bool) -> PreTrainedModel:
    """The base with the adapter at `adapter_dir` applied: merged into the weights (`merge=True`: plain HF model,
    decoding speed of the base) or kept as a PeftModel. Refuses an adapter whose recorded base digest differs."""
    want = (adapter_base(adapter_dir) or {}).get("digest")
    have = folder_digest(base_dir)
    if want != have:
        raise BaseMismatch(f"{adapter_dir}: adapter was trained on a base with digest {str(want)[:12]}…, "
                           f"{base_dir} has {have[:12]}…")
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model.merge_and_unload() if merge else model
