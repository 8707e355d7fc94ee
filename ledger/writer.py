"""Group commit: concurrent entries share one Postgres statement.

Each of `connections` workers owns one connection. A worker takes the first
waiting entry and whatever else is already queued, up to
`batch_entries_max` (more when a backlog has built up: an equal share of it,
up to BACKLOG_BATCH_ENTRIES_MAX), and writes them all in one autocommit
statement (entries and lines together). While it waits on Postgres, new entries queue up and
form the next batch, so batches grow with load and stay at one under light
load: no timer adds latency.

A failed write is either *definite* (Postgres answered with an error, or the
statement was never sent: nothing was written) or *uncertain* (the statement
went out and no answer came back: it may have committed). Callers settle the
two differently; see docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import asyncpg
import msgspec

from centime.errors import invariant
from ledger import repo
from ledger.accounts import reversal_id_for, reversal_of
from ledger.schemas import EntryRecord, KeyHolder

log = logging.getLogger(__name__)

QUEUE_ENTRIES_MAX = 50_000
"""Entries waiting for a worker; past this, submit() refuses at once."""
BACKLOG_BATCH_ENTRIES_MAX = 1_000
"""A backlog (more waiting than the workers take in one round of normal
batches) is drained in batches of up to this many: a statement's fixed cost
(round trip, triggers, commit) is then shared by more entries."""


# SQLSTATE classes after which a statement may or may not have committed:
# connection exceptions, operator intervention (shutdown), resources, system.
_UNCERTAIN_SQLSTATE_CLASSES = ("08", "53", "57", "58", "XX")
_RETRYABLE_SQLSTATE_CLASSES = ("40", "55")


class Committed(msgspec.Struct, frozen=True, gc=False):
    """The entry is in the ledger (`written`: by this statement, or before)."""

    entry_id: uuid.UUID
    written: bool


class KeyTaken(msgspec.Struct, frozen=True):
    """Another entry already holds this entry's (wallet, idempotency key)."""

    holder: KeyHolder


Outcome = Committed | KeyTaken


class CommitFailed(Exception):
    """The write failed. `definite`: nothing was written. `refused`: and
    Postgres refused the entry itself (a constraint or data error, not a lost
    connection or a retryable conflict): a bug, not an outage."""

    def __init__(self, message: str, *, definite: bool, refused: bool = False) -> None:
        super().__init__(message)
        self.definite = definite
        self.refused = refused


class QueueFull(Exception):
    """More entries wait than QUEUE_ENTRIES_MAX. Nothing was sent."""


def is_refusal(exc: BaseException) -> bool:
    """True when Postgres refused the statement for what it said: not an
    uncertain failure, and not one a retry may cure (serialization failure,
    deadlock, lock timeout)."""
    if not is_definite_failure(exc):
        return False
    sqlstate = getattr(exc, "sqlstate", None) or "XX000"
    return not sqlstate.startswith(_RETRYABLE_SQLSTATE_CLASSES)


def is_definite_failure(exc: BaseException) -> bool:
    """True when Postgres answered with an error that rolled the statement back."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or "XX000"
        return not sqlstate.startswith(_UNCERTAIN_SQLSTATE_CLASSES)
    return False


async def write_entries(
    conn: asyncpg.Connection, entries: Sequence[EntryRecord], *, timeout_s: float
) -> list[Outcome]:
    """Write a batch and say, per entry, what the ledger holds now."""
    written = await repo.insert_entries(conn, entries, timeout_s=timeout_s)
    try:
        return await _outcomes(conn, entries, written)
    except Exception as exc:
        # The insert went through (and, outside a transaction, committed):
        # what failed is only our reading of it.
        raise CommitFailed(
            f"reading the outcome of a committed write failed: {exc!r}", definite=False
        ) from exc


async def _outcomes(
    conn: asyncpg.Connection, entries: Sequence[EntryRecord], written: set[uuid.UUID]
) -> list[Outcome]:
    skipped = [entry for entry in entries if entry.id not in written]
    present = await repo.entries_by_id(conn, [entry.id for entry in skipped]) if skipped else {}
    outcomes: list[Outcome] = []
    for entry in entries:
        if entry.id in written:
            outcomes.append(Committed(entry.id, written=True))
        elif entry.id in present:
            outcomes.append(Committed(entry.id, written=False))
        else:
            holder = None
            if entry.idempotency_key is not None:
                holder = await repo.entry_by_wallet_key(conn, entry.wallet_id, entry.idempotency_key)
            if holder is None:
                raise CommitFailed(
                    f"entry {entry.id} was refused for an unknown conflict", definite=True, refused=True
                )
            outcomes.append(KeyTaken(holder))
    return outcomes


async def write_with_reversal(conn: asyncpg.Connection, entry: EntryRecord, *, timeout_s: float) -> Outcome:
    """Write an entry (idempotent by id) and, if the ledger then holds it,
    its reversal (deterministic id), in one transaction: nobody ever sees the
    entry without its reversal. KeyTaken: the key belongs to another entry,
    ours was not written, and nothing is reversed."""
    async with conn.transaction():
        (outcome,) = await write_entries(conn, [entry], timeout_s=timeout_s)
        if isinstance(outcome, Committed):
            await write_entries(conn, [reversal_of(entry, reversal_id_for(entry.id))], timeout_s=timeout_s)
    return outcome


ResultT = TypeVar("ResultT")
"""What a writer's futures resolve to: its after-commit step's result per
entry (the wallet's: an Outcome, or AbandonedFirst), else the Outcome."""

AfterCommit = Callable[[Sequence[EntryRecord], list[Outcome]], Awaitable[list[ResultT]]]
"""Run once a batch committed, before its futures resolve: given the entries
and their outcomes, it returns each entry's result, in order. If it raises,
the futures get the outcomes (the entries are committed)."""

_Queued = tuple[EntryRecord, asyncio.Future[Outcome | ResultT]]
"""An entry waiting in a batch, with the future its caller awaits."""


class LedgerWriter(Generic[ResultT]):
    """Group commit over `connections` connections. Started with its
    after-commit step (start()), which its futures' results come from."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        *,
        batch_entries_max: int,
        connections: int,
        timeout_s: float,
        queue_wait_max_s: float | None = None,
        observe_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._connect = connect
        self._batch_entries_max = batch_entries_max
        self._connections = connections
        self._timeout_s = timeout_s
        # When the oldest waiting entry has waited this long, its request is
        # about to time out anyway: refuse new entries at once instead.
        self._queue_wait_max_s = queue_wait_max_s if queue_wait_max_s is not None else timeout_s
        self._after_commit: AfterCommit[ResultT] | None = None
        self._observe_batch = observe_batch
        # (entry, its future, when queued, how many entries from here on must
        # share one statement: a submit_many group; 0 inside a group).
        self._queue: deque[tuple[EntryRecord, asyncio.Future[Outcome | ResultT], float, int]] = deque()
        self._ready = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []

    def start(self, *, after_commit: AfterCommit[ResultT] | None = None) -> None:
        """Start the workers; each committed batch goes through `after_commit`."""
        invariant(not self._workers, "the ledger writer is started already")
        self._after_commit = after_commit
        self._workers = [
            asyncio.create_task(self._work(), name=f"ledger-writer-{n}") for n in range(self._connections)
        ]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        while self._queue:
            _, future, _, _ = self._queue.popleft()
            if not future.done():
                future.set_exception(CommitFailed("the ledger writer stopped", definite=True))

    def submit(self, entry: EntryRecord) -> asyncio.Future[Outcome | ResultT]:
        """Queue an entry for the next batch. Refuses (nothing sent) when the
        queue is full or so slow that the request would time out anyway."""
        (future,) = self.submit_many([entry])
        return future

    def submit_many(self, entries: Sequence[EntryRecord]) -> list[asyncio.Future[Outcome | ResultT]]:
        """Queue entries that must share one statement (a batch request's
        debits: one group commit). Each still gets its own outcome."""
        invariant(
            1 <= len(entries) <= BACKLOG_BATCH_ENTRIES_MAX,
            f"{len(entries)} entries outside 1..{BACKLOG_BATCH_ENTRIES_MAX} in one statement",
        )
        loop = asyncio.get_running_loop()
        if len(self._queue) + len(entries) > QUEUE_ENTRIES_MAX:
            raise QueueFull(f"{QUEUE_ENTRIES_MAX} entries already wait for the ledger")
        now = loop.time()
        if self._queue and now - self._queue[0][2] > self._queue_wait_max_s:
            raise QueueFull("the ledger is not keeping up")
        futures: list[asyncio.Future[Outcome | ResultT]] = []
        for n, entry in enumerate(entries):
            future: asyncio.Future[Outcome | ResultT] = loop.create_future()
            self._queue.append((entry, future, now, len(entries) if n == 0 else 0))
            futures.append(future)
        self._ready.set()
        return futures

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _next_batch(self) -> list[_Queued[ResultT]]:
        """The entries waiting now, up to the batch bound. Entries whose
        request gave up (cancelled future) are dropped: never written."""
        batch: list[_Queued[ResultT]] = []
        while not batch:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            # Normal load: up to batch_entries_max, so the workers commit side
            # by side; a backlog: an equal share of it per worker.
            share = -(-len(self._queue) // self._connections)
            bound = min(max(self._batch_entries_max, share), BACKLOG_BATCH_ENTRIES_MAX)
            taken = 0
            while self._queue and taken < bound:
                group = self._queue[0][3]
                if taken and taken + group > bound:
                    break  # a group goes whole into the next batch
                for _ in range(group):
                    entry, future, _, _ = self._queue.popleft()
                    taken += 1
                    if not future.cancelled():
                        batch.append((entry, future))
        return batch

    async def _work(self) -> None:
        conn: asyncpg.Connection | None = None
        batch: list[_Queued[ResultT]] = []
        try:
            while True:
                batch = await self._next_batch()
                if conn is None or conn.is_closed():
                    try:
                        conn = await asyncio.wait_for(self._connect(), self._timeout_s)
                    except Exception as exc:  # nothing was sent: definite
                        conn = None
                        _fail(batch, CommitFailed(f"cannot connect to Postgres: {exc!r}", definite=True))
                        continue
                conn = await self._write(conn, batch)
                batch = []
        except asyncio.CancelledError:
            # Stopped mid-write: the statement may have gone out.
            _fail(batch, CommitFailed("the ledger writer stopped during the write", definite=False))
            raise
        finally:
            if conn is not None:
                conn.terminate()

    async def _write(
        self, conn: asyncpg.Connection, batch: list[_Queued[ResultT]]
    ) -> asyncpg.Connection | None:
        """Write one batch and settle its futures. Returns the connection, or
        None when it can no longer be trusted."""
        entries = [entry for entry, _ in batch]
        try:
            outcomes = await write_entries(conn, entries, timeout_s=self._timeout_s)
        except Exception as exc:
            definite = exc.definite if isinstance(exc, CommitFailed) else is_definite_failure(exc)
            if not definite:
                log.warning("ledger write of %d entries failed (uncertain): %r", len(batch), exc)
                conn.terminate()
                _fail(batch, CommitFailed(repr(exc), definite=False))
                return None
            if len(batch) > 1:
                # One refused entry must not fail its batch mates: write each
                # half again, and so on down to the refused entries alone (a
                # few statements for one bad entry in a thousand, not a thousand).
                middle = len(batch) // 2
                for half in (batch[:middle], batch[middle:]):
                    conn = await self._write(conn, half) if conn is not None else None
                    if conn is None:
                        _fail(
                            batch,
                            CommitFailed("connection lost while isolating a refused entry", definite=True),
                        )
                        return None
                return conn
            refused = exc.refused if isinstance(exc, CommitFailed) else is_refusal(exc)
            log.error("ledger refused entry %s: %r", entries[0].id, exc)
            _fail(batch, CommitFailed(repr(exc), definite=True, refused=refused))
            return conn
        if self._observe_batch is not None:
            self._observe_batch(len(batch))
        results: list[Outcome] | list[ResultT] = outcomes
        if self._after_commit is not None:
            try:
                results = await self._after_commit(entries, outcomes)
            except Exception:
                log.exception("after-commit hook failed; the entries are committed")
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
        return conn


def _fail(batch: Sequence[_Queued[ResultT]], exc: CommitFailed) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
