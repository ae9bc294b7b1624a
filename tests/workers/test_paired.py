"""workers/paired.py against hand-computed values: the exact McNemar tail, its Clopper-Pearson interval (values
checked with scipy.stats.binomtest), and Connor's prompt count."""

from __future__ import annotations

import math

import pytest

from workers.paired import binom_tail, detectable_increase, needed_prompts, paired_increase


def test_exact_tail_on_discordant_pairs():
    assert binom_tail(3, 3) == 1 / 8  # three discordant prompts, all against the candidate: 1/2^3
    assert binom_tail(7, 12) == sum(math.comb(12, i) for i in range(7, 13)) / 4096 == 1586 / 4096
    assert binom_tail(0, 5) == 1.0 and binom_tail(6, 5) == 0.0


def test_increase_counts_interval_and_prompt_need():
    # 12 discordant prompts on 100: 7 worse, 5 better → increase 2 points, not significant
    cand = [1] * 7 + [0] * 5 + [1] * 3 + [0] * 85
    base = [0] * 7 + [1] * 5 + [1] * 3 + [0] * 85
    p = paired_increase(cand, base, tolerance=0.03, alpha=0.01, power=0.8)
    assert (p.n, p.worse, p.better) == (100, 7, 5) and p.increase == pytest.approx(0.02)
    assert (p.rate, p.base_rate) == (0.10, 0.08) and p.p_value == pytest.approx(1586 / 4096)
    # the interval on the share of discordant prompts against the candidate is (0.23489, 0.87853) (98 %, scipy),
    # mapped onto the increase as 12 (2 pi - 1) / 100
    assert p.ci == pytest.approx((12 * (2 * 0.234893 - 1) / 100, 12 * (2 * 0.878533 - 1) / 100), abs=1e-5)
    assert p.ci_level == pytest.approx(0.98) and p.ci[0] < p.increase < p.ci[1]
    # noise 2 * 5 / 100 = 0.1 both ways; psi = 0.13: (2.3263 sqrt(.13) + 0.8416 sqrt(.13 - .0009))^2 / .0009
    z_a, z_b = 2.326348, 0.841621
    assert p.needed_prompts == math.ceil((z_a * 0.13**0.5 + z_b * (0.13 - 0.0009) ** 0.5) ** 2 / 0.0009)
    assert needed_prompts(0.1, p.detectable_increase, 0.01, 0.8) <= 100 < needed_prompts(0.1, 0.03, 0.01, 0.8)


def test_no_discordance_and_unequal_lengths():
    same = paired_increase([1, 0, 0, 1], [1, 0, 0, 1], tolerance=0.05, alpha=0.01, power=0.8)
    assert same.p_value == 1.0 and same.increase == 0.0 and same.ci == (0.0, 0.0)
    assert detectable_increase(10_000, 0.0, 0.01, 0.8) < 0.01 < detectable_increase(50, 0.2, 0.01, 0.8)
    with pytest.raises(ValueError, match="not the same prompts"):
        paired_increase([1, 0], [1, 0, 0], tolerance=0.05, alpha=0.01, power=0.8)
