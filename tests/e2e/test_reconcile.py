"""The reconciler against localstripe over real HTTP: a clean day reconciles
with nothing unmatched; a lost webhook is found and healed once; a made-up
charge is missing in Stripe; fee differences are healed (missing) or
reported (different); concurrent runs never both heal; exit codes say which;
Redis drift is a finding of the run, repaired; a run a killed process left
running is marked failed; the worker catches up on yesterday at start, once,
and retries a failed night; the table and CSV outputs show what the API does."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
    delete_prefix,
    make_keys,
    new_wallet,
    settings_env,
    start_server,
    stop_server,
    with_stripe,
)
from stripe_support import FakeStripe, make_dispute, make_event, pay, sign, start_fake_stripe, stripe_client

from centime.reconciling import reconciler
from centime.settings import Settings
from reconcile.scheduler import parse_at, run_nightly, run_once
from reconcile.schemas import Item
from reconcile.service import default_window
from wallet.cache import Cache

FEE_BPS, FEE_FIXED = 290, 30


class Ledger(msgspec.Struct):
    """A private database and Redis prefix with its own fake Stripe, and the window to reconcile."""

    settings: Settings
    fake: FakeStripe
    since: str
    until: str


class World(Ledger):
    """The same, with centime serving it."""

    keys: Keys
    server: Server
    http: httpx.AsyncClient


@pytest.fixture
def own_fake() -> Iterator[FakeStripe]:
    """A fake Stripe of the test's own: its balance transactions are this test's alone.
    No webhook is registered: the test delivers (or loses) each event itself."""
    fake = start_fake_stripe(fee_bps=FEE_BPS, fee_fixed_minor=FEE_FIXED)
    yield fake
    fake.stop()


@pytest.fixture
async def ledger(settings: Settings, private_database: str, own_fake: FakeStripe) -> AsyncIterator[Ledger]:
    """For tests that run the reconciler alone: no server."""
    own = with_stripe(
        msgspec.structs.replace(
            settings,
            database_url=private_database,
            redis_prefix=f"{settings.redis_prefix}r{secrets.token_hex(3)}",
        ),
        own_fake,
    )
    now = datetime.now(UTC)
    try:
        yield Ledger(
            own, own_fake, (now - timedelta(hours=1)).isoformat(), (now + timedelta(hours=1)).isoformat()
        )
    finally:
        assert own.redis_url is not None
        await delete_prefix(own.redis_url, own.redis_prefix)


@pytest.fixture
async def world(ledger: Ledger) -> AsyncIterator[World]:
    assert ledger.settings.database_url is not None
    keys = await make_keys(ledger.settings.database_url)
    server = start_server(ledger.settings, CENTIME_RUN_SWEEPER="true")
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            yield World(**msgspec.structs.asdict(ledger), keys=keys, server=server, http=http)
    finally:
        stop_server(server)


def reconcile_command(world: Ledger, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "centime",
        "reconcile",
        "--since",
        world.since,
        "--until",
        world.until,
        *args,
    ]


def reconcile_text(world: Ledger, *args: str, **env: str) -> tuple[int, str]:
    done = subprocess.run(
        reconcile_command(world, *args),
        cwd=ROOT, env=settings_env(world.settings, **env), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode in (0, 1, 2), done.stderr
    return done.returncode, done.stdout


def reconcile(world: Ledger, *args: str, **env: str) -> tuple[int, dict[str, Any]]:
    code, output = reconcile_text(world, "--format", "json", *args, **env)
    return code, json.loads(output) if output.strip() else {}


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


# Balance drift, interrupted runs, the nightly schedule and the output formats -----------

WAIT_S = 30.0


async def wait_for(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def runs_of(world: Ledger) -> list[asyncpg.Record]:
    """Every recorded run, oldest first."""
    conn = await asyncpg.connect(world.settings.database_url)
    try:
        return await conn.fetch(
            "SELECT id, window_start, window_end, status, error FROM reconciliation_runs ORDER BY id"
        )
    finally:
        await conn.close()


def spawn(world: Ledger, command: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """A centime command on the world's settings, running; its stderr to `log`."""
    with open(log or os.devnull, "wb") as stderr:
        return subprocess.Popen(
            command, cwd=ROOT, env=settings_env(world.settings), stdout=subprocess.DEVNULL, stderr=stderr
        )


def start_worker(world: Ledger, log: Path) -> subprocess.Popen[bytes]:
    return spawn(world, [sys.executable, "-m", "centime", "worker"], log)


@contextlib.asynccontextmanager
async def cache_of(world: Ledger) -> AsyncIterator[tuple[redis.Redis, Cache]]:
    assert world.settings.redis_url is not None
    client = redis.Redis.from_url(world.settings.redis_url)
    try:
        yield (
            client,
            Cache(client, prefix=world.settings.redis_prefix, partition_count=world.settings.partition_count),
        )
    finally:
        await client.aclose()


async def test_redis_drift_is_a_balance_drift_finding_of_the_run_and_is_repaired(world: World) -> None:
    topup = await paid_topup(world, 10_000_000)
    wallet_key = topup["wallet_id"]
    async with cache_of(world) as (client, cache):
        key = cache.wallet_key(uuid.UUID(wallet_key))
        await client.hincrby(key, "b", 1_234)  # Redis says more than the ledger
        # A shorter commit timeout: the drift check waits out one before it believes a drift.
        code, report = reconcile(world, CENTIME_COMMIT_TIMEOUT_MS="500")
        assert code == 0, report
        (item,) = report["items"]
        assert (item["category"], item["wallet_id"], item["currency"]) == ("balance_drift", wallet_key, "usd")
        assert (item["ledger_amount_micros"], item["healed"]) == (-1_234, True)
        assert (report["run"]["counts"]["balance_drift"], report["run"]["healed"]) == (1, 1)
        assert int(await client.hget(key, "b")) == 10_000_000


async def test_a_run_a_killed_process_left_running_is_marked_failed_by_the_next(ledger: Ledger) -> None:
    os.kill(ledger.fake.process.pid, signal.SIGSTOP)  # the run waits on Stripe's listing
    try:
        killed = spawn(ledger, reconcile_command(ledger))
        try:

            async def running() -> bool:
                return [r["status"] for r in await runs_of(ledger)] == ["running"]

            await wait_for(running, "the run to start")
        finally:
            killed.kill()
            killed.wait(timeout=10)
    finally:
        os.kill(ledger.fake.process.pid, signal.SIGCONT)

    async def unlocked() -> bool:  # the lock dies with the killed run's connection
        conn = await asyncpg.connect(ledger.settings.database_url)
        try:
            return (
                await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
                == 0
            )
        finally:
            await conn.close()

    await wait_for(unlocked, "the killed run's lock to go")
    code, report = reconcile(ledger)
    assert code == 0, report
    (interrupted, clean) = await runs_of(ledger)
    assert (interrupted["status"], interrupted["error"]) == (
        "failed",
        "interrupted: the process ended before the run did",
    )
    assert (clean["id"], clean["status"]) == (uuid.UUID(report["run"]["id"]), "clean")


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    worker.wait(timeout=15)


async def test_the_worker_catches_up_on_yesterday_at_start(ledger: Ledger, tmp_path: Path) -> None:
    yesterday = default_window(datetime.now(UTC))
    worker = start_worker(ledger, tmp_path / "worker.log")
    try:

        async def reconciled() -> bool:
            return [r["status"] for r in await runs_of(ledger)] == ["clean"]

        await wait_for(reconciled, "the worker's catch-up run")
    finally:
        stop_worker(worker)
    (run,) = await runs_of(ledger)
    assert (run["window_start"], run["window_end"]) == yesterday


async def test_a_failed_night_is_retried_and_a_reconciled_one_is_not_run_again(ledger: Ledger) -> None:
    assert ledger.settings.database_url is not None
    pool = await asyncpg.create_pool(ledger.settings.database_url, min_size=1, max_size=4)
    stop = asyncio.Event()
    try:
        async with cache_of(ledger) as (_, cache), reconciler(ledger.settings, pool, cache) as nightly:
            with ledger.fake.outage("error", status=401):  # a revoked key, say: every call refused
                schedule = asyncio.create_task(
                    run_nightly(nightly, at=parse_at("02:00"), retry_after=timedelta(seconds=0.3), stop=stop)
                )

                async def failed() -> bool:
                    return any(r["status"] == "failed" for r in await runs_of(ledger))

                await wait_for(failed, "the first run to fail")

            async def clean() -> bool:
                return any(r["status"] == "clean" for r in await runs_of(ledger))

            await wait_for(clean, "the retry to reconcile the day")
            stop.set()
            await asyncio.wait_for(schedule, WAIT_S)
            *failures, last = await runs_of(ledger)
            # What a restarted worker does first: the day is done, so it is skipped.
            again = await run_once(nightly, now=datetime.now(UTC))
            assert again == f"skipped: run {last['id']} already reconciled {last['window_start'].date()}"
    finally:
        stop.set()
        await pool.close()
    assert failures and all(r["status"] == "failed" and "401" in r["error"] for r in failures)
    assert last["status"] == "clean"
    yesterday = default_window(datetime.now(UTC))
    assert {(r["window_start"], r["window_end"]) for r in [*failures, last]} == {yesterday}
    assert len(await runs_of(ledger)) == len(failures) + 1


async def latest_run_items(ledger: Ledger) -> tuple[uuid.UUID, list[asyncpg.Record]]:
    conn = await asyncpg.connect(ledger.settings.database_url)
    try:
        run_id = await conn.fetchval("SELECT id FROM reconciliation_runs ORDER BY id DESC LIMIT 1")
        items = await conn.fetch(
            "SELECT * FROM reconciliation_items WHERE run_id = $1 ORDER BY item_no", run_id
        )
    finally:
        await conn.close()
    return run_id, items


async def test_the_table_and_csv_formats_show_the_run_and_its_items(ledger: Ledger) -> None:
    code, output = reconcile_text(ledger, "--format", "csv")
    assert (code, output.splitlines()) == (0, [",".join(Item.__struct_fields__)])  # clean: the header alone

    charge = f"ch_{secrets.token_hex(12)}"  # a charge of no top-up of centime's
    ledger.fake.add_balance_transaction(amount=2_000, currency="usd", type="charge", source=charge)
    code, table = reconcile_text(ledger, "--dry-run", "--format", "table")
    assert code == 1
    run_id, (item,) = await latest_run_items(ledger)
    lines = table.splitlines()
    assert lines[0].startswith(f"run {run_id}  ") and lines[0].endswith("  (dry run)")
    assert lines[1].startswith("status unmatched: 1 Stripe transactions, ")
    assert lines[2].split() == ["missing_in_ledger", "1", "(20000000", "usd", "micros)"]
    assert lines[3].split() == ["#", "category", "object", "stripe", "ledger", "healed", "detail"]
    assert lines[4].split(maxsplit=5) == ["1", "missing_in_ledger", charge, "20000000", "no", item["detail"]]
    assert len(lines) == 5

    code, output = reconcile_text(ledger, "--dry-run", "--format", "csv")
    assert code == 1
    _, (item,) = await latest_run_items(ledger)
    assert list(csv.DictReader(io.StringIO(output))) == [
        {field: "" if item[field] is None else str(item[field]) for field in Item.__struct_fields__}
    ]
