"""Internal ledger structs. Frozen: an entry, once built, never changes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

import msgspec

EntryKind = Literal[
    "debit",
    "credit",
    "reversal",
    # Postgres first: what Stripe moved (topup/service.py).
    "topup",
    "topup_refund",
    "dispute_opened",
    "dispute_won",
    "dispute_lost",
    # A Stripe fee the ledger missed, healed by the reconciler.
    "stripe_fee",
]


class Line(msgspec.Struct, frozen=True, gc=False):
    """One side of an entry. Positive: debit side; negative: credit side."""

    account_id: uuid.UUID
    amount_micros: int


class EntryRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    id: uuid.UUID
    kind: EntryKind
    currency: str
    wallet_id: uuid.UUID
    amount_micros: int
    balance_micros: int | None
    idempotency_key: str | None
    request_hash: str | None
    reverses_entry_id: uuid.UUID | None = None
    description: str | None = None
    metadata: dict[str, str] = {}
    created_at: datetime
    stripe_object_id: str | None = None
    lines: tuple[Line, ...] = ()


class KeyHolder(msgspec.Struct, frozen=True):
    """The entry that already holds an idempotency key, and its reversal."""

    entry: EntryRecord
    reversed_by: uuid.UUID | None
