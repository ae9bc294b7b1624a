"""Losses and estimators for RLHF: masked reductions, GAE, KL estimators, the PPO policy and value losses, the
Bradley–Terry pairwise loss and the direct preference losses (DPO, KTO).

Follows OpenRLHF `models/loss.py` and "The N Implementation Details of RLHF with PPO" (Huang et al., 2023):
- GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation".
- Clipped surrogate and clipped value loss: Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
- KL estimators k1/k2/k3: Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
- Pairwise loss: Bradley & Terry 1952; margin as in Llama 2 (Touvron et al. 2023).
- DPO: Rafailov et al. 2023; label smoothing as conservative DPO (Mitchell 2023, "A note on DPO with noisy
  preferences"); a margin as ODPO's offset (Amini et al. 2024); ties as IPO's regression target for p = 1/2
  (Azar et al. 2023); "both bad" as NPO's bounded push-down (Zhang et al. 2024).
- KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization".

All per-token tensors are (B, T) with a 0/1 `mask` marking response (action) tokens; every loss returns
`(loss, metrics)` where metrics are detached scalars for logging.

    python -m pytest tests/training/test_losses.py -q
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("token_mean", "seq_mean")
KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (over all of them if `dim` is None)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)  # Bessel's correction, as in OpenRLHF/TRL
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to unit variance over masked positions; `shift_mean=False` keeps the mean (reward whitening)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def weighted_mean(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """sum(w x) / sum(w) over per-item losses (the plain mean without weights); 0 when every weight is 0, so a batch
    of a zero-weight annotator's items moves nothing."""
    if weight is None:
        return x.mean()
    weight = weight.to(x.dtype)
    return (x * weight).sum() / weight.sum().clamp(min=torch.finfo(x.dtype).tiny)


def _reduce(x: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "token_mean":  # every response token weighs the same (OpenRLHF token-level loss)
        return masked_mean(x, mask)
    if reduction == "seq_mean":  # every sequence weighs the same, whatever its length
        return masked_mean(x, mask, dim=-1).mean()
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    rewards, values, mask: (B, T); rewards and values must be zero where mask is 0 (after the end), so the value
    after the last action is 0 (the episode ends). Returns (advantages, returns), both (B, T), returns = A + V.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask  # (B, T)
    returns = advantages + values
    return advantages, returns


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    k1 = log r (unbiased, can be negative; the one used in the PPO reward, Ziegler et al.), k2 = (log r)^2 / 2
    (biased, low variance), k3 = (r^-1 - 1) + log r (unbiased, always >= 0), with log r = logp - ref_logp.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


class PolicyLoss(nn.Module):
    """PPO clipped surrogate loss: -min(r A, clip(r, 1-eps, 1+eps) A), r = exp(logp - old_logp)."""

    def __init__(self, clip_eps: float = 0.2, reduction: str = "token_mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        self.clip_eps = clip_eps
        self.reduction = reduction

    def forward(
        self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        log_ratio = logp - old_logp
        ratio = log_ratio.exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1.0 - self.clip_eps, 1.0 + self.clip_eps) * advantages
        loss = _reduce(-torch.min(surr1, surr2), mask, self.reduction)
        with torch.no_grad():
            clip_frac = masked_mean((surr2 < surr1).to(logp.dtype), mask)  # tokens whose gradient was clipped away
            approx_kl = masked_mean(0.5 * log_ratio**2, mask)  # lm-human-preferences' approxkl
        return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


class ValueLoss(nn.Module):
    """PPO clipped value loss: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""

    def __init__(self, clip_eps: float | None = 0.2, reduction: str = "token_mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        self.clip_eps = clip_eps
        self.reduction = reduction

    def forward(
        self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_unclipped = (values - returns) ** 2
        if self.clip_eps is None:
            loss, clipped = loss_unclipped, torch.zeros_like(loss_unclipped, dtype=torch.bool)
        else:
            values_clipped = old_values + (values - old_values).clamp(-self.clip_eps, self.clip_eps)
            loss_clipped = (values_clipped - returns) ** 2
            loss = torch.max(loss_unclipped, loss_clipped)
            clipped = loss_clipped > loss_unclipped
        loss = 0.5 * _reduce(loss, mask, self.reduction)
        with torch.no_grad():
            vf_clip_frac = masked_mean(clipped.to(values.dtype), mask)
        return loss, {"vf_clip_frac": vf_clip_frac}


class PairWiseLoss(nn.Module):
    """Bradley–Terry loss -log sigmoid(r_chosen - r_rejected - margin) with accuracy (ties count as wrong)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "none"):
            raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'none'")
        self.reduction = reduction

    def forward(
        self,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        margin: torch.Tensor | float | None = None,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`weight` (P,): per-pair multipliers (annotator reliability); "mean" is then the weighted mean."""
        diff = chosen - rejected
        if margin is not None:
            diff = diff - margin
        loss = -F.logsigmoid(diff)
        if self.reduction == "mean":
            loss = weighted_mean(loss, weight)
        elif weight is not None:
            loss = loss * weight
        with torch.no_grad():
            accuracy = (chosen > rejected).to(chosen.dtype).mean()
        return loss, {"accuracy": accuracy}


def tie_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry cross-entropy toward P(a > b) = 0.5; minimal (log 2) when the rewards are equal. Per pair."""
    diff = chosen - rejected
    return -0.5 * F.logsigmoid(diff) - 0.5 * F.logsigmoid(-diff)


def pointwise_loss(rewards: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """Logistic loss on single rewards: -log sigmoid(r) for good ones, -log sigmoid(-r) for bad ones. Per item."""
    sign = good.to(rewards.dtype) * 2.0 - 1.0
    return -F.logsigmoid(sign * rewards)


# ---------------------------------------------------------------------------------------------------- DPO and KTO
# Inputs are summed response log-probs, (P,) per pair or (N,) per response; "log-ratio" = log pi(y|x) - log ref(y|x)
# and the implicit reward is beta times it (Rafailov et al. 2023, eq. 5).

PREF, TIE, BOTH_BAD = 0, 1, 2  # codes of `training.data.Comparison.label` in the `kind` tensor of DPOLoss
PREFERENCE_KINDS = {"pref": PREF, "tie": TIE, "both_bad": BOTH_BAD}


class DPOLoss(nn.Module):
    """DPO: -(1-eps) log sigmoid(beta h - m) - eps log sigmoid(m - beta h), h = chosen minus rejected log-ratio.

    `label_smoothing` eps is the assumed rate of flipped labels (cDPO). Pairs marked TIE in `kind` get IPO's
    squared loss with target p = 1/2, (beta h)^2: IPO regresses h onto (p - 1/2)/tau, which is 0 for a tie; beta h
    keeps its scale that of the DPO term. Pairs marked BOTH_BAD push each response below the reference with NPO's
    bounded term -log sigmoid(-beta * log-ratio), averaged over the two: unlike unlikelihood (gradient ascent on
    log p) it saturates once a response is less likely than under the reference, so it cannot collapse the policy;
    its gradient at the reference (beta / 2 per response) equals a DPO pair's.
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        tie_weight: float = 1.0,
        both_bad_weight: float = 1.0,
        reduction: str = "mean",
    ):
        super().__init__()
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(
                f"label_smoothing {label_smoothing} must be in [0, 0.5): it is the share of flipped "
                "labels, and at 0.5 the labels carry no information"
            )
        if reduction not in ("mean", "none"):
            raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'none'")
        self.beta, self.label_smoothing = beta, label_smoothing
        self.tie_weight, self.both_bad_weight, self.reduction = tie_weight, both_bad_weight, reduction

    def forward(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
        kind: torch.Tensor | None = None,
        margin: torch.Tensor | float | None = None,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`weight` (P,): per-pair multipliers (annotator reliability); "mean" is then the weighted mean."""
        chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected  # (P,)
        logits = self.beta * (chosen_ratio - rejected_ratio)  # (P,) implicit reward margin
        if kind is None:
            kind = torch.full_like(logits, PREF, dtype=torch.long)
        shifted = logits - margin if margin is not None else logits
        eps = self.label_smoothing
        pref = -(1 - eps) * F.logsigmoid(shifted) - eps * F.logsigmoid(-shifted)
        tie = self.tie_weight * logits**2
        both_bad = (
            self.both_bad_weight
            * 0.5
            * (-F.logsigmoid(-self.beta * chosen_ratio) - F.logsigmoid(-self.beta * rejected_ratio))
        )
        loss = torch.where(kind == PREF, pref, torch.where(kind == TIE, tie, both_bad))  # (P,)
        if self.reduction == "mean":
            loss = weighted_mean(loss, weight)
        elif weight is not None:
            loss = loss * weight
        with torch.no_grad():
            is_pref = kind == PREF
            chosen_reward, rejected_reward = self.beta * chosen_ratio, self.beta * rejected_ratio
            metrics = {
                "accuracy": masked_mean((logits > 0).to(logits.dtype), is_pref),  # pref pairs only; ties are wrong
                "chosen_reward": masked_mean(chosen_reward, is_pref),
                "rejected_reward": masked_mean(rejected_reward, is_pref),
                "margin": masked_mean(logits, is_pref),
                "tie_abs_margin": masked_mean(logits.abs(), kind == TIE),
                "both_bad_reward": masked_mean(0.5 * (chosen_reward + rejected_reward), kind == BOTH_BAD),
            }
        return loss, metrics


class KTOLoss(nn.Module):
    """KTO: lambda_D (1 - sigmoid(beta (r - z0))) for desirable, lambda_U (1 - sigmoid(beta (z0 - r))) for undesirable.

    r is a response's log-ratio. The reference point z0 is the paper's batch estimate of KL(pi || ref): the mean
    log-ratio of mismatched (prompt, response) pairs of the batch (`kl_ratios`), clamped at 0 and detached, so
    the model cannot lower its loss by moving z0 (Ethayarajh et al. 2024, §4.1). The loss is the mean over responses.
    """

    def __init__(self, beta: float = 0.1, lambda_d: float = 1.0, lambda_u: float = 1.0):
        super().__init__()
        if lambda_d <= 0 or lambda_u <= 0:
            raise ValueError(f"lambda_d {lambda_d} and lambda_u {lambda_u} must be positive")
        self.beta, self.lambda_d, self.lambda_u = beta, lambda_d, lambda_u

    def forward(
        self,
        policy_logps: torch.Tensor,
        ref_logps: torch.Tensor,
        desirable: torch.Tensor,
        kl_ratios: torch.Tensor | None,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`weight` (N,): per-response multipliers (annotator reliability); the loss is their weighted mean."""
        ratio = policy_logps - ref_logps  # (N,)
        if kl_ratios is None or kl_ratios.numel() == 0:
            z0 = ratio.new_zeros(())  # no mismatched pairs (a batch of one): the reference's own point
        else:
            z0 = kl_ratios.detach().mean().clamp(min=0.0)
        desirable = desirable.to(torch.bool)
        loss_d = self.lambda_d * (1 - torch.sigmoid(self.beta * (ratio - z0)))
        loss_u = self.lambda_u * (1 - torch.sigmoid(self.beta * (z0 - ratio)))
        loss = weighted_mean(torch.where(desirable, loss_d, loss_u), weight)
        with torch.no_grad():
            reward = self.beta * ratio
            metrics = {
                "z0": z0.detach(),
                "desirable_reward": masked_mean(reward, desirable),
                "undesirable_reward": masked_mean(reward, ~desirable),
            }
        return loss, metrics
