"""Wire structs of the wallet API. Requests forbid unknown fields: a typo is
an error, not a silent default."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from centime.money import AmountMicros, Currency, LimitMicros
from ledger.schemas import EntryKind

METADATA_KEYS_MAX = 20
METADATA_KEY_CHARS_MAX = 40
METADATA_VALUE_CHARS_MAX = 500
DESCRIPTION_CHARS_MAX = 1000
IDEMPOTENCY_KEY_CHARS_MAX = 255
PAGE_SIZE_MAX = 100
PAGE_SIZE_DEFAULT = 20
WALLETS_PER_OWNER_MAX = 100

NO_NUL = "^[^\\x00]*$"
"""Postgres text cannot hold NUL; refuse it at the door, not in a commit."""
OwnerId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=NO_NUL)]
Description = Annotated[str, msgspec.Meta(max_length=DESCRIPTION_CHARS_MAX, pattern=NO_NUL)]
MetadataKey = Annotated[str, msgspec.Meta(min_length=1, max_length=METADATA_KEY_CHARS_MAX, pattern=NO_NUL)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=METADATA_VALUE_CHARS_MAX, pattern=NO_NUL)]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    msgspec.Meta(
        max_length=METADATA_KEYS_MAX,
        description=f"At most {METADATA_KEYS_MAX} string keys and values.",
    ),
]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=DESCRIPTION_CHARS_MAX, pattern=NO_NUL)]


class CreateWallet(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    owner_id: OwnerId
    currency: Currency
    overdraft_limit_micros: LimitMicros = 0


class CreateDebit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount_micros: AmountMicros
    description: Description | None = None
    metadata: Metadata = {}


class CreateCredit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount_micros: AmountMicros
    reason: Reason
    metadata: Metadata = {}


class Wallet(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    owner_id: str
    currency: str
    balance_micros: int
    overdraft_limit_micros: int
    status: Literal["active", "frozen"]
    created_at: datetime


class WalletList(msgspec.Struct, kw_only=True):
    data: list[Wallet]


class Entry(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    wallet_id: uuid.UUID
    kind: EntryKind
    amount_micros: int
    currency: str
    # The balance right after a debit or credit; None for entries applied to
    # Redis later (reversals, and what Stripe moved).
    balance_micros: int | None
    idempotency_key: str | None
    description: str | None
    metadata: dict[str, str]
    reverses_entry_id: uuid.UUID | None = None
    stripe_object_id: str | None = None
    created_at: datetime


class EntryPage(msgspec.Struct, kw_only=True):
    data: list[Entry]
    has_more: bool


class EntryPayload(msgspec.Struct, frozen=True, kw_only=True):
    """What Redis keeps of an entry (idempotency record and outbox), so a
    replay or the sweeper can rebuild it without Postgres."""

    id: uuid.UUID
    wallet_id: uuid.UUID
    kind: Literal["debit", "credit"]
    amount_micros: int
    idempotency_key: str
    request_hash: str
    description: str | None
    metadata: dict[str, str]
    created_at: datetime
