"""Engine comparison of bench/serve.py (`--engine builtin,vllm`): the same model served three ways in one run.

- `alignd_builtin`: `alignd serve` with `ALIGND_ENGINE=builtin` (alignd's own continuous-batching engine);
- `alignd_vllm`: `alignd serve` with `ALIGND_ENGINE=vllm`, which starts and supervises a vLLM OpenAI server from
  `--vllm-python` (a venv with vLLM; alignd never imports it) and drives it over HTTP;
- `vllm_direct`: that same vLLM server called directly, with the request alignd sends it (`POST /v1/completions`,
  the prompt as the token ids of alignd's chat template, the same `max_tokens`, temperature and top_p, streamed).

Each target gets 1, 4, 16 ... streaming clients (`--client-levels`); the targets take turns level by level, their
order rotating, for `--rounds` rounds while the host's speed drifts. Each figure is its median round, each ratio the
median of the rounds' ratios: `alignd_vllm / vllm_direct` is the cost of alignd's front end over vLLM (the target is
at most 5 % fewer tokens/s), `vllm_direct / alignd_builtin` what vLLM gives against alignd's own engine.

All targets sample (temperature 1, random weights) and stop at `max_tokens` or at the end-of-turn token, as a user's
request would: vLLM gets no `ignore_eos`, since alignd does not send one, so the three draw their lengths from the
same distribution and tokens/s counts the tokens each produced (`tokens_per_request` shows they match). A model whose
embedding has rows past its tokenizer (`--shape smollm2-135m`: 49,152 rows, 1,024 tokens) would mostly sample those
padding rows, which decode to no text, so the first text (TTFT) would come after dozens of tokens: its padding rows
and end-of-turn row are zeroed and its real rows scaled up (`real_tokens_only`), which leaves the compute as it was
and makes every sampled token a visible one. vLLM 0.32 has no LoRA for GPT-2, so the built-in size is compared as a
Llama of the built-in model's size and tokenizer (`default_policy("llama")`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
from pathlib import Path

import httpx
import torch

from bench import serve
from core.redis_server import free_port

TARGETS = ("alignd_builtin", "alignd_vllm", "vllm_direct")


def vllm_python(given: str | None) -> str:
    """The python of a venv with vLLM: `--vllm-python`, else ALIGND_VLLM_PYTHON or VLLM_PYTHON."""
    python = given or os.environ.get("ALIGND_VLLM_PYTHON") or os.environ.get("VLLM_PYTHON")
    if not python or not Path(python).exists():
        raise SystemExit(
            "the vLLM comparison needs the python of a venv with vLLM: --vllm-python, ALIGND_VLLM_PYTHON or "
            f"VLLM_PYTHON (got {python!r})"
        )
    return python


@torch.no_grad()
def real_tokens_only(model, tokenizer, scale: float = 20.0) -> bool:
    """Make a random-weight model with padding rows in its (tied) embedding sample real tokens (module docstring):
    the padding rows and the end-of-turn row become zero (logit 0), the real rows `scale` times larger (logits of
    std ~ scale x 0.02 x sqrt(hidden), far above 0). Same shapes, same compute. False when there is nothing to do."""
    emb = model.get_input_embeddings().weight
    real = len(tokenizer)
    if emb.shape[0] <= real:
        return False
    emb[:real] *= scale
    emb[real:] = 0
    if tokenizer.eos_token_id is not None:
        emb[tokenizer.eos_token_id] = 0
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.data_ptr():  # an untied head: the same on its rows
        head.weight[:real] *= scale
        head.weight[real:] = 0
    return True


def completion_text(chunk: dict) -> str | None:
    return chunk["choices"][0].get("text") if chunk.get("choices") else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def level_ratios(by_target: dict[str, dict]) -> dict[str, float | None]:
    """One round's ratios at one client level."""
    tps = {k: v["tokens_per_s"] for k, v in by_target.items()}
    ttft = {k: v["ttft_p50_s"] for k, v in by_target.items()}
    out = {
        "alignd_vllm_over_vllm_direct": ratio(tps.get("alignd_vllm"), tps.get("vllm_direct")),
        "vllm_direct_over_alignd_builtin": ratio(tps.get("vllm_direct"), tps.get("alignd_builtin")),
        "alignd_vllm_over_alignd_builtin": ratio(tps.get("alignd_vllm"), tps.get("alignd_builtin")),
        "ttft_p50_alignd_vllm_over_vllm_direct": ratio(ttft.get("alignd_vllm"), ttft.get("vllm_direct")),
        "ttft_p50_vllm_direct_over_alignd_builtin": ratio(ttft.get("vllm_direct"), ttft.get("alignd_builtin")),
    }
    return {k: v for k, v in out.items() if v is not None}


class Targets:
    """The running servers and how to load each one: `run(target, clients)` → stream_load's record."""

    def __init__(self, policy, texts: list[str], max_tokens: int, per_client: int):
        self.policy, self.texts, self.max_tokens, self.per_client = policy, texts, max_tokens, per_client
        self.urls: dict[str, str] = {}
        self.vllm_model = ""
        self.vllm_context = policy.context
        self.prompt_ids = [policy.encode_chat([{"role": "user", "content": t}]) for t in texts]

    def attach_vllm(self, url: str) -> None:
        """The vLLM server `alignd serve` started: its base model's name and context, as alignd's engine reads them."""
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        self.urls["vllm_direct"] = url
        self.vllm_model, self.vllm_context = model["id"], int(model["max_model_len"])

    def direct_body(self, i: int) -> dict:
        """What service/vllm_engine.py sends vLLM for the chat request `serve.chat_body(texts[i])`."""
        ids = self.prompt_ids[i % len(self.prompt_ids)]
        return {
            "model": self.vllm_model,
            "prompt": ids,
            "max_tokens": min(self.max_tokens, max(1, self.vllm_context - len(ids))),
            "temperature": 1.0,
            "top_p": 1.0,
            "stream": True,
            "return_token_ids": True,
            "stream_options": {"include_usage": True},
        }

    def run(self, target: str, clients: int, per_client: int | None = None, max_tokens: int | None = None) -> dict:
        per_client = per_client or self.per_client
        m = max_tokens or self.max_tokens
        url = self.urls[target]
        if target == "vllm_direct":  # the vLLM server's processes: the descendants of `alignd serve`
            pid = serve.SERVER_PIDS[self.urls["alignd_vllm"]]
            body = self.direct_body if m == self.max_tokens else lambda i: {**self.direct_body(i), "max_tokens": m}
            record = serve.stream_load(
                url,
                body,
                clients,
                per_client,
                path="/v1/completions",
                text_of=completion_text,
                cpu_of=lambda: serve.tree_cpu_seconds(pid, include_root=False),
            )
        else:  # alignd serve, and with vLLM everything it started
            pid = serve.SERVER_PIDS[url]
            texts = self.texts
            record = serve.stream_load(
                url,
                lambda i: serve.chat_body(texts[i % len(texts)], m),
                clients,
                per_client,
                cpu_of=lambda: serve.tree_cpu_seconds(pid),
            )
        front0 = serve.cpu_seconds(pid)
        out = asyncio.run(record)
        front = serve.cpu_seconds(pid) - front0
        out["tokens_per_request"] = round(out["tokens"] / max(1, out["requests"]), 2)
        if target == "alignd_vllm":  # of server_cpu_us_per_token, what alignd's own process spent (the rest: vLLM's)
            out["alignd_process_cpu_us_per_token"] = round(front / max(out["tokens"], 1) * 1e6, 1)
        return out


def compare_engines(args, policy, name: str, texts: list[str]) -> dict:
    """The `--engine` mode of bench/serve.py (module docstring)."""
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    unknown = set(engines) - {"builtin", "vllm"}
    if unknown:
        raise SystemExit(f"--engine: unknown {sorted(unknown)}; choose from builtin, vllm")
    targets = [t for t in TARGETS if ("builtin" if t == "alignd_builtin" else "vllm") in engines]
    levels = [int(x) for x in args.client_levels.split(",")]
    patched = real_tokens_only(policy.model, policy.tokenizer)
    result: dict = {
        "model": name,
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "architecture": type(policy.model).__name__,
        "padding_rows_zeroed": patched,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "torch": torch.__version__,
        "device": os.environ.get("ALIGND_DEVICE", "auto"),
        "targets": targets,
    }
    run = Targets(policy, texts, args.max_tokens, args.requests_per_client)
    servers = []
    if "alignd_builtin" in targets:
        servers.append(("alignd_builtin", {"ALIGND_ENGINE": "builtin"}))
    if "alignd_vllm" in targets:
        python = vllm_python(args.vllm_python)
        result["vllm_python"] = python
        vllm_port = free_port()
        # ALIGND_VLLM_URL empty: `alignd serve` starts its own vLLM, on a port we know, whatever the environment says
        env = {"ALIGND_ENGINE": "vllm", "ALIGND_VLLM_PYTHON": python, "ALIGND_VLLM_PORT": str(vllm_port)}
        servers.append(("alignd_vllm", {**env, "ALIGND_VLLM_URL": ""}))
    with _servers(policy, args, servers) as urls:
        run.urls.update(urls)
        if "alignd_vllm" in urls:
            run.attach_vllm(f"http://127.0.0.1:{vllm_port}")
        for target in targets:  # warm-up: one-off costs (allocator, thread pools, vLLM's first batch shapes)
            run.run(target, 1, 1, 8)
            run.run(target, max(levels), 1)
        rounds = []
        for i in range(args.rounds):
            order = targets[i % len(targets) :] + targets[: i % len(targets)]
            one = {}
            for clients in levels:
                by_target = {t: run.run(t, clients) for t in order}
                one[str(clients)] = {"records": by_target, "ratios": level_ratios(by_target)}
                tps = ", ".join(f"{t} {by_target[t]['tokens_per_s']:.1f}" for t in targets)
                print(f"round {i + 1}, {clients} clients: tokens/s {tps}", file=sys.stderr, flush=True)
            rounds.append(one)
    result["rounds"] = len(rounds)
    result["levels"] = {str(c): _level_summary([r[str(c)] for r in rounds], targets) for c in levels}
    return result


def _level_summary(rounds: list[dict], targets: list[str]) -> dict:
    out: dict = {t: serve.median_round([r["records"][t] for r in rounds]) for t in targets}
    names = rounds[0]["ratios"].keys()
    by_round = {k: [r["ratios"].get(k) for r in rounds] for k in names}
    out["ratios"] = {k: round(statistics.median([v for v in vs if v is not None]), 3) for k, vs in by_round.items()}
    out["ratios_rounds"] = by_round
    if "alignd_vllm_over_vllm_direct" in out["ratios"]:
        overhead = 1 - out["ratios"]["alignd_vllm_over_vllm_direct"]
        out["front_end_overhead_pct"] = round(100 * overhead, 1)
        out["target_overhead_at_most_5pct"] = overhead <= 0.05
    return out


@contextlib.contextmanager
def _servers(policy, args, servers: list[tuple[str, dict]]):
    """Every `alignd serve` of the comparison, started one after another and stopped together: yields {target: url}."""
    with contextlib.ExitStack() as stack:
        urls = {}
        for target, env in servers:
            vllm = env.get("ALIGND_ENGINE") == "vllm"
            urls[target] = stack.enter_context(
                serve.alignd_serve(
                    policy,
                    args.max_tokens,
                    args.server_threads,
                    args.dtype,
                    args.quantize,
                    env_extra=env,
                    ready_timeout_s=args.vllm_start_timeout if vllm else 120.0,  # vLLM loads and warms up first
                )
            )
        yield urls
