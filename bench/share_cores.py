"""How a training worker and the API share the cores at the demo's load: a DPO-shaped training loop of the built-in
model (its own process, as the Celery training worker is) beside `alignd serve` answering chat requests at the
demo's rate (4 per second, at most 8 in flight, `alignd demo`'s defaults), once per design and round, designs taking
turns. Prints JSON: per design the machine's idle fraction from /proc/stat while the trainer runs, its optimiser
steps per second, and the serving latency p50/p99 (one request = one streamed chat answer), next to the API serving
alone in the same round.

Designs (the API's engine runs on one thread in all of them, `ALIGND_TORCH_THREADS=1`, as `alignd up` gives it):
  split         the trainer on half the cores (one thread), nice 0: `ALIGND_SHARE_CORES=split`
  all           the trainer on every core, nice 0
  nice          the trainer on every core at nice 19: the kernel hands the API's threads a core when they want one
  nice-passive  `nice`, and the trainer's OpenMP threads sleep at once at a barrier (OMP_WAIT_POLICY=PASSIVE)
  follow-active every core, half while the API's engine marks itself busy (core/threads.py follow_load), nice 19
  follow        `follow-active` with OMP_WAIT_POLICY=PASSIVE: `ALIGND_SHARE_CORES=follow`, the default

    python bench/share_cores.py                                # every design, 2 rounds of 20 s each
    python bench/share_cores.py --designs split,follow --rounds 3 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignd.machine import cpu_times  # noqa: E402
from bench.serve import SERVER_PIDS, alignd_serve, default_policy, pct, prompts, tree_cpu_seconds  # noqa: E402
from core.threads import TRAIN_NICE, api_busy, busy_dir, follow_load, set_thread_torch_threads  # noqa: E402

DESIGNS = {  # name: (trainer threads while the API idles, while it serves, nice, OMP_WAIT_POLICY, follow the engine)
    "split": (1, 1, 0, None, False),
    "all": (2, 2, 0, None, False),
    "nice": (2, 2, TRAIN_NICE, None, False),
    "nice-passive": (2, 2, TRAIN_NICE, "PASSIVE", False),
    "follow-active": (2, 1, TRAIN_NICE, None, True),
    "follow": (2, 1, TRAIN_NICE, "PASSIVE", True),
}


def trainer(args) -> None:
    """The training loop (child process): DPO's shape at the built-in size — 16 pairs of 64-token sequences through
    the policy with gradients and through a frozen reference without, AdamW — for `--seconds` after a warm-up; with
    `--home`, on `follow_load` over the marks of that home's API processes, as a training cycle runs."""
    import contextlib

    import torch

    from training.model import build_model, tiny_config

    cores = os.cpu_count() or 1
    wide = cores if args.threads == 2 else max(1, cores // 2)
    narrow = cores if args.busy_threads == 2 else max(1, cores // 2)
    torch.manual_seed(0)
    policy = build_model(tiny_config("gpt2", 1024)).train()
    ref = build_model(tiny_config("gpt2", 1024)).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    ids = torch.randint(3, 1024, (32, 64))  # 16 pairs of short chat turns
    set_thread_torch_threads(wide)
    follow = follow_load(api_busy(busy_dir(Path(args.home))), wide, narrow) if args.home else contextlib.nullcontext()

    def step() -> int:
        with torch.no_grad():
            ref_logits = ref(input_ids=ids).logits
        logits = policy(input_ids=ids).logits
        loss = (logits.log_softmax(-1) - ref_logits.log_softmax(-1)).pow(2).mean()
        loss.backward()
        opt.step()  # follow_load's hook picks this step's thread count first
        opt.zero_grad()
        return torch.get_num_threads()

    with follow:
        step()
        print("ready", flush=True)  # the load starts now
        start, cpu0, steps, wide_steps = time.time(), time.process_time(), 0, 0
        while time.time() - start < args.seconds:
            wide_steps += step() == wide
            steps += 1
        end, cpu = time.time(), time.process_time() - cpu0
    print(json.dumps({"start": start, "end": end, "cpu_s": cpu, "steps": steps, "wide_steps": wide_steps}), flush=True)


def cpu_sampler(samples: list, stop: threading.Event) -> None:
    """(time, the whole machine's CPU time so far: alignd/machine.py) every 0.25 s."""
    while not stop.is_set():
        samples.append((time.time(), cpu_times()))
        stop.wait(0.25)


def idle_fraction(samples: list, start: float, end: float) -> float:
    inside = [s for s in samples if start <= s[0] <= end and s[1] is not None]
    if len(inside) < 2:
        return float("nan")
    busy = (inside[-1][1] - inside[0][1]).fraction
    return float("nan") if busy is None else 1 - busy


async def open_load(
    url: str, texts: list[str], seconds: float, rate: float, concurrency: int, max_tokens: int, seed: int
) -> list[tuple[float, float]]:
    """Chat requests arriving at `rate` per second (Poisson) for `seconds`, at most `concurrency` in flight: (start
    time, latency) of each."""
    import httpx

    from bench.serve import KEY, chat_body

    rng, sem, out = random.Random(seed), asyncio.Semaphore(concurrency), []

    async def one(http: httpx.AsyncClient, text: str) -> None:
        async with sem:
            t0 = time.time()
            async with http.stream("POST", "/v1/chat/completions", json=chat_body(text, max_tokens)) as resp:
                async for _ in resp.aiter_lines():
                    pass
            out.append((t0, time.time() - t0))

    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        tasks, end, i = [], time.time() + seconds, 0
        while time.time() < end:
            tasks.append(asyncio.create_task(one(http, texts[i % len(texts)])))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return out


def server_home(pid: int) -> str:
    """The ALIGND_HOME of the `alignd serve` process `pid` (where its engine marks itself busy)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(v.split(b"=", 1)[1].decode() for v in env if v.startswith(b"ALIGND_HOME="))


def run_phase(args, url: str, home: str, texts: list[str], design: str | None, samples: list, seed: int) -> dict:
    """One design (None: serving alone) for `--seconds`: the trainer's window, idle fraction, steps/s, latencies."""
    child = None
    if design is not None:
        threads, busy_threads, nice, wait_policy, flag = DESIGNS[design]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        if wait_policy:
            env["OMP_WAIT_POLICY"] = wait_policy
        cmd = [
            sys.executable,
            __file__,
            "--trainer",
            "--threads",
            str(threads),
            "--busy-threads",
            str(busy_threads),
            "--seconds",
            str(args.seconds),
        ] + (["--home", home] if flag else [])
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, preexec_fn=lambda: os.nice(nice))
        child.stdout.readline()  # imports, model build, first step: "ready"
    server_cpu0, client_cpu0 = tree_cpu_seconds(SERVER_PIDS[url]), time.process_time()
    load = asyncio.run(open_load(url, texts, args.seconds, args.rate, args.concurrency, args.max_tokens, seed))
    ours = tree_cpu_seconds(SERVER_PIDS[url]) - server_cpu0 + time.process_time() - client_cpu0
    result: dict = {"design": design or "alone"}
    window = (load[0][0], load[-1][0] + load[-1][1]) if load else (0.0, 0.0)
    if child is not None:
        out, _ = child.communicate()
        t = json.loads(out.decode().strip().splitlines()[-1])
        window = (t["start"], t["end"])
        ours += t["cpu_s"]
        result.update(
            steps_per_s=round(t["steps"] / (t["end"] - t["start"]), 2),
            wide_step_share=round(t["wide_steps"] / max(t["steps"], 1), 2),
        )
    lat = [d for s, d in load if window[0] <= s <= window[1]]
    # the machine's idle share, and the share of its cores that the trainer, the API and the load generator used (other
    # work on a shared machine takes the rest)
    result.update(
        idle=round(idle_fraction(samples, *window), 3),
        ours=round(ours / ((os.cpu_count() or 1) * (window[1] - window[0])), 3),
        requests=len(lat),
        p50_s=round(pct(lat, 50), 3),
        p99_s=round(pct(lat, 99), 3),
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--designs", default=",".join(DESIGNS), help=f"comma-separated, of {', '.join(DESIGNS)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0, help="training (and load) per design and round")
    ap.add_argument("--rate", type=float, default=4.0, help="chat requests per second (alignd demo's default)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (alignd demo's default)")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens per answer (the untrained model never stops)")
    ap.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--busy-threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--home", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trainer:
        return trainer(args)

    designs = args.designs.split(",")
    for d in designs:
        if d not in DESIGNS:
            raise SystemExit(f"unknown design {d!r}; choose from {', '.join(DESIGNS)}")
    texts = prompts(64)
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=cpu_sampler, args=(samples, stop), daemon=True)
    sampler.start()
    rounds = []
    with alignd_serve(default_policy(), args.max_tokens, 1, "auto", "auto") as url:
        home = server_home(SERVER_PIDS[url])
        asyncio.run(open_load(url, texts, 3, args.rate, args.concurrency, args.max_tokens, 99))  # warm-up
        for r in range(args.rounds):
            order = [None, *designs] if r % 2 == 0 else [*reversed(designs), None]
            rounds.append([run_phase(args, url, home, texts, d, samples, seed=r) for d in order])
    stop.set()
    summary = {}
    for d in ["alone", *designs]:
        rows = [p for rnd in rounds for p in rnd if p["design"] == d]
        summary[d] = {k: round(statistics.median(p[k] for p in rows), 3) for k in rows[0] if k != "design"}
    print(
        json.dumps(
            {
                "cores": os.cpu_count(),
                "seconds": args.seconds,
                "rate": args.rate,
                "median_of_rounds": summary,
                "rounds": rounds,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
