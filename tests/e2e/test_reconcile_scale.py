"""The reconciler at scale and under failure, against localstripe over real HTTP and real
Postgres and Redis: a window of 10,000 balance transactions is listed, matched and recorded
page by page with memory that does not grow with the window, and progress on stderr; the
runs API is admin-only, pages runs and items, and each run's counts and totals match its
items; the scheduler reconciles the previous UTC day once; and a Stripe that stops answering
fails the run (exit 2, recorded as failed with its error) within a bounded time."""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import logging
import re
import secrets
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from conftest import (
    ROOT,
    RUN_ID,
    Keys,
    Server,
    Stores,
    auth,
    create_database,
    delete_prefix,
    drop_database,
    free_port,
    make_keys,
    settings_env,
    start_server,
    stop_server,
    with_stripe,
)
from stripe_support import FakeStripe, start_fake_stripe

import reconcile.stripe_source as stripe_source
from centime.reconciling import reconciler
from centime.settings import Settings
from ledger import repo as ledger_repo
from ledger.accounts import topup_lines
from ledger.ids import uuid7
from ledger.schemas import EntryRecord
from reconcile.scheduler import run_once
from reconcile.schemas import ITEMS_PAGE_SIZE_MAX, BalanceTransaction, Item, Run
from reconcile.service import Reconciler
from wallet import repo as wallet_repo
from wallet.cache import Cache

BIG = 10_000
SMALL = 2_000
PAYOUT_MINOR = -500  # $5.00 paid out
PAYOUT_MICROS = PAYOUT_MINOR * 10_000
PROGRESS = re.compile(r"^Stripe transactions matched: (\d+)$")
CLI_TIMEOUT_S = 120


class Scale(msgspec.Struct):
    """One private database, fake Stripe and centime server for the module."""

    settings: Settings
    keys: Keys
    server: Server
    fake: FakeStripe
    pool: asyncpg.Pool
    cache: Cache
    big: tuple[datetime, datetime]
    """The CLI's window: BIG payouts created in it (now, give or take an hour)."""
    small: tuple[datetime, datetime]
    """SMALL payouts, three days ago."""
    mixed: tuple[datetime, datetime]
    """One of each kind of finding, five days ago."""
    ghost_entry_id: uuid.UUID
    """A top-up entry in the mixed window claiming a charge Stripe never listed."""


def window_around(at: datetime) -> tuple[datetime, datetime]:
    return at - timedelta(hours=1), at + timedelta(hours=1)


def add(fake: FakeStripe, **fields: Any) -> None:
    response = httpx.post(f"{fake.base_url}/_config/balance_transactions", json=fields, timeout=60)
    response.raise_for_status()
    if "count" in fields:
        assert response.json() == {"added": fields["count"]}


async def ghost_topup(pool: asyncpg.Pool, at: datetime) -> uuid.UUID:
    """A wallet and a top-up entry written at `at` for a charge Stripe never made."""
    wallet_id = uuid7()
    entry_id = uuid7(int(at.timestamp() * 1000))
    async with pool.acquire() as conn, conn.transaction():
        assert await wallet_repo.insert_wallet(conn, wallet_id, f"owner-{secrets.token_hex(4)}", "usd", 0)
        await ledger_repo.ensure_system_accounts(conn, "usd")
        await ledger_repo.insert_wallet_account(conn, wallet_id, "usd")
        record = EntryRecord(
            id=entry_id,
            kind="topup",
            currency="usd",
            wallet_id=wallet_id,
            amount_micros=9_000_000,
            balance_micros=None,
            idempotency_key="topup:ch_ghost",
            request_hash=None,
            description="a top-up of a charge Stripe never listed",
            metadata={},
            created_at=at,
            stripe_object_id="ch_ghost",
            lines=topup_lines(wallet_id, "usd", 9_000_000, 290_000),
        )
        assert await ledger_repo.insert_entries(conn, [record], timeout_s=10) == {entry_id}
    return entry_id


@pytest.fixture(scope="module")
async def scale(stores: Stores, template_database: str, settings: Settings) -> AsyncIterator[Scale]:
    name = f"centime_scale_{RUN_ID}_{secrets.token_hex(3)}"
    url = await create_database(stores, name, template_database)
    prefix = f"{settings.redis_prefix}rs{secrets.token_hex(3)}"
    fake = start_fake_stripe()
    own = with_stripe(msgspec.structs.replace(settings, database_url=url, redis_prefix=prefix), fake)
    now = datetime.now(UTC)
    small_at, mixed_at = now - timedelta(days=3), now - timedelta(days=5)
    started = time.monotonic()
    add(fake, amount=PAYOUT_MINOR, currency="usd", type="payout", source="po_x", count=BIG)
    add(fake, amount=PAYOUT_MINOR, currency="usd", type="payout", source="po_s", count=SMALL,
        created=int(small_at.timestamp()))  # fmt: skip
    mixed = int(mixed_at.timestamp())
    add(fake, amount=-1234, currency="usd", type="payout", source="po_m", count=3, created=mixed)
    add(fake, amount=2000, currency="eur", type="charge", source="ch_m", fee=88, count=2, created=mixed)
    add(fake, amount=-500, currency="jpy", type="refund", source="re_m", created=mixed)
    add(fake, amount=-1500, currency="usd", type="adjustment", source="dp_m", created=mixed)
    add(fake, amount=7, currency="xxx", type="adjustment", created=mixed)
    logging.getLogger(__name__).info("fake stripe filled in %.2f s", time.monotonic() - started)
    keys = await make_keys(url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=6)
    client = aioredis.Redis.from_url(settings.redis_url)
    server = start_server(own)
    try:
        ghost = await ghost_topup(pool, mixed_at)
        yield Scale(
            own,
            keys,
            server,
            fake,
            pool,
            Cache(client, prefix=prefix, partition_count=own.partition_count),
            window_around(now),
            window_around(small_at),
            window_around(mixed_at),
            ghost,
        )
    finally:
        stop_server(server)
        fake.stop()
        await pool.close()
        await client.aclose()
        await delete_prefix(settings.redis_url, prefix)
        await drop_database(stores, name)


def cli(
    settings: Settings, window: tuple[datetime, datetime], *args: str
) -> subprocess.CompletedProcess[str]:
    """`centime reconcile --format json` in a subprocess, stderr a pipe (not a tty)."""
    return subprocess.run(
        [sys.executable, "-m", "centime", "reconcile", "--since", window[0].isoformat(),
         "--until", window[1].isoformat(), "--format", "json", *args],
        cwd=ROOT, env=settings_env(settings), capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip


class CliRun(msgspec.Struct):
    code: int
    report: dict[str, Any]
    stderr: str
    seconds: float


@pytest.fixture(scope="module")
def big_cli_run(scale: Scale) -> CliRun:
    """The CLI over the window of BIG payouts, once for the module."""
    started = time.monotonic()
    done = cli(scale.settings, scale.big)
    seconds = time.monotonic() - started
    assert done.returncode in (0, 1, 2), done.stderr
    return CliRun(done.returncode, json.loads(done.stdout), done.stderr, seconds)


@contextlib.asynccontextmanager
async def in_process(scale: Scale, **overrides: Any) -> AsyncIterator[Reconciler]:
    """A Reconciler built as the CLI and the worker build it (centime/reconciling.py)."""
    settings = msgspec.structs.replace(scale.settings, **overrides)
    async with reconciler(settings, scale.pool, scale.cache) as r:
        yield r


async def all_items(scale: Scale, run_id: str, page: int = ITEMS_PAGE_SIZE_MAX) -> list[dict[str, Any]]:
    """Every item of a run, through the API, `page` at a time."""
    items: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=scale.server.base_url, timeout=30) as http:
        while True:
            answer = await http.get(
                f"/v1/reconciliation/runs/{run_id}",
                params={"items_limit": page, "items_after": items[-1]["item_no"] if items else 0},
                headers=auth(scale.keys.admin),
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert len(body["items"]) <= page
            items += body["items"]
            if not body["items_has_more"]:
                return items
            assert len(body["items"]) == page


def counts_and_totals(items: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """What a run's counts and totals must be, from its items alone."""
    counts: collections.Counter[str] = collections.Counter()
    totals: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for item in items:
        counts[item["category"]] += 1
        magnitude = abs(item["stripe_amount_micros"] or item["ledger_amount_micros"] or 0)
        totals[item["category"]][item["currency"] or "-"] += magnitude
    return dict(counts), {category: dict(by_currency) for category, by_currency in totals.items()}


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {category: count for category, count in counts.items() if count}


# a. 10,000 transactions -------------------------------------------------------------------


def test_ten_thousand_transactions_are_reconciled_with_progress(scale: Scale, big_cli_run: CliRun) -> None:
    run, items = big_cli_run.report["run"], big_cli_run.report["items"]
    assert big_cli_run.code == 1, big_cli_run.stderr  # payouts: reported, never recorded by centime
    assert (run["status"], run["transactions_seen"], run["healed"], run["dry_run"]) == (
        "unmatched",
        BIG,
        0,
        False,
    )
    assert nonzero(run["counts"]) == {"missing_in_ledger": BIG}
    assert run["totals"] == {"missing_in_ledger": {"usd": BIG * abs(PAYOUT_MICROS)}}
    assert run["error"] is None and run["finished_at"] is not None
    # The CLI prints the first page of items; the rest are in Postgres (checked below).
    assert [i["item_no"] for i in items] == list(range(1, ITEMS_PAGE_SIZE_MAX + 1))
    assert {
        (i["category"], i["transaction_type"], i["currency"], i["stripe_amount_micros"]) for i in items
    } == {("missing_in_ledger", "payout", "usd", PAYOUT_MICROS)}
    # Not a tty: a line per 1,000 (plus the first page's), never one per page.
    matched = [int(m[1]) for line in big_cli_run.stderr.splitlines() if (m := PROGRESS.match(line))]
    thousands = list(range(1_000, BIG + 1, 1_000))
    assert [n for n in matched if n >= 1_000] == thousands, big_cli_run.stderr
    assert len(matched) <= len(thousands) + 1 and matched == sorted(matched), big_cli_run.stderr
    assert "ledger entries checked: 0" in big_cli_run.stderr.splitlines()
    assert "\r" not in big_cli_run.stderr
    print(f"\nCLI over {BIG} transactions: {big_cli_run.seconds:.1f} s (run {run['duration_ms']} ms)")


async def test_every_one_of_ten_thousand_is_recorded_once(scale: Scale, big_cli_run: CliRun) -> None:
    async with scale.pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT count(*) AS n, count(DISTINCT balance_transaction_id) AS txns,
                      count(DISTINCT stripe_object_id) AS objects, min(item_no) AS lo, max(item_no) AS hi
                 FROM reconciliation_items WHERE run_id = $1""",
            uuid.UUID(big_cli_run.report["run"]["id"]),
        )
    assert dict(row) == {"n": BIG, "txns": BIG, "objects": BIG, "lo": 1, "hi": BIG}


async def measure(r: Reconciler, window: tuple[datetime, datetime]) -> tuple[int, Run]:
    """Peak Python memory allocated during one dry run, above what was held before it."""
    gc.collect()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    run, items = await r.run(*window, dry_run=True)
    _, peak = tracemalloc.get_traced_memory()
    assert len(items) == ITEMS_PAGE_SIZE_MAX  # both windows return a full first page
    del items
    return peak - before, run


def whole_window_bytes(count: int) -> int:
    """What holding a window would take: each transaction as Stripe's JSON decodes, parsed,
    and its finding (the least a reconciler that kept the window in memory would hold)."""
    one = {
        "amount": PAYOUT_MINOR, "available_on": 1_700_000_000, "created": 1_700_000_000, "currency": "usd",
        "description": None, "exchange_rate": None, "fee": 0, "fee_details": [], "livemode": False,
        "net": PAYOUT_MINOR, "object": "balance_transaction", "reporting_category": "payout",
        "status": "available", "type": "payout",
    }  # fmt: skip
    gc.collect()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    raw = [{**one, "id": f"txn_{i:014d}", "source": f"po_x_{i}"} for i in range(count)]
    parsed = [msgspec.convert(t, BalanceTransaction) for t in raw]
    found = [
        Item(category="missing_in_ledger", stripe_object_id=t.source_id, balance_transaction_id=t.id,
             transaction_type=t.type, currency="usd", stripe_amount_micros=PAYOUT_MICROS, stripe_fee_micros=0,
             stripe_net_micros=PAYOUT_MICROS, item_no=n, detail="centime records no payout transactions")
        for n, t in enumerate(parsed, 1)
    ]  # fmt: skip
    held, _ = tracemalloc.get_traced_memory()
    del raw, parsed, found
    return held - before


async def test_memory_does_not_grow_with_the_window(scale: Scale) -> None:
    async with in_process(scale) as r:
        await r.run(*scale.small, dry_run=True)  # warm: imports, statement caches, connections
        tracemalloc.start()
        try:
            small_peak, small_run = await measure(r, scale.small)
            big_peak, big_run = await measure(r, scale.big)
            held = whole_window_bytes(BIG)
        finally:
            tracemalloc.stop()
    assert (small_run.transactions_seen, big_run.transactions_seen) == (SMALL, BIG)
    assert (small_run.counts["missing_in_ledger"], big_run.counts["missing_in_ledger"]) == (SMALL, BIG)
    mib = 1 << 20
    print(
        f"\npeak above baseline: {SMALL} transactions {small_peak / mib:.2f} MiB, "
        f"{BIG} transactions {big_peak / mib:.2f} MiB; holding {BIG} would take {held / mib:.2f} MiB"
    )
    assert big_peak < 1.5 * small_peak + 1 * mib, (small_peak, big_peak)
    assert big_peak < held / 2, (big_peak, held)


# b. The runs API ----------------------------------------------------------------------------


async def test_the_runs_api_needs_the_admin_scope(scale: Scale, big_cli_run: CliRun) -> None:
    run_id = big_cli_run.report["run"]["id"]
    async with httpx.AsyncClient(base_url=scale.server.base_url, timeout=30) as http:
        for path in ("/v1/reconciliation/runs", f"/v1/reconciliation/runs/{run_id}"):
            answer = await http.get(path)
            assert (answer.status_code, answer.json()["code"]) == (401, "unauthorized"), path
            answer = await http.get(path, headers={"Authorization": "Bearer not-a-key"})
            assert answer.status_code == 401, path
            for key in (scale.keys.read, scale.keys.debit):
                answer = await http.get(path, headers=auth(key))
                assert (answer.status_code, answer.json()["code"]) == (403, "forbidden"), path
            assert (await http.get(path, headers=auth(scale.keys.admin))).status_code == 200, path


async def test_runs_are_paged_newest_first(scale: Scale, big_cli_run: CliRun) -> None:
    async with in_process(scale) as r:  # a few more runs to page through
        made = [(await r.run(*scale.mixed, dry_run=True))[0] for _ in range(3)]
    admin = auth(scale.keys.admin)
    async with httpx.AsyncClient(base_url=scale.server.base_url, timeout=30) as http:
        everything = (await http.get("/v1/reconciliation/runs", params={"limit": 100}, headers=admin)).json()
        assert everything["has_more"] is False
        ids = [run["id"] for run in everything["data"]]
        assert len(ids) >= 4 and ids == sorted(ids, reverse=True)  # UUIDv7: newest first
        assert ids[:3] == [str(run.id) for run in reversed(made)]
        assert big_cli_run.report["run"]["id"] in ids
        paged: list[str] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor is not None:
                params["starting_after"] = cursor
            page = (await http.get("/v1/reconciliation/runs", params=params, headers=admin)).json()
            assert 1 <= len(page["data"]) <= 2
            paged += [run["id"] for run in page["data"]]
            cursor = paged[-1]
            if not page["has_more"]:
                break
        assert paged == ids
        for bad in ({"limit": 0}, {"limit": 101}, {"starting_after": "not-a-run"}):
            answer = await http.get("/v1/reconciliation/runs", params=bad, headers=admin)
            assert (answer.status_code, answer.json()["code"]) == (400, "invalid_request"), bad
        # Dry runs supersede nothing; the real run stays current.
        detail = (await http.get(f"/v1/reconciliation/runs/{made[0].id}", headers=admin)).json()
        assert detail["run"]["superseded_by"] is None and detail["run"]["dry_run"] is True


async def test_an_unknown_or_malformed_run_is_not_found(scale: Scale) -> None:
    admin = auth(scale.keys.admin)
    async with httpx.AsyncClient(base_url=scale.server.base_url, timeout=30) as http:
        for run_id in (str(uuid7()), str(uuid.uuid4()), "not-a-run", "1234"):
            answer = await http.get(f"/v1/reconciliation/runs/{run_id}", headers=admin)
            assert (answer.status_code, answer.json()["code"]) == (404, "run_not_found"), run_id


async def test_items_page_through_ten_thousand_and_match_the_counts(
    scale: Scale, big_cli_run: CliRun
) -> None:
    run = big_cli_run.report["run"]
    items = await all_items(scale, run["id"])
    assert [i["item_no"] for i in items] == list(range(1, BIG + 1))
    assert len({i["balance_transaction_id"] for i in items}) == BIG
    counts, totals = counts_and_totals(items)
    assert (counts, totals) == (nonzero(run["counts"]), run["totals"])
    admin = auth(scale.keys.admin)
    async with httpx.AsyncClient(base_url=scale.server.base_url, timeout=30) as http:
        path = f"/v1/reconciliation/runs/{run['id']}"
        default = (await http.get(path, headers=admin)).json()
        assert [i["item_no"] for i in default["items"]] == list(range(1, 101)) and default["items_has_more"]
        tail = (
            await http.get(path, params={"items_after": BIG - 3, "items_limit": 10}, headers=admin)
        ).json()
        assert [i["item_no"] for i in tail["items"]] == [BIG - 2, BIG - 1, BIG] and not tail["items_has_more"]
        assert tail["run"] == default["run"]
        past = (await http.get(path, params={"items_after": BIG}, headers=admin)).json()
        assert (past["items"], past["items_has_more"]) == ([], False)
        for bad in ({"items_limit": 0}, {"items_limit": ITEMS_PAGE_SIZE_MAX + 1}, {"items_after": -1}):
            answer = await http.get(path, params=bad, headers=admin)
            assert (answer.status_code, answer.json()["code"]) == (400, "invalid_request"), bad


async def test_a_mixed_run_counts_and_totals_match_its_items(scale: Scale) -> None:
    async with in_process(scale) as r:
        run, first = await r.run(*scale.mixed, dry_run=True)
    assert run.transactions_seen == 8 and run.status == "unmatched"
    items = await all_items(scale, str(run.id), page=3)
    assert [i["item_no"] for i in items] == [i.item_no for i in first] == list(range(1, 10))
    counts, totals = counts_and_totals(items)
    assert counts == nonzero(run.counts) == {"missing_in_ledger": 8, "missing_in_stripe": 1}
    assert totals == run.totals
    assert run.totals == {
        "missing_in_ledger": {
            "usd": 3 * 12_340_000 + 15_000_000,  # three payouts, a dispute withdrawal
            "eur": 2 * 20_000_000,  # two charges never credited (a dry run heals nothing)
            "jpy": 500_000_000,  # a refund: jpy has no minor unit
            "-": 0,  # a currency centime does not know: no amount it can state
        },
        "missing_in_stripe": {"usd": 9_000_000},
    }
    (ghost,) = [i for i in items if i["category"] == "missing_in_stripe"]
    assert (ghost["stripe_object_id"], ghost["entry_id"]) == ("ch_ghost", str(scale.ghost_entry_id))
    assert (ghost["ledger_amount_micros"], ghost["ledger_fee_micros"]) == (9_000_000, 290_000)
    unknown = [i for i in items if i["currency"] is None]
    assert [(i["transaction_type"], i["stripe_amount_micros"]) for i in unknown] == [("adjustment", None)]


# c. The scheduler's guard -------------------------------------------------------------------


async def test_the_scheduler_reconciles_the_previous_day_once(scale: Scale) -> None:
    now = datetime.now(UTC).replace(hour=3, minute=17, second=0, microsecond=0) - timedelta(days=9)
    day_start = now.replace(hour=0, minute=0) - timedelta(days=1)
    add(scale.fake, amount=-700, currency="usd", type="payout", source="po_day", count=2,
        created=int((day_start + timedelta(hours=12)).timestamp()))  # fmt: skip
    async with in_process(scale) as r:
        # A dry run of the day is not a reconciliation of it.
        dry, _ = await r.run(day_start, day_start + timedelta(days=1), dry_run=True)
        first = await run_once(r, now=now)
        assert first.startswith("unmatched: run "), first
        run_id = uuid.UUID(first.removeprefix("unmatched: run "))
        second = await run_once(r, now=now + timedelta(hours=20))  # same UTC day
        assert second == f"skipped: run {run_id} already reconciled {day_start.date()}"
    async with scale.pool.acquire() as conn:
        runs = await conn.fetch(
            "SELECT id, window_start, window_end, dry_run, status, transactions_seen, superseded_by"
            " FROM reconciliation_runs WHERE window_start = $1 ORDER BY id",
            day_start,
        )
    assert [(r["id"], r["dry_run"], r["status"], r["transactions_seen"]) for r in runs] == [
        (dry.id, True, "unmatched", 2),
        (run_id, False, "unmatched", 2),
    ]
    assert {(r["window_start"], r["window_end"]) for r in runs} == {
        (day_start, day_start + timedelta(days=1))
    }
    assert runs[0]["superseded_by"] == run_id


async def test_the_scheduler_skips_while_another_worker_holds_the_lock(scale: Scale) -> None:
    now = datetime.now(UTC).replace(hour=2, minute=0, second=0, microsecond=0) - timedelta(days=20)
    window_start = now.replace(hour=0) - timedelta(days=1)
    other = await asyncpg.connect(scale.settings.database_url)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock(hashtext('centime.reconcile'))")
        async with in_process(scale) as r:
            assert await run_once(r, now=now) == "skipped: another worker is running it"
    finally:
        await other.close()  # the other worker ends: its session lock goes with it
    async with scale.pool.acquire() as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM reconciliation_runs WHERE window_start = $1", window_start
            )
            == 0
        )
    async with in_process(scale) as r:
        assert (await run_once(r, now=now)).startswith("clean: run ")


# d. Stripe failing ---------------------------------------------------------------------------


async def run_detail(scale: Scale, run_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=scale.server.base_url, timeout=30) as http:
        answer = await http.get(f"/v1/reconciliation/runs/{run_id}", headers=auth(scale.keys.admin))
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.faults
def test_a_stripe_stopped_mid_window_fails_the_cli_run_in_bounded_time(scale: Scale) -> None:
    """The real retry schedule (6 attempts, backoff from 0.5 s doubling, jittered): at most
    0.5 + 1 + 2 + 4 + 8 = 15.5 s x 1.5 of waiting once Stripe is gone."""
    fake = start_fake_stripe()
    try:
        add(fake, amount=PAYOUT_MINOR, currency="usd", type="payout", source="po_y", count=BIG)
        settings = msgspec.structs.replace(scale.settings, stripe_api_base=fake.base_url)
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "centime", "reconcile", "--since", scale.big[0].isoformat(),
             "--until", scale.big[1].isoformat(), "--format", "json"],
            cwd=ROOT, env=settings_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stderr is not None
        seen_before_stop: list[str] = []
        for line in process.stderr:  # wait for the first thousand, then pull the plug
            seen_before_stop.append(line)
            if line.strip() == "Stripe transactions matched: 1000":
                break
        else:
            pytest.fail(f"no progress: {''.join(seen_before_stop)}")
        fake.process.kill()
        stopped = time.monotonic()
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
        failed_after = time.monotonic() - stopped
    finally:
        fake.stop()
    assert process.returncode == 2, stderr
    assert failed_after < 15.5 * 1.5 + 10, failed_after
    report = json.loads(stdout)
    assert report["run"]["status"] == "failed"
    answer = httpx.get(
        f"{scale.server.base_url}/v1/reconciliation/runs/{report['run']['id']}",
        headers=auth(scale.keys.admin),
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    detail = answer.json()
    assert detail["run"]["status"] == "failed" and detail["run"]["finished_at"] is not None
    assert detail["run"]["counts"]["missing_in_ledger"] >= 1_000  # what it matched before Stripe went
    assert "StripeListFailed" in detail["run"]["error"]
    assert "after 6 attempts" in detail["run"]["error"]
    assert detail["run"]["superseded_by"] is None
    assert len(re.findall(r"; retry \d+ in ", stderr)) == stripe_source.ATTEMPTS_MAX - 1, stderr
    print(
        f"\nStripe gone mid-window: the CLI failed {failed_after:.1f} s later ({time.monotonic() - started:.1f} s)"
    )


async def test_a_closed_stripe_port_fails_the_run_after_every_attempt(
    scale: Scale, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(stripe_source, "BACKOFF_FIRST_S", 0.01)
    caplog.set_level(logging.WARNING, logger="reconcile.stripe_source")
    started = time.monotonic()
    async with in_process(scale, stripe_api_base=f"http://127.0.0.1:{free_port()}") as r:
        run, items = await r.run(*scale.small, dry_run=False)
    assert time.monotonic() - started < 10
    assert (run.status, run.transactions_seen, items) == ("failed", 0, [])
    assert run.error is not None and "after 6 attempts" in run.error
    retries = [rec for rec in caplog.records if "retry" in rec.getMessage()]
    assert len(retries) == stripe_source.ATTEMPTS_MAX - 1
    detail = await run_detail(scale, str(run.id))
    assert (detail["run"]["status"], detail["run"]["error"]) == ("failed", run.error)


async def test_a_failed_nightly_run_does_not_count_as_done(
    scale: Scale, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stripe_source, "BACKOFF_FIRST_S", 0.01)
    now = datetime.now(UTC).replace(hour=2, minute=0, second=0, microsecond=0) - timedelta(days=14)
    async with in_process(scale, stripe_api_base=f"http://127.0.0.1:{free_port()}") as down:
        outcome = await run_once(down, now=now)
    assert outcome.startswith("failed: run "), outcome
    async with in_process(scale) as up:  # Stripe is back: the next night runs the day again
        again = await run_once(up, now=now)
        assert again.startswith("clean: run "), again
        assert (await run_once(up, now=now)).startswith("skipped: run ")


async def test_a_failed_run_records_the_transactions_it_saw(
    scale: Scale, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stripe_source, "BACKOFF_FIRST_S", 0.01)
    fake = start_fake_stripe()
    try:
        add(fake, amount=PAYOUT_MINOR, currency="usd", type="payout", source="po_z", count=300)

        def stop_after_first_page(phase: str, count: int) -> None:
            if phase == "stripe" and count >= stripe_source.PAGE_SIZE:
                fake.process.kill()

        async with in_process(scale, stripe_api_base=fake.base_url) as r:
            run, items = await r.run(*scale.big, dry_run=True, progress=stop_after_first_page)
    finally:
        fake.stop()
    assert run.status == "failed" and run.error is not None
    assert len(items) == run.counts["missing_in_ledger"] == stripe_source.PAGE_SIZE
    assert run.transactions_seen == stripe_source.PAGE_SIZE  # is 0
