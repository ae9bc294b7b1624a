"""Preference optimisation straight from labels: DPO on comparisons and KTO on thumbs, without a reward model.

The online loop's reward model is small and cannot tell a correct answer from a plausible wrong one (README,
"Measured figures"); the labels can. DPO (Rafailov et al. 2023) turns each comparison into a logistic loss on the
policy's implicit reward beta * log(pi(y|x) / ref(y|x)); KTO (Ethayarajh et al. 2024) needs only a thumb per
response. The losses are in `training/losses.py` (DPOLoss, KTOLoss); this module encodes the data, computes
response-only log-probs and runs the optimisation for a time or step budget.

Data (`training/data.py`):
- DPO: `Comparison` "pref" pairs (with an optional ODPO offset from `margin`), "tie" pairs (IPO target 0),
  "both_bad" pairs (both pushed below the reference). A tie between identical texts has no gradient and is
  skipped. `Rated` thumbs have no partner and are ignored by DPO (the store already pairs a user's up and down
  thumbs on one completion into a comparison).
- KTO: every `Rated` thumb; a "pref" pair gives its chosen response as desirable and its rejected one as
  undesirable, "both_bad" gives two undesirable ones; ties carry no absolute judgement and are skipped.

Each item's loss is multiplied by its `weight` (its annotator's reliability weight, training/reliability.py; 1
unless set) and a batch's loss is the weighted mean.

The reference is a frozen model (alignd passes the SFT ancestor); without one, a PEFT (LoRA) policy is its own
reference with the adapters disabled, and any other policy is deep-copied at the start. Log-probs are summed over
the response tokens only (the prompt is masked), up to and including the first EOS token: the model learns where
to stop, and the newline a chat template writes after EOS is never generated. Reference log-probs are computed
once per distinct (prompt, response) and cached. Dropout is off while training (the model stays in eval mode),
as TRL does for DPO: dropout would make the policy/reference ratio noisy even at initialisation.

    python -m pytest tests/training/test_preference.py -q
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.data import Comparison, Message, Rated, prompt_key
from training.losses import PREFERENCE_KINDS, DPOLoss, KTOLoss, weighted_mean
from training.reward import make_batches, split_by_prompt

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (prompt_key, response): one scored sequence


@dataclass
class PreferenceConfig:
    """The budget and optimiser shared by DPO and KTO."""

    beta: float = 0.5  # KL leash. The paper's 0.1 (at lr 2e-5 or 1e-4) made the built-in model comply with 70-80 %
    #                    of harmful requests within 60 s of DPO (bench/dpo.py); 0.5 kept it at 0 (KL 0.4 nats)
    lr: float = 2e-5  # AdamW; 1e-4 moved the built-in model 8.6 nats from its SFT reference in 60 s (bench/dpo.py)
    weight_decay: float = 0.0  # few passes over the data: the reference ratio, not decay, is the regulariser
    batch_size: int = 16  # pairs (DPO) or responses (KTO) per step; small steps suit a CPU time budget
    epochs: int | None = 2  # passes over the training split; None leaves only the time/step budget
    max_seconds: float | None = 60.0  # wall-clock budget of the loop; ~one reward-model training on 2 CPU cores
    max_steps: int | None = None  # optimiser steps; for tests and benchmarks that need a fixed amount of work
    max_length: int = 512  # tokens per sequence; the prompt is cut from the left first, then the response
    max_grad_norm: float = 1.0  # standard clipping; one extreme pair cannot wreck a small model
    heldout_fraction: float = 0.1  # share of *prompts* held out to report generalisation, as the reward model does
    eval_batch_size: int = 32  # sequences per forward without gradients
    seed: int = 0  # shuffling and the held-out split

    def __post_init__(self) -> None:
        if self.epochs is None and self.max_seconds is None and self.max_steps is None:
            raise ValueError(f"{type(self).__name__} needs a budget: set epochs, max_seconds or max_steps")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")


@dataclass
class DPOConfig(PreferenceConfig):
    label_smoothing: float = 0.0  # cDPO's assumed label-flip rate; alignd's simulated annotators flip 25 %, but
    #                               users' rate is unknown, and 0 is plain DPO (Mitchell 2023 for when it is known)
    tie_weight: float = 1.0  # IPO tie term (beta h)^2; 1 gives it the DPO term's scale for |beta h| < ~1
    both_bad_weight: float = 1.0  # NPO push-down of both responses; at 1 its gradient at the reference is a pair's
    margin_scale: float = 0.0  # ODPO offset per unit of `Comparison.margin` (rank distance - 1). The margin is in
    #                            reward-model units, the implicit reward in beta * nats, so 0 (plain DPO, as TRL)


@dataclass
class KTOConfig(PreferenceConfig):
    lambda_d: float = 1.0  # weight of desirable responses (the paper's lambda_D)
    lambda_u: float | None = None  # weight of undesirable ones; None sets lambda_U = lambda_D n_D / n_U from the
    #                                data, the lower end of the paper's recommended ratio [1, 4/3] (§4.2), so a
    #                                flood of thumbs-down does not drown the few thumbs-up (or vice versa)


# ---------------------------------------------------------------------------------------------------- log-probs


def _ids(
    tokenizer: PreTrainedTokenizerBase, prompt: list[Message], response: str, max_length: int
) -> tuple[list[int], int]:
    """(token ids, number of response tokens at the end) for one conversation ending in `response`."""
    prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prefix):
        raise ValueError(
            "the chat template does not render a conversation as the prompt followed by the reply; "
            "alignd cannot tell which tokens are the response"
        )
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)  # the template has its BOS
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    start = next((i for i, (_, b) in enumerate(offsets) if b > len(prefix)), len(ids))  # first token reaching in
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    end = next((i + 1 for i in range(start, len(ids)) if ids[i] in eos), len(ids))  # up to and including EOS
    prompt_ids, response_ids = ids[:start], ids[start:end]
    response_ids = response_ids[: max_length - min(len(prompt_ids), max_length // 2)]  # prompt keeps >= half
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(response_ids) - max_length) :]  # keep the prompt's end
    return prompt_ids + response_ids, len(response_ids)


def response_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sequences: Sequence[tuple[list[Message], str]],
    max_length: int,
) -> torch.Tensor:
    """Summed log-probs of each response given its prompt, (B,), with gradients if enabled (right padding)."""
    encoded = [_ids(tokenizer, p, r, max_length) for p, r in sequences]
    T = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    input_ids = torch.full((len(encoded), T), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), T), dtype=torch.long)
    target = torch.zeros((len(encoded), T), dtype=torch.bool)  # response tokens
    for i, (ids, n) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        target[i, len(ids) - n : len(ids)] = True
    input_ids, attention, target = input_ids.to(device), attention.to(device), target.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return (logp * target[:, 1:]).sum(-1)  # (B,): position t predicts token t + 1


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class _Scorer:
    """Policy log-probs with gradients, reference log-probs cached by (prompt, response)."""

    def __init__(self, policy: PreTrainedModel, reference: PreTrainedModel | None, tokenizer, max_length: int):
        self.policy, self.tokenizer, self.max_length = policy, tokenizer, max_length
        if reference is None and not _is_peft(policy):
            reference = copy.deepcopy(policy)
        if reference is not None:
            reference.eval()  # dropout off; no gradients reach it (its forwards run under no_grad)
        self.reference = reference
        self.cache: dict[Key, float] = {}

    @contextlib.contextmanager
    def _reference(self) -> Iterator[PreTrainedModel]:
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy.disable_adapter():  # LoRA: the base weights are the reference
                yield self.policy

    def policy_logps(self, sequences: Sequence[tuple[list[Message], str]]) -> torch.Tensor:
        return response_logprobs(self.policy, self.tokenizer, sequences, self.max_length)

    @torch.no_grad()
    def reference_logps(self, sequences: Sequence[tuple[list[Message], str]], batch_size: int = 32) -> torch.Tensor:
        keys = [(prompt_key(p), r) for p, r in sequences]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if missing:
            by_key = dict(zip(keys, sequences, strict=True))
            with self._reference() as ref:
                for i in range(0, len(missing), batch_size):
                    chunk = missing[i : i + batch_size]
                    values = response_logprobs(ref, self.tokenizer, [by_key[k] for k in chunk], self.max_length)
                    self.cache.update(zip(chunk, values.tolist(), strict=True))
        device = next(self.policy.parameters()).device
        return torch.tensor([self.cache[k] for k in keys], dtype=torch.float32, device=device)


def _unique(sequences: list[tuple[list[Message], str]]) -> tuple[list[tuple[list[Message], str]], torch.Tensor]:
    """Distinct sequences and the index of each input in them: a ranking of K gives K(K-1)/2 pairs of K texts."""
    position: dict[Key, int] = {}
    unique: list[tuple[list[Message], str]] = []
    index = []
    for p, r in sequences:
        k = (prompt_key(p), r)
        if k not in position:
            position[k] = len(unique)
            unique.append((p, r))
        index.append(position[k])
    return unique, torch.tensor(index, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------- DPO


def dpo_items(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons DPO learns from: all but ties between identical texts (zero gradient) and unknown labels."""
    for c in comparisons:
        if c.label not in PREFERENCE_KINDS:
            raise ValueError(f"unknown comparison label {c.label!r}; expected one of {tuple(PREFERENCE_KINDS)}")
    return [c for c in comparisons if not (c.label == "tie" and c.chosen == c.rejected)]


def dpo_batch(
    scorer: _Scorer, batch: Sequence[Comparison], cfg: DPOConfig, policy_grad: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss, per-pair detached tensors) of one batch; chosen and rejected share one forward."""
    sequences = [(c.prompt, c.chosen) for c in batch] + [(c.prompt, c.rejected) for c in batch]
    unique, index = _unique(sequences)
    with torch.set_grad_enabled(policy_grad):
        policy = scorer.policy_logps(unique)
    ref = scorer.reference_logps(unique, cfg.eval_batch_size)
    index = index.to(policy.device)
    policy_chosen, policy_rejected = torch.chunk(policy[index], 2)  # (P,), (P,)
    ref_chosen, ref_rejected = torch.chunk(ref[index], 2)
    kind = torch.tensor([PREFERENCE_KINDS[c.label] for c in batch], device=policy.device)
    margin = cfg.margin_scale * torch.tensor([c.margin for c in batch], device=policy.device)
    loss_fn = DPOLoss(cfg.beta, cfg.label_smoothing, cfg.tie_weight, cfg.both_bad_weight, reduction="none")
    weight = torch.tensor([c.weight for c in batch], device=policy.device)  # annotator reliability (P,)
    per_pair, _ = loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, kind, margin)
    detail = {
        "loss": per_pair.detach(),
        "kind": kind,
        "chosen_ratio": (policy_chosen - ref_chosen).detach(),
        "rejected_ratio": (policy_rejected - ref_rejected).detach(),
    }
    return weighted_mean(per_pair, weight), detail


def dpo_summary(details: Sequence[dict[str, torch.Tensor]], beta: float) -> dict[str, float | int | None]:
    """Loss over all pairs, and over the "pref" pairs: reward accuracy (implicit reward margin > 0), the mean
    implicit rewards of chosen and rejected, their margin, and the mean log-ratios (a per-sequence KL estimate)."""
    if not details:
        return {"loss": None, "accuracy": None, "n_pairs": 0, "n_pref": 0}
    loss = torch.cat([d["loss"] for d in details])
    kind = torch.cat([d["kind"] for d in details])
    pref = kind == PREFERENCE_KINDS["pref"]
    chosen = torch.cat([d["chosen_ratio"] for d in details])[pref]
    rejected = torch.cat([d["rejected_ratio"] for d in details])[pref]
    out: dict[str, float | int | None] = {"loss": float(loss.mean()), "n_pairs": len(loss), "n_pref": int(pref.sum())}
    if len(chosen):
        out |= {
            "accuracy": float((chosen > rejected).float().mean()),
            "chosen_reward": beta * float(chosen.mean()),
            "rejected_reward": beta * float(rejected.mean()),
            "reward_margin": beta * float((chosen - rejected).mean()),
            "logratio_chosen": float(chosen.mean()),
            "logratio_rejected": float(rejected.mean()),
        }
    else:
        out["accuracy"] = None
    return out


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def evaluate_dpo(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    comparisons: Sequence[Comparison],
    cfg: DPOConfig,
    reference: PreTrainedModel | None = None,
    scorer: _Scorer | None = None,
) -> dict[str, float | int | None]:
    """`dpo_summary` of `comparisons` under `policy` without training (held-out pairs, or a baseline)."""
    scorer = scorer or _Scorer(policy, reference, tokenizer, cfg.max_length)
    details = [
        dpo_batch(scorer, b, cfg, policy_grad=False)[1] for b in _batches(dpo_items(comparisons), cfg.eval_batch_size)
    ]
    return dpo_summary(details, cfg.beta)


def train_dpo(
    cfg: DPOConfig,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    comparisons: Sequence[Comparison],
    *,
    reference: PreTrainedModel | None = None,
    train_only: Sequence[Comparison] = (),
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """DPO on `comparisons` and `train_only` in place; returns (policy in eval mode, metrics).

    `train_only` pairs are trained on and never held out: labels of a judge (training/onpolicy.py), whose agreement
    with itself is not what the held-out pairs measure. metrics: "train" (`dpo_summary` over the last, possibly
    partial, epoch, as the policy moved), "heldout" and "heldout_before" (the held-out prompts' pairs after and
    before training), steps, epochs, seconds, counts.
    """
    items, extra = dpo_items(comparisons), dpo_items(train_only)
    if not items and not extra:
        raise ValueError("no comparisons to learn from (ties between identical responses carry no signal)")
    scorer = _Scorer(policy, reference, tokenizer, cfg.max_length)
    train, heldout = split_by_prompt(items, cfg.heldout_fraction, cfg.seed) if items else ([], [])
    train = list(train) + extra
    before = evaluate_dpo(policy, tokenizer, heldout, cfg, scorer=scorer) if heldout else None
    loop = _optimise(cfg, policy, train, lambda batch: dpo_batch(scorer, batch, cfg), progress)
    metrics: dict[str, Any] = {
        "train": dpo_summary(loop.pop("details"), cfg.beta),
        **loop,
        "heldout": evaluate_dpo(policy, tokenizer, heldout, cfg, scorer=scorer) if heldout else None,
        "heldout_before": before,
        "n_train": len(train),
        "n_heldout": len(heldout),
        "skipped": len(comparisons) + len(train_only) - len(items) - len(extra),
    }
    log.info("dpo: %s", metrics)
    return policy, metrics


# ---------------------------------------------------------------------------------------------------- KTO


def kto_items(comparisons: Sequence[Comparison] = (), rated: Sequence[Rated] = ()) -> list[Rated]:
    """Thumbs for KTO: every rated response, chosen (up) and rejected (down) of each "pref" pair, both responses of a
    "both_bad" pair (down); ties are skipped. A (prompt, response, thumb) that repeats (a ranking lists a response
    in several pairs) counts once; a response both up and down (the middle of a ranking) keeps one of each."""
    out: dict[tuple[str, str, bool], Rated] = {}

    def add(prompt: list[Message], response: str, good: bool, c: Comparison | Rated) -> None:
        out.setdefault(
            (prompt_key(prompt), response, good),
            Rated(prompt, response, good, c.group, c.source, c.annotator, dict(c.meta), c.weight),
        )

    for x in rated:
        add(x.prompt, x.response, x.good, x)
    for c in comparisons:
        if c.label == "pref":
            add(c.prompt, c.chosen, True, c)
            add(c.prompt, c.rejected, False, c)
        elif c.label == "both_bad":
            add(c.prompt, c.chosen, False, c)
            add(c.prompt, c.rejected, False, c)
        elif c.label != "tie":
            raise ValueError(f"unknown comparison label {c.label!r}; expected one of {tuple(PREFERENCE_KINDS)}")
    return list(out.values())


def kto_lambda_u(cfg: KTOConfig, items: Sequence[Rated]) -> float:
    """cfg.lambda_u, or lambda_D n_D / n_U so both kinds weigh the same in all (1 when either kind is missing)."""
    if cfg.lambda_u is not None:
        return cfg.lambda_u
    n_d = sum(x.good for x in items)
    n_u = len(items) - n_d
    return cfg.lambda_d * n_d / n_u if n_d and n_u else 1.0


def kto_batch(
    scorer: _Scorer, batch: Sequence[Rated], cfg: KTOConfig, lambda_u: float, policy_grad: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, detached details) of one batch. z0's mismatched pairs are each prompt with the next item's response
    (TRL's shift by one); they need no gradient, since z0 is detached."""
    unique, index = _unique([(x.prompt, x.response) for x in batch])
    with torch.set_grad_enabled(policy_grad):
        policy = scorer.policy_logps(unique)
    ref = scorer.reference_logps(unique, cfg.eval_batch_size)
    index = index.to(policy.device)
    kl_ratios = None
    if len(batch) > 1:
        mismatched = [(batch[i].prompt, batch[(i + 1) % len(batch)].response) for i in range(len(batch))]
        with torch.no_grad():
            kl_ratios = scorer.policy_logps(mismatched) - scorer.reference_logps(mismatched, cfg.eval_batch_size)
    desirable = torch.tensor([x.good for x in batch], device=policy.device)
    weight = torch.tensor([x.weight for x in batch], device=policy.device)  # annotator reliability (N,)
    loss, m = KTOLoss(cfg.beta, cfg.lambda_d, lambda_u)(policy[index], ref[index], desirable, kl_ratios, weight)
    detail = {
        "loss": loss.detach().expand(len(batch)),
        "desirable": desirable,
        "ratio": (policy[index] - ref[index]).detach(),
        "z0": m["z0"].expand(len(batch)),
    }
    return loss, detail


def kto_summary(details: Sequence[dict[str, torch.Tensor]], beta: float) -> dict[str, float | int | None]:
    """Loss, the mean implicit rewards of desirable and undesirable responses and their gap, the reference point z0
    and the mean log-ratios (KL-ish)."""
    if not details:
        return {"loss": None, "n": 0}
    cat = {k: torch.cat([d[k] for d in details]) for k in details[0]}
    up, down = cat["ratio"][cat["desirable"]], cat["ratio"][~cat["desirable"]]
    out: dict[str, float | int | None] = {
        "loss": float(cat["loss"].mean()),
        "z0": float(cat["z0"].mean()),
        "n": len(cat["loss"]),
        "n_desirable": len(up),
        "n_undesirable": len(down),
    }
    out["desirable_reward"] = beta * float(up.mean()) if len(up) else None
    out["undesirable_reward"] = beta * float(down.mean()) if len(down) else None
    out["logratio_desirable"] = float(up.mean()) if len(up) else None
    out["logratio_undesirable"] = float(down.mean()) if len(down) else None
    if len(up) and len(down):
        out["reward_gap"] = out["desirable_reward"] - out["undesirable_reward"]
    return out


@torch.no_grad()
def evaluate_kto(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Rated],
    cfg: KTOConfig,
    reference: PreTrainedModel | None = None,
    scorer: _Scorer | None = None,
) -> dict[str, float | int | None]:
    """`kto_summary` of thumbs under `policy` without training."""
    scorer = scorer or _Scorer(policy, reference, tokenizer, cfg.max_length)
    lambda_u = kto_lambda_u(cfg, items)
    details = [kto_batch(scorer, b, cfg, lambda_u, policy_grad=False)[1] for b in _batches(items, cfg.batch_size)]
    return kto_summary(details, cfg.beta)


def train_kto(
    cfg: KTOConfig,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    comparisons: Sequence[Comparison] = (),
    rated: Sequence[Rated] = (),
    *,
    reference: PreTrainedModel | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """KTO on thumbs (and unpaired comparisons) in place; returns (policy in eval mode, metrics) shaped as
    `train_dpo`'s, with `kto_summary`s and the lambda_u used."""
    items = kto_items(comparisons, rated)
    if not items:
        raise ValueError("no thumbs to learn from: pass rated responses or comparisons other than ties")
    scorer = _Scorer(policy, reference, tokenizer, cfg.max_length)
    train, heldout = split_by_prompt(items, cfg.heldout_fraction, cfg.seed)
    lambda_u = kto_lambda_u(cfg, train)
    before = evaluate_kto(policy, tokenizer, heldout, cfg, scorer=scorer) if heldout else None
    loop = _optimise(cfg, policy, train, lambda batch: kto_batch(scorer, batch, cfg, lambda_u), progress)
    metrics: dict[str, Any] = {
        "train": kto_summary(loop.pop("details"), cfg.beta),
        **loop,
        "lambda_u": lambda_u,
        "heldout": evaluate_kto(policy, tokenizer, heldout, cfg, scorer=scorer) if heldout else None,
        "heldout_before": before,
        "n_train": len(train),
        "n_heldout": len(heldout),
    }
    log.info("kto: %s", metrics)
    return policy, metrics


# ---------------------------------------------------------------------------------------------------- the loop


def _optimise(
    cfg: PreferenceConfig,
    policy: PreTrainedModel,
    train: Sequence[Any],
    step: Callable[[Sequence[Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    progress: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, Any]:
    """AdamW over batches of `train` (groups kept together) until the epochs, steps or seconds run out.

    Returns steps, epochs, seconds and the per-item details of the last (possibly partial) epoch.
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    policy.eval()  # dropout off: see the module docstring; gradients flow all the same
    t0 = time.perf_counter()
    steps = epoch = 0
    details: list[dict[str, torch.Tensor]] = []

    def out_of_budget() -> bool:
        return (cfg.max_steps is not None and steps >= cfg.max_steps) or (
            cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds
        )

    while (cfg.epochs is None or epoch < cfg.epochs) and not out_of_budget() and train:
        details = []
        for batch in make_batches(train, cfg.batch_size, rng):
            loss, detail = step(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            steps += 1
            details.append(detail)
            if progress is not None:
                progress(steps, {"loss": float(loss.detach()), "seconds": time.perf_counter() - t0})
            if out_of_budget():
                break
        epoch += 1
    return {"steps": steps, "epochs": epoch, "seconds": time.perf_counter() - t0, "details": details}
