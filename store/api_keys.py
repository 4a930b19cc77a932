"""API keys: stored as sha256 hashes; the plaintext is shown once, at creation."""

from __future__ import annotations

import builtins
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select

from store.db import Database
from store.models import ApiKey, utcnow
from store.names import MAX_NAME_LENGTH

KEY_PREFIX = "dmc_"


@dataclass(frozen=True)
class ApiKeyInfo:
    id: int
    name: str
    scopes: frozenset[str]
    created_at: datetime


def hash_key(key: str) -> str:
    # The keys are 256 random bits, so a fast unsalted hash is enough (no guessing).
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, name: str, scopes: Iterable[str]) -> tuple[ApiKeyInfo, str]:
        """Create a key; returns its record and the plaintext key (not retrievable later)."""
        scope_list = sorted(set(scopes))
        if not name.strip() or len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"an API key name is 1 to {MAX_NAME_LENGTH} characters, not blank")
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.db.write() as session:
            row = ApiKey(
                name=name, key_hash=hash_key(plaintext), scopes=scope_list, created_at=utcnow()
            )
            session.add(row)
            session.flush()
            return _info(row), plaintext

    def verify(self, key: str | None) -> frozenset[str] | None:
        """The scopes of `key`, or None if it is not a valid key."""
        if not key or not key.startswith(KEY_PREFIX) or len(key) > MAX_NAME_LENGTH:
            return None
        digest = hash_key(key)
        with self.db.read() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            if row is None or not hmac.compare_digest(row.key_hash, digest):
                return None
            return frozenset(row.scopes)

    def list(self) -> builtins.list[ApiKeyInfo]:
        with self.db.read() as session:
            return [_info(row) for row in session.scalars(select(ApiKey).order_by(ApiKey.id))]

    def revoke(self, key_id: int) -> bool:
        """Delete a key; returns whether it existed."""
        with self.db.write() as session:
            result = session.execute(delete(ApiKey).where(ApiKey.id == key_id))
            return bool(getattr(result, "rowcount", 0))


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=row.id, name=row.name, scopes=frozenset(row.scopes), created_at=row.created_at
    )
