"""The sweeper: the crash net of the debit path.

Each pass settles, per partition and bounded by `sweeper_batch_max`:
- orphans: outbox entries older than the grace period. Their process died
  (or lost Redis) between charging and settling. Each is written to the
  ledger idempotently by entry id. If the writer had committed it, it may
  have been answered 201: it is settled as committed. If the sweeper wrote it
  now, no request was ever answered 2xx for it: it is reversed like an
  abandoned entry. So is one its request already reversed in the ledger
  (answered 503 when Redis could not take the abandon). An orphan whose key another entry holds is undone.
- wallet changes (top-ups, refunds, disputes) committed to Postgres but not
  yet applied to Redis: their writer died or Redis was down (wallet/changes.py).
- abandoned entries: their client was answered 503 before the commit's
  outcome was known. Each is written to the ledger with its reversal (both
  idempotent by id), then refunded in Redis once.
- holds whose time has come: each expires once (end_hold.lua); then hold
  events no request recorded are recorded in Postgres (wallet/holds.py).

The grace period must far exceed commit_timeout_ms: until then an entry still
belongs to the request that charged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg
import msgspec
import redis.exceptions

from centime.settings import Settings
from ledger import repo as ledger_repo
from ledger.writer import Committed, Outcome, is_refusal, write_with_reversal
from wallet.cache import Cache, Clearing
from wallet.changes import drain_changes
from wallet.charges import PendingCharge, charge_from_outbox, clearing, payload_key, undo
from wallet.holds import drain_events, expire_due

log = logging.getLogger(__name__)

PASS_TIMEOUT_FACTOR = 10
"""A pass stops starting new work after this many database timeouts."""


class SweepReport(msgspec.Struct, kw_only=True):
    orphans_committed: int = 0
    orphans_reversed: int = 0
    abandoned_reversed: int = 0
    abandoned_refunded: int = 0
    refused: int = 0
    unreadable: int = 0
    changes_applied: int = 0
    holds_expired: int = 0
    hold_events_recorded: int = 0

    @property
    def settled(self) -> int:
        return (
            self.orphans_committed
            + self.orphans_reversed
            + self.abandoned_reversed
            + self.abandoned_refunded
            + self.changes_applied
            + self.holds_expired
        )


def _parse(fields: dict[bytes, bytes], outbox_id: str, report: SweepReport) -> PendingCharge | None:
    try:
        return charge_from_outbox(fields, outbox_id)
    except (KeyError, ValueError, msgspec.DecodeError) as exc:
        log.error("sweeper: unreadable entry %s %r: %r", outbox_id or "(abandoned)", fields, exc)
        report.unreadable += 1
        return None


async def sweep_once(
    pool: asyncpg.Pool, cache: Cache, settings: Settings, *, grace_ms: int | None = None
) -> SweepReport:
    """One bounded pass over every partition."""
    report = SweepReport()
    # Expiry first, on its own: it needs Redis only, and an outage of
    # Postgres (which fails the rest of the pass) must not keep overdue holds
    # holding money.
    try:
        report.holds_expired = await expire_due(
            cache, now_ms=await cache.server_time_ms(), budget=settings.sweeper_batch_max
        )
    except redis.exceptions.RedisError as exc:
        log.warning("sweeper: holds not expired this pass: %r", exc)
    timeout_s = settings.database_timeout_ms / 1000
    grace_ms = settings.sweeper_grace_ms if grace_ms is None else grace_ms
    cutoff_ms = await cache.server_time_ms() - grace_ms
    budget = settings.sweeper_batch_max
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PASS_TIMEOUT_FACTOR * timeout_s

    async with cache.client.pipeline(transaction=False) as pipe:
        for p in range(cache.partition_count):
            pipe.xrange(cache.outbox_key(p), "-", str(max(cutoff_ms, 0)), count=budget)
            pipe.hscan(cache.abandoned_key(p), 0, count=budget)
        replies = await pipe.execute()

    orphans: list[PendingCharge] = []
    abandoned: list[PendingCharge] = []
    for p in range(cache.partition_count):
        for outbox_id, fields in replies[2 * p]:
            charge = _parse(fields, outbox_id.decode(), report)
            if charge is not None and len(orphans) < budget:
                orphans.append(charge)
        _, entries = replies[2 * p + 1]
        for raw in entries.values():
            fields = {k.encode(): v.encode() for k, v in msgspec.json.decode(raw).items()}
            charge = _parse(fields, "", report)
            if charge is not None and len(abandoned) < budget:
                abandoned.append(charge)

    if orphans:
        await _resolve_orphans(pool, cache, orphans, report, timeout_s)
    for charge in abandoned:
        if loop.time() > deadline:
            break
        await _resolve_abandoned(pool, cache, charge, report, timeout_s)
    if loop.time() <= deadline:
        report.changes_applied = await drain_changes(pool, cache, wallets_max=budget, timeout_s=timeout_s)
    if loop.time() <= deadline:
        report.hold_events_recorded = await drain_events(
            pool, cache, before_ms=cutoff_ms + grace_ms, budget=budget, timeout_s=timeout_s
        )
    return report


async def _resolve_orphans(
    pool: asyncpg.Pool, cache: Cache, orphans: list[PendingCharge], report: SweepReport, timeout_s: float
) -> None:
    """An orphan the ledger holds was committed by the writer and may have
    been answered 201: keep it, unless the ledger also holds its reversal
    (its request answered 503 and recorded that there). An orphan the ledger
    does not hold was never answered 2xx: claim it first (abandon), then
    write it with its reversal. Claiming before writing means a pass that
    fails halfway leaves it claimed, never looking committed."""
    async with pool.acquire(timeout=timeout_s) as conn:
        present = await ledger_repo.entries_by_id(conn, [charge.entry.id for charge in orphans])
        reversed_ids = await ledger_repo.reversed_entry_ids(conn, list(present)) if present else set()
    committed: dict[int, list[Clearing]] = {}
    for charge in orphans:
        entry = charge.entry
        if entry.id in present and entry.id not in reversed_ids:
            committed.setdefault(cache.partition(entry.wallet_id), []).append(clearing(charge))
            report.orphans_committed += 1
            continue
        claimed = await cache.abandon(
            wallet_id=entry.wallet_id,
            idempotency_key=payload_key(entry),
            entry_id=entry.id,
            outbox_id=charge.outbox_id,
        )
        if claimed:
            await _resolve_abandoned(pool, cache, charge, report, timeout_s, counted_as="orphans_reversed")
    if committed:
        await cache.clear_committed(committed)


async def _resolve_abandoned(
    pool: asyncpg.Pool,
    cache: Cache,
    charge: PendingCharge,
    report: SweepReport,
    timeout_s: float,
    *,
    counted_as: str = "abandoned_reversed",
) -> None:
    """Write the entry (idempotent by id) and its reversal in one transaction,
    then undo the charge in Redis once. If the ledger holds the key for
    another entry, ours was never written: undo it and forget the key, so a
    retry replays that one. An entry Postgres refuses for good is undone."""
    entry = charge.entry
    outcome: Outcome | None
    try:
        async with pool.acquire(timeout=timeout_s) as conn:
            outcome = await write_with_reversal(conn, entry, timeout_s=timeout_s)
    except Exception as exc:
        if not is_refusal(exc):  # a deadlock or lock timeout: the next pass tries again
            raise
        log.error("sweeper: the ledger refuses entry %s (%r); undoing its charge", entry.id, exc)
        report.refused += 1
        outcome = None
    written = isinstance(outcome, Committed)
    undone = await cache.refund_abandoned(
        wallet_id=entry.wallet_id,
        idempotency_key=payload_key(entry),
        entry_id=entry.id,
        undo=undo(charge),
        mark_reversed=written,
    )
    if undone and written:
        setattr(report, counted_as, getattr(report, counted_as) + 1)
    elif undone:
        report.abandoned_refunded += 1


async def run_sweeper(
    pool: asyncpg.Pool,
    cache: Cache,
    settings: Settings,
    *,
    stop: asyncio.Event,
    on_pass: Callable[[SweepReport, int], None] | None = None,
) -> None:
    """Sweep every `sweeper_interval_ms` until `stop` is set. A failed pass is
    logged and retried on the next tick: storage may be down for a while."""
    interval_s = settings.sweeper_interval_ms / 1000
    while not stop.is_set():
        try:
            report = await sweep_once(pool, cache, settings)
            if report.settled:
                log.info("sweeper settled %s", msgspec.structs.asdict(report))
            if on_pass is not None:
                on_pass(report, await cache.outbox_depth())
        except Exception as exc:  # storage down: try again next tick
            log.warning("sweeper pass failed: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
