"""`centime check` is the invariant oracle of the e2e and fault tests, so it
must be seen to fail: each violation it claims to find is made here, on a
database and Redis prefix of the test's own, and `check` exits 1 naming it;
where there is a repair (`rebuild-cache` for Redis drift), check passes after."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as redis
from conftest import Keys, auth, delete_prefix, make_keys, new_wallet, run_cli, start_server, stop_server

from centime.settings import Settings
from wallet.cache import Cache


class World(msgspec.Struct):
    settings: Settings
    keys: Keys
    http: httpx.AsyncClient
    wallet_id: str
    debit_id: str


@pytest.fixture
async def world(settings: Settings, private_database: str) -> AsyncIterator[World]:
    """A funded wallet with one debit, on a database nobody else checks."""
    own = msgspec.structs.replace(
        settings,
        database_url=private_database,
        redis_prefix=f"{settings.redis_prefix}o{secrets.token_hex(3)}",
    )
    keys = await make_keys(private_database)
    server = start_server(own)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            wallet_id = await new_wallet(http, keys, funded_micros=10_000)
            debit = await http.post(
                f"/v1/wallets/{wallet_id}/debits",
                json={"amount_micros": 1_234},
                headers=auth(keys.debit, "oracle-1"),
            )
            assert debit.status_code == 201, debit.text
            yield World(own, keys, http, wallet_id, debit.json()["id"])
    finally:
        stop_server(server)
        assert own.redis_url is not None
        await delete_prefix(own.redis_url, own.redis_prefix)


def check(world: World) -> tuple[int, list[str]]:
    done = run_cli(world.settings, "check")
    violations = [line for line in done.stdout.splitlines() if line.startswith("VIOLATION")]
    return done.returncode, violations


async def bypassing_the_ledger_rules(world: World, sql: str, *args: object) -> None:
    """Write what the ledger's triggers refuse: as a superuser with triggers
    off (session_replication_role), the way only a bug or a hand could."""
    assert world.settings.database_url is not None
    conn = await asyncpg.connect(world.settings.database_url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(sql, *args)
    finally:
        await conn.close()


async def test_a_clean_ledger_passes(world: World) -> None:
    assert check(world) == (0, [])


async def test_a_redis_balance_off_by_one_micro_is_named_then_repaired(world: World) -> None:
    assert world.settings.redis_url is not None
    client = redis.Redis.from_url(world.settings.redis_url)
    cache = Cache(client, prefix=world.settings.redis_prefix, partition_count=world.settings.partition_count)
    try:
        await client.hincrby(cache.wallet_key(uuid.UUID(world.wallet_id)), "b", 1)
    finally:
        await client.aclose()
    status, violations = check(world)
    assert status == 1
    assert violations == [f"VIOLATION wallet {world.wallet_id}: redis 8767 != ledger 8766 micros"]
    rebuilt = run_cli(world.settings, "rebuild-cache")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert check(world) == (0, [])


async def test_an_entry_whose_lines_do_not_balance_is_named(world: World) -> None:
    forged = uuid.uuid4()
    # A copy of the debit, with only its first line: 1 line, summing to non-zero.
    await bypassing_the_ledger_rules(
        world,
        """WITH e AS (
               INSERT INTO journal_entries (id, kind, currency, wallet_id, amount_micros, balance_micros,
                                            idempotency_key, request_hash, created_at)
               SELECT $1, kind, currency, wallet_id, amount_micros, balance_micros, 'forged', request_hash,
                      created_at
                 FROM journal_entries WHERE id = $2
               RETURNING id)
           INSERT INTO journal_lines (entry_id, line_no, account_id, currency, amount_micros)
           SELECT $1, line_no, account_id, currency, amount_micros
             FROM journal_lines WHERE entry_id = $2 AND line_no = 0""",
        forged,
        uuid.UUID(world.debit_id),
    )
    status, violations = check(world)
    assert status == 1
    assert any(v.startswith(f"VIOLATION entry {forged}: 1 lines summing to ") for v in violations), violations
    assert any(v.startswith("VIOLATION all lines sum to ") for v in violations), violations


async def test_a_reversal_of_another_amount_is_named(world: World) -> None:
    forged = uuid.uuid4()
    # Balanced lines (the debit's, negated), but one micro more than the debit it names.
    await bypassing_the_ledger_rules(
        world,
        """WITH e AS (
               INSERT INTO journal_entries (id, kind, currency, wallet_id, amount_micros, reverses_entry_id,
                                            created_at)
               SELECT $1, 'reversal', currency, wallet_id, amount_micros + 1, id, now()
                 FROM journal_entries WHERE id = $2
               RETURNING id)
           INSERT INTO journal_lines (entry_id, line_no, account_id, currency, amount_micros)
           SELECT $1, line_no, account_id, currency, -amount_micros
             FROM journal_lines WHERE entry_id = $2""",
        forged,
        uuid.UUID(world.debit_id),
    )
    status, violations = check(world)
    assert status == 1
    # The forged reversal also moved the ledger balance away from Redis's.
    assert violations == [
        f"VIOLATION reversal {forged}",
        f"VIOLATION wallet {world.wallet_id}: redis 8766 != ledger 10000 micros",
    ]
