"""Two costs inside the engine's decode step, each against its baseline in the same run; prints JSON.

- `sampler`: drawing one token per row from (rows x vocab) probabilities. Baseline: the exponential race
  (argmax p / E, one random number per vocabulary entry, as the engine did before; torch.multinomial costs the same);
  against `Engine._sample` (inverse CDF, one random number per row). At one thread, microseconds per call.
- `thread_pools`: the same 16-row bf16 decode loop at the SmolLM2-135M shape, each case in a fresh process (libgomp's
  thread pools are per process): on the main thread; on a second thread after the main thread ran torch with the same
  thread count (a second OpenMP pool: what the API had, its main thread loading the model); on a second thread while
  the main thread stays on one thread (what `apply_torch_threads(serving=True)` now does). Milliseconds per step,
  median of `--reps` loops of `--steps` steps.

    python bench/engine_step.py [--threads 2] [--reps 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CASES = ("main_thread", "beside_main_pool", "main_on_one_thread")


def exponential_race(probs: torch.Tensor) -> torch.Tensor:
    """The engine's sampler before: exact, but one exponential draw per vocabulary entry."""
    return (probs / torch.empty_like(probs).exponential_().clamp_(min=1e-20)).argmax(-1)


def sampler(reps: int = 200) -> list[dict]:
    from service.engine import Engine, SamplingParams

    torch.set_num_threads(1)
    out = []
    for vocab in (8192, 49152):
        for rows in (1, 16):
            logits = torch.randn(rows, vocab)
            batch = SimpleNamespace(
                next_logits=logits, seqs=[SimpleNamespace(params=SamplingParams(), generator=None)] * rows
            )
            race = lambda x=logits: exponential_race(torch.softmax(x, -1))  # noqa: E731
            engine = lambda b=batch: Engine._sample(None, b)  # noqa: E731
            timed = {}
            for name, fn in (("exponential_race_us", race), ("engine_sample_us", engine)):
                fn()
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                timed[name] = round((time.perf_counter() - t0) / reps * 1e6)
            out.append({"vocab": vocab, "rows": rows, **timed})
    return out


def decode_loop_ms(steps: int) -> float:
    """Milliseconds per step of a 16-row decode (one token each) on the 135 M shape in bf16, 60-token prompts."""
    from transformers import DynamicCache

    from bench.shapes import build_shape

    model, _ = build_shape("smollm2-135m")
    model.to(torch.bfloat16).eval()
    rows, width = 16, 60
    ids = torch.randint(0, 1000, (rows, width))
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[:8, :10] = 0  # left padding, as the engine's merged batches have
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        pos, token = pos[:, -1:] + 1, torch.randint(0, 1000, (rows, 1))
        t0 = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones((rows, 1))], 1)
            model(
                input_ids=token,
                attention_mask=mask.bool()[:, None, None, :],  # the engine's ready 4D mask
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
            pos = pos + 1
    return (time.perf_counter() - t0) / steps * 1000


def one_case(case: str, threads: int, reps: int, steps: int) -> list[float]:
    """Runs in its own process: `reps` decode loops in the arrangement `case` names."""
    if case == "main_on_one_thread":
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(threads)
        torch.ones(1 << 16).add_(1).sum()  # a parallel op: the main thread's OpenMP pool exists from here on
    if case == "main_thread":
        return [decode_loop_ms(steps) for _ in range(reps)]
    got: list[float] = []

    def body() -> None:
        torch.set_num_threads(threads)  # the engine thread's own count (Engine(threads=…))
        got.extend(decode_loop_ms(steps) for _ in range(reps))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return got


def thread_pools(threads: int, reps: int, steps: int) -> dict:
    out = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--threads", str(threads), "--reps", str(reps)]
        ms = json.loads(subprocess.run([*cmd, "--steps", str(steps)], capture_output=True, check=True).stdout)
        out[case] = {"ms_per_step_median": round(statistics.median(ms), 1), "ms_per_step": [round(x, 1) for x in ms]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # the child process of one thread_pools case
    args = ap.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case, args.threads, args.reps, args.steps)))
        return
    result = {
        "torch": torch.__version__,
        "sampler_at_one_thread": sampler(),
        "thread_pools": {"threads": args.threads, **thread_pools(args.threads, args.reps, args.steps)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
