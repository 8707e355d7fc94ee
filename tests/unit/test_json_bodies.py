"""decode_body refuses what msgspec alone lets through or trips on: a key named twice in one
object (however it is spelled, wherever it is nested, whatever the strings around it hold),
bytes that are not UTF-8; and check_query refuses a NUL or non-UTF-8 query parameter by name."""

from __future__ import annotations

import json

import pytest

from centime.errors import InvalidRequest
from centime.wire import check_query, decode_body, has_duplicate_keys
from wallet.schemas import CreateBatch, CreateDebit

WALLET = "01a23b13-c340-75f1-a953-8f9a8179747a"

DUPLICATED = [
    b'{"amount_micros": 1, "amount_micros": 2}',
    b'{"amount_micros":1,"description":"x","description":"y"}',
    b'{"amount_micros": 1, "\\u0061mount_micros": 2}',  # the same key, one letter escaped
    b'{"amount_micros": 1, "metadata": {"k": "a", "k": "b"}}',
    b'{"amount_micros": 1, "description": "a:b:c", "metadata": {"k": "a", "k": "b"}}',
    b'{"amount_micros": 1, "description": "q\\": \\"", "metadata": {"k": "a", "k": "b"}}',
    b'{"amount_micros" : 1 , "amount_micros" :\n2}',
]
DISTINCT = [
    b'{"amount_micros": 1000, "description": "x"}',
    b'{"amount_micros": 1, "description": "a:b", "metadata": {"t": "12:00", "u": "::"}}',
    b'{"amount_micros": 1, "description": "\\":\\" \\\\", "metadata": {"k:": "v"}}',
    b'{"amount_micros": 1, "description": "\\u003a\\u003a"}',  # escaped colons, no raw one
    b'{"amount_micros": 1, "metadata": {"a": "1", "\\u0062": "2"}}',
]


@pytest.mark.parametrize("body", DUPLICATED)
def test_a_key_named_twice_is_refused(body: bytes) -> None:
    assert has_duplicate_keys(body)
    with pytest.raises(InvalidRequest, match="appears twice") as raised:
        decode_body(body, CreateDebit)
    assert raised.value.extra["fields"] == ["body"]


@pytest.mark.parametrize("body", DISTINCT)
def test_distinct_keys_decode(body: bytes) -> None:
    assert not has_duplicate_keys(body)
    assert decode_body(body, CreateDebit).amount_micros >= 1


def test_the_duplicate_is_named() -> None:
    with pytest.raises(InvalidRequest, match="'k' appears twice"):
        decode_body(b'{"amount_micros": 1, "metadata": {"k": "a", "k": "b"}}', CreateDebit)


def test_a_duplicate_in_one_debit_of_a_batch_is_found() -> None:
    debits = [{"wallet_id": WALLET, "amount_micros": 1, "idempotency_key": f"k{i}"} for i in range(1000)]
    body = json.dumps({"debits": debits}).encode()
    assert not has_duplicate_keys(body)
    twice = body.replace(b'"idempotency_key": "k500"', b'"idempotency_key": "k500", "amount_micros": 2')
    assert has_duplicate_keys(twice)
    with pytest.raises(InvalidRequest, match="'amount_micros' appears twice"):
        decode_body(twice, CreateBatch)


@pytest.mark.parametrize(
    "body",
    [b'{"amount_micros": 1, "description": "\xff"}', b'{"amount_micros": 1, "metadata": {"\xc3": "v"}}'],
)
def test_bytes_that_are_not_utf8_are_refused(body: bytes) -> None:
    with pytest.raises(InvalidRequest, match="not valid UTF-8"):
        decode_body(body, CreateDebit)


@pytest.mark.parametrize(
    ("query", "name"),
    [
        (b"owner_id=%00", "owner_id"),
        (b"owner_id=a%00b", "owner_id"),
        (b"limit=1&owner_id=%FF", "owner_id"),
        (b"owner_id=%C3", "owner_id"),  # a UTF-8 sequence cut short
        (b"owner_id=\xff", "owner_id"),  # sent raw, not percent-encoded
        (b"x%00=1", "x\x00"),
        (b"%FF=1", "\\xff"),
    ],
)
def test_a_bad_query_parameter_is_named(query: bytes, name: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_query(query)
    assert raised.value.extra["fields"] == [name]


@pytest.mark.parametrize("query", [b"", b"owner_id=o-1&limit=5", b"owner_id=%C3%A9", b"q=a+b&r=%20", b"flag"])
def test_good_query_strings_pass(query: bytes) -> None:
    check_query(query)
