"""The write-through: a charge made in Redis is committed to the ledger
before it is answered, and every way that can fail settles the charge.

Everything about an uncertain commit lives here (docs/architecture.md, "What
happens when"):
- committed: cleared from the outbox by the writer's after-commit step
  (clear_committed.lua), answered 201;
- definitely not written (refused, queue full, cannot connect): compensated
  now (compensate.lua), answered 503 (or 500 for a refusal);
- unknown (statement out, no answer; or later than commit_timeout_ms):
  abandoned to the sweeper (abandon.lua), which writes the entry beside its
  reversal; if Redis cannot take the abandon, the entry and its reversal
  are written here, in one transaction, and undone in Redis in the background;
- the key taken in the ledger (Redis had forgotten it): compensated, and
  answered as the key's holder was."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import asyncpg
import msgspec
import redis.exceptions

from centime.errors import Unavailable
from centime.settings import Settings
from ledger.schemas import EntryRecord, KeyHolder
from ledger.writer import (
    CommitFailed,
    Committed,
    KeyTaken,
    LedgerWriter,
    Outcome,
    QueueFull,
    write_with_reversal,
)
from wallet.cache import Cache, Clearing
from wallet.charges import PendingCharge, clearing, payload_key, refusal_error, to_entry, undo
from wallet.errors import LedgerRefused
from wallet.replies import Refused
from wallet.schemas import Entry, EntryPayload

log = logging.getLogger(__name__)

CLEAR_ABANDONED_FIRST = 2
"""clear_committed.lua's answer for an entry its request abandoned first."""

UNDO_RETRY_S_MAX = 600.0
"""How long a request keeps trying to undo, in Redis, a charge it reversed in the ledger."""

RACE_WAIT_S = 5.0
"""After a lost race to abandon, how long to wait for the winner's answer."""

_COMMIT_LATE = object()
"""_commit_outcome's answer when the commit outlived its wait."""

_REVERSED, _CONFLICT, _IN_PROGRESS = Refused("reversed"), Refused("conflict"), Refused("in_progress")


class AbandonedFirst(msgspec.Struct, frozen=True):
    """Committed, but the request had already handed the charge to the
    sweeper (its client got 503): the sweeper reverses it."""

    entry_id: uuid.UUID


CommitResult = Outcome | AbandonedFirst
"""What a write-through's commit future resolves to (LedgerWriter[CommitResult])."""

CommitFuture = asyncio.Future[CommitResult]


class WriteThrough:
    """The charges in flight between Redis and the ledger, and their settlement."""

    def __init__(
        self, *, pool: asyncpg.Pool, cache: Cache, writer: LedgerWriter[CommitResult], settings: Settings
    ) -> None:
        self.pool = pool
        self.cache = cache
        self.writer = writer
        self.settings = settings
        self.commit_timeout_s = settings.commit_timeout_ms / 1000
        self._database_timeout_s = settings.database_timeout_ms / 1000
        self.charges: dict[uuid.UUID, PendingCharge] = {}
        """Charges submitted to the writer and not yet answered: the ones after_commit clears."""
        self._background: set[asyncio.Task[None]] = set()

    async def write(self, charge: PendingCharge, payload: EntryPayload) -> tuple[Entry, bool]:
        """Commit the charge to the ledger and answer it: the entry, and whether it is a replay."""
        entry = charge.entry
        try:
            self.charges[entry.id] = charge
            future = self.writer.submit(entry)
        except QueueFull as exc:
            self.charges.pop(entry.id, None)
            await self.compensate(charge)
            raise Unavailable("the ledger is overloaded; nothing was charged") from exc
        return await self.answer_commit(charge, payload, future)

    async def answer_commit(
        self,
        charge: PendingCharge,
        payload: EntryPayload,
        future: CommitFuture,
        *,
        wait_s: float | None = None,
    ) -> tuple[Entry, bool]:
        """Wait for the charge's commit (commit_timeout_ms, or `wait_s` when
        the caller has waited already), then answer, or settle it and raise."""
        entry = charge.entry
        try:
            outcome = await self._commit_outcome(future, self.commit_timeout_s if wait_s is None else wait_s)
            if outcome is _COMMIT_LATE:
                outcome = await self._abandon_or_wait(charge, future)
        except CommitFailed as exc:
            if exc.definite:
                await self.compensate(charge)
            else:
                await self._abandon(charge)
            if exc.refused:  # a bug, not an outage: 500, and a retry will not cure it
                raise LedgerRefused(
                    "the ledger refused the entry; it was logged, nothing was charged"
                ) from exc
            raise Unavailable("the ledger did not commit the entry; nothing was charged") from exc
        finally:
            self.charges.pop(entry.id, None)
        if isinstance(outcome, Committed):
            return to_entry(entry), False
        if isinstance(outcome, KeyTaken):
            await self.compensate(charge)  # Redis had lost this key; the ledger kept it
            return await self.answer_as_holder(outcome.holder, payload), True
        log.error("entry %s: abandoned while its request still waited; the sweeper reverses it", entry.id)
        raise Unavailable("the ledger did not commit the entry in time; nothing was charged")

    async def _commit_outcome(self, future: CommitFuture, wait_s: float) -> object:
        """The writer's outcome (CommitFailed raises), or _COMMIT_LATE after
        `wait_s`; the future itself is never cancelled here. (What
        asyncio.wait_for(asyncio.shield(...)) does, without its two extra
        futures and a task switch per debit.)"""
        if not future.done():
            await all_done((future,), wait_s)
            if not future.done():
                return _COMMIT_LATE
        return future.result()

    async def answer_as_holder(self, holder: KeyHolder, payload: EntryPayload) -> Entry:
        """Answer a request whose key the ledger holds for an earlier entry."""
        if holder.reversed_by is not None:
            raise refusal_error(_REVERSED, payload)
        if holder.entry.request_hash != payload.request_hash:
            raise refusal_error(_CONFLICT, payload)
        if await self.cache.is_abandoned(holder.entry.wallet_id, holder.entry.id):
            raise refusal_error(_IN_PROGRESS, payload)  # the sweeper is about to reverse it
        return to_entry(holder.entry)

    async def _abandon_or_wait(self, charge: PendingCharge, future: CommitFuture) -> CommitResult:
        """The commit is late: answer 503 unless it has just won the race."""
        if await self._abandon(charge):
            future.cancel()  # not written yet? then the writer skips it
            raise Unavailable("the ledger did not commit the entry in time; nothing was charged")
        try:
            return await asyncio.wait_for(future, RACE_WAIT_S)
        except (TimeoutError, CommitFailed) as exc:
            log.error("entry %s: lost the race to abandon, and no outcome arrived: %r", charge.entry.id, exc)
            raise Unavailable("the ledger did not commit the entry in time") from exc

    async def compensate(self, charge: PendingCharge) -> None:
        """Undo a charge the ledger definitely did not write."""
        entry = charge.entry
        try:
            await self.cache.compensate(
                wallet_id=entry.wallet_id,
                idempotency_key=payload_key(entry),
                outbox_id=charge.outbox_id,
                undo=undo(charge),
                entry_id=entry.id,
            )
        except redis.exceptions.RedisError as exc:
            log.warning("entry %s: undo failed (%r); handing it to the sweeper", entry.id, exc)
            self.spawn(self._abandon_later(entry.wallet_id, payload_key(entry), entry.id, charge.outbox_id))

    async def _abandon(self, charge: PendingCharge) -> bool:
        """Hand the charge to the sweeper. True unless the commit settled it first."""
        entry = charge.entry
        try:
            return await self.cache.abandon(
                wallet_id=entry.wallet_id,
                idempotency_key=payload_key(entry),
                entry_id=entry.id,
                outbox_id=charge.outbox_id,
            )
        except redis.exceptions.RedisError as exc:
            # Redis cannot record that this request answers 503, so record it
            # in the ledger: the entry beside its reversal, in one transaction.
            # Then undo it in Redis, wherever the charge stands by then.
            log.warning("entry %s: abandon failed (%r); reversing it in the ledger", entry.id, exc)
            self.charges.pop(entry.id, None)  # the writer must not clear it as committed now
            if await self._reverse_in_ledger(charge):
                self.spawn(self._undo_reversed_later(charge))
            else:
                self.spawn(
                    self._abandon_later(entry.wallet_id, payload_key(entry), entry.id, charge.outbox_id)
                )
            return True

    async def _reverse_in_ledger(self, charge: PendingCharge) -> bool:
        """Write the entry and its reversal, atomically. False if Postgres failed too."""
        entry = charge.entry
        try:
            async with self.pool.acquire(timeout=self._database_timeout_s) as conn:
                outcome = await write_with_reversal(conn, entry, timeout_s=self._database_timeout_s)
            return isinstance(outcome, Committed)
        except Exception as exc:  # Postgres and Redis both failing: see docs/architecture.md
            log.error(
                "entry %s: answered 503 but neither Redis nor Postgres could record it: %r", entry.id, exc
            )
            return False

    async def _undo_reversed_later(self, charge: PendingCharge) -> None:
        """Undo in Redis a charge the ledger now holds reversed. Unlike an
        abandon, nobody else undoes a charge the writer cleared in Redis
        meanwhile (the sweeper only meets charges still in the outbox), so
        this keeps trying for UNDO_RETRY_S_MAX, not for half the grace
        period. Running late is safe: undo_reversed.lua undoes once. (If Redis
        stays away longer, or the process dies, the undo is lost: logged, and
        `centime check` and the nightly reconciliation report the drift.)"""
        await self._keep_trying(
            lambda: self.cache.undo_reversed(
                idempotency_key=payload_key(charge.entry), clearing=clearing(charge), undo=undo(charge)
            ),
            f"entry {charge.entry.id}: reversed in the ledger; Redis stayed unreachable to undo it",
            retry_s=UNDO_RETRY_S_MAX,
        )

    def abandon_in_background(self, wallet_id: uuid.UUID, idempotency_key: str, entry_id: uuid.UUID) -> None:
        """Hand a charge whose script call failed (it may have run) to the sweeper, bounded."""
        self.spawn(self._abandon_later(wallet_id, idempotency_key, entry_id, None))

    async def _abandon_later(
        self, wallet_id: uuid.UUID, idempotency_key: str, entry_id: uuid.UUID, outbox_id: str | None
    ) -> None:
        """Hand a charge to the sweeper. Abandoning is always safe: the sweeper
        writes the entry with its reversal. (A charge still in the outbox after
        the grace period is an orphan, which the sweeper reverses unless the
        ledger holds it.)"""
        await self._keep_trying(
            lambda: self.cache.abandon(
                wallet_id=wallet_id, idempotency_key=idempotency_key, entry_id=entry_id, outbox_id=outbox_id
            ),
            f"entry {entry_id}: Redis stayed unreachable; the sweeper settles it as an orphan",
            retry_s=self.settings.sweeper_grace_ms / 2000,
        )

    async def _keep_trying(
        self, attempt: Callable[[], Awaitable[object]], give_up_message: str, *, retry_s: float
    ) -> None:
        """Retry a Redis call with backoff (at most 1 s apart) for retry_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_s
        delay_s = 0.05
        while loop.time() < deadline:
            try:
                await attempt()
                return
            except redis.exceptions.RedisError:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)
        log.error(give_up_message)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def after_commit(
        self, entries: Sequence[EntryRecord], outcomes: list[Outcome]
    ) -> list[CommitResult]:
        """The writer's after-commit step: clear committed entries from their
        outboxes, one script call per partition, one round trip. An entry its
        request abandoned first is the sweeper's to reverse."""
        by_partition: dict[int, list[tuple[int, Clearing]]] = defaultdict(list)
        for index, (entry, outcome) in enumerate(zip(entries, outcomes, strict=True)):
            charge = self.charges.get(entry.id)
            if isinstance(outcome, Committed) and charge is not None:
                by_partition[self.cache.partition(entry.wallet_id)].append((index, clearing(charge)))
        results: list[CommitResult] = list(outcomes)
        if not by_partition:
            return results
        cleared = await self.cache.clear_committed(
            {p: [item for _, item in items] for p, items in by_partition.items()}
        )
        for partition, items in by_partition.items():
            for (i, _), state in zip(items, cleared[partition], strict=True):
                if state == CLEAR_ABANDONED_FIRST:
                    results[i] = AbandonedFirst(entries[i].id)
        return results


async def all_done(futures: Sequence[asyncio.Future[Any]], wait_s: float) -> None:
    """Return when every future is done, or after `wait_s`; cancels none."""
    pending = [f for f in futures if not f.done()]
    if not pending:
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    left = len(pending)

    def one_done(_: object) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not waiter.done():
            waiter.set_result(None)

    def late() -> None:
        if not waiter.done():
            waiter.set_result(None)

    for future in pending:
        future.add_done_callback(one_done)
    timer = loop.call_later(wait_s, late)
    try:
        await waiter
    finally:
        timer.cancel()
        for future in pending:
            future.remove_done_callback(one_done)
