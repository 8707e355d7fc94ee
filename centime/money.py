"""Money: integer micros of a currency's major unit, bounded so Redis Lua
(doubles) represents every value exactly."""

from __future__ import annotations

from typing import Annotated

import msgspec

AMOUNT_MICROS_MAX = 2**53 - 1
"""Largest amount or balance magnitude: the largest integer a double holds exactly."""

# ISO 4217 exponents (digits after the decimal point), lower case like Stripe.
# Only currencies whose minor unit is a power of ten at most 10**6 convert exactly.
CURRENCY_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(
        [
            "aed",
            "aud",
            "brl",
            "cad",
            "chf",
            "cny",
            "czk",
            "dkk",
            "eur",
            "gbp",
            "hkd",
            "ils",
            "inr",
            "mxn",
            "myr",
            "nok",
            "nzd",
            "pln",
            "ron",
            "sek",
            "sgd",
            "thb",
            "try",
            "usd",
            "zar",
        ],
        2,
    ),
    **dict.fromkeys(["clp", "jpy", "krw", "vnd", "xaf", "xof"], 0),
    **dict.fromkeys(["bhd", "jod", "kwd", "omr", "tnd"], 3),
}

AmountMicros = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=AMOUNT_MICROS_MAX,
        description="A positive amount in micros (1e-6 of the major unit).",
    ),
]
LimitMicros = Annotated[
    int,
    msgspec.Meta(ge=0, le=AMOUNT_MICROS_MAX, description="A non-negative amount in micros."),
]
Currency = Annotated[
    str,
    msgspec.Meta(
        pattern="^[a-z]{3}$",
        description="ISO 4217 code in lower case, like Stripe: usd, eur, jpy; one of the supported ones.",
        examples=["usd"],
        extra_json_schema={"enum": sorted(CURRENCY_EXPONENTS)},
    ),
]


def is_supported_currency(currency: str) -> bool:
    return currency in CURRENCY_EXPONENTS


def minor_to_micros(amount_minor: int, currency: str) -> int:
    """Stripe minor units to micros, exactly: minor x 10**(6 - exponent)."""
    return amount_minor * 10 ** (6 - CURRENCY_EXPONENTS[currency])


def micros_to_minor(amount_micros: int, currency: str) -> int | None:
    """Micros to Stripe minor units, or None when not a whole number of them."""
    step = 10 ** (6 - CURRENCY_EXPONENTS[currency])
    whole, rest = divmod(amount_micros, step)
    return None if rest else whole
