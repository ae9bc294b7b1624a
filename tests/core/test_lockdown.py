"""Locked-down internals: the embedded Redis wants a password only its owner can read, homes are created 0700,
production refuses failpoints and placeholder Flower passwords, ALIGND_API_KEYS options are parsed strictly."""

from __future__ import annotations

import stat
from datetime import UTC, datetime

import pytest
import redis
from pydantic import ValidationError

from core.config import KeyGrant, Settings, parse_key_entry
from core.redis_server import EmbeddedRedis, ensure_redis

PROD = {"env": "production", "api_keys": "sk-real-secret:alice", "admin_key": "sk-real-admin"}


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_embedded_redis_needs_its_generated_password(tmp_path):
    home = tmp_path / "home"
    url, server = ensure_redis(None, home)
    try:
        assert mode(home) == 0o700 and mode(home / "redis") == 0o700
        assert mode(home / "redis" / "redis.conf") == 0o600 and mode(home / "redis" / "url") == 0o600
        assert redis.Redis.from_url(url).ping()
        bare = url.split("@", 1)[1]
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://{bare}").get("x")
        assert server.password() not in " ".join(open(f"/proc/{server.process.pid}/cmdline").read().split("\0"))
        assert EmbeddedRedis(home / "redis").running_url() == url  # another process of the same home finds it
    finally:
        server.stop()


def test_production_refuses_failpoints():
    with pytest.raises(ValidationError, match="FAILPOINTS"):
        Settings(**PROD, failpoints="after_publish=kill")
    assert Settings(**PROD).failpoints == ""
    assert Settings(failpoints="after_publish=kill").failpoints  # development: drills allowed


def test_key_options_are_parsed_strictly():
    assert parse_key_entry("k:site:feedback+expires=2027-01-31") == (
        "k",
        KeyGrant(user="site", feedback_only=True, expires=datetime(2027, 1, 31, tzinfo=UTC)),
    )
    assert parse_key_entry("k:lab:annotator")[1].annotator
    for bad in ("k:site:feeback", "k:site:expires=soon", "k:", ":site"):
        with pytest.raises(ValueError):
            parse_key_entry(bad)
    with pytest.raises(ValidationError, match="unknown option"):
        Settings(api_keys="k1:a,k2:b:admin")


def test_flower_refuses_a_placeholder_password_in_production(tmp_path, monkeypatch):
    from alignd.commands.run import flower_credentials

    monkeypatch.setenv("FLOWER_BASIC_AUTH", "admin:changethis")
    with pytest.raises(ValueError, match="FLOWER_BASIC_AUTH"):
        flower_credentials(tmp_path, production=True)
    assert flower_credentials(tmp_path) == ("admin:changethis", False)  # development: allowed
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "admin:a-long-real-secret")
    assert flower_credentials(tmp_path, production=True) == ("admin:a-long-real-secret", False)


def test_registry_paths_cannot_climb_out_of_the_checkpoint_root(tmp_path):
    settings = Settings(home=tmp_path)
    assert settings.checkpoint("v3") == settings.checkpoints_dir / "v3"
    for escape in ("../../etc", "v3/../../keys.json", "../checkpoints-other/v1"):
        with pytest.raises(ValueError, match="leaves the checkpoint root"):
            settings.checkpoint(escape)


def test_absolute_registry_paths_must_lie_in_the_checkpoint_root(tmp_path):
    settings = Settings(home=tmp_path / "home")
    root = settings.checkpoints_dir
    (root / "v3").mkdir(parents=True)
    assert settings.checkpoint(str(root / "v3")) == root / "v3"  # absolute inside the root: served as before
    outside = tmp_path / "elsewhere" / "v9"
    outside.mkdir(parents=True)
    (root / "link").symlink_to(outside)
    for escape in ("/etc", str(outside), str(root / "link"), "link", "/"):
        with pytest.raises(ValueError, match="leaves the checkpoint root"):
            settings.checkpoint(escape)
    # an absolute path of a moved home: the root's folder of the same name, never the old place
    old = tmp_path / "old-home" / "checkpoints" / "v3"
    old.mkdir(parents=True)
    assert settings.checkpoint(str(old)) == root / "v3"
