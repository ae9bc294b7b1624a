"""Annotator reliability: how often each annotator's labels are right, estimated from the labels alone, and the
weight their comparisons get in training.

Model: one-coin Dawid–Skene (Dawid & Skene 1979; the "one-coin" form of Raykar et al. 2010 / Zhang et al. 2014).
Every *item* is a binary question with a hidden true answer y — for a pair of responses (completion, i < j): "is
response i the better one?"; for a thumb on one response: "is it good?" — and annotator a gives the true answer with
probability p_a (its accuracy), the other one otherwise, independently of the other annotators. EM alternates the
posterior of each item's answer given everyone's labels (E) with each annotator's accuracy given those posteriors
(M, a MAP estimate under a Beta prior of mean `prior_accuracy`, so a handful of labels cannot make an accuracy 0 or 1).

What is identifiable, and what is not:
- Accuracy is identified only by *items labelled by two or more annotators* (overlap): from one label per item,
  "annotator a is right 80 % of the time" and "50 %" explain the data equally well. An annotator with no overlap
  keeps the prior accuracy and weight 1 (`identified` is False): alignd does not punish what it cannot measure.
- Overlap identifies accuracies up to one global swap (everyone p ↔ 1 − p, every answer flipped). EM starts from
  the majority vote and the prior says annotators are better than chance, which picks the side where most labels
  are right — the premise of learning from feedback at all.
- A reference labeller (`reference`: e.g. a reward model's verdict on each pair) makes single-labelled items count:
  it is one more annotator whose own accuracy EM estimates. It is only as good as its independence: a model trained
  on these very labels agrees with them more than the truth does, so alignd's cycle uses overlap alone.
- "Right" means agreeing with the pool's consensus. Style disagreement is counted as noise: a minority with a
  different taste, not just a noisy one, loses weight too (README "Whose values?"). Measured on the demo's pool
  (bench/reliability.py): "detail" (likes length) against balanced, brevity and strict (dislike it) was rated 0.23,
  a contrarian, on 700 shared labels. This is why the cycle does not apply the weights by default
  (`reward.annotator_weights`); the estimates are shown either way (/admin/stats, the ops page, the report).

Weight (what training multiplies an annotator's comparisons by): the clipped log-odds of its accuracy, relative to
the prior's, w = clip(logit p, 0, logit cap) / logit(prior_accuracy) — the optimal vote weight of a naive-Bayes
aggregate (Nitzan & Paroush 1982), 1 for a typical annotator, 0 for a spammer (p ≈ 0.5) and for a contrarian
(p < 0.5: its labels carry signal, but flipping a person's votes is not a step a service should take silently).

    python -c "from training.reliability import estimate; help(estimate)"
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from training.data import Comparison, Rated

REFERENCE = "__reference__"  # the name of the optional reference labeller inside EM


@dataclass
class ReliabilityConfig:
    prior_accuracy: float = 0.75  # Beta prior mean: AlpacaFarm measured ~25 % human disagreement on pairs
    prior_strength: float = 4.0  # pseudo-labels behind the prior: 20 overlap labels outweigh it 5 to 1
    weight_cap_accuracy: float = 0.95  # accuracy beyond which the weight stops growing: 30 lucky labels must not
    #                                    make one person count as much as ten
    max_iter: int = 200  # EM converges in tens of iterations on pools of a few thousand labels
    tol: float = 1e-7  # largest change of an accuracy between two iterations that counts as converged

    def __post_init__(self) -> None:
        if not 0.5 < self.prior_accuracy < 1:
            raise ValueError(f"prior_accuracy {self.prior_accuracy} must be in (0.5, 1): annotators beat chance")
        if self.prior_strength <= 0:
            raise ValueError(f"prior_strength {self.prior_strength} must be positive")
        if not self.prior_accuracy <= self.weight_cap_accuracy < 1:
            raise ValueError(f"weight_cap_accuracy {self.weight_cap_accuracy} must be in [prior_accuracy, 1)")
        if self.max_iter < 1 or self.tol <= 0:
            raise ValueError(f"max_iter {self.max_iter} must be >= 1 and tol {self.tol} > 0")


@dataclass(frozen=True)
class Label:
    item: str  # the binary question (see the module docstring)
    annotator: str
    value: bool  # the annotator's answer


@dataclass
class Reliability:
    annotator: str
    accuracy: float  # estimated probability that a label of this annotator is right
    labels: int  # labels of this annotator (all items)
    overlap: int  # of which on items someone else labelled too: what the estimate rests on
    weight: float  # multiplier of this annotator's comparisons in training
    identified: bool  # False: no overlap, accuracy is the prior's

    def to_dict(self) -> dict[str, float | int | bool | str]:
        return {
            "annotator": self.annotator,
            "accuracy": round(self.accuracy, 4),
            "labels": self.labels,
            "overlap": self.overlap,
            "weight": round(self.weight, 4),
            "identified": self.identified,
        }


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def weight_of(accuracy: float, cfg: ReliabilityConfig) -> float:
    """Clipped log-odds of `accuracy`, 1 at the prior accuracy, 0 at or below chance."""
    return min(max(_logit(accuracy), 0.0), _logit(cfg.weight_cap_accuracy)) / _logit(cfg.prior_accuracy)


def labels_from(comparisons: Iterable[Comparison], rated: Iterable[Rated] = ()) -> list[Label]:
    """Binary labels from derived feedback (store/comparisons.py meta: completion id and choice indices).

    A "pref" pair becomes "is the lower-indexed choice better?"; a thumb "is this choice good?". Ties, both-bad and
    items without a completion id (imported data) give no label. One label per (item, annotator): a ranking and a
    thumbs pair on the same two choices are the same question asked once.
    """
    out: dict[tuple[str, str], Label] = {}
    for c in comparisons:
        cid, i, j = c.meta.get("completion_id"), c.meta.get("chosen_index"), c.meta.get("rejected_index")
        if c.label != "pref" or not c.annotator or cid is None or i is None or j is None:
            continue
        item = f"{cid}:pair:{min(i, j)}:{max(i, j)}"
        out.setdefault((item, c.annotator), Label(item, c.annotator, i < j))
    for r in rated:
        cid, i = r.meta.get("completion_id"), r.meta.get("index")
        if not r.annotator or cid is None or i is None:
            continue
        item = f"{cid}:thumb:{i}"
        out.setdefault((item, r.annotator), Label(item, r.annotator, bool(r.good)))
    return list(out.values())


def _em(items: np.ndarray, who: np.ndarray, sign: np.ndarray, n_items: int, n_ann: int, cfg: ReliabilityConfig):
    """One-coin EM over label arrays (item index, annotator index, +1/-1 answer); returns accuracies (n_ann,).

    Its error is larger than a binomial's on the same labels, since the answers are estimated too: measured on
    pools of 8 with 3 labels per item, up to ±0.08 at 1000 items and ±0.03 at 5000 (tests/training/).
    """
    votes = np.bincount(items, weights=sign, minlength=n_items)  # (I,) majority vote as the starting posterior
    post = np.clip(0.5 + 0.25 * np.sign(votes), 0.25, 0.75)  # (I,) P(answer = yes); ties start undecided
    acc = np.full(n_ann, cfg.prior_accuracy)
    s, m = cfg.prior_strength, cfg.prior_accuracy
    n = np.bincount(who, minlength=n_ann)
    for _ in range(cfg.max_iter):
        # M: expected number of right labels per annotator, with the Beta prior's pseudo-counts
        right = np.where(sign > 0, post[items], 1 - post[items])  # (L,)
        new = (np.bincount(who, weights=right, minlength=n_ann) + s * m) / (n + s)
        pi = float(np.clip(post.mean(), 0.01, 0.99))
        # E: log-odds of "yes" per item = prior log-odds + each label's evidence ±logit(p_a)
        lo = np.log(new / (1 - new))
        evidence = np.bincount(items, weights=sign * lo[who], minlength=n_items)
        post = 1 / (1 + np.exp(-(math.log(pi / (1 - pi)) + evidence)))
        done = np.max(np.abs(new - acc)) < cfg.tol
        acc = new
        if done:
            break
    return acc


def estimate(
    labels: Sequence[Label], cfg: ReliabilityConfig | None = None, reference: dict[str, bool] | None = None
) -> dict[str, Reliability]:
    """Each annotator's accuracy and weight from `labels` (and an optional reference labeller's answers by item)."""
    cfg = cfg or ReliabilityConfig()
    all_labels = list(labels) + [Label(item, REFERENCE, v) for item, v in (reference or {}).items()]
    per_item: dict[str, set[str]] = {}
    for lab in all_labels:
        per_item.setdefault(lab.item, set()).add(lab.annotator)
    shared = [lab for lab in all_labels if len(per_item[lab.item]) > 1]
    names = sorted({lab.annotator for lab in labels})
    counts = {a: 0 for a in names}
    for lab in labels:
        counts[lab.annotator] += 1
    overlap = {a: 0 for a in names}
    acc: dict[str, float] = {}
    if shared:
        item_ix = {it: k for k, it in enumerate(sorted({lab.item for lab in shared}))}
        ann_ix = {a: k for k, a in enumerate(sorted({lab.annotator for lab in shared}))}
        est = _em(
            np.array([item_ix[lab.item] for lab in shared]),
            np.array([ann_ix[lab.annotator] for lab in shared]),
            np.array([1.0 if lab.value else -1.0 for lab in shared]),
            len(item_ix),
            len(ann_ix),
            cfg,
        )
        acc = {a: float(est[k]) for a, k in ann_ix.items()}
        for lab in shared:
            if lab.annotator in overlap:
                overlap[lab.annotator] += 1
    out = {}
    for a in names:
        p = acc.get(a, cfg.prior_accuracy)
        out[a] = Reliability(a, p, counts[a], overlap[a], weight_of(p, cfg) if a in acc else 1.0, a in acc)
    return out


def table_dict(table: dict[str, Reliability]) -> dict[str, dict]:
    """The table as JSON-ready dicts by annotator, lowest weight first (what provenance and /admin/stats show)."""
    rows = sorted(table.values(), key=lambda r: (r.weight, r.annotator))
    return {r.annotator: {k: v for k, v in r.to_dict().items() if k != "annotator"} for r in rows}


def from_dicts(
    comparisons: Iterable[Comparison | dict], rated: Iterable[Rated | dict] = (), cfg: ReliabilityConfig | None = None
) -> dict[str, Reliability]:
    """`estimate` over derived feedback as store/comparisons.py returns it (records; plain dicts are read too)."""
    return estimate(
        labels_from([Comparison.from_dict(c) for c in comparisons], [Rated.from_dict(x) for x in rated]), cfg
    )


def weigh(items: Iterable[Comparison | Rated], table: dict[str, Reliability]) -> None:
    """Set each item's `weight` to its annotator's (1 for annotators not in `table`: imported data, bootstrap)."""
    for x in items:
        rel = table.get(x.annotator or "")
        x.weight = rel.weight if rel is not None else 1.0
