"""Wire structs of top-ups, and what centime reads of Stripe's objects.
Requests forbid unknown fields: a typo is an error, not a silent default."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

import msgspec

from centime.money import AmountMicros

TopUpStatus = Literal[
    "pending",  # waiting for the payment
    "succeeded",  # paid and credited
    "failed",  # the last payment attempt failed; the customer may try again
    "canceled",
    "partially_refunded",
    "refunded",
    "disputed",  # a dispute is open: the wallet is frozen, the amount withheld
    "dispute_lost",
]
PAGE_SIZE_MAX = 100
PAGE_SIZE_DEFAULT = 20


class CreateTopUp(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount_micros: AmountMicros


class TopUp(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    wallet_id: uuid.UUID
    amount_micros: int
    currency: str
    status: TopUpStatus
    payment_intent_id: str | None
    # For Stripe.js on the paying customer's page; never logged.
    client_secret: str | None
    checkout_url: str
    credited_micros: int
    fee_micros: int
    refunded_micros: int
    disputed_micros: int
    failure_message: str | None
    created_at: datetime
    updated_at: datetime


class TopUpPage(msgspec.Struct, kw_only=True):
    data: list[TopUp]
    has_more: bool


class CheckoutStatus(msgspec.Struct, kw_only=True):
    """What the public checkout page may poll: no secrets, no wallet data."""

    status: TopUpStatus
    amount_micros: int
    currency: str
    credited: bool


class WebhookAnswer(msgspec.Struct, kw_only=True):
    event_id: str
    outcome: str


# What centime reads of Stripe, decoded from Stripe's JSON (unknown fields ignored).


class BalanceTransaction(msgspec.Struct, kw_only=True):
    id: str
    amount: int
    fee: int
    net: int
    currency: str


class Refund(msgspec.Struct, kw_only=True):
    id: str
    amount: int
    currency: str
    status: str | None = None
    charge: str | None = None


class StripeCharge(msgspec.Struct, kw_only=True):
    """A Stripe charge (`ch_`), as read back (not a wallet's charge in Redis)."""

    id: str
    amount: int
    currency: str
    status: str
    payment_intent: str | None = None
    # An id, or the object when expanded.
    balance_transaction: BalanceTransaction | str | None = None


class PaymentIntent(msgspec.Struct, kw_only=True):
    id: str
    amount: int
    amount_received: int | None = None
    currency: str
    status: str
    metadata: dict[str, str] = {}
    client_secret: str | None = None
    # An id, or the object when expanded (localstripe always expands it).
    latest_charge: StripeCharge | str | None = None
    last_payment_error: dict | None = None


class Dispute(msgspec.Struct, kw_only=True):
    id: str
    amount: int
    currency: str
    status: str
    charge: str | StripeCharge
    payment_intent: str | None = None


class Payment(msgspec.Struct, kw_only=True):
    """A PaymentIntent as centime acts on it: read back from Stripe, with its
    charge, the charge's balance transaction, and the charge's refunds."""

    intent: PaymentIntent
    charge: StripeCharge | None
    balance_transaction: BalanceTransaction | None
    refunds: list[Refund]
