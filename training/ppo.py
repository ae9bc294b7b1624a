"""PPO for language models (RLHF): optimise the policy against a reward, with a KL penalty toward the SFT model.

Follows Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"), Ouyang et al. 2022 and the
implementation details of Huang et al. 2023 ("The N Implementation Details of RLHF with PPO") and OpenRLHF:

- Four actors: the trainable policy, a frozen reference (the SFT model), a reward (a reward model through
  `reward_model_fn`, or any `reward_fn(prompts, responses) -> (B,)`) and a critic (`ValueModel`: a copy of the
  policy's trunk with a scalar head, trained with its own AdamW).
- Rollouts: `generate` with pure sampling (temperature 1, no top-k/top-p) from left-padded prompts. Everything after
  the first EOS is masked out; EOS itself is the last action. Log-probs are recomputed with a forward pass over the
  whole sequence (same position ids as `generate`), divided by the sampling temperature.
- Reward per token: -kl_coef * KL_t (k1 = logp - ref_logp) on every action, plus the score at the last action. A
  response that never emits EOS gets `missing_eos_penalty` instead of (or added to) its score. Fixed KL coefficient
  or the adaptive controller of Ziegler et al. (target KL, horizon).
- Optionally k answers per prompt, each score taken relative to the mean of its k-1 siblings (leave-one-out
  baseline, `samples_per_prompt`; the online cycle uses 4).
- GAE (gamma 1, lambda 0.95), advantages whitened over the batch; `ppo_epochs` passes over shuffled minibatches of
  the clipped surrogate and the clipped value loss, gradient-norm clipping, dropout off (eval-mode forwards) so the
  recomputed log-probs equal the rollout's.
- Resumable in small increments: `save_state` writes the policy as a standard Hugging Face folder (servable as is),
  the critic, both optimiser states, the KL controller, the step counter and the RNG states; `load_state` restores
  them, and each step reseeds torch with `seed + step`, so 2 steps + save + load + 2 steps = 4 steps exactly.

    python -m pytest tests/training/test_ppo.py -q
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from training.data import Message
from training.graders import Item, Suite, score_item
from training.lora import LoRAConfig, is_adapted, reference_mode
from training.losses import PolicyLoss, ValueLoss, compute_gae, kl_penalty, masked_mean, masked_whiten
from training.model import CONSTRUCTION
from training.reward import score

RewardFn = Callable[[list[list[Message]], list[str]], torch.Tensor]
MISSING_EOS_MODES = ("replace", "add")


@dataclass
class PPOConfig:
    # rollouts
    batch_size: int = 32  # rollouts per PPO iteration (one prompt each); 16 gives the 2 M model too noisy a gradient
    mini_batch_size: int = 8  # rollouts per optimiser step: batch_size / mini_batch_size updates per epoch
    ppo_epochs: int = 4  # passes over each batch (Huang et al.); more reuses data but drifts off-policy
    max_new_tokens: int = 64  # response budget; responses cut here have no EOS and get missing_eos_penalty
    samples_per_prompt: int = 1  # k > 1: each prompt is sampled k times and its score is taken relative to the mean
    # of its k-1 siblings (the leave-one-out baseline of RLOO, Ahmadian et al. 2024; GRPO's groups, Shao et al.
    # 2024): how good a prompt's answers can be at all stops being noise in the advantage, which a critic that
    # restarts with each reward model cannot learn within a few steps
    temperature: float = 1.0  # sample from the policy itself, so logprobs are those of the sampling distribution
    top_k: int = 0  # 0 disables; truncated sampling would make the rollout policy differ from the trained one
    top_p: float = 1.0  # 1.0 disables, for the same reason
    # reward
    kl_coef: float = 0.1  # beta of the per-token penalty -beta * (logp - ref_logp); 0.05 let the 2 M policy drift
    # 2-4 nats in 30 steps, where the reward model is exploited (its reward rises, the oracle's utility falls)
    kl_target: float | None = None  # None: fixed beta; a number: Ziegler et al.'s adaptive controller aims at it
    kl_horizon: int = 10_000  # adaptive controller's horizon in rollouts (Ziegler et al. use 10k)
    kl_estimator: str = "k1"  # k1 is unbiased per token and what Ziegler et al./Huang et al. put in the reward
    missing_eos_penalty: float | None = -1.0  # Huang et al.: a response that never ends gets a score of -1
    missing_eos_mode: str = "replace"  # "replace" the score (Huang et al.) or "add" to it (TRL); see above
    reward_clip: float | None = None  # clip the score to [-c, c] (OpenRLHF); None: normalised RMs need none
    whiten_rewards: bool = False  # TRL option: rescale per-token rewards (mean kept) before GAE
    # advantages
    gamma: float = 1.0  # no discount inside a response: the score arrives at the end and matters fully
    lam: float = 0.95  # GAE lambda (Huang et al.)
    whiten_advantages: bool = True  # per-batch advantage normalisation (Huang et al. detail)
    # losses
    clip_eps: float = 0.2  # PPO ratio clip
    value_clip_eps: float | None = 0.2  # value clip around the rollout's values; None: plain squared error
    vf_coef: float = 0.1  # value-loss scale (Huang et al.); with a separate critic it acts on gradient clipping only
    entropy_coef: float = 0.0  # no entropy bonus: the KL penalty already keeps the policy from collapsing
    loss_reduction: str = "token_mean"  # "token_mean" | "seq_mean" over response tokens
    # optimisation
    lr: float = 3e-5  # policy AdamW; Huang et al. use 1.41e-5 for GPT-2 sizes; on the 2 M model 1e-4 and above
    # drift several nats in 30 steps and lower the checker scores, 3e-5 stays within ~1 nat
    critic_lr: float = 1e-4  # critic AdamW (own optimiser); its fresh head must fit the returns within a few steps
    adam_eps: float = 1e-5  # Huang et al.: TF-style Adam epsilon
    weight_decay: float = 0.0  # short online runs from a good SFT start: no decay toward 0
    max_grad_norm: float = 1.0  # per model, per minibatch
    forward_batch_size: int = 32  # rollouts per no-grad forward (memory bound on large models)
    seed: int = 0  # torch is reseeded with seed + step at every step; python's RNG samples prompts

    def __post_init__(self) -> None:
        positive = (
            "batch_size",
            "mini_batch_size",
            "ppo_epochs",
            "max_new_tokens",
            "lr",
            "critic_lr",
            "forward_batch_size",
            "temperature",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)!r}: must be positive")
        if self.kl_coef < 0:
            raise ValueError(f"PPOConfig.kl_coef={self.kl_coef!r}: must be >= 0 (it is a penalty)")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of mini_batch_size {self.mini_batch_size}"
            )
        if self.samples_per_prompt < 1 or self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of samples_per_prompt {self.samples_per_prompt}"
            )
        if self.missing_eos_mode not in MISSING_EOS_MODES:
            raise ValueError(
                f"unknown missing_eos_mode {self.missing_eos_mode!r}; expected one of {MISSING_EOS_MODES}"
            )
        kl_penalty(torch.zeros(1), torch.zeros(1), self.kl_estimator)  # raises ValueError on an unknown estimator


# ---------------------------------------------------------------------------------------------------- KL control


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------------- the critic


class ValueModel(nn.Module):
    """Critic: a transformer trunk (AutoModel) and a linear head giving one value per position, (B, T)."""

    def __init__(self, trunk: PreTrainedModel, head: nn.Linear | None = None):
        super().__init__()
        self.trunk = trunk
        if head is None:
            head = nn.Linear(trunk.config.hidden_size, 1)
            nn.init.zeros_(head.weight)  # values start at 0 so the first advantages are the plain returns
            nn.init.zeros_(head.bias)
        self.head = head

    @classmethod
    def from_model(cls, model: PreTrainedModel, lora: LoRAConfig | None = None) -> ValueModel:
        """Copy the trunk of a causal LM (the policy) or of a reward model; a reward model's head is kept too. With
        `lora` the trunk is frozen under an adapter of the critic's own, so its weights are *shared* with `model`
        rather than copied (only the module structure is): a LoRA cycle's critic costs no second trunk."""
        if is_adapted(model):  # its modules carry the adapter's layers: a copy would train or drop them silently
            raise ValueError(
                "ValueModel.from_model needs a plain model: build the critic of a LoRA policy from the "
                "reward model or the base with lora=..."
            )
        shared = {id(t): t for t in [*model.parameters(), *model.buffers()]} if lora is not None else {}
        trunk = copy.deepcopy(model.base_model, shared)  # tensors found in `shared` are reused, not copied
        head = None
        score = getattr(model, "score", None)
        if isinstance(score, nn.Linear):  # OpenRLHF: the critic starts as the RM (the mean of its heads)
            head = nn.Linear(score.in_features, 1).to(score.weight.device)
            with torch.no_grad():
                head.weight.copy_(score.weight.mean(dim=0, keepdim=True))
                head.bias.copy_(score.bias.mean().reshape(1) if score.bias is not None else torch.zeros(1))
        critic = cls(trunk, head)
        return critic.with_lora(lora) if lora is not None else critic

    def with_lora(self, cfg: LoRAConfig) -> ValueModel:
        """Freeze the trunk and train a LoRA adapter on it (the head stays fully trainable): a critic without
        optimiser states for a whole model, for real-size policies."""
        with CONSTRUCTION, torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.trunk = get_peft_model(
                self.trunk,
                LoraConfig(
                    r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules
                ),
            )
        return self

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        return self.head(hidden).squeeze(-1).float()  # (B, T)

    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.trunk.config.save_pretrained(out_dir)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
            str(out_dir / "value.safetensors"),
        )

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ValueModel:
        path = Path(path)
        with CONSTRUCTION:
            model = cls(AutoModel.from_config(AutoConfig.from_pretrained(path)))
        model.load_state_dict(load_file(str(path / "value.safetensors")))
        return model.to(device)


# ---------------------------------------------------------------------------------------------------- helpers


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T), padded on the left as decoder-only generation needs."""
    T = max(len(x) for x in sequences)
    input_ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, x in enumerate(sequences):
        if len(x):
            input_ids[i, T - len(x) :] = torch.tensor(list(x), dtype=torch.long)
            attention_mask[i, T - len(x) :] = 1
    return input_ids, attention_mask


def response_mask(response: torch.Tensor, eos_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, has_eos): mask (B, R) is 1 up to and including the first EOS; has_eos (B,) says whether one came."""
    is_eos = torch.isin(response, torch.tensor(list(eos_token_ids), device=response.device))
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # EOS tokens strictly before each position
    return (eos_before == 0).long(), is_eos.any(dim=1)


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids `generate` uses with left padding: count of real tokens before, 0 on the padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_response: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the last `n_response` tokens of `input_ids` under `model`, (B, R), and optionally the entropy
    of each next-token distribution, (B, R). Logits are divided by the sampling temperature."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        use_cache=False,
    ).logits
    logits = logits[:, -n_response - 1 : -1].float() / temperature  # (B, R, V): position t predicts token t + 1
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, -n_response:].unsqueeze(-1)).squeeze(-1)  # (B, R)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def reward_model_fn(
    rm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32, uncertainty_penalty: float = 0.0
) -> RewardFn:
    """Adapt a reward model (training/reward.py) to `reward_fn(prompts, responses) -> normalised scores (B,)`, less
    `uncertainty_penalty` times its heads' disagreement where it has several."""

    def reward_fn(prompts: list[list[Message]], responses: list[str]) -> torch.Tensor:
        return score(rm, tokenizer, prompts, responses, batch_size=batch_size, uncertainty_penalty=uncertainty_penalty)

    return reward_fn


def grader_reward_fn(reward_fn: RewardFn, suites: Sequence[Suite], weight: float) -> RewardFn:
    """`reward_fn` plus `weight` x the grader score (training/graders.py) for each rollout whose prompt is a suite
    item's — the programmatic rewards of TRL's `reward_funcs`, summed with the learned one; other rollouts keep the
    learned reward alone. A prompt in several items gets the mean of their scores."""
    by_prompt: dict[tuple, list[Item]] = {}
    for suite in suites:
        for item in suite.items:
            by_prompt.setdefault(_prompt_key(item.prompt), []).append(item)

    def combined(prompts: list[list[Message]], responses: list[str]) -> torch.Tensor:
        scores = reward_fn(prompts, responses)
        bonus = []
        for prompt, response in zip(prompts, responses):
            items = by_prompt.get(_prompt_key(prompt), [])
            bonus.append(sum(score_item(it, response) for it in items) / len(items) if items else 0.0)
        return scores + weight * torch.tensor(bonus, dtype=scores.dtype, device=scores.device)  # (B,)

    return combined


def _prompt_key(prompt: str | list[Message]) -> tuple:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tuple((m["role"], m["content"]) for m in messages)


@dataclass
class Rollout:
    prompts: list[list[Message]]
    responses: list[str]
    input_ids: torch.Tensor  # (B, P + R) left-padded prompt, then the response (pad after EOS)
    attention_mask: torch.Tensor  # (B, P + R) prompt mask, then the response mask
    mask: torch.Tensor  # (B, R) 1 on actions: response tokens up to and including the first EOS
    has_eos: torch.Tensor  # (B,)
    old_logp: torch.Tensor  # (B, R)
    ref_logp: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R) the critic's value of the state before each action
    entropy: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) reward_fn's score
    rewards: torch.Tensor  # (B, R) per-token reward: KL penalty, score at the last action
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)


# ---------------------------------------------------------------------------------------------------- the trainer


class PPOTrainer:
    """One `step` = sample a batch of rollouts, score them, then `ppo_epochs` of minibatch updates."""

    def __init__(
        self,
        cfg: PPOConfig,
        policy: PreTrainedModel,
        ref: PreTrainedModel | None,
        reward_fn: RewardFn,
        tokenizer: PreTrainedTokenizerBase,
        value_model: ValueModel | None = None,
    ):
        """`ref` is a frozen copy of the SFT model, or None when `policy` is a LoRA-adapted model
        (training/lora.py): then the reference is the policy with its adapter switched off, with no second copy."""
        if policy is ref:
            raise ValueError("policy and ref are the same object; pass a frozen copy of the SFT model as ref")
        if ref is None and not is_adapted(policy):
            raise ValueError(
                "ref=None needs a LoRA policy (training.lora.add_adapter): a full fine-tune needs a "
                "frozen copy of the SFT model as its reference"
            )
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs pad and eos tokens (set tokenizer.pad_token = tokenizer.eos_token)")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = next(policy.parameters()).device
        self.policy = policy.eval()  # eval: dropout off, so training forwards match the rollout's log-probs
        self.ref = ref.eval().requires_grad_(False) if ref is not None else None
        self.reward_fn = reward_fn
        self.value_model = (value_model or ValueModel.from_model(policy)).to(self.device).eval()
        self.policy_opt = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=cfg.lr,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.value_opt = torch.optim.AdamW(
            [p for p in self.value_model.parameters() if p.requires_grad],
            lr=cfg.critic_lr,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.kl_ctl = (
            FixedKLController(cfg.kl_coef)
            if cfg.kl_target is None
            else AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        )
        self.policy_loss = PolicyLoss(cfg.clip_eps, cfg.loss_reduction)
        self.value_loss = ValueLoss(cfg.value_clip_eps, cfg.loss_reduction)
        self.step_count = 0
        self.rng = random.Random(cfg.seed)
        eos = policy.generation_config.eos_token_id if policy.generation_config is not None else None
        eos_ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_token_ids = sorted(eos_ids)
        self.generation_config = GenerationConfig(
            do_sample=True,
            num_beams=1,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,  # neutralise any model defaults
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=self.eos_token_ids,
        )

    # --------------------------------------------------------------------------------------------- rollouts

    def _encode_prompts(self, prompts: list[list[Message]]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # the chat template has its own BOS
        input_ids, attention_mask = left_pad(ids, self.tokenizer.pad_token_id)
        return input_ids.to(self.device), attention_mask.to(self.device)

    @torch.no_grad()
    def _forward_chunks(self, fn: Callable[[slice], tuple[torch.Tensor, ...]], n: int) -> list[torch.Tensor]:
        parts = [fn(slice(i, i + self.cfg.forward_batch_size)) for i in range(0, n, self.cfg.forward_batch_size)]
        return [torch.cat(x) for x in zip(*parts)]

    @torch.no_grad()
    def rollout(self, prompts: list[list[Message]]) -> Rollout:
        """Sample responses, score them and compute per-token rewards, advantages and returns."""
        cfg = self.cfg
        prompt_ids, prompt_mask = self._encode_prompts(prompts)  # (B, P)
        P = prompt_ids.shape[1]
        out = self.policy.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config
        )
        response = out[:, P:]  # (B, R)
        mask, has_eos = response_mask(response, self.eos_token_ids)
        response = response.masked_fill(mask == 0, self.tokenizer.pad_token_id)
        input_ids = torch.cat([prompt_ids, response], dim=1)  # (B, P + R)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)
        R = response.shape[1]

        def forwards(s: slice) -> tuple[torch.Tensor, ...]:
            ids, am = input_ids[s], attention_mask[s]
            logp, entropy = sequence_logprobs(self.policy, ids, am, R, cfg.temperature, with_entropy=True)
            ref_logp = self.ref_logprobs(ids, am, R)
            values = self.value_model(ids, am, position_ids_from(am))[:, -R - 1 : -1]  # value of the state before
            return logp, ref_logp, values, entropy

        old_logp, ref_logp, values, entropy = self._forward_chunks(forwards, len(prompts))
        maskf = mask.float()
        old_logp, ref_logp, values = old_logp * maskf, ref_logp * maskf, values * maskf

        # the response text stops before EOS: the reward model's chat template closes the turn itself
        texts = self.tokenizer.batch_decode(
            [r[m.bool()][:-1] if e else r[m.bool()] for r, m, e in zip(response, mask, has_eos)],
            skip_special_tokens=True,
        )
        scores = self.reward_fn(prompts, texts).to(self.device, torch.float32).reshape(-1)  # (B,)
        if scores.shape[0] != len(prompts):
            raise ValueError(f"reward_fn returned {scores.shape[0]} scores for {len(prompts)} responses")
        final = scores.clone()
        if cfg.missing_eos_penalty is not None:
            penalised = (
                final + cfg.missing_eos_penalty
                if cfg.missing_eos_mode == "add"
                else torch.full_like(final, cfg.missing_eos_penalty)
            )
            final = torch.where(has_eos, final, penalised)
        if cfg.reward_clip is not None:
            final = final.clamp(-cfg.reward_clip, cfg.reward_clip)
        k = cfg.samples_per_prompt
        if k > 1 and len(prompts) % k == 0:  # consecutive blocks of k rollouts share a prompt (`sample_prompts`)
            groups = final.view(-1, k)
            final = (groups - (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)).reshape(-1)

        kl = kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * maskf  # (B, R)
        rewards = -self.kl_ctl.value * kl
        last = mask.sum(dim=1) - 1  # index of the last action (EOS or the final sampled token)
        rewards[torch.arange(len(prompts), device=self.device), last] += final
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return Rollout(
            prompts,
            texts,
            input_ids,
            attention_mask,
            mask,
            has_eos,
            old_logp,
            ref_logp,
            values,
            entropy,
            scores,
            rewards,
            advantages,
            returns,
        )

    def ref_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
        """Log-probs of the response under the reference, (B, R): the frozen copy, or the LoRA policy's base."""
        if self.ref is not None:
            return sequence_logprobs(self.ref, input_ids, attention_mask, n_response, self.cfg.temperature)[0]
        with reference_mode(self.policy):
            return sequence_logprobs(self.policy, input_ids, attention_mask, n_response, self.cfg.temperature)[0]

    # --------------------------------------------------------------------------------------------- updates

    def _update(self, ro: Rollout) -> dict[str, float]:
        cfg = self.cfg
        B, R = ro.mask.shape
        P = ro.input_ids.shape[1] - R
        sums: dict[str, float] = {}
        n = 0
        for _ in range(cfg.ppo_epochs):
            for idx in torch.randperm(B).split(cfg.mini_batch_size):
                idx = idx.to(self.device)
                mask = ro.mask[idx]
                r = int(mask.sum(dim=1).max())  # trim padding columns after the longest response
                ids, am, mask = ro.input_ids[idx, : P + r], ro.attention_mask[idx, : P + r], mask[:, :r]

                logp, entropy = sequence_logprobs(
                    self.policy, ids, am, r, cfg.temperature, with_entropy=cfg.entropy_coef > 0
                )
                policy_loss, pstats = self.policy_loss(logp, ro.old_logp[idx, :r], ro.advantages[idx, :r], mask)
                loss = policy_loss
                if cfg.entropy_coef > 0:
                    loss = loss - cfg.entropy_coef * masked_mean(entropy, mask)
                self.policy_opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.policy_opt.step()

                values = self.value_model(ids, am, position_ids_from(am))[:, -r - 1 : -1]  # (b, r)
                value_loss, vstats = self.value_loss(values, ro.values[idx, :r], ro.returns[idx, :r], mask)
                self.value_opt.zero_grad(set_to_none=True)
                (cfg.vf_coef * value_loss).backward()
                torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), cfg.max_grad_norm)
                self.value_opt.step()

                for k, v in {
                    "policy_loss": policy_loss,
                    "value_loss": value_loss,
                    "grad_norm": grad_norm,
                    **pstats,
                    **vstats,
                }.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n += 1
        return {k: v / n for k, v in sums.items()}

    def step(self, prompts: list[list[Message]]) -> dict[str, float]:
        """One PPO iteration on `prompts` (one rollout each); returns the metrics of the iteration."""
        torch.manual_seed(self.cfg.seed + self.step_count)  # reproducible from the step number alone (resume)
        kl_coef = self.kl_ctl.value
        t0 = time.perf_counter()
        ro = self.rollout(prompts)
        t1 = time.perf_counter()
        stats = self._update(ro)
        t2 = time.perf_counter()
        maskf = ro.mask.float()
        kl_seq = (kl_penalty(ro.old_logp, ro.ref_logp, "k1") * maskf).sum(dim=1)  # (B,)
        kl = float(kl_seq.mean())
        self.kl_ctl.update(kl, len(prompts))
        self.step_count += 1
        return {
            "step": self.step_count,
            "reward": float(ro.scores.mean()),
            "reward_std": float(ro.scores.std()) if len(prompts) > 1 else 0.0,
            "return": float(ro.rewards.sum(dim=1).mean()),  # score after penalties minus beta * KL
            "kl": kl,
            "entropy": float(masked_mean(ro.entropy, maskf)),
            "response_length": float(maskf.sum(dim=1).mean()),
            "missing_eos_frac": float((~ro.has_eos).float().mean()),
            "kl_coef": kl_coef,
            **stats,
            "generate_seconds": t1 - t0,  # the whole rollout: sampling, scoring and the no-grad forwards
            "train_seconds": t2 - t1,
        }

    def train(
        self,
        prompt_sampler: Callable[[int, random.Random], list[list[Message]]],
        steps: int,
        max_seconds: float | None = None,
    ) -> list[dict[str, float]]:
        """Run `steps` iterations, or fewer if `max_seconds` is spent first (no iteration starts after it);
        `prompt_sampler(n, rng)` draws each batch with the trainer's (saved) RNG."""
        t0, history = time.perf_counter(), []
        while len(history) < steps and (max_seconds is None or time.perf_counter() - t0 < max_seconds):
            history.append(self.step(self.sample_prompts(prompt_sampler)))
        return history

    def sample_prompts(
        self, prompt_sampler: Callable[[int, random.Random], list[list[Message]]]
    ) -> list[list[Message]]:
        """One batch of prompts: batch_size / samples_per_prompt drawn, each repeated samples_per_prompt times."""
        k = self.cfg.samples_per_prompt
        return [p for p in prompt_sampler(self.cfg.batch_size // k, self.rng) for _ in range(k)]

    # --------------------------------------------------------------------------------------------- state

    def save_state(self, state_dir: str | Path) -> Path:
        """Write everything needed to continue exactly; replaces `state_dir` atomically (a crash leaves the old).
        LoRA trainers are not saved: their adapter is published with the version, and a cycle starts PPO afresh."""
        if self.ref is None:
            raise ValueError(
                "save_state: a LoRA trainer (ref=None) is not resumable; start PPO afresh from the published adapter"
            )
        state_dir = Path(state_dir)
        tmp = state_dir.with_name(f"{state_dir.name}.tmp-{self.step_count}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.policy.save_pretrained(tmp / "policy")
        self.tokenizer.save_pretrained(tmp / "policy")
        self.value_model.save(tmp / "value")
        torch.save(
            {
                "policy_opt": self.policy_opt.state_dict(),
                "value_opt": self.value_opt.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(),
                "step": self.step_count,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python_rng": _rng_to_list(self.rng.getstate()),
            },
            tmp / "trainer.pt",
        )
        (tmp / "ppo_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        old = state_dir.with_name(f"{state_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if state_dir.exists():
            state_dir.rename(old)
        tmp.rename(state_dir)
        shutil.rmtree(old, ignore_errors=True)
        return state_dir

    @classmethod
    def load_state(
        cls,
        state_dir: str | Path,
        *,
        ref: PreTrainedModel,
        reward_fn: RewardFn,
        cfg: PPOConfig | None = None,
        device: str | torch.device | None = None,
    ) -> PPOTrainer:
        """Rebuild a trainer from `save_state`; `cfg` defaults to the saved one, `device` to the reference's."""
        state_dir = Path(state_dir)
        if cfg is None:
            saved = json.loads((state_dir / "ppo_config.json").read_text())
            cfg = PPOConfig(**{f.name: saved[f.name] for f in fields(PPOConfig) if f.name in saved})
        device = device or next(ref.parameters()).device
        with CONSTRUCTION:
            policy = AutoModelForCausalLM.from_pretrained(str(state_dir / "policy"), dtype=torch.float32)
        policy = policy.to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(state_dir / "policy"))
        value_model = ValueModel.load(state_dir / "value", device)
        trainer = cls(cfg, policy, ref, reward_fn, tokenizer, value_model)
        state = torch.load(state_dir / "trainer.pt", map_location=device, weights_only=True)
        trainer.policy_opt.load_state_dict(state["policy_opt"])
        trainer.value_opt.load_state_dict(state["value_opt"])
        trainer.kl_ctl.load_state_dict(state["kl_ctl"])
        trainer.step_count = int(state["step"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        trainer.rng.setstate(_rng_from_list(state["python_rng"]))
        return trainer


def _rng_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def mean_reward(trainer: PPOTrainer, prompts: list[list[Message]], seed: int = 0) -> float:
    """Mean score of fresh samples from the current policy (no update), for before/after comparisons."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return float(trainer.rollout(prompts).scores.mean())
    finally:
        torch.set_rng_state(state)
