"""API keys: `ALIGND_API_KEYS` maps keys to user ids and what each may do (`core.config.KeyGrant`: feedback-only,
trusted annotation tool, expiry); `ALIGND_ADMIN_KEY` is separate. With none configured, keys are generated on first
start and kept in `ALIGND_HOME/keys.json` (mode 0600) — never an open server by default."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from core.config import KeyGrant, Settings


@dataclass(frozen=True)
class Keyring:
    users: dict[str, str]  # key → user id
    admin_key: str
    generated: bool = False
    grants: dict[str, KeyGrant] = field(default_factory=dict)  # key → what it may do (plain keys: everything)

    def grant(self, key: str) -> KeyGrant:
        return self.grants.get(key) or KeyGrant(user=self.users[key])


@dataclass(frozen=True)
class Caller:
    user: str  # the key's user id: what owns completions and what the per-key totals count
    is_admin: bool
    feedback_only: bool = False
    annotator: bool = False  # a trusted annotation tool (see KeyGrant)


class KeyExpired(Exception):
    def __init__(self, expires: datetime):
        super().__init__(f"this API key expired at {expires.isoformat()}: ask the operator for a new one")


def load_keyring(settings: Settings) -> Keyring:
    grants = settings.key_grants()
    admin = settings.admin_key
    generated = False
    if not grants or not admin:
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
        grants = grants or {key: KeyGrant(user=user) for key, user in stored["users"].items()}
        admin = admin or stored["admin_key"]
    users = {key: grant.user for key, grant in grants.items()}
    return Keyring(users=users, admin_key=admin, generated=generated, grants=grants)


def _same(a: str, b: str) -> bool:
    # bytes: compare_digest refuses str holding non-ASCII characters, and a header may carry any latin-1 byte
    return secrets.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def identify(keyring: Keyring, key: str | None, now: datetime | None = None) -> Caller | None:
    """The caller a key names, None for an unknown key; raises KeyExpired for a known key past its expiry."""
    if not key:
        return None
    if _same(key, keyring.admin_key):
        return Caller(user="admin", is_admin=True)
    for known in keyring.users:
        if _same(key, known):
            grant = keyring.grant(known)
            if grant.expires is not None and (now or datetime.now(UTC)) >= grant.expires:
                raise KeyExpired(grant.expires)
            return Caller(grant.user, is_admin=False, feedback_only=grant.feedback_only, annotator=grant.annotator)
    return None
