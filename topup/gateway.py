"""The only place centime talks to Stripe (with the official library's async
client). Returns centime's own structs (topup/schemas.py), so the service
never handles Stripe objects, and maps Stripe's errors to centime's."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import msgspec
import stripe

from topup.errors import (
    StripeRefused,
    StripeUnavailable,
    TopUpAmountNotPayable,
    WebhookPayloadInvalid,
    WebhookSignatureInvalid,
)
from topup.schemas import BalanceTransaction, Dispute, Payment, PaymentIntent, Refund, StripeCharge

log = logging.getLogger(__name__)

T = TypeVar("T")
REFUNDS_PAGE_SIZE = 100
"""Stripe's largest page of refunds."""
REFUNDS_PER_CHARGE_MAX = 1000
"""Refunds read per charge, a page at a time. A charge with more is refused
loudly (Stripe limits the refunds of a charge well below this in practice)."""
WEBHOOK_TOLERANCE_S = 300
"""Stripe's default: a signed event older than this is refused (replay protection)."""


StripeText = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
"""An event's id and type: stored in columns of this bound (stripe_events)."""


class Event(msgspec.Struct, kw_only=True):
    id: StripeText
    type: StripeText
    created: int
    data: dict[str, Any]

    @property
    def object(self) -> dict[str, Any]:
        obj = self.data.get("object")
        return obj if isinstance(obj, dict) else {}


_event_decoder = msgspec.json.Decoder(Event)


def _signed_at_s(signature: str) -> int | None:
    """The `t=` timestamp of a Stripe-Signature header, if it has one."""
    for part in signature.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit() and len(value) <= 12:
            return int(value)
    return None


def _to_plain(obj: Any) -> Any:
    """A Stripe object as plain JSON values."""
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def _convert(obj: Any, kind: type[T]) -> T:
    try:
        return msgspec.convert(_to_plain(obj), kind, strict=False)
    except msgspec.ValidationError as exc:
        raise StripeRefused(f"Stripe answered an unexpected {kind.__name__}: {exc}") from exc


class StripeGateway:
    def __init__(
        self, *, secret_key: str, webhook_secret: str | None, api_base: str, timeout_ms: int
    ) -> None:
        self._webhook_secret = webhook_secret
        self._http = stripe.HTTPXClient(timeout=timeout_ms / 1000)
        # Retries are the library's (with Stripe's idempotency keys on POSTs).
        self._client = stripe.StripeClient(
            secret_key,
            base_addresses={"api": api_base},
            http_client=self._http,
            max_network_retries=2,
        )

    async def close(self) -> None:
        await self._http.close_async()

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except (
            stripe.APIConnectionError,
            stripe.RateLimitError,
            stripe.APIError,
            stripe.IdempotencyError,
        ) as exc:
            # IdempotencyError: the same request is still running at Stripe.
            raise StripeUnavailable(f"Stripe did not answer {what}: {exc.user_message or exc}") from exc
        except stripe.InvalidRequestError as exc:
            if exc.param == "amount":  # below Stripe's minimum for the currency, say
                raise TopUpAmountNotPayable(
                    f"amount_micros: Stripe refused the amount: {exc.user_message or exc}",
                    fields=["amount_micros"],
                ) from exc
            log.error("Stripe refused %s: %r", what, exc)
            raise StripeRefused(f"Stripe refused {what}: {exc.user_message or exc}") from exc
        except stripe.StripeError as exc:
            log.error("Stripe refused %s: %r", what, exc)
            raise StripeRefused(f"Stripe refused {what}: {exc.user_message or exc}") from exc

    # Requests ----------------------------------------------------------------

    async def create_customer(self, *, wallet_id: str, owner_id: str) -> str:
        customer = await self._call(
            "creating a customer",
            self._client.v1.customers.create_async(
                params={"metadata": {"wallet_id": wallet_id, "owner_id": owner_id}},
                options={"idempotency_key": f"customer-{wallet_id}"},
            ),
        )
        return str(customer.id)

    async def create_payment_intent(
        self, *, topup_id: str, wallet_id: str, amount_minor: int, currency: str, customer_id: str
    ) -> tuple[str, str]:
        """Returns the PaymentIntent's id and client secret. Stripe's
        idempotency key is the top-up id: a retry finds the same intent."""
        intent = await self._call(
            "creating a PaymentIntent",
            self._client.v1.payment_intents.create_async(
                params={
                    "amount": amount_minor,
                    "currency": currency,
                    "customer": customer_id,
                    "metadata": {"wallet_id": wallet_id, "topup_id": topup_id},
                },
                options={"idempotency_key": topup_id},
            ),
        )
        plain = _to_plain(intent)
        intent_id, client_secret = plain.get("id"), plain.get("client_secret")
        if not (isinstance(intent_id, str) and isinstance(client_secret, str)):
            raise StripeRefused(f"Stripe created PaymentIntent {intent_id!r} without an id or client secret")
        return intent_id, client_secret

    async def payment(self, payment_intent_id: str) -> Payment:
        """The PaymentIntent as Stripe has it now, with its latest charge, that
        charge's balance transaction (for the fee) and its refunds."""
        raw = await self._call(
            f"reading PaymentIntent {payment_intent_id}",
            self._client.v1.payment_intents.retrieve_async(
                payment_intent_id, params={"expand": ["latest_charge.balance_transaction"]}
            ),
        )
        intent = _convert(raw, PaymentIntent)
        charge = intent.latest_charge
        if isinstance(charge, str):
            charge = await self._charge(charge)
        if charge is None:
            return Payment(intent=intent, charge=None, balance_transaction=None, refunds=[])
        balance_transaction = charge.balance_transaction
        if isinstance(balance_transaction, str):
            balance_transaction = await self._balance_transaction(balance_transaction)
        return Payment(
            intent=intent,
            charge=charge,
            balance_transaction=balance_transaction,
            refunds=await self._refunds(charge.id),
        )

    async def payment_intent_of_charge(self, charge_id: str) -> str | None:
        return (await self._charge(charge_id)).payment_intent

    async def refund(self, refund_id: str) -> Refund:
        raw = await self._call(
            f"reading refund {refund_id}", self._client.v1.refunds.retrieve_async(refund_id)
        )
        return _convert(raw, Refund)

    async def dispute(self, dispute_id: str) -> Dispute:
        raw = await self._call(
            f"reading dispute {dispute_id}", self._client.v1.disputes.retrieve_async(dispute_id)
        )
        return _convert(raw, Dispute)

    async def _charge(self, charge_id: str) -> StripeCharge:
        raw = await self._call(
            f"reading charge {charge_id}",
            self._client.v1.charges.retrieve_async(charge_id, params={"expand": ["balance_transaction"]}),
        )
        return _convert(raw, StripeCharge)

    async def _balance_transaction(self, transaction_id: str) -> BalanceTransaction:
        raw = await self._call(
            f"reading balance transaction {transaction_id}",
            self._client.v1.balance_transactions.retrieve_async(transaction_id),
        )
        return _convert(raw, BalanceTransaction)

    async def _refunds(self, charge_id: str) -> list[Refund]:
        refunds: list[Refund] = []
        params: dict[str, Any] = {"charge": charge_id, "limit": REFUNDS_PAGE_SIZE}
        for _page in range(REFUNDS_PER_CHARGE_MAX // REFUNDS_PAGE_SIZE):
            page = _to_plain(
                await self._call(
                    f"listing the refunds of charge {charge_id}",
                    self._client.v1.refunds.list_async(params=params),  # type: ignore[arg-type]
                )
            )
            refunds += [_convert(item, Refund) for item in page.get("data", [])]
            if not page.get("has_more") or not refunds:
                return refunds
            params["starting_after"] = refunds[-1].id
        raise StripeRefused(f"charge {charge_id} has more than {REFUNDS_PER_CHARGE_MAX} refunds")

    # Webhooks ----------------------------------------------------------------

    def verify_event(self, payload: bytes, signature: str | None) -> Event:
        """The event, if Stripe signed it with our secret in the last few minutes."""
        if self._webhook_secret is None:
            raise WebhookSignatureInvalid("no webhook secret is configured (CENTIME_STRIPE_WEBHOOK_SECRET)")
        signed_at_s = _signed_at_s(signature or "")
        if signed_at_s is not None and signed_at_s > time.time() + WEBHOOK_TOLERANCE_S:
            # The library refuses only old timestamps; one from the future is
            # as suspect (a signature made to outlive the replay window).
            raise WebhookSignatureInvalid(
                f"the Stripe-Signature timestamp is more than {WEBHOOK_TOLERANCE_S} s in the future"
            )
        try:
            stripe.WebhookSignature.verify_header(
                payload.decode("utf-8"), signature or "", self._webhook_secret, WEBHOOK_TOLERANCE_S
            )
        except (stripe.SignatureVerificationError, UnicodeDecodeError) as exc:
            raise WebhookSignatureInvalid(f"the Stripe-Signature header does not verify: {exc}") from None
        try:
            return _event_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise WebhookPayloadInvalid(f"a signed event that is not a Stripe event: {exc}") from None
