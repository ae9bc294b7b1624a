"""Loading a registered policy version for serving: sha256 manifest check, then a smoke test, then it may serve.

A policy whose smoke test raises or does not answer within `settings.smoke_test_timeout_s` is refused exactly like a
corrupt checkpoint (`PolicyRejected`): the registry follower keeps serving the old version, `alignd serve` exits.
"""

from __future__ import annotations

import redis

from core.config import Settings
from service.engine import Engine, Policy, SamplingParams
from store import registry
from training.checkpoint import verify_checkpoint
from training.lora import BaseCache, adapter_base

SMOKE_PROMPT = [{"role": "user", "content": "Hello"}]
SMOKE_TOKENS = 2  # a prefill and one decode step: both paths a request takes (each more token only adds time)
# an adapter merged into a base this process has smoke-tested runs the very same modules (training.lora.merged_copy
# copies the base's structure): only weights are new, and one prompt token runs every one of them. The full 10-token
# chat prompt's prefill was ~2/3 of the test at the 135 M shape (bench/cycle.py api_load_breakdown_s)
ADAPTER_SMOKE_PROMPT_TOKENS = 1
# adapter versions: their base (the SFT version) stays in memory, so a swap reads and hashes only the adapter; a
# deployment that fine-tunes in full keeps no second model
BASES = BaseCache()


class PolicyRejected(RuntimeError):
    """A policy loaded but failed its smoke test: it must not serve."""


class SmokeTestTimeout(PolicyRejected):
    """The smoke test did not answer in time: maybe the policy hangs, maybe the machine was busy (worth a retry)."""


def smoke_test(policy: Policy, timeout_s: float = 60.0, prompt_tokens: int | None = None) -> None:
    """A loaded policy must produce some text for a trivial prompt, within `timeout_s`, before it is served.
    `prompt_tokens` keeps only the chat prompt's last tokens (the tokenizer and chat template still run)."""
    engine = Engine(policy, max_batch_size=1, threads=1)  # a short check: no thread pool of its own
    engine.start()
    handle = None
    try:
        ids = policy.encode_chat(SMOKE_PROMPT)[-prompt_tokens:] if prompt_tokens else None
        handle = engine.submit(SMOKE_PROMPT, SamplingParams(temperature=0, max_tokens=SMOKE_TOKENS), prompt_ids=ids)
        _, _, n = handle.wait(timeout_s)
    except TimeoutError:
        engine.cancel(handle)
        msg = f"smoke test: policy v{policy.version} produced no answer within {timeout_s} s"
        raise SmokeTestTimeout(msg) from None
    except Exception as exc:  # the engine reports the forward's own error: keep its text for the refusal reason
        raise PolicyRejected(f"smoke test: policy v{policy.version} failed to generate: {exc}") from None
    finally:
        engine.stop(timeout=1.0)  # a forward that hangs must not hang the caller too (the thread is a daemon)
    if n < 1:
        raise PolicyRejected(f"smoke test: policy v{policy.version} produced no tokens")


def load_version(r: redis.Redis, settings: Settings, version: int) -> Policy:
    """Verify and load a registered version for serving; raises on a corrupt or unloadable checkpoint or a failed
    smoke test."""
    meta = registry.get_version(r, version)
    if meta is None:
        raise KeyError(f"version {version} is not in the registry")
    path = settings.checkpoint(meta["path"])
    verify_checkpoint(path)
    device = settings.torch_device()
    policy = Policy.load(
        version,
        path,
        device,
        resolve_base=settings.checkpoint,
        base_cache=BASES,
        dtype=lambda parameters: settings.serving_dtype(parameters, device),
        compile=settings.compile,
        quantize=lambda parameters, dtype: settings.serving_quantize(parameters, dtype, device),
        quantize_in_background=True,  # not in the swap's critical path (service/engine.py)
    )
    adapter = adapter_base(path) is not None
    try:
        smoke_test(policy, settings.smoke_test_timeout_s, ADAPTER_SMOKE_PROMPT_TOKENS if adapter else None)
    finally:
        if adapter:  # the merge used the base cache's spare memory (training/lora.py): prepare the next one
            BASES.refill_spare()
    if not adapter and meta.get("source") in ("sft", "base"):  # verified, smoke-tested: what adapters are trained on
        # in the serving dtype: a later adapter merges into it (one model in memory rather than a float32 copy too)
        BASES.offer(path, policy.model, policy.tokenizer, device)
    elif not adapter:  # a full fine-tune: no adapter follows it, so keep no second model in memory
        BASES.clear()
    return policy
