"""Bad input to every route is answered with RFC 9457 problem+json: the right
status, a stable `code`, a `detail` that names the offending field, and
never a 500 or a stack trace. And none of it charges anything."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import Keys, Server, auth, new_wallet

FUNDED_MICROS = 5_000_000
MAX = 2**53 - 1

# Path placeholders, filled per module:
#   {w}       a wallet funded with FUNDED_MICROS: a bad request that slips
#             through validation would charge it
#   {empty}   a wallet with balance 0: a request valid on the schema level
#             answers 402 there, proving it passed validation without charging
#   {lenient} another funded wallet, for number forms that are not JSON
#             integers ("1", 1.0, 1e3): a lax decoder would coerce and
#             charge them, so its balance is checked apart (see the end)
#   {missing} a well-formed UUID that names no wallet
DEBIT = "/v1/wallets/{w}/debits"
CREDIT = "/v1/wallets/{w}/credits"
EMPTY_DEBIT = "/v1/wallets/{empty}/debits"
WALLETS = "/v1/wallets"
WALLET = "/v1/wallets/{w}"
ENTRIES = "/v1/wallets/{w}/entries"
LENIENT_DEBIT = "/v1/wallets/{lenient}/debits"
LENIENT_CREDIT = "/v1/wallets/{lenient}/credits"

OMIT: Any = object()
AUTO: Any = object()


@dataclass(frozen=True)
class Bad:
    method: str
    path: str
    status: int
    code: str
    detail_has: tuple[str, ...] = ()
    json: Any = OMIT  # encoded with json.dumps
    content: bytes | None = None  # a raw body instead of `json`
    content_type: str | None = "application/json"
    key: str | None = "debit"  # the API key's scope, or None: no Authorization header
    authorization: str | None = None  # a raw Authorization header, instead of `key`
    idempotency_key: Any = AUTO  # AUTO: a fresh key on debits and credits; None: no header
    params: dict[str, Any] | None = None


def case(id: str, method: str, path: str, status: int, code: str, *detail_has: str, bug: str = "", **kw: Any):
    marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {bug}")] if bug else []
    return pytest.param(Bad(method, path, status, code, tuple(detail_has), **kw), id=id, marks=marks)


def bad_debit(id: str, *detail_has: str, path: str = DEBIT, bug: str = "", **kw: Any):
    return case(id, "POST", path, 400, "invalid_request", *detail_has, bug=bug, **kw)


def bad_credit(id: str, *detail_has: str, path: str = CREDIT, bug: str = "", **kw: Any):
    return case(id, "POST", path, 400, "invalid_request", *detail_has, key="admin", bug=bug, **kw)


def bad_wallet(id: str, *detail_has: str, bug: str = "", **kw: Any):
    return case(id, "POST", WALLETS, 400, "invalid_request", *detail_has, key="admin", bug=bug, **kw)


def bad_read(id: str, path: str, *detail_has: str, key: str | None = "read", **kw: Any):
    return case(id, "GET", path, 400, "invalid_request", *detail_has, key=key, **kw)


def accepted_debit(id: str, bug: str = "", **kw: Any):
    """Valid on the schema level: on the empty wallet it is refused for funds."""
    return case(id, "POST", EMPTY_DEBIT, 402, "insufficient_funds", bug=bug, **kw)


def _new_owner() -> str:
    return f"owner-{uuid.uuid4().hex[:12]}"


ONE = {"amount_micros": 1}
META_20 = {f"k{i}": "v" for i in range(20)}
META_21 = {f"k{i}": "v" for i in range(21)}

CASES = [
    # --- The body is not a JSON object ------------------------------------
    bad_debit("debit-malformed-json", content=b'{"amount_micros": 1,'),
    bad_debit("debit-malformed-json-single-quotes", content=b"{'amount_micros': 1}"),
    bad_debit("debit-empty-body", "body", content=b""),
    bad_debit("debit-json-list", json=[1]),
    bad_debit("debit-json-empty-list", json=[]),
    bad_debit("debit-json-string", json="amount_micros"),
    bad_debit("debit-json-null", json=None),
    bad_debit("debit-json-number", json=1),
    bad_credit("credit-malformed-json", content=b'{"amount_micros": 1, "reason": '),
    bad_credit("credit-empty-body", "body", content=b""),
    bad_credit("credit-json-list", json=[]),
    bad_credit("credit-json-null", json=None),
    bad_wallet("wallet-malformed-json", content=b'{"owner_id": "o"'),
    bad_wallet("wallet-empty-body", "body", content=b""),
    bad_wallet("wallet-json-list", json=[]),
    bad_wallet("wallet-json-string", json="usd"),
    bad_wallet("wallet-json-null", json=None),
    # --- Not UTF-8, or a key twice ----------------------------------------
    bad_debit("debit-body-not-utf8", "UTF-8", content=b'{"amount_micros": 1, "description": "\xff"}'),
    bad_debit("debit-key-not-utf8", "UTF-8", content=b'{"amount_micros": 1, "metadata": {"\xc3": "v"}}'),
    bad_debit("debit-lone-surrogate", content=b'{"amount_micros": 1, "description": "\\ud800"}'),
    bad_credit("credit-body-not-utf8", "UTF-8", content=b'{"amount_micros": 1, "reason": "\xe9t\xe9"}'),
    bad_wallet("wallet-body-not-utf8", "UTF-8", content=b'{"owner_id": "\xff", "currency": "usd"}'),
    bad_debit("debit-amount-twice", "amount_micros", content=b'{"amount_micros": 1, "amount_micros": 2}'),
    bad_debit(
        "debit-amount-twice-escaped",
        "amount_micros",
        content=b'{"amount_micros": 1, "\\u0061mount_micros": 2}',
    ),
    bad_debit(
        "debit-metadata-key-twice",
        "'k'",
        content=b'{"amount_micros": 1, "metadata": {"k": "a", "k": "b"}}',
    ),
    bad_credit(
        "credit-reason-twice", "reason", content=b'{"amount_micros": 1, "reason": "a", "reason": "b"}'
    ),
    bad_wallet(
        "wallet-currency-twice",
        "currency",
        content=b'{"owner_id": "o-twice", "currency": "usd", "currency": "eur"}',
    ),
    # --- Unknown and missing fields ---------------------------------------
    bad_debit("debit-unknown-field-typo", "amountt_micros", json={"amountt_micros": 1}),
    bad_debit("debit-unknown-extra-field", "currency", json={"amount_micros": 1, "currency": "usd"}),
    bad_debit("debit-missing-amount", "amount_micros", json={"description": "x"}),
    bad_debit("debit-empty-object", "amount_micros", json={}),
    bad_credit("credit-unknown-field", "description", json={**ONE, "reason": "r", "description": "d"}),
    bad_credit("credit-missing-reason", "reason", json=ONE),
    bad_wallet(
        "wallet-unknown-field",
        "balance_micros",
        json={"owner_id": _new_owner(), "currency": "usd", "balance_micros": 5},
    ),
    bad_wallet("wallet-missing-currency", "currency", json={"owner_id": _new_owner()}),
    bad_wallet("wallet-missing-owner", "owner_id", json={"currency": "usd"}),
    # --- amount_micros: wrong types ---------------------------------------
    bad_debit("amount-string-word", "amount_micros", json={"amount_micros": "abc"}),
    bad_debit("amount-string-digits", "amount_micros", path=LENIENT_DEBIT, json={"amount_micros": "1"}),
    bad_debit("amount-float-fraction", "amount_micros", json={"amount_micros": 1.5}),
    bad_debit("amount-float-integral", "amount_micros", path=LENIENT_DEBIT, json={"amount_micros": 1.0}),
    bad_debit(
        "amount-float-exponent",
        "amount_micros",
        path=LENIENT_DEBIT,
        content=b'{"amount_micros": 1e3}',
    ),
    bad_debit("amount-bool", "amount_micros", json={"amount_micros": True}),
    bad_debit("amount-null", "amount_micros", json={"amount_micros": None}),
    bad_debit("amount-object", "amount_micros", json={"amount_micros": {"value": 1}}),
    bad_credit(
        "credit-amount-string-digits",
        "amount_micros",
        path=LENIENT_CREDIT,
        json={"amount_micros": "1", "reason": "r"},
    ),
    # --- amount_micros: out of bounds -------------------------------------
    bad_debit("amount-zero", "amount_micros", json={"amount_micros": 0}),
    bad_debit("amount-negative", "amount_micros", json={"amount_micros": -1}),
    bad_debit("amount-2**53", "amount_micros", json={"amount_micros": 2**53}),
    bad_debit("amount-10**30", "amount_micros", json={"amount_micros": 10**30}),
    bad_debit("amount-minus-10**30", "amount_micros", json={"amount_micros": -(10**30)}),
    bad_credit("credit-amount-zero", "amount_micros", json={"amount_micros": 0, "reason": "r"}),
    bad_credit("credit-amount-negative", "amount_micros", json={"amount_micros": -5, "reason": "r"}),
    bad_credit("credit-amount-2**53", "amount_micros", json={"amount_micros": 2**53, "reason": "r"}),
    # Well-formed, refused for the wallet's state (its balance): 422, not 400.
    case(
        "credit-balance-overflow",
        "POST",
        CREDIT,
        422,
        "balance_too_large",
        "amount_micros",
        key="admin",
        json={"amount_micros": MAX, "reason": "r"},
    ),
    accepted_debit("amount-2**53-1-is-valid", json={"amount_micros": MAX}),
    # --- description / reason ---------------------------------------------
    bad_debit("description-1001-chars", "description", json={**ONE, "description": "d" * 1001}),
    bad_debit("description-not-string", "description", json={**ONE, "description": 7}),
    # Postgres text cannot hold NUL: refused at the door, never in a shared commit.
    bad_debit("description-with-nul", "description", json={**ONE, "description": "a\u0000b"}),
    bad_debit("metadata-value-with-nul", "metadata", json={**ONE, "metadata": {"k": "\u0000"}}),
    bad_debit("metadata-key-with-nul", "metadata", json={**ONE, "metadata": {"k\u0000": "v"}}),
    accepted_debit("description-1000-chars-is-valid", json={**ONE, "description": "d" * 1000}),
    bad_credit("reason-empty", "reason", json={**ONE, "reason": ""}),
    bad_credit("reason-1001-chars", "reason", json={**ONE, "reason": "r" * 1001}),
    # --- metadata ---------------------------------------------------------
    bad_debit("metadata-21-keys", "metadata", json={**ONE, "metadata": META_21}),
    bad_debit("metadata-int-value", "metadata", json={**ONE, "metadata": {"a": 1}}),
    bad_debit("metadata-bool-value", "metadata", json={**ONE, "metadata": {"a": True}}),
    bad_debit("metadata-null-value", "metadata", json={**ONE, "metadata": {"a": None}}),
    bad_debit("metadata-nested-object", "metadata", json={**ONE, "metadata": {"a": {"b": "c"}}}),
    bad_debit("metadata-list-value", "metadata", json={**ONE, "metadata": {"a": ["b"]}}),
    bad_debit("metadata-key-41-chars", "metadata", json={**ONE, "metadata": {"k" * 41: "v"}}),
    bad_debit("metadata-empty-key", "metadata", json={**ONE, "metadata": {"": "v"}}),
    bad_debit("metadata-value-501-chars", "metadata", json={**ONE, "metadata": {"k": "v" * 501}}),
    bad_debit("metadata-is-list", "metadata", json={**ONE, "metadata": [["k", "v"]]}),
    bad_debit("metadata-is-string", "metadata", json={**ONE, "metadata": "k=v"}),
    bad_credit("credit-metadata-21-keys", "metadata", json={**ONE, "reason": "r", "metadata": META_21}),
    accepted_debit("metadata-20-keys-is-valid", json={**ONE, "metadata": META_20}),
    accepted_debit(
        "metadata-40-char-key-500-char-value-is-valid", json={**ONE, "metadata": {"k" * 40: "v" * 500}}
    ),
    # --- Idempotency-Key --------------------------------------------------
    bad_debit("idempotency-key-missing", "Idempotency-Key", json=ONE, idempotency_key=None),
    bad_debit("idempotency-key-empty", "Idempotency-Key", json=ONE, idempotency_key=""),
    bad_debit("idempotency-key-256-chars", "Idempotency-Key", json=ONE, idempotency_key="i" * 256),
    bad_credit(
        "credit-idempotency-key-missing", "Idempotency-Key", json={**ONE, "reason": "r"}, idempotency_key=None
    ),
    accepted_debit("idempotency-key-255-chars-is-valid", json=ONE, idempotency_key="i" * 255),
    # --- Authorization: 401 before anything else --------------------------
    case("debit-no-authorization", "POST", DEBIT, 401, "unauthorized", json=ONE, key=None),
    case(
        "debit-basic-auth", "POST", DEBIT, 401, "unauthorized", json=ONE, authorization="Basic dXNlcjpwYXNz"
    ),
    case("debit-bearer-no-key", "POST", DEBIT, 401, "unauthorized", json=ONE, authorization="Bearer"),
    case(
        "debit-bearer-bad-scheme", "POST", DEBIT, 401, "unauthorized", json=ONE, authorization="Token {debit}"
    ),
    case(
        "debit-unknown-key", "POST", DEBIT, 401, "unauthorized", json=ONE, authorization="Bearer ck_not_a_key"
    ),
    case(
        "debit-key-129-chars",
        "POST",
        DEBIT,
        401,
        "unauthorized",
        json=ONE,
        authorization="Bearer " + "k" * 129,
    ),
    case(
        "debit-key-8k-chars",
        "POST",
        DEBIT,
        401,
        "unauthorized",
        json=ONE,
        authorization="Bearer " + "k" * 8000,
    ),
    case(
        "debit-no-auth-bad-body", "POST", DEBIT, 401, "unauthorized", json={"amountt_micros": "x"}, key=None
    ),
    case(
        "credit-no-authorization", "POST", CREDIT, 401, "unauthorized", json={**ONE, "reason": "r"}, key=None
    ),
    case(
        "wallet-create-no-authorization",
        "POST",
        WALLETS,
        401,
        "unauthorized",
        json={"owner_id": _new_owner(), "currency": "usd"},
        key=None,
    ),
    case("wallet-get-no-authorization", "GET", WALLET, 401, "unauthorized", key=None),
    case(
        "wallet-list-no-authorization",
        "GET",
        WALLETS,
        401,
        "unauthorized",
        key=None,
        params={"owner_id": "o"},
    ),
    case("entries-no-authorization", "GET", ENTRIES, 401, "unauthorized", key=None),
    case("wallet-get-unknown-key", "GET", WALLET, 401, "unauthorized", authorization="Bearer ck_not_a_key"),
    # --- Authorization: 403 for the wrong scope ---------------------------
    case("debit-with-read-key", "POST", DEBIT, 403, "forbidden", json=ONE, key="read"),
    case("credit-with-debit-key", "POST", CREDIT, 403, "forbidden", json={**ONE, "reason": "r"}, key="debit"),
    case("credit-with-read-key", "POST", CREDIT, 403, "forbidden", json={**ONE, "reason": "r"}, key="read"),
    case(
        "wallet-create-with-debit-key",
        "POST",
        WALLETS,
        403,
        "forbidden",
        json={"owner_id": _new_owner(), "currency": "usd"},
        key="debit",
    ),
    case(
        "wallet-create-with-read-key",
        "POST",
        WALLETS,
        403,
        "forbidden",
        json={"owner_id": _new_owner(), "currency": "usd"},
        key="read",
    ),
    # --- Wallet creation --------------------------------------------------
    bad_wallet("currency-upper-case", "currency", json={"owner_id": _new_owner(), "currency": "USD"}),
    bad_wallet("currency-two-letters", "currency", json={"owner_id": _new_owner(), "currency": "us"}),
    bad_wallet("currency-unsupported", "currency", json={"owner_id": _new_owner(), "currency": "xyz"}),
    bad_wallet("currency-number", "currency", json={"owner_id": _new_owner(), "currency": 123}),
    bad_wallet("currency-empty", "currency", json={"owner_id": _new_owner(), "currency": ""}),
    bad_wallet("owner-id-empty", "owner_id", json={"owner_id": "", "currency": "usd"}),
    bad_wallet("owner-id-129-chars", "owner_id", json={"owner_id": "o" * 129, "currency": "usd"}),
    bad_wallet("owner-id-number", "owner_id", json={"owner_id": 5, "currency": "usd"}),
    bad_wallet(
        "overdraft-negative",
        "overdraft_limit_micros",
        json={"owner_id": _new_owner(), "currency": "usd", "overdraft_limit_micros": -1},
    ),
    bad_wallet(
        "overdraft-2**53",
        "overdraft_limit_micros",
        json={"owner_id": _new_owner(), "currency": "usd", "overdraft_limit_micros": 2**53},
    ),
    bad_wallet(
        "overdraft-float",
        "overdraft_limit_micros",
        json={"owner_id": _new_owner(), "currency": "usd", "overdraft_limit_micros": 0.5},
    ),
    bad_wallet(
        "overdraft-string-digits",
        "overdraft_limit_micros",
        json={"owner_id": _new_owner(), "currency": "usd", "overdraft_limit_micros": "5"},
    ),
    # --- Listing wallets --------------------------------------------------
    case("wallet-list-no-owner", "GET", WALLETS, 400, "invalid_request", "owner_id", key="read"),
    case(
        "wallet-list-owner-empty",
        "GET",
        WALLETS,
        400,
        "invalid_request",
        "owner_id",
        key="read",
        params={"owner_id": ""},
    ),
    case(
        "wallet-list-owner-129-chars",
        "GET",
        WALLETS,
        400,
        "invalid_request",
        "owner_id",
        key="read",
        params={"owner_id": "o" * 129},
    ),
    # --- Query parameters: NUL or not UTF-8, on any route, named ------------
    bad_read("wallet-list-owner-nul", WALLETS, "owner_id", params={"owner_id": "a\u0000"}),
    bad_read("wallet-list-owner-not-utf8", WALLETS + "?owner_id=%FF", "owner_id"),
    bad_read("wallet-list-owner-cut-utf8", WALLETS + "?owner_id=%C3", "owner_id"),
    bad_read("wallet-get-unknown-param-nul", WALLET + "?x=%00", "x"),
    bad_read("wallet-get-nul-before-authorization", WALLET + "?x=%00", "x", key=None),
    bad_read("entries-limit-nul", ENTRIES + "?limit=1%00", "limit"),
    bad_debit("debit-query-nul", "x", path=DEBIT + "?x=%00", json=ONE),
    bad_debit("debit-query-not-utf8", "note", path=DEBIT + "?note=%E9", json=ONE),
    bad_credit("credit-query-nul", "x", path=CREDIT + "?x=%00", json={**ONE, "reason": "r"}),
    # --- Unknown wallets --------------------------------------------------
    case("wallet-get-unknown", "GET", "/v1/wallets/{missing}", 404, "wallet_not_found", key="read"),
    case("wallet-get-not-uuid", "GET", "/v1/wallets/not-a-uuid", 404, "wallet_not_found", key="read"),
    case(
        "entries-unknown-wallet", "GET", "/v1/wallets/{missing}/entries", 404, "wallet_not_found", key="read"
    ),
    case("entries-not-uuid", "GET", "/v1/wallets/not-a-uuid/entries", 404, "wallet_not_found", key="read"),
    case("debit-unknown-wallet", "POST", "/v1/wallets/{missing}/debits", 404, "wallet_not_found", json=ONE),
    case("debit-not-uuid", "POST", "/v1/wallets/not-a-uuid/debits", 404, "wallet_not_found", json=ONE),
    case(
        "credit-unknown-wallet",
        "POST",
        "/v1/wallets/{missing}/credits",
        404,
        "wallet_not_found",
        json={**ONE, "reason": "r"},
        key="admin",
    ),
    # --- Listing entries --------------------------------------------------
    case("entries-limit-0", "GET", ENTRIES, 400, "invalid_request", "limit", key="read", params={"limit": 0}),
    case(
        "entries-limit-101",
        "GET",
        ENTRIES,
        400,
        "invalid_request",
        "limit",
        key="read",
        params={"limit": 101},
    ),
    case(
        "entries-limit-negative",
        "GET",
        ENTRIES,
        400,
        "invalid_request",
        "limit",
        key="read",
        params={"limit": -1},
    ),
    case(
        "entries-limit-abc",
        "GET",
        ENTRIES,
        400,
        "invalid_request",
        "limit",
        key="read",
        params={"limit": "abc"},
    ),
    case(
        "entries-limit-float",
        "GET",
        ENTRIES,
        400,
        "invalid_request",
        "limit",
        key="read",
        params={"limit": "1.5"},
    ),
    case(
        "entries-starting-after-not-uuid",
        "GET",
        ENTRIES,
        400,
        "invalid_request",
        "starting_after",
        key="read",
        params={"starting_after": "nope"},
    ),
    # --- Size and content type --------------------------------------------
    case(
        "debit-body-over-64KiB",
        "POST",
        DEBIT,
        413,
        "payload_too_large",
        json={**ONE, "description": "d" * (65 * 1024)},
    ),
    case(
        "debit-body-1MiB",
        "POST",
        DEBIT,
        413,
        "payload_too_large",
        json={**ONE, "metadata": {"k": "v" * (1024 * 1024)}},
    ),
    # A JSON body is read as JSON whatever its declared type: pinned.
    accepted_debit("content-type-text-plain-is-read-as-json", json=ONE, content_type="text/plain"),
    accepted_debit("content-type-missing-is-read-as-json", json=ONE, content_type=None),
    bad_debit(
        "content-type-form-urlencoded",
        content=b"amount_micros=1",
        content_type="application/x-www-form-urlencoded",
    ),
    # --- Unknown routes and wrong methods ---------------------------------
    case("unknown-route", "GET", "/v1/nope", 404, "not_found", key="admin"),
    case("unknown-route-unauthenticated", "GET", "/nope", 404, "not_found", key=None),
    case("unknown-subresource", "POST", "/v1/wallets/{w}/refunds", 404, "not_found", json=ONE, key="admin"),
    case("wrong-method-delete-wallet", "DELETE", WALLET, 405, "method_not_allowed", key="admin"),
    case("wrong-method-get-debits", "GET", DEBIT, 405, "method_not_allowed", key="admin"),
    case("wrong-method-put-wallets", "PUT", WALLETS, 405, "method_not_allowed", json={}, key="admin"),
]


@dataclass(frozen=True)
class Wallets:
    funded: str
    empty: str
    lenient: str


@pytest.fixture(scope="module")
async def wallets(server: Server, keys: Keys) -> AsyncIterator[Wallets]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        funded = await new_wallet(http, keys, funded_micros=FUNDED_MICROS)
        empty = await new_wallet(http, keys)
        lenient = await new_wallet(http, keys, funded_micros=FUNDED_MICROS)
        yield Wallets(funded, empty, lenient)


def _request(client: httpx.AsyncClient, bad: Bad, keys: Keys, wallets: Wallets) -> httpx.Request:
    path = bad.path.format(
        w=wallets.funded, empty=wallets.empty, lenient=wallets.lenient, missing=uuid.uuid4()
    )
    headers: dict[str, str] = {}
    if bad.authorization is not None:
        headers["Authorization"] = bad.authorization.format(debit=keys.debit)
    elif bad.key is not None:
        headers.update(auth(getattr(keys, bad.key)))
    idempotency_key = bad.idempotency_key
    if idempotency_key is AUTO:
        posts_entry = bad.method == "POST" and path.partition("?")[0].endswith(("/debits", "/credits"))
        idempotency_key = f"bad-{uuid.uuid4().hex}" if posts_entry else None
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    content = bad.content
    if bad.json is not OMIT:
        content = json.dumps(bad.json).encode()
    if content is not None and bad.content_type is not None:
        headers["Content-Type"] = bad.content_type
    return client.build_request(bad.method, path, headers=headers, content=content, params=bad.params)


_SENT: set[int] = set()  # id() of each case of the table sent this run


async def _send(client: httpx.AsyncClient, bad: Bad, keys: Keys, wallets: Wallets) -> httpx.Response:
    _SENT.add(id(bad))
    return await client.send(_request(client, bad, keys, wallets))


async def _send_the_rest(
    client: httpx.AsyncClient, keys: Keys, wallets: Wallets, placeholders: tuple[str, ...]
) -> int:
    """Send every case of the table aimed at a wallet of `placeholders` that
    this run has not sent yet (all of them when a check runs alone), so the
    check after it always judges the whole table. Returns how many cases aim there."""
    aimed = 0
    for param in CASES:
        bad = param.values[0]
        assert isinstance(bad, Bad)
        if param.marks or not any(p in bad.path for p in placeholders):
            continue  # a case marked as a known bug may charge: it fails on its own
        aimed += 1
        if id(bad) not in _SENT:
            await _send(client, bad, keys, wallets)  # its answer is the table's to judge; its effect is ours
    return aimed


@pytest.mark.parametrize("bad", CASES)
async def test_bad_input_is_a_problem(
    bad: Bad, client: httpx.AsyncClient, keys: Keys, wallets: Wallets
) -> None:
    response = await _send(client, bad, keys, wallets)
    seen = f"{response.status_code} {response.headers.get('content-type')} {response.text[:500]}"

    assert response.status_code < 500, seen
    assert "Traceback" not in response.text, seen
    assert response.headers.get("content-type", "").split(";")[0] == "application/problem+json", seen
    body = response.json()
    assert isinstance(body, dict), seen
    for member in ("type", "title", "status", "code", "detail"):
        assert member in body, seen
    assert isinstance(body["type"], str) and body["type"], seen
    assert isinstance(body["title"], str) and body["title"], seen
    assert isinstance(body["detail"], str), seen
    assert body["status"] == response.status_code, seen
    assert (response.status_code, body["code"]) == (bad.status, bad.code), seen
    for name in bad.detail_has:
        assert name.lower() in body["detail"].lower(), f"detail does not name {name!r}: {seen}"


async def _assert_untouched(
    client: httpx.AsyncClient, keys: Keys, wallet_id: str, funded_micros: int
) -> None:
    wallet = await client.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))
    assert wallet.status_code == 200, wallet.text
    assert wallet.json()["balance_micros"] == funded_micros
    page = await client.get(
        f"/v1/wallets/{wallet_id}/entries", params={"limit": 100}, headers=auth(keys.read)
    )
    assert page.status_code == 200, page.text
    kinds = [e["kind"] for e in page.json()["data"]]
    assert kinds == (["credit"] if funded_micros else []), page.text


async def test_no_bad_input_charged_anything(client: httpx.AsyncClient, keys: Keys, wallets: Wallets) -> None:
    """After the table (sent here for what it did not send): the wallets it
    aimed at hold what they held, and have no entry but their funding."""
    assert await _send_the_rest(client, keys, wallets, ("{w}", "{empty}")) > 0
    await _assert_untouched(client, keys, wallets.funded, FUNDED_MICROS)
    await _assert_untouched(client, keys, wallets.empty, 0)


async def test_no_lenient_number_charged_anything(
    client: httpx.AsyncClient, keys: Keys, wallets: Wallets
) -> None:
    """After the table (sent here for what it did not send): "1", 1.0 and 1e3 amounts charged nothing."""
    assert await _send_the_rest(client, keys, wallets, ("{lenient}",)) > 0
    await _assert_untouched(client, keys, wallets.lenient, FUNDED_MICROS)


async def test_every_route_documents_its_400(client: httpx.AsyncClient) -> None:
    """Any route may answer 400 (a query parameter with NUL or not UTF-8): the schema says so."""
    schema = (await client.get("/schema/openapi.json")).json()
    missing = [
        f"{method.upper()} {path}"
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if "400" not in operation["responses"]
    ]
    assert missing == []
