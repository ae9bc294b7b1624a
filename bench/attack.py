"""Attack benchmark: each defence of docs/safety.md attacked for real — `alignd serve` in its own process with its own
embedded Redis, serving the built-in model architecture (2 M-parameter GPT-2, untrained) — and measured. Prints JSON.

    python bench/attack.py                     # every scenario (a few minutes on 2 cores)
    python bench/attack.py --only overload     # one of: keys, body, overload, soak
    python bench/attack.py --soak-completions 100000   # the full soak (long on a small machine)

- keys: one key sends chat requests as 200 invented `user` values against a key total of 50 per minute; then 200
  invented users vote one arena pair "the new version lost", against a rollback threshold of 30 votes.
- body: a 50 MB chunked body without authentication; the server's RSS before and after.
- overload: a server configured for 64 sequences in flight; one client, then 64 clients (its capacity: the latency
  without excess), then 200 (the attack), on 8 keys, `--seconds` each, clients honouring Retry-After and spread over
  4 client processes; during the attack a probe client in a process of its own sends one request at a time (the
  latency a newcomer sees, free of the attacking clients' own queueing). Refusal latency and admitted p99.
- soak: completions with feedback on a share of them, completions expiring after `ALIGND_COMPLETION_TTL_S`; the log
  consumed and settled as a training cycle does (read_new, ack; then the trim of workers/settle.py) twice; Redis
  memory and keys before, after and after expiry; acknowledged events lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import wait_ready  # noqa: E402
from bench.serve import default_policy, pct  # noqa: E402
from core.config import Settings  # noqa: E402
from core.redis_server import EmbeddedRedis, free_port  # noqa: E402
from store import feedback as fb  # noqa: E402
from store import keys, retention  # noqa: E402
from store.client import connect  # noqa: E402
from workers.publish import publish_version  # noqa: E402

KEYS = [f"sk-attack-{i}" for i in range(8)]
ADMIN = "sk-attack-admin"
MSG = [{"role": "user", "content": "What is 2 plus 3?"}]


@contextlib.contextmanager
def server(policy, **env_overrides: str):
    """`alignd serve` on two published copies of `policy` (v2 current, v1 its parent), with its own Redis: yields
    (url, pid, redis client)."""
    with tempfile.TemporaryDirectory() as home:
        redis = EmbeddedRedis(Path(home) / "redis")
        redis_url = redis.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
        env |= {
            "ALIGND_HOME": home,
            "ALIGND_REDIS_URL": redis_url,
            "ALIGND_API_KEYS": ",".join(f"{k}:tenant{i}" for i, k in enumerate(KEYS)),
            "ALIGND_ADMIN_KEY": ADMIN,
            **env_overrides,
        }
        settings = Settings(home=Path(home), redis_url=redis_url)
        r = connect(redis_url)
        tok, model = policy.tokenizer, policy.model
        for parent in (None, 1):
            publish_version(
                r,
                settings,
                lambda d: (model.save_pretrained(d), tok.save_pretrained(d)),
                {"source": "bench", "parent": parent, "metrics": {}},
            )
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "alignd.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            yield url, proc.pid, r
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            redis.stop()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


# --- keys: per-key totals against rotating `user` values


def scenario_keys(policy) -> dict:
    cap, votes_needed = 50, 30
    env = {"ALIGND_KEY_CHAT_RATE_PER_MINUTE": str(cap), "ALIGND_ARENA": "true", "ALIGND_CHAT_RATE_PER_MINUTE": "1000"}
    with server(policy, **env) as (url, _, r):
        auth = {"Authorization": f"Bearer {KEYS[0]}"}
        with httpx.Client(base_url=url, headers=auth, timeout=60) as http:
            wait_arena = time.monotonic() + 60
            pair, arena_served = None, 0
            while pair is None and time.monotonic() < wait_arena:  # the follower loads the parent for the arena
                answer = http.post("/v1/chat/completions", json={"messages": MSG, "n": 2, "max_tokens": 4})
                arena_served += answer.status_code == 200
                versions = answer.headers.get("x-policy-version")
                pair = answer.json()["id"] if answer.status_code == 200 and versions else None
                rec = json.loads(r.get(keys.completion(pair))) if pair else None
                if rec and len({c["version"] for c in rec["choices"]}) < 2:
                    pair = None
                    time.sleep(0.5)
            codes = [
                http.post(
                    "/v1/chat/completions", json={"messages": MSG, "max_tokens": 1, "user": f"invented-{i}"}
                ).status_code
                for i in range(200)
            ]
            # the arena pair: which index is v2 (the current version)? vote it the loser as 200 invented users
            rec = json.loads(r.get(keys.completion(pair)))
            new_index = next(c["index"] for c in rec["choices"] if c["version"] == 2)
            vote_codes = [
                http.post(
                    "/v1/feedback",
                    json={"completion_id": pair, "type": "pairwise", "winner": 1 - new_index, "user": f"fake-{i}"},
                ).status_code
                for i in range(200)
            ]
            stats = http.get("/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    counted = (stats.get("pairs") or {}).get("2_vs_1", {})
    arena_votes = counted.get("wins", 0) + counted.get("losses", 0) + counted.get("ties", 0)
    served = codes.count(200) + arena_served  # the arena requests count in the same minute
    return {
        "key_chat_cap_per_minute": cap,
        "chat_requests_sent": 200 + arena_served,
        "chat_served": served,
        "chat_over_cap": max(0, served - cap),
        "chat_refused_429": codes.count(429),
        "arena_votes_sent_by_invented_users": 200,
        "arena_votes_accepted": vote_codes.count(201),
        "arena_votes_counted": arena_votes,
        "arena_min_votes_for_rollback": votes_needed,
        "could_trigger_rollback": arena_votes >= votes_needed,
    }


# --- body: a chunked upload far over the limit


def send_chunked(port: int, total: int, chunk: int = 64 * 1024) -> tuple[bytes, int, float]:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    block, sent = b" " * chunk, 0
    try:
        while sent < total and not select.select([s], [], [], 0)[0]:
            s.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            sent += len(block)
        answer = s.recv(65536)
    except (BrokenPipeError, ConnectionResetError):
        answer = s.recv(65536)
    finally:
        s.close()
    return answer, sent, time.monotonic() - t0


def scenario_body(policy) -> dict:
    with server(policy) as (url, pid, _):
        port = int(url.rsplit(":", 1)[1])
        send_chunked(port, 2_000_000)  # warm-up
        before = rss_mb(pid)
        answer, sent, seconds = send_chunked(port, 50_000_000)
        time.sleep(0.5)
        after = rss_mb(pid)
    return {
        "body_bytes_offered": 50_000_000,
        "status": answer.split(b" ", 2)[1].decode() if answer else None,
        "bytes_sent_before_the_answer": sent,
        "answer_s": round(seconds, 3),
        "server_rss_growth_mb": round(after - before, 2),
    }


# --- overload: more clients than the server admits


async def load_samples(url: str, clients: int, seconds: float, max_tokens: int, first: int = 0) -> dict:
    """Raw latencies of `clients` asyncio clients looping for `seconds` (refused ones wait Retry-After)."""
    admitted: list[float] = []
    refused: list[tuple[int, float]] = []
    other: list[int] = []
    stop = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        headers = {"Authorization": f"Bearer {KEYS[(first + i) % len(KEYS)]}"}
        body = {"messages": MSG, "max_tokens": max_tokens, "temperature": 1.0}
        while time.monotonic() < stop:
            t0 = time.monotonic()
            a = await http.post("/v1/chat/completions", json=body, headers=headers)
            dt = time.monotonic() - t0
            if a.status_code == 200:
                admitted.append(dt)
            elif a.status_code in (429, 503):
                refused.append((a.status_code, dt))
                await asyncio.sleep(float(a.headers.get("retry-after", "1")))
            else:
                other.append(a.status_code)

    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return {"admitted": admitted, "refused": refused, "other": other}


def _load_process(url: str, clients: int, seconds: float, max_tokens: int, first: int, out) -> None:
    out.put(asyncio.run(load_samples(url, clients, seconds, max_tokens, first)))


def load(url: str, clients: int, seconds: float, max_tokens: int, processes: int = 1) -> dict:
    """`clients` clients spread over `processes` client processes, so that the clients' own CPU (200 asyncio clients
    in one Python process queue behind each other) does not count as the server's latency."""
    if processes == 1:
        samples = [asyncio.run(load_samples(url, clients, seconds, max_tokens))]
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        share = clients // processes
        procs = [
            ctx.Process(target=_load_process, args=(url, share, seconds, max_tokens, i * share, out))
            for i in range(processes)
        ]
        for p in procs:
            p.start()
        samples = [out.get(timeout=seconds + 600) for _ in procs]
        for p in procs:
            p.join()
    admitted = [dt for s in samples for dt in s["admitted"]]
    refused = [x for s in samples for x in s["refused"]]
    other = [c for s in samples for c in s["other"]]
    times = [dt for _, dt in refused]
    return {
        "clients": clients,
        "client_processes": processes,
        "admitted": len(admitted),
        "admitted_p50_s": round(pct(admitted, 50), 3) if admitted else None,
        "admitted_p99_s": round(pct(admitted, 99), 3) if admitted else None,
        "refused_429": sum(c == 429 for c, _ in refused),
        "refused_503": sum(c == 503 for c, _ in refused),
        "refused_p50_ms": round(pct(times, 50) * 1000, 1) if times else None,
        "refused_p99_ms": round(pct(times, 99) * 1000, 1) if times else None,
        "refused_max_ms": round(max(times) * 1000, 1) if times else None,
        "other_statuses": sorted(set(other)),
    }


def probe(url: str, seconds: float, out) -> None:
    """One client in a process of its own, one request at a time: the latency the server gives a newcomer during
    the attack, free of the attacking clients' own queueing (200 asyncio clients share one Python process)."""
    seen: list[tuple[int, float]] = []
    stop = time.monotonic() + seconds
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[-1]}"}, timeout=300) as http:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            a = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 16})
            seen.append((a.status_code, time.monotonic() - t0))
            time.sleep(0.2)
    out.put(seen)


def with_probe(url: str, clients: int, seconds: float) -> dict:
    import multiprocessing

    out = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=probe, args=(url, seconds, out))
    proc.start()
    result = load(url, clients, seconds, 16, processes=4)
    seen = out.get(timeout=seconds + 300)
    proc.join()
    refused = [dt for c, dt in seen if c in (429, 503)]
    admitted = [dt for c, dt in seen if c == 200]
    result["probe"] = {
        "requests": len(seen),
        "refused": len(refused),
        "refused_p50_ms": round(pct(refused, 50) * 1000, 1) if refused else None,
        "refused_max_ms": round(max(refused) * 1000, 1) if refused else None,
        "admitted_p50_s": round(pct(admitted, 50), 3) if admitted else None,
    }
    return result


def scenario_overload(policy, seconds: float) -> dict:
    env = {"ALIGND_MAX_INFLIGHT": "64", "ALIGND_CHAT_RATE_PER_MINUTE": str(10**6)}
    env["ALIGND_KEY_CHAT_RATE_PER_MINUTE"] = str(10**6)
    with server(policy, **env) as (url, _, _):
        load(url, 8, 2, 16)  # warm-up
        single = load(url, 1, seconds / 2, 16)
        at_capacity = load(url, 64, seconds, 16, processes=4)
        attack = with_probe(url, 200, seconds)
    ratio = attack["admitted_p99_s"] / at_capacity["admitted_p99_s"] if at_capacity["admitted_p99_s"] else None
    return {
        "max_inflight": 64,
        "one_client": single,
        "at_capacity_64_clients": at_capacity,
        "attack_200_clients": attack,
        "admitted_p99_vs_at_capacity_p99": round(ratio, 2) if ratio else None,
    }


# --- soak: retention keeps Redis bounded


def scenario_soak(policy, completions: int, vote_share: float) -> dict:
    env = {
        "ALIGND_COMPLETION_TTL_S": "60",
        "ALIGND_CHAT_RATE_PER_MINUTE": str(10**6),
        "ALIGND_KEY_CHAT_RATE_PER_MINUTE": str(10**6),
        "ALIGND_KEY_TOKENS_PER_MINUTE": str(10**9),
        "ALIGND_KEY_ANNOTATORS_PER_DAY": str(10**6),
    }
    with server(policy, **env) as (url, _, r):
        base_mem = r.info("memory")["used_memory"]
        accepted: list[tuple[str, str]] = []  # (completion id, feedback id) of every 201

        async def run(n: int, offset: int) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                sem = asyncio.Semaphore(16)

                async def one(i: int) -> None:
                    async with sem:
                        headers = {"Authorization": f"Bearer {KEYS[i % len(KEYS)]}"}
                        body = {"messages": MSG, "max_tokens": 2}
                        a = await http.post("/v1/chat/completions", json=body, headers=headers)
                        if a.status_code == 200 and (i % 1000) < vote_share * 1000:
                            vote = {"completion_id": a.json()["id"], "type": "thumbs", "choice": 0, "value": "up"}
                            vote["feedback_id"] = f"soak-{i}"
                            f = await http.post("/v1/feedback", json=vote, headers=headers)
                            if f.status_code == 201:
                                accepted.append((vote["completion_id"], f.json()["id"]))

                await asyncio.gather(*(one(offset + i) for i in range(n)))

        def cycle() -> int:  # what a training cycle does with the log: take, use, acknowledge; then settle's trim
            acked = 0
            while batch := fb.read_new(r, "soak-cycle", 1000):
                acked += fb.ack(r, batch)
            retention.trim_settled_feedback(r, keep_s=0)
            return acked

        t0 = time.monotonic()
        half = completions // 2
        asyncio.run(run(half, 0))
        acked = cycle()
        asyncio.run(run(completions - half, half))
        acked += cycle()
        elapsed = time.monotonic() - t0
        after = r.info("memory")["used_memory"]
        keys_after = r.dbsize()
        log_length = r.xlen(keys.feedback_stream())
        time.sleep(62)  # every completion without a vote is past its TTL now
        for _ in range(50):  # let Redis's active expiry catch up (it samples keys every 100 ms)
            if r.dbsize() < keys_after:
                break
            time.sleep(0.2)
        time.sleep(2)
        expired_mem = r.info("memory")["used_memory"]
        # an acknowledged event is kept if its vote is still its completion's latest vote (training data)
        lost = [f for cid, f in accepted if f not in {v.id for v in fb.latest_votes(r, cid)}]
        kept_votes = r.scard(keys.feedback_completions())
        keys_expired = r.dbsize()
    return {
        "completions": completions,
        "scaled_down_from": 100_000 if completions < 100_000 else None,
        "feedback_accepted": len(accepted),
        "events_acknowledged_by_two_cycles": acked,
        "acknowledged_events_lost": len(lost) + max(0, len(accepted) - acked),
        "feedback_log_length_after_trim": log_length,
        "completions_with_votes_kept": kept_votes,
        "redis_used_memory_mb": {
            "start": round(base_mem / 1e6, 2),
            "after_soak": round(after / 1e6, 2),
            "after_completion_ttl": round(expired_mem / 1e6, 2),
        },
        "redis_keys": {"after_soak": keys_after, "after_completion_ttl": keys_expired},
        "soak_s": round(elapsed, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["keys", "body", "overload", "soak"])
    p.add_argument("--seconds", type=float, default=10.0, help="per load level of the overload scenario")
    p.add_argument("--soak-completions", type=int, default=2000)
    p.add_argument("--vote-share", type=float, default=0.3)
    args = p.parse_args()
    policy = default_policy()
    scenarios = {
        "keys": lambda: scenario_keys(policy),
        "body": lambda: scenario_body(policy),
        "overload": lambda: scenario_overload(policy, args.seconds),
        "soak": lambda: scenario_soak(policy, args.soak_completions, args.vote_share),
    }
    out = {"cpu_count": os.cpu_count()}
    for name, run in scenarios.items():
        if args.only in (None, name):
            out[name] = run()
            print(json.dumps({name: out[name]}), file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
