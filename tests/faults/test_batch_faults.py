"""Batch debits under faults lose no money. With Postgres stopped or frozen
during a batch, every item answers 503 in bounded time and, after the
sweeper, nothing stays charged (Redis equals the ledger); a retry of the
batch charges afresh or says `idempotency_key_reversed`. A server killed
mid-batch, before or after its commit, leaves every item charged at most
once, and a retry of the batch with the same keys tells which."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from conftest import (
    Keys,
    Server,
    auth,
    new_wallet,
    run_cli,
    start_server,
    stop_server,
)
from fault_support import (
    FAULT_ENV,
    Cluster,
    cache_for,
    ledger_balances,
    ledger_debits,
    migrated_database,
    needs_cluster,
    private_cluster,
    redis_balances,
    stores_of_own,
    wait_settled,
)

from centime.settings import Settings

pytestmark = pytest.mark.faults

BATCH = "/v1/debits/batch"
AMOUNT_MICROS = 1_000
POLL_S = 0.02
WAIT_S = 15.0
LATENCY_BOUND_S = 4.0
"""A batch answers within about one commit timeout plus one database
timeout (500 ms each here), however many of its items are refused."""


class Sent(msgspec.Struct):
    debits: list[dict[str, Any]]
    key: str
    status: int | None = None
    results: list[dict[str, Any]] | None = None
    latency_s: float = 0.0


async def send(base_url: str, keys: Keys, sent: Sent, *, timeout_s: float = 30) -> Sent:
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as http:
            response = await http.post(
                BATCH, json={"debits": sent.debits}, headers=auth(keys.debit, sent.key)
            )
        sent.status = response.status_code
        sent.results = response.json()["results"] if response.status_code == 200 else None
    except httpx.HTTPError:
        sent.status = None  # the answer was lost
    sent.latency_s = time.monotonic() - started
    return sent


def items(run: str, wallet_ids: list[str], count: int) -> list[dict[str, Any]]:
    return [
        {
            "wallet_id": wallet_ids[n % len(wallet_ids)],
            "amount_micros": AMOUNT_MICROS + n,
            "idempotency_key": f"{run}-{n}",
        }
        for n in range(count)
    ]


def codes(results: list[dict[str, Any]]) -> list[tuple[int, str | None]]:
    return [(r["status"], (r["problem"] or {}).get("code")) for r in results]


async def poll(condition: Any, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(POLL_S)


async def assert_redis_equals_ledger(settings: Settings, wallet_ids: list[str]) -> None:
    assert settings.database_url is not None
    assert await redis_balances(settings, wallet_ids) == await ledger_balances(
        settings.database_url, wallet_ids
    )
    checked = run_cli(settings, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- Postgres unreachable during a batch ----------------------------------------------


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with private_cluster() as own:
        yield own


@pytest.fixture
async def own(settings: Settings, cluster: Cluster) -> AsyncIterator[tuple[Settings, Keys]]:
    async with stores_of_own(settings, await migrated_database(cluster)) as own:
        yield own


CHARGED_ITEMS = 30
REFUSED_ITEMS = 20
UNKNOWN_ITEMS = 10


@needs_cluster
@pytest.mark.parametrize("fault", ["stopped", "frozen"])
async def test_postgres_down_during_a_batch_leaves_nothing_charged(
    own: tuple[Settings, Keys], cluster: Cluster, fault: str
) -> None:
    """stopped: connections refused (the writer fails definitely: each charge
    is refunded at once); frozen: every Postgres process SIGSTOPped (the
    commit is late: each charge is abandoned, then written and reversed by
    the sweeper). Refused items need the ledger too (did Redis forget a
    key?), and so do wallets Redis does not hold (unknown ones): they answer
    503 as well, and none may stretch the answer."""
    settings, keys = own
    assert settings.database_url is not None
    server = start_server(settings, **FAULT_ENV)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            rich = [await new_wallet(http, keys, funded_micros=1_000_000) for _ in range(3)]
            poor = await new_wallet(http, keys)
        wallet_ids = [*rich, poor]
        run = secrets.token_hex(3)
        # Warm up: the debit key is cached and the writer connected.
        warm = await send(server.base_url, keys, Sent(items(f"warm-{run}", rich, 3), secrets.token_hex(8)))
        assert codes(warm.results or []) == [(201, None)] * 3, warm

        unknown = [str(uuid.uuid4()) for _ in range(UNKNOWN_ITEMS)]  # looked up in Postgres: none in Redis
        debits = (
            items(run, rich, CHARGED_ITEMS)
            + items(f"{run}-poor", [poor], REFUSED_ITEMS)
            + items(f"{run}-unknown", unknown, UNKNOWN_ITEMS)
        )
        frozen: list[int] = []
        if fault == "stopped":
            await asyncio.to_thread(cluster.stop, "fast")
        else:
            frozen = cluster.freeze()
        try:
            during = await send(server.base_url, keys, Sent(debits, secrets.token_hex(8)))
        finally:
            cluster.thaw(frozen)
            if fault == "stopped":
                await asyncio.to_thread(cluster.start)
        assert during.status == 200 and during.results is not None, during
        assert codes(during.results) == [(503, "unavailable")] * len(debits), codes(during.results)
        assert during.latency_s < LATENCY_BOUND_S, f"the batch took {during.latency_s:.1f} s"

        await wait_settled(settings)
        ledger = await ledger_debits(settings.database_url)
        standing = [e for d in debits for e in ledger.get(d["idempotency_key"], []) if e.reversed_by is None]
        assert standing == [], "an item answered 503 stands charged"
        written = {d["idempotency_key"] for d in debits if d["idempotency_key"] in ledger}
        # Refunded at once (nothing written), or written and reversed by the sweeper.
        assert len(written) == (0 if fault == "stopped" else CHARGED_ITEMS), written
        await assert_redis_equals_ledger(settings, wallet_ids)

        # The same batch again: a refunded item charges now; a reversed one says so.
        retry = await send(server.base_url, keys, Sent(debits, during.key))
        assert retry.status == 200 and retry.results is not None, retry
        expected = [
            (409, "idempotency_key_reversed") if d["idempotency_key"] in written else (201, None)
            for d in debits[:CHARGED_ITEMS]
        ]
        expected += [(402, "insufficient_funds")] * REFUSED_ITEMS + [
            (404, "wallet_not_found")
        ] * UNKNOWN_ITEMS
        assert codes(retry.results) == expected
        assert not any(r["replayed"] for r in retry.results)
        await wait_settled(settings)
        await assert_redis_equals_ledger(settings, wallet_ids)
        print(
            f"{fault}: batch of {len(debits)} answered in {during.latency_s:.2f} s; {len(written)} reversed"
        )
    except BaseException:
        print(cluster.log()[-3000:])
        raise
    finally:
        stop_server(server)


# --- A server killed mid-batch ----------------------------------------------------------

KILL_ENV = {
    **FAULT_ENV,
    # Long enough that the test stops the server before its requests give up.
    "CENTIME_COMMIT_TIMEOUT_MS": "2000",
    "CENTIME_SWEEPER_GRACE_MS": "6000",
}
KILLED_ITEMS = 24


@pytest.fixture
async def killable(settings: Settings, private_database: str) -> AsyncIterator[tuple[Settings, Keys]]:
    async with stores_of_own(settings, private_database) as own:
        yield own


async def _charged_in_redis(settings: Settings, debits: list[dict[str, Any]]) -> int:
    """How many of the items have an idempotency record: were charged."""
    client, cache = cache_for(settings)
    try:
        return await client.exists(
            *(cache.idempotency_key(uuid.UUID(d["wallet_id"]), d["idempotency_key"]) for d in debits)
        )
    finally:
        await client.aclose()


async def _lock_waiters(conn: asyncpg.Connection) -> list[int]:
    """Backends of this database waiting for a lock: the writer's blocked insert."""
    rows = await conn.fetch(
        """
        SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'
        """
    )
    return [row["pid"] for row in rows]


async def _batch_then_stop(
    settings: Settings, server: Server, keys: Keys, sent: Sent, charged: int, *, commit: bool
) -> asyncio.Task[Sent]:
    """Send the batch while the ledger is locked; once its charges wait in
    Redis and its insert waits in Postgres, SIGSTOP the server. Then either
    cancel that insert (commit=False) or let it commit (commit=True), and
    SIGKILL the server: its answer is lost either way."""
    assert settings.database_url is not None
    blocker = await asyncpg.connect(settings.database_url)
    try:
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("LOCK TABLE journal_entries IN SHARE ROW EXCLUSIVE MODE")
        task = asyncio.create_task(send(server.base_url, keys, sent))
        watcher = await asyncpg.connect(settings.database_url)
        try:

            async def charged_and_waiting() -> bool:
                charged_now = await _charged_in_redis(settings, sent.debits)
                return charged_now == charged and bool(await _lock_waiters(watcher))

            await poll(charged_and_waiting, "the batch's charges and its blocked insert")
            os.kill(server.process.pid, signal.SIGSTOP)
            if not commit:
                for pid in await _lock_waiters(watcher):
                    await watcher.execute("SELECT pg_terminate_backend($1)", pid)
            await lock.commit()
            if commit:
                keys_sent = [d["idempotency_key"] for d in sent.debits]

                async def committed() -> bool:
                    count = await watcher.fetchval(
                        "SELECT count(*) FROM journal_entries WHERE kind = 'debit' AND idempotency_key = ANY($1)",
                        keys_sent,
                    )
                    return count == charged

                await poll(committed, "the stopped server's insert to commit")
        finally:
            await watcher.close()
        os.kill(server.process.pid, signal.SIGKILL)
        await asyncio.to_thread(server.process.wait, 10)
    finally:
        await blocker.close()
    return task


async def test_a_server_killed_mid_batch_charges_each_item_at_most_once(
    killable: tuple[Settings, Keys],
) -> None:
    """Batch B dies after its commit (the insert commits while the server
    is stopped), batch A before it (its insert is cancelled). After a
    restart and the sweeper: B's charges are kept once and its retry
    replays them; A's stand beside their reversals and its retry says
    idempotency_key_reversed; refused items stay refused; Redis equals the
    ledger. (B goes first: the sweeper settling B's orphans only reads the
    ledger, so the only insert A's lock blocks is A's.)"""
    settings, keys = killable
    assert settings.database_url is not None
    servers = [start_server(settings, **KILL_ENV)]
    try:
        async with httpx.AsyncClient(base_url=servers[0].base_url, timeout=30) as http:
            rich = [await new_wallet(http, keys, funded_micros=1_000_000) for _ in range(4)]
            poor = await new_wallet(http, keys)
        wallet_ids = [*rich, poor]
        run = secrets.token_hex(3)
        batches = {}
        for name, commit in (("b", True), ("a", False)):
            debits = items(f"{run}{name}", rich, KILLED_ITEMS) + items(f"{run}{name}-poor", [poor], 2)
            sent = Sent(debits, secrets.token_hex(8))
            task = await _batch_then_stop(settings, servers[-1], keys, sent, KILLED_ITEMS, commit=commit)
            batches[name] = await asyncio.wait_for(task, WAIT_S)
            assert batches[name].status is None, f"batch {name} was answered: {batches[name]}"
            servers.append(start_server(settings, **KILL_ENV))  # its sweeper settles the orphans

        await wait_settled(settings)
        ledger = await ledger_debits(settings.database_url)
        for name, reversed_expected in (("a", True), ("b", False)):
            for debit in batches[name].debits[:KILLED_ITEMS]:
                entries = ledger.get(debit["idempotency_key"], [])
                assert len(entries) == 1, (debit, entries)
                assert (entries[0].reversed_by is not None) == reversed_expected, (name, debit, entries)
            assert not any(ledger.get(d["idempotency_key"]) for d in batches[name].debits[KILLED_ITEMS:])
        await assert_redis_equals_ledger(settings, wallet_ids)

        for name in ("a", "b"):
            sent = batches[name]
            retry = await send(servers[-1].base_url, keys, Sent(sent.debits, sent.key))
            assert retry.status == 200 and retry.results is not None, retry
            charged = retry.results[:KILLED_ITEMS]
            if name == "a":
                assert codes(charged) == [(409, "idempotency_key_reversed")] * KILLED_ITEMS
            else:
                assert codes(charged) == [(201, None)] * KILLED_ITEMS and all(r["replayed"] for r in charged)
                ids = [ledger[d["idempotency_key"]][0].id for d in sent.debits[:KILLED_ITEMS]]
                assert [uuid.UUID(r["entry"]["id"]) for r in charged] == ids
            assert codes(retry.results[KILLED_ITEMS:]) == [(402, "insufficient_funds")] * 2
        await wait_settled(settings)
        after = await ledger_debits(settings.database_url)
        assert {k: len(v) for k, v in after.items() if k.startswith(run)} == {
            k: len(v) for k, v in ledger.items() if k.startswith(run)
        }, "a retry charged again"
        await assert_redis_equals_ledger(settings, wallet_ids)
    finally:
        for server in servers:
            if server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
            stop_server(server)
