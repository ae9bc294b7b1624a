"""Paired comparison of two policies' 0/1 outcomes on the same prompts: did the bad outcome become more common?

The gate's regression checks (workers/gate.py) ask this of harmful compliance, over-caution and checker failures.
Both policies answer the same prompts, so only the discordant prompts carry information about a difference: `worse`
(bad for the candidate only) and `better` (bad for the baseline only). Under "no change" each discordant prompt is
equally likely to go either way, so `worse` ~ Binomial(worse + better, 1/2): McNemar's test in its exact form
(Fay, 2010, "Two-sided exact tests and matched confidence intervals for discordant pairs"). Exact rather than a
paired bootstrap because the checks see few discordant prompts (often under ten) where bootstrap intervals
under-cover, it needs no random numbers (the same outcomes always give the same verdict), and it costs a sum.

Pure Python (math.comb and statistics.NormalDist): the gate runs in every worker, and the tails of a binomial
with n ≤ a few thousand need no numerical library.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any


@dataclass(frozen=True)
class PairedIncrease:
    """How much more often the candidate has the bad outcome than the baseline, on the same `n` prompts."""

    n: int
    rate: float  # candidate's share of bad outcomes
    base_rate: float  # baseline's share on the same prompts
    worse: int  # prompts bad for the candidate only
    better: int  # prompts bad for the baseline only
    increase: float  # rate - base_rate = (worse - better) / n
    p_value: (
        float  # one-sided exact: P(at least `worse` of the discordant prompts go against the candidate | no change)
    )
    ci: tuple[float, float]  # interval for the increase, conditional on the discordant count (Clopper-Pearson)
    ci_level: float
    needed_prompts: int  # prompts the test needs to detect an increase of `tolerance` with `power` at `alpha`
    detectable_increase: float  # the smallest increase it detects with `power` at `alpha` on these n prompts

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ci": list(self.ci)}


def binom_tail(k: int, m: int) -> float:
    """P(X >= k) for X ~ Binomial(m, 1/2), exactly."""
    return sum(math.comb(m, i) for i in range(max(k, 0), m + 1)) / 2**m if k <= m else 0.0


def _binom_cdf(k: int, m: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(m, p), 0 < p < 1; terms in log space, so any m works."""
    log_c = math.lgamma(m + 1)
    return sum(
        math.exp(log_c - math.lgamma(i + 1) - math.lgamma(m - i + 1) + i * math.log(p) + (m - i) * math.log1p(-p))
        for i in range(0, k + 1)
    )


def _clopper_pearson(k: int, m: int, alpha: float) -> tuple[float, float]:
    """Equal-tailed exact interval (each tail `alpha`) for a binomial proportion: the interval that inverts the
    exact one-sided tests, so its lower end is above 1/2 exactly when the test rejects at `alpha`."""

    def solve(f, target: float) -> float:  # f is decreasing in p on [0, 1]
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
        return (lo + hi) / 2

    # lower: P(X >= k | p) = alpha, i.e. P(X <= k - 1 | p) = 1 - alpha; upper: P(X <= k | p) = alpha
    lower = 0.0 if k == 0 else solve(lambda p: _binom_cdf(k - 1, m, p), 1 - alpha)
    upper = 1.0 if k == m else solve(lambda p: _binom_cdf(k, m, p), alpha)
    return lower, upper


def needed_prompts(noise: float, delta: float, alpha: float, power: float) -> int:
    """Prompts for the one-sided McNemar test at `alpha` to detect an increase `delta` with `power` (Connor, 1987,
    Biometrics 43:207), when a share `noise` of prompts differ both ways without any change (sampling noise) and
    the increase adds delta more that go against the candidate: discordance psi = noise + delta."""
    if delta <= 0:
        return 0
    psi = min(noise + delta, 1.0)
    z_a, z_b = NormalDist().inv_cdf(1 - alpha), NormalDist().inv_cdf(power)
    return math.ceil((z_a * math.sqrt(psi) + z_b * math.sqrt(max(psi - delta**2, 0.0))) ** 2 / delta**2)


def detectable_increase(n: int, noise: float, alpha: float, power: float) -> float:
    """The smallest increase `needed_prompts` says n prompts suffice for (bisection; 1.0 if none does)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if needed_prompts(noise, mid, alpha, power) <= n else (mid, hi)
    return hi


def paired_increase(
    candidate: list[int], baseline: list[int], *, tolerance: float, alpha: float, power: float
) -> PairedIncrease:
    """Compare 0/1 outcomes (1 = bad) of two policies on the same prompts, in the same order."""
    if len(candidate) != len(baseline):
        raise ValueError(
            f"paired outcomes differ in length ({len(candidate)} vs {len(baseline)}): not the same prompts"
        )
    n = len(candidate)
    worse = sum(1 for c, b in zip(candidate, baseline) if c and not b)
    better = sum(1 for c, b in zip(candidate, baseline) if b and not c)
    m = worse + better
    lo_p, hi_p = _clopper_pearson(worse, m, alpha) if m else (0.5, 0.5)
    # the increase is (worse - better) / n = m (2 pi - 1) / n given the m discordant prompts, pi the share of them
    # that went against the candidate
    ci = (m * (2 * lo_p - 1) / n, m * (2 * hi_p - 1) / n) if n else (0.0, 0.0)
    # the symmetric part of the discordance is what sampling alone gives; the surplus is the increase itself
    noise = 2 * min(worse, better) / n if n else 0.0
    return PairedIncrease(
        n=n,
        rate=sum(candidate) / n if n else 0.0,
        base_rate=sum(baseline) / n if n else 0.0,
        worse=worse,
        better=better,
        increase=(worse - better) / n if n else 0.0,
        p_value=binom_tail(worse, m) if m else 1.0,
        ci=ci,
        ci_level=1 - 2 * alpha,
        needed_prompts=needed_prompts(noise, tolerance, alpha, power),
        detectable_increase=detectable_increase(n, noise, alpha, power),
    )
