"""Hot-swap benchmark: time from publish to every API process serving the new version, and request latency during
a swap against steady state, under concurrent chat load. Prints JSON.

Two `alignd serve` processes follow one (embedded) Redis; client threads send bounded loops of chat requests to
both on 127.0.0.1. A model of the built-in assistant's size (GPT-2, 4 layers, 192 wide, 1,024-token BPE; random
weights: only the compute matters here) is published as version 1, then `--swaps` more versions are published one
after another. Targets (README): converge in under 1 s, zero failed requests, p99 during a swap within 1.5x of
steady state.

    python bench/swap.py                       # ~1 minute on 2 cores
    python bench/swap.py --clients 4 --swaps 5 --steady-seconds 15
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import wait_ready  # noqa: E402
from core.config import Settings  # noqa: E402
from core.redis_server import EmbeddedRedis, free_port  # noqa: E402
from store import registry  # noqa: E402
from store.client import connect  # noqa: E402
from training.checkpoint import write_checkpoint  # noqa: E402
from workers.publish import checkpoint_path, publish_version  # noqa: E402

ADMIN = "sk-bench-admin"
USER = "sk-bench-user"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def build(seed: int, tokenizer):
    from training.model import build_model, tiny_config

    cfg = tiny_config(
        "gpt2",
        len(tokenizer),
        context=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return build_model(cfg, seed).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=3, help="concurrent client threads per API process")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per response")
    ap.add_argument("--steady-seconds", type=float, default=10.0, help="steady-state measurement before swapping")
    ap.add_argument("--swaps", type=int, default=3, help="versions published one after another")
    ap.add_argument("--settle-seconds", type=float, default=4.0, help="pause between swaps")
    ap.add_argument("--poll-seconds", type=float, default=1.0, help="ALIGND_POLL_SECONDS of the API processes")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from training import world
    from training.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="alignd-bench-swap-"))
    server = EmbeddedRedis(tmp / "redis")
    url = server.start()
    settings = Settings(home=tmp, redis_url=url, api_keys=f"{USER}:bench", admin_key=ADMIN, device="cpu")
    r = connect(url)
    tok = train_tokenizer(world.corpus_texts(1500), 1024)
    models = {v: build(v, tok) for v in range(1, args.swaps + 2)}

    def meta(version: int) -> dict:
        return {"source": "sft" if version == 1 else "ppo", "parent": version - 1 if version > 1 else None}

    publish_version(r, settings, lambda d: (models[1].save_pretrained(d), tok.save_pretrained(d)), meta(1))
    # Later versions are written now, as a training worker (another process, often another machine) writes its
    # checkpoint before publishing; the swap below is the registry step of publish_version: register + CAS.
    for version in range(2, args.swaps + 2):
        assert registry.allocate_version(r) == version
        model = models[version]
        write_checkpoint(
            lambda d, model=model: (model.save_pretrained(d), tok.save_pretrained(d)),
            checkpoint_path(settings, version),
            {**meta(version), "version": version},
        )

    def publish(version: int) -> None:
        stored = settings.stored_path(checkpoint_path(settings, version))
        registry.add_version(r, version, {**meta(version), "path": stored})
        registry.set_current(r, version, expected=version - 1)

    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env.update(
        {
            "ALIGND_HOME": str(tmp),
            "ALIGND_REDIS_URL": url,
            "ALIGND_API_KEYS": f"{USER}:bench",
            "ALIGND_ADMIN_KEY": ADMIN,
            "ALIGND_DEVICE": "cpu",
            "ALIGND_TORCH_THREADS": "1",
            "ALIGND_POLL_SECONDS": str(args.poll_seconds),
            "ALIGND_CHAT_RATE_PER_MINUTE": "1000000",
            "PYTHONPATH": str(ROOT),
        }
    )
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "alignd.cli", "serve", "--port", str(p)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for p in ports
    ]
    records: list[tuple[float, float, int, int]] = []  # (start, end, status, version)
    stop = threading.Event()
    try:
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        for base, proc in zip(bases, procs):
            wait_ready(base, proc)

        def client(base: str, i: int) -> None:
            body = {
                "messages": [{"role": "user", "content": "Say a number."}],
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
            }
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {USER}"}, timeout=60) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        resp = c.post("/v1/chat/completions", json=body)
                        status, version = resp.status_code, int(resp.headers.get("X-Policy-Version", 0))
                    except httpx.HTTPError:
                        status, version = 0, 0
                    records.append((t0, time.monotonic(), status, version))

        threads = [
            threading.Thread(target=client, args=(b, i), daemon=True) for b in bases for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        time.sleep(2.0)  # warm-up: first requests pay allocator and thread-pool start-up
        steady_from = time.monotonic()
        time.sleep(args.steady_seconds)
        steady_to = time.monotonic()
        pollers = [httpx.Client(base_url=b, timeout=10) for b in bases]
        swaps = []
        for version in range(2, args.swaps + 2):
            publish(version)
            t_pub = time.monotonic()  # the compare-and-set made it current
            seen: dict[int, float] = {}
            while len(seen) < len(bases) and time.monotonic() - t_pub < 60:
                for i, p in enumerate(pollers):
                    if i not in seen and p.get("/readyz").json().get("policy_version") == version:
                        seen[i] = time.monotonic() - t_pub
                time.sleep(0.005)
            swaps.append(
                {
                    "version": version,
                    "t_pub": t_pub,
                    "each_s": [seen.get(i) for i in range(len(bases))],
                    "converged_s": max(seen.values()) if len(seen) == len(bases) else None,
                }
            )
            time.sleep(args.settle_seconds)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    finally:
        stop.set()
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def latencies(lo: float, hi: float) -> list[float]:
        return [e - s for s, e, status, _ in records if status == 200 and s >= lo and s < hi]

    steady = latencies(steady_from, steady_to)
    # "during a swap": requests that started between the publish and 1 s after the last process switched
    during = [
        x
        for s in swaps
        if s["converged_s"] is not None
        for x in latencies(s["t_pub"], s["t_pub"] + s["converged_s"] + 1.0)
    ]
    failed = sum(1 for _, _, status, _ in records if status != 200)
    converge = [s["converged_s"] for s in swaps if s["converged_s"] is not None]
    p99_steady, p99_swap = percentile(steady, 0.99), percentile(during, 0.99)
    out = {
        "bench": "swap",
        "api_processes": len(ports),
        "clients_per_process": args.clients,
        "max_tokens": args.max_tokens,
        "model": {
            "arch": "gpt2",
            "layers": 4,
            "width": 192,
            "vocab": len(tok),
            "parameters": sum(p.numel() for p in models[1].parameters()),
        },
        "poll_seconds": args.poll_seconds,
        "requests": len(records),
        "failed_requests": failed,
        "converge_s": {
            "each_swap": converge,
            "max": max(converge) if converge else None,
            "per_process": [s["each_s"] for s in swaps],
        },
        "steady": {"n": len(steady), "p50_s": percentile(steady, 0.5), "p99_s": p99_steady},
        "during_swap": {"n": len(during), "p50_s": percentile(during, 0.5), "p99_s": p99_swap},
        "p99_ratio": p99_swap / p99_steady if p99_steady and p99_swap else None,
    }
    out["targets"] = {
        "converge_under_1s": bool(converge) and max(converge) < 1.0,
        "zero_failed": failed == 0,
        "p99_within_1.5x": out["p99_ratio"] is not None and out["p99_ratio"] <= 1.5,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
