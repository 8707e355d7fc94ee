"""read_debit, the one reader of a debit request for both debit routes, takes
the Idempotency-Key within its bounds and then the body, and refuses the rest
with the 400 both routes answer; and the debit route's OpenAPI states the
header's rules as the credit route's, whose header Litestar checks itself."""

from __future__ import annotations

from typing import Any

import pytest
from test_route_scopes import offline_settings

from centime.app import create_app
from centime.errors import InvalidRequest
from wallet.api import IDEMPOTENCY_HEADER, read_debit
from wallet.schemas import IDEMPOTENCY_KEY_CHARS_MAX, CreateDebit

PATH = "/v1/wallets/0190b6a2-8c1e-7d3f-9a4b-5c6d7e8f9a0b/debits"
BODY = b'{"amount_micros": 1500, "description": "completion", "metadata": {"model": "m1"}}'


def refusal(idempotency_key: str | None, body: bytes) -> tuple[str, list[str]]:
    with pytest.raises(InvalidRequest) as refused:
        read_debit(idempotency_key, body, path=PATH)
    return refused.value.detail, refused.value.extra["fields"]


def test_a_debit_is_read_into_its_key_and_body() -> None:
    debit = read_debit("k1", BODY, path=PATH)
    assert debit.idempotency_key == "k1"
    assert debit.body == CreateDebit(amount_micros=1500, description="completion", metadata={"model": "m1"})


def test_a_key_of_the_longest_length_is_taken() -> None:
    key = "i" * IDEMPOTENCY_KEY_CHARS_MAX
    assert read_debit(key, BODY, path=PATH).idempotency_key == key


@pytest.mark.parametrize(
    ("idempotency_key", "detail"),
    [
        (None, f"Missing required header parameter 'Idempotency-Key' for path {PATH}"),
        ("", "Idempotency-Key: Expected `str` of length >= 1"),
        ("i" * (IDEMPOTENCY_KEY_CHARS_MAX + 1), "Idempotency-Key: Expected `str` of length <= 255"),
    ],
    ids=["missing", "empty", "256-chars"],
)
def test_a_key_out_of_bounds_is_refused_before_the_body_is_read(
    idempotency_key: str | None, detail: str
) -> None:
    assert refusal(idempotency_key, BODY) == (detail, [IDEMPOTENCY_HEADER])
    assert refusal(idempotency_key, b"{") == (detail, [IDEMPOTENCY_HEADER])


def test_a_bad_body_is_refused_naming_its_field() -> None:
    assert refusal("k1", b'{"amount_micros": 0}') == (
        "amount_micros: Expected `int` >= 1",
        ["amount_micros"],
    )
    assert refusal("k1", b'{"amount_micros": 1, "amount_micros": 2}')[1] == ["body"]


def header_parameter(operation: dict[str, Any]) -> dict[str, Any]:
    (parameter,) = [p for p in operation["parameters"] if p["in"] == "header"]
    return parameter


def test_the_debit_routes_openapi_states_every_rule_of_the_header() -> None:
    paths = create_app(offline_settings()).openapi_schema.to_schema()["paths"]
    debit = header_parameter(paths["/v1/wallets/{wallet_id}/debits"]["post"])
    credit = header_parameter(paths["/v1/wallets/{wallet_id}/credits"]["post"])
    assert debit == credit
    assert debit["name"] == IDEMPOTENCY_HEADER and debit["required"] is True
    schema = debit["schema"]
    assert (schema["type"], schema["minLength"], schema["maxLength"]) == (
        "string",
        1,
        IDEMPOTENCY_KEY_CHARS_MAX,
    )
    assert schema["pattern"] == "^(?!hold:)[^\\x00]*$"
    assert "oneOf" not in schema
