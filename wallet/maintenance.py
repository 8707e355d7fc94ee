"""Operator jobs over every wallet: rebuild Redis from the ledger, and check
the invariants of docs/architecture.md. Both page through wallets in
bounded pages and report progress."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import asyncpg
import msgspec

from ledger import repo as ledger_repo
from wallet import repo
from wallet.cache import Cache, CachedWallet

WALLETS_PAGE_SIZE = 1000
PROBLEMS_MAX = 100
"""Stop listing violations after this many of each kind: one is already a page."""

Progress = Callable[[int], None]


class CheckReport(msgspec.Struct, kw_only=True):
    wallets_checked: int = 0
    entries_unbalanced: list[str] = []
    lines_total_micros: int = 0
    reversals_mismatched: list[str] = []
    wallets_drifted: list[str] = []
    unsettled_entries: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.entries_unbalanced
            or self.lines_total_micros
            or self.reversals_mismatched
            or self.wallets_drifted
        )


async def rebuild_cache(pool: asyncpg.Pool, cache: Cache, *, progress: Progress | None = None) -> int:
    """Overwrite every wallet's Redis balance with its ledger balance. Run it
    when quiescent: a charge not yet committed would be forgotten."""
    after: uuid.UUID | None = None
    count = 0
    while True:
        async with pool.acquire() as conn:
            page = await repo.wallets_page(conn, after, WALLETS_PAGE_SIZE)
        for item in page:
            w = item.wallet
            await cache.load_wallet(
                w.id,
                CachedWallet(item.balance_micros, w.overdraft_limit_micros, w.status, w.currency),
                overwrite=True,
            )
        count += len(page)
        if progress is not None:
            progress(count)
        if len(page) < WALLETS_PAGE_SIZE:
            return count
        after = page[-1].wallet.id


async def check(pool: asyncpg.Pool, cache: Cache, *, progress: Progress | None = None) -> CheckReport:
    report = CheckReport()
    async with pool.acquire() as conn:
        report.entries_unbalanced = [
            f"entry {entry_id}: {lines} lines summing to {total}"
            for entry_id, lines, total in await ledger_repo.unbalanced_entries(conn, PROBLEMS_MAX)
        ]
        report.lines_total_micros, _ = await ledger_repo.lines_total(conn)
        report.reversals_mismatched = [
            f"reversal {r}" for r in await ledger_repo.mismatched_reversals(conn, PROBLEMS_MAX)
        ]
    report.unsettled_entries = await cache.outbox_depth()
    after: uuid.UUID | None = None
    while True:
        async with pool.acquire() as conn:
            page = await repo.wallets_page(conn, after, WALLETS_PAGE_SIZE)
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
        if progress is not None:
            progress(report.wallets_checked)
        if len(page) < WALLETS_PAGE_SIZE:
            return report
        after = page[-1].wallet.id
