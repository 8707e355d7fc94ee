"""A top-up's status follows from what the ledger holds of it, and the
checkout page writes amounts in the currency's own minor-unit digits."""

from __future__ import annotations

import pytest

from topup.checkout import amount_text
from topup.service import topup_request_hash, topup_status


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({}, "pending"),
        ({"failed": True}, "failed"),
        ({"canceled": True}, "canceled"),
        ({"credited_micros": 10}, "succeeded"),
        ({"credited_micros": 10, "failed": True}, "succeeded"),  # an earlier attempt failed; this one paid
        ({"credited_micros": 10, "refunded_micros": 4}, "partially_refunded"),
        ({"credited_micros": 10, "refunded_micros": 10}, "refunded"),
        ({"credited_micros": 10, "open_disputed_micros": 10}, "disputed"),
        ({"credited_micros": 10, "refunded_micros": 10, "open_disputed_micros": 1}, "disputed"),
        ({"credited_micros": 10, "lost_disputed_micros": 10}, "dispute_lost"),
    ],
)
def test_status_follows_the_ledger(kwargs: dict, status: str) -> None:
    state = {
        "canceled": False,
        "failed": False,
        "credited_micros": 0,
        "refunded_micros": 0,
        "open_disputed_micros": 0,
        "lost_disputed_micros": 0,
        **kwargs,
    }
    assert topup_status(**state) == status


@pytest.mark.parametrize(
    ("micros", "currency", "text"),
    [
        (10_000_000, "usd", "10.00 USD"),
        (1_234_560_000, "eur", "1,234.56 EUR"),
        (500_000_000, "jpy", "500 JPY"),
        (1_005_000, "kwd", "1.005 KWD"),
        (10_000_000_000, "usd", "10,000.00 USD"),
    ],
)
def test_amounts_are_written_in_the_currency_digits(micros: int, currency: str, text: str) -> None:
    assert amount_text(micros, currency) == text


def test_the_request_hash_is_pinned() -> None:
    # Stored with each top-up: it must not change across releases.
    assert topup_request_hash(10_000_000) == "5fe90ca516d331b24f3a60f7ba29ca9a"
    assert topup_request_hash(10_000_000) != topup_request_hash(10_000_001)
    assert len(topup_request_hash(1)) == 32
