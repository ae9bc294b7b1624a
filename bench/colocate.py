"""Training and serving on the same cores: a training step of the model in this process beside `alignd serve` (its
own process) under 16 streaming clients, each first alone, then together, in the same run. Prints JSON.

Why: each process claims every core unless told otherwise (`ALIGND_TORCH_THREADS`), and two OpenMP pools that each
spin on every core slow each other far more than sharing would suggest; `alignd up` gives the API half the cores
(core/config.py shared_machine_threads) on these figures, and its training worker every core only while the API
idles (bench/share_cores.py).

    python bench/colocate.py --train-threads 2 --server-threads 2   # both claim both cores
    python bench/colocate.py --train-threads 1 --server-threads 1   # half each (`alignd up`)
    python bench/colocate.py --train-threads 2 --server-threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve import alignd_serve, http_clients, prompts  # noqa: E402
from bench.shapes import build_shape  # noqa: E402
from core.threads import set_thread_torch_threads  # noqa: E402
from service.engine import Policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m", help="model shape (bench/shapes.py) served and trained")
    ap.add_argument("--train-threads", type=int, default=2, help="torch threads of the training step")
    ap.add_argument("--server-threads", type=int, default=2, help="ALIGND_TORCH_THREADS of `alignd serve`")
    ap.add_argument("--batch", type=int, default=8, help="training sequences per step (64 tokens each)")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    set_thread_torch_threads(args.train_threads)
    model, tok = build_shape(args.shape)
    served = Policy(1, model, tok, context=1024)
    trained = build_shape(args.shape)[0].train()
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-5)
    ids = torch.randint(3, len(tok), (args.batch, 64))
    texts = prompts(64)

    def train_steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            trained(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - start) / n

    train_steps(1)  # warm-up
    result = {
        "shape": args.shape,
        "train_threads": args.train_threads,
        "server_threads": args.server_threads,
        "train_s_per_step_alone": round(train_steps(4), 2),
    }
    with alignd_serve(served, args.max_tokens, args.server_threads, "auto", "auto") as url:
        asyncio.run(http_clients(url, 1, 1, 8, texts))  # warm-up
        alone = asyncio.run(http_clients(url, 16, 2, args.max_tokens, texts))
        together: dict = {}

        def clients() -> None:
            together.update(asyncio.run(http_clients(url, 16, 4, args.max_tokens, texts)))

        thread = threading.Thread(target=clients)
        thread.start()
        steps, start = 0, time.perf_counter()
        while thread.is_alive():  # train for as long as the clients run
            train_steps(1)
            steps += 1
        thread.join()
        result["train_s_per_step_beside_serving"] = round((time.perf_counter() - start) / steps, 2)
    result["serve_tokens_per_s_alone"] = round(alone["tokens_per_s"], 1)
    result["serve_tokens_per_s_beside_training"] = round(together["tokens_per_s"], 1)
    result["engine_torch_threads"] = together["engine_torch_threads"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
