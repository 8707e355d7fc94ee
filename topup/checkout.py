"""The checkout page: the amount, Stripe's Payment Element and a pay button,
then the result, polled until credited. Card data goes from the browser to
Stripe only; centime serves the page and the top-up's status."""

from __future__ import annotations

import html
import secrets
import string
from importlib import resources
from urllib.parse import urlsplit

import msgspec

from centime.money import CURRENCY_EXPONENTS
from topup.repo import TopUpRow

_TEMPLATE = string.Template(resources.files("topup").joinpath("templates/checkout.html").read_text("utf-8"))


def amount_text(amount_micros: int, currency: str) -> str:
    """12,345.60 USD: the amount in the currency's own minor-unit digits."""
    digits = CURRENCY_EXPONENTS.get(currency, 2)
    units = amount_micros / 1_000_000
    return f"{units:,.{digits}f} {currency.upper()}"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def render(
    row: TopUpRow, *, publishable_key: str | None, stripe_js_url: str, returned: bool
) -> tuple[str, dict[str, str]]:
    """The page and its headers (a strict Content-Security-Policy: scripts
    only from Stripe.js and this page's own nonce)."""
    nonce = secrets.token_urlsafe(16)
    config = {
        "topupId": str(row.id),
        "status": row.status,
        "returned": returned,
        "publishableKey": publishable_key,
        "clientSecret": row.client_secret if row.status in ("pending", "failed") else None,
        "stripeJsUrl": stripe_js_url,
        "statusUrl": f"/checkout/{row.id}/status",
        "checkoutPath": f"/checkout/{row.id}",
        "returnPath": f"/checkout/{row.id}?returned=1",
    }
    # JSON inside <script>: escape '<' so no value can close the element.
    config_json = msgspec.json.encode(config).decode().replace("<", "\\u003c")
    text = amount_text(row.amount_micros, row.currency)
    page = _TEMPLATE.substitute(
        amount_text=html.escape(text),
        amount_micros=row.amount_micros,
        currency=html.escape(row.currency),
        config_json=config_json,
        nonce=nonce,
    )
    stripe_origin = _origin(stripe_js_url)
    policy = "; ".join(
        [
            "default-src 'self'",
            # Stripe's security guide: Stripe.js and its sub-domains.
            f"script-src 'nonce-{nonce}' {stripe_origin} https://*.js.stripe.com",
            f"frame-src {stripe_origin} https://*.js.stripe.com https://*.stripe.com",
            "connect-src 'self' https://api.stripe.com https://*.stripe.com",
            "img-src 'self' data: https://*.stripe.com",
            "style-src 'self' 'unsafe-inline'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )
    headers = {
        "Content-Security-Policy": policy,
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }
    return page, headers
