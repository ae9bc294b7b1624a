"""Supervised instruction fine-tuning (SFT) of any causal LM on chat conversations, loss masked to assistant tokens.

Follows the InstructGPT recipe's first stage (Ouyang et al. 2022): next-token cross-entropy on demonstrations, counted
only on the assistant's turns so the model learns to answer rather than to imitate users.

    alignd train sft --data convs.jsonl [--base PATH]     # any chat-format JSONL, any local HF causal LM
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE = -100  # label value cross-entropy skips
LOG_PROGRESS_SECONDS = 30.0  # progress to a log file: a line every 30 s (a 180 s bootstrap writes 7, not 1,274)


def default_progress_seconds() -> float:
    """Seconds between progress reports: every step on a terminal (a bar redraws in place), LOG_PROGRESS_SECONDS when
    stderr is a file or a pipe, where each report is a line."""
    return 0.0 if sys.stderr.isatty() else LOG_PROGRESS_SECONDS


@dataclass
class SFTConfig:
    lr: float = 3e-3  # tiny models tolerate (and need) a high LR to learn in ~3 minutes (2e-3 and 4e-3 measured)
    min_lr_ratio: float = 0.1  # cosine decay to 10% keeps late steps useful without undoing early progress
    warmup_steps: int = 30  # AdamW's second-moment estimate is noisy for the first steps
    weight_decay: float = 0.01
    batch_size: int = 32  # enough sequences per step to use both cores' matmul efficiency
    max_steps: int = 3000  # upper bound; max_seconds usually stops first
    max_seconds: float = 180.0  # the bootstrap's wall-clock budget on 2 CPU cores: 5 min in all with eval
    max_length: int = 160  # built-in conversations are < 100 tokens; longer user data is truncated
    grad_clip: float = 1.0
    seed: int = 0
    progress_seconds: float = field(default_factory=default_progress_seconds)  # between calls of `progress`


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_length: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = IGNORE outside assistant turns, for any tokenizer with a chat template.

    Assistant spans are found by rendering the conversation prefix by prefix, so this works for every template
    without a `{% generation %}` marker; offsets map the character spans onto tokens.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tok_id, (a, b) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= a and b <= e and b > a for s, e in spans)
        labels.append(tok_id if inside else IGNORE)
    return ids[:max_length], labels[:max_length]


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):  # right padding for training: positions start at 0 for every row
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def sft_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]  # predict token t+1 from tokens ≤ t
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(), shift_labels.reshape(-1), ignore_index=IGNORE
    )
    tokens = int((shift_labels != IGNORE).sum())
    return loss, {"loss": loss.item(), "tokens": tokens}


def train_sft(
    cfg: SFTConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    progress: Callable[[int, dict], None] | None = None,
) -> dict[str, float]:
    """Fine-tune `model` in place; stops at `max_steps` or `max_seconds`. Returns summary metrics. `progress(step,
    {"loss", "lr", "seconds"})` is called at most every `cfg.progress_seconds` and after the last step."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    examples = [encode_conversation(tokenizer, c, cfg.max_length) for c in conversations]
    examples = [e for e in examples if any(lab != IGNORE for lab in e[1])]
    if not examples:
        raise ValueError("no conversation has an assistant turn to learn from")
    device = next(model.parameters()).device
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int, total: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    start, step, ema, tokens = time.monotonic(), 0, None, 0
    reported_at, reported_step = -math.inf, 0  # when `progress` was last called, and on which step
    order: list[int] = []
    est_total = cfg.max_steps
    while step < cfg.max_steps:
        elapsed = time.monotonic() - start
        if elapsed > cfg.max_seconds:
            break
        if step == 20:  # re-estimate the schedule length from measured speed so the cosine ends on the budget
            est_total = min(cfg.max_steps, int(step * cfg.max_seconds / max(elapsed, 1e-6)))
        if len(order) < cfg.batch_size:
            order = list(range(len(examples)))
            rng.shuffle(order)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = {k: v.to(device) for k, v in _collate([examples[i] for i in idx], tokenizer.pad_token_id or 0).items()}
        for group in opt.param_groups:
            group["lr"] = lr_at(step, est_total)
        loss, metrics = sft_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema = metrics["loss"] if ema is None else 0.95 * ema + 0.05 * metrics["loss"]
        tokens += metrics["tokens"]
        step += 1
        now = time.monotonic()
        if progress is not None and now - reported_at >= cfg.progress_seconds:
            progress(step, {"loss": ema, "lr": opt.param_groups[0]["lr"], "seconds": now - start})
            reported_at, reported_step = now, step
    model.eval()
    seconds = time.monotonic() - start
    if progress is not None and step != reported_step:  # the last step, so that a log ends on the final figures
        progress(step, {"loss": ema, "lr": opt.param_groups[0]["lr"], "seconds": seconds})
    return {
        "steps": step,
        "loss": float(ema or 0.0),
        "seconds": seconds,
        "examples": len(examples),
        "tokens_per_s": tokens / max(seconds, 1e-6),
    }
