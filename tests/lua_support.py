"""The Lua scripts' replies as the scripts send them, for the script tests.

Cache decodes each reply into a typed result (wallet/replies.py); the
script tests assert the scripts' contract, item by item, on `as_sent`: the
typed result written back as the script's array of texts. Equal to the raw
reply where the decoder kept every item (all but a reversed key's payload, which
nothing reads), so these tests check the decoder too."""

from __future__ import annotations

from wallet import replies

_WITH_BALANCE = frozenset({"insufficient", "frozen", "too_large"})
"""Refusals whose reply carries the wallet's balance."""


def as_sent(reply: object) -> list[str]:
    """`reply` as its script sent it: a list of texts, the case first."""
    match reply:
        case replies.Charged(balance, outbox_id, currency, epoch):
            return ["ok", str(balance), outbox_id, currency, epoch]
        case replies.Replayed(balance, payload, currency):
            return ["replay", str(balance), payload.decode(), currency]
        case replies.Refused(reason, balance, count):
            return (
                [reason]
                + ([str(balance)] if reason in _WITH_BALANCE else [])
                + ([] if count is None else [str(count)])
            )
        case replies.Missing():
            return ["missing"]
        case replies.Held(hold_id, expires_at_ms, event_id):
            return ["ok", str(hold_id), str(expires_at_ms), event_id]
        case replies.HoldReplayed(hold_id):
            return ["replay", str(hold_id)]
        case replies.Captured(captured, balance, outbox_id, currency, epoch, event_id, ended_at_ms):
            after = "" if balance is None else str(balance)
            return ["ok", str(captured), after, outbox_id, currency, epoch, event_id, str(ended_at_ms)]
        case replies.CaptureReplayed(captured, requested, entry_id, state, payload, balance, currency):
            return [
                "replay",
                str(captured),
                str(requested),
                "" if entry_id is None else str(entry_id),
                state,
                payload.decode(),
                "" if balance is None else str(balance),
                currency,
            ]
        case replies.AlreadyEnded(status):
            return ["ended", status]
        case replies.NoSuchHold():
            return ["not_found"]
        case replies.EndedNow(status, event_id):
            return ["ok", status, event_id]
        case replies.NotDue():
            return ["not_due"]
    raise AssertionError(f"not a script reply: {reply!r}")
