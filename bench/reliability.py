"""Annotator-reliability benchmark: does weighting each comparison by its annotator's reliability help the reward
model, and does it hurt when every annotator is honest? Prints JSON.

1. An SFT policy (bootstrapped for --sft-seconds, or --model) answers world prompts k = 4 times; one annotator of
   the pool ranks each set (k(k-1)/2 pairs), and a share --overlap of the sets is ranked by a second annotator too,
   as the simulation re-serves overlap items (alignd/simulate.py).
2. Two pools: "honest" (balanced, brevity, detail, strict at 25 % noise: alignd demo's) and "planted" (the same
   plus a spammer at 50 % noise and a contrarian at 80 %, so a third of the labels are bad).
3. training/reliability.py estimates every annotator from the overlap; the reward model (from the SFT trunk, the
   same seed and budget) trains with weights off and on; reported: each annotator's estimate against its true
   accuracy, and the reward model's held-out accuracy against the noise-free oracle (baseline in the same run).

    python bench/reliability.py --sft-seconds 180 --prompts 800 --save-sft /tmp/sft
    python bench/reliability.py --model PATH       # an SFT folder saved by an earlier run (--save-sft)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import sft_start, world_responses  # noqa: E402
from bench.train import oracle_accuracy  # noqa: E402
from training.annotators import annotator_pool  # noqa: E402
from training.data import Comparison  # noqa: E402
from training.reliability import estimate, labels_from, table_dict, weigh  # noqa: E402
from training.reward import LIVE_FEEDBACK_LR, RewardConfig, train_reward_model  # noqa: E402

POOLS = {
    "honest": "balanced,brevity,detail,strict",
    "planted": "balanced,brevity,detail,strict,balanced@0.5,balanced@0.8",
}


def ranked(tasks, prompts, columns, pool, overlap: float, rng: random.Random) -> list[Comparison]:
    """Each response set ranked by one annotator (and by a second one for a share `overlap`), as pairs whose meta
    carries the set's id and the response indices (what training/reliability.py reads)."""
    out = []
    for i, t in enumerate(tasks):
        responses = [col[i] for col in columns]
        first = pool[i % len(pool)]
        judges = [first] + ([rng.choice([a for a in pool if a is not first])] if rng.random() < overlap else [])
        for judge in judges:
            order = judge.rank(t, responses, rng)
            for a in range(len(order)):
                for b in range(a + 1, len(order)):
                    x, y = responses[order[a]], responses[order[b]]
                    meta = {"completion_id": f"set-{i}", "chosen_index": order[a], "rejected_index": order[b]}
                    label = "tie" if x == y else "pref"
                    out.append(Comparison(prompts[i], x, y, label, group=f"{i}", annotator=judge.name, meta=meta))
    return out


def truth(pool) -> dict[str, float]:
    """Each annotator's label noise. On a ranking, noise swaps *adjacent* items, so a pair's accuracy is not
    1 - noise and balanced@0.8 scrambles ranks rather than reversing them (measured: estimated 0.58, not 0.2); the
    clean spammer/contrarian check is tests/training/test_reliability.py, on pair labels."""
    return {a.name: a.noise for a in pool}


def run_pool(name: str, spec: str, data, heldout_triples, model, tok, args) -> dict:
    pool = annotator_pool(spec, noise=args.noise)
    comparisons = ranked(*data, pool, args.overlap, random.Random(args.seed))
    table = estimate(labels_from(comparisons))
    out = {"pool": spec, "comparisons": len(comparisons), "noise": truth(pool), "estimate": table_dict(table)}
    # a fixed amount of work (epochs), not seconds: under CPU contention a seconds budget gives the two arms unequal
    # numbers of steps (measured: 13.8 vs 2.0 pairs/s in one run)
    cfg = RewardConfig(lr=LIVE_FEEDBACK_LR, epochs=args.rm_epochs, max_seconds=args.rm_seconds, heldout_fraction=0.0)
    for weights in (False, True):
        items = [Comparison(**{**c.to_dict(), "weight": 1.0}) for c in comparisons]
        if weights:
            weigh(items, table)
        t0 = time.perf_counter()
        rm, metrics = train_reward_model(cfg, items, base=model, tokenizer=tok)
        out[f"weights_{'on' if weights else 'off'}"] = {
            **oracle_accuracy(rm, tok, heldout_triples),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "pairs_per_s": round(metrics["pairs_per_s"], 1),
        }
    print(json.dumps({name: out}), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="SFT policy folder (default: bootstrap one for --sft-seconds)")
    ap.add_argument("--sft-seconds", type=float, default=180.0)
    ap.add_argument("--save-sft", type=Path, help="write the bootstrapped SFT policy here for reruns")
    ap.add_argument("--prompts", type=int, default=800, help="labelled prompts (4 responses ranked each)")
    ap.add_argument("--heldout-prompts", type=int, default=200, help="prompts whose pairs the oracle judges")
    ap.add_argument("--overlap", type=float, default=0.3, help="share of sets ranked by a second annotator")
    ap.add_argument("--noise", type=float, default=0.25, help="honest annotators' label noise")
    ap.add_argument("--rm-epochs", type=int, default=1, help="reward-model passes over the comparisons (both arms)")
    ap.add_argument("--rm-seconds", type=float, default=None, help="optional wall-clock cap (unequal under load)")
    ap.add_argument("--pools", default="honest,planted")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, tok = sft_start(args)
    model.eval()
    rng = random.Random(args.seed)
    data = world_responses(model, tok, args.prompts, 4, args.seed, rng)
    h_tasks, _, h_cols = world_responses(model, tok, args.heldout_prompts, 4, args.seed + 1000, rng)
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    heldout = [(t, h_cols[a][i], h_cols[b][i]) for i, t in enumerate(h_tasks) for a, b in pairs]
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "note": "2 shared CPU cores under contention from other jobs; oracle accuracy is on held-out prompts",
    }
    for name in args.pools.split(","):
        result[name] = run_pool(name, POOLS[name], data, heldout, model, tok, args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
