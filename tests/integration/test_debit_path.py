"""The debit path settles every charge it made in Redis, against real Postgres
and Redis with real faults: a refused ledger connection refunds at once; a
stalled one is answered 503 and the sweeper writes the debit beside its
reversal; an orphan the sweeper had to write is reversed, one the writer had
committed is kept; a key Redis forgot is recognised by the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest
import redis.asyncio as redis
from conftest import account_balance, free_port

from centime.errors import Unavailable
from centime.settings import Settings
from ledger import repo as ledger_repo
from ledger.accounts import debit_lines, reversal_id_for, reversal_of
from ledger.ids import uuid7
from ledger.writer import LedgerWriter, write_entries, write_with_reversal
from wallet.cache import Cache
from wallet.charges import PendingCharge, clearing, request_hash, undo
from wallet.errors import IdempotencyKeyReversed
from wallet.maintenance import rebuild_cache
from wallet.replies import Replayed
from wallet.schemas import CreateWallet, EntryPayload
from wallet.service import Wallets
from wallet.sweeper import sweep_once
from wallet.write_through import CommitResult

POLLS_MAX = 500
"""Polls of 10 ms for a condition a test waits on: 5 s, then it fails."""


class Harness(msgspec.Struct):
    pool: asyncpg.Pool
    cache: Cache
    settings: Settings
    database_url: str

    def wallets(
        self, connect: Callable | None = None, *, commit_timeout_ms: int = 2000
    ) -> tuple[Wallets, LedgerWriter[CommitResult]]:
        settings = msgspec.structs.replace(self.settings, commit_timeout_ms=commit_timeout_ms)
        writer: LedgerWriter[CommitResult] = LedgerWriter(
            connect or (lambda: asyncpg.connect(self.database_url)),
            batch_entries_max=16,
            connections=2,
            timeout_s=1.0,
        )
        wallets = Wallets(pool=self.pool, cache=self.cache, writer=writer, settings=settings)
        writer.start(after_commit=wallets.after_commit)
        return wallets, writer


@pytest.fixture
async def harness(settings: Settings, private_database: str) -> AsyncIterator[Harness]:
    pool = await asyncpg.create_pool(private_database, min_size=1, max_size=4)
    client = redis.Redis.from_url(settings.redis_url)
    prefix = f"{settings.redis_prefix}dp{secrets.token_hex(3)}"
    cache = Cache(client, prefix=prefix, partition_count=4)
    try:
        yield Harness(
            pool,
            cache,
            msgspec.structs.replace(settings, database_url=private_database, redis_prefix=prefix),
            private_database,
        )
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await pool.close()


async def funded_wallet(wallets: Wallets, micros: int) -> uuid.UUID:
    wallet = await wallets.create_wallet(
        CreateWallet(owner_id=secrets.token_hex(6), currency="usd"), owner_ids=None
    )
    await wallets.post_entry(
        wallet.id,
        kind="credit",
        amount_micros=micros,
        idempotency_key="fund",
        description="f",
        metadata={},
        owner_ids=None,
    )
    return wallet.id


async def debit(wallets: Wallets, wallet_id: uuid.UUID, key: str, micros: int = 100):  # type: ignore[no-untyped-def]
    return await wallets.post_entry(
        wallet_id,
        kind="debit",
        amount_micros=micros,
        idempotency_key=key,
        description=None,
        metadata={},
        owner_ids=None,
    )


async def ledger_balance(h: Harness, wallet_id: uuid.UUID) -> int:
    async with h.pool.acquire() as conn:
        return await account_balance(conn, wallet_id)


async def redis_balance(h: Harness, wallet_id: uuid.UUID) -> int:
    cached = await h.cache.wallet(wallet_id)
    assert cached is not None
    return cached.balance_micros


async def kinds(h: Harness, wallet_id: uuid.UUID) -> list[str]:
    async with h.pool.acquire() as conn:
        return sorted(e.kind for e in await ledger_repo.wallet_entries_page(conn, wallet_id, None, 100))


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts and never answers: a stalled Postgres."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()


async def test_a_refused_ledger_connection_refunds_at_once(harness: Harness) -> None:
    good, good_writer = harness.wallets()
    wallet_id = await funded_wallet(good, 1_000)
    closed_port = free_port()
    bad, bad_writer = harness.wallets(
        lambda: asyncpg.connect(f"postgresql://postgres@127.0.0.1:{closed_port}/x")
    )
    try:
        with pytest.raises(Unavailable):
            await debit(bad, wallet_id, "k1")
        assert await redis_balance(harness, wallet_id) == 1_000
        # Nothing was charged, so the key is free: a retry runs afresh.
        entry, replayed = await debit(good, wallet_id, "k1")
        assert not replayed and entry.balance_micros == 900
        assert await ledger_balance(harness, wallet_id) == 900
    finally:
        await bad_writer.stop()
        await good_writer.stop()


async def test_a_stalled_commit_is_answered_503_then_written_and_reversed(harness: Harness) -> None:
    good, good_writer = harness.wallets()
    wallet_id = await funded_wallet(good, 1_000)
    async with silent_server() as port:
        stalled, stalled_writer = harness.wallets(
            lambda: asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/x", timeout=30),
            commit_timeout_ms=200,
        )
        try:
            with pytest.raises(Unavailable):
                await debit(stalled, wallet_id, "k1")
        finally:
            await stalled_writer.stop()
    assert await redis_balance(harness, wallet_id) == 900  # still charged, abandoned to the sweeper
    report = await sweep_once(harness.pool, harness.cache, harness.settings, grace_ms=0)
    assert report.abandoned_reversed == 1
    assert await redis_balance(harness, wallet_id) == 1_000
    assert await ledger_balance(harness, wallet_id) == 1_000
    assert await kinds(harness, wallet_id) == ["credit", "debit", "reversal"]
    with pytest.raises(IdempotencyKeyReversed):
        await debit(good, wallet_id, "k1")
    # A second sweep finds nothing left to do.
    assert (await sweep_once(harness.pool, harness.cache, harness.settings, grace_ms=0)).settled == 0
    await good_writer.stop()


async def test_an_orphan_the_sweeper_writes_is_reversed(harness: Harness) -> None:
    good, good_writer = harness.wallets()
    wallet_id = await funded_wallet(good, 1_000)
    await good_writer.stop()
    # A process charged Redis, then died before its commit.
    charge = await good._charge(_payload(wallet_id, "orphan"))
    assert await redis_balance(harness, wallet_id) == 900
    report = await sweep_once(harness.pool, harness.cache, harness.settings, grace_ms=0)
    assert report.orphans_reversed == 1, report
    assert await redis_balance(harness, wallet_id) == 1_000 == await ledger_balance(harness, wallet_id)
    assert await kinds(harness, wallet_id) == ["credit", "debit", "reversal"]
    assert charge is not None


async def test_an_orphan_the_writer_had_committed_is_kept(harness: Harness) -> None:
    good, good_writer = harness.wallets()
    wallet_id = await funded_wallet(good, 1_000)
    await good_writer.stop()
    # A process charged Redis and committed, then died before settling Redis.
    charge = await good._charge(_payload(wallet_id, "committed"))
    async with harness.pool.acquire() as conn:
        await write_entries(conn, [charge.entry], timeout_s=2)
    report = await sweep_once(harness.pool, harness.cache, harness.settings, grace_ms=0)
    assert report.orphans_committed == 1, report
    assert await redis_balance(harness, wallet_id) == 900 == await ledger_balance(harness, wallet_id)
    assert await kinds(harness, wallet_id) == ["credit", "debit"]


async def test_a_key_redis_forgot_is_recognised_by_the_ledger(harness: Harness) -> None:
    good, good_writer = harness.wallets()
    try:
        wallet_id = await funded_wallet(good, 1_000)
        first, _ = await debit(good, wallet_id, "k1")
        await harness.cache.client.delete(harness.cache.idempotency_key(wallet_id, "k1"))
        again, replayed = await debit(good, wallet_id, "k1")
        assert replayed and again.id == first.id
        assert await redis_balance(harness, wallet_id) == 900 == await ledger_balance(harness, wallet_id)
    finally:
        await good_writer.stop()


def _payload(wallet_id: uuid.UUID, key: str) -> EntryPayload:
    return EntryPayload(
        id=uuid7(),
        wallet_id=wallet_id,
        kind="debit",
        amount_micros=100,
        idempotency_key=key,
        request_hash=request_hash("debit", 100, None, {}),
        description=None,
        metadata={},
        created_at=datetime.now(UTC),
    )


async def test_an_orphan_the_ledger_refuses_is_undone_and_counted_refused(harness: Harness) -> None:
    good, good_writer = harness.wallets()
    wallet_id = await funded_wallet(good, 1_000)
    await good_writer.stop()
    async with harness.pool.acquire() as conn:  # Postgres's own refusal, for this test's database
        await conn.execute(
            "ALTER TABLE journal_entries ADD CONSTRAINT refuse_entry CHECK (idempotency_key <> 'refused')"
        )
    await good._charge(_payload(wallet_id, "refused"))
    assert await redis_balance(harness, wallet_id) == 900
    report = await sweep_once(harness.pool, harness.cache, harness.settings, grace_ms=0)
    assert (report.refused, report.abandoned_refunded, report.orphans_reversed) == (1, 1, 0), report
    assert await redis_balance(harness, wallet_id) == 1_000 == await ledger_balance(harness, wallet_id)
    assert await kinds(harness, wallet_id) == ["credit"]
    assert (await sweep_once(harness.pool, harness.cache, harness.settings, grace_ms=0)).settled == 0


async def test_an_orphan_whose_key_the_ledger_holds_for_another_entry_is_refunded(harness: Harness) -> None:
    """Redis forgot the key, a second charge of it was orphaned: the ledger's
    holder stands, the orphan is undone and its key left to the holder."""
    good, good_writer = harness.wallets()
    wallet_id = await funded_wallet(good, 1_000)
    await debit(good, wallet_id, "twice")
    await good_writer.stop()
    await harness.cache.client.delete(harness.cache.idempotency_key(wallet_id, "twice"))
    await good._charge(_payload(wallet_id, "twice"))
    assert await redis_balance(harness, wallet_id) == 800
    report = await sweep_once(harness.pool, harness.cache, harness.settings, grace_ms=0)
    assert (report.abandoned_refunded, report.orphans_reversed, report.refused) == (1, 0, 0), report
    assert await redis_balance(harness, wallet_id) == 900 == await ledger_balance(harness, wallet_id)
    assert await kinds(harness, wallet_id) == ["credit", "debit"]


async def test_an_unreadable_outbox_entry_is_counted_and_does_not_stop_the_pass(harness: Harness) -> None:
    good, good_writer = harness.wallets()
    wallet_id = await funded_wallet(good, 1_000)
    await good_writer.stop()
    outbox = harness.cache.outbox_key(harness.cache.partition(wallet_id))
    await harness.cache.client.xadd(outbox, {"e": b"not a payload", "b": b"x"})
    await good._charge(_payload(wallet_id, "readable"))
    report = await sweep_once(harness.pool, harness.cache, harness.settings, grace_ms=0)
    assert (report.unreadable, report.orphans_reversed) == (1, 1), report
    assert await redis_balance(harness, wallet_id) == 1_000 == await ledger_balance(harness, wallet_id)


async def test_a_pass_settles_at_most_sweeper_batch_max_orphans(harness: Harness) -> None:
    good, good_writer = harness.wallets()
    wallet_id = await funded_wallet(good, 1_000)
    await good_writer.stop()
    for n in range(5):
        await good._charge(_payload(wallet_id, f"orphan-{n}"))
    bounded = msgspec.structs.replace(harness.settings, sweeper_batch_max=3)
    passes = [
        (await sweep_once(harness.pool, harness.cache, bounded, grace_ms=0)).orphans_reversed
        for _ in range(3)
    ]
    assert passes == [3, 2, 0]
    assert await redis_balance(harness, wallet_id) == 1_000 == await ledger_balance(harness, wallet_id)


async def test_rebuild_cache_restores_balances_and_recent_keys(harness: Harness) -> None:

    good, good_writer = harness.wallets()
    try:
        wallet_id = await funded_wallet(good, 1_000)
        kept, _ = await debit(good, wallet_id, "kept")
    finally:
        await good_writer.stop()
    # Redis loses everything of this deployment.
    client = harness.cache.client
    keys = [key async for key in client.scan_iter(match=f"{harness.cache.prefix}:*")]
    await client.delete(*keys)

    report = await rebuild_cache(harness.pool, harness.cache, idempotency_ttl_s=3600)
    assert report.wallets == 1 and report.keys_restored == 2  # the funding credit and the debit
    assert await redis_balance(harness, wallet_id) == 900 == await ledger_balance(harness, wallet_id)
    record = await client.hgetall(harness.cache.idempotency_key(wallet_id, "kept"))
    assert record[b"id"] == str(kept.id).encode() and record[b"st"] == b"ok"
    assert 3500 < await client.ttl(harness.cache.idempotency_key(wallet_id, "kept")) <= 3600
    # A retry is answered from Redis, without charging anything first.
    reply = await harness.cache.apply(
        wallet_id=wallet_id,
        kind="debit",
        amount_micros=100,
        request_hash=request_hash("debit", 100, None, {}),
        entry_id=uuid.uuid4(),
        payload=b"{}",
        idempotency_key="kept",
        ttl_s=3600,
    )
    assert isinstance(reply, Replayed) and reply.balance_micros == 900
    assert await redis_balance(harness, wallet_id) == 900
    # A second rebuild leaves the restored records alone.
    assert (await rebuild_cache(harness.pool, harness.cache, idempotency_ttl_s=3600)).keys_restored == 0


async def test_an_orphan_its_request_reversed_in_the_ledger_is_undone(harness: Harness) -> None:

    good, good_writer = harness.wallets()
    wallet_id = await funded_wallet(good, 1_000)
    await good_writer.stop()
    # The request answered 503 and, Redis being away, recorded it in the ledger.
    charge = await good._charge(_payload(wallet_id, "stalled"))
    async with harness.pool.acquire() as conn:
        await write_with_reversal(conn, charge.entry, timeout_s=2)
    report = await sweep_once(harness.pool, harness.cache, harness.settings, grace_ms=0)
    assert report.orphans_reversed == 1 and report.orphans_committed == 0, report
    assert await redis_balance(harness, wallet_id) == 1_000 == await ledger_balance(harness, wallet_id)
    with pytest.raises(IdempotencyKeyReversed):
        await debit(good, wallet_id, "stalled")


@pytest.mark.parametrize("kind", ["debit", "credit"])
async def test_undo_reversed_reaches_a_charge_the_writer_had_cleared(harness: Harness, kind: str) -> None:

    good, good_writer = harness.wallets()
    try:
        wallet_id = await funded_wallet(good, 1_000)
        # The writer commits and settles; meanwhile the request, unable to reach
        # Redis, answers 503 and reverses the entry in the ledger.
        payload = msgspec.structs.replace(_payload(wallet_id, "late"), kind=kind)
        charge = await good._charge(payload)
        assert isinstance(charge, PendingCharge)
        good.committing.charges[charge.entry.id] = charge
        _, replayed = await good.write_through(charge, payload)
        assert not replayed
    finally:
        await good_writer.stop()
    async with harness.pool.acquire() as conn:
        await write_entries(conn, [reversal_of(charge.entry, reversal_id_for(charge.entry.id))], timeout_s=2)
    key = charge.entry.idempotency_key or ""
    assert await harness.cache.undo_reversed(
        idempotency_key=key, clearing=clearing(charge), undo=undo(charge)
    )
    assert not await harness.cache.undo_reversed(
        idempotency_key=key, clearing=clearing(charge), undo=undo(charge)
    )
    assert await redis_balance(harness, wallet_id) == 1_000 == await ledger_balance(harness, wallet_id)
    record = await harness.cache.client.hgetall(harness.cache.idempotency_key(wallet_id, key))
    assert record[b"st"] == b"reversed"
    # Nothing is left for the sweeper.
    assert (await sweep_once(harness.pool, harness.cache, harness.settings, grace_ms=0)).settled == 0


async def test_rebuild_cache_corrects_a_stale_record_of_a_reversed_entry(harness: Harness) -> None:

    good, good_writer = harness.wallets()
    try:
        wallet_id = await funded_wallet(good, 1_000)
        entry, _ = await debit(good, wallet_id, "stale")
    finally:
        await good_writer.stop()
    # An old snapshot still says `ok` for an entry the ledger has since reversed.
    async with harness.pool.acquire() as conn:
        record = (await ledger_repo.entries_by_id(conn, [entry.id]))[entry.id]

        full = msgspec.structs.replace(record, lines=debit_lines(wallet_id, "usd", record.amount_micros))
        await write_entries(conn, [reversal_of(full, reversal_id_for(entry.id))], timeout_s=2)
    await rebuild_cache(harness.pool, harness.cache, idempotency_ttl_s=3600)
    stored = await harness.cache.client.hgetall(harness.cache.idempotency_key(wallet_id, "stale"))
    assert stored[b"st"] == b"reversed" and stored[b"x"] == b""
    with pytest.raises(IdempotencyKeyReversed):
        await debit(good, wallet_id, "stale")


async def test_a_batch_commits_its_charges_before_its_slow_lookups(harness: Harness) -> None:
    """A refused item's ledger lookup waits here for a pool held by others.
    The charged item's commit must not wait with it: a sweeper with a short
    grace, meanwhile, finds nothing to reverse, and the 201 stands."""
    from wallet.schemas import BatchDebit, CreateBatch

    wallets, writer = harness.wallets()
    sweeper_pool = await asyncpg.create_pool(harness.database_url, min_size=1, max_size=2)
    try:
        rich = await funded_wallet(wallets, 10_000)
        poor = await funded_wallet(wallets, 10)
        held = [await harness.pool.acquire() for _ in range(4)]  # the whole pool, for a while

        async def sweep_then_release() -> object:
            """Once the batch has charged (and so waits at its lookups), and
            its charge is older than the sweeper's grace: sweep, then let the
            lookups have the pool."""
            try:
                for _ in range(POLLS_MAX):
                    if await redis_balance(harness, rich) == 9_000:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the batch never charged")
                await asyncio.sleep(0.3)  # past the 100 ms grace below
                return await sweep_once(sweeper_pool, harness.cache, harness.settings, grace_ms=100)
            finally:
                for conn in held:
                    await harness.pool.release(conn)

        batch = CreateBatch(
            debits=[
                BatchDebit(wallet_id=rich, amount_micros=1_000, idempotency_key="a"),
                BatchDebit(wallet_id=poor, amount_micros=1_000, idempotency_key="b"),
            ]
        )
        results, swept = await asyncio.gather(
            wallets.post_batch(batch, idempotency_key=secrets.token_hex(8), owner_ids=None),
            sweep_then_release(),
        )
        assert [r.status for r in results] == [201, 402], results
        assert swept.settled == 0, swept  # type: ignore[attr-defined]
        assert await kinds(harness, rich) == ["credit", "debit"]
        assert await ledger_balance(harness, rich) == await redis_balance(harness, rich) == 9_000
    finally:
        await writer.stop()
        await sweeper_pool.close()
