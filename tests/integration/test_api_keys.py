"""The key store against a real Postgres: a malformed token is refused with
no I/O, unknown keys neither evict valid ones nor reach Postgres faster than
the bound, a revocation reaches every store within a second, the day of
last use is written once, and the database keeps keys immutable."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from centime import auth
from centime.auth import (
    MALFORMED_KEY_DETAIL,
    UNKNOWN_KEY_DETAIL,
    UNKNOWN_LOOKUPS_BURST,
    UNKNOWN_LOOKUPS_PER_S,
    KeyStore,
    TokenBucket,
    authorize,
    create_api_key,
    revoke_api_key,
)
from centime.errors import Unauthorized

TIMEOUT_S = 2.0


def random_key() -> str:
    """Well formed, and no key anybody made."""
    return auth.KEY_PREFIX + secrets.token_urlsafe(auth.KEY_SECRET_BYTES)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


def store_of(pool: asyncpg.Pool, ttl_s: float = 60) -> KeyStore:
    return KeyStore(pool, ttl_s=ttl_s, timeout_s=TIMEOUT_S)


async def new_key(pool: asyncpg.Pool, owner_ids: list[str] | None = None) -> tuple[auth.ApiKey, str]:
    async with pool.acquire(timeout=TIMEOUT_S) as conn:
        return await create_api_key(conn, f"t-{secrets.token_hex(3)}", "debit", owner_ids)


async def refused(header: str, store: KeyStore) -> str:
    with pytest.raises(Unauthorized) as caught:
        await authorize(header, "read", store)
    return caught.value.detail


async def test_a_malformed_token_is_refused_without_touching_postgres(
    pool: asyncpg.Pool, database_url: str
) -> None:
    _, secret = await new_key(pool)
    closed = await asyncpg.create_pool(database_url, min_size=0, max_size=1)
    await closed.close()
    store = store_of(closed)  # any lookup through it raises
    for token in ("ck_short", secret + "x", secret[:-1] + "!", "sk_" + secret[3:], "ck_" + "a" * 200):
        assert await refused(f"Bearer {token}", store) == MALFORMED_KEY_DETAIL, token
    assert store.lookups == 0
    # The same store does reach Postgres for a well-formed key (so the above proves something).
    with pytest.raises(asyncpg.InterfaceError):
        await authorize(f"Bearer {random_key()}", "read", store)
    assert store.lookups == 1


async def test_a_valid_key_is_looked_up_once_however_many_ask_at_once(pool: asyncpg.Pool) -> None:
    key, secret = await new_key(pool)
    store = store_of(pool)
    found = await asyncio.gather(*(authorize(f"Bearer {secret}", "debit", store) for _ in range(50)))
    assert {k.id for k in found} == {key.id}
    assert store.lookups == 1
    await authorize(f"Bearer {secret}", "debit", store)
    assert store.lookups == 1


async def test_unknown_keys_are_looked_up_at_a_bounded_rate(pool: asyncpg.Pool) -> None:
    store = store_of(pool)
    flood = [random_key() for _ in range(3 * UNKNOWN_LOOKUPS_BURST)]
    started = time.monotonic()
    for token in flood:
        assert await refused(f"Bearer {token}", store) == UNKNOWN_KEY_DETAIL
    elapsed_s = time.monotonic() - started
    assert store.lookups <= UNKNOWN_LOOKUPS_BURST + UNKNOWN_LOOKUPS_PER_S * elapsed_s + 1
    assert store.lookups < len(flood)
    # A key looked up and found unknown is answered from its cache from now on.
    before = store.lookups
    await refused(f"Bearer {flood[0]}", store)
    assert store.lookups == before


async def test_a_flood_of_unknown_keys_does_not_evict_a_valid_one(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "UNKNOWN_KEYS_MAX", 20)
    monkeypatch.setattr(auth, "KNOWN_KEYS_MAX", 20)
    key, secret = await new_key(pool)
    store = store_of(pool)
    store._misses = TokenBucket(rate_per_s=1e9, burst=10**9)  # every unknown key reaches Postgres
    await authorize(f"Bearer {secret}", "debit", store)
    flood = [random_key() for _ in range(200)]
    for token in flood:
        await refused(f"Bearer {token}", store)
    assert store.lookups == 1 + len(flood)
    assert (await authorize(f"Bearer {secret}", "debit", store)).id == key.id
    assert store.lookups == 1 + len(flood), "the valid key was evicted by the flood"


async def test_a_revoked_key_is_refused_by_every_store_within_a_second(pool: asyncpg.Pool) -> None:
    key, secret = await new_key(pool)
    stores = [store_of(pool, ttl_s=3600), store_of(pool, ttl_s=3600)]  # two serving processes
    for store in stores:
        await authorize(f"Bearer {secret}", "debit", store)
    stop = asyncio.Event()
    watchers = [asyncio.create_task(store.watch_revocations(stop)) for store in stores]
    try:
        await asyncio.sleep(0.6)  # each has polled once
        async with pool.acquire(timeout=TIMEOUT_S) as conn:
            record, revoked_now = await revoke_api_key(conn, key.id)
        revoked_at = time.monotonic()
        assert revoked_now and record is not None and record.revoked_at is not None
        waiting = set(range(len(stores)))
        while waiting and time.monotonic() - revoked_at < 2:
            for i in list(waiting):
                try:
                    await authorize(f"Bearer {secret}", "debit", stores[i])
                except Unauthorized:
                    waiting.discard(i)
            await asyncio.sleep(0.02)
        took_s = time.monotonic() - revoked_at
        assert not waiting, "a store still accepts the revoked key"
        assert took_s < 1.0, f"took {took_s:.2f} s"
        assert all(store.lookups == 1 for store in stores), "learned from the poll, not a lookup"
    finally:
        stop.set()
        await asyncio.gather(*watchers)


async def test_revoking_twice_and_an_unknown_key(pool: asyncpg.Pool) -> None:
    key, _ = await new_key(pool)
    async with pool.acquire(timeout=TIMEOUT_S) as conn:
        assert (await revoke_api_key(conn, key.id))[1] is True
        again, revoked_now = await revoke_api_key(conn, key.id)
        assert again is not None and again.revoked_at is not None and revoked_now is False
        assert await revoke_api_key(conn, auth.uuid.uuid4()) == (None, False)


async def test_the_day_of_last_use_is_written_once_per_day(pool: asyncpg.Pool) -> None:
    key, secret = await new_key(pool)
    store = store_of(pool)
    await authorize(f"Bearer {secret}", "debit", store)
    await store.close()
    async with pool.acquire(timeout=TIMEOUT_S) as conn:
        used_on = await conn.fetchval("SELECT last_used_on FROM api_keys WHERE id = $1", key.id)
        assert used_on == datetime.now(UTC).date()
        await conn.execute("UPDATE api_keys SET last_used_on = NULL WHERE id = $1", key.id)
    for _ in range(20):
        await authorize(f"Bearer {secret}", "debit", store)
    await store.close()
    async with pool.acquire(timeout=TIMEOUT_S) as conn:
        assert await conn.fetchval("SELECT last_used_on FROM api_keys WHERE id = $1", key.id) is None


async def test_a_starting_store_caches_the_keys_used_lately(pool: asyncpg.Pool) -> None:
    key, secret = await new_key(pool)
    first = store_of(pool)
    await authorize(f"Bearer {secret}", "debit", first)
    await first.close()  # its use is recorded
    second = store_of(pool)
    assert await second.warm() >= 1
    assert (await authorize(f"Bearer {secret}", "debit", second)).id == key.id
    assert second.lookups == 0


async def test_a_key_sees_its_owners(pool: asyncpg.Pool) -> None:
    key, secret = await new_key(pool, ["acme", "globex", "acme"])
    assert key.owner_ids == frozenset({"acme", "globex"})
    assert (await authorize(f"Bearer {secret}", "read", store_of(pool))).owner_ids == key.owner_ids
    with pytest.raises(ValueError, match=r"1\.\.100 owners"):
        await new_key(pool, [f"o{i}" for i in range(101)])


async def test_the_database_keeps_keys_as_they_were_made(pool: asyncpg.Pool) -> None:
    key, _ = await new_key(pool, ["acme"])
    async with pool.acquire(timeout=TIMEOUT_S) as conn:
        for statement in (
            "UPDATE api_keys SET scope = 'admin' WHERE id = $1",
            "UPDATE api_keys SET owner_ids = NULL WHERE id = $1",
            "DELETE FROM api_keys WHERE id = $1",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement, key.id)
        await revoke_api_key(conn, key.id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE api_keys SET revoked_at = NULL WHERE id = $1", key.id)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO api_keys (id, name, scope, key_sha256, owner_ids) VALUES ($1, 'x', 'read', $2, $3)",
                auth.uuid.uuid4(),
                secrets.token_bytes(32),
                [f"o{i}" for i in range(101)],
            )
