"""API keys: created by the CLI, stored as sha256, checked on every /v1 route.

Scopes nest: admin can do everything, debit can also read, read only reads.
A route names the scope it needs in its `opt={"scope": ...}`."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from typing import Literal

import asyncpg
import msgspec
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from centime.errors import Forbidden, Unauthorized
from centime.sql import load_queries

Q = load_queries("centime", "queries/queries.sql")
Scope = Literal["admin", "debit", "read"]
SCOPE_RANK: dict[str, int] = {"read": 0, "debit": 1, "admin": 2}
KEY_PREFIX = "ck_"
KEY_CHARS_MAX = 128
CACHE_ENTRIES_MAX = 10_000


class ApiKey(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    scope: str


def _sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def create_api_key(conn: asyncpg.Connection, name: str, scope: Scope) -> tuple[ApiKey, str]:
    """Returns the key and its secret. The secret is not stored: show it once."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(uuid.uuid4(), name, scope)
    await conn.execute(Q["api_key_insert"], key.id, name, scope, _sha256(secret))
    return key, secret


class KeyStore:
    """Looks keys up by hash, caching answers (found or not) for ttl_s."""

    def __init__(self, pool: asyncpg.Pool, ttl_s: float) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        self._cache: dict[bytes, tuple[float, ApiKey | None]] = {}

    async def lookup(self, secret: str) -> ApiKey | None:
        digest = _sha256(secret)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(Q["api_key_by_hash"], digest)
        key = None if row is None else ApiKey(row["id"], row["name"], row["scope"])
        if len(self._cache) >= CACHE_ENTRIES_MAX:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl_s, key)
        return key


async def authorize(header: str, needed: str, store: KeyStore) -> ApiKey:
    """The key of an `Authorization: Bearer <key>` header, if its scope covers `needed`."""
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret or len(secret) > KEY_CHARS_MAX:
        raise Unauthorized("send an API key: Authorization: Bearer <key>")
    key = await store.lookup(secret.strip())
    if key is None:
        raise Unauthorized("unknown or revoked API key")
    if SCOPE_RANK[key.scope] < SCOPE_RANK[needed]:
        raise Forbidden(f"this key has scope {key.scope!r}; the route needs {needed!r}")
    return key


async def require_scope(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Litestar guard: a valid bearer key whose scope covers the route's."""
    needed = handler.opt.get("scope")
    if needed is None:
        return
    store: KeyStore = connection.app.state.key_store
    key = await authorize(connection.headers.get("authorization", ""), needed, store)
    connection.scope["state"]["api_key"] = key
