"""Only Postgres or Redis not answering is 503 `unavailable`: a statement
Postgres refuses (a constraint, a data error) or a command Redis refuses is a
bug, answered 500 `internal_error`, counted, logged with the request's id (which
the answer names), and never described as "nothing was charged". Errors come
from the real servers, not made up."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator
from typing import IO

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as redis
from conftest import Keys, Server, auth, free_port, make_keys, new_wallet, start_server, stop_server

from centime.settings import Settings
from centime.wire import STORAGE_DOWN_DETAIL, problem_answer, storage_unavailable


async def raised_by(conn: asyncpg.Connection, sql: str) -> Exception:
    try:
        await conn.execute(sql)
    except Exception as exc:
        return exc
    raise AssertionError(f"{sql!r} did not fail")


async def test_postgres_refusals_are_500_and_its_timeouts_503(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        refused = [
            await raised_by(conn, "SELECT 1 / 0"),
            await raised_by(conn, "CREATE TEMP TABLE t (n int CHECK (n > 0)); INSERT INTO t VALUES (0)"),
            await raised_by(conn, "SELECT 'x'::uuid"),
            await raised_by(conn, "SELECT * FROM no_such_table"),
        ]
        timed_out = await raised_by(conn, "SET statement_timeout = 10; SELECT pg_sleep(1)")
    finally:
        await conn.close()
    for exc in refused:
        answer = problem_answer(exc)
        assert (answer.status, answer.body["code"]) == (500, "internal_error"), exc
        assert "nothing was charged" not in answer.body["detail"]
    assert isinstance(timed_out, asyncpg.QueryCanceledError)
    assert storage_unavailable(timed_out)
    assert (problem_answer(timed_out).status, problem_answer(timed_out).body["detail"]) == (
        503,
        STORAGE_DOWN_DETAIL,
    )
    try:
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", timeout=2)
    except Exception as exc:
        assert problem_answer(exc).status == 503, exc
    else:
        raise AssertionError("a closed port answered")


async def test_redis_refusals_are_500_and_a_closed_port_503(settings: Settings) -> None:
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    key = f"{settings.redis_prefix}:not-a-number:{secrets.token_hex(4)}"
    try:
        await client.set(key, "abc")
        try:
            await client.incrby(key, 1)
        except redis.ResponseError as exc:
            assert problem_answer(exc).status == 500
        else:
            raise AssertionError("INCRBY of a string succeeded")
    finally:
        await client.delete(key)
        await client.aclose()
    down = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    try:
        await down.ping()
    except redis.ConnectionError as exc:
        assert problem_answer(exc).status == 503
    else:
        raise AssertionError("a closed port answered")
    finally:
        await down.aclose()


@pytest.fixture
async def refusing_server(
    settings: Settings, private_database: str
) -> AsyncIterator[tuple[Server, Keys, IO[bytes]]]:
    """A server whose database refuses wallets of owner 'refused' and ledger
    entries described 'refused' (CHECKs added for the test): the refusals are
    Postgres's own. Its log goes to a file."""
    conn = await asyncpg.connect(private_database)
    try:
        await conn.execute("ALTER TABLE wallets ADD CONSTRAINT refuse_owner CHECK (owner_id <> 'refused')")
        await conn.execute(
            "ALTER TABLE journal_entries ADD CONSTRAINT refuse_entry"
            " CHECK (description IS DISTINCT FROM 'refused')"
        )
    finally:
        await conn.close()
    own = msgspec.structs.replace(
        settings,
        database_url=private_database,
        redis_prefix=f"{settings.redis_prefix}e{secrets.token_hex(3)}",
    )
    with tempfile.TemporaryFile() as log:
        server = start_server(own, log=log)
        try:
            yield server, await make_keys(private_database), log
        finally:
            stop_server(server)


def internal_errors(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('centime_errors_total{code="internal_error"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_constraint_error_over_http_is_500_counted_not_503(
    refusing_server: tuple[Server, Keys, IO[bytes]],
) -> None:
    server, keys, log = refusing_server
    request_id = f"refused-{secrets.token_hex(4)}"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        before = internal_errors((await http.get("/metrics")).text)
        answer = await http.post(
            "/v1/wallets",
            json={"owner_id": "refused", "currency": "usd"},
            headers={**auth(keys.admin), "X-Request-Id": request_id},
        )
        assert answer.status_code == 500, answer.text
        body = answer.json()
        assert body["code"] == "internal_error"
        assert (body["request_id"], answer.headers["x-request-id"]) == (request_id, request_id)
        log.seek(0)
        logged = log.read().decode()
        assert f"ERROR centime: unhandled error request_id={request_id}" in logged, logged[:800]
        assert "CheckViolationError" in logged  # the traceback is in the log, not on the wire
        assert "nothing was charged" not in body["detail"]
        assert "refuse_owner" not in answer.text  # no internals on the wire
        assert internal_errors((await http.get("/metrics")).text) == before + 1
        fine = await http.post(
            "/v1/wallets", json={"owner_id": "fine", "currency": "usd"}, headers=auth(keys.admin)
        )
        assert fine.status_code == 201, fine.text


async def test_a_debit_the_ledger_refuses_is_500_and_undone_not_503(
    refusing_server: tuple[Server, Keys, IO[bytes]],
) -> None:
    """The debit path's own refusal: the Lua script charged Redis, the ledger
    refused the entry. The charge is undone and the answer is 500, not the
    503 that would invite retries forever; a batch item says the same."""
    server, keys, _ = refusing_server
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        wallet_id = await new_wallet(http, keys, funded_micros=5_000)
        before = internal_errors((await http.get("/metrics")).text)
        refused = await http.post(
            f"/v1/wallets/{wallet_id}/debits",
            json={"amount_micros": 1_000, "description": "refused"},
            headers=auth(keys.debit, "refused-1"),
        )
        assert refused.status_code == 500, refused.text
        assert refused.json()["code"] == "internal_error"
        assert "refuse_entry" not in refused.text
        batch = await http.post(
            "/v1/debits/batch",
            json={
                "debits": [
                    {
                        "wallet_id": wallet_id,
                        "amount_micros": 1_000,
                        "idempotency_key": "b-1",
                        "description": "refused",
                    },
                    {"wallet_id": wallet_id, "amount_micros": 1_000, "idempotency_key": "b-2"},
                ]
            },
            headers=auth(keys.debit, "batch-1"),
        )
        assert batch.status_code == 200, batch.text
        items = batch.json()["results"]
        assert [item["status"] for item in items] == [500, 201], items
        assert items[0]["problem"]["code"] == "internal_error"
        assert internal_errors((await http.get("/metrics")).text) >= before + 2
        wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
        assert wallet["balance_micros"] == 4_000, wallet  # only the batch's fine debit is charged
