"""Reward model: a causal LM with a scalar head, trained on user feedback to predict which response people prefer.

The model is `AutoModelForSequenceClassification(num_labels=K)` (K = `RewardConfig.heads`, 1 by default) initialised
from a causal-LM folder (the SFT policy by default, any Hugging Face model) or from an in-memory causal LM, as in
Ouyang et al. 2022 (InstructGPT) and Stiennon et al. 2020. Its input is the conversation rendered with the
tokenizer's chat template, the response as the final assistant turn; the score is read at the last non-pad token
(the Hugging Face head finds the rightmost token that is not `config.pad_token_id`; alignd pads on the right here,
so that token is the end of the text and absolute positions match an unpadded forward).

Losses, per kind of feedback (see `training/data.py`):
- `Comparison(label="pref")`: Bradley–Terry, -log sigmoid(r_chosen - r_rejected - margin). Chosen and rejected go
  through the model in one batch (concatenated, then `torch.chunk`).
- `Comparison(label="tie")`: Bradley–Terry cross-entropy toward probability 0.5,
  -0.5 log sigmoid(d) - 0.5 log sigmoid(-d); it pulls the two rewards together.
- `Comparison(label="both_bad")`: a pointwise term -log sigmoid(-r) on each response, pushing both below 0 (the
  raw reward's decision boundary), averaged over the two.
- `Rated` (a thumb on one response): pointwise -log sigmoid(+r) for up and -log sigmoid(-r) for down, weighted by
  `RewardConfig.pointwise_weight` (0 disables it) because a lone thumb says less than a comparison.
A batch's loss is the weighted mean over its items (pairs weigh 1, rated responses `pointwise_weight`), each also
multiplied by its `weight` (its annotator's reliability weight, training/reliability.py; 1 unless set). Held-out
accuracy stays unweighted: it is comparable across cycles and with the gate's history.
With K > 1 heads each head trains on its own bootstrap resample (`bootstrap_weights`): the reward is their mean, their
spread the model's uncertainty, reported after training and optionally subtracted from the reward PPO optimises.

Pairs of one rank or one completion (same `group`) stay together in one batch, and a text shared by several pairs
is scored once (a ranking of K responses costs K forwards, not K(K-1)). Ties between identical responses carry no
gradient and are skipped in training. The held-out split is by prompt (a prompt's pairs are all in train or all
held out), chosen by a seeded hash of `prompt_key`, so a prompt keeps its side as the feedback log grows. After
training, reference responses (samples of the SFT policy, or the compared responses; distinct ones, at most
`norm_samples` of them) are scored and an affine normalisation makes them mean 0, std 1 (Ziegler et al. 2019); it
is stored in the model config (`alignd_reward_mean`, `alignd_reward_std`), survives `save_pretrained`, and `score`
applies it.

    python -m pytest tests/training/test_reward.py -q
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from training.data import Comparison, Message, Rated, prompt_key
from training.lora import LoRAConfig, adapter_base, add_adapter, base_folder, check_base, is_adapted, save_adapter
from training.losses import PairWiseLoss, pointwise_loss, tie_loss
from training.model import CONSTRUCTION

log = logging.getLogger(__name__)

LABELS = ("pref", "tie", "both_bad")
# Two measured learning rates, one per kind of label (a single default would be wrong for one of them):
RANKED_PAIRS_LR = 3e-4  # offline ranked pairs (bench/train.py, ~4k pairs, 60 s on 2 cores): 1e-4 under-fits the
#                         2 M trunk in that budget, 1e-3 was worse even on clean labels
LIVE_FEEDBACK_LR = 1e-4  # the online cycle's live feedback (mixed annotator styles, 25 % label noise): 3e-4 overfits
#                          it (offline on one demo's feedback: oracle accuracy 0.74 at 3e-4, 0.79 at 1e-4;
#                          bench/demo.py 0.58 → 0.60); workers/cycle_config.py uses it
MEAN_KEY, STD_KEY = "alignd_reward_mean", "alignd_reward_std"


@dataclass
class RewardConfig:
    lr: float = RANKED_PAIRS_LR  # see the two constants above: which one applies depends on the labels
    weight_decay: float = 0.0  # one or two epochs over noisy labels: early stopping is the regulariser
    batch_size: int = 16  # pairs per step; a 60 s CPU budget needs many small steps (32 learned less)
    epochs: int | None = 2  # InstructGPT stops after one; 2 passes over ~4k pairs fit 60 s on 2 cores
    max_seconds: float | None = None  # wall-clock budget for the loop; ~60 s fits 2 epochs of 4k pairs on 2 cores
    max_length: int = 512  # tokens per input; longer conversations keep their end (where the score is read)
    max_grad_norm: float = 1.0  # standard clipping; protects the trunk from a few huge-margin pairs
    heldout_fraction: float = 0.1  # share of *prompts* held out to measure generalisation to new prompts
    pointwise_weight: float = 0.25  # weight of a single thumb relative to a comparison; 0 ignores `Rated`
    eval_batch_size: int = 32  # inputs per forward when scoring (no gradients, so larger than batch_size)
    norm_samples: int = 2048  # distinct reference responses scored for the normalisation: its mean and std are
    #                           settled by then, and scoring every compared text cost ~40 s per cycle at 8k pairs
    seed: int = 0  # seeds the head initialisation, the shuffling and the held-out split
    heads: int = 1  # score heads on one trunk, each trained on its own bootstrap resample of the items: their spread
    #                 is the model's uncertainty (an ensemble at the cost of one trunk; Coste et al. 2023 use
    #                 separate models); 1 = the plain reward model
    uncertainty_penalty: float = 0.0  # reward = mean - this x the heads' std (normalised units), an uncertainty-
    #                                   weighted optimisation (Coste et al. 2023, "Reward model ensembles help
    #                                   mitigate overoptimization"); 0 reports the spread without using it
    warm_start: bool = False  # the cycle starts from the previous accepted reward model (same base, same heads)
    #                           instead of a fresh head on the SFT trunk (workers/reward_stage.py)
    grader_weight: float = 0.0  # graders as reward, in the cycle's policy update (not reward-model training): PPO
    #                             adds weight x a grader suite item's score (eval.suites) to the learned, normalised
    #                             reward of rollouts on that item's prompt; DPO/KTO train on the policy's own answers
    #                             to suite prompts ranked by the graders, each item weighing this much
    #                             (training/grader_pairs.py); 0 = off, so measured figures come from people alone
    adapter: str = "auto"  # read by workers/reward_stage.py: "lora" trains a LoRA adapter and the score head on
    #                        the frozen SFT trunk (train_reward_model(lora=...)), "full" every weight, "auto" the
    #                        same choice as the policy update's (update.adapter): a real-size base gets both as LoRA
    max_comparisons: int | None = 20_000  # read by workers/: a cycle retrains on (and DPO/KTO replay) the most
    #                                      recent N comparisons and rated answers (store/recent.py), since a budget
    #                                      of ~50 s covers 2 epochs of ~4k pairs: older items would cost reads and
    #                                      memory growing with every vote ever made and add no accuracy; None: all
    annotator_weights: bool = False  # the cycle weighs each comparison by its annotator's reliability (training/
    #                                  reliability.py), in the reward model and in DPO/KTO alike. Off: on the demo's
    #                                  honest pool (bench/reliability.py) one-coin Dawid-Skene rated the "detail"
    #                                  annotator 0.23 (it likes length, the other three do not), so weights would
    #                                  silence a minority taste; the reward-model accuracy runs were inconclusive

    def __post_init__(self) -> None:
        if self.adapter not in ("auto", "full", "lora"):
            raise ValueError(f"RewardConfig.adapter={self.adapter!r}: expected one of ('auto', 'full', 'lora')")
        checks = {
            "grader_weight": self.grader_weight >= 0,
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "max_length": self.max_length >= 8,
            "epochs": self.epochs is None or self.epochs >= 1,
            "max_seconds": self.max_seconds is None or self.max_seconds > 0,
            "heldout_fraction": 0 <= self.heldout_fraction < 1,
            "pointwise_weight": self.pointwise_weight >= 0,
            "eval_batch_size": self.eval_batch_size >= 1,
            "norm_samples": self.norm_samples >= 1,
            "heads": 1 <= self.heads <= 64,
            "uncertainty_penalty": self.uncertainty_penalty >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                "RewardConfig: " + "; ".join(f"{name}={getattr(self, name)!r} is out of range" for name in bad)
            )


# ---------------------------------------------------------------------------------------------------- the model


def _context_length(config) -> int | None:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _set_pad(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:  # many base tokenizers have none; the seq-cls head needs one to find the end
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def build_reward_model(
    base: str | Path | PreTrainedModel, tokenizer: PreTrainedTokenizerBase, heads: int = 1
) -> PreTrainedModel:
    """A sequence classifier with `heads` outputs initialised from `base` (a model folder or an in-memory causal LM).

    An existing reward model with as many heads (folder or object) keeps them; otherwise the heads are fresh.
    """
    if isinstance(base, (str, Path)):
        with CONSTRUCTION:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(base), num_labels=heads, dtype=torch.float32, ignore_mismatched_sizes=True
            )
    elif getattr(base.config, "num_labels", None) == heads and hasattr(base, "score"):
        model = copy.deepcopy(base)
    else:
        config = copy.deepcopy(base.config)
        config.num_labels = heads
        with CONSTRUCTION:
            model = AutoModelForSequenceClassification.from_config(config)
        result = model.load_state_dict(base.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("score.")]
        if missing:
            raise ValueError(f"{type(base).__name__} does not fit {type(model).__name__}: missing {missing[:5]}")
        model.to(next(base.parameters()).device)
    _set_pad(model, tokenizer)
    setattr(model.config, MEAN_KEY, 0.0)
    setattr(model.config, STD_KEY, 1.0)
    return model


def format_conversation(tokenizer: PreTrainedTokenizerBase, prompt: list[Message], response: str) -> str:
    return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int | None,
    pad_token_id: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask), each (B, T); too-long texts keep their last `max_length` tokens."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # the chat template already has BOS
    if max_length is not None:
        ids = [x[-max_length:] for x in ids]
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        attention_mask[i, : len(x)] = 1
    return input_ids.to(device), attention_mask.to(device)


def head_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int | None = None
) -> torch.Tensor:
    """Raw (unnormalised) rewards of rendered conversations, one per head, (B, K), with gradients if enabled."""
    limits = [x for x in (max_length, _context_length(model.config)) if x]
    device = next(model.parameters()).device
    input_ids, attention_mask = encode(
        tokenizer, texts, min(limits) if limits else None, model.config.pad_token_id, device
    )
    return model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, K)


def forward_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int | None = None
) -> torch.Tensor:
    """Raw rewards of rendered conversations, the mean over the heads, (B,), with gradients if enabled."""
    return head_scores(model, tokenizer, texts, max_length).mean(dim=-1)  # (B,)


@torch.no_grad()
def raw_head_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[Message]],
    responses: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
) -> torch.Tensor:
    """Unnormalised rewards per head, (B, K) float32 on CPU, in eval mode (dropout off)."""
    was_training = model.training
    model.eval()
    texts = [format_conversation(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    out = [
        head_scores(model, tokenizer, texts[i : i + batch_size], max_length).float().cpu()
        for i in range(0, len(texts), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.config.num_labels)


def raw_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[Message]],
    responses: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
) -> torch.Tensor:
    """Unnormalised rewards (the mean over the heads), (B,) float32 on CPU, in eval mode (dropout off)."""
    return raw_head_scores(model, tokenizer, prompts, responses, batch_size, max_length).mean(dim=-1)


def _normalised(model: PreTrainedModel, raw: torch.Tensor) -> torch.Tensor:
    mean = float(getattr(model.config, MEAN_KEY, 0.0))
    std = float(getattr(model.config, STD_KEY, 1.0))
    return (raw - mean) / std


def score_with_spread(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[Message]],
    responses: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised mean reward, std of the normalised heads), each (B,) on CPU; the std is 0 with one head."""
    heads = _normalised(model, raw_head_scores(model, tokenizer, prompts, responses, batch_size, max_length))
    spread = heads.std(dim=-1) if heads.shape[-1] > 1 else torch.zeros(heads.shape[0])
    return heads.mean(dim=-1), spread


def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[Message]],
    responses: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
    uncertainty_penalty: float = 0.0,
) -> torch.Tensor:
    """Normalised rewards (mean 0, std 1 on the reference responses), (B,) float32 on CPU, less
    `uncertainty_penalty` times the heads' disagreement where there are several."""
    mean, spread = score_with_spread(model, tokenizer, prompts, responses, batch_size, max_length)
    return mean - uncertainty_penalty * spread if uncertainty_penalty else mean


def save_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    base: str | None = None,
    base_digest: str | None = None,
) -> Path:
    """A standard Hugging Face folder (safetensors + config with the normalisation + tokenizer); a LoRA reward model
    (`train_reward_model(lora=...)`) as its adapter and score head (a few MB), its config (the normalisation) and
    `base.json` naming the base folder `base` with digest `base_digest` (training/lora.py)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_adapted(model):
        if base is None or base_digest is None:
            raise ValueError("a LoRA reward model is saved with the base it was trained on: pass base and base_digest")
        save_adapter(model, out_dir, base=base, base_digest=base_digest)
        model.get_base_model().config.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_reward_model(
    path: str | Path, device: str = "cpu", *, resolve_base=None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A reward model folder, full or LoRA: an adapter is merged into its base's trunk (found with `resolve_base`,
    the registry's path rule, as for policies: training.lora.base_folder) after its base digest is checked."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if adapter_base(path) is None:
        with CONSTRUCTION:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    else:
        base_dir = base_folder(path, resolve_base)
        check_base(path, base_dir)
        config = AutoConfig.from_pretrained(str(path))  # heads, pad id and normalisation of the trained model
        with CONSTRUCTION:
            trunk = AutoModelForSequenceClassification.from_pretrained(
                str(base_dir), config=config, dtype=torch.float32
            )
            model = PeftModel.from_pretrained(trunk, str(path)).merge_and_unload()  # the score head comes with it
    if not 1 <= model.config.num_labels <= 64:
        raise ValueError(f"{path}: a reward model has 1 to 64 score heads, this one has {model.config.num_labels}")
    _set_pad(model, tokenizer)
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------------- the data

Item = Comparison | Rated


def split_by_prompt(items: Sequence[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(train, heldout): every item of a prompt lands on the same side, decided by a seeded hash of the prompt."""
    keys = sorted({prompt_key(x.prompt) for x in items})
    if fraction <= 0 or len(keys) < 2:
        return list(items), []

    def u(key: str) -> float:  # a uniform number per (seed, prompt), stable as new prompts arrive
        digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    held = {k for k in keys if u(k) < fraction}
    if not held:  # tiny datasets: still hold out one prompt so held-out numbers exist
        held = {min(keys, key=u)}
    if len(held) == len(keys):
        held.discard(max(keys, key=u))
    train = [x for x in items if prompt_key(x.prompt) not in held]
    heldout = [x for x in items if prompt_key(x.prompt) in held]
    return train, heldout


def make_batches(items: Sequence[Item], batch_size: int, rng: random.Random) -> list[list[Item]]:
    """Shuffle, then pack items into batches of up to `batch_size`, never splitting a group."""
    units: dict[Any, list[Item]] = {}
    for i, x in enumerate(items):
        units.setdefault(("group", x.group) if x.group is not None else ("item", i), []).append(x)
    order = list(units.values())
    rng.shuffle(order)
    batches: list[list[Item]] = []
    current: list[Item] = []
    for unit in order:
        if current and len(current) + len(unit) > batch_size:
            batches.append(current)
            current = []
        current = current + unit
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------------------------------- the loss


def bootstrap_weights(keys: Sequence[str], heads: int, seed: int) -> torch.Tensor:
    """(N, heads) item weights: all 1 with one head; with several, each head sees its own resample of the data by
    the double-or-nothing bootstrap (weight 0 or 2, probability 1/2; Owen & Eckles 2012), decided by a seeded hash
    of the item so an item keeps its weights across epochs and cycles — the heads' spread is then the ensemble's."""
    if heads == 1:
        return torch.ones(len(keys), 1)
    rows = []
    for key in keys:
        digest = hashlib.sha256(f"{seed}\x00boot\x00{key}".encode()).digest()
        rows.append([2.0 * ((digest[h // 8] >> (h % 8)) & 1) for h in range(heads)])
    return torch.tensor(rows).reshape(len(keys), heads)


def batch_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch: Sequence[Item], cfg: RewardConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted mean loss over a batch of comparisons and rated responses, with counts for accuracy."""
    pairs = [x for x in batch if isinstance(x, Comparison)]
    rated = [x for x in batch if isinstance(x, Rated)] if cfg.pointwise_weight > 0 else []
    for c in pairs:
        if c.label not in LABELS:
            raise ValueError(f"unknown comparison label {c.label!r}; expected one of {LABELS}")
    texts = (
        [format_conversation(tokenizer, c.prompt, c.chosen) for c in pairs]
        + [format_conversation(tokenizer, c.prompt, c.rejected) for c in pairs]
        + [format_conversation(tokenizer, r.prompt, r.response) for r in rated]
    )
    if not texts:
        return torch.zeros((), requires_grad=False), {"loss_sum": 0.0, "weight": 0.0, "n_pref": 0, "n_correct": 0}
    # The pairs of one ranking share responses (K responses make K(K-1)/2 pairs): score each distinct text once.
    position = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    unique, index = list(position), torch.tensor([position[t] for t in texts])  # index: (2P + R,) into `unique`
    scores = head_scores(model, tokenizer, unique, cfg.max_length)[index.to(next(model.parameters()).device)]
    K = scores.shape[-1]  # scores: (2P + R, K)
    P = len(pairs)
    keys = [f"{prompt_key(c.prompt)}\x00{c.chosen}\x00{c.rejected}" for c in pairs]
    keys += [f"{prompt_key(r.prompt)}\x00{r.response}" for r in rated]
    boot = bootstrap_weights(keys, K, cfg.seed).to(scores.device, scores.dtype)  # (P + R, K)
    # per-item multipliers: the annotator's reliability weight (training/reliability.py; 1 when not estimated)
    pair_weight = torch.tensor([c.weight for c in pairs], dtype=scores.dtype, device=scores.device)  # (P,)
    rated_weight = torch.tensor([x.weight for x in rated], dtype=scores.dtype, device=scores.device)  # (R,)
    total = scores.new_zeros(())
    n_pref = n_correct = 0
    if P:
        chosen, rejected = torch.chunk(scores[: 2 * P], 2)  # (P, K), (P, K)
        label = [c.label for c in pairs]
        is_pref = torch.tensor([x == "pref" for x in label], device=scores.device)[:, None]  # (P, 1)
        is_tie = torch.tensor([x == "tie" for x in label], device=scores.device)[:, None]
        margin = torch.tensor([c.margin for c in pairs], dtype=scores.dtype, device=scores.device)[:, None]
        pref, _ = PairWiseLoss(reduction="none")(chosen, rejected, margin)
        tie = tie_loss(chosen, rejected)
        bad = torch.zeros_like(chosen, dtype=torch.bool)
        both_bad = 0.5 * (pointwise_loss(chosen, bad) + pointwise_loss(rejected, bad))
        per_pair = torch.where(is_pref, pref, torch.where(is_tie, tie, both_bad))  # (P, K)
        total = total + (per_pair * boot[:P] * pair_weight[:, None]).sum() / K
        n_pref = int(is_pref.sum())
        n_correct = int(((chosen.mean(-1) > rejected.mean(-1)) & is_pref[:, 0]).sum())
    if rated:
        good = torch.tensor([r.good for r in rated], device=scores.device)[:, None].expand(-1, K)
        per_rated = pointwise_loss(scores[2 * P :], good) * boot[P:] * rated_weight[:, None]  # (R, K)
        total = total + cfg.pointwise_weight * per_rated.sum() / K
    weight = float(pair_weight.sum()) + cfg.pointwise_weight * float(rated_weight.sum())
    loss = total / weight if weight > 0 else total * 0.0  # a batch of zero-weight items moves nothing
    return loss, {"loss_sum": float(total.detach()), "weight": weight, "n_pref": n_pref, "n_correct": n_correct}


@torch.no_grad()
def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[Item], cfg: RewardConfig
) -> dict[str, float | None]:
    """Held-out loss (weighted mean over items) and accuracy on preference pairs; None where there is no data."""
    was_training = model.training
    model.eval()
    loss_sum = weight = 0.0
    n_pref = n_correct = 0
    for i in range(0, len(items), cfg.eval_batch_size):
        _, s = batch_loss(model, tokenizer, items[i : i + cfg.eval_batch_size], cfg)
        loss_sum += s["loss_sum"]
        weight += s["weight"]
        n_pref += s["n_pref"]
        n_correct += s["n_correct"]
    model.train(was_training)
    return {"loss": loss_sum / weight if weight else None, "accuracy": n_correct / n_pref if n_pref else None}


# ---------------------------------------------------------------------------------------------------- training


def _distinct_sample(pairs: Sequence[tuple[list[Message], str]], k: int, seed: int) -> list[tuple[list[Message], str]]:
    """At most `k` distinct (prompt, response) pairs, a seeded sample: a ranking of 4 yields 6 pairs but only 4
    texts, so the compared responses repeat each text ~3 times; scoring repeats changes nothing but the cost."""
    seen: dict[tuple[str, str], tuple[list[Message], str]] = {}
    for prompt, response in pairs:
        seen.setdefault((prompt_key(prompt), response), (prompt, response))
    distinct = list(seen.values())
    return distinct if len(distinct) <= k else random.Random(seed).sample(distinct, k)


def _normalise(model, tokenizer, reference_responses, cfg: RewardConfig) -> tuple[float, float, float | None]:
    """Store the mean and std of the raw reward over (a capped sample of) the distinct reference responses in the
    model's config, so `score` returns normalised rewards (mean 0, std 1 there); returns them and, with several
    heads, their mean disagreement there (std across heads, normalised units)."""
    sample = _distinct_sample(reference_responses, cfg.norm_samples, cfg.seed)
    heads = raw_head_scores(
        model, tokenizer, [p for p, _ in sample], [r for _, r in sample], cfg.eval_batch_size, cfg.max_length
    )
    ref = heads.mean(dim=-1)
    mean = float(ref.mean())
    std = float(ref.std()) if len(ref) > 1 else 1.0
    if not math.isfinite(std) or std < 1e-6:  # a constant reward carries no signal; avoid dividing by ~0
        std = 1.0
    setattr(model.config, MEAN_KEY, mean)
    setattr(model.config, STD_KEY, std)
    spread = float((heads / std).std(dim=-1).mean()) if heads.shape[-1] > 1 and len(ref) else None
    return mean, std, spread


def train_reward_model(
    cfg: RewardConfig,
    comparisons: Sequence[Comparison],
    rated: Sequence[Rated] = (),
    *,
    base: str | Path | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reference_responses: Sequence[tuple[list[Message], str]] | None = None,
    lora: LoRAConfig | None = None,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Train a reward model on the feedback; returns (model in eval mode, metrics). With `lora`, the trunk is frozen
    and a LoRA adapter trains with the whole score head (peft's sequence-classification task keeps `score` as a
    module to save): no gradients or optimiser states for the trunk, a checkpoint of a few MB."""
    if cfg.epochs is None and cfg.max_seconds is None:
        raise ValueError("RewardConfig needs a budget: set epochs, max_seconds or both")
    if not comparisons and not (rated and cfg.pointwise_weight > 0):
        raise ValueError("no training data: pass comparisons (or rated responses with pointwise_weight > 0)")
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # the score head's initialisation
    model = build_reward_model(base, tokenizer, cfg.heads)
    if lora is not None:
        model = add_adapter(model, lora, task_type="SEQ_CLS")
    train, heldout = split_by_prompt(list(comparisons) + list(rated), cfg.heldout_fraction, cfg.seed)
    # A tie between two identical responses has zero gradient (d = 0 is the tie loss's minimum): skipping it saves
    # compute (a fifth of the pairs of two samples of a small SFT policy) without changing what is learned.
    train = [x for x in train if not (isinstance(x, Comparison) and x.label == "tie" and x.chosen == x.rejected)]

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    rng = random.Random(cfg.seed)
    model.train()
    epoch, n_pairs_seen, losses = 0, 0, []
    t_train = time.perf_counter()
    out_of_time = False
    while (cfg.epochs is None or epoch < cfg.epochs) and not out_of_time:
        losses = []  # train_loss reports the last (possibly partial) epoch
        for batch in make_batches(train, cfg.batch_size, rng):
            loss, s = batch_loss(model, tokenizer, batch, cfg)
            if s["weight"] == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            n_pairs_seen += sum(isinstance(x, Comparison) for x in batch)
            if cfg.max_seconds is not None and time.perf_counter() - t_train > cfg.max_seconds:
                out_of_time = True
                break
        epoch += 1
    train_seconds = time.perf_counter() - t_train
    model.eval()

    held = evaluate(model, tokenizer, heldout, cfg)
    if reference_responses is None:
        compared = [(c.prompt, c.chosen) for c in comparisons] + [(c.prompt, c.rejected) for c in comparisons]
        reference_responses = compared or [(r.prompt, r.response) for r in rated]
    mean, std, disagreement = _normalise(model, tokenizer, reference_responses, cfg)
    metrics = {
        "heldout_accuracy": held["accuracy"],
        "heldout_loss": held["loss"],
        "train_loss": sum(losses) / len(losses) if losses else None,
        "reward_mean": mean,  # raw reward on the reference responses = the normalisation's shift
        "reward_std": std,  # and its scale
        "heads": cfg.heads,
        "head_disagreement": disagreement,  # mean std across heads on the reference responses (normalised units)
        "n_train": len(train),
        "n_heldout": len(heldout),
        "epochs": epoch,
        "pairs_per_s": n_pairs_seen / train_seconds if train_seconds > 0 else 0.0,
        "seconds": time.perf_counter() - t_start,
    }
    log.info("reward model: %s", metrics)
    return model, metrics
