"""Each measurement of `make bench`, bounded in time, returning plain figures.

- wrk (bench/wrk/bench.lua) measures HTTP throughput and latency: it is far
  faster than the service, so the service is what saturates;
- redis-benchmark measures the Redis ceiling of the debit script itself;
- the ledger writer and raw COPY are measured in this process, with asyncpg.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import glob
import json
import os
import re
import secrets
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as redis

from bench.progress import say
from centime.sql import load_queries
from ledger.accounts import debit_lines
from ledger.ids import uuid7
from ledger.schemas import EntryRecord
from ledger.writer import Committed, LedgerWriter, Outcome
from wallet.cache import Cache
from wallet.maintenance import check

Q = load_queries("bench")
WRK_SCRIPT = "bench/wrk/bench.lua"
WRK_THREADS = 1
"""One wrk thread saturates the service and leaves the second core to it."""
WRK_TIMEOUT_S = 10
QUIESCE_WAIT_S = 60.0
BENCH_ACQUIRE_TIMEOUT_S = 60.0
"""How long the bench waits for a pooled connection."""
"""How long the ledger may take to settle what a run left in flight."""
LEDGER_IN_FLIGHT_MAX = 2_048
"""Entries the ledger-writer measurement keeps submitted at once."""
REDIS_CEILING_WALLETS = 10_000
REDIS_CEILING_REQUESTS_MAX = 3_000_000
"""Bounds the outbox the ceiling run leaves in Redis (about 1 KiB each)."""
REDIS_CEILING_CONNECTIONS = 64
APPLY_SCRIPT = Path("wallet/lua/apply.lua")
REDIS_CEILING_PREFIX = "ceiling:{p0}"
"""The ceiling's keys: one partition, as every script call touches one."""


class Load(msgspec.Struct, kw_only=True):
    """One load run: what the generator measured."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float | None = None
    p99_ms: float
    max_ms: float | None = None
    non_2xx: int = 0
    socket_errors: int = 0
    timeouts: int = 0


class Verification(msgspec.Struct, kw_only=True):
    """Every 2xx debit of a run, looked up in the ledger."""

    answered_2xx: int
    in_ledger: int
    lost: int
    """Answered 2xx, and not in the ledger (or reversed there)."""
    duplicated: int
    """Ledger entries beyond one per idempotency key."""
    committed_unanswered: int
    """In the ledger without a 2xx that wrk saw: in flight when the run ended."""
    check_ok: bool
    check_detail: str


def wrk(
    url: str,
    path: str,
    seconds: int,
    *,
    connections: int,
    key: str | None = None,
    wallets_file: Path | None = None,
    run: str | None = None,
    keys_out: Path | None = None,
    delay_ms: float | None = None,
    batch_items: int = 0,
) -> Load:
    """One wrk run. With `batch_items`, each request is a batch of that many
    debits, and the Load counts debits (rps is debits/s; latency is per batch)."""
    env = {
        **os.environ,
        "BENCH_PATH": path,
        "BENCH_KEY": key or "",
        "BENCH_WALLETS": str(wallets_file or ""),
        "BENCH_RUN": run or secrets.token_hex(4),
        "BENCH_KEYS_OUT": str(keys_out or ""),
        "BENCH_DELAY_MS": f"{delay_ms:.3f}" if delay_ms else "",
        "BENCH_BATCH_ITEMS": str(batch_items or ""),
    }
    command = ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", f"--timeout={WRK_TIMEOUT_S}s"]
    command += ["-s", WRK_SCRIPT, url]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise SystemExit(f"bench: wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    last = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not last:
        raise SystemExit(f"bench: wrk printed no summary: {done.stdout[-500:]}")
    load = msgspec.json.decode(last[-1], type=Load)
    if batch_items:
        load = msgspec.structs.replace(load, requests=load.requests * batch_items, rps=load.rps * batch_items)
    return load


def answered_keys(keys_out: Path) -> set[str]:
    keys: set[str] = set()
    for name in glob.glob(f"{keys_out}.*"):
        keys.update(line for line in Path(name).read_text().splitlines() if line)
    return keys


async def quiesce(cache: Cache) -> int:
    """Wait until no charge is in flight (the outbox is empty); returns what is left."""
    deadline = time.monotonic() + QUIESCE_WAIT_S
    depth = await cache.outbox_depth()
    while depth and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        depth = await cache.outbox_depth()
    return depth


async def verify(pool: asyncpg.Pool, cache: Cache, *, run: str, keys_out: Path) -> Verification:
    """Match a run's 2xx answers with the ledger, then `centime check`."""
    left = await quiesce(cache)
    answered = answered_keys(keys_out)
    async with pool.acquire(timeout=BENCH_ACQUIRE_TIMEOUT_S) as conn:
        rows = await conn.fetch(Q["run_debits"], f"{run}-%")
    standing = {row["idempotency_key"] for row in rows if row["reversals"] == 0}
    report = await check(pool, cache)
    problems = [*report.entries_unbalanced, *report.reversals_mismatched, *report.wallets_drifted]
    if report.lines_total_micros:
        problems.append(f"all lines sum to {report.lines_total_micros}")
    if left:
        problems.append(f"{left} charges still in flight after {QUIESCE_WAIT_S:.0f} s")
    return Verification(
        answered_2xx=len(answered),
        in_ledger=len(standing),
        lost=len(answered - standing),
        duplicated=sum(row["entries"] - 1 for row in rows),
        committed_unanswered=len(standing - answered),
        check_ok=report.ok and not left,
        check_detail="; ".join(problems[:5]) or f"ok: {report.wallets_checked} wallets",
    )


# The Redis ceiling ----------------------------------------------------------


async def redis_ceiling(redis_url: str, seconds: int) -> Load:
    """redis-benchmark running wallet/lua/apply.lua, a debit per call, over
    REDIS_CEILING_WALLETS wallets, each call with its own idempotency key.

    redis-benchmark replaces each `__rand_int__` with its own random number
    below -r, so the idempotency key, made of five of them, is new at each
    call (10^20 choices: at a million calls a repeat has odds of about 1 in
    10^8; with three, 10^12 choices, a million calls repeated one about half
    the time) while the wallet key names one of the seeded wallets."""
    client = redis.Redis.from_url(redis_url)
    try:
        sha = await client.script_load(APPLY_SCRIPT.read_bytes())  # noqa: ASYNC240 -- once, small
        await _seed_ceiling_wallets(client)
        host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
        command = _ceiling_command(sha)

        def run(requests: int, tag: str) -> Load:
            return _redis_benchmark(host, port, command, requests=requests, tag=tag, seconds=seconds)

        probe = await asyncio.to_thread(run, 20_000, "probe")
        requests = int(min(max(probe.rps * seconds, 20_000), REDIS_CEILING_REQUESTS_MAX))
        load = await asyncio.to_thread(run, requests, "run")
        charged = await client.xlen(f"{REDIS_CEILING_PREFIX}:outbox")
        if charged != probe.requests + load.requests:
            raise SystemExit(
                f"bench: the Redis ceiling charged {charged} times, not {probe.requests + load.requests}: "
                "its calls were not all debits"
            )
        return load
    finally:
        keys = [key async for key in client.scan_iter(match="ceiling:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.unlink(*keys[start : start + 1000])
        await client.aclose()


async def _seed_ceiling_wallets(client: redis.Redis) -> None:
    """REDIS_CEILING_WALLETS wallets in Redis, each rich enough never to run out."""
    async with client.pipeline(transaction=False) as pipe:
        for n in range(REDIS_CEILING_WALLETS):
            pipe.hset(
                f"{REDIS_CEILING_PREFIX}:w:{n:012d}",
                mapping={"b": 10**15, "o": 0, "s": "active", "c": "usd", "e": "bench", "q": 0},
            )
        await pipe.execute()


def _ceiling_command(sha: str) -> list[str]:
    """The debit as one EVALSHA, with `__rand_int__` where redis-benchmark
    draws a wallet and an idempotency key, and `:RUN:` for the run's tag."""
    prefix = REDIS_CEILING_PREFIX
    payload = msgspec.json.encode(
        {
            "id": str(uuid7()),
            "wallet_id": str(uuid.uuid4()),
            "kind": "debit",
            "amount_micros": 1000,
            "idempotency_key": "bench-0000000000-0000000000",
            "request_hash": "0" * 32,
            "description": "bench",
            "metadata": {},
            "created_at": datetime.now(UTC).isoformat(),
        }
    ).decode()
    return [
        "EVALSHA",
        sha,
        "4",
        f"{prefix}:outbox",
        f"{prefix}:abandoned",
        f"{prefix}:w:__rand_int__",
        f"{prefix}:i:RUN:__rand_int__:__rand_int__:__rand_int__:__rand_int__:__rand_int__",
        "3600",
        str(2**53 - 1),
        "debit",
        "1000",
        "0" * 32,
        str(uuid7()),
        payload,
    ]


def _redis_benchmark(
    host: str, port: str, command: list[str], *, requests: int, tag: str, seconds: int
) -> Load:
    """One redis-benchmark run of `command`, `requests` times.

    redis-benchmark may draw the same random numbers in each run (seen with
    7.0: the second run replayed the first's 20,000 keys), so each run's
    keys carry a tag of their own."""
    args = ["redis-benchmark", "-h", host, "-p", port, "-c", str(REDIS_CEILING_CONNECTIONS)]
    args += ["-n", str(requests), "-r", str(REDIS_CEILING_WALLETS), "--csv"]
    args += [part.replace(":RUN:", f":{tag}:") for part in command]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds * 4 + 120)
    if done.returncode != 0:
        raise SystemExit(f"bench: redis-benchmark failed: {done.stderr.strip()[-500:]}")
    # The test's name (the command, with its JSON payload) is not escaped in
    # the CSV: read the seven figures that end the line.
    # rps, avg, min, p50, p95, p99, max
    figures = re.findall(r'"([0-9.]+)"', done.stdout.strip().splitlines()[-1])[-7:]
    rps, _, _, p50_ms, _, p99_ms, max_ms = (float(f) for f in figures)
    return Load(
        requests=requests, duration_s=requests / rps, rps=rps, p50_ms=p50_ms, p99_ms=p99_ms, max_ms=max_ms
    )


# The ledger writer and raw COPY ----------------------------------------------

ENTRY_COLUMNS = (
    "id",
    "kind",
    "currency",
    "wallet_id",
    "amount_micros",
    "balance_micros",
    "idempotency_key",
    "request_hash",
    "description",
    "metadata",
    "created_at",
    "committed_at",
)
LINE_COLUMNS = ("entry_id", "line_no", "account_id", "currency", "amount_micros")


def _debit(wallet_id: uuid.UUID, n: int, run: str) -> EntryRecord:
    return EntryRecord(
        id=uuid7(),
        kind="debit",
        currency="usd",
        wallet_id=wallet_id,
        amount_micros=1000,
        balance_micros=0,
        idempotency_key=f"{run}-{n}",
        request_hash="0" * 32,
        description="bench",
        created_at=datetime.now(UTC),
        lines=debit_lines(wallet_id, "usd", 1000),
    )


async def ledger_writer(
    database_url: str, wallets: list[uuid.UUID], seconds: int, *, batch_entries_max: int, connections: int
) -> tuple[Load, list[EntryRecord]]:
    """Entries/s that the group-commit writer commits, with LEDGER_IN_FLIGHT_MAX
    entries submitted at any time, for `seconds`."""
    writer: LedgerWriter[Outcome] = LedgerWriter(
        lambda: asyncpg.connect(database_url, timeout=10),
        batch_entries_max=batch_entries_max,
        connections=connections,
        timeout_s=10,
    )
    writer.start()
    # As `centime serve` does at startup (centime/app.py): what exists now is
    # long-lived, out of the collector's sight.
    gc.collect()
    gc.freeze()
    run = f"ledger-{secrets.token_hex(4)}"
    # In flight at most LEDGER_IN_FLIGHT_MAX: a count and an event (an
    # asyncio.Semaphore costs more per call than the writer's submit).
    in_flight = 0
    room = asyncio.Event()
    written: list[EntryRecord] = []
    failed = 0
    latencies_ms: list[float] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + seconds
    # Only the futures still pending are kept (a server keeps none): a list of
    # every future of the run would have the collector walk hundreds of
    # thousands of them, a cost of this harness, not of the writer.
    pending: set[asyncio.Future[Outcome]] = set()
    n = 0

    def done(entry: EntryRecord, submitted: float, future: asyncio.Future[Outcome]) -> None:
        nonlocal failed, in_flight
        pending.discard(future)
        in_flight -= 1
        room.set()
        if not future.cancelled() and future.exception() is None and isinstance(future.result(), Committed):
            written.append(entry)
            latencies_ms.append((loop.time() - submitted) * 1000)
        else:
            failed += 1

    try:
        while loop.time() < deadline:
            while in_flight >= LEDGER_IN_FLIGHT_MAX:
                room.clear()
                await room.wait()
            in_flight += 1
            entry = _debit(wallets[n % len(wallets)], n, run)
            n += 1
            future = writer.submit(entry)
            submitted = loop.time()
            future.add_done_callback(lambda f, e=entry, t=submitted: done(e, t, f))
            pending.add(future)
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await writer.stop()
    elapsed = loop.time() - started
    if failed:
        raise SystemExit(f"bench: the ledger writer failed {failed} entries")
    return _committed_load(latencies_ms, elapsed), written


def _committed_load(latencies_ms: list[float], elapsed_s: float) -> Load:
    """The rate and latencies of the entries committed in `elapsed_s`."""
    latencies_ms.sort()
    return Load(
        requests=len(latencies_ms),
        duration_s=elapsed_s,
        rps=len(latencies_ms) / elapsed_s,
        p50_ms=latencies_ms[len(latencies_ms) // 2],
        p99_ms=latencies_ms[int(len(latencies_ms) * 0.99)],
    )


async def raw_copy(database_url: str, entries: list[EntryRecord]) -> Load:
    """The same rows, COPYed in one transaction into tables shaped like the
    ledger's (with its indexes, without its triggers and foreign keys)."""
    now = datetime.now(UTC)
    entry_rows = [
        (
            e.id,
            e.kind,
            e.currency,
            e.wallet_id,
            e.amount_micros,
            e.balance_micros,
            e.idempotency_key,
            e.request_hash,
            e.description,
            json.dumps(e.metadata),
            e.created_at,
            now,
        )
        for e in entries
    ]
    line_rows = [
        (e.id, number, line.account_id, e.currency, line.amount_micros)
        for e in entries
        for number, line in enumerate(e.lines)
    ]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(Q["copy_tables"])
        started = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table("bench_copy_entries", records=entry_rows, columns=ENTRY_COLUMNS)
            await conn.copy_records_to_table("bench_copy_lines", records=line_rows, columns=LINE_COLUMNS)
        elapsed = time.perf_counter() - started
        await conn.execute("DROP TABLE bench_copy_lines, bench_copy_entries")
    finally:
        await conn.close()
    return Load(requests=len(entries), duration_s=elapsed, rps=len(entries) / elapsed, p50_ms=0, p99_ms=0)


# locust: the realistic mix ---------------------------------------------------


def locust(url: str, seconds: int, *, key: str, wallets_file: Path, users: int) -> Load | None:
    """bench/locustfile.py headless, its HTML report in bench/results/locust.html."""
    env = {**os.environ, "CENTIME_KEY": key, "WALLETS": str(wallets_file)}
    command = ["locust", "-f", "bench/locustfile.py", "--headless", "-u", str(users), "-r", str(users)]
    command += ["-t", f"{seconds}s", "--host", url, "--only-summary", "--loglevel", "WARNING"]
    command += ["--html", "bench/results/locust.html", "--csv", "bench/results/locust"]
    try:
        subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    except FileNotFoundError:
        say("locust is not installed (uv run --group bench): skipped")
        return None
    stats = Path("bench/results/locust_stats.csv")
    if not stats.exists():
        say("locust wrote no statistics: skipped")
        return None
    rows = {row["Name"]: row for row in csv.DictReader(stats.read_text().splitlines())}
    total: dict[str, Any] = rows["Aggregated"]
    requests = int(total["Request Count"])
    if requests == 0 or "N/A" in (total["50%"], total["99%"]):
        say(f"locust answered no requests in {seconds} s: skipped")
        return None
    return Load(
        requests=requests,
        duration_s=float(seconds),
        rps=float(total["Requests/s"]),
        p50_ms=float(total["50%"]),
        p90_ms=float(total["90%"]),
        p99_ms=float(total["99%"]),
        max_ms=float(total["Max Response Time"]),
        non_2xx=int(total["Failure Count"]),
    )
