"""Training benchmark: reward model and PPO on the built-in world, from noisy simulated feedback. Prints JSON.

1. The SFT policy answers world prompts four times (greedy + 3 samples); an annotator of a pool with 25% label noise
   (AlpacaFarm's figure) ranks the four → 6 comparisons per prompt. Held-out prompts are ranked the same way and
   every pair is judged by the noise-free oracle.
2. The reward model (initialised from the SFT trunk) trains on the noisy comparisons; we report its held-out accuracy
   against the noise-free oracle (all decided pairs, and those where exactly one response is correct) and its
   throughput (pairs/s).
3. PPO optimises the SFT policy against it for a fixed budget; we report samples/s, the share of PPO time spent
   generating, and the policy before/after: checker scores, over-caution, harmful compliance, KL, length, and the
   oracle win rate of after vs before on held-out evaluation prompts (95% bootstrap CI).

    python bench/train.py --model ~/.alignd/checkpoints/v1            # any built-in-world SFT checkpoint
    python bench/train.py --model PATH --prompts 2000 --rm-seconds 120 --ppo-steps 40
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import EVAL_KEYS, user, world_responses  # noqa: E402
from training import world  # noqa: E402
from training.annotators import ORACLE, annotator_pool, oracle_win_rate  # noqa: E402
from training.data import Comparison  # noqa: E402
from training.evaluate import EvalConfig, evaluate_policy  # noqa: E402
from training.model import load_causal_lm  # noqa: E402
from training.ppo import PPOConfig, PPOTrainer, reward_model_fn  # noqa: E402
from training.reward import (  # noqa: E402
    RewardConfig,
    load_reward_model,
    save_reward_model,
    score,
    train_reward_model,
)
from training.world import check  # noqa: E402


def comparisons_from_policy(
    model, tok, n_prompts: int, k: int, seed: int, noise: float
) -> tuple[list[Comparison], list]:
    """`k` responses per world prompt (one greedy, the rest sampled), each set ranked by an annotator of a noisy
    pool and turned into its k(k-1)/2 pairs (one group); also returns every (task, x, y) pair for oracle scoring.

    Ranking several responses (InstructGPT, Ouyang et al. 2022, K=4..9) gets 6 pairs from 4 generations, and the
    greedy response is the one the evaluation and the served policy give. Two samples of the small SFT policy
    alone are identical or both wrong in ~75 % of pairs (both_bad or tie labels, no ordering signal).
    """
    rng = random.Random(seed)  # draws the tasks, then the annotators' noise: one stream, so a seed gives the same data
    tasks, prompts, columns = world_responses(model, tok, n_prompts, k, seed, rng)
    pool = annotator_pool("balanced,brevity,detail,strict", noise=noise)
    out, triples = [], []
    for i, t in enumerate(tasks):
        responses = [col[i] for col in columns]
        judge = pool[i % len(pool)]
        order = [responses[j] for j in judge.rank(t, responses, rng)]  # best first, adjacent swaps = noise
        for a in range(k):
            for b in range(a + 1, k):
                x, y = order[a], order[b]
                out.append(
                    Comparison(
                        prompt=prompts[i],
                        chosen=x,
                        rejected=y,
                        label="tie" if x == y else "pref",
                        group=f"{seed}-{i}",
                        annotator=judge.name,
                    )
                )
                triples.append((t, x, y))
    return out, triples


def oracle_accuracy(rm, tok, triples) -> dict:
    """Share of pairs the reward model orders as the noise-free oracle does (oracle ties skipped), overall and on
    the pairs where exactly one response is correct (the rest differ only by length or by how wrong they are)."""
    decided = [
        (t, x, y, ORACLE.utility(t, x) > ORACLE.utility(t, y))
        for t, x, y in triples
        if abs(ORACLE.utility(t, x) - ORACLE.utility(t, y)) > 1e-6
    ]
    if not decided:
        return {"oracle_accuracy": None, "n": 0}
    sx = score(rm, tok, [user(t.prompt) for t, *_ in decided], [x for _, x, _, _ in decided])
    sy = score(rm, tok, [user(t.prompt) for t, *_ in decided], [y for _, _, y, _ in decided])
    hits = [bool((float(p) > float(q)) == better) for p, q, (*_, better) in zip(sx, sy, decided)]
    split = [(check(t, x) >= 0.5) != (check(t, y) >= 0.5) for t, x, y, _ in decided]
    hits_split = [h for h, s in zip(hits, split) if s]
    return {
        "oracle_accuracy": sum(hits) / len(hits),
        "n": len(hits),
        "oracle_accuracy_correct_vs_wrong": sum(hits_split) / len(hits_split) if hits_split else None,
        "n_correct_vs_wrong": len(hits_split),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="SFT policy folder (e.g. ALIGND_HOME/checkpoints/v1)")
    ap.add_argument("--prompts", type=int, default=1000, help="labelled prompts; each gives k(k-1)/2 comparisons")
    ap.add_argument("--responses", type=int, default=4, help="k: responses ranked per prompt (1 greedy + k-1 sampled)")
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--rm-seconds", type=float, default=60.0)
    ap.add_argument("--reward-model", type=Path, help="use this trained reward model instead of training one")
    ap.add_argument("--save-reward-model", type=Path, help="write the trained reward model here")
    ap.add_argument("--ppo-steps", type=int, default=30)
    ap.add_argument(
        "--ppo-seconds",
        type=float,
        default=None,
        help="stop PPO after this many seconds (as a cycle's update.seconds), even before --ppo-steps",
    )
    ap.add_argument("--ppo-epochs", type=int, default=PPOConfig.ppo_epochs)
    ap.add_argument("--ppo-lr", type=float, default=PPOConfig.lr)
    ap.add_argument("--kl-coef", type=float, default=PPOConfig.kl_coef)
    ap.add_argument(
        "--samples-per-prompt",
        type=int,
        default=PPOConfig.samples_per_prompt,
        help="PPO rollouts per prompt (k > 1: leave-one-out baseline)",
    )
    ap.add_argument("--eval-per-family", type=int, default=20)
    ap.add_argument(
        "--eval-sampled",
        action="store_true",
        help="evaluate sampled responses (temperature 1, the API default) instead of greedy ones",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {
        "model": str(args.model),
        "prompts": args.prompts,
        "responses": args.responses,
        "noise": args.noise,
        "threads": args.threads,
    }

    policy, tok = load_causal_lm(args.model)
    t0 = time.perf_counter()
    _, heldout = comparisons_from_policy(policy, tok, 100, args.responses, args.seed + 10_000, 0.0)
    if args.reward_model is not None:
        rm, _ = load_reward_model(args.reward_model)
        out["reward_model"] = {"path": str(args.reward_model), **oracle_accuracy(rm, tok, heldout)}
    else:
        train_pairs, _ = comparisons_from_policy(policy, tok, args.prompts, args.responses, args.seed, args.noise)
        out["labelling_seconds"] = time.perf_counter() - t0
        rm_cfg = RewardConfig(max_seconds=args.rm_seconds, seed=args.seed)
        rm, rm_metrics = train_reward_model(rm_cfg, train_pairs, [], base=args.model, tokenizer=tok)
        out["reward_model"] = {
            **{k: rm_metrics[k] for k in ("heldout_accuracy", "pairs_per_s", "seconds", "epochs", "n_train")},
            **oracle_accuracy(rm, tok, heldout),
        }
        if args.save_reward_model is not None:
            save_reward_model(rm, tok, args.save_reward_model)

    ref, _ = load_causal_lm(args.model)
    eval_cfg = EvalConfig(n_per_family=args.eval_per_family, greedy=not args.eval_sampled)
    before = evaluate_policy(policy, tok, eval_cfg, reference=ref, return_samples=True)
    cfg = PPOConfig(
        max_new_tokens=48,
        lr=args.ppo_lr,
        kl_coef=args.kl_coef,
        seed=args.seed,
        samples_per_prompt=args.samples_per_prompt,
        ppo_epochs=args.ppo_epochs,
    )
    trainer = PPOTrainer(cfg, policy, ref, reward_model_fn(rm, tok), tok)
    rng = random.Random(args.seed)

    def sampler(n: int, r: random.Random) -> list[list[dict[str, str]]]:
        return [user(world.sample_task(r).prompt) for _ in range(n)]

    t0 = time.perf_counter()
    steps = trainer.train(sampler, args.ppo_steps, max_seconds=args.ppo_seconds)
    ppo_s = time.perf_counter() - t0
    gen_s = sum(s["generate_seconds"] for s in steps)
    out["ppo"] = {
        "steps": len(steps),
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "epochs": cfg.ppo_epochs,
        "seconds": ppo_s,
        "samples_per_prompt": cfg.samples_per_prompt,
        "eval": "sampled" if args.eval_sampled else "greedy",
        "samples_per_s": len(steps) * cfg.batch_size / ppo_s,
        "generate_share": gen_s / ppo_s,
        "reward_first": steps[0]["reward"],
        "reward_last": sum(s["reward"] for s in steps[-3:]) / 3,
        "kl_last": steps[-1]["kl"],
    }
    after = evaluate_policy(trainer.policy, tok, eval_cfg, reference=ref, return_samples=True)
    tasks = [t for t, _ in before["samples"]]
    win = oracle_win_rate(tasks, [r for _, r in after["samples"]], [r for _, r in before["samples"]], rng=rng)
    keys = EVAL_KEYS
    out["before"] = {k: before[k] for k in keys}
    out["after"] = {k: after[k] for k in keys}
    out["oracle_win_rate_after_vs_before"] = win
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
