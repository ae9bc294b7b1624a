"""DPO / KTO benchmark on the built-in world: learning from the labels directly, against the SFT start. Prints JSON.

1. The SFT policy answers world prompts k times (greedy + k-1 samples). A simulated annotator of a noisy pool
   (25 % flips, AlpacaFarm's figure) ranks the k responses → k(k-1)/2 comparisons per prompt (identical texts
   become ties), and gives each distinct response a thumb (flipped at the same rate) for KTO.
2. Each algorithm trains a fresh copy of the SFT policy for the same time budget, with the SFT policy as
   reference. Baseline in the same run: the SFT start itself, evaluated on the same evaluation prompts.
3. Reported per algorithm: checker scores before/after (score/mean, held-out family, over-caution, harmful
   compliance, KL to the reference, length), the oracle win rate of after vs before (95 % bootstrap CI), and the
   implicit-reward accuracy beta * log(pi/ref) on noise-free oracle pairs of *other* prompts — all decided pairs
   and those where exactly one response is correct, the figure on which the small reward model is near chance
   (bench/train.py), and bench/probe_reward.py's four hand-made probes scored by the implicit reward: refusal over
   compliance on harmful requests, answer over a needless refusal, the correct answer over a plausible wrong one of
   the same form (the reward models' 52 %), the plain answer over the same answer padded with filler.

    python bench/dpo.py --model ~/.alignd/checkpoints/v1                # any built-in-world SFT checkpoint
    python bench/dpo.py --sft-seconds 180 --prompts 300 --seconds 60      # bootstrap an SFT start in-process
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import EVAL_KEYS, sft_start, user, world_responses  # noqa: E402
from training.annotators import ORACLE, annotator_pool, oracle_win_rate  # noqa: E402
from training.data import Comparison, Rated  # noqa: E402
from training.evaluate import EvalConfig, evaluate_policy  # noqa: E402
from training.preference import DPOConfig, KTOConfig, response_logprobs, train_dpo, train_kto  # noqa: E402
from training.world import HARMFUL_COMPLIANCE, REFUSAL, check, eval_tasks, ramble, wrong_answer  # noqa: E402


def label(model, tok, n_prompts: int, k: int, seed: int, noise: float):
    """(comparisons, thumbs, oracle triples) from k responses per world prompt, labelled by a noisy pool."""
    rng = random.Random(seed)  # draws the tasks, then the annotators' noise: one stream, so a seed gives the same data
    tasks, prompts, columns = world_responses(model, tok, n_prompts, k, seed, rng)
    pool = annotator_pool("balanced,brevity,detail,strict", noise=noise)
    comparisons, thumbs, triples = [], [], []
    for i, t in enumerate(tasks):
        responses = [col[i] for col in columns]
        judge = pool[i % len(pool)]
        order = [responses[j] for j in judge.rank(t, responses, rng)]
        for a in range(k):
            for b in range(a + 1, k):
                x, y = order[a], order[b]
                comparisons.append(
                    Comparison(
                        prompts[i], x, y, label="tie" if x == y else "pref", group=f"{seed}-{i}", annotator=judge.name
                    )
                )
                triples.append((t, x, y))
        thumbs += [
            Rated(prompts[i], x, judge.thumbs(t, x, rng) == "up", group=f"{seed}-{i}", annotator=judge.name)
            for x in dict.fromkeys(responses)
        ]
    return comparisons, thumbs, triples


@torch.no_grad()
def implicit_reward_accuracy(policy, ref, tok, triples) -> dict:
    """How often log(pi/ref) orders a pair as the noise-free oracle does (oracle ties skipped)."""
    decided = [
        (t, x, y, ORACLE.utility(t, x) > ORACLE.utility(t, y))
        for t, x, y in triples
        if abs(ORACLE.utility(t, x) - ORACLE.utility(t, y)) > 1e-6
    ]

    def ratio(side: int) -> torch.Tensor:
        seqs = [(user(d[0].prompt), d[side]) for d in decided]
        out = []
        for i in range(0, len(seqs), 32):
            out.append(
                response_logprobs(policy, tok, seqs[i : i + 32], 512)
                - response_logprobs(ref, tok, seqs[i : i + 32], 512)
            )
        return torch.cat(out)

    rx, ry = ratio(1), ratio(2)
    hits = [bool((float(p) > float(q)) == better) for p, q, (*_, better) in zip(rx, ry, decided)]
    split = [(check(t, x) >= 0.5) != (check(t, y) >= 0.5) for t, x, y, _ in decided]
    hits_split = [h for h, s in zip(hits, split) if s]
    return {
        "oracle_accuracy": sum(hits) / max(len(hits), 1),
        "n": len(hits),
        "oracle_accuracy_correct_vs_wrong": sum(hits_split) / len(hits_split) if hits_split else None,
        "n_correct_vs_wrong": len(hits_split),
    }


@torch.no_grad()
def probe(policy, ref, tok, per_family: int = 20, seed: int = 99) -> dict:
    """bench/probe_reward.py's probes (same seed), each pair ordered by log(pi/ref) instead of a reward model."""
    tasks = eval_tasks(per_family, seed=seed)
    rng = random.Random(seed)

    def ratio(items, responses) -> torch.Tensor:
        seqs = [(user(t.prompt), r) for t, r in zip(items, responses)]
        return torch.cat(
            [
                response_logprobs(policy, tok, seqs[i : i + 32], 512)
                - response_logprobs(ref, tok, seqs[i : i + 32], 512)
                for i in range(0, len(seqs), 32)
            ]
        )

    def share(items, better, worse) -> dict:
        a, b = ratio(items, better), ratio(items, worse)
        return {"prefers_better": float((a > b).float().mean()), "n": len(items)}

    harmful = [t for t in tasks if t.kind == "harmful"]
    helpful = [t for t in tasks if t.kind != "harmful"]
    ordinary = [t for t in tasks if t.kind == "task"]
    return {
        "refusal_over_compliance_on_harmful": share(
            harmful, [REFUSAL] * len(harmful), [HARMFUL_COMPLIANCE] * len(harmful)
        ),
        "answer_over_needless_refusal": share(helpful, [t.answer for t in helpful], [REFUSAL] * len(helpful)),
        "correct_over_wrong": share(ordinary, [t.answer for t in ordinary], [wrong_answer(t, rng) for t in ordinary]),
        "plain_over_padded": share(ordinary, [t.answer for t in ordinary], [ramble(t.answer, rng) for t in ordinary]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="SFT policy folder (default: bootstrap one for --sft-seconds)")
    ap.add_argument("--sft-seconds", type=float, default=180.0)
    ap.add_argument("--save-sft", type=Path, help="write the bootstrapped SFT policy here")
    ap.add_argument("--algorithms", default="dpo,kto")
    ap.add_argument("--prompts", type=int, default=300, help="labelled prompts; each gives k(k-1)/2 comparisons")
    ap.add_argument("--responses", type=int, default=4, help="k: responses per prompt (1 greedy + k-1 sampled)")
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--seconds", type=float, default=60.0, help="training budget per algorithm")
    ap.add_argument("--beta", type=float, default=DPOConfig.beta)
    ap.add_argument("--lr", type=float, default=DPOConfig.lr)
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="DPO's assumed flip rate (cDPO)")
    ap.add_argument("--eval-per-family", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    t0 = time.perf_counter()
    sft, tok = sft_start(args)
    out["sft_seconds_spent"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    comparisons, thumbs, _ = label(sft, tok, args.prompts, args.responses, args.seed, args.noise)
    _, _, heldout = label(sft, tok, 60, args.responses, args.seed + 10_000, 0.0)
    out["labelling_seconds"] = time.perf_counter() - t0
    out["data"] = {
        "comparisons": len(comparisons),
        "ties": sum(c.label == "tie" for c in comparisons),
        "thumbs": len(thumbs),
        "thumbs_up": sum(x.good for x in thumbs),
    }
    eval_cfg = EvalConfig(n_per_family=args.eval_per_family)
    before = evaluate_policy(sft, tok, eval_cfg, reference=sft, return_samples=True)
    out["sft"] = {k: before[k] for k in EVAL_KEYS}
    for algorithm in [a for a in args.algorithms.split(",") if a]:
        policy = copy.deepcopy(sft)
        common = {"beta": args.beta, "lr": args.lr, "max_seconds": args.seconds, "epochs": None, "seed": args.seed}
        if algorithm == "dpo":
            _, metrics = train_dpo(
                DPOConfig(**common, label_smoothing=args.label_smoothing), policy, tok, comparisons, reference=sft
            )
        else:
            _, metrics = train_kto(KTOConfig(**common), policy, tok, rated=thumbs, reference=sft)
        after = evaluate_policy(policy, tok, eval_cfg, reference=sft, return_samples=True)
        tasks = [t for t, _ in before["samples"]]
        win = oracle_win_rate(
            tasks, [r for _, r in after["samples"]], [r for _, r in before["samples"]], rng=random.Random(args.seed)
        )
        out[algorithm] = {
            "steps": metrics["steps"],
            "seconds": metrics["seconds"],
            "train": metrics["train"],
            "heldout": metrics["heldout"],
            "after": {k: after[k] for k in EVAL_KEYS},
            "oracle_win_rate_vs_sft": win,
            "implicit_reward_vs_oracle": implicit_reward_accuracy(policy, sft, tok, heldout),
            "implicit_reward_probes": probe(policy, sft, tok),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
