"""Prometheus metrics of the API process (served at GET /metrics). Gauges of engine state are set when scraped."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("alignd_chat_requests_total", "chat completion requests", ["status"])
TOKENS = Counter("alignd_generated_tokens_total", "tokens generated", ["version"])
TTFT = Histogram(
    "alignd_time_to_first_token_seconds",
    "time to first token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LATENCY = Histogram(
    "alignd_request_seconds", "chat request latency", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
)
BATCH = Histogram("alignd_engine_batch_size", "sequences per decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
VERSION = Gauge("alignd_policy_version", "policy version currently served")
FEEDBACK = Counter("alignd_feedback_total", "feedback events accepted", ["type"])
CANCELLED = Counter("alignd_engine_cancelled_sequences_total", "sequences dropped because their client went away")
ENGINE_FAILURES = Counter(
    "alignd_engine_failed_sequences_total", "sequences failed by an exception in the engine", ["stage"]
)
RUNNING = Gauge("alignd_engine_running_sequences", "sequences in a running batch of the engine")
DECODE_STEPS = Gauge("alignd_engine_decode_steps", "decode steps run by this process's engine")
ENGINE_THREADS = Gauge(
    "alignd_engine_torch_threads", "torch threads the engine's decode steps run on (0 before the first)"
)
PREFILLS = Gauge("alignd_engine_prefills", "prefill forwards (each over the sequences admitted together) run so far")
ENGINE_UP = Gauge("alignd_engine_up", "1 while the engine's vLLM server answers its health check (vLLM engine)")
ENGINE_FAILED = Gauge("alignd_engine_failed_requests", "requests to vLLM that failed (unreachable, error answers)")
# vLLM's own gauges, re-exported when /metrics is scraped (service/vllm_engine.py VLLM_GAUGES)
VLLM_GAUGES = {
    "running": Gauge("alignd_vllm_requests_running", "requests vLLM is decoding"),
    "waiting": Gauge("alignd_vllm_requests_waiting", "requests waiting in vLLM's queue"),
    "kv_cache_usage": Gauge("alignd_vllm_kv_cache_usage", "fraction of vLLM's KV-cache blocks in use (0-1)"),
}
