"""The Lua scripts' replies, decoded once, into typed results.

A script answers a flat array whose first item names the case (apply.lua:
`{'ok', balance, outbox id, currency, epoch}`, ...). Each decoder below is
the one place that knows a script's positions; everything else matches on
the types. The structs are frozen and untracked by the collector (gc=False):
the debit path decodes one per request."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from centime.errors import Unavailable


class Missing(msgspec.Struct, frozen=True, gc=False):
    """The wallet is not (wholly) in Redis: load it from the ledger, then retry."""


class Refused(msgspec.Struct, frozen=True, gc=False):
    """The script charged nothing. `reason`: insufficient, frozen, too_large,
    conflict, in_progress, reversed (apply.lua); too_many (hold.lua);
    conflict (capture.lua). `balance_micros` where the script gives it
    (insufficient, frozen, too_large); `count` where it gives one: the held
    micros (an insufficient hold) or the active holds (too_many)."""

    reason: str
    balance_micros: int = 0
    count: int | None = None


class Charged(msgspec.Struct, frozen=True, gc=False):
    """apply.lua charged the wallet and appended the entry to its outbox."""

    balance_micros: int
    outbox_id: str
    currency: str
    epoch: str


class Replayed(msgspec.Struct, frozen=True, gc=False):
    """apply.lua found the key's earlier result: its payload and balance."""

    balance_micros: int
    payload: bytes
    currency: str


ApplyReply = Charged | Replayed | Refused | Missing

MISSING = Missing()
_NO_BALANCE_REFUSALS = {reason: Refused(reason) for reason in ("conflict", "in_progress", "reversed")}


def apply_reply(raw: list[Any]) -> ApplyReply:
    status = raw[0]
    if status == b"ok":
        return Charged(int(raw[1]), raw[2].decode(), raw[3].decode(), raw[4].decode())
    if status == b"replay":
        return Replayed(int(raw[1]), raw[2], raw[3].decode())
    if status == b"missing":
        return MISSING
    reason = status.decode()
    if reason in ("insufficient", "frozen", "too_large"):
        return Refused(reason, int(raw[1]))
    if reason in _NO_BALANCE_REFUSALS:
        return _NO_BALANCE_REFUSALS[reason]
    raise Unavailable(f"unexpected answer {reason!r} from the balance store")


# hold.lua -------------------------------------------------------------------


class Held(msgspec.Struct, frozen=True, gc=False):
    """hold.lua reserved the amount; `event_id` is its hold event."""

    hold_id: uuid.UUID
    expires_at_ms: int
    event_id: str


class HoldReplayed(msgspec.Struct, frozen=True, gc=False):
    """hold.lua found the key's earlier hold."""

    hold_id: uuid.UUID


HoldReply = Held | HoldReplayed | Refused | Missing


def hold_reply(raw: list[Any]) -> HoldReply:
    status = raw[0].decode()
    if status == "ok":
        return Held(uuid.UUID(raw[1].decode()), int(raw[2]), raw[3].decode())
    if status == "replay":
        return HoldReplayed(uuid.UUID(raw[1].decode()))
    if status == "missing":
        return MISSING
    if status == "conflict":
        return Refused(status)
    if status == "frozen":
        return Refused(status, int(raw[1]))
    if status == "too_many":
        return Refused(status, count=int(raw[1]))
    if status == "insufficient":
        return Refused(status, int(raw[1]), int(raw[2]))
    raise Unavailable(f"unexpected answer {status!r} from the balance store")


# capture.lua and end_hold.lua ----------------------------------------------------


class NoSuchHold(msgspec.Struct, frozen=True, gc=False):
    """The hold's hash is gone from Redis (ended long ago, or flushed)."""


class AlreadyEnded(msgspec.Struct, frozen=True, gc=False):
    """The hold had ended before: `status` captured, released or expired."""

    status: str


class Captured(msgspec.Struct, frozen=True, gc=False):
    """capture.lua debited `captured_micros` (0: nothing to write) and ended the hold."""

    captured_micros: int
    balance_micros: int | None
    """None when nothing was captured (no debit)."""
    outbox_id: str
    currency: str
    epoch: str
    event_id: str
    ended_at_ms: int


class CaptureReplayed(msgspec.Struct, frozen=True, gc=False):
    """The hold was captured before. `state` of its entry: ok (payload and
    balance given), in_progress, reversed, gone (Redis forgot the key: ask
    the ledger for `entry_id`), none (nothing was captured)."""

    captured_micros: int
    requested_micros: int
    entry_id: uuid.UUID | None
    state: str
    payload: bytes
    balance_micros: int | None
    """None unless Redis still keeps the entry (state ok, in_progress, reversed)."""
    currency: str


CaptureReply = Captured | CaptureReplayed | AlreadyEnded | NoSuchHold | Refused | Missing

NO_SUCH_HOLD = NoSuchHold()


def capture_reply(raw: list[Any]) -> CaptureReply:
    status = raw[0].decode()
    if status == "ok":
        return Captured(
            int(raw[1]),
            int(raw[2]) if raw[2] else None,  # '' when nothing was captured
            raw[3].decode(),
            raw[4].decode(),
            raw[5].decode(),
            raw[6].decode(),
            int(raw[7]),
        )
    if status == "replay":
        entry_id = raw[3].decode()
        return CaptureReplayed(
            int(raw[1]),
            int(raw[2]),
            uuid.UUID(entry_id) if entry_id else None,
            raw[4].decode(),
            raw[5],
            int(raw[6]) if raw[6] else None,
            raw[7].decode(),
        )
    if status == "ended":
        return AlreadyEnded(raw[1].decode())
    if status == "not_found":
        return NO_SUCH_HOLD
    if status == "missing":
        return MISSING
    if status == "conflict":
        return Refused(status)
    raise Unavailable(f"unexpected answer {status!r} from the balance store")


class EndedNow(msgspec.Struct, frozen=True, gc=False):
    """end_hold.lua ended the hold now (`status` released or expired)."""

    status: str
    event_id: str


class NotDue(msgspec.Struct, frozen=True, gc=False):
    """end_hold.lua was asked to expire a hold whose time has not come."""


EndHoldReply = EndedNow | AlreadyEnded | NoSuchHold | NotDue


def end_hold_reply(raw: list[Any]) -> EndHoldReply:
    status = raw[0].decode()
    if status == "ok":
        return EndedNow(raw[1].decode(), raw[2].decode())
    if status == "ended":
        return AlreadyEnded(raw[1].decode())
    if status == "not_found":
        return NO_SUCH_HOLD
    if status == "not_due":
        return NotDue()
    raise Unavailable(f"unexpected answer {status!r} from the balance store")
