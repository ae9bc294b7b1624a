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
# adapter versions: their base (the SFT version) stays in memory, so a swap reads and hashes only the adapter; a
# deployment that fine-tunes in full keeps no second model
BASES = BaseCache()


class PolicyRejected(RuntimeError):
    """A policy loaded but failed its smoke test: it must not serve."""


def smoke_test(policy: Policy, timeout_s: float = 60.0) -> None:
    """A loaded policy must produce some text for a trivial prompt, within `timeout_s`, before it is served."""
    engine = Engine(policy, max_batch_size=1)
    engine.start()
    try:
        _, _, n = engine.generate(
            SMOKE_PROMPT, SamplingParams(temperature=0, max_tokens=SMOKE_TOKENS), timeout=timeout_s
        )
    except TimeoutError:
        raise PolicyRejected(f"smoke test: policy v{policy.version} produced no answer within {timeout_s} s") from None
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
    )
    smoke_test(policy, settings.smoke_test_timeout_s)
    if meta.get("source") in ("sft", "base"):  # verified and smoke-tested: what adapter versions are trained on
        # in the serving dtype: a later adapter merges into it (one model in memory rather than a float32 copy too)
        BASES.offer(path, policy.model, policy.tokenizer, device)
    elif adapter_base(path) is None:  # a full fine-tune: no adapter follows it, so keep no second model in memory
        BASES.clear()
    return policy
