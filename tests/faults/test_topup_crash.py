"""A top-up, a refund or a dispute whose process dies between the ledger
commit and the Redis apply still reaches the balance exactly once: the commit
holds the entry, the event and a numbered wallet change; `centime worker`
applies the change (a dispute's freeze with it); a retried delivery of the
event and later sweeps change nothing."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import sys
import time
import uuid

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as redis
from conftest import (
    ROOT,
    STRIPE_WEBHOOK_SECRET,
    Keys,
    Server,
    auth,
    make_keys,
    new_wallet,
    run_cli,
    settings_env,
    start_server,
    stop_server,
)
from fault_support import (
    FAULT_ENV,
    RedisServer,
    cache_for,
    on_own_redis,
    paid_intent,
    redis_balances,
    redis_server,
)
from stripe_support import FakeStripe, make_dispute, make_event, sign, stripe_client

from centime.settings import Settings

pytestmark = pytest.mark.faults

# The request must still be waiting on the stalled Redis when it is killed.
CRASH_ENV = {**FAULT_ENV, "CENTIME_REDIS_TIMEOUT_MS": "10000", "CENTIME_SWEEPER_GRACE_MS": "30000"}
APPLY_WAIT_S = 30.0
PAUSE_MS = 30_000
"""Longest Redis holds writes back (CLIENT PAUSE): the test unpauses it sooner."""


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "centime", "worker"],
        cwd=ROOT,
        env=settings_env(settings, **CRASH_ENV),
        stdout=subprocess.DEVNULL,
    )


async def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


TOPUP_MICROS = 7_000_000
REFUND_MINOR = 300  # of the 700 cents paid
DISPUTE_MINOR = 400


class Crash(msgspec.Struct, frozen=True):
    """The event whose processing is killed, and what the wallet is once it is applied."""

    event: str
    balance_micros: int
    status: str
    change_seq: int
    entry_kind: str


CRASHES = {
    "payment": Crash("payment_intent.succeeded", TOPUP_MICROS, "active", 1, "topup"),
    "refund": Crash("charge.refunded", TOPUP_MICROS - REFUND_MINOR * 10_000, "active", 2, "topup_refund"),
    "dispute": Crash(
        "charge.dispute.created", TOPUP_MICROS - DISPUTE_MINOR * 10_000, "frozen", 2, "dispute_opened"
    ),
}


def _delivery_headers(event: bytes) -> dict[str, str]:
    return {"Stripe-Signature": sign(event, STRIPE_WEBHOOK_SECRET)}


async def _paid_event(
    http: httpx.AsyncClient, keys: Keys, fake: FakeStripe, wallet_id: str
) -> tuple[bytes, str]:
    """A top-up of TOPUP_MICROS paid at the fake: its success event and its charge id."""
    intent = await paid_intent(http, keys, fake, wallet_id, TOPUP_MICROS)
    return make_event("payment_intent.succeeded", intent), str(intent["latest_charge"])


async def _crash_event(fake: FakeStripe, kind: str, charge_id: str) -> bytes:
    """The refund's or dispute's event, made at the fake after the payment."""
    client = stripe_client(fake.base_url)
    if kind == "refund":
        await client.v1.refunds.create_async(params={"charge": charge_id, "amount": REFUND_MINOR})
        charge = (await client.v1.charges.retrieve_async(charge_id)).to_dict()
        return make_event("charge.refunded", charge)
    charge = (await client.v1.charges.retrieve_async(charge_id)).to_dict()
    dispute = make_dispute(charge, DISPUTE_MINOR, "usd", dispute_id=f"dp_{secrets.token_hex(8)}")
    return make_event("charge.dispute.created", dispute)


async def _kill_after_commit(
    server: Server, http: httpx.AsyncClient, own_redis: RedisServer, database_url: str, event: bytes
) -> None:
    """Deliver `event` while Redis holds back every write, and kill the server
    once its commit is in: its Redis apply is sent, or about to be, and never
    runs. (A stopped Redis would run a script already in its socket buffer
    once it resumed; a paused one drops it with its client.)"""
    pause = redis.Redis.from_url(own_redis.url)
    await pause.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
    try:
        delivery = asyncio.create_task(
            http.post("/v1/webhooks/stripe", content=event, headers=_delivery_headers(event))
        )
        conn = await asyncpg.connect(database_url)
        try:

            async def committed() -> bool:
                return await conn.fetchval("SELECT count(*) FROM wallet_changes") == 1

            await _wait(committed, 15, "the webhook's commit")
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(timeout=10)
            with pytest.raises(httpx.HTTPError):
                await delivery
        finally:
            await conn.close()
    finally:
        await pause.execute_command("CLIENT", "UNPAUSE")
        await pause.aclose()


async def _wallet_in_redis(settings: Settings, wallet_id: str) -> tuple[int | None, str | None]:
    client, cache = cache_for(settings)
    try:
        cached = await cache.wallet(uuid.UUID(wallet_id))
    finally:
        await client.aclose()
    return (None, None) if cached is None else (cached.balance_micros, cached.status)


@pytest.mark.parametrize("kind", list(CRASHES))
async def test_a_crash_between_commit_and_redis_loses_and_doubles_nothing(
    settings: Settings, private_database: str, fake_stripe: FakeStripe, kind: str
) -> None:
    crash = CRASHES[kind]
    with redis_server() as own_redis:
        own = on_own_redis(settings, private_database, own_redis, fake_stripe)
        keys = await make_keys(private_database)
        server = start_server(own, **CRASH_ENV, CENTIME_RUN_SWEEPER="false")
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                wallet_id = await new_wallet(http, keys)
                event, charge_id = await _paid_event(http, keys, fake_stripe, wallet_id)
                before = (0, "active")
                if kind != "payment":  # the payment goes through whole; its clawback is what crashes
                    paid = await http.post(
                        "/v1/webhooks/stripe", content=event, headers=_delivery_headers(event)
                    )
                    assert paid.status_code == 200, paid.text
                    before = (TOPUP_MICROS, "active")
                    assert await _wallet_in_redis(own, wallet_id) == before
                    event = await _crash_event(fake_stripe, kind, charge_id)
                await _kill_after_commit(server, http, own_redis, private_database, event)
        finally:
            stop_server(server)

        # Killed after the commit, before Redis: the ledger has it, Redis not.
        assert await _wallet_in_redis(own, wallet_id) == before
        conn = await asyncpg.connect(private_database)
        try:
            assert await conn.fetchval("SELECT count(*) FROM stripe_events WHERE type = $1", crash.event) == 1
            assert (
                await conn.fetchval("SELECT count(*) FROM journal_entries WHERE kind = $1", crash.entry_kind)
                == 1
            )
        finally:
            await conn.close()

        after = (crash.balance_micros, crash.status)
        worker = start_worker(own)
        try:

            async def applied() -> bool:
                return await _wallet_in_redis(own, wallet_id) == after

            await _wait(applied, APPLY_WAIT_S, "the worker to apply the change")
            await asyncio.sleep(1.5)  # more sweeps: still once
        finally:
            worker.terminate()
            worker.wait(timeout=15)
        assert await _wallet_in_redis(own, wallet_id) == after
        assert await redis_balances(own, [wallet_id]) == {wallet_id: crash.balance_micros}

        # Stripe retries the delivery it never saw answered: a duplicate.
        server = start_server(own, **CRASH_ENV)
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                retried = await http.post(
                    "/v1/webhooks/stripe", content=event, headers=_delivery_headers(event)
                )
                assert retried.status_code == 200, retried.text
                assert retried.json()["outcome"] == "duplicate"
                wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
                assert (wallet["balance_micros"], wallet["status"]) == after
        finally:
            stop_server(server)
        conn = await asyncpg.connect(private_database)
        try:
            assert await conn.fetchval("SELECT count(*) FROM wallet_changes") == 0
            assert (
                await conn.fetchval("SELECT change_seq FROM wallets WHERE id = $1", uuid.UUID(wallet_id))
                == crash.change_seq
            )
        finally:
            await conn.close()
        checked = run_cli(own, "check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
