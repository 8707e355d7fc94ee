"""The reconciler: Stripe's balance transactions of a window against the ledger.

A run, holding the one reconciliation lock (a Postgres advisory lock):
  1. lists Stripe's balance transactions created in the window widened by a
     margin (late objects), a page at a time, and records each one's source
     object and its own id as seen (in a temporary table, not in memory);
  2. matches each transaction created in the window itself to the ledger
     entries of its source object, whenever they were written: matched,
     missing_in_ledger, amount_mismatch or fee_mismatch;
  3. lists the ledger entries written in the window that claim a Stripe
     money movement Stripe did not list: missing_in_stripe;
  4. compares every wallet's Redis balance with its ledger balance;
  5. records the run and one item per finding, and supersedes earlier runs
     of the same window.
It heals only what is safe, always as new ledger entries, and never in a dry
run: a paid top-up with no credit, a refund not clawed back and a dispute
not opened or not closed are brought up to date through the webhook's own
code path (same keys, so never twice); a fee the ledger missed gets its fee lines
(key `fee:<txn>`, once); Redis drift is repaired from the ledger.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec

from centime.errors import CentimeError, NotFound
from centime.money import CURRENCY_EXPONENTS, minor_to_micros
from ledger import repo as ledger_repo
from ledger.accounts import stripe_fee_lines
from ledger.ids import uuid7, uuid7_floor
from ledger.schemas import EntryRecord
from reconcile import repo
from reconcile.repo import LedgerEntry
from reconcile.schemas import (
    CATEGORIES,
    ITEMS_PAGE_SIZE_MAX,
    RUNS_PAGE_SIZE_MAX,
    BalanceTransaction,
    DriftReport,
    Item,
    Run,
    RunDetail,
    RunPage,
)
from reconcile.stripe_source import BalanceTransactions
from topup.service import TopUps

log = logging.getLogger(__name__)

WINDOW_MARGIN = timedelta(hours=6)
"""Stripe is listed this much wider than the window on each side: a ledger
entry written just after midnight for a charge of just before is not missing."""
WINDOW_MAX = timedelta(days=31)
ITEMS_MAX = 100_000
"""Findings recorded per run; beyond, they are counted but not listed."""
UNSEEN_PAGE_SIZE = 1000
STRIPE_LOOKUPS_MAX = 1000
"""Unlisted ledger claims looked up at Stripe one by one per run; the rest are reported as found."""
CLAIMS_PAGES_MAX = 10_000

Progress = Callable[[str, int], None]
BalanceCheck = Callable[[bool], Awaitable[DriftReport]]


class ReconcileBusy(CentimeError):
    status = 409
    code = "reconcile_busy"
    title = "A reconciliation is running"


class AlreadyReconciled(Exception):
    def __init__(self, run_id: uuid.UUID) -> None:
        super().__init__(f"run {run_id} already reconciled this window")
        self.run_id = run_id


class RunNotFound(NotFound):
    code = "run_not_found"
    title = "Reconciliation run not found"


# What each kind of balance transaction is in the ledger: the entry kind of
# its source object, and the sign of the transaction's amount for that kind.
def expected_kind(transaction: BalanceTransaction) -> str | None:
    source = transaction.source_id or ""
    if transaction.type in ("charge", "payment") and source.startswith(("ch_", "py_")):
        return "topup"
    if transaction.type in ("refund", "payment_refund") and source.startswith(("re_", "pyr_")):
        return "topup_refund"
    if source.startswith(("dp_", "du_")):  # a dispute's withdrawal (< 0) or reinstatement (> 0)
        return "dispute_opened" if transaction.amount < 0 else "dispute_won"
    return None


SIGN = {"topup": 1, "topup_refund": -1, "dispute_opened": -1, "dispute_won": 1}
MISSED = {
    "topup": "the top-up was never credited",
    "topup_refund": "the refund was never clawed back",
    "dispute_opened": "the dispute was never opened",
    "dispute_won": "the won dispute was never given back",
}
"""What a missing entry of each kind means, when the reconciler heals it."""


def default_window(now: datetime) -> tuple[datetime, datetime]:
    """The previous UTC day."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=1), today


class Findings:
    """What a run found, counted and (bounded) listed."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.counts: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.healed = 0
        self.unhealed = 0
        self.seen = 0
        """Stripe transactions of the window matched so far (recorded even if the run fails)."""
        self.recorded = 0

    def add(self, item: Item) -> None:
        self.counts[item.category] += 1
        if item.category == "fee_mismatch":  # the difference, not the payments
            magnitude = abs((item.stripe_fee_micros or 0) - (item.ledger_fee_micros or 0))
        else:
            magnitude = abs(item.stripe_amount_micros or item.ledger_amount_micros or 0)
        self.totals[item.category][item.currency or "-"] += magnitude
        if item.healed:
            self.healed += 1
        else:
            self.unhealed += 1
        if self.recorded < ITEMS_MAX:
            self.recorded += 1
            item.item_no = self.recorded
            self.items.append(item)

    def take(self) -> list[Item]:
        items, self.items = self.items, []
        return items

    def plain_totals(self) -> dict[str, dict[str, int]]:
        return {category: dict(by_currency) for category, by_currency in self.totals.items()}


class Reconciler:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        topups: TopUps,
        stripe: BalanceTransactions,
        check_balances: BalanceCheck,
        timeout_s: float,
    ) -> None:
        self.pool = pool
        self.topups = topups
        self.stripe = stripe
        self.check_balances = check_balances
        self._timeout_s = timeout_s

    async def run(
        self,
        window_start: datetime,
        window_end: datetime,
        *,
        dry_run: bool,
        progress: Progress | None = None,
        unless_reconciled: bool = False,
    ) -> tuple[Run, list[Item]]:
        """One run over [window_start, window_end). Returns the recorded run and
        its first items. Raises ReconcileBusy when another run holds the lock,
        and with `unless_reconciled`, AlreadyReconciled when a finished run
        covered the window (checked under the lock)."""
        if not window_start < window_end or window_end - window_start > WINDOW_MAX:
            raise ValueError(f"the window must be non-empty and at most {WINDOW_MAX.days} days")
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            if not await repo.try_lock(conn):
                raise ReconcileBusy("another reconciliation run holds the lock; try again when it ends")
            try:
                # Runs a killed process left 'running': we hold the lock, so none runs.
                await repo.fail_interrupted_runs(conn)
                if unless_reconciled:
                    done = await repo.finished_run_of_window(conn, window_start, window_end)
                    if done is not None:
                        raise AlreadyReconciled(done)
                return await self._recorded_run(conn, window_start, window_end, dry_run, progress)
            finally:
                await repo.unlock(conn)

    async def _recorded_run(
        self,
        conn: asyncpg.Connection,
        window_start: datetime,
        window_end: datetime,
        dry_run: bool,
        progress: Progress | None,
    ) -> tuple[Run, list[Item]]:
        """Under the lock: record a run, match both sides and check the
        balances, and finish the run with what was found (or as failed, with
        why). A run that did not fail and changed things supersedes the
        earlier runs of its window."""
        run_id = uuid7()
        await repo.insert_run(conn, run_id, window_start, window_end, dry_run)
        findings = Findings()
        error: str | None = None
        wallets_checked = 0
        try:
            await self._match_stripe(conn, run_id, window_start, window_end, dry_run, findings, progress)
            await self._match_ledger(conn, run_id, window_start, window_end, findings, progress)
            wallets_checked = await self._check_balances(findings, repair=not dry_run)
            await repo.insert_items(conn, run_id, findings.take())
            status = "clean" if findings.unhealed == 0 else "unmatched"
        except Exception as exc:
            log.exception("reconciliation run %s failed", run_id)
            status, error = "failed", f"{type(exc).__name__}: {exc}"[:4000]
        await repo.finish_run(
            conn,
            run_id,
            status=status,
            transactions_seen=findings.seen,
            counts=findings.counts,
            totals=findings.plain_totals(),
            healed=findings.healed,
            wallets_checked=wallets_checked,
            error=error,
        )
        if status != "failed" and not dry_run:
            await repo.supersede_runs(conn, window_start, window_end, run_id)
        run = await repo.run_by_id(conn, run_id)
        assert run is not None
        return run, await repo.items_page(conn, run_id, 0, ITEMS_PAGE_SIZE_MAX)

    async def _check_balances(self, findings: Findings, *, repair: bool) -> int:
        """Each wallet whose Redis balance differs from its ledger balance is
        an item (repaired from the ledger with `repair`). Returns how many
        wallets were checked."""
        drift = await self.check_balances(repair)
        if drift.unexamined:
            findings.add(
                Item(
                    category="balance_drift",
                    detail=f"{drift.unexamined} more wallets differ from the ledger than one run "
                    "examines: rebuild the cache (`centime rebuild-cache`) when quiet",
                )
            )
        for d in drift.drifts:
            findings.add(
                Item(
                    category="balance_drift",
                    currency=d.currency,
                    wallet_id=d.wallet_id,
                    stripe_amount_micros=None,
                    ledger_amount_micros=d.ledger_micros - d.redis_micros,
                    healed=d.repaired,
                    detail=(
                        f"Redis {d.redis_micros} != ledger {d.ledger_micros} micros"
                        + ("; Redis repaired from the ledger" if d.repaired else "")
                    ),
                )
            )
        return drift.wallets_checked

    # Stripe's side ---------------------------------------------------------------

    async def _match_stripe(
        self,
        conn: asyncpg.Connection,
        run_id: uuid.UUID,
        window_start: datetime,
        window_end: datetime,
        dry_run: bool,
        findings: Findings,
        progress: Progress | None,
    ) -> None:
        await repo.start_seen(conn)
        start_s, end_s = window_start.timestamp(), window_end.timestamp()
        async for page in self.stripe.pages(window_start - WINDOW_MARGIN, window_end + WINDOW_MARGIN):
            objects = {t.id for t in page} | {t.source_id for t in page if t.source_id}
            await repo.add_seen(conn, sorted(objects))
            in_window = [t for t in page if start_s <= t.created < end_s]
            if in_window:
                ledger = await repo.ledger_for_objects(conn, sorted(objects))
                by_object: dict[str, list[LedgerEntry]] = defaultdict(list)
                for entry in ledger:
                    by_object[entry.stripe_object_id].append(entry)
                for transaction in in_window:
                    item = await self._match(conn, transaction, by_object, dry_run)
                    if item is not None:
                        findings.add(item)
                await repo.insert_items(conn, run_id, findings.take())
            findings.seen += len(in_window)
            if progress is not None:
                progress("stripe", findings.seen)

    async def _match(
        self,
        conn: asyncpg.Connection,
        transaction: BalanceTransaction,
        by_object: dict[str, list[LedgerEntry]],
        dry_run: bool,
    ) -> Item | None:
        kind = expected_kind(transaction)
        source = transaction.source_id
        base = _stripe_side(transaction)
        if kind is None or source is None:
            return Item(
                category="missing_in_ledger",
                **base,
                detail=f"centime records no {transaction.type} transactions in the ledger; reported for finance",
            )
        entries = [e for e in by_object.get(source, []) if e.kind == kind]
        if not entries and not dry_run:
            # A heal brings a whole payment up to date: an earlier item of
            # this run may have written this one's entry already.
            entries = await _entries_of(conn, source, kind)
            healed = "healed by an earlier item of this run"
            if not entries:
                outcome = await self._heal_missing(kind, source)
                if outcome is not None:
                    entries = await _entries_of(conn, source, kind)
                    healed = f"healed: {outcome}"
            if entries:
                item = self._compare(transaction, entries, by_object.get(transaction.id, []), base)
                detail = f"{MISSED[kind]} (lost webhook); {healed}"
                if item is not None:
                    return msgspec.structs.replace(item, detail=f"{detail}; then {item.detail}")
                return Item(category="missing_in_ledger", **base, healed=True, detail=detail)
        if not entries:
            return Item(
                category="missing_in_ledger",
                **base,
                detail=f"no {kind} entry for {source} in the ledger",
            )
        item = self._compare(transaction, entries, by_object.get(transaction.id, []), base)
        if item is not None and item.category == "fee_mismatch" and not dry_run and _fee_missing(item):
            await self._heal_fee(transaction, entries[0])
            return msgspec.structs.replace(
                item,
                healed=True,
                detail=f"{item.detail}; healed: fee lines written (key fee:{transaction.id})",
            )
        return item

    def _compare(
        self,
        transaction: BalanceTransaction,
        entries: list[LedgerEntry],
        fee_entries: list[LedgerEntry],
        base: dict,
    ) -> Item | None:
        entry = entries[0]
        currency = transaction.currency.lower()
        ledger_amount = SIGN[entry.kind] * entry.amount_micros
        ledger_fee = entry.fee_micros + sum(e.fee_micros for e in fee_entries if e.kind == "stripe_fee")
        ledger_side = {
            "ledger_amount_micros": ledger_amount,
            "ledger_fee_micros": ledger_fee,
            "ledger_net_micros": ledger_amount - ledger_fee,
            "entry_id": entry.id,
            "wallet_id": entry.wallet_id,
        }
        if len(entries) > 1:
            return Item(
                category="amount_mismatch",
                **base,
                **ledger_side,
                detail=f"{len(entries)} {entry.kind} entries claim {transaction.source_id}",
            )
        if entry.currency != currency or ledger_amount != base["stripe_amount_micros"]:
            return Item(
                category="amount_mismatch",
                **base,
                **ledger_side,
                detail=f"Stripe moved {base['stripe_amount_micros']} {currency} micros, "
                f"the ledger {ledger_amount} {entry.currency}",
            )
        if ledger_fee != base["stripe_fee_micros"]:
            return Item(
                category="fee_mismatch",
                **base,
                **ledger_side,
                detail=f"Stripe's fee is {base['stripe_fee_micros']} micros, the ledger's {ledger_fee}",
            )
        return None

    async def _heal_missing(self, kind: str, source: str) -> str | None:
        """Bring the ledger up to date with the payment or dispute that a
        missing entry belongs to, exactly as its webhook would have (same
        keys, so never twice). None when it is not a centime top-up's or
        Stripe would not say (then reported)."""
        try:
            if kind == "topup":
                intent_id = await self.topups.payment_intent_of_charge(source)
                return None if intent_id is None else await self.topups.sync_payment(intent_id)
            if kind == "topup_refund":
                return await self.topups.sync_refund(source)
            return await self.topups.sync_dispute(source)
        except CentimeError as exc:
            log.warning("%s %s: not healed: %s", kind, source, exc.detail)
            return None

    async def _heal_fee(self, transaction: BalanceTransaction, entry: LedgerEntry) -> None:
        currency = transaction.currency.lower()
        fee_micros = minor_to_micros(transaction.fee, currency)
        record = EntryRecord(
            id=uuid7(),
            kind="stripe_fee",
            currency=currency,
            wallet_id=entry.wallet_id,
            amount_micros=fee_micros,
            balance_micros=None,
            idempotency_key=f"fee:{transaction.id}",
            request_hash=None,
            description=f"Stripe fee of {transaction.id}, missing from entry {entry.id}",
            metadata={"balance_transaction_id": transaction.id, "entry_id": str(entry.id)},
            created_at=datetime.now(UTC),
            stripe_object_id=transaction.id,
            lines=stripe_fee_lines(currency, fee_micros),
        )
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            await ledger_repo.insert_entries(conn, [record], timeout_s=self._timeout_s)

    # The ledger's side -----------------------------------------------------------

    async def _match_ledger(
        self,
        conn: asyncpg.Connection,
        run_id: uuid.UUID,
        window_start: datetime,
        window_end: datetime,
        findings: Findings,
        progress: Progress | None,
    ) -> None:
        first_id = uuid7_floor(int(window_start.timestamp() * 1000))
        end_id = uuid7_floor(int(window_end.timestamp() * 1000))
        after = uuid.UUID(int=0)
        checked = 0
        lookups = 0
        for _page in range(CLAIMS_PAGES_MAX):
            entries = await repo.ledger_claims_unseen(conn, first_id, end_id, after, UNSEEN_PAGE_SIZE)
            for entry in entries:
                # Written in the window for an object of another day (a heal,
                # a webhook retried for days): Stripe has it, just not here.
                if lookups < STRIPE_LOOKUPS_MAX:
                    lookups += 1
                    if await self.stripe.known(entry.stripe_object_id):
                        continue
                amount = (
                    entry.amount_micros
                    if entry.kind == "stripe_fee"
                    else SIGN[entry.kind] * entry.amount_micros
                )
                findings.add(
                    Item(
                        category="missing_in_stripe",
                        stripe_object_id=entry.stripe_object_id,
                        currency=entry.currency,
                        ledger_amount_micros=amount,
                        ledger_fee_micros=entry.fee_micros,
                        ledger_net_micros=amount - entry.fee_micros,
                        entry_id=entry.id,
                        wallet_id=entry.wallet_id,
                        detail=f"{entry.kind} entry claims {entry.stripe_object_id}, which Stripe did not list "
                        f"in the window (widened by {WINDOW_MARGIN})",
                    )
                )
            await repo.insert_items(conn, run_id, findings.take())
            checked += len(entries)
            if progress is not None:
                progress("ledger", checked)
            if len(entries) < UNSEEN_PAGE_SIZE:
                return
            after = entries[-1].id


async def list_runs(pool: asyncpg.Pool, *, limit: int, before: uuid.UUID | None, timeout_s: float) -> RunPage:
    limit = max(1, min(limit, RUNS_PAGE_SIZE_MAX))
    async with pool.acquire(timeout=timeout_s) as conn:
        runs = await repo.runs_page(conn, before, limit + 1)
    return RunPage(data=runs[:limit], has_more=len(runs) > limit)


async def get_run(
    pool: asyncpg.Pool, run_id: uuid.UUID, *, items_limit: int, items_after: int, timeout_s: float
) -> RunDetail:
    items_limit = max(1, min(items_limit, ITEMS_PAGE_SIZE_MAX))
    async with pool.acquire(timeout=timeout_s) as conn:
        run = await repo.run_by_id(conn, run_id)
        if run is None:
            raise RunNotFound(f"no reconciliation run {run_id}")
        items = await repo.items_page(conn, run_id, items_after, items_limit + 1)
    return RunDetail(run=run, items=items[:items_limit], items_has_more=len(items) > items_limit)


def _stripe_side(transaction: BalanceTransaction) -> dict:
    currency = transaction.currency.lower()
    if currency not in CURRENCY_EXPONENTS:
        return {
            "stripe_object_id": transaction.source_id,
            "balance_transaction_id": transaction.id,
            "transaction_type": transaction.type,
            "currency": None,
        }
    return {
        "stripe_object_id": transaction.source_id,
        "balance_transaction_id": transaction.id,
        "transaction_type": transaction.type,
        "currency": currency,
        "stripe_amount_micros": minor_to_micros(transaction.amount, currency),
        "stripe_fee_micros": minor_to_micros(transaction.fee, currency),
        "stripe_net_micros": minor_to_micros(transaction.net, currency),
    }


async def _entries_of(conn: asyncpg.Connection, source: str, kind: str) -> list[LedgerEntry]:
    """The ledger's entries of this kind for a Stripe object, as written now."""
    return [e for e in await repo.ledger_for_objects(conn, [source]) if e.kind == kind]


def _fee_missing(item: Item) -> bool:
    """The one fee difference the reconciler heals: the ledger has none."""
    return item.ledger_fee_micros == 0 and (item.stripe_fee_micros or 0) > 0
