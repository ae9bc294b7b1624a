"""Losses against naive reference computations and hand-made cases where the right gradient is known."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    BOTH_BAD,
    PREF,
    TIE,
    DPOLoss,
    KTOLoss,
    PairWiseLoss,
    PolicyLoss,
    ValueLoss,
    compute_gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    pointwise_loss,
    tie_loss,
)


def random_episode_batch(B: int = 5, T: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # (B, T)
    rewards = torch.randn(B, T, generator=g) * mask
    values = torch.randn(B, T, generator=g) * mask
    return rewards, values, mask, lengths


def naive_gae(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                v_next = float(values[b, k + 1]) if k + 1 < n else 0.0  # the episode ends after the last action
                delta = float(rewards[b, k]) + gamma * v_next - float(values[b, k])
                total += (gamma * lam) ** (k - t) * delta
            adv[b, t] = total
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_naive_loops(gamma, lam):
    rewards, values, mask, lengths = random_episode_batch()
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    expected = naive_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(advantages.double(), expected, atol=1e-5)
    assert torch.allclose(returns, (advantages + values) * mask, atol=1e-6)
    assert torch.all(advantages[mask == 0] == 0)


def test_gae_with_lambda_one_and_zero_values_is_the_reward_to_go():
    rewards, _, mask, _ = random_episode_batch(seed=3)
    advantages, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * mask
    assert torch.allclose(advantages, to_go, atol=1e-5)


def test_masked_mean_ignores_masked_positions():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))


def test_masked_whiten_gives_zero_mean_unit_std_on_the_mask():
    _, values, mask, _ = random_episode_batch(seed=1)
    x = values * 3.0 + 7.0 * mask
    w = masked_whiten(x, mask)
    sel = w[mask.bool()]
    assert sel.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert sel.std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(w[mask == 0] == 0)
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-4)
    assert kept.std().item() == pytest.approx(1.0, abs=1e-4)


def test_kl_estimators_are_zero_at_equality_and_estimate_the_true_kl():
    logp = torch.randn(4, 6)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logp, logp.clone(), kind), torch.zeros_like(logp))
    # Monte Carlo: tokens sampled from p; k1 and k3 are unbiased estimates of KL(p || q)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(8, generator=g), 0)
    q = torch.softmax(torch.randn(8, generator=g), 0)
    true_kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    assert kl_penalty(lp, lq, "k1").mean().item() == pytest.approx(true_kl, rel=0.05)
    assert kl_penalty(lp, lq, "k3").mean().item() == pytest.approx(true_kl, rel=0.05)
    assert torch.all(kl_penalty(lp, lq, "k3") >= 0)
    with pytest.raises(ValueError, match="'k9'"):
        kl_penalty(lp, lq, "k9")


def policy_grad(ratio: float, advantage: float, clip: float = 0.2) -> tuple[float, float]:
    """(loss, d loss / d logp) for one token with the given ratio and advantage."""
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = PolicyLoss(clip)(logp, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1))
    loss.backward()
    return loss.item(), logp.grad.item()


def test_policy_loss_gradient_is_clipped_only_on_the_optimistic_side():
    # positive advantage: above 1 + eps the update has gone far enough, no gradient; inside, push logp up
    loss, grad = policy_grad(1.5, 1.0)
    assert grad == 0.0 and loss == pytest.approx(-1.2)
    loss, grad = policy_grad(1.1, 1.0)
    assert grad == pytest.approx(-1.1) and loss == pytest.approx(-1.1)
    # negative advantage: below 1 - eps no gradient; inside, push logp down
    loss, grad = policy_grad(0.5, -1.0)
    assert grad == 0.0 and loss == pytest.approx(0.8)
    _, grad = policy_grad(0.9, -1.0)
    assert grad == pytest.approx(0.9)
    # the pessimistic side is never clipped: a bad action made more likely still gets its gradient
    _, grad = policy_grad(1.5, -1.0)
    assert grad == pytest.approx(1.5)


def test_policy_loss_diagnostics_and_mask():
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5, 9.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = PolicyLoss(0.2)(logp, torch.zeros_like(logp), adv, mask)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)  # first and third tokens are clipped; fourth masked
    expected_kl = (0.5 * logp[0, :3] ** 2).mean().item()
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 0.8) / 3)
    with pytest.raises(ValueError, match="'sum'"):
        PolicyLoss(0.2, reduction="sum")


def value_case(value: float, old: float, ret: float, clip: float | None = 0.2):
    v = torch.tensor([[value]], requires_grad=True)
    loss, stats = ValueLoss(clip)(v, torch.tensor([[old]]), torch.tensor([[ret]]), torch.ones(1, 1))
    loss.backward()
    return loss.item(), v.grad.item(), stats["vf_clip_frac"].item()


def test_value_loss_clips_around_the_old_values():
    # inside the clip range both terms agree: plain 0.5 (V - R)^2
    loss, grad, frac = value_case(0.1, 0.0, 1.0)
    assert loss == pytest.approx(0.5 * 0.81) and grad == pytest.approx(0.1 - 1.0) and frac == 0.0
    # moved away from the return beyond the range: the unclipped error is larger and keeps its gradient
    loss, grad, frac = value_case(-1.0, 0.0, 1.0)
    assert loss == pytest.approx(0.5 * 4.0) and grad == pytest.approx(-2.0) and frac == 0.0
    # overshot past the return beyond the range: the clipped error (0.2 vs 0.9) dominates and has no gradient
    loss, grad, frac = value_case(1.0, 0.0, 0.9)
    assert loss == pytest.approx(0.5 * 0.7**2) and grad == 0.0 and frac == 1.0
    # no clipping at all
    loss, grad, _ = value_case(1.0, 0.0, 0.9, clip=None)
    assert loss == pytest.approx(0.5 * 0.1**2) and grad == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'median'"):
        ValueLoss(0.2, reduction="median")


def test_pairwise_loss_with_margin():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([1.0, 0.5, 1.0])
    margin = torch.tensor([0.0, 0.0, 0.5])
    loss, stats = PairWiseLoss()(chosen, rejected, margin)
    expected = [-math.log(1 / (1 + math.exp(-d))) for d in (1.0, -0.5, -0.5)]
    assert loss.item() == pytest.approx(sum(expected) / 3)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # ties count as wrong
    no_margin, _ = PairWiseLoss()(chosen, rejected)
    assert no_margin.item() < loss.item()  # a margin asks for a larger gap
    per_pair, _ = PairWiseLoss(reduction="none")(chosen, rejected, margin)
    assert per_pair.shape == (3,)
    with pytest.raises(ValueError, match="'max'"):
        PairWiseLoss(reduction="max")


def test_tie_and_pointwise_losses():
    a = torch.tensor([0.3, 2.0], requires_grad=True)
    b = torch.tensor([0.3, -1.0])
    loss = tie_loss(a, b)
    loss.sum().backward()
    assert loss[0].item() == pytest.approx(math.log(2))  # minimum, at equal rewards
    assert a.grad[0].item() == pytest.approx(0.0, abs=1e-7)
    assert a.grad[1].item() > 0  # pulls the larger reward down
    r = torch.tensor([1.0, 1.0])
    good = torch.tensor([True, False])
    pw = pointwise_loss(r, good)
    assert pw[0].item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    assert pw[1].item() == pytest.approx(math.log(1 + math.exp(1.0)))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_matches_the_formula_and_reports_implicit_rewards():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])  # policy log-probs of chosen / rejected
    rc, rr = torch.tensor([-3.5, -4.5]), torch.tensor([-3.5, -4.5])  # reference log-probs
    loss, m = DPOLoss(beta=0.5)(pc, pr, rc, rr)
    h = [(-3.0 + 3.5) - (-4.0 + 3.5), (-5.0 + 4.5) - (-4.0 + 4.5)]  # [1.0, -1.0]
    assert loss.item() == pytest.approx(-(logsig(0.5 * h[0]) + logsig(0.5 * h[1])) / 2)
    assert m["accuracy"].item() == pytest.approx(0.5)
    assert m["chosen_reward"].item() == pytest.approx(0.5 * (0.5 - 0.5) / 2)
    assert m["rejected_reward"].item() == pytest.approx(0.5 * (-0.5 + 0.5) / 2)
    assert m["margin"].item() == pytest.approx(0.0)


def test_cdpo_label_smoothing_and_odpo_offset():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    loss, _ = DPOLoss(beta=1.0, label_smoothing=0.1)(pc, pr, rc, rr)  # h = 2
    assert loss.item() == pytest.approx(-0.9 * logsig(2.0) - 0.1 * logsig(-2.0))
    # with flipped labels assumed, the loss has a minimum at a finite margin instead of rewarding h -> infinity
    far, _ = DPOLoss(beta=1.0, label_smoothing=0.1)(pc * 10, pr * 10, rc, rr)
    assert far.item() > loss.item()
    offset, _ = DPOLoss(beta=1.0)(pc, pr, rc, rr, margin=torch.tensor([0.5]))
    assert offset.item() == pytest.approx(-logsig(1.5))
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLoss(label_smoothing=0.5)


def test_dpo_ties_pull_the_margin_to_zero_and_both_bad_pushes_both_below_the_reference():
    pc = torch.tensor([-1.0, -1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-2.0, -2.0, -2.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0, -2.0])
    kind = torch.tensor([PREF, TIE, BOTH_BAD])
    loss, m = DPOLoss(beta=0.5, both_bad_weight=2.0, reduction="none")(pc, pr, ref, ref, kind)
    assert loss[0].item() == pytest.approx(-logsig(0.5))
    assert loss[1].item() == pytest.approx(0.5**2)  # (beta h)^2 with h = 1
    assert loss[2].item() == pytest.approx(2.0 * math.log(2))  # both at the reference: 2 * 0.5 * 2 * log 2
    loss.sum().backward()
    assert pc.grad[1].item() == pytest.approx(2 * 0.5 * 0.5) and pr.grad[1].item() == pytest.approx(-0.5)
    # both_bad: each response's gradient is +weight * 0.5 * beta * sigmoid(0) (descent lowers both log-probs)
    assert pc.grad[2].item() == pytest.approx(2.0 * 0.5 * 0.5 * 0.5)
    assert pr.grad[2].item() == pytest.approx(2.0 * 0.5 * 0.5 * 0.5)
    assert m["accuracy"].item() == 1.0 and m["tie_abs_margin"].item() == pytest.approx(0.5)


def test_kto_loss_with_a_clamped_detached_reference_point_and_weights():
    policy = torch.tensor([-1.0, -4.0, -2.0], requires_grad=True)
    ref = torch.tensor([-2.0, -3.0, -2.0])
    desirable = torch.tensor([True, False, True])
    kl = torch.tensor([0.2, 0.6], requires_grad=True)  # mismatched-pair log-ratios: z0 = 0.4
    loss, m = KTOLoss(beta=1.0, lambda_d=1.0, lambda_u=2.0)(policy, ref, desirable, kl)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1 - sig(1.0 - 0.4), 2.0 * (1 - sig(0.4 - (-1.0))), 1 - sig(0.0 - 0.4)]
    assert loss.item() == pytest.approx(sum(expected) / 3)
    assert m["z0"].item() == pytest.approx(0.4)
    assert m["desirable_reward"].item() == pytest.approx(0.5) and m["undesirable_reward"].item() == pytest.approx(-1)
    loss.backward()
    assert kl.grad is None  # z0 is detached
    assert policy.grad[0].item() < 0 and policy.grad[1].item() > 0  # descent raises up, lowers down
    negative, m2 = KTOLoss(beta=1.0)(policy, ref, desirable, torch.tensor([-0.5, -0.7]))
    assert m2["z0"].item() == 0.0  # a KL estimate below 0 is clamped
    assert negative.item() == pytest.approx((1 - sig(1.0) + 1 - sig(1.0) + 1 - sig(0.0)) / 3)


def test_per_item_weights_give_the_weighted_mean_and_zero_weight_items_no_gradient():
    chosen = torch.tensor([1.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.5, 0.0])
    weight = torch.tensor([2.0, 1.0, 0.0])
    loss, _ = PairWiseLoss()(chosen, rejected, weight=weight)
    by_hand = (2 * -math.log(1 / (1 + math.exp(-1.0))) + 1 * -math.log(1 / (1 + math.exp(0.5)))) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    loss.backward()
    assert chosen.grad[2] == 0 and chosen.grad[0] != 0
    all_zero, _ = PairWiseLoss()(chosen, rejected, weight=torch.zeros(3))
    assert all_zero.item() == 0.0
    # DPO and KTO: the same weighted mean of their per-item losses
    pc, pr, rc, rr = (
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-2.0, -1.0]),
        torch.tensor([-1.5, -1.5]),
        torch.tensor([-1.5, -1.5]),
    )
    per, _ = DPOLoss(beta=0.1, reduction="none")(pc, pr, rc, rr)
    w = torch.tensor([3.0, 1.0])
    weighted, _ = DPOLoss(beta=0.1)(pc, pr, rc, rr, weight=w)
    assert weighted.item() == pytest.approx(float((per * w).sum() / 4), rel=1e-6)
    kto = KTOLoss(beta=0.1)
    logps, ref, good = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.tensor([True, False])
    each = [kto(logps[i : i + 1], ref[i : i + 1], good[i : i + 1], None)[0].item() for i in range(2)]
    weighted_kto, _ = kto(logps, ref, good, None, weight=torch.tensor([1.0, 0.0]))
    assert weighted_kto.item() == pytest.approx(each[0], rel=1e-6)
