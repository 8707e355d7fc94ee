"""What the API answers when Redis is lost: /readyz says 503 `redis: down`
while a private Redis is stopped or stalled (and 200 again once it is back),
and a hold whose Redis copy was flushed cannot be captured (409
`hold_not_held`) and charges nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import msgspec
import pytest
from conftest import (
    RUN_ID,
    Keys,
    Server,
    Stores,
    auth,
    create_database,
    drop_database,
    make_keys,
    new_wallet,
    start_server,
    stop_server,
)
from fault_support import RedisServer, flush_redis, redis_server, unique_prefix

from centime.settings import Settings

pytestmark = pytest.mark.faults

READY_WAIT_S = 15.0


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


class World(msgspec.Struct):
    settings: Settings
    keys: Keys
    http: httpx.AsyncClient


@pytest.fixture(scope="module")
async def world(
    settings: Settings, stores: Stores, template_database: str, own_redis: RedisServer
) -> AsyncIterator[World]:
    """One server for the module, on a database and Redis of its own (each
    test leaves Redis up; a flush touches only this module's wallets)."""
    name = f"centime_loss_{RUN_ID}"
    own = msgspec.structs.replace(
        settings,
        database_url=await create_database(stores, name, template_database),
        redis_url=own_redis.url,
        redis_prefix=unique_prefix(),
    )
    assert own.database_url is not None
    keys = await make_keys(own.database_url)
    server: Server = start_server(own)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            yield World(own, keys, http)
    finally:
        stop_server(server)
        await drop_database(stores, name)


async def _readiness(http: httpx.AsyncClient) -> tuple[int, dict[str, str]]:
    ready = await http.get("/readyz")
    return ready.status_code, ready.json()


async def _wait_readiness(http: httpx.AsyncClient, expected: tuple[int, dict[str, str]]) -> None:
    deadline = time.monotonic() + READY_WAIT_S
    seen = await _readiness(http)
    while seen != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        seen = await _readiness(http)
    assert seen == expected


@pytest.mark.parametrize("fault", ["stopped", "stalled"])
async def test_readyz_is_503_while_redis_is_down(world: World, own_redis: RedisServer, fault: str) -> None:
    """stopped: redis-server shut down (connections refused); stalled: SIGSTOP (no answer)."""
    assert await _readiness(world.http) == (200, {"postgres": "ok", "redis": "ok"})
    if fault == "stopped":
        await asyncio.to_thread(own_redis.stop)
    else:
        os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert await _readiness(world.http) == (503, {"postgres": "ok", "redis": "down"})
        assert time.monotonic() - started < 5, "/readyz must answer in bounded time"
    finally:
        if fault == "stopped":
            await asyncio.to_thread(own_redis.start)
        else:
            os.kill(own_redis.process.pid, signal.SIGCONT)
    await _wait_readiness(world.http, (200, {"postgres": "ok", "redis": "ok"}))


async def test_a_hold_lost_in_a_flush_cannot_be_captured(world: World) -> None:
    w = world
    wallet_id = await new_wallet(w.http, w.keys, funded_micros=10_000)
    held = await w.http.post(
        f"/v1/wallets/{wallet_id}/holds", json={"amount_micros": 4_000}, headers=auth(w.keys.debit, "hold-1")
    )
    assert held.status_code == 201, held.text
    hold_id = held.json()["id"]

    assert w.settings.redis_url is not None
    await flush_redis(w.settings.redis_url)

    capture = await w.http.post(
        f"/v1/holds/{hold_id}/capture", json={"amount_micros": 1_000}, headers=auth(w.keys.debit)
    )
    assert (capture.status_code, capture.json().get("code")) == (409, "hold_not_held"), capture.text
    assert capture.headers["content-type"].startswith("application/problem+json")
    conn = await asyncpg.connect(w.settings.database_url)
    try:
        debits = await conn.fetchval(
            "SELECT count(*) FROM journal_entries WHERE wallet_id = $1 AND kind = 'debit'",
            uuid.UUID(wallet_id),
        )
    finally:
        await conn.close()
    assert debits == 0
    wallet = await w.http.get(f"/v1/wallets/{wallet_id}", headers=auth(w.keys.read))
    assert wallet.json()["balance_micros"] == 10_000, wallet.text
