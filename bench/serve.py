"""Serving benchmark: alignd's engine over real HTTP (`alignd serve` in its own process) at 1, 4 and 16
concurrent clients against baselines on the same model in the same run: one-request-at-a-time Hugging Face
`generate`, HF `generate` on one static batch of 16, and transformers' own continuous batching (`generate_batch`).
The client levels and the static batch take turns `--rounds` times (default 3) while the host's speed drifts; each
figure is its median round and each ratio the median of the rounds' ratios. Prints JSON.

    python bench/serve.py                      # the default-size model (2 M-parameter GPT-2), untrained
    python bench/serve.py --model PATH         # any local HF causal-LM folder, e.g. a checkpoint under ALIGND_HOME
    python bench/serve.py --shape smollm2-135m --client-levels 16 --offline static --max-tokens 16
                                               # SmolLM2-135M's shape, random weights (bench/shapes.py)
    python bench/serve.py --disconnect-scenario  # only: 32 streaming clients hang up; how fast are their rows freed
    python bench/serve.py --engine builtin,vllm --client-levels 1,16 --max-tokens 32 --vllm-python VENV/bin/python
                                               # only: alignd's engine vs alignd over vLLM vs vLLM called directly
                                               # (bench/serve_engines.py); the built-in size as a Llama

The disconnect scenario starts 32 long streaming generations, lets every client read a few chunks, closes all 32
connections at once and polls /metrics until `alignd_engine_running_sequences` is 0, reporting the time and the
decode steps (`alignd_engine_decode_steps`) that passed, next to the decode step time at that batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import wait_ready  # noqa: E402
from core.config import Settings  # noqa: E402
from core.redis_server import EmbeddedRedis, free_port  # noqa: E402
from core.threads import set_thread_torch_threads  # noqa: E402
from service.engine import Engine, Policy  # noqa: E402
from store.client import connect  # noqa: E402
from training import world  # noqa: E402
from training.model import build_model, tiny_config  # noqa: E402
from training.tokenizer import train_tokenizer  # noqa: E402
from workers.publish import publish_version  # noqa: E402

KEY = "sk-bench"
SERVER_PIDS: dict[str, int] = {}  # url -> pid of the `alignd serve` process behind it (alignd_serve)


def default_policy(arch: str = "gpt2") -> Policy:
    """The built-in model's size and tokenizer, untrained; `arch="llama"`: the same size as a Llama (vLLM has LoRA for
    Llama, not for GPT-2)."""
    tok = train_tokenizer(world.corpus_texts(3000), 1024)
    cfg = tiny_config(
        arch,
        len(tok),
        context=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return Policy(version=1, model=build_model(cfg).eval(), tokenizer=tok, context=512)


def prompts(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [world.sample_task(rng).prompt for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


@torch.inference_mode()
def hf_sequential(policy: Policy, texts: list[str], max_tokens: int) -> dict:
    tok, model = policy.tokenizer, policy.model
    lat, tokens = [], 0
    start = time.perf_counter()
    for text in texts:
        t0 = time.perf_counter()
        ids = torch.tensor([policy.encode_chat([{"role": "user", "content": text}])])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=True,
            top_k=0,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        tokens += out.shape[1] - ids.shape[1]
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    # a single stalled call (another process taking the cores) would dominate the mean, so the baseline also gets a
    # median-based rate, and speedups are computed against the higher of the two (the conservative choice)
    return {
        "requests": len(texts),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "tokens_per_s_median": tokens / len(texts) / pct(lat, 50),
        "latency_p50_s": pct(lat, 50),
        "latency_p99_s": pct(lat, 99),
    }


def hf_static_batch(policy: Policy, texts: list[str], max_tokens: int, threads: int = 1) -> dict:
    return best_of_threads(lambda: hf_static_batch_once(policy, texts, max_tokens), threads)


@torch.inference_mode()
def hf_static_batch_once(policy: Policy, texts: list[str], max_tokens: int) -> dict:
    """All requests as one padded batch through HF `generate`: the ceiling of plain static batching."""
    tok = policy.tokenizer
    rendered = [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        for t in texts
    ]
    enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    out = policy.model.generate(
        **enc,
        max_new_tokens=max_tokens,
        do_sample=True,
        top_k=0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    wall = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1] :]
    tokens = int((new != tok.pad_token_id).sum())
    return {"requests": len(texts), "tokens": tokens, "tokens_per_s": tokens / wall, "wall_s": wall}


def hf_continuous_batching(policy: Policy, texts: list[str], max_tokens: int, threads: int = 1) -> dict:
    from transformers import GenerationConfig

    try:
        inputs = [policy.encode_chat([{"role": "user", "content": t}]) for t in texts]
        gen = GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=True,
            top_k=0,
            eos_token_id=policy.tokenizer.eos_token_id,
            pad_token_id=policy.tokenizer.pad_token_id,
        )
        start = time.perf_counter()
        out = policy.model.generate_batch(inputs=inputs, generation_config=gen, progress_bar=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.generated_tokens) for o in out.values())
        return {"requests": len(texts), "tokens": tokens, "tokens_per_s": tokens / wall, "wall_s": wall}
    except Exception as exc:  # report, don't hide: the comparison is part of the result
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


@torch.inference_mode()
def forward_ceiling(policy: Policy, batch: int, steps: int = 64, context: int = 40) -> dict:
    """The model's own decode step (one token per row over a DynamicCache, no sampling, no scheduler) at batch 1 and
    at `batch`: `ceiling` = batch * t(1) / t(batch) is the most any batching scheduler can gain over one-at-a-time
    decoding on this machine, whatever its overhead."""
    from transformers import DynamicCache

    def ms_per_step(b: int) -> float:
        ids = torch.randint(3, len(policy.tokenizer), (b, context))
        cache = DynamicCache(config=policy.model.config)
        policy.model(input_ids=ids, cache=cache, use_cache=True)
        start = time.perf_counter()
        for _ in range(steps):
            policy.model(input_ids=ids[:, :1], cache=cache, use_cache=True)
        return (time.perf_counter() - start) / steps * 1000

    ms_per_step(1), ms_per_step(batch)  # warm-up
    t1 = min(ms_per_step(1) for _ in range(3))
    tb = min(ms_per_step(batch) for _ in range(3))
    return {
        "batch": batch,
        "ms_per_step_batch_1": round(t1, 3),
        f"ms_per_step_batch_{batch}": round(tb, 3),
        "ceiling": round(batch * t1 / tb, 2),
    }


def engine_offline(policy: Policy, texts: list[str], max_tokens: int, threads: int = 1) -> dict:
    """Same workload as hf_continuous_batching: all requests submitted at once, no HTTP. Run it in a process whose
    main thread has not run torch on several threads (`engine_offline_process`)."""
    from service.engine import SamplingParams

    engine = Engine(policy, max_batch_size=64, threads=threads)
    engine.start()
    try:
        engine.generate([{"role": "user", "content": texts[0]}], SamplingParams(max_tokens=8))  # warm-up
        start = time.perf_counter()
        handles = [
            engine.submit([{"role": "user", "content": t}], SamplingParams(max_tokens=max_tokens)) for t in texts
        ]
        tokens = sum(h.wait()[2] for h in handles)
        wall = time.perf_counter() - start
    finally:
        engine.stop()
    return {
        "requests": len(texts),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "threads": threads,
    }


def engine_offline_process(args, threads: int) -> dict:
    """`engine_offline` in a fresh process, set up as `alignd serve` sets up its own: the main thread on one torch
    thread, the engine's on `threads`. In this process the main thread has run HF at several threads, and the
    engine's OpenMP pool beside that one would slow its every parallel region (core/config.py apply_torch_threads)."""
    cmd = [sys.executable, __file__, "--engine-offline-child", "--threads", str(threads)]
    cmd += ["--max-tokens", str(args.max_tokens), "--dtype", args.dtype, "--quantize", args.quantize]
    cmd += ["--shape", args.shape] if args.shape else ["--model", str(args.model)] if args.model else []
    try:
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    except subprocess.CalledProcessError as exc:  # report, don't hide
        return {"error": exc.stderr[-300:]}


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) used so far by process `pid`, every thread of it; by this process when None."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime in clock ticks


def tree_cpu_seconds(root: int, *, include_root: bool = True) -> float:
    """CPU time so far of process `root` and all its live descendants (a vLLM server `alignd serve` started, and
    that server's engine processes); `include_root=False`: of the descendants only."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    tree, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        tree.add(pid)
        frontier += [child for child, ppid in parent.items() if ppid == pid and child not in tree]
    total = 0.0
    for pid in tree - (set() if include_root else {root}):
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def chat_body(text: str, max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def chat_text(chunk: dict) -> str | None:
    return chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None


async def stream_load(
    url: str,
    bodies: Callable[[int], dict],
    concurrency: int,
    per_client: int,
    *,
    path: str = "/v1/chat/completions",
    text_of: Callable[[dict], str | None] = chat_text,
    cpu_of: Callable[[], float] | None = None,
) -> dict:
    """`concurrency` streaming clients, each sending `per_client` requests one after another (request i's body is
    `bodies(i)`): tokens/s from the servers' usage counts, TTFT to the first chunk with text (`text_of`), latency,
    and CPU per token of the server (`cpu_of`, CPU seconds so far) and of this process's clients."""
    ttft, lat, tokens, failures = [], [], 0, 0

    async def one_client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        for i in range(per_client):
            t0 = time.perf_counter()
            first = None
            try:
                async with http.stream("POST", path, json=bodies(c * per_client + i)) as resp:
                    if resp.status_code != 200:
                        failures += 1
                        continue
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]
                        elif first is None and text_of(chunk):
                            first = time.perf_counter()
            except httpx.HTTPError:
                failures += 1
                continue
            lat.append(time.perf_counter() - t0)
            ttft.append((first or time.perf_counter()) - t0)

    limits = httpx.Limits(max_connections=concurrency + 4)
    cpu_of = cpu_of or (lambda: 0.0)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300, limits=limits
    ) as http:
        cpu0 = (cpu_of(), cpu_seconds())
        start = time.perf_counter()
        await asyncio.gather(*(one_client(c, http) for c in range(concurrency)))
        wall = time.perf_counter() - start
        cpu1 = (cpu_of(), cpu_seconds())
    return {
        "clients": concurrency,
        "requests": len(lat),
        "failed": failures,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50) if ttft else None,
        "ttft_p99_s": pct(ttft, 99) if ttft else None,
        "latency_p50_s": pct(lat, 50) if lat else None,
        "latency_p99_s": pct(lat, 99) if lat else None,
        # CPU per token of the server process (engine, event loop, everything) and of this process's clients; the
        # cores divided by their sum is the most tokens/s this machine could give with no core ever idle
        "server_cpu_us_per_token": round((cpu1[0] - cpu0[0]) / max(tokens, 1) * 1e6, 1),
        "client_cpu_us_per_token": round((cpu1[1] - cpu0[1]) / max(tokens, 1) * 1e6, 1),
        "cpu_bound_tokens_per_s": round(
            (os.cpu_count() or 1) * max(tokens, 1) / max(cpu1[0] - cpu0[0] + cpu1[1] - cpu0[1], 1e-9), 1
        ),
    }


async def http_clients(url: str, concurrency: int, per_client: int, max_tokens: int, texts: list[str]) -> dict:
    """`stream_load` of chat requests against `alignd serve` at `url`, with how its engine batched them."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        before = await engine_counts(http)
        pid = SERVER_PIDS[url]
        load = await stream_load(
            url,
            lambda i: chat_body(texts[i % len(texts)], max_tokens),
            concurrency,
            per_client,
            cpu_of=lambda: tree_cpu_seconds(pid),
        )
        after = await engine_counts(http)
    steps, prefills = (after[k] - before[k] for k in ("decode_steps", "prefills"))
    extra = {
        # how the engine batched them: rows per decode step (16 at best) and prefill forwards (each admits a group)
        "decode_steps": steps,
        "rows_per_step": round(load["tokens"] / steps, 2) if steps else None,
        "prefills": prefills,
        "engine_torch_threads": after["torch_threads"],
    }
    cpu_keys = ("server_cpu_us_per_token", "client_cpu_us_per_token", "cpu_bound_tokens_per_s")
    head = {k: v for k, v in load.items() if k not in cpu_keys}
    return {**head, **extra, **{k: load[k] for k in cpu_keys}}


@contextlib.contextmanager
def alignd_serve(
    policy: Policy,
    max_tokens: int,
    server_threads: int | None,
    dtype: str = "auto",
    quantize: str = "none",
    env_extra: dict[str, str] | None = None,
    ready_timeout_s: float = 120.0,
):
    """`alignd serve` in its own process on a published copy of `policy`, with its own embedded Redis: yields
    its URL. `env_extra` adds settings (ALIGND_ENGINE=vllm, ...)."""
    with tempfile.TemporaryDirectory() as home:
        redis = EmbeddedRedis(Path(home) / "redis")
        redis_url = redis.start()
        env = {
            **os.environ,
            "ALIGND_HOME": home,
            "ALIGND_REDIS_URL": redis_url,
            "ALIGND_API_KEYS": f"{KEY}:bench",
            "ALIGND_ADMIN_KEY": "sk-bench-admin",
            "ALIGND_CHAT_RATE_PER_MINUTE": str(10**6),
            "ALIGND_MAX_NEW_TOKENS": str(max(256, max_tokens)),
            "ALIGND_DTYPE": dtype,
            "ALIGND_QUANTIZE": quantize,
        }
        env.pop("ALIGND_TORCH_THREADS", None)
        if server_threads:
            env["ALIGND_TORCH_THREADS"] = str(server_threads)
        env.update(env_extra or {})
        settings = Settings(home=Path(home), redis_url=redis_url)
        tok, model = policy.tokenizer, policy.model
        publish_version(
            connect(redis_url),
            settings,
            lambda d: (model.save_pretrained(d), tok.save_pretrained(d)),
            {"source": "bench", "parent": None, "metrics": {}},
        )
        port = free_port()
        (Path(home) / "logs").mkdir(exist_ok=True)
        with open(Path(home) / "logs" / "serve.log", "wb") as out:  # the child keeps its own copy of the handle
            server = subprocess.Popen(
                [sys.executable, "-m", "alignd.cli", "serve", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(url, server, ready_timeout_s)
            except RuntimeError:  # say why: the server's own logs (a vLLM it started logs to logs/vllm.log)
                for log in sorted((Path(home) / "logs").glob("*.log")):
                    print(
                        f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]),
                        file=sys.stderr,
                    )
                raise
            SERVER_PIDS[url] = server.pid
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)
            redis.stop()


def median_round(records: list[dict]) -> dict:
    """The record with the median tokens/s (the lower one of an even count), with every round's tokens/s."""
    ordered = sorted(records, key=lambda r: r.get("tokens_per_s", 0.0))
    return {
        **ordered[(len(ordered) - 1) // 2],
        "tokens_per_s_rounds": [round(r.get("tokens_per_s", 0.0), 1) for r in records],
    }


def server_threads(parameters: int) -> int | None:
    """The engine threads `alignd serve` picks by itself on this machine (core/config.py serving_threads)."""
    return Settings().serving_threads(parameters)


def best_of_threads(fn, threads: int) -> dict:
    """`fn()` at 1 thread and at `threads`, the faster: one request's small matmuls often run faster on one thread,
    and under contention either can win (the higher baseline is the conservative one)."""
    runs = {}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        runs[t] = fn()
    torch.set_num_threads(threads)
    best = max(runs, key=lambda t: runs[t]["tokens_per_s"])
    by_threads = {str(t): round(r["tokens_per_s"], 1) for t, r in runs.items()}
    return {**runs[best], "threads": best, "by_threads": by_threads}


@torch.inference_mode()
def hf_greedy(policy: Policy, text: str, max_tokens: int) -> list[int]:
    tok = policy.tokenizer
    ids = torch.tensor([policy.encode_chat([{"role": "user", "content": text}])])
    out = policy.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return [t for t in out[0, ids.shape[1] :].tolist() if t != tok.eos_token_id]


def engine_greedy(engine: Engine, text: str, max_tokens: int) -> list[int]:
    from service.engine import SamplingParams

    handle = engine.submit([{"role": "user", "content": text}], SamplingParams(temperature=0, max_tokens=max_tokens))
    handle.wait()
    return handle.token_ids


def http_greedy(http: httpx.Client, text: str, max_tokens: int) -> tuple[int, str]:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}
    reply = http.post("/v1/chat/completions", json=body)
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"], reply.json()["choices"][0]["message"]["content"]


def single_stream(policy: Policy, served: Policy, args, texts: list[str]) -> dict:
    """One request at a time, greedy, at `--single-stream-threads` torch threads (default 1; `--server-threads` sets
    the server's, default the product's own: on 2 cores 1 for the built-in model, 2 at the 135 M shape; at 2 the
    in-process engine runs beside this process's main-thread pool, which slows it): HF float32 eager
    `generate` (batch 1), HF in the serving dtype, the alignd engine in-process, and `alignd serve` over HTTP. The
    runs take turns prompt by prompt, so that load from other processes spreads over all of them alike. Greedy
    agreement is per token against HF float32 (HTTP answers are compared as text: a random-weight shape's padding
    rows decode to nothing, so only the in-process token ids say anything there)."""
    torch.set_num_threads(args.single_stream_threads)
    m = args.max_tokens
    runs: dict[str, Callable] = {"hf_generate_float32": lambda t: hf_greedy(policy, t, m)}
    if served.dtype != policy.dtype:
        runs[f"hf_generate_{str(served.dtype)[6:]}"] = lambda t: hf_greedy(served, t, m)
    engine = Engine(served, max_batch_size=1)
    engine.start()
    runs["alignd_engine"] = lambda t: engine_greedy(engine, t, m)
    outputs: dict[str, list] = {k: [] for k in [*runs, "alignd_http"]}
    seconds = dict.fromkeys(outputs, 0.0)
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        with (
            alignd_serve(policy, m, args.server_threads, args.dtype, args.quantize) as url,
            httpx.Client(base_url=url, headers=headers, timeout=600) as http,
        ):
            runs["alignd_http"] = lambda t: http_greedy(http, t, m)
            for run in runs.values():  # warm-up: one-off setup costs
                run(texts[0])
            for text in texts[: args.baseline_requests]:
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    outputs[name].append(run(text))
                    seconds[name] += time.perf_counter() - t0
    finally:
        engine.stop()
    ref = outputs["hf_generate_float32"]
    base = sum(map(len, ref)) / seconds["hf_generate_float32"]
    http = outputs.pop("alignd_http")
    http_texts = [t for _, t in http]
    ref_texts = [policy.tokenizer.decode(ids, skip_special_tokens=True) for ids in ref]
    result = {}
    for name, outs in outputs.items():
        tokens = sum(map(len, outs))
        result[name] = {"tokens": tokens, "tokens_per_s": round(tokens / seconds[name], 2)}
        result[name]["greedy_vs_hf_float32"] = agreement(ref, outs)
    tokens = sum(n for n, _ in http)
    result["alignd_http"] = {"tokens": tokens, "tokens_per_s": round(tokens / seconds["alignd_http"], 2)}
    result["alignd_http"]["greedy_text_vs_hf_float32"] = agreement(ref_texts, http_texts)
    for r in result.values():
        r["speedup_vs_hf_float32"] = round(r["tokens_per_s"] / base, 2)
    return result


def agreement(reference: list, outputs: list) -> dict:
    """Greedy agreement with the float32 reference: identical answers, and the share of reference tokens (or
    characters) before the first difference."""
    prefix = sum(len(os.path.commonprefix([a, b])) for a, b in zip(reference, outputs, strict=True))
    same = sum(a == b for a, b in zip(reference, outputs, strict=True))
    share = round(prefix / max(1, sum(map(len, reference))), 3)
    return {"identical": f"{same}/{len(outputs)}", "common_prefix_share": share}


async def engine_counts(http: httpx.AsyncClient) -> dict[str, int]:
    """The engine's gauges from the server's /metrics: running sequences, decode steps and prefills so far, and the
    torch threads its decode steps run on."""
    names = [f"alignd_engine_{n}" for n in ("running_sequences", "decode_steps", "prefills", "torch_threads")]
    values = {}
    for line in (await http.get("/metrics")).text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[name.removeprefix("alignd_engine_")] = int(float(value))
    return values


async def engine_gauges(http: httpx.AsyncClient) -> tuple[int, int]:
    """(running sequences, decode steps so far) from the server's /metrics."""
    values = await engine_counts(http)
    return values["running_sequences"], values["decode_steps"]


async def disconnect_scenario(url: str, clients: int, max_tokens: int, texts: list[str], read_chunks: int = 4) -> dict:
    """`clients` long streaming generations; once each has read `read_chunks` chunks, all hang up at once."""
    hang_up = asyncio.Event()
    ready = 0
    all_ready = asyncio.Event()

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal ready
        body = {
            "messages": [{"role": "user", "content": texts[i % len(texts)]}],
            "max_tokens": max_tokens,
            "stream": True,
        }
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            # held, not `break`-ed out of: a dropped line iterator is finalised by closing the connection
            lines, seen = resp.aiter_lines(), 0
            with contextlib.suppress(StopAsyncIteration):
                while seen < read_chunks:
                    seen += (await anext(lines)).startswith("data: ")
            ready += 1
            if ready == clients:
                all_ready.set()
            await hang_up.wait()
        # leaving the block unread closes the connection: the server sees the client gone

    limits = httpx.Limits(max_connections=clients + 4)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as http,
        httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as probe,
    ):
        tasks = [asyncio.create_task(client(i, http)) for i in range(clients)]
        await asyncio.wait_for(all_ready.wait(), 300)
        running0, steps_a = await engine_gauges(probe)
        t_a = time.perf_counter()
        await asyncio.sleep(0.5)  # the decode step time at this batch size, from the server's own step counter
        running0, steps0 = await engine_gauges(probe)
        step_ms = (time.perf_counter() - t_a) / max(1, steps0 - steps_a) * 1000
        t0 = time.perf_counter()
        hang_up.set()
        await asyncio.gather(*tasks)
        closed_s = time.perf_counter() - t0
        while True:
            running, steps = await engine_gauges(probe)
            if running == 0 or time.perf_counter() - t0 > 60:
                break
        freed_s = time.perf_counter() - t0
    return {
        "clients": clients,
        "max_tokens": max_tokens,
        "running_before_disconnect": running0,
        "decode_step_ms_at_that_batch": round(step_ms, 2),
        "clients_closed_s": round(closed_s, 4),
        "freed_s": round(freed_s, 4),
        "freed_decode_steps": steps - steps0,
        "running_after": running,
        "target_within_one_decode_step": running == 0 and steps - steps0 <= 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="HF causal-LM folder (default: an untrained default-size model)")
    ap.add_argument("--shape", help="a random-initialised model of this shape (bench/shapes.py), e.g. smollm2-135m")
    ap.add_argument("--client-levels", default="1,4,16", help="concurrent HTTP clients, one run per level")
    ap.add_argument(
        "--offline",
        default="engine,static,continuous",
        help="offline 16-request runs: engine, static (HF batch), continuous (HF), ceiling",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="the HTTP client levels and HF's static batch take turns this many times in the run; the figures are "
        "each one's median round, the ratios the median of the rounds' ratios (the host's speed drifts)",
    )
    ap.add_argument("--engine-offline-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--baseline-requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the offline runs")
    ap.add_argument(
        "--single-stream-threads",
        type=int,
        default=1,
        help="torch threads of --single-stream's in-process runs, baseline included",
    )
    ap.add_argument(
        "--server-threads",
        type=int,
        help="ALIGND_TORCH_THREADS for `alignd serve` (default: unset, the product's own choice)",
    )
    ap.add_argument(
        "--disconnect-scenario",
        action="store_true",
        help="run only the scenario where 32 streaming clients disconnect mid-generation",
    )
    ap.add_argument("--disconnect-max-tokens", type=int, default=400)
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="ALIGND_DTYPE of the alignd runs (the HF baselines stay float32, plus one in this dtype)",
    )
    ap.add_argument(
        "--quantize",
        default="auto",
        choices=["auto", "none", "int8"],
        help="ALIGND_QUANTIZE of the alignd runs (int8: decode steps of up to 4 rows with int8 weights)",
    )
    ap.add_argument(
        "--single-stream",
        action="store_true",
        help="run only one-request-at-a-time greedy decoding: HF float32 vs alignd (in-process and HTTP)",
    )
    ap.add_argument(
        "--engine",
        help="only: compare engines over HTTP, e.g. builtin,vllm: `alignd serve` with ALIGND_ENGINE=builtin, with "
        "ALIGND_ENGINE=vllm, and that vLLM server called directly (bench/serve_engines.py)",
    )
    ap.add_argument("--vllm-python", help="python of a venv with vLLM (default ALIGND_VLLM_PYTHON or VLLM_PYTHON)")
    ap.add_argument("--vllm-start-timeout", type=float, default=900.0, help="seconds for `alignd serve` with vLLM")
    args = ap.parse_args()
    # a SIGTERM unwinds like Ctrl-C, so that the servers this benchmark started are stopped with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.engine_offline_child:  # engine_offline_process's child: the main thread as `alignd serve` sets it
        set_thread_torch_threads(1)

    # vLLM has no LoRA for GPT-2 (alignd starts it with --enable-lora): the comparison runs the built-in size as Llama
    arch = "llama" if "vllm" in (args.engine or "") else "gpt2"
    if args.shape:
        from bench.shapes import SHAPES, build_shape

        model, tok = build_shape(args.shape)
        policy = Policy(version=1, model=model, tokenizer=tok, context=min(1024, SHAPES[args.shape].context))
    else:
        policy = Policy.load(1, args.model, Settings().torch_device()) if args.model else default_policy(arch)
    name = args.shape or str(args.model or f"default-size untrained {arch}")
    texts = prompts(64)
    if args.engine:
        from bench.serve_engines import compare_engines

        print(json.dumps(compare_engines(args, policy, name, texts), indent=2))
        return
    parameters = sum(p.numel() for p in policy.model.parameters())
    settings = Settings(dtype=args.dtype, quantize=args.quantize, device="cpu")
    dtype = settings.serving_dtype(parameters)
    quantize = settings.serving_quantize(parameters, dtype)
    # the alignd runs' model, as the loader prepares it; the float32 original stays for the HF baselines
    served = policy
    if dtype != torch.float32 or quantize != "none":
        # a new Policy around a copy of the model (a Policy holds a threading.Event, which cannot be deep-copied)
        served = Policy(1, copy.deepcopy(policy.model), policy.tokenizer, context=policy.context)
        served = served.prepared(None if dtype == torch.float32 else dtype, quantize=quantize)
    if args.engine_offline_child:
        print(json.dumps(engine_offline(served, texts[:16], args.max_tokens, args.threads)))
        return
    if args.single_stream:
        result = {"model": name, "parameters": parameters, "dtype": args.dtype, "served_dtype": str(dtype)[6:]}
        result["quantize"], result["served_quantize"] = args.quantize, quantize
        result["max_tokens"], result["requests"] = args.max_tokens, args.baseline_requests
        print(json.dumps({**result, **single_stream(policy, served, args, texts)}, indent=2))
        return
    if args.disconnect_scenario:
        with alignd_serve(policy, args.disconnect_max_tokens, args.server_threads, args.dtype, args.quantize) as url:
            result = asyncio.run(disconnect_scenario(url, 32, args.disconnect_max_tokens, texts))
        print(json.dumps({"model": name, **result}, indent=2))
        return
    result: dict = {
        "model": name,
        "threads": args.threads,
        "server_threads": args.server_threads or "product default",
        "max_tokens": args.max_tokens,
        "torch": torch.__version__,
        "parameters": parameters,
        "served_dtype": str(dtype)[6:],
        "served_quantize": quantize,
    }
    # the baseline at 1 thread and at --threads, and the faster counts: one request's tiny matmuls often run faster
    # on one thread than split over two
    by_threads = {}
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        hf_sequential(policy, texts[:2], 8)  # warm-up: the first generate call pays one-off setup costs
        by_threads[threads] = hf_sequential(policy, texts[: args.baseline_requests], args.max_tokens)
    best = max(by_threads, key=lambda t: max(by_threads[t]["tokens_per_s"], by_threads[t]["tokens_per_s_median"]))
    result["baseline_hf_generate_sequential"] = {
        **by_threads[best],
        "threads": best,
        "by_threads": {str(t): round(r["tokens_per_s"], 1) for t, r in by_threads.items()},
    }
    torch.set_num_threads(args.threads)

    # the product path in its own process: `alignd serve` on a published copy of the same model; its client levels
    # and HF's static batch (in float32 and in the serving dtype) take turns, `--rounds` times
    offline = args.offline.split(",")
    statics = {"hf_generate_static_batch": policy}
    if served.dtype != policy.dtype:  # the same static batch in the serving dtype
        statics[f"hf_generate_static_batch_{str(dtype)[6:]}"] = served
    rounds = []
    with alignd_serve(policy, args.max_tokens, args.server_threads, args.dtype, args.quantize) as url:
        asyncio.run(http_clients(url, 1, 1, 8, texts))  # warm-up
        for _ in range(args.rounds):
            one = {"alignd_http": []}
            for clients in [int(x) for x in args.client_levels.split(",")]:
                one["alignd_http"].append(
                    asyncio.run(http_clients(url, clients, args.requests_per_client, args.max_tokens, texts))
                )
            if "static" in offline:
                for key, model in statics.items():
                    one[key] = hf_static_batch(model, texts[:16], args.max_tokens, args.threads)
            http16 = [lv["tokens_per_s"] for lv in one["alignd_http"] if lv["clients"] == 16]
            if http16 and "static" in offline:
                one["http_16_clients_vs_static_batch"] = {
                    k[25:] or "float32": round(http16[0] / one[k]["tokens_per_s"], 2) for k in statics
                }
            rounds.append(one)
    levels = [median_round([r["alignd_http"][i] for r in rounds]) for i in range(len(rounds[0]["alignd_http"]))]
    result["rounds"] = len(rounds)
    result["alignd_http"] = levels
    off = result["offline_16_requests"] = {k: median_round([r[k] for r in rounds]) for k in statics if k in rounds[0]}
    # last: transformers' continuous-batching manager can leave a worker thread behind that would slow later runs
    if "engine" in offline:
        off["alignd_engine"] = engine_offline_process(
            args, args.server_threads or server_threads(parameters) or args.threads
        )
    if "continuous" in offline:
        off["hf_continuous_batching"] = hf_continuous_batching(policy, texts[:16], args.max_tokens, args.threads)
    if "http_16_clients_vs_static_batch" in rounds[0]:
        by_round = {
            k: [r["http_16_clients_vs_static_batch"][k] for r in rounds]
            for k in rounds[0]["http_16_clients_vs_static_batch"]
        }
        result["http_16_clients_vs_static_batch"] = {k: statistics.median(v) for k, v in by_round.items()}
        result["http_16_clients_vs_static_batch_rounds"] = by_round
    if "ceiling" in offline:
        result["forward_only_ceiling"] = forward_ceiling(policy, 16)
    baseline = result["baseline_hf_generate_sequential"]
    base = max(baseline["tokens_per_s"], baseline["tokens_per_s_median"])
    result["speedup_vs_baseline"] = {str(lv["clients"]): round(lv["tokens_per_s"] / base, 2) for lv in levels}
    if "16" in result["speedup_vs_baseline"]:
        result["target_16_clients_8x"] = result["speedup_vs_baseline"]["16"] >= 8
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
