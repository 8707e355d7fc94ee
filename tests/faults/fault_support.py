"""Helpers shared by the fault tests: a recorded debit load, and read-only
views of the ledger (Postgres) and the hot balances (Redis) to judge it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as redis
from conftest import (
    CONNECT_TIMEOUT_S,
    RUN_ID,
    Keys,
    auth,
    delete_prefix,
    free_port,
    make_keys,
    with_stripe,
)
from stripe_support import FakeStripe, pay, stripe_client

from centime.migrate import migrate_database
from centime.settings import Settings
from wallet.cache import Cache

AMOUNT_MICROS = 1_000
SETTLE_TIMEOUT_S = 30.0

# Short settling windows so the sweeper acts within a test. Settings require
# grace >= commit + Redis (1000 ms) + 3 x database timeout.
FAULT_ENV = {
    "CENTIME_SWEEPER_GRACE_MS": "3000",
    "CENTIME_SWEEPER_INTERVAL_MS": "200",
    "CENTIME_COMMIT_TIMEOUT_MS": "500",
    "CENTIME_DATABASE_TIMEOUT_MS": "500",
}


PG_BIN = Path("/usr/lib/postgresql/15/bin")
needs_cluster = pytest.mark.skipif(
    not (PG_BIN / "pg_ctl").exists() or os.geteuid() != 0 or shutil.which("runuser") is None,
    reason="needs root, runuser and the Debian Postgres 15 binaries to run a private cluster",
)


class Cluster(msgspec.Struct):
    """A Postgres server of a test's own, on a free loopback port, to stop or freeze."""

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


@contextlib.contextmanager
def private_cluster() -> Iterator[Cluster]:
    """A Cluster, initialised and started; stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix="centime-pg-"))
    postgres = pwd.getpwnam("postgres")
    os.chown(root, postgres.pw_uid, postgres.pw_gid)
    cluster = Cluster(root, free_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


async def migrated_database(cluster: Cluster) -> str:
    """A migrated database `centime` on the cluster; its URL."""
    conn = await asyncpg.connect(cluster.url("postgres"))
    try:
        await conn.execute("CREATE DATABASE centime")
    finally:
        await conn.close()
    database_url = cluster.url("centime")
    await migrate_database(database_url, connect_timeout_s=CONNECT_TIMEOUT_S)
    return database_url


@contextlib.asynccontextmanager
async def stores_of_own(settings: Settings, database_url: str) -> AsyncIterator[tuple[Settings, Keys]]:
    """Settings on this database with a Redis prefix of their own, and API
    keys; the prefix's keys are deleted after."""
    own = msgspec.structs.replace(settings, database_url=database_url, redis_prefix=unique_prefix())
    try:
        yield own, await make_keys(database_url)
    finally:
        assert own.redis_url is not None
        await delete_prefix(own.redis_url, own.redis_prefix)


def on_own_redis(settings: Settings, database_url: str, redis: RedisServer, fake: FakeStripe) -> Settings:
    """Settings on this database and private Redis, under a prefix of their own, with
    top-ups on `fake`."""
    own = msgspec.structs.replace(
        settings, database_url=database_url, redis_url=redis.url, redis_prefix=unique_prefix()
    )
    return with_stripe(own, fake)


def unique_prefix() -> str:
    """A Redis key prefix of the test's own: outboxes are per prefix, so a
    sweeper of another database must never see this test's orphans."""
    return f"f{RUN_ID}{secrets.token_hex(3)}"


REDIS_START_TIMEOUT_S = 10.0


class RedisServer(msgspec.Struct):
    url: str
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path

    def stop(self) -> None:
        """Redis goes down, saving its data first, as one with persistence does."""
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown", "save"], capture_output=True, timeout=10
        )
        self.process.wait(timeout=10)

    def start(self) -> None:
        """Redis is back on its port, with the data it saved when it went down."""
        self.process = _start_redis(self.port, self.data_dir)


def _start_redis(port: int, data_dir: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(data_dir), "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    ping = ["redis-cli", "-p", str(port), "ping"]
    try:
        while subprocess.run(ping, capture_output=True, text=True).stdout.strip() != "PONG":
            assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    return process


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free loopback port, to flush,
    stall or stop without touching the shared one. It saves nothing unless
    stopped (RedisServer.stop)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-cli to run a private Redis")
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="centime-redis-"))
    server = RedisServer(f"redis://127.0.0.1:{port}/0", _start_redis(port, data_dir), port, data_dir)
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.process.pid, signal.SIGCONT)  # if a test left it stopped
        server.process.terminate()
        server.process.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)


class Answer(msgspec.Struct, kw_only=True):
    """What the client saw for one idempotency key."""

    key: str
    wallet_id: str
    amount_micros: int
    started: float
    latency_s: float
    status: int | None = None  # None: no answer (connection cut, timeout)
    code: str | None = None  # problem+json code of an error answer
    detail: str | None = None
    content_type: str | None = None
    entry_id: str | None = None
    replayed: bool = False
    error: str | None = None


def body_for(answer: Answer) -> dict[str, object]:
    """The request body of a key: the same on every retry."""
    return {"amount_micros": answer.amount_micros, "description": f"fault load {answer.key}"}


async def post_debit(http: httpx.AsyncClient, keys: Keys, answer: Answer) -> Answer:
    """Send (or resend) the debit of `answer`, and record what came back."""
    started = time.monotonic()
    answer.started = started
    try:
        response = await http.post(
            f"/v1/wallets/{answer.wallet_id}/debits",
            json=body_for(answer),
            headers=auth(keys.debit, answer.key),
        )
    except httpx.HTTPError as exc:
        answer.status = None
        answer.error = f"{type(exc).__name__}: {exc}"
        answer.latency_s = time.monotonic() - started
        return answer
    answer.latency_s = time.monotonic() - started
    answer.status = response.status_code
    answer.content_type = response.headers.get("content-type")
    answer.replayed = response.headers.get("idempotent-replayed") == "true"
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code == 201:
        answer.entry_id = body.get("id")
    else:
        answer.code = body.get("code")
        answer.detail = body.get("detail")
    return answer


async def debit_load(
    base_url: str,
    keys: Keys,
    wallet_ids: list[str],
    stop: asyncio.Event,
    *,
    concurrency: int = 48,
    timeout_s: float = 30.0,
    on_answer: Callable[[Answer], None] | None = None,
) -> list[Answer]:
    """Debit round-robin over the wallets from `concurrency` workers, each
    request with a fresh idempotency key, until `stop` is set."""
    answers: list[Answer] = []
    counter = iter(range(10**9))
    run = secrets.token_hex(3)

    async def worker() -> None:
        # A client per worker: one connection each, so a request never
        # queues inside a shared pool and is on the wire while it waits.
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as http:
            await _work(http)

    async def _work(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            n = next(counter)
            answer = Answer(
                key=f"load-{run}-{n}",
                wallet_id=wallet_ids[n % len(wallet_ids)],
                amount_micros=AMOUNT_MICROS + n % 7,
                started=0.0,
                latency_s=0.0,
            )
            answers.append(answer)
            await post_debit(http, keys, answer)
            if on_answer is not None:
                on_answer(answer)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


def summary(answers: list[Answer]) -> Counter[str]:
    return Counter(str(a.status) if a.status is not None else (a.error or "?").split(":")[0] for a in answers)


class LedgerDebit(msgspec.Struct, frozen=True):
    id: uuid.UUID
    wallet_id: uuid.UUID
    amount_micros: int
    reversed_by: uuid.UUID | None


async def ledger_debits(database_url: str) -> dict[str, list[LedgerDebit]]:
    """Every debit in the ledger by idempotency key, with its reversal."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """
            SELECT e.id, e.wallet_id, e.amount_micros, e.idempotency_key, r.id AS reversed_by
              FROM journal_entries e
              LEFT JOIN journal_entries r ON r.reverses_entry_id = e.id
             WHERE e.kind = 'debit'
            """
        )
    finally:
        await conn.close()
    by_key: dict[str, list[LedgerDebit]] = {}
    for row in rows:
        by_key.setdefault(row["idempotency_key"], []).append(
            LedgerDebit(row["id"], row["wallet_id"], row["amount_micros"], row["reversed_by"])
        )
    return by_key


async def ledger_balances(database_url: str, wallet_ids: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """
            SELECT w.id, coalesce(-sum(l.amount_micros), 0)::bigint AS balance
              FROM wallets w LEFT JOIN journal_lines l ON l.account_id = w.id
             WHERE w.id = ANY($1::uuid[])
             GROUP BY w.id
            """,
            [uuid.UUID(w) for w in wallet_ids],
        )
    finally:
        await conn.close()
    return {str(row["id"]): row["balance"] for row in rows}


def expected_balances(
    funded_micros: dict[str, int], answers: list[Answer], ledger: dict[str, list[LedgerDebit]]
) -> dict[str, int]:
    """What each wallet must hold: its funding less every debit of these
    answers that stands in the ledger, once each. A debit charged twice
    anywhere (Redis, or the lines of one entry) shows against this."""
    expected = dict(funded_micros)
    wallet_of_key = {a.key: a.wallet_id for a in answers}  # a retry shares its key
    for key, wallet_id in wallet_of_key.items():
        for e in ledger.get(key, []):
            if e.reversed_by is None:
                expected[wallet_id] -= e.amount_micros
    return expected


def cache_for(settings: Settings) -> tuple[redis.Redis, Cache]:
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    return client, Cache(client, prefix=settings.redis_prefix, partition_count=settings.partition_count)


async def redis_balances(settings: Settings, wallet_ids: list[str]) -> dict[str, int | None]:
    client, cache = cache_for(settings)
    try:
        values = await cache.balances([uuid.UUID(w) for w in wallet_ids])
    finally:
        await client.aclose()
    return dict(zip(wallet_ids, values, strict=True))


async def unsettled(settings: Settings) -> int:
    """Entries in the outboxes and abandoned sets of this prefix."""
    client, cache = cache_for(settings)
    try:
        return await cache.outbox_depth()
    finally:
        await client.aclose()


async def wait_settled(settings: Settings, timeout_s: float = SETTLE_TIMEOUT_S) -> float:
    """Wait until the sweeper has settled every outbox and abandoned entry
    (seen empty twice in a row). Returns the seconds it took."""
    started = time.monotonic()
    empty_polls = 0
    depth = -1
    while time.monotonic() - started < timeout_s:
        depth = await unsettled(settings)
        empty_polls = empty_polls + 1 if depth == 0 else 0
        if empty_polls >= 2:
            return time.monotonic() - started
        await asyncio.sleep(0.25)
    raise AssertionError(f"the sweeper left {depth} entries unsettled after {timeout_s} s")


def classify(answers: list[Answer], ledger: dict[str, list[LedgerDebit]]) -> dict[str, list[str]]:
    """Check invariant 3 of the design for every key, and list violations.
    (Two debits of one key cannot be: the ledger's unique index forbids it, so
    that is not checked here. What can go wrong is what the entry charged:
    `wrong_charge`, and the balances, which expected_balances checks.)"""
    problems: dict[str, list[str]] = {"ok_not_once": [], "error_charged": [], "wrong_charge": []}
    for a in answers:
        entries = ledger.get(a.key, [])
        standing = [e for e in entries if e.reversed_by is None]
        if a.status == 201:
            if len(standing) != 1 or str(entries[0].id) != a.entry_id:
                problems["ok_not_once"].append(f"{a.key}: answered 201 {a.entry_id}, ledger {entries}")
        elif a.status is not None and standing:
            problems["error_charged"].append(
                f"{a.key}: answered {a.status} {a.code} ({a.detail}), ledger {entries}"
            )
        for e in entries:
            if (str(e.wallet_id), e.amount_micros) != (a.wallet_id, a.amount_micros):
                problems["wrong_charge"].append(
                    f"{a.key}: asked {a.amount_micros} of {a.wallet_id}, ledger {e}"
                )
    return {kind: found for kind, found in problems.items() if found}


async def flush_redis(redis_url: str) -> None:
    """FLUSHALL of a test's own redis-server (never the shared one)."""
    client = redis.Redis.from_url(redis_url)
    try:
        await client.flushall()
        assert await client.dbsize() == 0
    finally:
        await client.aclose()


async def paid_intent(
    http: httpx.AsyncClient, keys: Keys, fake: FakeStripe, wallet_id: str, amount_micros: int
) -> dict[str, object]:
    """A top-up of `amount_micros` paid at the fake: its PaymentIntent as Stripe
    shows it (the success event is not delivered: make_event builds it)."""
    created = await http.post(
        f"/v1/wallets/{wallet_id}/topups", json={"amount_micros": amount_micros}, headers=auth(keys.debit)
    )
    assert created.status_code == 201, created.text
    client = stripe_client(fake.base_url)
    intent_id = created.json()["payment_intent_id"]
    await pay(client, intent_id)
    return (await client.v1.payment_intents.retrieve_async(intent_id)).to_dict()
