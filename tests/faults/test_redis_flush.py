"""After Redis loses all its data, `centime rebuild-cache` restores every
wallet's balance from the ledger and `centime check` passes, and a retried
debit or credit (same key and body) is answered with its original entry
instead of being charged twice. A flush while debits are in flight loses
none either: after `rebuild-cache` every 2xx is in the ledger once, no error
stands charged, and Redis holds the ledger's balances."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as redis
from conftest import Keys, Server, auth, make_keys, new_wallet, run_cli, start_server, stop_server
from fault_support import (
    AMOUNT_MICROS,
    FAULT_ENV,
    cache_for,
    classify,
    debit_load,
    expected_balances,
    flush_redis,
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


@pytest.fixture
def own_redis() -> Iterator[str]:
    """A redis-server of this test's own: FLUSHALL must not touch the shared one."""
    with redis_server() as server:
        yield server.url


class World(msgspec.Struct):
    settings: Settings
    server: Server
    keys: Keys
    http: httpx.AsyncClient


@contextlib.asynccontextmanager
async def world_on(settings: Settings, database_url: str, redis_url: str, **env: str) -> AsyncIterator[World]:
    own = msgspec.structs.replace(
        settings, database_url=database_url, redis_url=redis_url, redis_prefix=unique_prefix()
    )
    keys = await make_keys(database_url)
    server = start_server(own, **env)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            yield World(own, server, keys, http)
    finally:
        stop_server(server)


@pytest.fixture
async def world(settings: Settings, private_database: str, own_redis: str) -> AsyncIterator[World]:
    async with world_on(settings, private_database, own_redis) as w:
        yield w


class Posted(msgspec.Struct):
    """A debit or credit as sent, and the entry it was answered with."""

    path: str
    key: str
    body: dict[str, Any]
    scope_key: str
    entry: dict[str, Any]


async def _post(w: World, wallet_id: str, kind: str, body: dict[str, Any], key: str | None = None) -> Posted:
    key = key or f"{kind}-{secrets.token_hex(6)}"
    scope_key = w.keys.debit if kind == "debits" else w.keys.admin
    path = f"/v1/wallets/{wallet_id}/{kind}"
    response = await w.http.post(path, json=body, headers=auth(scope_key, key))
    assert response.status_code == 201, response.text
    return Posted(path, key, body, scope_key, response.json())


async def _history(w: World) -> tuple[list[str], list[Posted]]:
    """Wallets with known balances, reached through credits and debits."""
    wallet_ids = [await new_wallet(w.http, w.keys, overdraft_limit_micros=n * 10_000) for n in range(4)]
    posted: list[Posted] = []
    for n, wallet_id in enumerate(wallet_ids):
        posted.append(
            await _post(w, wallet_id, "credits", {"amount_micros": 1_000_000 * (n + 1), "reason": "grant"})
        )
        for m in range(5):
            body = {"amount_micros": 1_234 * (m + 1), "description": f"call {m}", "metadata": {"m": str(m)}}
            posted.append(await _post(w, wallet_id, "debits", body))
    # One wallet in overdraft: balances below zero must survive a flush too.
    posted.append(await _post(w, wallet_ids[3], "debits", {"amount_micros": 4_000_000 - 15 * 1_234 + 20_000}))
    return wallet_ids, posted


async def _balances(w: World, wallet_ids: list[str]) -> dict[str, int]:
    balances = {}
    for wallet_id in wallet_ids:
        response = await w.http.get(f"/v1/wallets/{wallet_id}", headers=auth(w.keys.read))
        assert response.status_code == 200, response.text
        balances[wallet_id] = response.json()["balance_micros"]
    return balances


async def _flush(w: World) -> None:
    assert w.settings.redis_url is not None
    await flush_redis(w.settings.redis_url)


async def _retry(w: World, p: Posted, body: dict[str, Any] | None = None) -> httpx.Response:
    return await w.http.post(p.path, json=body or p.body, headers=auth(p.scope_key, p.key))


async def _replays(w: World, p: Posted) -> None:
    """A retry with the original key and body answers the original entry."""
    response = await _retry(w, p)
    assert response.status_code == 201, response.text
    assert response.headers.get("idempotent-replayed") == "true", response.headers
    assert response.json() == p.entry


def _check(w: World) -> None:
    checked = run_cli(w.settings, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_rebuild_cache_restores_balances_after_flush(world: World) -> None:
    w = world
    wallet_ids, _ = await _history(w)
    before = await _balances(w, wallet_ids)
    assert before[wallet_ids[3]] < 0
    assert before == await ledger_balances(w.settings.database_url or "", wallet_ids)

    await _flush(w)
    assert set((await redis_balances(w.settings, wallet_ids)).values()) == {None}
    started = time.monotonic()
    rebuilt = run_cli(w.settings, "rebuild-cache")
    rebuild_s = time.monotonic() - started
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr

    # Redis itself holds the balances again (a GET would load a missing one lazily).
    assert await redis_balances(w.settings, wallet_ids) == before
    assert await _balances(w, wallet_ids) == before
    _check(w)

    # And the hot path works on the rebuilt cache, overdraft limit included.
    await _post(w, wallet_ids[0], "debits", {"amount_micros": 777})
    refused = await w.http.post(
        f"/v1/wallets/{wallet_ids[3]}/debits",
        json={"amount_micros": 10_001},  # -20_000 - 10_001 < -30_000
        headers=auth(w.keys.debit, "over-the-limit"),
    )
    assert refused.status_code == 402, refused.text
    after = await _balances(w, wallet_ids)
    assert after == {**before, wallet_ids[0]: before[wallet_ids[0]] - 777}
    _check(w)
    print(f"rebuild-cache of {len(wallet_ids)} wallets took {rebuild_s:.1f} s (CLI start included)")


async def test_retry_after_flush_is_not_charged_twice(world: World) -> None:
    w = world
    wallet_ids, posted = await _history(w)
    # Not the debit that took wallet 3 into overdraft: its retry cannot pass
    # the balance check (test_retry_after_flush_of_a_debit_that_spent_the_balance).
    debits = [p for p in posted if "/debits" in p.path][:-1]
    credits = [p for p in posted if "/credits" in p.path]
    before = await _balances(w, wallet_ids)

    # Straight after the flush: the wallet is not even in Redis.
    await _flush(w)
    await _replays(w, debits[0])
    await _replays(w, credits[1])
    assert await _balances(w, wallet_ids) == before

    # After rebuild-cache: balances are back, the keys only in the ledger.
    rebuilt = run_cli(w.settings, "rebuild-cache")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    for p in [*debits, *credits]:
        await _replays(w, p)
    # Concurrent retries of one key: each replays, or is told the key's request
    # is in progress (the charge-then-compensate at commit); none charges.
    racing = await asyncio.gather(*(_retry(w, p) for p in debits[:8] for _ in range(3)))
    for p, response in zip([p for p in debits[:8] for _ in range(3)], racing, strict=True):
        if response.status_code == 409:
            assert response.json()["code"] == "request_in_progress", response.text
        else:
            assert (response.status_code, response.json()) == (201, p.entry), response.text
    conflict = await _retry(w, debits[1], {**debits[1].body, "amount_micros": 1})
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["code"] == "idempotency_conflict"
    assert await _balances(w, wallet_ids) == before

    ledger = await ledger_debits(w.settings.database_url or "")
    for p in debits:
        assert [str(e.id) for e in ledger[p.key]] == [p.entry["id"]]
    await wait_settled(w.settings)
    assert await redis_balances(w.settings, wallet_ids) == before
    _check(w)


@pytest.mark.parametrize("loss", ["flush", "ttl"])
async def test_retry_after_redis_lost_a_debit_that_spent_the_balance(world: World, loss: str) -> None:
    """flush: FLUSHALL, then rebuild-cache. ttl: only the key's idempotency
    record is gone, as when its TTL (idempotency_ttl_s, 1 h) runs out."""
    w = world
    wallet_id = await new_wallet(w.http, w.keys, funded_micros=50_000)
    spent = await _post(w, wallet_id, "debits", {"amount_micros": 50_000, "description": "all of it"})
    assert spent.entry["balance_micros"] == 0

    if loss == "flush":
        await _flush(w)
        rebuilt = run_cli(w.settings, "rebuild-cache")
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    else:
        client, cache = cache_for(w.settings)
        try:
            assert await client.delete(cache.idempotency_key(uuid.UUID(wallet_id), spent.key)) == 1
        finally:
            await client.aclose()
    retry = await _retry(w, spent)
    # The charge stands in the ledger: the retry must say so, not "insufficient funds".
    ledger = await ledger_debits(w.settings.database_url or "")
    assert [str(e.id) for e in ledger[spent.key]] == [spent.entry["id"]]
    assert await _balances(w, [wallet_id]) == {wallet_id: 0}
    assert (retry.status_code, retry.headers.get("idempotent-replayed")) == (201, "true"), retry.text
    assert retry.json() == spent.entry


LOAD_BEFORE_FLUSH_S = 1.0
LOAD_AFTER_FLUSH_S = 1.5
FLUSH_WALLETS = 6
FLUSH_FUNDING_MICROS = 1_000_000 * AMOUNT_MICROS


async def test_a_flush_under_load_loses_no_debit(
    settings: Settings, private_database: str, own_redis: str
) -> None:
    async with world_on(settings, private_database, own_redis, **FAULT_ENV) as w:
        assert w.settings.database_url is not None
        wallet_ids = [
            await new_wallet(w.http, w.keys, funded_micros=FLUSH_FUNDING_MICROS) for _ in range(FLUSH_WALLETS)
        ]
        stop = asyncio.Event()
        load = asyncio.create_task(debit_load(w.server.base_url, w.keys, wallet_ids, stop, concurrency=16))
        assert w.settings.redis_url is not None
        client = redis.Redis.from_url(w.settings.redis_url)
        try:
            await client.ping()  # connected: the flush is one round trip
            await asyncio.sleep(LOAD_BEFORE_FLUSH_S)
            flush_started = time.monotonic()
            await client.flushall()
            flushed = time.monotonic()
        finally:
            await client.aclose()
        await asyncio.sleep(LOAD_AFTER_FLUSH_S)
        stop.set()
        answers = await asyncio.wait_for(load, 60)
        in_flight = [a for a in answers if a.started < flush_started and a.started + a.latency_s > flushed]
        print(f"answers {dict(summary(answers))}; {len(in_flight)} in flight at the flush")
        assert in_flight, "no debit was in flight when Redis was flushed"
        assert all(a.status in (201, 503) for a in answers), summary(answers)

        await wait_settled(w.settings)
        rebuilt = run_cli(w.settings, "rebuild-cache")
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        ledger = await ledger_debits(w.settings.database_url)
        assert classify(answers, ledger) == {}
        in_ledger = await ledger_balances(w.settings.database_url, wallet_ids)
        funded = dict.fromkeys(wallet_ids, FLUSH_FUNDING_MICROS)
        assert in_ledger == expected_balances(funded, answers, ledger)
        assert await redis_balances(w.settings, wallet_ids) == in_ledger
        _check(w)
