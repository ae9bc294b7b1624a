"""Publish → served through vLLM: time from publishing a LoRA adapter version to every API process serving it, with
`alignd serve --workers 2` over one vLLM server (`ALIGND_ENGINE=vllm`), under light chat load. Prints JSON.

A Llama of the built-in model's size and tokenizer (random weights; `--shape smollm2-135m` for SmolLM2-135M's shape)
is published as the SFT version 1, the server started on it (alignd starts and supervises vLLM from `--vllm-python`),
then `--publishes` adapter versions are published one after another, each a fresh rank-16 LoRA of version 1
(training.lora, non-zero B so that it changes the answers) written and made current by `workers.publish.
publish_version`, as a cycle does. From the moment the registry's compare-and-set returns, /readyz is polled over
fresh connections (the kernel spreads them over the API processes; each answer names its pid) until both processes
report the new version: each process has then checked the adapter's manifest and base digest, registered it in vLLM
as `alignd-vN` and smoke-tested it through vLLM. The target is at most 1 s; the figure is the median publish.

    python bench/vllm_swap.py --vllm-python VENV/bin/python               # ~2 minutes on 2 cores
    python bench/vllm_swap.py --publishes 5 --clients 2 --shape smollm2-135m
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import Settings  # noqa: E402
from core.redis_server import EmbeddedRedis, free_port  # noqa: E402
from store.client import connect  # noqa: E402
from workers.publish import checkpoint_path, publish_version  # noqa: E402

ADMIN = "sk-bench-admin"
USER = "sk-bench-user"


def base_model(shape: str | None):
    """(model, tokenizer): SmolLM2-135M's shape, or a Llama of the built-in model's size and tokenizer."""
    if shape:
        from bench.shapes import build_shape

        return build_shape(shape)
    from bench.serve import default_policy

    policy = default_policy("llama")
    return policy.model, policy.tokenizer


def write_adapter(base, tok, dest: Path, *, base_stored: str, base_digest: str, seed: int) -> None:
    """A rank-16 LoRA of `base` with seeded random A and B (B = 0 would serve the base's answers)."""
    import torch

    from training.lora import LoRAConfig, add_adapter, save_adapter

    peft = add_adapter(copy.deepcopy(base), LoRAConfig(seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    save_adapter(peft, dest, base=base_stored, base_digest=base_digest)
    tok.save_pretrained(dest)


def serving_pids(url: str, version: int, tries: int = 20) -> set[int]:
    """The API processes seen answering /readyz with `version` over `tries` fresh connections."""
    seen = set()
    for _ in range(tries):
        try:
            with httpx.Client(timeout=5) as c:  # a new connection each time: the kernel spreads them over the workers
                body = c.get(f"{url}/readyz").json()
        except httpx.HTTPError:
            continue
        if body.get("policy_version") == version:
            seen.add(body["pid"])
    return seen


def wait_all_serving(url: str, version: int, processes: int, timeout_s: float) -> tuple[dict[int, float], int]:
    """Poll /readyz over fresh connections until `processes` distinct pids report `version`: ({pid: seconds until
    first seen}, polls)."""
    t0 = time.monotonic()
    seen: dict[int, float] = {}
    polls = 0
    with httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        while len(seen) < processes and time.monotonic() - t0 < timeout_s:
            polls += 1
            try:
                body = c.get(f"{url}/readyz").json()
            except httpx.HTTPError:
                continue
            if body.get("policy_version") == version and body["pid"] not in seen:
                seen[body["pid"]] = time.monotonic() - t0
            time.sleep(0.002)
    return seen, polls


def chat_load(url: str, clients: int, max_tokens: int, stop: threading.Event, records: list) -> list[threading.Thread]:
    """`clients` threads sending chat requests one after another until `stop`: (start, end, status, version)."""

    def client() -> None:
        body = {"messages": [{"role": "user", "content": "Say a number."}], "max_tokens": max_tokens}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {USER}"}, timeout=120) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    resp = c.post("/v1/chat/completions", json=body)
                    status, version = resp.status_code, int(resp.headers.get("X-Policy-Version", 0))
                except httpx.HTTPError:
                    status, version = 0, 0
                records.append((t0, time.monotonic(), status, version))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def start_serve(home: Path, redis_url: str, args, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env.update(
        {
            "ALIGND_HOME": str(home),
            "ALIGND_REDIS_URL": redis_url,
            "ALIGND_API_KEYS": f"{USER}:bench",
            "ALIGND_ADMIN_KEY": ADMIN,
            "ALIGND_ENGINE": "vllm",
            "ALIGND_VLLM_PYTHON": args.vllm_python,
            "ALIGND_POLL_SECONDS": str(args.poll_seconds),
            "ALIGND_CHAT_RATE_PER_MINUTE": "1000000",
            "PYTHONPATH": str(ROOT),
        }
    )
    # the device, and the vLLM server's own arguments and CPU settings, as the caller set them
    env.update({k: v for k, v in os.environ.items() if k == "ALIGND_DEVICE" or k.startswith("ALIGND_VLLM_")})
    env.pop("ALIGND_VLLM_URL", None)  # alignd serve starts its own vLLM
    cmd = [sys.executable, "-m", "alignd.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(args.workers)]
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with open(home / "logs" / "serve.log", "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def log_tails(home: Path, lines: int = 30) -> str:
    return "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        for log in sorted((home / "logs").glob("*.log"))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=os.environ.get("ALIGND_VLLM_PYTHON") or os.environ.get("VLLM_PYTHON"))
    ap.add_argument("--shape", help="a model of this shape (bench/shapes.py) instead of the built-in size")
    ap.add_argument("--workers", type=int, default=2, help="API processes (`alignd serve --workers`)")
    ap.add_argument("--publishes", type=int, default=3, help="adapter versions published one after another")
    ap.add_argument("--clients", type=int, default=2, help="chat client threads during the run (0: none)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per chat answer")
    ap.add_argument("--settle-seconds", type=float, default=3.0, help="pause between publishes")
    ap.add_argument("--poll-seconds", type=float, default=1.0, help="ALIGND_POLL_SECONDS of the API processes")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds for the server and vLLM to start")
    args = ap.parse_args()
    # a SIGTERM unwinds like Ctrl-C, so that the servers this benchmark started are stopped with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.vllm_python or not Path(args.vllm_python).exists():
        raise SystemExit("name the python of a venv with vLLM: --vllm-python, ALIGND_VLLM_PYTHON or VLLM_PYTHON")

    import torch

    from training.lora import folder_digest

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="alignd-bench-vllm-swap-"))
    redis = EmbeddedRedis(tmp / "redis")
    redis_url = redis.start()
    settings = Settings(home=tmp, redis_url=redis_url, device="cpu")
    r = connect(redis_url)
    model, tok = base_model(args.shape)
    publish_version(r, settings, lambda d: (model.save_pretrained(d), tok.save_pretrained(d)), {"source": "sft"})
    base_dir = checkpoint_path(settings, 1)
    base_stored, base_digest = settings.stored_path(base_dir), folder_digest(base_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(tmp, redis_url, args, port)
    records: list = []
    stop = threading.Event()
    publishes = []
    try:
        t_start = time.monotonic()
        while len(serving_pids(url, 1)) < args.workers:
            if proc.poll() is not None or time.monotonic() - t_start > args.start_timeout:
                raise RuntimeError(f"alignd serve did not come up\n{log_tails(tmp)}")
            time.sleep(1.0)
        started_s = time.monotonic() - t_start
        threads = chat_load(url, args.clients, args.max_tokens, stop, records)
        time.sleep(2.0)  # the load runs before the first publish
        for i in range(args.publishes):
            seed = i + 1
            t_call = time.monotonic()
            version = publish_version(
                r,
                settings,
                lambda d, seed=seed: write_adapter(
                    model, tok, d, base_stored=base_stored, base_digest=base_digest, seed=seed
                ),
                {"source": "dpo", "parent": 1},
            )
            t_pub = time.monotonic()  # the compare-and-set made it current (and sent the pub/sub hint)
            seen, polls = wait_all_serving(url, version, args.workers, 60.0)
            publishes.append(
                {
                    "version": version,
                    "publish_call_s": round(t_pub - t_call, 3),  # writing the adapter, its manifest, the registry
                    "each_process_s": sorted(round(s, 3) for s in seen.values()),
                    "served_everywhere_s": round(max(seen.values()), 3) if len(seen) == args.workers else None,
                    "polls": polls,
                }
            )
            time.sleep(args.settle_seconds)
        stop.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        stop.set()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        redis.stop()
        logs = log_tails(tmp) if not publishes else ""
        shutil.rmtree(tmp, ignore_errors=True)
        if logs:
            print(logs, file=sys.stderr)

    served = [p["served_everywhere_s"] for p in publishes if p["served_everywhere_s"] is not None]
    latency = {}  # chat latency by the version that answered: the base, then adapters through vLLM's LoRA path
    for version in sorted({v for *_, status, v in records if status == 200}):
        xs = sorted(e - s for s, e, status, v in records if status == 200 and v == version)
        latency[str(version)] = {"n": len(xs), "p50_s": round(xs[len(xs) // 2], 3), "max_s": round(xs[-1], 3)}
    failed = sum(1 for *_, status, _ in records if status != 200)
    out = {
        "bench": "vllm_swap",
        "engine": "vllm",
        "vllm_python": args.vllm_python,
        "api_processes": args.workers,
        "model": args.shape or "built-in size, llama",
        "parameters": sum(p.numel() for p in model.parameters()),
        "adapter": {"rank": 16, "target_modules": "all-linear"},
        "poll_seconds": args.poll_seconds,
        "clients": args.clients,
        "server_ready_s": round(started_s, 1),
        "chat_requests": len(records),
        "failed_requests": failed,
        "latency_by_version": latency,
        "publishes": publishes,
        "served_everywhere_median_s": round(statistics.median(served), 3) if served else None,
        "served_everywhere_max_s": max(served) if served else None,
    }
    out["targets"] = {
        "median_at_most_1s": bool(served) and out["served_everywhere_median_s"] <= 1.0,
        "every_publish_served": len(served) == args.publishes,
        "zero_failed": failed == 0,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
