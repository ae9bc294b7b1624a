"""Build a served alignd app around a tiny random model, through the production path: publish → verify → load."""

from __future__ import annotations

from pathlib import Path

from core.config import Settings
from service.app import create_app
from service.engine import Engine
from service.loader import load_version
from store.client import connect
from tests.utils.tiny import tiny_model, tiny_tokenizer
from workers.publish import publish_version

USER_KEY, OTHER_KEY, ADMIN_KEY = "sk-test-alice", "sk-test-bob", "sk-test-admin"


def make_settings(home: Path, **overrides) -> Settings:
    return Settings(home=home, api_keys=f"{USER_KEY}:alice,{OTHER_KEY}:bob", admin_key=ADMIN_KEY, **overrides)


def publish_tiny(
    redis_url: str,
    settings: Settings,
    arch: str = "gpt2",
    seed: int = 0,
    parent: int | None = None,
    expected: int | None | str = "any",
) -> int:
    model, tok = tiny_model(arch, seed=seed), tiny_tokenizer()
    return publish_version(
        connect(redis_url),
        settings,
        lambda d: (model.save_pretrained(d), tok.save_pretrained(d)),
        {"source": "test", "arch": arch, "parent": parent, "metrics": {}},
        expected_current=expected,
    )


def served_app(redis_url: str, settings: Settings, arch: str = "gpt2"):
    """An app serving a freshly published tiny `arch` model as the current version."""
    r = connect(redis_url)
    version = publish_tiny(redis_url, settings, arch)
    engine = Engine(load_version(r, settings, version), max_batch_size=settings.max_batch_size)
    return create_app(settings, redis_url, engine)
