"""The plain-ASGI debit path (CENTIME_FAST_DEBITS=true) answers what it does
on its own (headers, API key, body size and chunks, query, routing, owners,
answers) as the Litestar handler does: the status and code each case
expects, and the same headers and problem+json body byte for byte, a
request id on each; and both count their answers in /metrics under the same
route template."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as redis
from conftest import Keys, Server, auth, new_wallet, start_server, stop_server

from centime.auth import Scope, create_api_key
from centime.settings import Settings
from wallet.cache import Cache

FUNDED_MICROS = 1_000_000
DEBIT = "/v1/wallets/{w}/debits"
OVER_64_KIB = json.dumps({"amount_micros": 1, "description": "d" * (65 * 1024)}).encode()
IGNORED_HEADERS = {"date", "server", "content-length"}
MADE_REQUEST_ID = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")


@dataclass(frozen=True)
class Ctx:
    wallet: str
    key: str  # a fresh Idempotency-Key
    keys: Keys
    missing: str = field(default_factory=lambda: str(uuid.uuid4()))
    owned: str = ""  # a debit key that sees the wallet's owner (OWNER_CASES only)
    stranger: str = ""  # a debit key that sees another owner only


@dataclass(frozen=True)
class Req:
    json: Any = None  # encoded with json.dumps unless `content` is given
    content: bytes | None = None
    chunked: bool = False  # stream `content` without a Content-Length
    path: str = DEBIT
    headers: tuple[tuple[str, str | bytes], ...] | None = None  # None: debit key and ctx.key


Build = Callable[[Ctx], list[Req]]
ONE = {"amount_micros": 1}
BODY = {"amount_micros": 1_500, "description": "completion", "metadata": {"model": "m1"}}


def hdrs(authorization: str | None, idempotency_key: str | None) -> tuple[tuple[str, str], ...]:
    pairs = [("Authorization", authorization), ("Idempotency-Key", idempotency_key)]
    return tuple((k, v) for k, v in pairs if v is not None)


def utf8_key(c: Ctx) -> bytes:
    """146 characters, 276 bytes in UTF-8: over the limit when read as latin-1 bytes."""
    return (c.key + "\u00e9" * 130).encode()


def one(**kw: Any) -> Build:
    """A single request; `authorization`/`idempotency_key` may name ctx fields via {braces}."""
    authorization = kw.pop("authorization", "Bearer {keys.debit}")
    idempotency_key = kw.pop("idempotency_key", "{key}")

    def build(c: Ctx) -> list[Req]:
        names = {"keys": c.keys, "key": c.key, "owned": c.owned, "stranger": c.stranger}
        a = None if authorization is None else authorization.format(**names)
        i = None if idempotency_key is None else idempotency_key.format(**names)
        return [Req(headers=hdrs(a, i), **kw)]

    return build


@dataclass(frozen=True)
class Case:
    build: Build
    expect: tuple[str, ...]  # per request: its status, and the problem's code: "201", "401 unauthorized"
    frozen: bool = False  # the wallet frozen first


# What each route does on its own: the headers it takes, the API key, the
# body's size and chunks, the query check, the routing, the order of the
# checks, the owners, the answer. What a request says (the Idempotency-Key's
# bounds, the body) is read by one function for both (wallet.api.read_debit),
# tested on the fast route in tests/e2e/test_bad_input.py and alone in
# tests/unit/test_debit_reader.py.
CASES: dict[str, Case] = {
    "success": Case(one(json=BODY), ("201",)),
    "replay": Case(lambda c: [Req(json=BODY), Req(json=BODY)], ("201", "201")),
    "same-key-other-body": Case(
        lambda c: [Req(json=BODY), Req(json={**BODY, "amount_micros": 1_501})],
        ("201", "409 idempotency_conflict"),
    ),
    "insufficient-funds": Case(one(json={"amount_micros": FUNDED_MICROS + 1}), ("402 insufficient_funds",)),
    "frozen-wallet": Case(one(json=ONE), ("409 wallet_frozen",), frozen=True),
    "no-authorization": Case(one(json=ONE, authorization=None), ("401 unauthorized",)),
    "basic-scheme": Case(one(json=ONE, authorization="Basic dXNlcjpwYXNz"), ("401 unauthorized",)),
    "lowercase-bearer": Case(one(json=ONE, authorization="bearer {keys.debit}"), ("201",)),
    "unknown-key": Case(one(json=ONE, authorization="Bearer ck_not_a_key"), ("401 unauthorized",)),
    "read-scope-key": Case(one(json=ONE, authorization="Bearer {keys.read}"), ("403 forbidden",)),
    "bad-then-good-authorization": Case(
        lambda c: [
            Req(json=ONE, headers=(("Authorization", "Bearer ck_bad"), *auth(c.keys.debit, c.key).items()))
        ],
        ("401 unauthorized",),
    ),
    "empty-then-real-idempotency-key": Case(
        lambda c: [Req(json=ONE, headers=(*auth(c.keys.debit, "").items(), ("Idempotency-Key", c.key)))],
        ("400 invalid_request",),
    ),
    "two-idempotency-keys": Case(
        lambda c: [Req(json=ONE, headers=(*auth(c.keys.debit, c.key).items(), ("Idempotency-Key", "k2")))],
        ("201",),
    ),
    "idempotency-key-utf8-276-bytes": Case(
        lambda c: [Req(json=ONE, headers=(*auth(c.keys.debit).items(), ("Idempotency-Key", utf8_key(c))))],
        ("400 invalid_request",),
    ),
    "no-idempotency-key": Case(one(json=ONE, idempotency_key=None), ("400 invalid_request",)),
    "no-idempotency-key-and-a-query": Case(
        one(json=ONE, idempotency_key=None, path=DEBIT + "?note=x"), ("400 invalid_request",)
    ),
    "read-key-and-no-idempotency-key": Case(
        one(json=ONE, authorization="Bearer {keys.read}", idempotency_key=None), ("403 forbidden",)
    ),
    "no-authorization-and-huge-body": Case(
        one(content=OVER_64_KIB, authorization=None), ("401 unauthorized",)
    ),
    "over-64KiB": Case(one(content=OVER_64_KIB), ("413 payload_too_large",)),
    "over-64KiB-chunked": Case(one(content=OVER_64_KIB, chunked=True), ("413 payload_too_large",)),
    "over-64KiB-and-no-idempotency-key": Case(
        one(content=OVER_64_KIB, idempotency_key=None), ("413 payload_too_large",)
    ),
    "over-64KiB-and-bad-wallet-id": Case(
        one(content=OVER_64_KIB, path="/v1/wallets/nope/debits"), ("413 payload_too_large",)
    ),
    "small-body-chunked": Case(one(content=json.dumps(ONE).encode(), chunked=True), ("201",)),
    "malformed-json-and-bad-wallet-id": Case(
        one(content=b"{", path="/v1/wallets/nope/debits"), ("400 invalid_request",)
    ),
    "query-nul": Case(one(json=ONE, path=DEBIT + "?x=%00"), ("400 invalid_request",)),
    "query-not-utf8": Case(one(json=ONE, path=DEBIT + "?note=%E9"), ("400 invalid_request",)),
    "query-nul-and-no-authorization": Case(
        one(json=ONE, path=DEBIT + "?x=%00", authorization=None), ("400 invalid_request",)
    ),
    "query-good": Case(one(json=ONE, path=DEBIT + "?note=%C3%A9"), ("201",)),
    "wallet-id-not-uuid": Case(
        one(json=ONE, path="/v1/wallets/not-a-uuid/debits"), ("404 wallet_not_found",)
    ),
    "unknown-wallet": Case(one(json=ONE, path="/v1/wallets/{missing}/debits"), ("404 wallet_not_found",)),
    "trailing-slash": Case(one(json=ONE, path=DEBIT + "/"), ("201",)),
    "owner-key-own-wallet": Case(one(json=BODY, authorization="Bearer {owned}"), ("201",)),
    "owner-key-replay": Case(
        lambda c: [Req(json=BODY, headers=hdrs(f"Bearer {c.owned}", c.key))] * 2, ("201", "201")
    ),
    "owner-key-other-owners-wallet": Case(
        one(json=ONE, authorization="Bearer {stranger}"), ("404 wallet_not_found",)
    ),
    "owner-key-missing-wallet": Case(
        one(json=ONE, authorization="Bearer {owned}", path="/v1/wallets/{missing}/debits"),
        ("404 wallet_not_found",),
    ),
    "owner-key-other-owners-frozen-wallet": Case(
        one(json=ONE, authorization="Bearer {stranger}"), ("404 wallet_not_found",), frozen=True
    ),
    "owner-key-bad-body": Case(
        one(content=b"{", authorization="Bearer {stranger}"), ("400 invalid_request",)
    ),
}
OWNER_CASES = {name for name in CASES if name.startswith("owner-key-")}


@pytest.fixture(scope="module")
def framework_server(settings: Settings) -> Iterator[Server]:
    """The same database and Redis prefix, debits served by Litestar."""
    running = start_server(settings, CENTIME_FAST_DEBITS="false")
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
async def clients(server: Server, framework_server: Server) -> AsyncIterator[list[httpx.AsyncClient]]:
    async with (
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as fast,
        httpx.AsyncClient(base_url=framework_server.base_url, timeout=30) as framework,
    ):
        yield [fast, framework]


async def freeze(settings: Settings, wallet_id: str) -> None:
    """Frozen in the ledger and in Redis, as a dispute leaves it."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("UPDATE wallets SET status = 'frozen' WHERE id = $1", uuid.UUID(wallet_id))
    finally:
        await conn.close()
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        cache = Cache(client, prefix=settings.redis_prefix, partition_count=settings.partition_count)
        await client.hset(cache.wallet_key(uuid.UUID(wallet_id)), "s", "frozen")
    finally:
        await client.aclose()


async def send(http: httpx.AsyncClient, c: Ctx, req: Req) -> httpx.Response:
    content = req.content if req.content is not None else json.dumps(req.json).encode()
    headers = list(req.headers if req.headers is not None else auth(c.keys.debit, c.key).items())
    if req.chunked:
        whole = content

        async def chunks() -> AsyncIterator[bytes]:
            for at in range(0, len(whole), 8192):
                yield whole[at : at + 8192]

        body: Any = chunks()
    else:
        body = content
    path = req.path.format(w=c.wallet, missing=c.missing)
    return await http.post(path, content=body, headers=[*headers, ("Content-Type", "application/json")])


def normalized(response: httpx.Response, c: Ctx) -> tuple[int, list[tuple[str, str]], Any, str]:
    """What must be equal on both paths, parsed and byte for byte: the
    per-server wallet, key and entry ids and times replaced, and the request
    id (made per request, so never equal) replaced once it has its form."""
    assert response.headers.get("content-length") == str(len(response.content)), response.headers
    request_id = response.headers.get("x-request-id", "")
    assert MADE_REQUEST_ID.fullmatch(request_id), response.headers
    headers = sorted(
        (k, "<request-id>" if k == "x-request-id" else v)
        for k, v in response.headers.multi_items()
        if k not in IGNORED_HEADERS
    )
    text = response.text.replace(request_id, "<request-id>")
    body: Any = None
    if response.headers.get("content-type", "").split(";")[0].endswith("json"):
        body = json.loads(text)
        if response.status_code == 201:
            text = text.replace(body["id"], "<id>").replace(body["created_at"], "<created_at>")
    for value, placeholder in ((c.wallet, "<wallet>"), (c.key, "<key>"), (c.missing, "<missing>")):
        text = text.replace(value, placeholder)
    return response.status_code, headers, json.loads(text) if body is not None else None, text


async def owner_key(settings: Settings, owner_id: str, scope: Scope = "debit") -> str:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return (await create_api_key(conn, "fast-owner", scope, [owner_id, "another-owner"]))[1]
    finally:
        await conn.close()


async def context(http: httpx.AsyncClient, keys: Keys, settings: Settings, *, owners: bool) -> Ctx:
    c = Ctx(await new_wallet(http, keys, funded_micros=FUNDED_MICROS), secrets.token_hex(8), keys)
    if not owners:
        return c
    owner_id = (await http.get(f"/v1/wallets/{c.wallet}", headers=auth(keys.read))).json()["owner_id"]
    return Ctx(
        c.wallet,
        c.key,
        keys,
        c.missing,
        owned=await owner_key(settings, owner_id),
        stranger=await owner_key(settings, f"stranger-{secrets.token_hex(4)}"),
    )


@pytest.mark.parametrize("name", CASES)
async def test_both_paths_answer_alike(
    name: str, clients: list[httpx.AsyncClient], keys: Keys, settings: Settings
) -> None:
    case = CASES[name]
    answers = []
    for http in clients:
        c = await context(http, keys, settings, owners=name in OWNER_CASES)
        if case.frozen:
            await freeze(settings, c.wallet)
        answers.append([normalized(await send(http, c, req), c) for req in case.build(c)])
    fast, framework = answers
    assert fast == framework, f"\nfast:      {fast}\nframework: {framework}"
    assert tuple(status_and_code(answer) for answer in fast) == case.expect, fast


def status_and_code(answer: tuple[int, list[tuple[str, str]], Any, str]) -> str:
    status, _, body, _ = answer
    return f"{status} {body['code']}" if status >= 400 else str(status)


def debits_201(metrics_text: str) -> float:
    found = re.search(
        r'^centime_requests_total\{method="POST",route="/v1/wallets/\{wallet_id\}/debits",status="201"\} (\S+)$',
        metrics_text,
        re.M,
    )
    return float(found[1]) if found else 0.0


@pytest.mark.parametrize("path", ["fast", "framework"])
async def test_both_paths_count_debits_by_route(
    path: str, clients: list[httpx.AsyncClient], keys: Keys
) -> None:
    http = clients[0 if path == "fast" else 1]
    wallet_id = await new_wallet(http, keys, funded_micros=FUNDED_MICROS)
    before = debits_201((await http.get("/metrics")).text)
    response = await http.post(
        DEBIT.format(w=wallet_id), json=ONE, headers=auth(keys.debit, secrets.token_hex(8))
    )
    assert response.status_code == 201, response.text
    after = debits_201((await http.get("/metrics")).text)
    assert after == before + 1


async def test_another_owners_wallet_answers_as_a_missing_one(
    clients: list[httpx.AsyncClient], keys: Keys, settings: Settings
) -> None:
    """On the fast path, byte for byte, but for the id."""
    fast = clients[0]
    c = await context(fast, keys, settings, owners=True)
    other = await send(fast, c, one(json=ONE, authorization="Bearer {stranger}")(c)[0])
    missing = await send(fast, c, one(json=ONE, path="/v1/wallets/{missing}/debits")(c)[0])
    assert other.status_code == 404
    assert other.content.replace(c.wallet.encode(), b"<id>") == missing.content.replace(
        c.missing.encode(), b"<id>"
    )
    wallet = await fast.get(f"/v1/wallets/{c.wallet}", headers=auth(keys.read))
    assert wallet.json()["balance_micros"] == FUNDED_MICROS
