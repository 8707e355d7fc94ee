"""Operator jobs over every wallet: rebuild Redis from the ledger, and check
the invariants of docs/architecture.md. Both page through wallets in
bounded pages and report progress."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec

from ledger import repo as ledger_repo
from wallet import repo
from wallet.cache import Cache, CachedWallet
from wallet.charges import encode_payload, payload_of

log = logging.getLogger(__name__)

WALLETS_PAGE_SIZE = 1000
ENTRIES_PAGE_SIZE = 1000
PROBLEMS_MAX = 100
"""Stop listing violations after this many of each kind: one is already a page."""
POOL_ACQUIRE_TIMEOUT_S = 30.0
"""How long a job waits for a pooled connection (the worker shares its pool)."""

Progress = Callable[[int], None]


class CheckReport(msgspec.Struct, kw_only=True):
    wallets_checked: int = 0
    entries_unbalanced: list[str] = []
    lines_total_micros: int = 0
    reversals_mismatched: list[str] = []
    wallets_drifted: list[str] = []
    unsettled_entries: int = 0
    unapplied_changes: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.entries_unbalanced
            or self.lines_total_micros
            or self.reversals_mismatched
            or self.wallets_drifted
        )


class RebuildReport(msgspec.Struct, kw_only=True):
    wallets: int = 0
    wallets_reread: int = 0
    keys_restored: int = 0


RELOAD_ATTEMPTS_MAX = 10
"""Fresh reads of one wallet whose changes keep landing during a rebuild."""


async def _reload_newer(pool: asyncpg.Pool, cache: Cache, wallet_id: uuid.UUID) -> int:
    for attempt in range(1, RELOAD_ATTEMPTS_MAX + 1):
        async with pool.acquire(timeout=POOL_ACQUIRE_TIMEOUT_S) as conn:
            cached = await repo.wallet_for_cache(conn, wallet_id)
        if cached is None or await cache.load_wallet(wallet_id, cached, overwrite=True):
            return attempt
    raise RuntimeError(
        f"wallet {wallet_id}: changes kept landing during {RELOAD_ATTEMPTS_MAX} reads; run again"
    )


async def _wallet_pages(
    pool: asyncpg.Pool, progress: Progress | None
) -> AsyncIterator[list[repo.WalletWithBalance]]:
    """Every wallet, with its ledger balance, a page at a time in id order;
    `progress` hears the count once each page has been handled."""
    handled = 0
    after: uuid.UUID | None = None
    while True:
        async with pool.acquire(timeout=POOL_ACQUIRE_TIMEOUT_S) as conn:
            page = await repo.wallets_page(conn, after, WALLETS_PAGE_SIZE)
        yield page
        handled += len(page)
        if progress is not None:
            progress(handled)
        if len(page) < WALLETS_PAGE_SIZE:
            return
        after = page[-1].wallet.id


async def rebuild_cache(
    pool: asyncpg.Pool, cache: Cache, *, idempotency_ttl_s: int, progress: Progress | None = None
) -> RebuildReport:
    """Overwrite every wallet's Redis balance with its ledger balance, then
    restore the idempotency records of entries younger than the TTL. Run it
    when quiescent: a charge not yet committed would be forgotten."""
    report = RebuildReport()
    async for page in _wallet_pages(pool, progress):
        for item in page:
            w = item.wallet
            cached = CachedWallet(
                item.balance_micros, w.overdraft_limit_micros, w.status, w.currency, item.change_seq
            )
            if not await cache.load_wallet(w.id, cached, overwrite=True):
                # Redis applied a top-up change committed after this page was
                # read: read the wallet again rather than step back past it.
                report.wallets_reread += await _reload_newer(pool, cache, w.id)
        report.wallets += len(page)
    now = datetime.now(UTC)
    since = now - timedelta(seconds=idempotency_ttl_s)
    after_entry: uuid.UUID | None = None
    while True:
        async with pool.acquire(timeout=POOL_ACQUIRE_TIMEOUT_S) as conn:
            holders = await ledger_repo.recent_keyed_entries_page(conn, since, after_entry, ENTRIES_PAGE_SIZE)
        for holder in holders:
            entry = holder.entry
            age_s = int((now - entry.created_at).total_seconds())
            report.keys_restored += await cache.restore_key(
                wallet_id=entry.wallet_id,
                idempotency_key=entry.idempotency_key or "",
                request_hash=entry.request_hash or "",
                entry_id=entry.id,
                payload=encode_payload(payload_of(entry)),
                balance_micros=entry.balance_micros or 0,
                currency=entry.currency,
                reversed_=holder.reversed_by is not None,
                ttl_s=max(idempotency_ttl_s - age_s, 1),
            )
        if len(holders) < ENTRIES_PAGE_SIZE:
            return report
        after_entry = holders[-1].entry.id


async def check(pool: asyncpg.Pool, cache: Cache, *, progress: Progress | None = None) -> CheckReport:
    report = CheckReport()
    async with pool.acquire(timeout=POOL_ACQUIRE_TIMEOUT_S) as conn:
        report.entries_unbalanced = [
            f"entry {entry_id}: {lines} lines summing to {total}"
            for entry_id, lines, total in await ledger_repo.unbalanced_entries(conn, PROBLEMS_MAX)
        ]
        report.lines_total_micros, _ = await ledger_repo.lines_total(conn)
        report.reversals_mismatched = [
            f"reversal {r}" for r in await ledger_repo.mismatched_reversals(conn, PROBLEMS_MAX)
        ]
    report.unsettled_entries = await cache.outbox_depth()
    async with pool.acquire(timeout=POOL_ACQUIRE_TIMEOUT_S) as conn:
        report.unapplied_changes = await repo.changes_count(conn)
    async for page in _wallet_pages(pool, progress):
        cached = await cache.balances([item.wallet.id for item in page])
        for item, redis_balance in zip(page, cached, strict=True):
            if (
                redis_balance is not None
                and redis_balance != item.balance_micros
                and len(report.wallets_drifted) < PROBLEMS_MAX
            ):
                report.wallets_drifted.append(
                    f"wallet {item.wallet.id}: redis {redis_balance} != ledger {item.balance_micros} micros"
                )
        report.wallets_checked += len(page)
    return report


class BalanceDrift(msgspec.Struct, frozen=True, kw_only=True):
    """A wallet whose Redis balance stayed apart from its ledger balance."""

    wallet_id: uuid.UUID
    currency: str
    redis_micros: int
    ledger_micros: int
    repaired: bool


DRIFT_SUSPECTS_MAX = 1000
"""Wallets looked at again per run; more than this is itself worth a page."""


class DriftSearch(msgspec.Struct, kw_only=True):
    wallets_checked: int = 0
    drifts: list[BalanceDrift] = []
    # Suspects beyond DRIFT_SUSPECTS_MAX: counted, not examined.
    unexamined: int = 0


async def find_drift(
    pool: asyncpg.Pool,
    cache: Cache,
    *,
    repair: bool,
    settle_wait_s: float,
    quiet_s: float,
    progress: Progress | None = None,
) -> DriftSearch:
    """Every wallet's Redis balance against its ledger balance, on a live
    system. A first pass finds suspects. After `settle_wait_s` (longer than a
    commit may take) each is probed again, Redis first (drift_probe.lua), then
    the ledger is read. Drift is a wallet whose Redis state did not move in
    between, with no charge in flight and no reversal in the last `quiet_s`
    (its undo may still be on the way), that still differs. With `repair`,
    Redis takes the ledger balance, only if nothing touched the wallet or
    charged in its partition since the probe (repair_balance.lua)."""
    search = DriftSearch()
    suspects: list[tuple[uuid.UUID, tuple[int, int, int]]] = []
    async for page in _wallet_pages(pool, progress):
        states = await cache.balance_states([item.wallet.id for item in page])
        for item, state in zip(page, states, strict=True):
            if state is not None and state[0] != item.balance_micros:
                if len(suspects) < DRIFT_SUSPECTS_MAX:
                    suspects.append((item.wallet.id, state))
                else:
                    search.unexamined += 1
        search.wallets_checked += len(page)
    if not suspects:
        return search
    await asyncio.sleep(settle_wait_s)
    for wallet_id, first in suspects:
        probe = await cache.drift_probe(wallet_id)
        if (
            probe is None
            or probe.in_flight
            or (probe.balance_micros, probe.pending_micros, probe.change_seq) != first
        ):
            continue  # in use: not drift (the next run looks again)
        async with pool.acquire(timeout=POOL_ACQUIRE_TIMEOUT_S) as conn:
            ledger = await repo.wallet_for_cache(conn, wallet_id)  # read after the probe
            if ledger is None or ledger.balance_micros == probe.balance_micros:
                continue
            if ledger.change_seq != probe.change_seq:
                continue  # a top-up change on its way to Redis: not drift
            if await repo.recent_reversal(conn, wallet_id, quiet_s):
                continue
        repaired = False
        if repair and probe.pending_micros == 0:
            outcome = await cache.repair_balance(wallet_id, probe, ledger_micros=ledger.balance_micros)
            repaired = outcome == "repaired"
            if not repaired:
                log.info("wallet %s: drift not repaired (%s)", wallet_id, outcome)
        search.drifts.append(
            BalanceDrift(
                wallet_id=wallet_id,
                currency=ledger.currency,
                redis_micros=probe.balance_micros,
                ledger_micros=ledger.balance_micros,
                repaired=repaired,
            )
        )
    return search
