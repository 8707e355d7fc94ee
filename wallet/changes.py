"""Postgres-first changes to a wallet: what Stripe moved (top-ups, refunds,
disputes), as opposed to debits, which go Redis first.

A change is a ledger entry plus a numbered row in `wallet_changes`, written in
the caller's transaction with whatever caused it (a Stripe event). After the
commit, `apply_changes` brings Redis up to date: apply_changes.lua applies
each change once, in number order, and the applied rows are deleted. If the
process dies between the commit and Redis, the sweeper (`drain_changes`)
applies what is left, so a change is never lost and never applied twice."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import redis.exceptions

from centime.errors import invariant
from ledger import repo as ledger_repo
from ledger.schemas import EntryRecord
from wallet import repo
from wallet.cache import Cache, CachedWallet

log = logging.getLogger(__name__)

CHANGES_BATCH_MAX = 100
"""Changes read and applied per Redis call."""
APPLY_ROUNDS_MAX = 10
"""Batches per wallet per call; what is left waits for the next sweep."""
DRAIN_DELAY_S = 1.0
"""The sweeper leaves changes this young to the request that wrote them."""


def wallet_delta_micros(entry: EntryRecord) -> int:
    """How much the entry raises the wallet's balance (its liability lines,
    whose credit side is negative)."""
    return -sum(line.amount_micros for line in entry.lines if line.account_id == entry.wallet_id)


async def lock_wallet(conn: asyncpg.Connection, wallet_id: uuid.UUID) -> None:
    """Take the wallet's row lock for the caller's transaction, before it
    reads what its changes depend on (write_change would take it anyway, but
    only when writing, too late for a decision made from a read)."""
    invariant(conn.is_in_transaction(), "a wallet lock is held by a transaction")
    invariant(await repo.lock_wallet(conn, wallet_id), f"no wallet {wallet_id}")


async def write_change(
    conn: asyncpg.Connection, entry: EntryRecord, *, status: str | None, timeout_s: float
) -> bool:
    """Write the entry and its change, in the caller's transaction. Returns
    False, writing nothing, when the entry is already in the ledger (same id
    or same Stripe key): a replay."""
    invariant(conn.is_in_transaction(), "a wallet change must share its cause's transaction")
    written = await ledger_repo.insert_entries(conn, [entry], timeout_s=timeout_s)
    if entry.id not in written:
        return False
    seq = await repo.next_change_seq(conn, entry.wallet_id, status)
    invariant(seq is not None, f"wallet {entry.wallet_id} vanished while writing entry {entry.id}")
    await repo.insert_change(conn, entry.wallet_id, seq or 0, wallet_delta_micros(entry), status, entry.id)
    return True


async def load_from_ledger(
    conn: asyncpg.Connection, cache: Cache, wallet_id: uuid.UUID, *, overwrite: bool
) -> CachedWallet | None:
    """Put a wallet into Redis from the ledger (unless there, or asked to
    overwrite). None if no such wallet."""
    cached = await repo.wallet_for_cache(conn, wallet_id)
    if cached is not None:
        await cache.load_wallet(wallet_id, cached, overwrite=overwrite)
    return cached


async def apply_changes(pool: asyncpg.Pool, cache: Cache, wallet_id: uuid.UUID, *, timeout_s: float) -> int:
    """Bring the wallet's Redis copy up to date with its committed changes.
    Returns how many were applied by this call. Safe to run concurrently
    with itself: the script skips what another caller applied."""
    applied_total = 0
    for _round in range(APPLY_ROUNDS_MAX):
        async with pool.acquire(timeout=timeout_s) as conn:
            changes = await repo.pending_changes(conn, wallet_id, CHANGES_BATCH_MAX)
        if not changes:
            return applied_total
        applied = await cache.apply_changes(wallet_id, changes)
        if applied is None:  # not in Redis: the ledger holds every committed change
            async with pool.acquire(timeout=timeout_s) as conn:
                await load_from_ledger(conn, cache, wallet_id, overwrite=False)
            continue
        applied_before, applied_seq = applied
        applied_total += applied_seq - applied_before
        async with pool.acquire(timeout=timeout_s) as conn:
            await repo.delete_applied_changes(conn, wallet_id, applied_seq)
        if applied_seq < changes[0].seq - 1:
            # Redis has lost changes that were applied and deleted: it was
            # restored from an older copy. Only rebuild-cache can repair it.
            log.error(
                "wallet %s: Redis applied changes up to %d but the next is %d: run `centime rebuild-cache`",
                wallet_id,
                applied_seq,
                changes[0].seq,
            )
            return applied_total
        if len(changes) < CHANGES_BATCH_MAX:
            return applied_total
    return applied_total


async def drain_changes(pool: asyncpg.Pool, cache: Cache, *, wallets_max: int, timeout_s: float) -> int:
    """Apply the changes that their writer did not (it died, or Redis was
    down): at most `wallets_max` wallets per call. Returns changes applied."""
    before = datetime.now(UTC) - timedelta(seconds=DRAIN_DELAY_S)
    async with pool.acquire(timeout=timeout_s) as conn:
        wallet_ids = await repo.wallets_with_changes(conn, before, wallets_max)
    applied = 0
    for wallet_id in wallet_ids:
        try:
            applied += await apply_changes(pool, cache, wallet_id, timeout_s=timeout_s)
        except (redis.exceptions.RedisError, asyncpg.PostgresError, OSError, TimeoutError) as exc:
            log.warning("wallet %s: changes not applied this pass: %r", wallet_id, exc)
    return applied
