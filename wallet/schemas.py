"""Wire structs of the wallet API. Requests forbid unknown fields: a typo is
an error, not a silent default. At the end, the internal structs that the
Postgres side (repo.py) and the Redis side (cache.py) both speak."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from centime.money import AmountMicros, Currency, LimitMicros
from ledger.schemas import EntryKind

METADATA_KEYS_MAX = 20
METADATA_KEY_CHARS_MAX = 40
METADATA_VALUE_CHARS_MAX = 500
DESCRIPTION_CHARS_MAX = 1000
IDEMPOTENCY_KEY_CHARS_MAX = 255
OWNER_ID_CHARS_MAX = 128
PAGE_SIZE_MAX = 100
PAGE_SIZE_DEFAULT = 20
WALLETS_PER_OWNER_MAX = 100
HOLD_EXPIRES_IN_S_DEFAULT = 300
HOLD_EXPIRES_IN_S_MAX = 24 * 3600
BATCH_DEBITS_MAX = 1000
BATCH_BODY_BYTES_MAX = 4 * 1024 * 1024
"""A full batch with long descriptions fits; the single-request limit (64 KiB) does not."""

NO_NUL = "^[^\\x00]*$"
"""Postgres text cannot hold NUL; refuse it at the door, not in a commit.
Python's `$` also matches before a final newline, ECMA's does not; here both
engines agree, because the class before it takes newlines too."""
OwnerId = Annotated[str, msgspec.Meta(min_length=1, max_length=OWNER_ID_CHARS_MAX, pattern=NO_NUL)]
Description = Annotated[str, msgspec.Meta(max_length=DESCRIPTION_CHARS_MAX, pattern=NO_NUL)]
MetadataKey = Annotated[str, msgspec.Meta(min_length=1, max_length=METADATA_KEY_CHARS_MAX, pattern=NO_NUL)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=METADATA_VALUE_CHARS_MAX, pattern=NO_NUL)]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    msgspec.Meta(
        max_length=METADATA_KEYS_MAX,
        description=f"At most {METADATA_KEYS_MAX} keys of 1 to {METADATA_KEY_CHARS_MAX} characters, "
        f"each with a string value of at most {METADATA_VALUE_CHARS_MAX} characters; no NUL.",
    ),
]
CLIENT_KEY_PATTERN = "^(?!hold:)[^\\x00]*$"
"""What the OpenAPI states of a debit's or credit's idempotency key: keys
beginning with 'hold:' are the captures' (wallet.service.RESERVED_KEY_PREFIX)."""
IdempotencyKeyText = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=IDEMPOTENCY_KEY_CHARS_MAX,
        pattern=NO_NUL,
        extra_json_schema={"pattern": CLIENT_KEY_PATTERN},
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
    held_micros: int
    """Reserved by active holds."""
    available_micros: int
    """What a debit or hold can take now: balance - held + overdraft limit."""
    overdraft_limit_micros: int
    status: Literal["active", "frozen"]
    created_at: datetime


class WalletList(msgspec.Struct, kw_only=True):
    data: list[Wallet]


class Entry(msgspec.Struct, kw_only=True, gc=False):
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


class EntryPayload(msgspec.Struct, frozen=True, kw_only=True, gc=False):
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


# Holds ---------------------------------------------------------------------

HoldStatus = Literal["held", "captured", "released", "expired"]


class CreateHold(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount_micros: AmountMicros
    expires_in_s: Annotated[int, msgspec.Meta(ge=1, le=HOLD_EXPIRES_IN_S_MAX)] = HOLD_EXPIRES_IN_S_DEFAULT
    description: Description | None = None
    metadata: Metadata = {}


class CaptureHold(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount_micros: AmountMicros
    """The call's actual cost: may be more or less than the hold."""


class HoldPayload(msgspec.Struct, frozen=True, kw_only=True):
    """What Redis keeps of a hold's request (wallet/lua/hold.lua), so its
    events can be recorded without asking anyone else."""

    id: uuid.UUID
    wallet_id: uuid.UUID
    amount_micros: int
    idempotency_key: str
    request_hash: str
    description: str | None
    metadata: dict[str, str]
    created_at: datetime


class Hold(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    wallet_id: uuid.UUID
    amount_micros: int
    currency: str
    status: HoldStatus
    expires_at: datetime
    idempotency_key: str
    description: str | None
    metadata: dict[str, str]
    created_at: datetime
    ended_at: datetime | None = None
    """When it was captured, released or expired."""
    captured_micros: int | None = None
    entry_id: uuid.UUID | None = None
    """The capture's debit entry, when something was captured."""


class Capture(msgspec.Struct, kw_only=True):
    hold: Hold
    entry: Entry | None
    """The debit entry; none when the wallet's limit left nothing to capture."""
    requested_micros: int
    captured_micros: int
    shortfall_micros: int
    """requested - captured: what the wallet's overdraft limit did not allow."""


# Batch debits ----------------------------------------------------------------


class BatchDebit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    wallet_id: uuid.UUID
    amount_micros: AmountMicros
    idempotency_key: IdempotencyKeyText
    description: Description | None = None
    metadata: Metadata = {}


class CreateBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    debits: Annotated[
        list[BatchDebit],
        msgspec.Meta(
            min_length=1, max_length=BATCH_DEBITS_MAX, description=f"1 to {BATCH_DEBITS_MAX} debits."
        ),
    ]


class BatchItem(msgspec.Struct, kw_only=True, gc=False):
    status: int
    """What this debit alone would have been answered: 201, or the problem's status."""
    entry: Entry | None = None
    replayed: bool = False
    problem: dict[str, Any] | None = None
    """The RFC 9457 problem a single debit would get (its `code` says what went wrong)."""


class BatchResult(msgspec.Struct, kw_only=True):
    results: list[BatchItem]
    """One per debit, in request order."""


# Internal: what Postgres (repo.py) and Redis (cache.py) both speak ------------


class CachedWallet(msgspec.Struct, frozen=True):
    balance_micros: int
    overdraft_limit_micros: int
    status: str
    currency: str
    change_seq: int = 0
    """The last Postgres-first change (wallet/changes.py) the balance includes."""
    held_micros: int = 0
    """What active holds reserve (read from Redis; a load keeps Redis's)."""


class WalletChange(msgspec.Struct, frozen=True):
    """A Postgres-first change to apply to a wallet in Redis, once."""

    seq: int
    delta_micros: int
    status: str | None
