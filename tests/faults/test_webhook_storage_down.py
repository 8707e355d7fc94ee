"""A Stripe webhook while Postgres is down is answered 503 and nothing is stored, so
Stripe's retry credits the top-up once Postgres is back; while Redis is down after the
commit it is answered 200, and the sweeper applies the credit to Redis once Redis is
back, exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import httpx
import pytest
from conftest import (
    STRIPE_WEBHOOK_SECRET,
    Keys,
    auth,
    make_keys,
    new_wallet,
    start_server,
    stop_server,
    with_stripe,
)
from fault_support import (
    FAULT_ENV,
    cache_for,
    migrated_database,
    needs_cluster,
    on_own_redis,
    paid_intent,
    private_cluster,
    redis_balances,
    redis_server,
    stores_of_own,
)
from stripe_support import FakeStripe, make_event, sign

from centime.settings import Settings

pytestmark = pytest.mark.faults
AMOUNT_MICROS = 5_000_000
ANSWER_BOUND_S = 10.0
WAIT_S = 20.0


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, OSError):
            if await predicate():
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def paid_topup_event(http: httpx.AsyncClient, keys: Keys, fake: FakeStripe) -> tuple[str, bytes]:
    """A wallet, its top-up paid at the fake, and the success event (not delivered)."""
    wallet_id = await new_wallet(http, keys)
    intent = await paid_intent(http, keys, fake, wallet_id, AMOUNT_MICROS)
    return wallet_id, make_event("payment_intent.succeeded", intent)


async def deliver(http: httpx.AsyncClient, event: bytes) -> httpx.Response:
    headers = {"Stripe-Signature": sign(event, STRIPE_WEBHOOK_SECRET)}
    return await http.post("/v1/webhooks/stripe", content=event, headers=headers)


async def wallet_epoch(settings: Settings, wallet_id: str) -> bytes | None:
    client, cache = cache_for(settings)
    try:
        return await client.hget(cache.wallet_key(uuid.UUID(wallet_id)), "e")
    finally:
        await client.aclose()


async def ledger_counts(database_url: str) -> tuple[int, int, int]:
    """Stored events, top-up credits, and wallet changes not yet applied to Redis."""
    conn = await asyncpg.connect(database_url)
    try:
        return (
            await conn.fetchval("SELECT count(*) FROM stripe_events"),
            await conn.fetchval("SELECT count(*) FROM journal_entries WHERE kind = 'topup'"),
            await conn.fetchval("SELECT count(*) FROM wallet_changes"),
        )
    finally:
        await conn.close()


@needs_cluster
async def test_a_webhook_while_postgres_is_down_is_503_and_the_retry_credits(
    settings: Settings, silent_fake_stripe: FakeStripe
) -> None:
    with private_cluster() as cluster:
        async with stores_of_own(settings, await migrated_database(cluster)) as (own, keys):
            own = with_stripe(own, silent_fake_stripe)
            server = start_server(own, **FAULT_ENV)
            try:
                async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                    wallet_id, event = await paid_topup_event(http, keys, silent_fake_stripe)
                    cluster.stop("fast")
                    started = time.monotonic()
                    down = await deliver(http, event)
                    assert time.monotonic() - started < ANSWER_BOUND_S
                    assert down.status_code == 503, down.text
                    assert down.headers["content-type"].startswith("application/problem+json")
                    assert down.json()["code"] == "unavailable"

                    cluster.start()
                    assert own.database_url is not None
                    assert await ledger_counts(own.database_url) == (0, 0, 0)  # nothing was stored
                    await wait_until(lambda: _ready(http), "the server to reach Postgres again")
                    retried = await deliver(http, event)  # Stripe sends it again
                    assert retried.status_code == 200, retried.text
                    assert retried.json()["outcome"] == f"processed: credited {AMOUNT_MICROS} micros"
                    wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
                    assert wallet["balance_micros"] == AMOUNT_MICROS
            finally:
                stop_server(server)


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


async def test_a_webhook_while_redis_is_down_is_200_and_the_sweeper_applies_the_credit(
    settings: Settings, private_database: str, silent_fake_stripe: FakeStripe
) -> None:
    with redis_server() as own_redis:
        own = on_own_redis(settings, private_database, own_redis, silent_fake_stripe)
        keys = await make_keys(private_database)
        server = start_server(own, **FAULT_ENV)
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                wallet_id, event = await paid_topup_event(http, keys, silent_fake_stripe)
                assert await redis_balances(own, [wallet_id]) == {wallet_id: 0}
                epoch = await wallet_epoch(own, wallet_id)
                own_redis.stop()
                try:
                    answer = await deliver(http, event)
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["outcome"] == f"processed: credited {AMOUNT_MICROS} micros"
                    # Committed with its wallet change, which Redis has not got.
                    assert await ledger_counts(private_database) == (1, 1, 1)
                finally:
                    own_redis.start()

                async def applied() -> bool:
                    return await ledger_counts(private_database) == (1, 1, 0)

                await wait_until(applied, "the sweeper to apply the change")
                assert await redis_balances(own, [wallet_id]) == {wallet_id: AMOUNT_MICROS}
                # Applied to the wallet Redis kept, not reloaded from the ledger (a new epoch).
                assert await wallet_epoch(own, wallet_id) == epoch
                again = await deliver(http, event)
                assert again.json()["outcome"] == "duplicate"
                wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
                assert wallet["balance_micros"] == AMOUNT_MICROS
        finally:
            stop_server(server)
        conn = await asyncpg.connect(private_database)
        try:
            seq = await conn.fetchval("SELECT change_seq FROM wallets WHERE id = $1", uuid.UUID(wallet_id))
        finally:
            await conn.close()
        assert seq == 1
