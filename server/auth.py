"""API keys with scopes, sent in the `X-API-Key` header.

Scopes: `predict` (POST /predict) and `admin` (every route that changes something, and
implies `predict`). Reading routes take any valid key. Keys are verified through the
store (which keeps only their sha256 and compares in constant time); the optional
bootstrap admin key from the settings is compared in constant time too. Verified keys are
remembered for `api_key_cache_seconds`, so predict does not ask the database each time.
Keys are looked up on threads of their own (never queued behind handlers that wait on the
database), and while the database is unavailable a key verified before is still taken:
predict keeps answering through a database outage.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi.security import APIKeyHeader

from server.errors import UNAVAILABLE

SCOPE_PREDICT = "predict"
SCOPE_ADMIN = "admin"
SCOPES = frozenset({SCOPE_PREDICT, SCOPE_ADMIN})
API_KEY_HEADER = "X-API-Key"

api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description=(
        "An API key. Scopes: `predict` for POST /predict, `admin` for every route that "
        "changes something (it implies `predict`); reading routes take any valid key."
    ),
)


@dataclass(frozen=True)
class Principal:
    """Who made a request: the scopes of its key."""

    scopes: frozenset[str]

    def allows(self, scope: str | None) -> bool:
        return scope is None or scope in self.scopes or SCOPE_ADMIN in self.scopes


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class Authenticator:
    def __init__(
        self,
        verify: Callable[[str], frozenset[str] | None],
        *,
        enabled: bool = True,
        bootstrap_key: str | None = None,
        cache_seconds: float = 10.0,
        cache_size: int = 4096,
    ) -> None:
        self.verify = verify
        self.enabled = enabled
        self._bootstrap = _digest(bootstrap_key) if bootstrap_key else None
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, tuple[frozenset[str] | None, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dmc-auth")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def scopes(self, key: str | None) -> frozenset[str] | None:
        """The scopes of `key`, or None when it is missing or not valid."""
        if not self.enabled:
            return SCOPES
        if not key:
            return None
        digest = _digest(key)
        if self._bootstrap is not None and hmac.compare_digest(digest, self._bootstrap):
            return SCOPES
        hit = self._cached(digest, fresh=True)
        if hit is not None:
            return hit[0]
        try:
            scopes = await asyncio.get_running_loop().run_in_executor(self._pool, self.verify, key)
        except UNAVAILABLE:
            stale = self._cached(digest, fresh=False)
            if stale is None or stale[0] is None:
                raise
            return stale[0]
        self._remember(digest, scopes)
        return scopes

    def _cached(self, digest: bytes, *, fresh: bool) -> tuple[frozenset[str] | None] | None:
        """(scopes,) remembered for `digest`; with `fresh`, only within the cache time."""
        if self.cache_seconds <= 0:
            return None
        with self._lock:
            entry = self._cache.get(digest)
            if entry is None or (fresh and entry[1] < time.monotonic()):
                return None
            return (entry[0],)

    def _remember(self, digest: bytes, scopes: frozenset[str] | None) -> None:
        if self.cache_seconds <= 0:
            return
        with self._lock:
            self._cache[digest] = (scopes, time.monotonic() + self.cache_seconds)
            self._cache.move_to_end(digest)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def forget(self) -> None:
        """Drop remembered keys (after one is revoked through this server)."""
        with self._lock:
            self._cache.clear()
