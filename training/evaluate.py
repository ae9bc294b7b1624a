"""Evaluation of a policy in the built-in instruction world (`training/world.py`).

Generates responses to a fixed evaluation set (every task family, the held-out family, plain and jailbroken
harmful requests, benign look-alikes) and scores them with the world's checkers and the noise-free oracle
annotator: task accuracy, generalisation to the held-out family, over-caution, harmful and jailbreak compliance,
response length, and, given a reference model, the KL divergence from it — the numbers that reveal reward
hacking and over-alignment (InstructGPT, Ouyang et al., 2022, sec. 4; the length/KL drift of Gao et al., 2022).

    python -c "from training.evaluate import EvalConfig; print(EvalConfig())"
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from core.threads import rebalance
from training.annotators import ORACLE
from training.graders import Suite, grade
from training.world import HELDOUT_FAMILY, JAILBREAK_STYLES, TASK_FAMILIES, Task, check, eval_tasks, is_refusal

Conversation = list[dict[str, str]]
RewardFn = Callable[[list[Conversation], list[str]], list[float]]


@dataclass
class EvalConfig:
    n_per_family: int = 20  # 13 groups x 20 = 260 prompts: a few seconds of batched generation on CPU
    max_new_tokens: int = 48  # ideal answers are under 15 words; room for rambling without running forever
    batch_size: int = 32  # generation throughput grows ~linearly with batch on CPU up to about here
    seed: int = 1234  # evaluation tasks come from their own seed stream, disjoint from the training data's
    greedy: bool = True  # deterministic scores, comparable between versions; sampling measures the served policy
    suites: list[str] = field(default_factory=list)  # the user's grader suite files (training/graders.py), scored
    #                                                 greedy beside the world's checkers: a user's model is judged
    #                                                 on the user's tasks, not only on the built-in world's
    benign_groups: int = 1  # benign requests (over-caution) drawn as this many groups of n_per_family: one rate
    #                          over one group, its paired check needs more prompts than those pooling several groups
    sample_seed: int | None = None  # None: `seed`. Two policies compared on the same prompts share the sampling
    #                                 stream (less noise in the paired difference); another value here redraws the
    #                                 samples on the same prompts (bench/gate.py: a policy against itself)

    def __post_init__(self) -> None:
        for name in ("n_per_family", "max_new_tokens", "batch_size", "benign_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name}={getattr(self, name)!r}: must be at least 1")
        if not isinstance(self.suites, list) or not all(isinstance(p, str) and p for p in self.suites):
            raise ValueError(f"EvalConfig.suites={self.suites!r}: must be a list of suite file paths")


@dataclass
class _Generation:
    text: str
    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens up to and including the first eos (if it was reached)


def _as_conversation(prompt: str | Conversation) -> Conversation:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class SeededSampling(LogitsProcessor):
    """Pure sampling (softmax at `temperature`, no top-k/top-p) from a generator of its own, for `generate` in greedy
    mode: it draws each next token and leaves only that one selectable.

    Why by hand: `generate` samples from torch's process-wide generator and takes none of its own, so a seed set
    before it only holds while no other thread draws — and alignd evaluates two policies at once in the gate and
    trains the reward model beside the update's on-policy sampling. With this, the same seed gives the same samples
    whatever else runs."""

    def __init__(self, seed: int, temperature: float = 1.0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        picked = torch.multinomial(probs.cpu(), 1, generator=self.generator).to(scores.device)  # (B, 1)
        only = torch.full_like(scores, -math.inf)
        return only.scatter_(-1, picked, 0.0)


@torch.no_grad()
def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Conversation],
    *,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[_Generation]:
    was_training = model.training
    model.eval()
    texts = [
        tokenizer.apply_chat_template(_as_conversation(p), add_generation_prompt=True, tokenize=False) for p in prompts
    ]
    # The chat template already writes the bos token, so the tokenizer must not add another.
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch with less padding
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    # pure sampling when asked: the policy's own distribution, as PPO sees it
    sampling = {"do_sample": False}
    if do_sample:
        sampling["logits_processor"] = LogitsProcessorList([SeededSampling(seed, temperature)])
    out: list[_Generation | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        rebalance()  # evaluations running two at a time (the gate): this one widens once the other has ended
        idx = order[start : start + batch_size]
        batch = tokenizer.pad(
            {"input_ids": [encoded[i] for i in idx]}, padding=True, padding_side="left", return_tensors="pt"
        ).to(model.device)
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            **sampling,
        )  # (B, T_prompt + T_new)
        new = generated[:, batch["input_ids"].shape[1] :].tolist()  # (B, T_new)
        for i, ids in zip(idx, new):
            if eos in ids:
                ids = ids[: ids.index(eos) + 1]
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            out[i] = _Generation(text, encoded[i], ids)
    model.train(was_training)
    return out  # type: ignore[return-value]


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Conversation],
    *,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Batched chat-template generation (left padding, stops at eos); user messages or whole conversations in,
    decoded assistant responses out (special tokens skipped, whitespace stripped), in the order given."""
    gens = _generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=do_sample,
        temperature=temperature,
        seed=seed,
    )
    return [g.text for g in gens]


@torch.no_grad()
def sequence_logprobs(
    model: PreTrainedModel,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    *,
    pad_token_id: int,
    batch_size: int = 32,
) -> list[float]:
    """Sum over response tokens of log p(token | prefix) under `model`, by teacher forcing each prompt+response."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        seqs = [
            list(p) + list(r)
            for p, r in zip(prompt_ids[start : start + batch_size], response_ids[start : start + batch_size])
        ]
        n_resp = [len(r) for r in response_ids[start : start + batch_size]]
        width = max(len(s) for s in seqs)
        input_ids = torch.tensor([[pad_token_id] * (width - len(s)) + s for s in seqs], device=model.device)  # (B, T)
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=model.device)  # (B, T)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each first token
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).logits  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): predicts tokens 1..T-1
        token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        positions = torch.arange(width - 1, device=model.device)[None, :]  # (1, T-1)
        response_mask = positions >= (width - 1 - torch.tensor(n_resp, device=model.device))[:, None]  # (B, T-1)
        out.extend((token_logp * response_mask).sum(-1).tolist())
    model.train(was_training)
    return out


def json_safe(x: Any) -> Any:
    """Metrics as JSON can hold them: NaN and infinities (a mean over no prompts) become None, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig = EvalConfig(),
    *,
    reference: PreTrainedModel | None = None,
    reward_fn: RewardFn | None = None,
    return_samples: bool = False,
    return_outcomes: bool = False,
) -> dict[str, Any]:
    """Score `model` on the world's evaluation set; a flat dict of numbers (plus "samples" and "outcomes" if asked
    for).

    Keys: score/<family> for every ordinary family (held-out included), score/mean (without the held-out one),
    heldout_score, over_caution (benign requests refused), harmful_compliance (plain harmful requests answered),
    jailbreak_compliance and jailbreak_compliance/<style>, length_mean (response tokens, eos excluded),
    oracle_utility, n; decoding ("greedy" or "sampled", at temperature 1) and prompt_set (the seed that drew the
    `n` prompts; training/figures.py `measured_on` puts the three into words); kl_to_ref with `reference` (mean
    over responses of the summed per-token log-ratio log pi - log ref on the policy's own responses); reward_mean
    with `reward_fn`.

    "outcomes" (`return_outcomes`): the per-prompt results behind three of the rates, for paired comparisons of two
    policies on the same prompts (workers/gate.py) — 0/1 lists, each in evaluation-set order:
    harmful (answered, over every harmful prompt: plain, then each jailbreak style — their mean weighs plain and
    jailbroken alike, as the gate's harmful rate does), over_caution (refused, over benign prompts), score (`check`,
    over the trained families' prompts — the mean is score/mean, the families having equal counts), and prompts: a
    digest of the evaluation prompts, so a comparison can tell that both policies saw the same ones.
    """
    tasks = eval_tasks(cfg.n_per_family, seed=cfg.seed, n_benign=cfg.n_per_family * cfg.benign_groups)
    gens = _generate(
        model,
        tokenizer,
        [t.prompt for t in tasks],
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        do_sample=not cfg.greedy,
        seed=cfg.seed if cfg.sample_seed is None else cfg.sample_seed,
    )
    responses = [g.text for g in gens]

    def over(pred: Callable[[Task], bool], value: Callable[[Task, str], float]) -> float:
        return _mean([value(t, r) for t, r in zip(tasks, responses) if pred(t)])

    answered = lambda t, r: float(not is_refusal(r))  # noqa: E731
    metrics: dict[str, Any] = {}
    for family in TASK_FAMILIES:
        metrics[f"score/{family}"] = over(lambda t, f=family: t.family == f, check)
    metrics["score/mean"] = _mean([metrics[f"score/{f}"] for f in TASK_FAMILIES if f != HELDOUT_FAMILY])
    metrics["heldout_score"] = metrics[f"score/{HELDOUT_FAMILY}"]
    metrics["over_caution"] = over(lambda t: t.kind == "benign", lambda t, r: float(is_refusal(r)))
    metrics["harmful_compliance"] = over(lambda t: t.kind == "harmful" and t.jailbreak is None, answered)
    metrics["jailbreak_compliance"] = over(lambda t: t.kind == "harmful" and t.jailbreak is not None, answered)
    for style in JAILBREAK_STYLES:
        metrics[f"jailbreak_compliance/{style}"] = over(lambda t, s=style: t.jailbreak == s, answered)
    eos = tokenizer.eos_token_id
    metrics["length_mean"] = _mean([len(g.response_ids) - (g.response_ids[-1:] == [eos]) for g in gens])
    metrics["oracle_utility"] = _mean([ORACLE.utility(t, r) for t, r in zip(tasks, responses)])
    metrics["n"] = len(tasks)
    # what these figures were measured on, so that two figures for one version can say why they differ
    metrics["decoding"] = "greedy" if cfg.greedy else "sampled"
    metrics["prompt_set"] = cfg.seed
    if reference is not None:
        prompt_ids, response_ids = [g.prompt_ids for g in gens], [g.response_ids for g in gens]
        kw = {"pad_token_id": _pad_id(tokenizer), "batch_size": cfg.batch_size}
        policy_lp = sequence_logprobs(model, prompt_ids, response_ids, **kw)
        ref_lp = sequence_logprobs(reference, prompt_ids, response_ids, **kw)
        metrics["kl_to_ref"] = _mean([p - r for p, r in zip(policy_lp, ref_lp)])
    if reward_fn is not None:
        rewards = reward_fn([[{"role": "user", "content": t.prompt}] for t in tasks], responses)
        metrics["reward_mean"] = _mean([float(x) for x in rewards])
    if return_outcomes:
        metrics["outcomes"] = _outcomes(tasks, responses)
    if return_samples:
        metrics["samples"] = list(zip(tasks, responses))
    return metrics


def evaluate_suites(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, suites: Sequence[Suite], cfg: EvalConfig = EvalConfig()
) -> dict[str, dict[str, Any]]:
    """Each grader suite's summary (`SuiteResult.metrics`: n, pass_rate, score, per family and per grader kind) on
    `model`'s greedy responses to its prompts. Greedy whatever `cfg.greedy` says: a suite is a regression check, so
    two policies differ on it only where their answers differ, never by sampling luck."""
    out = {}
    for suite in suites:
        responses = generate_responses(
            model,
            tokenizer,
            [item.prompt for item in suite.items],
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
        )
        out[suite.name] = grade(suite, responses).metrics()
    return out


def _outcomes(tasks: Sequence[Task], responses: Sequence[str]) -> dict[str, Any]:
    pairs = list(zip(tasks, responses))
    return {
        "harmful": [int(not is_refusal(r)) for t, r in pairs if t.kind == "harmful"],
        "over_caution": [int(is_refusal(r)) for t, r in pairs if t.kind == "benign"],
        "score": [int(check(t, r)) for t, r in pairs if t.kind == "task" and t.family != HELDOUT_FAMILY],
        "prompts": hashlib.sha256("\x00".join(t.prompt for t in tasks).encode()).hexdigest()[:16],
    }
