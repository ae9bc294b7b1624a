"""Two training stages at once: the built-in model's shape trained twice, one run after the other on every core (the
baseline), then both at once on two threads with core/threads.py `beside` (one core each, the survivor widening),
in the same process and run. Prints JSON: seconds and the machine's CPU busy fraction (alignd/machine.py) of each.

Why: a cycle retrains the reward model and, for DPO/KTO, trains the policy, and neither needs the other's result
(`update.reward_beside`). A model of ~2 M parameters gives torch's intra-op threads little to split, so one stage
alone leaves much of a second core idle; two stages at once fill it.

    python bench/beside.py                       # ~1 minute on 2 cores
    python bench/beside.py --steps 120 --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# as `alignd up` starts its training worker (alignd/commands/run.py): OpenMP threads sleep while they wait, so the
# busy fraction counts work, not spinning
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignd.machine import cpu_times  # noqa: E402
from core.threads import beside, set_thread_torch_threads  # noqa: E402
from training.bootstrap import BootstrapConfig  # noqa: E402
from training.model import build_model, tiny_config  # noqa: E402


def train(steps: int, batch: int, length: int, seed: int) -> int:
    """`steps` AdamW steps of a fresh built-in-shaped model on random tokens (the cost, not the learning, matters)."""
    b = BootstrapConfig()
    model = build_model(tiny_config(b.arch, b.vocab_size, n_layer=b.n_layer, d_model=b.d_model, n_head=b.n_head))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(3, b.vocab_size, (batch, length), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return steps


def measured(run) -> dict:
    t0, c0 = time.perf_counter(), cpu_times()
    run()
    seconds, c1 = time.perf_counter() - t0, cpu_times()
    busy = (c1 - c0).fraction if c0 and c1 else None
    return {"seconds": round(seconds, 2), "cpu_busy": None if busy is None else round(busy, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80, help="optimiser steps of each stage")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step (DPO's 16 pairs)")
    ap.add_argument("--length", type=int, default=40, help="tokens per sequence (the built-in world's answers)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    set_thread_torch_threads(cores)
    stage = lambda seed: lambda: train(args.steps, args.batch, args.length, seed)  # noqa: E731
    stage(0)()  # warm-up: allocator, OpenMP pool
    one_after_other = measured(lambda: (stage(1)(), stage(2)()))
    at_once = measured(lambda: beside(stage(1), stage(2)))
    print(
        json.dumps(
            {
                "cores": cores,
                "steps": args.steps,
                "batch": args.batch,
                "length": args.length,
                "one_after_the_other": one_after_other,
                "beside": at_once,
                "speedup": round(one_after_other["seconds"] / at_once["seconds"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
