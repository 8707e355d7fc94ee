"""With Postgres stopped (or frozen) in the middle of a debit load, every debit answers
in bounded time with 201, 402 or a problem+json 503 (never a 500 or a hang);
once Postgres is back the server recovers by itself, the sweeper settles the
abandoned charges, every 201 is in the ledger once, no 503 stands charged,
and Redis agrees with the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest
from conftest import (
    Keys,
    Server,
    delete_prefix,
    free_port,
    make_keys,
    new_wallet,
    run_cli,
    start_server,
    stop_server,
)
from fault_support import (
    AMOUNT_MICROS,
    classify,
    debit_load,
    ledger_balances,
    ledger_debits,
    post_debit,
    redis_balances,
    summary,
    unique_prefix,
    wait_settled,
)
from fault_support import (
    FAULT_ENV as SHARED_FAULT_ENV,
)

from centime.migrate import migrate
from centime.settings import Settings

PG_BIN = Path("/usr/lib/postgresql/15/bin")
pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(
        not (PG_BIN / "pg_ctl").exists() or os.geteuid() != 0 or shutil.which("runuser") is None,
        reason="needs root, runuser and the Debian Postgres 15 binaries to run a private cluster",
    ),
]
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


class Cluster(msgspec.Struct):
    """A Postgres server of this test's own, on a free loopback port."""

    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _pg(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        )

    def init(self) -> None:
        self._pg(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c max_connections=100"
        self._pg(
            str(PG_BIN / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.root / "log"), "-w",
            "-t", "30", "-o", options,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._pg(str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "30")

    def processes(self) -> list[int]:
        """The postmaster and its children (backends, walwriter, ...)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    def freeze(self) -> list[int]:
        """Postgres hangs (a stalled host, a partition): SIGSTOP every process."""
        pids = self.processes()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    def thaw(self, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "log").read_text()
        return ""


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="centime-pg-"))
    postgres = pwd.getpwnam("postgres")
    os.chown(root, postgres.pw_uid, postgres.pw_gid)
    own = Cluster(root, free_port())
    try:
        own.init()
        own.start()
        yield own
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            own.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def own(settings: Settings, cluster: Cluster) -> AsyncIterator[tuple[Settings, Keys]]:
    conn = await asyncpg.connect(cluster.url("postgres"))
    try:
        await conn.execute("CREATE DATABASE centime")
    finally:
        await conn.close()
    database_url = cluster.url("centime")
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    own = msgspec.structs.replace(settings, database_url=database_url, redis_prefix=unique_prefix())
    try:
        yield own, await make_keys(database_url)
    finally:
        assert own.redis_url is not None
        await delete_prefix(own.redis_url, own.redis_prefix)


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
        assert classify(answers, ledger) == {}
        failed = [a for a in answers if a.status == 503]
        reversed_503 = [a for a in failed if a.key in ledger]

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
