"""LedgerWriter.submit_many against a real Postgres: a group (a batch
request's debits) is written in one statement, whole, however single
entries queue around it; a full queue refuses a group whole; an entry
Postgres refuses does not fail its group mates; and entries whose request
gave up (cancelled futures) are never written."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest

from centime.errors import InvariantViolation
from ledger import repo as ledger_repo
from ledger.accounts import debit_lines, system_account_id
from ledger.ids import uuid7
from ledger.schemas import EntryRecord, Line
from ledger.writer import (
    BACKLOG_BATCH_ENTRIES_MAX,
    QUEUE_ENTRIES_MAX,
    CommitFailed,
    Committed,
    KeyTaken,
    LedgerWriter,
    Outcome,
    QueueFull,
)

CURRENCY = "usd"
FUTURE_WAIT_S = 20.0


class Ledger(msgspec.Struct):
    """A private database with wallets, and what every writer batch held."""

    url: str
    pool: asyncpg.Pool
    wallet_ids: list[uuid.UUID]
    batches: list[list[uuid.UUID]] = []
    observed: list[int] = []

    def writer(
        self, *, batch_entries_max: int = 8, connections: int = 2, **kw: float
    ) -> LedgerWriter[Outcome]:
        """A writer, not started: start it with after_commit=self.after_commit."""
        return LedgerWriter(
            lambda: asyncpg.connect(self.url),
            batch_entries_max=batch_entries_max,
            connections=connections,
            timeout_s=5.0,
            observe_batch=self.observed.append,
            **kw,
        )

    async def after_commit(self, entries: Sequence[EntryRecord], outcomes: list[Outcome]) -> list[Outcome]:
        """Records what every batch held."""
        self.batches.append([e.id for e in entries])
        return list(outcomes)

    def batch_of(self, entry_id: uuid.UUID) -> int:
        """The index of the one committed batch that held the entry."""
        found = [n for n, batch in enumerate(self.batches) if entry_id in batch]
        assert len(found) == 1, f"entry {entry_id} in batches {found}"
        return found[0]

    async def committed_at(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, datetime]:
        rows = await self.pool.fetch(
            "SELECT id, committed_at FROM journal_entries WHERE id = ANY($1::uuid[])", list(ids)
        )
        return {row["id"]: row["committed_at"] for row in rows}


@pytest.fixture
async def ledger(private_database: str) -> AsyncIterator[Ledger]:
    pool = await asyncpg.create_pool(private_database, min_size=1, max_size=4)
    wallet_ids = [uuid7() for _ in range(4)]
    try:
        async with pool.acquire() as conn:
            await ledger_repo.ensure_system_accounts(conn, CURRENCY)
            for n, wallet_id in enumerate(wallet_ids):
                await conn.execute(
                    "INSERT INTO wallets (id, owner_id, currency) VALUES ($1, $2, $3)",
                    wallet_id,
                    f"writer-{n}",
                    CURRENCY,
                )
                await ledger_repo.insert_wallet_account(conn, wallet_id, CURRENCY)
        yield Ledger(private_database, pool, wallet_ids)
    finally:
        await pool.close()


def debit(
    wallet_id: uuid.UUID, *, key: str | None = None, lines: tuple[Line, ...] | None = None
) -> EntryRecord:
    entry_id = uuid7()
    return EntryRecord(
        id=entry_id,
        kind="debit",
        currency=CURRENCY,
        wallet_id=wallet_id,
        amount_micros=100,
        balance_micros=0,
        idempotency_key=key or f"k-{entry_id}",
        request_hash="h",
        created_at=datetime.now(UTC),
        lines=lines or debit_lines(wallet_id, CURRENCY, 100),
    )


def unbalanced(wallet_id: uuid.UUID) -> EntryRecord:
    """Postgres refuses it for good: its lines do not sum to zero."""
    return debit(wallet_id, lines=(Line(wallet_id, 100), Line(system_account_id("revenue", CURRENCY), -99)))


async def outcomes(futures: Sequence[asyncio.Future[Outcome]]) -> list[object]:
    """Each future's result or exception, waited for with a deadline."""
    await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), FUTURE_WAIT_S)
    return [f.exception() or f.result() for f in futures]


async def test_a_group_is_one_statement_even_past_the_batch_bound(ledger: Ledger) -> None:
    """Singles queued before and after a group of 30, with batches of at most
    8: the singles go in batches of their own, the group in one statement."""
    writer = ledger.writer(batch_entries_max=8, connections=2)
    w = ledger.wallet_ids[0]
    before = [debit(w) for _ in range(5)]
    group = [debit(ledger.wallet_ids[n % 4]) for n in range(30)]
    after = [debit(w) for _ in range(5)]
    futures = [writer.submit(e) for e in before]
    futures += writer.submit_many(group)
    futures += [writer.submit(e) for e in after]
    assert writer.queued == 40
    writer.start(after_commit=ledger.after_commit)
    try:
        results = await outcomes(futures)
    finally:
        await writer.stop()
    assert all(isinstance(r, Committed) and r.written for r in results), results

    home = ledger.batch_of(group[0].id)
    assert sorted(ledger.batches[home]) == sorted(e.id for e in group), "the group shared its statement"
    assert sorted(len(b) for b in ledger.batches) == sorted(ledger.observed)
    assert all(len(b) <= 8 for n, b in enumerate(ledger.batches) if n != home)
    committed = await ledger.committed_at([e.id for e in group])
    assert len(committed) == 30 and len(set(committed.values())) == 1


async def test_groups_never_split_while_singles_queue_around_them(ledger: Ledger) -> None:
    """Many tasks submit singles and groups (1..BACKLOG_BATCH_ENTRIES_MAX
    entries) at once, so backlogs form and batch bounds cut through the
    queue: every group still commits in exactly one statement."""
    writer = ledger.writer(batch_entries_max=16, connections=2)
    writer.start(after_commit=ledger.after_commit)
    rng = random.Random(7)
    groups: list[list[EntryRecord]] = []
    futures: list[asyncio.Future[Outcome]] = []

    async def producer(n: int) -> None:
        for round_no in range(12):
            for _ in range(rng.randint(0, 6)):
                futures.append(writer.submit(debit(ledger.wallet_ids[n % 4])))
            size = BACKLOG_BATCH_ENTRIES_MAX if (n, round_no) == (0, 6) else rng.randint(1, 60)
            group = [debit(ledger.wallet_ids[(n + k) % 4]) for k in range(size)]
            groups.append(group)
            futures.extend(writer.submit_many(group))
            await asyncio.sleep(0)

    try:
        await asyncio.gather(*(producer(n) for n in range(8)))
        results = await outcomes(futures)
    finally:
        await writer.stop()
    assert all(isinstance(r, Committed) for r in results), [
        r for r in results if not isinstance(r, Committed)
    ][:3]
    for group in groups:
        homes = {ledger.batch_of(e.id) for e in group}
        assert len(homes) == 1, f"a group of {len(group)} was split over batches {homes}"
    mixed = [b for b in ledger.batches if len(b) > 1]
    assert len(ledger.batches) < len(futures) and mixed, "no backlog formed: the test proved nothing"
    assert max(len(b) for b in ledger.batches) <= BACKLOG_BATCH_ENTRIES_MAX
    with pytest.raises(InvariantViolation):
        writer.submit_many([debit(ledger.wallet_ids[0]) for _ in range(BACKLOG_BATCH_ENTRIES_MAX + 1)])


async def test_a_full_queue_refuses_a_group_whole(ledger: Ledger) -> None:
    writer = ledger.writer()  # never started: the queue only fills
    w = ledger.wallet_ids[0]
    waiting: list[asyncio.Future[Outcome]] = []
    while writer.queued < QUEUE_ENTRIES_MAX - 10:
        room = QUEUE_ENTRIES_MAX - 10 - writer.queued
        waiting += writer.submit_many([debit(w) for _ in range(min(room, BACKLOG_BATCH_ENTRIES_MAX))])
    with pytest.raises(QueueFull):
        writer.submit_many([debit(w) for _ in range(11)])
    assert writer.queued == QUEUE_ENTRIES_MAX - 10, "part of a refused group was queued"
    fits = writer.submit_many([debit(w) for _ in range(10)])
    assert writer.queued == QUEUE_ENTRIES_MAX
    with pytest.raises(QueueFull):
        writer.submit(debit(w))
    await writer.stop()
    failed = [f.exception() for f in [*waiting, *fits]]
    assert all(isinstance(e, CommitFailed) and e.definite for e in failed)


async def test_a_slow_queue_refuses_a_group_whole(ledger: Ledger) -> None:
    """The oldest entry has waited longer than queue_wait_max_s: its
    request is about to give up, so a new group is refused, not queued."""
    writer = ledger.writer(queue_wait_max_s=0.05)  # never started
    w = ledger.wallet_ids[0]
    (first,) = writer.submit_many([debit(w)])
    await asyncio.sleep(0.1)  # the queue ages past its bound (a wait on the clock, not a poll)
    with pytest.raises(QueueFull):
        writer.submit_many([debit(w) for _ in range(5)])
    assert writer.queued == 1
    await writer.stop()
    assert isinstance(first.exception(), CommitFailed)


async def test_a_refused_entry_does_not_fail_its_group_mates(ledger: Ledger) -> None:
    """Postgres refuses the whole statement for one unbalanced entry: the
    writer writes each entry alone, so only that one fails (definite: a 503
    whose charge is refunded at once), and an entry whose key is taken is
    told so without failing anyone."""
    writer = ledger.writer(batch_entries_max=4, connections=1)
    w = ledger.wallet_ids[1]
    held = debit(w, key="held")
    (first,) = writer.submit_many([held])
    writer.start(after_commit=ledger.after_commit)
    try:
        assert await outcomes([first]) == [Committed(held.id, written=True)]
        group = [debit(ledger.wallet_ids[n % 4]) for n in range(10)]
        group[4] = unbalanced(w)
        group[7] = debit(w, key="held")  # the key is held by an earlier entry
        single = debit(w)
        futures = [*writer.submit_many(group), writer.submit(single)]
        results = await outcomes(futures)
    finally:
        await writer.stop()
    refused = results[4]
    assert isinstance(refused, CommitFailed) and refused.definite, refused
    assert isinstance(results[7], KeyTaken) and results[7].holder.entry.id == held.id, results[7]
    kept = [e for n, e in enumerate([*group, single]) if n not in (4, 7)]
    assert [r for n, r in enumerate(results) if n not in (4, 7)] == [
        Committed(e.id, written=True) for e in kept
    ]
    committed = await ledger.committed_at([e.id for e in [*group, single]])
    assert set(committed) == {e.id for e in kept}


async def test_cancelled_entries_in_a_group_are_never_written(ledger: Ledger) -> None:
    writer = ledger.writer(batch_entries_max=4, connections=1)
    w = ledger.wallet_ids[2]
    group = [debit(w) for _ in range(10)]
    futures = writer.submit_many(group)
    for n in (2, 7):
        futures[n].cancel()
    gone = writer.submit_many([debit(w) for _ in range(3)])
    for future in gone:
        future.cancel()
    last = debit(w)
    futures.append(writer.submit(last))
    writer.start(after_commit=ledger.after_commit)
    try:
        results = await outcomes([f for n, f in enumerate(futures) if n not in (2, 7)])
    finally:
        await writer.stop()
    kept = [e for n, e in enumerate(group) if n not in (2, 7)]
    assert results == [Committed(e.id, written=True) for e in [*kept, last]]
    committed = await ledger.committed_at([e.id for e in [*group, last]])
    assert set(committed) == {e.id for e in [*kept, last]}
    assert len({committed[e.id] for e in kept}) == 1, "the group's remaining entries shared one statement"
    assert {e.id for e in kept} <= set(ledger.batches[ledger.batch_of(kept[0].id)])
    written = {entry_id for batch in ledger.batches for entry_id in batch}
    assert not written & {group[2].id, group[7].id}, "a cancelled entry reached a statement"
