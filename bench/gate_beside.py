"""The gate's three evaluations (candidate, current policy, SFT reference) one after the other on every core (the
baseline), then two at a time on two threads (core/threads.py `two_at_once`, as workers/gate_stage.py runs them with
`gate.beside`), in the same process and run, on the cycle's own evaluation set (CycleConfig().eval). Prints JSON:
seconds and the machine's CPU busy fraction (alignd/machine.py) of each, and whether both gave the same samples.

Why: an evaluation is batched sampled generation, and a ~2 M-parameter model's decoding step is mostly Python on
one thread, so one evaluation alone leaves much of a second core idle.

    python bench/gate_beside.py --model DIR      # DIR: a built-in-world policy (alignd bootstrap's v1), ~1 minute
    python bench/gate_beside.py                  # random weights of the built-in shape: every answer runs to the
                                                 # token limit, the costliest case
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

# as `alignd up` starts its training worker (alignd/commands/run.py): OpenMP threads sleep while they wait, so the
# busy fraction counts work, not spinning
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignd.machine import cpu_times  # noqa: E402
from core.threads import set_thread_torch_threads, two_at_once  # noqa: E402
from training.bootstrap import BootstrapConfig  # noqa: E402
from training.evaluate import evaluate_policy  # noqa: E402
from training.model import build_model, load_causal_lm, tiny_config  # noqa: E402
from training.tokenizer import train_tokenizer  # noqa: E402
from training.world import corpus_texts  # noqa: E402
from workers.cycle_config import CycleConfig  # noqa: E402


def policies(model_dir: str | None):
    """Three policies and a tokenizer: the folder's model three times (perturbed copies for the candidate and the
    current policy), or three random models of the built-in shape."""
    if model_dir:
        reference, tok = load_causal_lm(model_dir)
        copies = [copy.deepcopy(reference) for _ in range(2)]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in copies:
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 1e-3)
        return [*copies, reference], tok
    b = BootstrapConfig()
    tok = train_tokenizer(corpus_texts(b.corpus_size, seed=b.seed), b.vocab_size)
    shape = tiny_config(
        b.arch, len(tok), n_layer=b.n_layer, d_model=b.d_model, n_head=b.n_head, pad_token_id=tok.pad_token_id
    )
    return [build_model(shape, seed).eval() for seed in (1, 2, 3)], tok


def measured(run) -> tuple[dict, object]:
    t0, c0 = time.perf_counter(), cpu_times()
    out = run()
    seconds, c1 = time.perf_counter() - t0, cpu_times()
    busy = (c1 - c0).fraction if c0 and c1 else None
    return {"seconds": round(seconds, 2), "cpu_busy": None if busy is None else round(busy, 3)}, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a built-in-world policy folder (default: random weights of the built-in shape)")
    ap.add_argument("--seed", type=int, default=1, help="the evaluation set and sampling seed")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    set_thread_torch_threads(cores)
    (candidate, parent, reference), tok = policies(args.model)
    ecfg = replace(CycleConfig().eval, seed=args.seed)

    def evaluate(model, tokenizer):
        with torch.no_grad():
            m = evaluate_policy(model, tokenizer, ecfg, reference=reference, return_outcomes=True)
        return {"n": m["n"], "score": m["score/mean"], "outcomes": m["outcomes"]}

    models = {"candidate": candidate, "parent": parent, "reference": reference}
    evaluate(reference, tok)  # warm-up: allocator, OpenMP pool
    one, first = measured(lambda: {name: evaluate(m, tok) for name, m in models.items()})
    tasks = {name: (lambda m=m, t=copy.deepcopy(tok): evaluate(m, t)) for name, m in models.items()}
    two, second = measured(lambda: two_at_once(tasks))
    print(
        json.dumps(
            {
                "cores": cores,
                "model": args.model or "random, built-in shape",
                "prompts": first["candidate"]["n"],
                "one_after_the_other": one,
                "two_at_once": two,
                "speedup": round(one["seconds"] / two["seconds"], 3),
                "same_results": first == second,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
