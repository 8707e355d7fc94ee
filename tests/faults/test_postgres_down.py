"""With Postgres stopped (or frozen) in the middle of a debit load, every debit answers
in bounded time with 201, 402 or a problem+json 503 (never a 500 or a hang);
once Postgres is back the server recovers by itself, the sweeper settles the
abandoned charges, every 201 is in the ledger once, no 503 stands charged,
and Redis agrees with the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import pytest
from conftest import (
    Keys,
    Server,
    new_wallet,
    run_cli,
    start_server,
    stop_server,
)
from fault_support import (
    AMOUNT_MICROS,
    Cluster,
    classify,
    debit_load,
    ledger_balances,
    ledger_debits,
    migrated_database,
    needs_cluster,
    post_debit,
    private_cluster,
    redis_balances,
    stores_of_own,
    summary,
    wait_settled,
)
from fault_support import (
    FAULT_ENV as SHARED_FAULT_ENV,
)

from centime.settings import Settings

pytestmark = [pytest.mark.faults, needs_cluster]
FAULT_ENV = {
    **SHARED_FAULT_ENV,
    # Shorter than the outage, so requests look their API key up while
    # Postgres is down, as in any outage longer than the default 10 s.
    "CENTIME_API_KEY_CACHE_TTL_S": "1",
}
WALLETS = 6
LOAD_BEFORE_S = 2.0
OUTAGE_S = 4.0
LOAD_AFTER_S = 3.0
LATENCY_BOUND_S = 10.0
RETRIES_OF_REFUNDED = 30


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with private_cluster() as own:
        yield own


@pytest.fixture
async def own(settings: Settings, cluster: Cluster) -> AsyncIterator[tuple[Settings, Keys]]:
    async with stores_of_own(settings, await migrated_database(cluster)) as own:
        yield own


async def _wait_ready(server: Server, timeout_s: float) -> float:
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=2) as http:
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/readyz")).status_code == 200:
                    return time.monotonic() - started
            await asyncio.sleep(0.1)
    raise AssertionError(f"the server was not ready {timeout_s} s after Postgres came back")


@pytest.mark.parametrize("fault", ["stopped", "frozen"])
async def test_postgres_down_mid_load(own: tuple[Settings, Keys], cluster: Cluster, fault: str) -> None:
    """stopped: `pg_ctl stop -m fast` (connections refused); frozen: every
    Postgres process SIGSTOPped (connections and statements hang)."""
    settings, keys = own
    assert settings.database_url is not None
    server = start_server(settings, **FAULT_ENV)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            wallet_ids = [
                await new_wallet(http, keys, funded_micros=1_000_000 * AMOUNT_MICROS) for _ in range(WALLETS)
            ]

        stop = asyncio.Event()
        load = asyncio.create_task(
            debit_load(server.base_url, keys, wallet_ids, stop, concurrency=16, timeout_s=3 * LATENCY_BOUND_S)
        )
        await asyncio.sleep(LOAD_BEFORE_S)
        down_at = time.monotonic()
        frozen = []
        if fault == "stopped":
            await asyncio.to_thread(cluster.stop, "fast")
        else:
            frozen = cluster.freeze()
        stopped_s = time.monotonic() - down_at
        try:
            await asyncio.sleep(OUTAGE_S)
            # /readyz says which store is down, and never why (that is logged),
            # in bounded time even when Postgres hangs.
            async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
                ready = await http.get("/readyz")
            assert (ready.status_code, ready.json()) == (503, {"postgres": "down", "redis": "ok"})
        finally:
            cluster.thaw(frozen)
        if fault == "stopped":
            await asyncio.to_thread(cluster.start)
        up_at = time.monotonic()
        ready_s = await _wait_ready(server, 20)
        await asyncio.sleep(LOAD_AFTER_S)
        stop.set()
        answers = await asyncio.wait_for(load, 4 * LATENCY_BOUND_S)

        seen = summary(answers)
        during = [a for a in answers if down_at <= a.started <= up_at]
        after = [a for a in answers if a.started >= up_at + ready_s + 0.5]
        slowest = max(answers, key=lambda a: a.latency_s)
        print(
            f"answers {dict(seen)}; during the outage {dict(summary(during))}; after recovery "
            f"{dict(summary(after))}; {fault} in {stopped_s:.1f} s, ready {ready_s:.1f} s after "
            f"Postgres; slowest answer {slowest.latency_s:.2f} s ({slowest.status} {slowest.code})"
        )
        odd = [a for a in answers if a.status not in (201, 402, 503)]
        assert not odd, f"{len(odd)} answers other than 201/402/503, e.g. {odd[:3]}"
        bad_503 = [
            a
            for a in answers
            if a.status == 503 and (a.code, a.content_type) != ("unavailable", "application/problem+json")
        ]
        assert not bad_503, bad_503[:3]
        assert slowest.latency_s < LATENCY_BOUND_S, slowest
        assert summary(during)["503"] > 0, "the outage went unnoticed: did Postgres stop?"
        assert after and all(a.status == 201 for a in after), f"no recovery: {dict(summary(after))}"

        settle_s = await wait_settled(settings)
        ledger = await ledger_debits(settings.database_url)
        failed = [a for a in answers if a.status == 503]
        reversed_503 = [a for a in failed if a.key in ledger]
        if fault == "frozen":
            # A frozen Postgres leaves commits of unknown outcome: their requests
            # answered 503 and abandoned them, and the sweeper wrote each to the
            # ledger beside its reversal (or reversed the late commit).
            assert reversed_503, f"no 503'd debit was written and reversed: {dict(seen)}"
            standing = [a.key for a in reversed_503 if any(e.reversed_by is None for e in ledger[a.key])]
            assert standing == [], f"503'd debits standing unreversed: {standing[:5]}"
        assert classify(answers, ledger) == {}

        # A retry of a 503'd key with its key and body tells what happened:
        # reversed (409, retry with a new key) or never charged (charged now).
        latest = {a.key: a for a in answers}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            for a in [*reversed_503, *[a for a in failed if a.key not in ledger][:RETRIES_OF_REFUNDED]]:
                retry = latest[a.key] = await post_debit(http, keys, msgspec.structs.replace(a))
                if a.key in ledger:
                    assert (retry.status, retry.code) == (409, "idempotency_key_reversed"), retry
                else:
                    assert (retry.status, retry.replayed) == (201, False), retry
        await wait_settled(settings)
        assert classify(list(latest.values()), await ledger_debits(settings.database_url)) == {}

        in_ledger = await ledger_balances(settings.database_url, wallet_ids)
        in_redis = await redis_balances(settings, wallet_ids)
        assert in_redis == in_ledger
        checked = run_cli(settings, "check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        print(
            f"{len(answers)} debits; {seen['503']} answered 503, {len(reversed_503)} of them written and reversed "
            f"by the sweeper; settled {settle_s:.1f} s after the load"
        )
    except BaseException:
        print(cluster.log()[-3000:])
        raise
    finally:
        stop_server(server)
