"""The sweeper: the crash net of the debit path.

Each pass settles, per partition and bounded by `sweeper_batch_max`:
- orphans: outbox entries older than the grace period. Their process died
  (or lost Redis) between charging and settling. They are written to the
  ledger idempotently by entry id, then removed from the outbox. An orphan
  whose key another entry holds in the ledger is refunded instead.
- abandoned entries: their client was answered 503 before the commit's
  outcome was known. Each is written to the ledger with its reversal (both
  idempotent by id), then refunded in Redis once.

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

from centime.settings import Settings
from ledger.accounts import reversal_id_for, reversal_of
from ledger.writer import Committed, KeyTaken, write_entries
from wallet.cache import Cache
from wallet.service import Charge, decode_payload, record_from_payload, undo_delta

log = logging.getLogger(__name__)


class SweepReport(msgspec.Struct, kw_only=True):
    orphans_committed: int = 0
    orphans_refunded: int = 0
    abandoned_reversed: int = 0
    abandoned_refunded: int = 0

    @property
    def settled(self) -> int:
        return (
            self.orphans_committed + self.orphans_refunded + self.abandoned_reversed + self.abandoned_refunded
        )


def _charge(partition_fields: dict[bytes, bytes], outbox_id: str) -> Charge:
    payload = decode_payload(partition_fields[b"e"])
    record = record_from_payload(
        payload,
        balance_micros=int(partition_fields[b"b"]),
        currency=partition_fields[b"c"].decode(),
    )
    return Charge(record, outbox_id)


async def sweep_once(
    pool: asyncpg.Pool, cache: Cache, settings: Settings, *, grace_ms: int | None = None
) -> SweepReport:
    report = SweepReport()
    timeout_s = settings.database_timeout_ms / 1000
    grace_ms = settings.sweeper_grace_ms if grace_ms is None else grace_ms
    cutoff_ms = await cache.server_time_ms() - grace_ms
    budget = settings.sweeper_batch_max

    async with cache.client.pipeline(transaction=False) as pipe:
        for p in range(cache.partition_count):
            pipe.xrange(cache.outbox_key(p), "-", str(max(cutoff_ms, 0)), count=budget)
            pipe.hscan(cache.abandoned_key(p), 0, count=budget)
        replies = await pipe.execute()

    orphans: list[Charge] = []
    abandoned: list[Charge] = []
    for p in range(cache.partition_count):
        for outbox_id, fields in replies[2 * p]:
            if len(orphans) < budget:
                orphans.append(_charge(fields, outbox_id.decode()))
        _, entries = replies[2 * p + 1]
        for raw in entries.values():
            if len(abandoned) < budget:
                abandoned.append(
                    _charge({k.encode(): v.encode() for k, v in msgspec.json.decode(raw).items()}, "")
                )

    if orphans:
        await _settle_orphans(pool, cache, orphans, report, timeout_s)
    for charge in abandoned:
        await _settle_abandoned(pool, cache, charge, report, timeout_s)
    return report


async def _settle_orphans(
    pool: asyncpg.Pool, cache: Cache, orphans: list[Charge], report: SweepReport, timeout_s: float
) -> None:
    async with pool.acquire(timeout=timeout_s) as conn:
        outcomes = await write_entries(conn, [charge.entry for charge in orphans], timeout_s=timeout_s)
    committed: dict[int, list[str]] = {}
    for charge, outcome in zip(orphans, outcomes, strict=True):
        if isinstance(outcome, Committed):
            committed.setdefault(cache.partition(charge.entry.wallet_id), []).append(charge.outbox_id)
            report.orphans_committed += 1
        elif isinstance(outcome, KeyTaken):
            entry = charge.entry
            refunded = await cache.compensate(
                wallet_id=entry.wallet_id,
                idempotency_key=entry.idempotency_key or "",
                outbox_id=charge.outbox_id,
                delta_micros=undo_delta(entry),
                entry_id=entry.id,
            )
            report.orphans_refunded += int(refunded)
    if committed:
        await cache.settle_committed(committed)


async def _settle_abandoned(
    pool: asyncpg.Pool, cache: Cache, charge: Charge, report: SweepReport, timeout_s: float
) -> None:
    entry = charge.entry
    async with pool.acquire(timeout=timeout_s) as conn:
        (outcome,) = await write_entries(conn, [entry], timeout_s=timeout_s)
        if isinstance(outcome, Committed):
            await write_entries(conn, [reversal_of(entry, reversal_id_for(entry.id))], timeout_s=timeout_s)
    refunded = await cache.settle_reversed(
        wallet_id=entry.wallet_id,
        idempotency_key=entry.idempotency_key or "",
        entry_id=entry.id,
        delta_micros=undo_delta(entry),
    )
    if refunded and isinstance(outcome, Committed):
        report.abandoned_reversed += 1
    elif refunded:
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
