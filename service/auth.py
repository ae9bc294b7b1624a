"""API keys: `ALIGND_API_KEYS` maps keys to user ids; `ALIGND_ADMIN_KEY` is separate. With none configured, keys
are generated on first start and kept in `ALIGND_HOME/keys.json` (mode 0600) — never an open server by default."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from core.config import Settings


@dataclass(frozen=True)
class Keyring:
    users: dict[str, str]  # key → user id
    admin_key: str
    generated: bool = False


@dataclass(frozen=True)
class Caller:
    user: str
    is_admin: bool


def load_keyring(settings: Settings) -> Keyring:
    users = settings.user_keys()
    admin = settings.admin_key
    generated = False
    if not users or not admin:
        path: Path = settings.home / "keys.json"
        if path.exists():
            stored = json.loads(path.read_text())
        else:
            stored = {
                "users": {f"sk-alignd-{secrets.token_urlsafe(18)}": "user"},
                "admin_key": f"sk-admin-{secrets.token_urlsafe(18)}",
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(stored, f, indent=2)
            generated = True
        users = users or stored["users"]
        admin = admin or stored["admin_key"]
    return Keyring(users=users, admin_key=admin, generated=generated)


def identify(keyring: Keyring, key: str | None) -> Caller | None:
    if not key:
        return None
    if secrets.compare_digest(key, keyring.admin_key):
        return Caller(user="admin", is_admin=True)
    for known, user in keyring.users.items():
        if secrets.compare_digest(key, known):
            return Caller(user=user, is_admin=False)
    return None
