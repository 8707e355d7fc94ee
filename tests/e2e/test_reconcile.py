"""The reconciler against localstripe over real HTTP: a clean day reconciles
with nothing unmatched; a lost webhook is found and healed once; a made-up
charge is missing in Stripe; fee differences are healed (missing) or
reported (different); concurrent runs never both heal; exit codes say which."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from conftest import (
    ROOT,
    STRIPE_WEBHOOK_SECRET,
    Keys,
    Server,
    auth,
    delete_prefix,
    make_keys,
    new_wallet,
    settings_env,
    start_server,
    stop_server,
    with_stripe,
)
from stripe_support import FakeStripe, make_dispute, make_event, pay, sign, start_fake_stripe, stripe_client

from centime.settings import Settings

FEE_BPS, FEE_FIXED = 290, 30


class World(msgspec.Struct):
    settings: Settings
    keys: Keys
    server: Server
    fake: FakeStripe
    http: httpx.AsyncClient
    since: str
    until: str


@pytest.fixture
def own_fake() -> Iterator[FakeStripe]:
    """A fake Stripe of the test's own: its balance transactions are this test's alone.
    No webhook is registered: the test delivers (or loses) each event itself."""
    fake = start_fake_stripe(fee_bps=FEE_BPS, fee_fixed_minor=FEE_FIXED)
    yield fake
    fake.stop()


@pytest.fixture
async def world(settings: Settings, private_database: str, own_fake: FakeStripe) -> AsyncIterator[World]:
    own = with_stripe(
        msgspec.structs.replace(
            settings,
            database_url=private_database,
            redis_prefix=f"{settings.redis_prefix}r{secrets.token_hex(3)}",
        ),
        own_fake,
    )
    keys = await make_keys(private_database)
    server = start_server(own, CENTIME_RUN_SWEEPER="true")
    now = datetime.now(UTC)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            yield World(
                own,
                keys,
                server,
                own_fake,
                http,
                (now - timedelta(hours=1)).isoformat(),
                (now + timedelta(hours=1)).isoformat(),
            )
    finally:
        stop_server(server)
        assert own.redis_url is not None
        await delete_prefix(own.redis_url, own.redis_prefix)


def reconcile(world: World, *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "centime", "reconcile", "--since", world.since, "--until", world.until,
         "--format", "json", *args],
        cwd=ROOT, env=settings_env(world.settings), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode in (0, 1, 2), done.stderr
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, report


async def paid_topup(world: World, amount_micros: int, *, deliver: bool = True) -> dict[str, Any]:
    """A top-up paid at the fake; its success event delivered, or lost."""
    wallet_id = await new_wallet(world.http, world.keys)
    created = await world.http.post(
        f"/v1/wallets/{wallet_id}/topups",
        json={"amount_micros": amount_micros},
        headers=auth(world.keys.debit),
    )
    assert created.status_code == 201, created.text
    topup = created.json()
    client = stripe_client(world.fake.base_url)
    await pay(client, topup["payment_intent_id"])
    if deliver:
        await deliver_success(world, topup)
    return topup


async def deliver_success(world: World, topup: dict[str, Any]) -> None:
    client = stripe_client(world.fake.base_url)
    intent = (await client.v1.payment_intents.retrieve_async(topup["payment_intent_id"])).to_dict()
    event = make_event("payment_intent.succeeded", intent)
    answer = await world.http.post(
        "/v1/webhooks/stripe", content=event, headers={"Stripe-Signature": sign(event, STRIPE_WEBHOOK_SECRET)}
    )
    assert answer.status_code == 200, answer.text


async def balance_of(world: World, wallet_id: str) -> int:
    wallet = (await world.http.get(f"/v1/wallets/{wallet_id}", headers=auth(world.keys.read))).json()
    return wallet["balance_micros"]


async def test_a_clean_window_reconciles_with_nothing_unmatched(world: World) -> None:
    topup = await paid_topup(world, 10_000_000)
    client = stripe_client(world.fake.base_url)
    intent = await client.v1.payment_intents.retrieve_async(topup["payment_intent_id"])
    await client.v1.refunds.create_async(params={"charge": str(intent.latest_charge), "amount": 300})
    charge = (await client.v1.charges.retrieve_async(str(intent.latest_charge))).to_dict()
    event = make_event("charge.refunded", charge)
    answer = await world.http.post(
        "/v1/webhooks/stripe", content=event, headers={"Stripe-Signature": sign(event, STRIPE_WEBHOOK_SECRET)}
    )
    assert "clawed back" in answer.json()["outcome"]

    code, report = reconcile(world)
    assert code == 0, report
    run = report["run"]
    assert (run["status"], run["transactions_seen"], run["healed"]) == ("clean", 2, 0)
    assert report["items"] == []
    assert run["wallets_checked"] >= 1


async def test_a_lost_webhook_is_healed_once_and_a_second_run_finds_nothing(world: World) -> None:
    topup = await paid_topup(world, 20_000_000, deliver=False)
    assert await balance_of(world, topup["wallet_id"]) == 0

    code, report = reconcile(world, "--dry-run")
    assert code == 1
    assert [i["category"] for i in report["items"]] == ["missing_in_ledger"]
    assert report["items"][0]["healed"] is False and report["run"]["dry_run"] is True
    assert await balance_of(world, topup["wallet_id"]) == 0  # a dry run heals nothing

    code, report = reconcile(world)
    assert code == 0, report
    (item,) = report["items"]
    assert (item["category"], item["healed"]) == ("missing_in_ledger", True)
    assert await balance_of(world, topup["wallet_id"]) == 20_000_000
    fee_micros = world.fake.fee(2_000) * 10_000
    state = (await world.http.get(f"/v1/topups/{topup['id']}", headers=auth(world.keys.read))).json()
    assert (state["status"], state["fee_micros"]) == ("succeeded", fee_micros)

    code, again = reconcile(world)
    assert code == 0 and again["items"] == [] and again["run"]["healed"] == 0
    # The later run supersedes the earlier ones of the same window.
    runs = (await world.http.get("/v1/reconciliation/runs", headers=auth(world.keys.admin))).json()["data"]
    assert [r["id"] for r in runs][:3] == [again["run"]["id"], report["run"]["id"], runs[2]["id"]]
    assert runs[1]["superseded_by"] == again["run"]["id"]


async def test_a_made_up_charge_in_the_ledger_is_missing_in_stripe(world: World) -> None:
    topup = await paid_topup(world, 5_000_000)
    conn = await asyncpg.connect(world.settings.database_url)
    try:
        entry_id = await conn.fetchval(
            "SELECT id FROM journal_entries WHERE kind = 'topup' AND metadata->>'topup_id' = $1", topup["id"]
        )
        # A forged top-up entry naming a charge Stripe never made (a copy of the real one's lines).
        forged = uuid.UUID(int=entry_id.int + 1)
        await conn.execute(
            """
            WITH e AS (
                INSERT INTO journal_entries (id, kind, currency, wallet_id, amount_micros, idempotency_key,
                                             description, metadata, stripe_object_id, created_at)
                SELECT $2, kind, currency, wallet_id, amount_micros, 'topup:forged-' || $3::text, 'forged',
                       '{}', 'ch_madeup' || $3::text, created_at
                  FROM journal_entries WHERE id = $1
                RETURNING id
            )
            INSERT INTO journal_lines (entry_id, line_no, account_id, currency, amount_micros)
            SELECT (SELECT id FROM e), line_no, account_id, currency, amount_micros FROM journal_lines WHERE entry_id = $1
            """,
            entry_id,
            forged,
            secrets.token_hex(4),
        )
    finally:
        await conn.close()
    code, report = reconcile(world)
    assert code == 1
    (item,) = [i for i in report["items"] if i["category"] == "missing_in_stripe"]
    assert item["stripe_object_id"].startswith("ch_madeup") and item["ledger_amount_micros"] == 5_000_000
    assert report["run"]["status"] == "unmatched"


async def transaction_of(world: World, topup: dict[str, Any]) -> str:
    client = stripe_client(world.fake.base_url)
    intent = await client.v1.payment_intents.retrieve_async(topup["payment_intent_id"])
    charge = await client.v1.charges.retrieve_async(str(intent.latest_charge))
    return str(charge.balance_transaction)


async def test_a_missing_fee_is_healed_once(world: World) -> None:
    """The webhook read the charge before Stripe had settled its fee (0): the
    reconciler writes the fee lines, once."""
    topup = await paid_topup(world, 10_000_000, deliver=False)
    transaction_id = await transaction_of(world, topup)
    fee = world.fake.fee(1_000)
    world.fake.set_fee(transaction_id, 0)
    await deliver_success(world, topup)
    world.fake.set_fee(transaction_id, fee)

    code, report = reconcile(world)
    assert code == 0, report
    (item,) = report["items"]
    assert (item["category"], item["healed"]) == ("fee_mismatch", True)
    assert (item["stripe_fee_micros"], item["ledger_fee_micros"]) == (fee * 10_000, 0)
    code, again = reconcile(world)
    assert (code, again["items"]) == (0, [])
    conn = await asyncpg.connect(world.settings.database_url)
    try:
        fees = await conn.fetch(
            "SELECT amount_micros, idempotency_key FROM journal_entries WHERE kind = 'stripe_fee'"
        )
    finally:
        await conn.close()
    assert [(r["amount_micros"], r["idempotency_key"]) for r in fees] == [
        (fee * 10_000, f"fee:{transaction_id}")
    ]
    assert await balance_of(world, topup["wallet_id"]) == 10_000_000  # a fee never touches the wallet


async def test_a_different_fee_is_reported_not_touched(world: World) -> None:
    topup = await paid_topup(world, 3_000_000)
    transaction_id = await transaction_of(world, topup)
    fee = world.fake.fee(300)
    world.fake.set_fee(transaction_id, fee + 7)
    code, report = reconcile(world)
    assert code == 1
    (item,) = report["items"]
    assert (item["category"], item["healed"]) == ("fee_mismatch", False)
    assert (item["stripe_fee_micros"], item["ledger_fee_micros"]) == ((fee + 7) * 10_000, fee * 10_000)
    assert item["balance_transaction_id"] == transaction_id


async def test_two_concurrent_runs_never_both_heal(world: World) -> None:
    topup = await paid_topup(world, 7_000_000, deliver=False)
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(
        loop.run_in_executor(None, reconcile, world), loop.run_in_executor(None, reconcile, world)
    )
    codes = sorted(code for code, _ in results)
    healed = sum(report.get("run", {}).get("healed", 0) for _, report in results)
    assert healed == 1, results
    assert codes in ([0, 0], [0, 2]), results  # the second waits its turn (then finds nothing) or is refused
    assert await balance_of(world, topup["wallet_id"]) == 7_000_000
    conn = await asyncpg.connect(world.settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM journal_entries WHERE kind = 'topup'") == 1
    finally:
        await conn.close()


async def test_an_entry_for_an_object_of_another_day_is_not_missing_in_stripe(world: World) -> None:
    """A credit written today for a charge Stripe listed days ago (a heal, a webhook
    retried for days) is looked up at Stripe rather than reported."""
    topup = await paid_topup(world, 4_000_000)
    transaction_id = await transaction_of(world, topup)
    two_days_ago = int((datetime.now(UTC) - timedelta(days=2)).timestamp())
    world.fake.set_fee(transaction_id, created=two_days_ago)
    code, report = reconcile(world)
    assert (code, report["items"], report["run"]["transactions_seen"]) == (0, [], 0), report


async def refund_quietly(world: World, topup: dict[str, Any], amount_minor: int) -> str:
    """A refund at Stripe whose webhook never arrives. Returns its id."""
    client = stripe_client(world.fake.base_url)
    intent = await client.v1.payment_intents.retrieve_async(topup["payment_intent_id"])
    refund = await client.v1.refunds.create_async(
        params={"charge": str(intent.latest_charge), "amount": amount_minor}
    )
    return str(refund.id)


async def test_missed_refunds_are_clawed_back_once_and_the_day_is_clean(world: World) -> None:
    topup = await paid_topup(world, 10_000_000)
    refund_ids = [await refund_quietly(world, topup, 100) for _ in range(3)]
    assert all(len(refund_id) == 27 for refund_id in refund_ids)  # Stripe's own length
    assert await balance_of(world, topup["wallet_id"]) == 10_000_000

    code, report = reconcile(world, "--dry-run")
    assert code == 1
    missing = sorted(i["stripe_object_id"] for i in report["items"] if i["category"] == "missing_in_ledger")
    assert missing == sorted(refund_ids)
    assert await balance_of(world, topup["wallet_id"]) == 10_000_000

    code, report = reconcile(world)
    assert code == 0, report
    assert sorted((i["stripe_object_id"], i["healed"]) for i in report["items"]) == [
        (refund_id, True) for refund_id in sorted(refund_ids)
    ]
    assert await balance_of(world, topup["wallet_id"]) == 7_000_000
    state = (await world.http.get(f"/v1/topups/{topup['id']}", headers=auth(world.keys.read))).json()
    assert (state["status"], state["refunded_micros"]) == ("partially_refunded", 3_000_000)

    code, again = reconcile(world)
    assert (code, again["items"], again["run"]["status"]) == (0, [], "clean"), again
    conn = await asyncpg.connect(world.settings.database_url)
    try:
        keys = await conn.fetch("SELECT idempotency_key FROM journal_entries WHERE kind = 'topup_refund'")
    finally:
        await conn.close()
    assert sorted(r["idempotency_key"] for r in keys) == sorted(f"refund:{r}" for r in refund_ids)


async def test_a_missed_dispute_is_opened_then_closed_through_the_webhook_path(world: World) -> None:
    topup = await paid_topup(world, 10_000_000)
    client = stripe_client(world.fake.base_url)
    intent = await client.v1.payment_intents.retrieve_async(topup["payment_intent_id"])
    charge = (await client.v1.charges.retrieve_async(str(intent.latest_charge))).to_dict()
    dispute = make_dispute(charge, 400, "usd")
    world.fake.put_dispute(dispute)
    world.fake.add_balance_transaction(amount=-400, currency="usd", source=dispute["id"])

    code, report = reconcile(world)
    assert code == 0, report
    (item,) = report["items"]
    assert (item["stripe_object_id"], item["healed"]) == (dispute["id"], True)
    wallet = (await world.http.get(f"/v1/wallets/{topup['wallet_id']}", headers=auth(world.keys.read))).json()
    assert (wallet["status"], wallet["balance_micros"]) == ("frozen", 6_000_000)

    world.fake.put_dispute({**dispute, "status": "won"})
    world.fake.add_balance_transaction(amount=400, currency="usd", source=dispute["id"])
    code, report = reconcile(world)
    assert code == 0, report
    assert [(i["stripe_amount_micros"], i["healed"]) for i in report["items"]] == [(4_000_000, True)]
    wallet = (await world.http.get(f"/v1/wallets/{topup['wallet_id']}", headers=auth(world.keys.read))).json()
    assert (wallet["status"], wallet["balance_micros"]) == ("active", 10_000_000)
    code, again = reconcile(world)
    assert (code, again["items"]) == (0, []), again
