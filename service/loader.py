"""Loading a registered policy version for serving: sha256 manifest check, then a smoke test, then it may serve.

A policy whose smoke test raises or does not answer within `settings.smoke_test_timeout_s` is refused exactly like a
corrupt checkpoint (`PolicyRejected`): the registry follower keeps serving the old version, `alignd serve` exits.

With the vLLM engine (service/vllm_engine.py) the same checks come first, then the version goes into vLLM: the base
version is the model vLLM serves, an adapter version is registered as `alignd-vN` once its base digest matches that
model's, and the smoke test runs through vLLM. A full-weight version other than the base is refused with the reason:
vLLM cannot swap a whole model without dropping the requests on the old one.
"""

from __future__ import annotations

import redis

from core.config import Settings
from service.engine import Engine, Policy, SamplingParams
from store import registry
from training.checkpoint import verify_checkpoint
from training.lora import BaseCache, BaseMismatch, adapter_base, folder_digest

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


def load_version(r: redis.Redis, settings: Settings, version: int, engine=None):
    """Verify and load a registered version for serving (into `engine` when it is a vLLM engine); raises on a corrupt
    or unloadable checkpoint or a failed smoke test."""
    meta = registry.get_version(r, version)
    if meta is None:
        raise KeyError(f"version {version} is not in the registry")
    path = settings.checkpoint(meta["path"])
    verify_checkpoint(path)
    if getattr(engine, "kind", "builtin") == "vllm":
        return load_into_vllm(engine, settings, version, path)
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


def load_into_vllm(engine, settings: Settings, version: int, path):
    """Version `version` (checked folder `path`) as the vLLM engine serves it: its base, or its adapter registered
    and smoke-tested through vLLM."""
    from service.vllm_engine import ServedVersion

    base = adapter_base(path)
    if base is None:
        if folder_digest(path) == engine.base_digest:
            return ServedVersion(version, engine.base.model, engine.base.tokenizer, engine.base.context, str(path))
        raise PolicyRejected(
            f"policy v{version} is a full-weight checkpoint and vLLM serves another model: vLLM swaps adapters, not "
            "whole models, without dropping requests. Train LoRA versions (the cycle does with ALIGND_ENGINE=vllm), "
            f"or restart alignd serve on v{version} to make it vLLM's base"
        )
    if base.get("digest") != engine.base_digest:
        raise BaseMismatch(
            f"policy v{version} is an adapter of base {base.get('base')!r} (digest {str(base.get('digest'))[:12]}), "
            f"but vLLM serves {engine.base.path} (digest {engine.base_digest[:12]})"
        )
    name = engine.load_adapter(version, path)
    served = ServedVersion(version, name, engine.base.tokenizer, engine.base.context, str(path), adapter=True)
    try:
        smoke_test_vllm(engine, served, settings.smoke_test_timeout_s)
    except Exception:
        engine.unload_adapter(name)
        raise
    return served


def smoke_test_vllm(engine, served, timeout_s: float) -> None:
    """The smoke test through vLLM: a greedy answer of `SMOKE_TOKENS` tokens from `served`'s model name."""
    params = SamplingParams(temperature=0, max_tokens=SMOKE_TOKENS)
    handle = engine.submit(SMOKE_PROMPT, params, policy=served, stream=False)
    try:
        _, _, n = handle.wait(timeout_s)
    except TimeoutError:
        engine.cancel(handle)
        raise PolicyRejected(
            f"smoke test: policy v{served.version} produced no answer through vLLM within {timeout_s} s"
        ) from None
    except Exception as exc:
        raise PolicyRejected(f"smoke test: policy v{served.version} failed to generate through vLLM: {exc}") from None
    if n < 1:
        raise PolicyRejected(f"smoke test: policy v{served.version} produced no tokens through vLLM")
