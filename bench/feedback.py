"""Benchmark: sustained accepted feedback events per second through the real HTTP path (uvicorn → FastAPI → Lua
acceptance script → redis-server with appendfsync always), with 1, 8 and 32 concurrent clients. Prints JSON.

For context the same run measures baselines: one redis-py client doing plain XADDs (what a durable write costs),
the acceptance script called directly with 32 asyncio clients (the store's ceiling without HTTP), and an
authenticated no-op endpoint on the same server (the ceiling of HTTP + FastAPI + auth without the feedback work).
Every level checks that the events in Redis equal the 2xx answers.

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio (httpx costs more CPU than the server on a
2-core machine, and the client shares those cores with the server and Redis).

Run:  python -m bench.feedback --seconds 10 --workers 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio as aredis

from core.config import Settings
from core.redis_server import EmbeddedRedis, free_port
from service.app import create_app
from service.deps import CallerDep
from store import feedback as fb
from store import keys
from store.client import connect
from store.completions import ChoiceRecord, CompletionRecord, save_completion

API_KEY = "bench-key"
N_COMPLETIONS = 2000  # votes spread over many completions, so most are first votes and some are revisions
LEVELS = (1, 8, 32)
WARMUP_S = 1.0


def app_factory():
    """The app for `uvicorn --factory bench.feedback:app_factory` (settings from ALIGND_* variables)."""
    settings = Settings()
    app = create_app(settings, settings.redis_url, engine=None)

    @app.get("/bench/noop")
    async def noop(_: CallerDep) -> dict:  # same auth dependency as the feedback route, no Redis
        return {"ok": True}

    return app


def seed(r: redis.Redis) -> None:
    r.flushdb()
    for i in range(N_COMPLETIONS):
        choices = [ChoiceRecord(index=c, text=f"answer {c}", finish_reason="stop", version=2 - c) for c in range(2)]
        save_completion(
            r,
            CompletionRecord(
                id=f"bench-{i}",
                user="bench",
                version=2,
                choices=choices,
                messages=[{"role": "user", "content": f"question {i}"}],
            ),
        )


def feedback_body(rng: random.Random) -> dict:
    cid = f"bench-{rng.randrange(N_COMPLETIONS)}"
    if rng.random() < 0.5:
        return {
            "completion_id": cid,
            "type": "thumbs",
            "choice": rng.randrange(2),
            "value": rng.choice(["up", "down"]),
        }
    return {"completion_id": cid, "type": "pairwise", "winner": rng.choice([0, 1, "tie", "both_bad"])}


# --- a minimal keep-alive HTTP/1.1 client


async def _connection(port: int, path: str, make_body, deadline: float, latencies: list[float], status: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            body = json.dumps(make_body()).encode() if make_body else b""
            method = b"POST" if make_body else b"GET"
            head = (
                b"%s %s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (method, path.encode(), API_KEY.encode(), len(body))
            )
            start = time.perf_counter()
            writer.write(head + body)
            response_head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in response_head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            code = int(response_head.split(b" ", 2)[1])
            status[code] = status.get(code, 0) + 1
    finally:
        writer.close()


async def _load(port: int, path: str, concurrency: int, seconds: float, post: bool) -> dict:
    rng = random.Random(concurrency)
    latencies: list[float] = []
    status: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    make_body = (lambda: feedback_body(rng)) if post else None
    start = time.perf_counter()
    await asyncio.gather(
        *(_connection(port, path, make_body, deadline, latencies, status) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - start
    latencies.sort()
    ok = sum(n for code, n in status.items() if 200 <= code < 300)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "ok": ok,
        "per_s": round(ok / elapsed, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2) if latencies else None,
        "status": {str(k): v for k, v in sorted(status.items())},
    }


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) used so far by each named process (with its children, except for the client,
    whose children are the server and Redis); empty without psutil."""
    try:
        import psutil
    except ImportError:
        return {}
    out = {}
    for name, pid in pids.items():
        procs = [psutil.Process(pid)]
        if name != "client":
            procs += procs[0].children(recursive=True)
        out[name] = sum(p.cpu_times().user + p.cpu_times().system for p in procs if p.is_running())
    return out


def measure(
    port: int, r: redis.Redis, path: str, concurrency: int, seconds: float, post: bool, pids: dict[str, int]
) -> dict:
    asyncio.run(_load(port, path, concurrency, WARMUP_S, post))
    before = r.xlen(keys.feedback_stream())
    cpu_before = cpu_seconds(pids)
    result = asyncio.run(_load(port, path, concurrency, seconds, post))
    cpu_after = cpu_seconds(pids)
    # CPU per answered request says what the machine pays for one event, however busy the other tenants keep it
    per_request = {
        name: 1000 * (cpu_after[name] - cpu_before[name]) / max(1, result["requests"]) for name in cpu_after
    }
    result["cpu_ms_per_request"] = {name: round(ms, 3) for name, ms in per_request.items()}
    if per_request:
        # what two cores of our own would sustain if CPU were the only limit (server + Redis + load generator)
        result["cpu_bound_per_s_on_2_cores"] = round(2000 / sum(per_request.values()), 1)
    if post:
        result["events_in_redis"] = r.xlen(keys.feedback_stream()) - before
        result["redis_matches_2xx"] = result["events_in_redis"] == result["ok"]
    return result


# --- baselines without HTTP


def xadd_rate(r: redis.Redis, seconds: float) -> float:
    stream, n = "bench:xadd", 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        r.xadd(stream, {"event": '{"bench": true}'})
        n += 1
    r.delete(stream)
    return round(n / (time.perf_counter() - start), 1)


async def _script_rate(url: str, concurrency: int, seconds: float) -> float:
    client = aredis.Redis.from_url(url, decode_responses=True, max_connections=concurrency)
    limits = fb.FeedbackLimits(per_minute=10**12, per_day=10**12, max_comment_chars=2000)
    rng = random.Random(0)
    count = 0

    async def worker():
        nonlocal count
        while time.perf_counter() < deadline:
            body = fb.ThumbsFeedback(
                completion_id=f"bench-{rng.randrange(N_COMPLETIONS)}",
                type="thumbs",
                choice=rng.randrange(2),
                value=rng.choice(["up", "down"]),
            )
            await fb.asubmit_feedback(client, body, user="bench", limits=limits)
            count += 1

    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.aclose()
    return round(count / (time.perf_counter() - start), 1)


# --- the server under test


def start_server(url: str, home: Path, workers: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = os.environ | {
        "ALIGND_REDIS_URL": url,
        "ALIGND_HOME": str(home),
        "ALIGND_API_KEYS": f"{API_KEY}:bench",
        "ALIGND_ADMIN_KEY": "bench-admin",
        "ALIGND_FEEDBACK_RATE_PER_MINUTE": str(10**12),
        "ALIGND_FEEDBACK_DAILY_CAP": str(10**12),
    }
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.feedback:app_factory",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}")
        try:
            asyncio.run(_load(port, "/bench/noop", workers * 2, 0.05, post=False))
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("uvicorn did not start in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="uvicorn worker counts to measure")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    with tempfile.TemporaryDirectory(prefix="alignd-bench-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis")
        url = server.start()
        r = connect(url)
        out: dict = {
            "bench": "feedback",
            "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "seconds_per_level": args.seconds,
            "redis": {
                "appendfsync": r.config_get("appendfsync")["appendfsync"],
                "version": r.info("server")["redis_version"],
            },
        }
        try:
            seed(r)
            out["baseline"] = {
                "redis_xadd_1_client_per_s": xadd_rate(r, args.seconds),
                "accept_script_32_async_clients_per_s": asyncio.run(_script_rate(url, 32, args.seconds)),
            }
            out["http"] = []
            for workers in args.workers:
                seed(r)
                proc, port = start_server(url, Path(tmp) / "home", workers)
                pids = {"server": proc.pid, "redis": server.process.pid, "client": os.getpid()}
                try:
                    for level in LEVELS:
                        noop = measure(port, r, "/bench/noop", level, args.seconds, post=False, pids=pids)
                        feedback = measure(port, r, "/v1/feedback", level, args.seconds, post=True, pids=pids)
                        out["http"].append(
                            {
                                "workers": workers,
                                "concurrency": level,
                                "feedback": feedback,
                                "noop_per_s": noop["per_s"],
                                "noop_p50_ms": noop["p50_ms"],
                                "noop_cpu_ms_per_request": noop["cpu_ms_per_request"],
                            }
                        )
                        print(json.dumps(out["http"][-1]), file=sys.stderr, flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
            best = max(out["http"], key=lambda x: x["feedback"]["per_s"])
            out["best"] = {
                "workers": best["workers"],
                "concurrency": best["concurrency"],
                "events_per_s": best["feedback"]["per_s"],
                "cpu_bound_per_s_on_2_cores": best["feedback"].get("cpu_bound_per_s_on_2_cores"),
                "all_counts_match": all(x["feedback"]["redis_matches_2xx"] for x in out["http"]),
            }
            out["load_average_at_end"] = os.getloadavg()
        finally:
            r.close()
            server.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
