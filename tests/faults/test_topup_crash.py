"""A top-up whose process dies between the ledger commit and the Redis apply
still reaches the balance exactly once: the commit holds the entry, the
event and a numbered wallet change; `centime worker` applies the change; a
retried delivery of the event and later sweeps change nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import asyncpg
import httpx
import pytest
from conftest import (
    ROOT,
    STRIPE_WEBHOOK_SECRET,
    auth,
    make_keys,
    new_wallet,
    run_cli,
    settings_env,
    start_server,
    stop_server,
)
from fault_support import FAULT_ENV, on_own_redis, redis_balances, redis_server
from stripe_support import FakeStripe, make_event, pay, sign, stripe_client

from centime.settings import Settings

pytestmark = pytest.mark.faults

# The request must still be waiting on the stalled Redis when it is killed.
CRASH_ENV = {**FAULT_ENV, "CENTIME_REDIS_TIMEOUT_MS": "10000", "CENTIME_SWEEPER_GRACE_MS": "30000"}
APPLY_WAIT_S = 30.0


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


async def test_a_crash_between_commit_and_redis_loses_and_doubles_nothing(
    settings: Settings, private_database: str, fake_stripe: FakeStripe
) -> None:
    with redis_server() as own_redis:
        own = on_own_redis(settings, private_database, own_redis, fake_stripe)
        keys = await make_keys(private_database)
        server = start_server(own, **CRASH_ENV, CENTIME_RUN_SWEEPER="false")
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                wallet_id = await new_wallet(http, keys)
                created = await http.post(
                    f"/v1/wallets/{wallet_id}/topups",
                    json={"amount_micros": 7_000_000},
                    headers=auth(keys.debit),
                )
                assert created.status_code == 201, created.text
                intent_id = created.json()["payment_intent_id"]
                client = stripe_client(fake_stripe.base_url)
                await pay(client, intent_id)
                intent = (await client.v1.payment_intents.retrieve_async(intent_id)).to_dict()
                event = make_event("payment_intent.succeeded", intent)
                headers = {"Stripe-Signature": sign(event, STRIPE_WEBHOOK_SECRET)}

                os.kill(own_redis.process.pid, signal.SIGSTOP)
                try:
                    delivery = asyncio.create_task(
                        http.post("/v1/webhooks/stripe", content=event, headers=headers)
                    )
                    conn = await asyncpg.connect(private_database)
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
                    os.kill(own_redis.process.pid, signal.SIGCONT)
        finally:
            stop_server(server)

        # Killed after the commit, before Redis: the ledger has it, Redis not.
        assert await redis_balances(own, [wallet_id]) == {wallet_id: 0}
        conn = await asyncpg.connect(private_database)
        try:
            assert await conn.fetchval("SELECT count(*) FROM stripe_events") == 1
            assert await conn.fetchval("SELECT count(*) FROM journal_entries WHERE kind = 'topup'") == 1
        finally:
            await conn.close()

        worker = start_worker(own)
        try:

            async def applied() -> bool:
                return (await redis_balances(own, [wallet_id]))[wallet_id] == 7_000_000

            await _wait(applied, APPLY_WAIT_S, "the worker to apply the change")
            await asyncio.sleep(1.5)  # more sweeps: still once
        finally:
            worker.terminate()
            worker.wait(timeout=15)
        assert await redis_balances(own, [wallet_id]) == {wallet_id: 7_000_000}

        # Stripe retries the delivery it never saw answered: a duplicate.
        server = start_server(own, **CRASH_ENV)
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                retried = await http.post(
                    "/v1/webhooks/stripe",
                    content=event,
                    headers={"Stripe-Signature": sign(event, STRIPE_WEBHOOK_SECRET)},
                )
                assert retried.status_code == 200, retried.text
                assert retried.json()["outcome"] == "duplicate"
                wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
                assert wallet["balance_micros"] == 7_000_000
        finally:
            stop_server(server)
        conn = await asyncpg.connect(private_database)
        try:
            assert await conn.fetchval("SELECT count(*) FROM wallet_changes") == 0
            assert (
                await conn.fetchval("SELECT change_seq FROM wallets WHERE id = $1", uuid.UUID(wallet_id)) == 1
            )
        finally:
            await conn.close()
        checked = run_cli(own, "check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
