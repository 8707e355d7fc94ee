"""Wire structs of reconciliation runs, and what the reconciler reads of
Stripe's balance transactions."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

import msgspec

RunStatus = Literal["running", "clean", "unmatched", "failed"]
Category = Literal[
    "missing_in_ledger", "missing_in_stripe", "amount_mismatch", "fee_mismatch", "balance_drift"
]
CATEGORIES: tuple[Category, ...] = (
    "missing_in_ledger",
    "missing_in_stripe",
    "amount_mismatch",
    "fee_mismatch",
    "balance_drift",
)
RUNS_PAGE_SIZE_MAX = 100
ITEMS_PAGE_SIZE_MAX = 1000
PAGE_SIZE_DEFAULT = 20


class BalanceTransaction(msgspec.Struct, kw_only=True):
    """One Stripe balance transaction (unknown fields ignored)."""

    id: str
    amount: int
    fee: int
    net: int
    currency: str
    type: str
    created: int
    # The object that caused it (ch_, re_, dp_, po_, ...): an id, or expanded.
    source: str | dict | None = None

    @property
    def source_id(self) -> str | None:
        if isinstance(self.source, dict):
            value = self.source.get("id")
            return value if isinstance(value, str) else None
        return self.source


class Item(msgspec.Struct, kw_only=True):
    """Something one side has that the other lacks, or both have differently."""

    item_no: int = 0
    category: Category
    stripe_object_id: str | None = None
    balance_transaction_id: str | None = None
    transaction_type: str | None = None
    currency: str | None = None
    stripe_amount_micros: int | None = None
    stripe_fee_micros: int | None = None
    stripe_net_micros: int | None = None
    ledger_amount_micros: int | None = None
    ledger_fee_micros: int | None = None
    ledger_net_micros: int | None = None
    entry_id: uuid.UUID | None = None
    wallet_id: uuid.UUID | None = None
    healed: bool = False
    detail: str


class Run(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    window_start: datetime
    window_end: datetime
    dry_run: bool
    status: RunStatus
    superseded_by: uuid.UUID | None
    transactions_seen: int
    counts: dict[str, int]
    totals: dict[str, dict[str, int]]
    healed: int
    wallets_checked: int
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    duration_ms: int | None


class RunPage(msgspec.Struct, kw_only=True):
    data: list[Run]
    has_more: bool


class RunDetail(msgspec.Struct, kw_only=True):
    run: Run
    items: list[Item]
    items_has_more: bool


class Drift(msgspec.Struct, frozen=True, kw_only=True):
    """A wallet whose Redis balance is not its ledger balance."""

    wallet_id: uuid.UUID
    currency: str
    redis_micros: int
    ledger_micros: int
    repaired: bool


class DriftReport(msgspec.Struct, kw_only=True):
    wallets_checked: int = 0
    drifts: list[Drift] = []
    # Suspects beyond what one run examines: counted, not examined.
    unexamined: int = 0
