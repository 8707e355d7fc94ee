"""The charge record: a debit or credit made in Redis and not yet settled
against the ledger, and its codecs.

What Redis keeps of an entry is its payload (EntryPayload as sorted JSON);
the ledger keeps an EntryRecord. This module turns one into the other, and it
is the one Python module that reads the fields of an outbox record, which
apply.lua and capture.lua write: `e` the payload, `b` the balance after the
charge, `c` the currency, `w` the wallet's epoch when charged."""

from __future__ import annotations

import hashlib

import msgspec

from centime.errors import CentimeError, InvalidRequest, Unavailable, invariant
from centime.money import AMOUNT_MICROS_MAX
from ledger.accounts import credit_lines, debit_lines
from ledger.schemas import EntryRecord
from wallet.cache import Clearing, Undo
from wallet.errors import (
    BalanceTooLarge,
    IdempotencyConflict,
    IdempotencyKeyReversed,
    InsufficientFunds,
    RequestInProgress,
    WalletFrozen,
)
from wallet.replies import ApplyReply, Charged, Missing, Refused, Replayed
from wallet.schemas import Entry, EntryPayload

RESERVED_KEY_PREFIX = "hold:"
"""A capture's debit is keyed 'hold:<hold id>' (wallet/holds.py): no client key may take it."""

OUTBOX_PAYLOAD = b"e"
OUTBOX_BALANCE = b"b"
OUTBOX_CURRENCY = b"c"
OUTBOX_EPOCH = b"w"
"""The outbox record's fields (apply.lua, capture.lua write them)."""

_payload_encoder = msgspec.json.Encoder(order="sorted")
_payload_decoder = msgspec.json.Decoder(EntryPayload)
_hash_encoder = msgspec.json.Encoder(order="sorted")


class PendingCharge(msgspec.Struct, frozen=True, gc=False):
    """A charge made in Redis (apply.lua or capture.lua), with what it takes
    to clear it from the outbox or to undo it: the entry to write, its
    outbox record's id, and the wallet's epoch when charged."""

    entry: EntryRecord
    outbox_id: str
    epoch: str


def request_hash(kind: str, amount_micros: int, description: str | None, metadata: dict[str, str]) -> str:
    body = _hash_encoder.encode([kind, amount_micros, description, metadata])
    return hashlib.sha256(body).hexdigest()[:32]


def body_hash(body: msgspec.Struct) -> str:
    """The hash a batch's Idempotency-Key is bound to: its whole body."""
    return hashlib.sha256(_hash_encoder.encode(body)).hexdigest()[:32]


def refuse_reserved_key(idempotency_key: str, field: str) -> None:
    if idempotency_key.startswith(RESERVED_KEY_PREFIX):
        raise InvalidRequest(
            f"{field}: keys beginning with {RESERVED_KEY_PREFIX!r} are reserved for hold captures",
            fields=[field],
        )


def to_entry(record: EntryRecord) -> Entry:
    return Entry(
        id=record.id,
        wallet_id=record.wallet_id,
        kind=record.kind,
        amount_micros=record.amount_micros,
        currency=record.currency,
        balance_micros=record.balance_micros,
        idempotency_key=record.idempotency_key,
        description=record.description,
        metadata=record.metadata,
        reverses_entry_id=record.reverses_entry_id,
        stripe_object_id=record.stripe_object_id,
        created_at=record.created_at,
    )


def record_from_payload(payload: EntryPayload, *, balance_micros: int, currency: str) -> EntryRecord:
    lines = (debit_lines if payload.kind == "debit" else credit_lines)(
        payload.wallet_id, currency, payload.amount_micros
    )
    return EntryRecord(
        id=payload.id,
        kind=payload.kind,
        currency=currency,
        wallet_id=payload.wallet_id,
        amount_micros=payload.amount_micros,
        balance_micros=balance_micros,
        idempotency_key=payload.idempotency_key,
        request_hash=payload.request_hash,
        description=payload.description,
        metadata=payload.metadata,
        created_at=payload.created_at,
        lines=lines,
    )


def decode_payload(raw: bytes | str) -> EntryPayload:
    return _payload_decoder.decode(raw)


def encode_payload(payload: EntryPayload) -> bytes:
    return _payload_encoder.encode(payload)


def payload_of(record: EntryRecord) -> EntryPayload:
    """What Redis keeps of a ledger entry (the inverse of record_from_payload)."""
    invariant(record.kind in ("debit", "credit"), f"entry {record.id} is a {record.kind}, not a keyed entry")
    return EntryPayload(
        id=record.id,
        wallet_id=record.wallet_id,
        kind=record.kind,  # type: ignore[arg-type]
        amount_micros=record.amount_micros,
        idempotency_key=record.idempotency_key or "",
        request_hash=record.request_hash or "",
        description=record.description,
        metadata=record.metadata,
        created_at=record.created_at,
    )


def charge_from_outbox(fields: dict[bytes, bytes], outbox_id: str) -> PendingCharge:
    """The charge an outbox record (or an abandoned one, outbox_id "") stands for."""
    payload = decode_payload(fields[OUTBOX_PAYLOAD])
    record = record_from_payload(
        payload, balance_micros=int(fields[OUTBOX_BALANCE]), currency=fields[OUTBOX_CURRENCY].decode()
    )
    # No epoch (written before epochs existed): matches no wallet, so nothing
    # is undone into a wallet loaded since.
    return PendingCharge(record, outbox_id, fields.get(OUTBOX_EPOCH, b"").decode())


def payload_key(entry: EntryRecord) -> str:
    invariant(entry.idempotency_key is not None, f"entry {entry.id} has no idempotency key")
    return entry.idempotency_key or ""


def undo(charge: PendingCharge) -> Undo:
    """How to undo this charge in Redis."""
    entry = charge.entry
    if entry.kind == "debit":
        return Undo("b", entry.amount_micros, charge.epoch)
    return Undo("p", -entry.amount_micros, charge.epoch)


def clearing(charge: PendingCharge) -> Clearing:
    """How to clear this committed charge from its outbox."""
    entry = charge.entry
    credit_micros = entry.amount_micros if entry.kind == "credit" else 0
    return Clearing(charge.outbox_id, entry.id, entry.wallet_id, credit_micros, charge.epoch)


def refusal_error(refused: Refused, payload: EntryPayload) -> CentimeError:
    """What a charge request refused by apply.lua (or by the ledger's holder
    of its key) answers."""
    reason, key = refused.reason, payload.idempotency_key
    if reason == "insufficient":
        return InsufficientFunds(
            f"balance {refused.balance_micros} micros cannot cover {payload.amount_micros} micros",
            balance_micros=refused.balance_micros,
        )
    if reason == "frozen":
        return WalletFrozen(f"wallet {payload.wallet_id} is frozen", balance_micros=refused.balance_micros)
    if reason == "too_large":
        return BalanceTooLarge(
            f"amount_micros: the balance would exceed {AMOUNT_MICROS_MAX} micros", fields=["amount_micros"]
        )
    if reason == "conflict":
        return IdempotencyConflict(f"idempotency key {key!r} was used with another request")
    if reason == "in_progress":
        return RequestInProgress(f"a request with idempotency key {key!r} is still in progress; retry later")
    if reason == "reversed":
        return IdempotencyKeyReversed(
            f"the request with idempotency key {key!r} failed and was reversed; "
            "nothing is charged; retry with a new key"
        )
    return Unavailable(f"unexpected answer {reason!r} from the balance store")


def replayed_entry(replayed: Replayed) -> Entry:
    """The entry an earlier request with this key was answered."""
    original = decode_payload(replayed.payload)
    return to_entry(
        record_from_payload(original, balance_micros=replayed.balance_micros, currency=replayed.currency)
    )


def charge_of(reply: ApplyReply, payload: EntryPayload) -> PendingCharge | Entry | Refused | Missing:
    """What apply.lua's reply for `payload` means, without I/O: a charge to
    write through, the entry to replay, or the reply itself (refused, or the
    wallet missing from Redis)."""
    if isinstance(reply, Charged):
        record = record_from_payload(payload, balance_micros=reply.balance_micros, currency=reply.currency)
        return PendingCharge(record, reply.outbox_id, reply.epoch)
    if isinstance(reply, Replayed):
        return replayed_entry(reply)
    return reply
