"""Reward models across cycles: a fresh head each cycle vs a warm start from the previous one, one head vs several.
Prints JSON.

The online cycle retrains its reward model on all feedback so far (workers/cycle.py). This benchmark replays that on
simulated feedback: the SFT policy answers world prompts k times (greedy + samples), an annotator of a noisy pool
ranks them (bench/train.py), and the labelled prompts arrive in `--cycles` equal chunks. For each variant, each
cycle trains on everything so far — from the SFT trunk (`fresh`) or from the previous cycle's model (`warm`,
`reward.warm_start`), with 1 or `--heads` bootstrap heads (`reward.heads`) — for `--epochs` passes (an epoch budget,
not seconds, so a busy machine changes the time, not the work). Reported per cycle: agreement with the noise-free
oracle on held-out pairs (all decided pairs, and those where exactly one response is correct: substance), seconds,
and with several heads their disagreement and whether it is larger on the pairs the model orders wrongly (what an
uncertainty penalty needs).

    python bench/reward_cycles.py --model ALIGND_HOME/checkpoints/v1
    python bench/reward_cycles.py --sft-seconds 120 --save-sft /tmp/sft --prompts 600 --cycles 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import sft_start, user  # noqa: E402
from bench.train import comparisons_from_policy, oracle_accuracy  # noqa: E402
from training.annotators import ORACLE  # noqa: E402
from training.reward import RewardConfig, score_with_spread, train_reward_model  # noqa: E402


def spread_vs_errors(rm, tok, triples) -> dict:
    """Mean head disagreement on held-out pairs the reward model orders as the oracle does, and on those it gets
    wrong: an uncertainty penalty helps only if the second is larger."""
    decided = [(t, x, y) for t, x, y in triples if abs(ORACLE.utility(t, x) - ORACLE.utility(t, y)) > 1e-6]
    prompts = [user(t.prompt) for t, _, _ in decided]
    mx, sx = score_with_spread(rm, tok, prompts, [x for _, x, _ in decided])
    my, sy = score_with_spread(rm, tok, prompts, [y for _, _, y in decided])
    better = torch.tensor([ORACLE.utility(t, x) > ORACLE.utility(t, y) for t, x, y in decided])
    right = (mx > my) == better
    pair_spread = (sx + sy) / 2
    mean = lambda v: float(v.mean()) if len(v) else None  # noqa: E731
    return {"spread_right": mean(pair_spread[right]), "spread_wrong": mean(pair_spread[~right])}


def run_variant(name: str, chunks, heldout, sft_path, tok, args, heads: int, warm: bool) -> dict:
    rows, previous = [], None
    for c in range(1, len(chunks) + 1):
        data = [x for chunk in chunks[:c] for x in chunk]
        cfg = RewardConfig(epochs=args.epochs, seed=args.seed, heads=heads, warm_start=warm)
        base = previous if warm and previous is not None else sft_path
        t0 = time.perf_counter()
        rm, metrics = train_reward_model(cfg, data, [], base=base, tokenizer=tok)
        row = {
            "cycle": c,
            "pairs": len(data),
            "seconds": round(time.perf_counter() - t0, 1),
            "heldout_accuracy_noisy": metrics["heldout_accuracy"],
            "head_disagreement": metrics["head_disagreement"],
            **oracle_accuracy(rm, tok, heldout),
        }
        if heads > 1:
            row |= spread_vs_errors(rm, tok, heldout)
        rows.append(row)
        print(json.dumps({"variant": name, **row}), file=sys.stderr, flush=True)
        previous = rm
    return {"variant": name, "heads": heads, "warm_start": warm, "cycles": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="SFT policy folder (default: bootstrap one for --sft-seconds)")
    ap.add_argument("--sft-seconds", type=float, default=120.0)
    ap.add_argument("--save-sft", type=Path, help="write the bootstrapped SFT policy here")
    ap.add_argument("--prompts", type=int, default=600, help="labelled prompts in all, split over the cycles")
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--variants", default="fresh,warm,heads,heads-warm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sft, tok = sft_start(args)
    out: dict = {"prompts": args.prompts, "cycles": args.cycles, "epochs": args.epochs, "noise": args.noise}
    pairs, _ = comparisons_from_policy(sft, tok, args.prompts, args.responses, args.seed, args.noise)
    _, heldout = comparisons_from_policy(sft, tok, 100, args.responses, args.seed + 10_000, 0.0)
    per = len(pairs) // args.cycles  # pairs of one prompt are contiguous: cut on group boundaries
    bounds = [0]
    for c in range(1, args.cycles):
        i = c * per
        while i < len(pairs) and pairs[i].group == pairs[i - 1].group:
            i += 1
        bounds.append(i)
    bounds.append(len(pairs))
    chunks = [pairs[a:b] for a, b in zip(bounds, bounds[1:])]
    specs = {"fresh": (1, False), "warm": (1, True), "heads": (args.heads, False), "heads-warm": (args.heads, True)}
    out["variants"] = [
        run_variant(v, chunks, heldout, sft, tok, args, *specs[v]) for v in args.variants.split(",") if v
    ]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
