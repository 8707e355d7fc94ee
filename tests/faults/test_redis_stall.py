"""A Redis that stalls (SIGSTOP) mid-load and then resumes leaves no 503'd
debit charged: answers stay 201/402/503 in bounded time, and after the
sweeper every 201 is in the ledger once, no 503 stands charged, and Redis
agrees with the ledger. A request that cannot hand its late commit to the
sweeper through Redis reverses it in the ledger itself, during the stall."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import msgspec
import pytest
from conftest import Keys, Server, make_keys, new_wallet, run_cli, start_server, stop_server
from fault_support import (
    AMOUNT_MICROS,
    FAULT_ENV,
    RedisServer,
    classify,
    debit_load,
    ledger_balances,
    ledger_debits,
    redis_balances,
    redis_server,
    summary,
    unique_prefix,
    wait_settled,
)

from centime.settings import Settings

pytestmark = pytest.mark.faults

# Longer than the request's Redis timeout (1 s) plus the time it keeps trying
# to hand an unanswered charge to the sweeper (sweeper_grace_ms / 2).
STALL_S = 5.0
HICCUP_S = 1.0
HICCUP_BEFORE_STALL_S = 0.2
LATENCY_BOUND_S = 10.0


TRANSACTION_ID = "SELECT txid_current()"
"""A transaction id of now: ids grow, so two of them bound the transactions begun between."""


async def reversed_between(database_url: str, first_xid: int, last_xid: int) -> set[str]:
    """Keys of the debits whose reversal was written in a transaction begun
    between these two ids."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """
            SELECT e.idempotency_key
              FROM journal_entries e JOIN journal_entries r ON r.reverses_entry_id = e.id
             WHERE e.kind = 'debit' AND r.xmin::text::bigint > $1 AND r.xmin::text::bigint < $2
            """,
            first_xid % 2**32,
            last_xid % 2**32,
        )
    finally:
        await conn.close()
    return {row["idempotency_key"] for row in rows}


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
async def own(
    settings: Settings, private_database: str, own_redis: RedisServer
) -> AsyncIterator[tuple[Settings, Keys, Server]]:
    own = msgspec.structs.replace(
        settings, database_url=private_database, redis_url=own_redis.url, redis_prefix=unique_prefix()
    )
    keys = await make_keys(private_database)
    server = start_server(own, **FAULT_ENV)
    try:
        yield own, keys, server
    finally:
        stop_server(server)


async def test_redis_stall_mid_load(own: tuple[Settings, Keys, Server], own_redis: RedisServer) -> None:
    settings, keys, server = own
    assert settings.database_url is not None
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        wallet_ids = [await new_wallet(http, keys, funded_micros=1_000_000 * AMOUNT_MICROS) for _ in range(6)]

    stop = asyncio.Event()
    load = asyncio.create_task(
        debit_load(server.base_url, keys, wallet_ids, stop, concurrency=16, timeout_s=3 * LATENCY_BOUND_S)
    )
    await asyncio.sleep(1.5)
    # A one-second commit hiccup (a lock on the ledger, as a checkpoint
    # stall would) puts every in-flight debit between charge and commit
    # when Redis stops; without it that depends on luck.
    hiccup = await asyncpg.connect(settings.database_url)
    clock = await asyncpg.connect(settings.database_url)
    try:
        async with hiccup.transaction():
            await hiccup.execute("LOCK TABLE journal_entries IN EXCLUSIVE MODE")
            await asyncio.sleep(HICCUP_BEFORE_STALL_S)
            os.kill(own_redis.process.pid, signal.SIGSTOP)
            stalled_at = time.monotonic()
            stall_xid = await clock.fetchval(TRANSACTION_ID)
            await asyncio.sleep(HICCUP_S - HICCUP_BEFORE_STALL_S)
        try:
            await asyncio.sleep(STALL_S - (time.monotonic() - stalled_at))
            resume_xid = await clock.fetchval(TRANSACTION_ID)
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
    finally:
        await hiccup.close()
        await clock.close()
    await asyncio.sleep(1.5)
    stop.set()
    answers = await asyncio.wait_for(load, 4 * LATENCY_BOUND_S)

    seen = summary(answers)
    slowest = max(answers, key=lambda a: a.latency_s)
    print(f"answers {dict(seen)}; slowest {slowest.latency_s:.2f} s ({slowest.status} {slowest.code})")
    odd = [a for a in answers if a.status not in (201, 402, 503)]
    assert not odd, f"{len(odd)} answers other than 201/402/503, e.g. {odd[:3]}"
    assert all(a.code == "unavailable" for a in answers if a.status == 503)
    assert slowest.latency_s < LATENCY_BOUND_S, slowest
    assert seen["503"] > 0, "the stall went unnoticed"

    settle_s = await wait_settled(settings)
    # Redis could not take the abandon of a late commit, so the request
    # reversed it in the ledger itself (writing the entry too if the writer
    # had not), while Redis still stalled: the sweeper, which finds abandoned
    # entries in Redis, could not have.
    reversed_in_stall = await reversed_between(settings.database_url, stall_xid, resume_xid)
    stalled_503 = {a.key for a in answers if a.status == 503}
    assert reversed_in_stall, "no request reversed its charge in the ledger while Redis stalled"
    assert reversed_in_stall <= stalled_503, reversed_in_stall - stalled_503
    problems = classify(answers, await ledger_debits(settings.database_url))
    print(f"settled in {settle_s:.1f} s; {sum(map(len, problems.values()))} violations")
    assert problems == {}

    in_ledger = await ledger_balances(settings.database_url, wallet_ids)
    assert await redis_balances(settings, wallet_ids) == in_ledger
    checked = run_cli(settings, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
