"""Errors of the top-up domain, each with its HTTP status and stable code."""

from __future__ import annotations

from centime.errors import CentimeError, InvalidRequest, NotFound


class TopUpNotFound(NotFound):
    code = "topup_not_found"
    title = "Top-up not found"


class TopUpAmountInvalid(InvalidRequest):
    """Outside the configured limits, or not a whole number of minor units."""


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
    status = 400
    code = "webhook_signature_invalid"
    title = "Webhook signature invalid"


class WebhookPayloadInvalid(InvalidRequest):
    code = "webhook_payload_invalid"
    title = "Webhook payload invalid"
