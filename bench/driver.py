"""`make bench` (python -m bench): centime against the baselines a user would
pick instead, measured in one run on this machine.

It starts a Postgres database and a Redis of its own, migrates, funds
BENCH_WALLETS wallets and one hot wallet, serves centime (with the floor and
the naive peer beside it, bench/server.py), and measures, each for
BENCH_SECONDS:

  floor         the same server answering a trivial POST with no I/O (wrk)
  debit         centime debits spread over the wallets (wrk)
  debit_hot     centime debits on one wallet (wrk)
  debit_half    centime debits at about half the debit rate: the p99 (wrk, paced)
  batch         centime batch debits, BATCH_ITEMS per request, over the wallets
                (wrk; counted in debits/s, each one matched in the ledger)
  mix           realistic traffic, bench/locustfile.py (locust, HTML report)
  naive_hot     a debit done only in Postgres, one wallet (wrk)
  naive         the same, spread over the wallets (wrk)
  redis_ceiling redis-benchmark running the debit script itself
  ledger_writer entries/s the group-commit writer commits
  copy          a raw COPY of the same rows

After each centime run, every 2xx debit is looked up in the ledger (lost,
duplicated) and `centime check` runs. Results: bench/results/latest.json and
latest.png, and a table on stdout."""

from __future__ import annotations

import asyncio
import os
import platform
import secrets
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import msgspec

from bench import report, scenarios
from bench.progress import say
from bench.stores import centime_server, ensure_tool, own_database, own_redis, postgres_server
from centime.app import redis_client
from centime.auth import create_api_key
from centime.migrate import migrate_database
from centime.settings import Settings
from centime.sql import load_queries
from ledger import repo as ledger_repo
from ledger.accounts import credit_lines, system_account_id
from ledger.ids import uuid7
from ledger.schemas import EntryRecord
from wallet.cache import Cache
from wallet.maintenance import rebuild_cache

Q = load_queries("bench")
RESULTS = Path("bench/results")
SECONDS_DEFAULT = 20
SECONDS_MAX = 600
WALLETS_DEFAULT = 10_000
WALLETS_MAX = 100_000
SEED_PAGE = 1_000
FUND_MICROS = 10**9
"""1,000.00 USD per wallet: a run spends about 0.01 USD from each."""
HOT_FUND_MICROS = 10**13
CONNECTIONS = 64
CONNECT_TIMEOUT_S = 60
"""How long the driver may wait to connect to Postgres (asyncpg's default)."""
HALF_LOAD_CONNECTIONS = 32
CALIBRATION_SECONDS = 5
LOCUST_USERS = 32
BATCH_ITEMS = 100
BATCH_CONNECTIONS = 16


def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"bench: {name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise SystemExit(f"bench: {name}={value} is outside {low}..{high}")
    return value


def _funding(wallet_id: uuid.UUID, amount_micros: int, run: str) -> EntryRecord:
    return EntryRecord(
        id=uuid7(),
        kind="credit",
        currency="usd",
        wallet_id=wallet_id,
        amount_micros=amount_micros,
        balance_micros=amount_micros,
        idempotency_key=f"fund-{run}",
        request_hash="0" * 32,
        description="bench funding",
        created_at=datetime.now(UTC),
        lines=credit_lines(wallet_id, "usd", amount_micros),
    )


async def seed(database_url: str, cache: Cache, settings: Settings, wallets: int) -> list:  # type: ignore[type-arg]
    """Wallets, their funding credits (real ledger entries), and Redis loaded
    from the ledger by rebuild-cache. The first id is the hot wallet."""
    ids = [uuid7() for _ in range(wallets + 1)]
    run = secrets.token_hex(4)
    conn = await asyncpg.connect(database_url)
    try:
        await ledger_repo.ensure_system_accounts(conn, "usd")
        for start in range(0, len(ids), SEED_PAGE):
            page = ids[start : start + SEED_PAGE]
            await conn.execute(
                Q["seed_wallets"], page, [f"bench-{run}-{i}" for i in range(start, start + len(page))]
            )
            entries = [
                _funding(wallet_id, HOT_FUND_MICROS if wallet_id == ids[0] else FUND_MICROS, run)
                for wallet_id in page
            ]
            await ledger_repo.insert_entries(conn, entries, timeout_s=60)
        say(f"funded {len(ids)} wallets in the ledger")
        key_debit = (await create_api_key(conn, "bench", "debit"))[1]
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        await rebuild_cache(pool, cache, idempotency_ttl_s=settings.idempotency_ttl_s)
    finally:
        await pool.close()
    say("loaded the balances into Redis (rebuild-cache)")
    return [ids, key_debit]


async def measure(database_url: str, redis_url: str, seconds: int, wallets: int, workers: int) -> dict:  # type: ignore[type-arg]
    settings = Settings(database_url=database_url, redis_url=redis_url)
    await migrate_database(database_url, connect_timeout_s=CONNECT_TIMEOUT_S)
    client = redis_client(redis_url, settings)
    cache = Cache(client, prefix=settings.redis_prefix, partition_count=settings.partition_count)
    ids, key = await seed(database_url, cache, settings, wallets)
    hot, spread = ids[0], ids[1:]
    spread_file, hot_file, keys_dir = _files(spread, hot)
    loads: dict[str, scenarios.Load] = {}
    checks: dict[str, scenarios.Verification] = {}
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        with centime_server(database_url, redis_url, workers=workers) as url:
            say(f"centime serving on {url} ({workers} worker(s)); {seconds} s per scenario")
            served = _Served(url, seconds, key, pool, cache, keys_dir, loads=loads, checks=checks)
            await served.debit_scenarios(spread_file=spread_file, hot_file=hot_file)
            await served.naive_scenarios(ids, spread_file=spread_file, hot_file=hot_file)
        await _store_ceilings(loads, settings, spread, seconds)
    finally:
        await pool.close()
        await client.aclose()
    return {"loads": loads, "checks": checks, "versions": await _versions(database_url, redis_url)}


class _Served:
    """The scenarios run against the centime server: what each needs, and
    what each measured (`loads`) and found in the ledger after (`checks`)."""

    def __init__(
        self,
        url: str,
        seconds: int,
        key: str,
        pool: asyncpg.Pool,
        cache: Cache,
        keys_dir: Path,
        *,
        loads: dict[str, scenarios.Load],
        checks: dict[str, scenarios.Verification],
    ) -> None:
        self.url, self.seconds, self.key = url, seconds, key
        self.pool, self.cache, self.keys_dir = pool, cache, keys_dir
        self.loads, self.checks = loads, checks

    async def debit_scenarios(self, *, spread_file: Path, hot_file: Path) -> None:
        """The HTTP floor, then debits: spread, on one hot wallet, at half
        load, in batches, and the locust mix."""
        self.loads["floor"] = await asyncio.to_thread(
            scenarios.wrk, self.url, "/bench/floor", self.seconds, connections=CONNECTIONS
        )
        say(f"floor: {self.loads['floor'].rps:,.0f}/s, p99 {self.loads['floor'].p99_ms:.1f} ms")
        await self.debits("debit", spread_file)
        await self.debits("debit_hot", hot_file)
        await self.half_load(spread_file)
        await self.debits("batch", spread_file, connections=BATCH_CONNECTIONS, batch_items=BATCH_ITEMS)
        mix = await asyncio.to_thread(
            scenarios.locust,
            self.url,
            self.seconds,
            key=self.key,
            wallets_file=spread_file,
            users=LOCUST_USERS,
        )
        if mix is not None:
            self.loads["mix"] = mix
            left = await scenarios.quiesce(self.cache)
            say(f"mix (locust): {mix.rps:,.0f}/s, p99 {mix.p99_ms:.0f} ms; {left} in flight after")

    async def half_load(self, spread_file: Path) -> None:
        """Paced: each of HALF_LOAD_CONNECTIONS connections waits before each
        request. Calibrate the wait once, then measure."""
        target_rps = self.loads["debit"].rps / 2
        wait_ms = HALF_LOAD_CONNECTIONS * 1000 / target_rps
        await self.debits(
            "debit_half",
            spread_file,
            seconds=CALIBRATION_SECONDS,
            connections=HALF_LOAD_CONNECTIONS,
            delay_ms=wait_ms,
        )
        latency_ms = HALF_LOAD_CONNECTIONS * 1000 / self.loads["debit_half"].rps - wait_ms
        wait_ms = max(0.1, HALF_LOAD_CONNECTIONS * 1000 / target_rps - max(latency_ms, 0))
        await self.debits("debit_half", spread_file, connections=HALF_LOAD_CONNECTIONS, delay_ms=wait_ms)

    async def debits(self, name: str, wallets_file: Path, **options: float) -> None:
        """One wrk run of debits, then the ledger checked for every answer."""
        run = f"{name}{secrets.token_hex(3)}"
        keys_out = self.keys_dir / name
        load = await asyncio.to_thread(
            scenarios.wrk,
            self.url,
            "/v1/wallets/{wallet}/debits",
            int(options.pop("seconds", self.seconds)),
            connections=int(options.pop("connections", CONNECTIONS)),
            key=self.key,
            wallets_file=wallets_file,
            run=run,
            keys_out=keys_out,
            **options,  # type: ignore[arg-type]
        )
        verification = await scenarios.verify(self.pool, self.cache, run=run, keys_out=keys_out)
        if options.get("batch_items"):
            # debits/s: the debits answered 201, not the batch requests
            load = msgspec.structs.replace(
                load, requests=verification.answered_2xx, rps=verification.answered_2xx / load.duration_s
            )
        self.loads[name], self.checks[name] = load, verification
        say(
            f"{name}: {load.rps:,.0f}/s, p99 {load.p99_ms:.1f} ms, {load.non_2xx} non-2xx; "
            f"ledger: {verification.lost} lost, {verification.duplicated} duplicated; "
            f"check {verification.check_detail}"
        )

    async def naive_scenarios(self, ids: list, *, spread_file: Path, hot_file: Path) -> None:  # type: ignore[type-arg]
        """The naive peer (one Postgres row update per debit). It starts from
        the ledger's balances, so it runs last: its debits are not in Redis."""
        async with self.pool.acquire(timeout=scenarios.BENCH_ACQUIRE_TIMEOUT_S) as conn:
            await conn.execute(Q["naive_schema"])
            await conn.execute(Q["naive_load"], ids, system_account_id("revenue", "usd"))
        for name, wallets_file in (("naive_hot", hot_file), ("naive", spread_file)):
            self.loads[name] = await asyncio.to_thread(
                scenarios.wrk,
                self.url,
                "/bench/naive/wallets/{wallet}/debits",
                self.seconds,
                connections=CONNECTIONS,
                key=self.key,
                wallets_file=wallets_file,
            )
            say(f"{name}: {self.loads[name].rps:,.0f}/s, p99 {self.loads[name].p99_ms:.1f} ms")


async def _store_ceilings(
    loads: dict[str, scenarios.Load],
    settings: Settings,
    spread: list,  # type: ignore[type-arg]
    seconds: int,
) -> None:
    """What the stores alone sustain, without the server: Redis's script
    rate, the ledger writer's entry rate, and a raw COPY of as many entries."""
    assert settings.database_url is not None and settings.redis_url is not None
    loads["redis_ceiling"] = await scenarios.redis_ceiling(settings.redis_url, seconds)
    say(f"redis_ceiling: {loads['redis_ceiling'].rps:,.0f}/s")
    loads["ledger_writer"], written = await scenarios.ledger_writer(
        settings.database_url,
        spread,
        seconds,
        batch_entries_max=settings.commit_batch_entries_max,
        connections=settings.commit_connections,
    )
    say(f"ledger_writer: {loads['ledger_writer'].rps:,.0f} entries/s")
    loads["copy"] = await scenarios.raw_copy(settings.database_url, written)
    say(f"copy: {loads['copy'].rps:,.0f} entries/s")


def _files(spread: list, hot: object) -> tuple[Path, Path, Path]:  # type: ignore[type-arg]
    """The wallet lists wrk reads, and an empty folder for the answered keys."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    spread_file, hot_file = RESULTS / "wallets.txt", RESULTS / "hot.txt"
    spread_file.write_text("".join(f"{w}\n" for w in spread))
    hot_file.write_text(f"{hot}\n")
    keys_dir = RESULTS / "keys"
    keys_dir.mkdir(exist_ok=True)
    for old in keys_dir.glob("*"):
        old.unlink()
    return spread_file, hot_file, keys_dir


async def _versions(database_url: str, redis_url: str) -> dict[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        postgres = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    client = redis_client(redis_url, Settings(database_url=database_url, redis_url=redis_url))
    try:
        redis_version = (await client.info("server"))["redis_version"]
    finally:
        await client.aclose()
    wrk = await asyncio.to_thread(subprocess.run, ["wrk", "-v"], capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "postgres": postgres,
        "redis": redis_version,
        "wrk": wrk.stdout.split("\n")[0],
    }


def main() -> None:
    seconds = _env_int("BENCH_SECONDS", SECONDS_DEFAULT, 1, SECONDS_MAX)
    wallets = _env_int("BENCH_WALLETS", WALLETS_DEFAULT, 10, WALLETS_MAX)
    workers = _env_int("BENCH_WORKERS", 1, 1, 16)
    for tool in ("wrk", "redis-benchmark"):
        ensure_tool(tool)
    started = datetime.now(UTC)
    say(f"{seconds} s per scenario, {wallets} wallets, {workers} server worker(s)")

    async def run() -> dict:  # type: ignore[type-arg]
        with postgres_server() as server_url, own_redis() as redis_url:
            async with own_database(server_url) as database_url:
                return await measure(database_url, redis_url, seconds, wallets, workers)

    measured = asyncio.run(run())
    result = report.build(
        measured, started=started, seconds=seconds, wallets=wallets, workers=workers, connections=CONNECTIONS
    )
    report.write(result, RESULTS)
    print(report.table(result))
    sys.exit(0 if result["lost_entries"] == 0 and result["duplicated_entries"] == 0 else 1)
