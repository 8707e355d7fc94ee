"""Errors of the top-up domain, each with its HTTP status and stable code."""

from __future__ import annotations

from centime.errors import CentimeError, InvalidRequest, NotFound


class TopUpNotFound(NotFound):
    code = "topup_not_found"
    title = "Top-up not found"


class TopUpAmountInvalid(InvalidRequest):
    """Outside the configured limits (the OpenAPI states them)."""


class TopUpAmountNotPayable(CentimeError):
    """A well-formed amount the wallet's currency cannot pay: not a whole
    number of its minor units, or below what Stripe takes in it. 422, not
    400: the rule depends on the wallet, which the request does not carry."""

    status = 422
    code = "amount_not_payable"
    title = "Amount not payable"


class TopUpsDisabled(CentimeError):
    status = 503
    code = "topups_disabled"
    title = "Top-ups are not configured"


class StripeUnavailable(CentimeError):
    """Stripe did not answer, or answered with an error that a retry may cure."""

    status = 503
    code = "stripe_unavailable"
    title = "Stripe unavailable"


class StripeRefused(CentimeError):
    """Stripe refused a request centime made: a configuration problem."""

    status = 502
    code = "stripe_refused"
    title = "Stripe refused the request"


class WebhookSignatureInvalid(CentimeError):
    """The Stripe-Signature header is the webhook's credential: 401 when it
    does not verify (Stripe retries any non-2xx alike)."""

    status = 401
    code = "webhook_signature_invalid"
    title = "Webhook signature invalid"
    challenge = 'Stripe-Signature realm="centime webhooks"'


class WebhookPayloadInvalid(InvalidRequest):
    code = "webhook_payload_invalid"
    title = "Webhook payload invalid"
