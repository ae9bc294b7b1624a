"""Online DPO's judged pairs beside people's labels, one update on the built-in world: does weight w help? JSON.

1. The SFT policy answers world prompts k times; a noisy annotator pool ranks them (bench/dpo.py `label`): the
   people's comparisons. A reward model trains on them (the cycle's learning rate, LIVE_FEEDBACK_LR).
2. The SFT policy answers `--judged-prompts` other world prompts (the users' prompts in a cycle) `--samples` times;
   the reward model judges them and the best over the worst, when separated by `--min-margin`, are the judged pairs
   (training/onpolicy.py). Reported: how often the judge's order agrees with the world's checker where the checker
   tells the two answers apart (the judge's accuracy on exactly the pairs DPO will learn from).
3. For each weight in `--weights` (0 = people's pairs alone, the baseline in the same run) a fresh copy of the SFT
   policy trains DPO for `--steps` optimiser steps (a step budget, not seconds: the machine may be shared), then
   the checker scores on the same evaluation prompts and the oracle win rate against the SFT start.

    python bench/onpolicy.py --model ~/.alignd/checkpoints/v1 --weights 0,0.5,1
    python bench/onpolicy.py --sft-seconds 180 --save-sft /tmp/sft      # bootstrap an SFT start in-process
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

from bench.common import EVAL_KEYS, sft_start, user  # noqa: E402
from bench.dpo import label  # noqa: E402
from training.annotators import oracle_win_rate  # noqa: E402
from training.evaluate import EvalConfig, evaluate_policy  # noqa: E402
from training.onpolicy import OnPolicyConfig, judged_comparisons, sample_judged, summary  # noqa: E402
from training.ppo import reward_model_fn  # noqa: E402
from training.preference import DPOConfig, train_dpo  # noqa: E402
from training.reward import LIVE_FEEDBACK_LR, RewardConfig, train_reward_model  # noqa: E402
from training.world import check, sample_task  # noqa: E402


def judge_agreement(pairs, tasks_by_prompt) -> dict:
    """Share of judged pairs whose chosen answer the checker scores higher, among those it scores differently."""
    decided = []
    for c in pairs:
        t = tasks_by_prompt[c.prompt[-1]["content"]]
        a, b = check(t, c.chosen), check(t, c.rejected)
        if a != b:
            decided.append(a > b)
    return {"agrees_with_checker": sum(decided) / len(decided) if decided else None, "n_decided": len(decided)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="SFT policy folder (default: bootstrap one for --sft-seconds)")
    ap.add_argument("--sft-seconds", type=float, default=180.0)
    ap.add_argument("--save-sft", type=Path)
    ap.add_argument("--prompts", type=int, default=150, help="people-labelled prompts (k responses each)")
    ap.add_argument("--responses", type=int, default=2, help="k: responses per labelled prompt, as a demo user")
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--reward-seconds", type=float, default=50.0, help="the cycle's reward.max_seconds")
    ap.add_argument("--judged-prompts", type=int, default=150)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--min-margin", type=float, default=0.5)
    ap.add_argument("--weights", default="0,0.5,1")
    ap.add_argument("--steps", type=int, default=60, help="DPO optimiser steps per weight")
    ap.add_argument("--eval-per-family", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    t0 = time.perf_counter()
    sft, tok = sft_start(args)
    comparisons, _, _ = label(sft, tok, args.prompts, args.responses, args.seed, args.noise)
    rm, rm_metrics = train_reward_model(
        RewardConfig(lr=LIVE_FEEDBACK_LR, max_seconds=args.reward_seconds, seed=args.seed),
        comparisons,
        base=sft,
        tokenizer=tok,
    )
    out["people"] = {"comparisons": len(comparisons), "reward_heldout_accuracy": rm_metrics.get("heldout_accuracy")}
    rng = random.Random(args.seed + 1)
    tasks = [sample_task(rng) for _ in range(args.judged_prompts)]  # the held-out family stays out, as for users
    by_prompt = {t.prompt: t for t in tasks}
    cfg = OnPolicyConfig(
        prompts=len(tasks), samples=args.samples, min_margin=args.min_margin, weight=1.0, seed=args.seed
    )
    judged = sample_judged(sft, tok, [user(t.prompt) for t in tasks], reward_model_fn(rm, tok), cfg)
    del rm
    pairs = judged_comparisons(judged, cfg.min_margin, 1.0)
    out["judged"] = summary(judged, pairs) | judge_agreement(pairs, by_prompt)
    out["judged"]["all_prompts"] = judge_agreement(judged_comparisons(judged, 0.0, 1.0), by_prompt)
    out["setup_seconds"] = time.perf_counter() - t0
    eval_cfg = EvalConfig(n_per_family=args.eval_per_family)
    before = evaluate_policy(sft, tok, eval_cfg, reference=sft, return_samples=True)
    out["sft"] = {k: before[k] for k in EVAL_KEYS}
    budget = {"max_steps": args.steps, "epochs": None, "max_seconds": None, "seed": args.seed}
    for w in [float(x) for x in args.weights.split(",") if x]:
        policy = copy.deepcopy(sft)
        extra = [copy.copy(c) for c in pairs] if w > 0 else []
        for c in extra:
            c.weight = w
        _, metrics = train_dpo(DPOConfig(**budget), policy, tok, comparisons, reference=sft, train_only=extra)
        after = evaluate_policy(policy, tok, eval_cfg, reference=sft, return_samples=True)
        win = oracle_win_rate(
            [t for t, _ in before["samples"]],
            [r for _, r in after["samples"]],
            [r for _, r in before["samples"]],
            rng=random.Random(args.seed),
        )
        out[f"weight={w}"] = {
            "judged_pairs": len(extra),
            "steps": metrics["steps"],
            "heldout_accuracy": (metrics["heldout"] or {}).get("accuracy"),
            "after": {k: after[k] for k in EVAL_KEYS},
            "oracle_win_rate_vs_sft": win,
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
