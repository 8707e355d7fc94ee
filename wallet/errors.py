"""Errors of the wallet domain, each with its HTTP status and stable code."""

from __future__ import annotations

from centime.errors import CentimeError, Conflict, NotFound


class WalletNotFound(NotFound):
    code = "wallet_not_found"
    title = "Wallet not found"


class WalletExists(Conflict):
    code = "wallet_exists"
    title = "Wallet exists"


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"
    title = "Idempotency key reused with another request"


class RequestInProgress(Conflict):
    code = "request_in_progress"
    title = "A request with this idempotency key is in progress"


class IdempotencyKeyReversed(Conflict):
    code = "idempotency_key_reversed"
    title = "The request with this idempotency key failed and was reversed"


class WalletFrozen(Conflict):
    code = "wallet_frozen"
    title = "Wallet frozen"


class InsufficientFunds(CentimeError):
    status = 402
    code = "insufficient_funds"
    title = "Insufficient funds"


class LedgerRefused(CentimeError):
    """Postgres refused a ledger entry for what it said (a constraint or data
    error): a bug, not an outage, so no 503 that invites a retry. The charge
    was undone in Redis."""

    status = 500
    code = "internal_error"
    title = "Internal error"


class BalanceTooLarge(CentimeError):
    """A well-formed credit the wallet's balance cannot take: it would pass
    AMOUNT_MICROS_MAX. 422, not 400: the request is valid, the state refuses it."""

    status = 422
    code = "balance_too_large"
    title = "Balance too large"


class HoldNotFound(NotFound):
    code = "hold_not_found"
    title = "Hold not found"


class TooManyHolds(Conflict):
    """The wallet has as many active holds as CENTIME_HOLDS_PER_WALLET_MAX allows."""

    code = "too_many_holds"
    title = "Too many active holds"


class HoldEnded(Conflict):
    code = "hold_not_held"
    title = "The hold has ended"


class CaptureReversed(Conflict):
    code = "capture_reversed"
    title = "The capture failed and was reversed"
