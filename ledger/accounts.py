"""Account ids and the lines of each kind of entry.

A wallet's liability account has the wallet's own id. System accounts have
ids derived from (kind, currency), so code can name them without a lookup."""

from __future__ import annotations

import functools
import uuid

from centime.errors import invariant
from ledger.schemas import EntryRecord, Line

SYSTEM_ACCOUNT_KINDS = (
    "revenue",
    "promotions",
    "stripe_clearing",
    "stripe_fees",
    "refunds",
    "disputes",
)
_NAMESPACE = uuid.UUID("5b0f6f7e-3c55-4d4a-9d38-2a5b1f0c7e11")


@functools.lru_cache(maxsize=len(SYSTEM_ACCOUNT_KINDS) * 64)
def system_account_id(kind: str, currency: str) -> uuid.UUID:
    invariant(kind in SYSTEM_ACCOUNT_KINDS, f"unknown system account kind {kind!r}")
    return uuid.uuid5(_NAMESPACE, f"{kind}:{currency}")


def debit_lines(wallet_id: uuid.UUID, currency: str, amount_micros: int) -> tuple[Line, ...]:
    """The user spends: our liability to them falls, revenue rises."""
    return (
        Line(wallet_id, amount_micros),
        Line(system_account_id("revenue", currency), -amount_micros),
    )


def credit_lines(wallet_id: uuid.UUID, currency: str, amount_micros: int) -> tuple[Line, ...]:
    """A promotional grant or support adjustment: we owe the user more."""
    return (
        Line(system_account_id("promotions", currency), amount_micros),
        Line(wallet_id, -amount_micros),
    )


def _nonzero(*lines: Line) -> tuple[Line, ...]:
    kept = tuple(line for line in lines if line.amount_micros != 0)
    invariant(len(kept) >= 2, f"an entry needs two or more non-zero lines, not {kept}")
    return kept


def topup_lines(wallet_id: uuid.UUID, currency: str, gross_micros: int, fee_micros: int) -> tuple[Line, ...]:
    """A card payment: Stripe holds the net for us, its fee is our expense,
    and we owe the user the gross."""
    invariant(0 <= fee_micros <= gross_micros, f"fee {fee_micros} outside 0..{gross_micros}")
    return _nonzero(
        Line(system_account_id("stripe_clearing", currency), gross_micros - fee_micros),
        Line(system_account_id("stripe_fees", currency), fee_micros),
        Line(wallet_id, -gross_micros),
    )


def topup_refund_lines(wallet_id: uuid.UUID, currency: str, amount_micros: int) -> tuple[Line, ...]:
    """Stripe pays the card back: we owe the user that much less (the wallet
    may go below zero; Stripe keeps its fee)."""
    return _nonzero(
        Line(wallet_id, amount_micros),
        Line(system_account_id("stripe_clearing", currency), -amount_micros),
    )


def dispute_opened_lines(wallet_id: uuid.UUID, currency: str, amount_micros: int) -> tuple[Line, ...]:
    """The disputed amount leaves the wallet and waits in the disputes account."""
    return _nonzero(
        Line(wallet_id, amount_micros),
        Line(system_account_id("disputes", currency), -amount_micros),
    )


def dispute_won_lines(wallet_id: uuid.UUID, currency: str, amount_micros: int) -> tuple[Line, ...]:
    """The dispute is won: the amount goes back to the wallet."""
    return _nonzero(
        Line(system_account_id("disputes", currency), amount_micros),
        Line(wallet_id, -amount_micros),
    )


def dispute_lost_lines(currency: str, amount_micros: int) -> tuple[Line, ...]:
    """The dispute is lost: Stripe returned the amount to the cardholder."""
    return _nonzero(
        Line(system_account_id("disputes", currency), amount_micros),
        Line(system_account_id("stripe_clearing", currency), -amount_micros),
    )


def stripe_fee_lines(currency: str, fee_micros: int) -> tuple[Line, ...]:
    """A fee Stripe took that the ledger missed: our expense, out of clearing."""
    return _nonzero(
        Line(system_account_id("stripe_fees", currency), fee_micros),
        Line(system_account_id("stripe_clearing", currency), -fee_micros),
    )


def reversal_of(entry: EntryRecord, reversal_id: uuid.UUID) -> EntryRecord:
    """The entry that undoes `entry`: the same lines, negated."""
    invariant(len(entry.lines) >= 2, f"entry {entry.id} has no lines to reverse")
    return EntryRecord(
        id=reversal_id,
        kind="reversal",
        currency=entry.currency,
        wallet_id=entry.wallet_id,
        amount_micros=entry.amount_micros,
        balance_micros=None,
        idempotency_key=entry.idempotency_key,
        request_hash=None,
        reverses_entry_id=entry.id,
        description=f"reversal of {entry.kind} {entry.id}",
        metadata={},
        created_at=entry.created_at,
        lines=tuple(Line(line.account_id, -line.amount_micros) for line in entry.lines),
    )


def reversal_id_for(entry_id: uuid.UUID) -> uuid.UUID:
    """Deterministic, so settling the same entry twice writes one reversal."""
    return uuid.uuid5(_NAMESPACE, f"reversal:{entry_id}")
