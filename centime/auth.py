"""API keys: created by the CLI, stored as sha256, checked on every /v1 route.

Scopes nest: admin can do everything, debit can also read, read only reads.
A route under /v1 names the scope it needs in its `opt={"scope": ...}`, or
PUBLIC_SCOPE with a reason; a route that names none is a startup error.

A key with owner ids sees only those owners' wallets (the services answer
other wallets as missing); a key without sees every owner's.

Each process caches keys (docs/architecture.md, "API keys"): known keys in
one bounded LRU, unknown ones in another, so a flood of random keys never
evicts a valid one; misses are looked up at a bounded rate; and a background
poll learns revocations within REVOCATION_POLL_S, whatever the cache TTL."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Literal

import asyncpg
import msgspec
from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from centime.errors import Forbidden, Unauthorized
from centime.sql import load_queries

log = logging.getLogger(__name__)
Q = load_queries("centime", "queries/queries.sql")
Scope = Literal["admin", "debit", "read"]
SCOPE_RANK: dict[str, int] = {"read": 0, "debit": 1, "admin": 2}
PUBLIC_SCOPE = "public"
"""opt={"scope": PUBLIC_SCOPE}: a /v1 route that takes no API key, on purpose (say why beside it)."""
SPANS_OWNERS = "spans_owners"
"""opt={SPANS_OWNERS: True}: the route shows data of every owner; keys with owner ids are refused it."""
GUARDED_PREFIX = "/v1"

KEY_PREFIX = "ck_"
KEY_SECRET_BYTES = 32
KEY_CHARS = len(KEY_PREFIX) + 43
"""What create_api_key makes: the prefix and token_urlsafe(32), 43 characters."""
_KEY_SHAPE = re.compile(r"ck_[A-Za-z0-9_-]{43}\Z")
OWNERS_PER_KEY_MAX = 100
OWNER_ID_CHARS_MAX = 128
"""As wallets.owner_id."""

KNOWN_KEYS_MAX = 10_000
"""Valid keys cached per process (least recently used goes first)."""
UNKNOWN_KEYS_MAX = 10_000
"""Unknown or revoked keys cached per process, apart from the valid ones."""
UNKNOWN_LOOKUPS_PER_S = 50
UNKNOWN_LOOKUPS_BURST = 200
"""Keys in neither cache are looked up at most this fast; beyond it, 401 without a lookup."""
REVOCATION_POLL_S = 0.5
REVOCATION_OVERLAP = timedelta(seconds=10)
"""Each poll asks again for this much before the previous one: a revocation
whose commit came late, or a lookup in flight while it committed, is caught
by a later poll."""
REVOKED_PER_POLL_MAX = 1000
"""More revocations than this in one window: every cached key is looked up again."""
USE_WRITES_IN_FLIGHT_MAX = 64
RECENTLY_USED_DAYS = 2
"""A starting process caches the keys used today and yesterday."""
SECONDS_PER_DAY = 86_400
NEVER_USED_DAY = -1

MISSING_KEY_DETAIL = "send an API key: Authorization: Bearer <key>"
MALFORMED_KEY_DETAIL = f"malformed API key: centime keys are {KEY_PREFIX!r} and 43 URL-safe characters"
UNKNOWN_KEY_DETAIL = "unknown or revoked API key"


class ApiKey(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    scope: str
    owner_ids: frozenset[str] | None = None
    """None: every owner's wallets."""


class ApiKeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A key as `centime api-key list` shows it (never its secret)."""

    id: uuid.UUID
    name: str
    scope: str
    owner_ids: list[str] | None
    created_at: datetime
    last_used_on: date | None
    revoked_at: datetime | None


def _sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def well_formed(secret: str) -> bool:
    return len(secret) == KEY_CHARS and _KEY_SHAPE.match(secret) is not None


def valid_owner_ids(owner_ids: Iterable[str]) -> frozenset[str]:
    """The owner ids of a key, or ValueError saying what is wrong."""
    chosen = frozenset(owner_ids)
    if not 1 <= len(chosen) <= OWNERS_PER_KEY_MAX:
        raise ValueError(f"a key names 1..{OWNERS_PER_KEY_MAX} owners, not {len(chosen)}")
    for owner_id in sorted(chosen):
        if not 1 <= len(owner_id) <= OWNER_ID_CHARS_MAX:
            raise ValueError(f"owner id {owner_id[:40]!r}: 1..{OWNER_ID_CHARS_MAX} characters")
    return chosen


async def create_api_key(
    conn: asyncpg.Connection, name: str, scope: Scope, owner_ids: Iterable[str] | None = None
) -> tuple[ApiKey, str]:
    """Returns the key and its secret. The secret is not stored: show it once."""
    owners = None if owner_ids is None else valid_owner_ids(owner_ids)
    secret = KEY_PREFIX + secrets.token_urlsafe(KEY_SECRET_BYTES)
    key = ApiKey(uuid.uuid4(), name, scope, owners)
    await conn.fetchval(
        Q["api_key_insert"], key.id, name, scope, _sha256(secret), None if owners is None else sorted(owners)
    )
    return key, secret


def _record(row: asyncpg.Record) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row["id"],
        name=row["name"],
        scope=row["scope"],
        owner_ids=row["owner_ids"],
        created_at=row["created_at"],
        last_used_on=row["last_used_on"],
        revoked_at=row["revoked_at"],
    )


async def api_keys_page(
    conn: asyncpg.Connection, *, after: uuid.UUID | None, limit: int
) -> list[ApiKeyRecord]:
    return [_record(row) for row in await conn.fetch(Q["api_keys_page"], after, limit)]


async def revoke_api_key(conn: asyncpg.Connection, key_id: uuid.UUID) -> tuple[ApiKeyRecord | None, bool]:
    """Revoke a key. Returns it (None if no such key) and whether this call revoked it."""
    revoked_at = await conn.fetchval(Q["api_key_revoke"], key_id)
    row = await conn.fetchrow(Q["api_key_by_id"], key_id)
    return (None if row is None else _record(row)), revoked_at is not None


class TokenBucket:
    """At most `rate_per_s` takes a second on average, `burst` at once."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate_per_s = rate_per_s
        self._burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate_per_s)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class _Known:
    """A valid key in the cache, until `expires_at` (monotonic)."""

    __slots__ = ("expires_at", "key", "used_day")

    def __init__(self, key: ApiKey, expires_at: float, used_on: date | None) -> None:
        self.key = key
        self.expires_at = expires_at
        self.used_day = NEVER_USED_DAY if used_on is None else _day_number(used_on)


def _day_number(day: date) -> int:
    return (day - date(1970, 1, 1)).days


def _key(row: asyncpg.Record) -> ApiKey:
    owner_ids = row["owner_ids"]
    return ApiKey(row["id"], row["name"], row["scope"], None if owner_ids is None else frozenset(owner_ids))


class KeyStore:
    """Looks keys up by hash. Known keys are cached for ttl_s, or until the
    revocation poll sees them revoked; unknown keys in a bounded LRU of
    their own; keys in neither are looked up at UNKNOWN_LOOKUPS_PER_S."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float, timeout_s: float) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._known: OrderedDict[bytes, _Known] = OrderedDict()
        self._unknown: OrderedDict[bytes, None] = OrderedDict()
        self._misses = TokenBucket(UNKNOWN_LOOKUPS_PER_S, UNKNOWN_LOOKUPS_BURST)
        self._in_flight: dict[bytes, asyncio.Task[_Known | None]] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._polled_at: datetime | None = None
        self._poll_failing = False
        self.lookups = 0
        """Postgres lookups of keys so far (the tests count them)."""

    async def lookup(self, secret: str) -> ApiKey | None:
        digest = _sha256(secret)
        now = time.monotonic()
        known = self._known.get(digest)
        if known is not None and known.expires_at > now:
            self._known.move_to_end(digest)
        elif known is None and digest in self._unknown:
            self._unknown.move_to_end(digest)
            return None
        else:
            # Expired, or in neither cache: only the latter count against the rate.
            if known is None and digest not in self._in_flight and not self._misses.take(now):
                return None
            known = await self._look_up(digest)
            if known is None:
                return None
        day = int(time.time() // SECONDS_PER_DAY)
        if known.used_day < day:
            self._record_use(known, day)
        return known.key

    async def _look_up(self, digest: bytes) -> _Known | None:
        """One query per key however many requests wait for it."""
        task = self._in_flight.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._query(digest))
            self._in_flight[digest] = task
            task.add_done_callback(lambda done: self._looked_up(digest, done))
        return await asyncio.shield(task)

    async def _query(self, digest: bytes) -> _Known | None:
        self.lookups += 1
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            row = await conn.fetchrow(Q["api_key_by_hash"], digest, timeout=self._timeout_s)
        if row is None:
            self._forget(digest)
            return None
        return self._remember(digest, _key(row), row["last_used_on"])

    def _looked_up(self, digest: bytes, task: asyncio.Task[_Known | None]) -> None:
        self._in_flight.pop(digest, None)
        if not task.cancelled() and task.exception() is not None:
            log.warning("API key lookup failed: %r", task.exception())

    def _remember(self, digest: bytes, key: ApiKey, used_on: date | None) -> _Known:
        self._unknown.pop(digest, None)
        known = self._known[digest] = _Known(key, time.monotonic() + self._ttl_s, used_on)
        self._known.move_to_end(digest)
        while len(self._known) > KNOWN_KEYS_MAX:
            self._known.popitem(last=False)
        return known

    def _forget(self, digest: bytes) -> None:
        """Unknown or revoked: answered 401 from now on, without a lookup."""
        self._known.pop(digest, None)
        self._unknown[digest] = None
        self._unknown.move_to_end(digest)
        while len(self._unknown) > UNKNOWN_KEYS_MAX:
            self._unknown.popitem(last=False)

    # The day a key was last used: at most one write per key and day ----------

    def _record_use(self, known: _Known, day: int) -> None:
        if len(self._writes) >= USE_WRITES_IN_FLIGHT_MAX:
            return  # a later request records it
        known.used_day = day
        task = asyncio.ensure_future(self._write_use(known.key.id, date(1970, 1, 1) + timedelta(days=day)))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_use(self, key_id: uuid.UUID, day: date) -> None:
        try:
            async with self._pool.acquire(timeout=self._timeout_s) as conn:
                await conn.execute(Q["api_key_used_on"], key_id, day, timeout=self._timeout_s)
        except Exception as exc:  # a missed day of use is no reason to fail a request
            log.warning("API key %s: could not record its use on %s: %r", key_id, day, exc)

    # Starting and revoking -----------------------------------------------------

    async def warm(self) -> int:
        """Cache the keys used lately, so a restart does not send every
        client's first request through the lookup rate bound."""
        since = datetime.now(UTC).date() - timedelta(days=RECENTLY_USED_DAYS - 1)
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows = await conn.fetch(
                Q["api_keys_recently_used"], since, KNOWN_KEYS_MAX, timeout=self._timeout_s
            )
        for row in reversed(rows):  # the most recently used last: evicted last
            self._remember(row["key_sha256"], _key(row), row["last_used_on"])
        return len(rows)

    async def poll_revocations(self) -> int:
        """Forget the keys revoked since the previous poll. Returns how many."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            row = await conn.fetchrow(
                Q["api_keys_revoked_since"],
                self._polled_at,
                REVOKED_PER_POLL_MAX,
                REVOCATION_OVERLAP,
                timeout=self._timeout_s,
            )
        self._polled_at = row["polled_at"]
        revoked: list[bytes] = row["revoked"]
        for digest in revoked:
            self._forget(digest)
        if len(revoked) >= REVOKED_PER_POLL_MAX:
            log.warning("%d keys revoked at once: every cached key is looked up again", len(revoked))
            for known in self._known.values():
                known.expires_at = 0.0
        return len(revoked)

    async def watch_revocations(self, stop: asyncio.Event) -> None:
        """Poll every REVOCATION_POLL_S until `stop`. While Postgres does not
        answer, cached keys live at most ttl_s."""
        while not stop.is_set():
            try:
                await self.poll_revocations()
                if self._poll_failing:
                    log.warning("API key revocations: polling again")
                self._poll_failing = False
            except Exception as exc:
                if not self._poll_failing:
                    log.warning(
                        "API key revocations: poll failed (%r); cached keys live at most %s s",
                        exc,
                        self._ttl_s,
                    )
                self._poll_failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REVOCATION_POLL_S)

    def watch(self, stop: asyncio.Event) -> None:
        """Watch revocations in the background until `stop`; close() waits for it."""
        self._watcher = asyncio.create_task(self.watch_revocations(stop))

    async def close(self) -> None:
        """Wait for the watcher (once `stop` is set) and, bounded, for the last-used writes in flight."""
        if self._watcher is not None:
            await self._watcher
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=self._timeout_s)


async def authorize(header: str, needed: str, store: KeyStore) -> ApiKey:
    """The key of an `Authorization: Bearer <key>` header, if its scope covers `needed`."""
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret:
        raise Unauthorized(MISSING_KEY_DETAIL)
    secret = secret.strip()
    if not well_formed(secret):
        raise Unauthorized(MALFORMED_KEY_DETAIL)  # no lookup: nothing of this shape exists
    key = await store.lookup(secret)
    if key is None:
        raise Unauthorized(UNKNOWN_KEY_DETAIL)
    if SCOPE_RANK[key.scope] < SCOPE_RANK[needed]:
        raise Forbidden(f"this key has scope {key.scope!r}; the route needs {needed!r}")
    return key


async def require_scope(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Litestar guard: a valid bearer key whose scope covers the route's.
    A /v1 route naming no scope is refused (create_app refuses to start
    with one: check_route_scopes)."""
    needed = handler.opt.get("scope")
    if needed == PUBLIC_SCOPE or (needed is None and not connection.scope["path"].startswith(GUARDED_PREFIX)):
        return
    if needed not in SCOPE_RANK:
        raise Forbidden("this route names no scope; it is refused to every key")
    store: KeyStore = connection.app.state.key_store
    key = await authorize(connection.headers.get("authorization", ""), needed, store)
    if key.owner_ids is not None and handler.opt.get(SPANS_OWNERS):
        raise Forbidden("this key sees some owners' wallets only; the route shows every owner's")
    connection.scope["state"]["api_key"] = key


def _framework_options(handler: BaseRouteHandler) -> bool:
    """The OPTIONS handler Litestar adds to each path: it answers the
    path's methods (Allow), nothing else."""
    qualname = getattr(getattr(handler, "fn", None), "__qualname__", "")
    return qualname.startswith("HTTPRoute.create_options_handler.")


def check_route_scopes(app: Litestar) -> None:
    """Deny by default: every route under /v1 names a scope, or PUBLIC_SCOPE.
    Litestar's own OPTIONS answers are marked public here."""
    unscoped = []
    for route in app.routes:
        if not route.path.startswith(GUARDED_PREFIX):
            continue
        for handler in getattr(route, "route_handlers", ()):
            if _framework_options(handler):
                handler.opt.setdefault("scope", PUBLIC_SCOPE)
            if handler.opt.get("scope") not in (*SCOPE_RANK, PUBLIC_SCOPE):
                methods = ",".join(sorted(getattr(handler, "http_methods", None) or ["*"]))
                unscoped.append(f"{methods} {route.path}")
    if unscoped:
        raise ValueError(
            f"routes under {GUARDED_PREFIX} must name a scope in opt (one of {sorted(SCOPE_RANK)} or "
            f"{PUBLIC_SCOPE!r}); these name none: {', '.join(sorted(unscoped))}"
        )
