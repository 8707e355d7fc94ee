"""The plain-ASGI debit path (CENTIME_FAST_DEBITS=true) answers every request,
good or bad, exactly as the Litestar handler does: same status, headers and
problem+json body, keys that name owners included, a request id on each;
and both count their answers in /metrics under the same route template."""

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


CASES: dict[str, tuple[Build, bool]] = {  # name: (build, frozen wallet)
    "success": (one(json=BODY), False),
    "replay": (lambda c: [Req(json=BODY), Req(json=BODY)], False),
    "same-key-other-body": (lambda c: [Req(json=BODY), Req(json={**BODY, "amount_micros": 1_501})], False),
    "insufficient-funds": (one(json={"amount_micros": FUNDED_MICROS + 1}), False),
    "frozen-wallet": (one(json=ONE), True),
    "no-authorization": (one(json=ONE, authorization=None), False),
    "basic-scheme": (one(json=ONE, authorization="Basic dXNlcjpwYXNz"), False),
    "lowercase-bearer": (one(json=ONE, authorization="bearer {keys.debit}"), False),
    "unknown-key": (one(json=ONE, authorization="Bearer ck_not_a_key"), False),
    "read-scope-key": (one(json=ONE, authorization="Bearer {keys.read}"), False),
    "bad-then-good-authorization": (
        lambda c: [
            Req(json=ONE, headers=(("Authorization", "Bearer ck_bad"), *auth(c.keys.debit, c.key).items()))
        ],
        False,
    ),
    "empty-then-real-idempotency-key": (
        lambda c: [Req(json=ONE, headers=(*auth(c.keys.debit, "").items(), ("Idempotency-Key", c.key)))],
        False,
    ),
    "two-idempotency-keys": (
        lambda c: [Req(json=ONE, headers=(*auth(c.keys.debit, c.key).items(), ("Idempotency-Key", "k2")))],
        False,
    ),
    "idempotency-key-utf8-276-bytes": (
        lambda c: [Req(json=ONE, headers=(*auth(c.keys.debit).items(), ("Idempotency-Key", utf8_key(c))))],
        False,
    ),
    "no-idempotency-key": (one(json=ONE, idempotency_key=None), False),
    "empty-idempotency-key": (one(json=ONE, idempotency_key=""), False),
    "idempotency-key-256-chars": (one(json=ONE, idempotency_key="i" * 256), False),
    "idempotency-key-255-chars": (one(json=ONE, idempotency_key="{key}" + "i" * (255 - 16)), False),
    "read-key-and-no-idempotency-key": (
        one(json=ONE, authorization="Bearer {keys.read}", idempotency_key=None),
        False,
    ),
    "no-authorization-and-huge-body": (one(content=OVER_64_KIB, authorization=None), False),
    "over-64KiB": (one(content=OVER_64_KIB), False),
    "over-64KiB-chunked": (one(content=OVER_64_KIB, chunked=True), False),
    "over-64KiB-and-no-idempotency-key": (one(content=OVER_64_KIB, idempotency_key=None), False),
    "over-64KiB-and-bad-wallet-id": (one(content=OVER_64_KIB, path="/v1/wallets/nope/debits"), False),
    "small-body-chunked": (one(content=json.dumps(ONE).encode(), chunked=True), False),
    "empty-body": (one(content=b""), False),
    "malformed-json": (one(content=b'{"amount_micros": 1,'), False),
    "malformed-json-and-bad-wallet-id": (one(content=b"{", path="/v1/wallets/nope/debits"), False),
    "unknown-field": (one(json={**ONE, "currency": "usd"}), False),
    "amount-0": (one(json={"amount_micros": 0}), False),
    "amount-2**53": (one(json={"amount_micros": 2**53}), False),
    "amount-string": (one(json={"amount_micros": "5"}), False),
    "description-nul": (one(json={**ONE, "description": "a\u0000b"}), False),
    "metadata-21-keys": (one(json={**ONE, "metadata": {f"k{i}": "v" for i in range(21)}}), False),
    "body-not-utf8": (one(content=b'{"amount_micros": 1, "description": "\xff"}'), False),
    "amount-twice": (one(content=b'{"amount_micros": 1, "amount_micros": 2}'), False),
    "metadata-key-twice": (one(content=b'{"amount_micros": 1, "metadata": {"k": "a", "k": "b"}}'), False),
    "query-nul": (one(json=ONE, path=DEBIT + "?x=%00"), False),
    "query-not-utf8": (one(json=ONE, path=DEBIT + "?note=%E9"), False),
    "query-nul-and-no-authorization": (one(json=ONE, path=DEBIT + "?x=%00", authorization=None), False),
    "query-good": (one(json=ONE, path=DEBIT + "?note=%C3%A9"), False),
    "wallet-id-not-uuid": (one(json=ONE, path="/v1/wallets/not-a-uuid/debits"), False),
    "unknown-wallet": (one(json=ONE, path="/v1/wallets/{missing}/debits"), False),
    "trailing-slash": (one(json=ONE, path=DEBIT + "/"), False),
    "owner-key-own-wallet": (one(json=BODY, authorization="Bearer {owned}"), False),
    "owner-key-replay": (
        lambda c: [Req(json=BODY, headers=hdrs(f"Bearer {c.owned}", c.key))] * 2,
        False,
    ),
    "owner-key-other-owners-wallet": (one(json=ONE, authorization="Bearer {stranger}"), False),
    "owner-key-missing-wallet": (
        one(json=ONE, authorization="Bearer {owned}", path="/v1/wallets/{missing}/debits"),
        False,
    ),
    "owner-key-other-owners-frozen-wallet": (one(json=ONE, authorization="Bearer {stranger}"), True),
    "owner-key-bad-body": (one(content=b"{", authorization="Bearer {stranger}"), False),
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
    build, frozen = CASES[name]
    answers = []
    for http in clients:
        c = await context(http, keys, settings, owners=name in OWNER_CASES)
        if frozen:
            await freeze(settings, c.wallet)
        answers.append([normalized(await send(http, c, req), c) for req in build(c)])
    fast, framework = answers
    assert fast == framework, f"\nfast:      {fast}\nframework: {framework}"


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
