"""How evaluation figures are read: what a version's figures were measured on, and a KL estimate's noise.

`evaluate_policy` (training/evaluate.py) records `decoding` ("greedy" or "sampled") and `prompt_set` (the seed that
drew its `n` prompts) beside its figures. A version's figures come from several evaluations — the bootstrap's greedy
set, each gate's fresh sampled set, the report's own re-scoring — and differ between them by the prompts and the
decoding more than by chance, so every place that shows a figure says which one it shows. Pure Python:
`alignd versions` imports it without torch.
"""

from __future__ import annotations

from typing import Any


def measured_on(metrics: dict[str, Any]) -> str:
    """What `evaluate_policy` metrics were measured on, in words: "greedy, 260 prompts (set 1234)"; metrics
    recorded without it say "unrecorded"."""
    decoding, n, prompt_set = metrics.get("decoding"), metrics.get("n"), metrics.get("prompt_set")
    if decoding is None:
        return "unrecorded"
    how = "greedy" if decoding == "greedy" else "sampled at temperature 1"
    return f"{how}, {n} prompts (set {prompt_set})"


def shown_kl(estimate: float) -> float:
    """KL is never negative, but its estimate (the mean log-ratio over sampled responses) is, by noise, for a version
    close to its reference: shown as 0 (callers keep the estimate beside it)."""
    return max(0.0, estimate)
