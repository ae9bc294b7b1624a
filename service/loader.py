"""Loading a registered policy version for serving: sha256 manifest check, then a smoke test, then it may serve."""

from __future__ import annotations

import redis

from core.config import Settings
from service.engine import Engine, Policy, SamplingParams
from store import registry
from training.checkpoint import verify_checkpoint


def smoke_test(policy) -> None:
    """A loaded policy must produce some text for a trivial prompt before it is served."""
    engine = Engine(policy, max_batch_size=1)
    engine.start()
    try:
        text, _, n = engine.generate([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0,
                                                                                           max_tokens=4))
    finally:
        engine.stop()
    if n < 1:
        raise RuntimeError("smoke test: the policy produced no tokens")


def load_version(r: redis.Redis, settings: Settings, version: int):
    """Verify and load a registered version for serving; raises on a corrupt or unloadable checkpoint."""
    meta = registry.get_version(r, version)
    if meta is None:
        raise KeyError(f"version {version} is not in the registry")
    path = settings.checkpoint(meta["path"])
    verify_checkpoint(path)
    policy = Policy.load(version, path, settings.torch_device())
    smoke_test(policy)
    return policy
