"""Shared fixtures: real Postgres and Redis, a fresh database per run.

Storage, in order: CENTIME_DATABASE_URL / CENTIME_REDIS_URL from the
environment; else 127.0.0.1:5432 and :6379 if they answer; else embedded
ones under a temporary directory. Each run creates its own database (and
template, for tests that need a private one) and its own Redis key prefix,
and removes them at the end.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as redis
from stripe_support import FakeStripe, register_webhook, start_fake_stripe

from centime.auth import create_api_key
from centime.migrate import migrate_database
from centime.settings import Settings, load_settings
from wallet.cache import Cache

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = secrets.token_hex(4)
CONNECT_TIMEOUT_S = 60
"""How long a test may wait to connect to Postgres (asyncpg's default)."""


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_database(url: str, name: str) -> str:
    """The same server URL, naming another database."""
    base, _, rest = url.rpartition("/")
    query = "?" + rest.split("?", 1)[1] if "?" in rest else ""
    return f"{base}/{name}{query}"


class Stores(msgspec.Struct, frozen=True):
    server_url: str  # a database URL on the server, used to create and drop databases
    redis_url: str


@pytest.fixture(scope="session")
def stores() -> Iterator[Stores]:
    database_url = os.environ.get("CENTIME_DATABASE_URL")
    redis_url = os.environ.get("CENTIME_REDIS_URL")
    if database_url and redis_url:
        yield Stores(database_url, redis_url)
        return
    if _answers("127.0.0.1", 5432) and _answers("127.0.0.1", 6379):
        yield Stores("postgresql://postgres@127.0.0.1:5432/postgres", "redis://127.0.0.1:6379/0")
        return
    from centime.embedded import embedded_stores

    with (
        tempfile.TemporaryDirectory(prefix="centime-test-") as tmp,
        embedded_stores(Path(tmp)) as embedded,
    ):
        yield Stores(embedded.database_url, embedded.redis_url)


async def create_database(stores: Stores, name: str, template: str | None = None) -> str:
    conn = await asyncpg.connect(stores.server_url)
    try:
        suffix = f" TEMPLATE {template}" if template else ""
        await conn.execute(f"CREATE DATABASE {name}{suffix}")
    finally:
        await conn.close()
    return with_database(stores.server_url, name)


async def drop_database(stores: Stores, name: str) -> None:
    conn = await asyncpg.connect(stores.server_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def account_balance(conn: asyncpg.Connection, account_id: uuid.UUID) -> int:
    """The ledger's own word on an account: minus the sum of its lines (a
    wallet's balance), read straight from journal_lines as an oracle."""
    return await conn.fetchval(
        "SELECT coalesce(-sum(amount_micros), 0)::bigint FROM journal_lines WHERE account_id = $1", account_id
    )


@pytest.fixture(scope="session")
async def template_database(stores: Stores) -> AsyncIterator[str]:
    """A migrated, empty database to clone: CREATE DATABASE ... TEMPLATE is fast."""
    name = f"centime_tmpl_{RUN_ID}"
    await migrate_database(await create_database(stores, name), connect_timeout_s=CONNECT_TIMEOUT_S)
    yield name
    await drop_database(stores, name)


@pytest.fixture(scope="session")
async def database_url(stores: Stores, template_database: str) -> AsyncIterator[str]:
    """The run's shared database, migrated."""
    name = f"centime_test_{RUN_ID}"
    url = await create_database(stores, name, template_database)
    yield url
    await drop_database(stores, name)


@pytest.fixture
async def private_database(stores: Stores, template_database: str) -> AsyncIterator[str]:
    """A database of the test's own, for tests that check global invariants."""
    name = f"centime_priv_{RUN_ID}_{secrets.token_hex(3)}"
    url = await create_database(stores, name, template_database)
    yield url
    await drop_database(stores, name)


async def delete_prefix(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        batch = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.delete(*batch)
                batch.clear()
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
async def settings(stores: Stores, database_url: str) -> AsyncIterator[Settings]:
    prefix = f"t{RUN_ID}"
    yield msgspec.structs.replace(
        load_settings({}),
        database_url=database_url,
        redis_url=stores.redis_url,
        redis_prefix=prefix,
        partition_count=16,
    )
    await delete_prefix(stores.redis_url, prefix)


def settings_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment that gives a subprocess these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CENTIME_")}
    for field in msgspec.structs.fields(Settings):
        value = getattr(settings, field.name)
        if value is not None:
            env[f"CENTIME_{field.name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    env.update(overrides)
    return env


class Server(msgspec.Struct):
    base_url: str
    process: subprocess.Popen
    env: dict[str, str]
    port: int


def start_server(
    settings: Settings,
    *,
    port: int | None = None,
    log: IO[bytes] | None = None,
    serve_args: tuple[str, ...] = (),
    **env_overrides: str,
) -> Server:
    """`centime serve` on a port (with `serve_args`); its log (stderr) goes to `log`, else to the test's stderr."""
    port = port or free_port()
    env = settings_env(settings, **env_overrides)
    process = subprocess.Popen(
        [sys.executable, "-m", "centime", "serve", "--port", str(port), *serve_args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    server = Server(f"http://127.0.0.1:{port}", process, env, port)
    wait_ready(server)
    return server


def wait_ready(server: Server, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.base_url + "/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def server(settings: Settings) -> Iterator[Server]:
    """centime serving over real HTTP, on the run's database and Redis prefix."""
    running = start_server(settings)
    yield running
    stop_server(running)


class Keys(msgspec.Struct, frozen=True):
    admin: str
    debit: str
    read: str


async def make_keys(database_url: str) -> Keys:
    conn = await asyncpg.connect(database_url)
    try:
        secrets_by_scope = {}
        for scope in ("admin", "debit", "read"):
            _, secrets_by_scope[scope] = await create_api_key(conn, f"test-{scope}", scope)
        return Keys(**secrets_by_scope)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def keys(database_url: str) -> Keys:
    return await make_keys(database_url)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30, limits=limits) as http:
        yield http


def auth(key: str, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


async def new_wallet(
    http: httpx.AsyncClient,
    keys: Keys,
    *,
    funded_micros: int = 0,
    overdraft_limit_micros: int = 0,
    currency: str = "usd",
) -> str:
    response = await http.post(
        "/v1/wallets",
        json={
            "owner_id": f"owner-{secrets.token_hex(6)}",
            "currency": currency,
            "overdraft_limit_micros": overdraft_limit_micros,
        },
        headers=auth(keys.admin),
    )
    assert response.status_code == 201, response.text
    wallet_id = response.json()["id"]
    if funded_micros:
        response = await http.post(
            f"/v1/wallets/{wallet_id}/credits",
            json={"amount_micros": funded_micros, "reason": "test funding"},
            headers=auth(keys.admin, f"fund-{secrets.token_hex(6)}"),
        )
        assert response.status_code == 201, response.text
    return wallet_id


def run_cli(settings: Settings, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "centime", *args],
        cwd=ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


# Stripe: localstripe over real HTTP (tests/fake_stripe.py) -------------------------

STRIPE_FEE_BPS = 290
STRIPE_FEE_FIXED_MINOR = 30
STRIPE_WEBHOOK_SECRET = f"whsec_test_{RUN_ID}"


@pytest.fixture(scope="session")
def fake_stripe() -> Iterator[FakeStripe]:
    """One fake Stripe for the run, charging 2.9% + 30 minor units per charge."""
    fake = start_fake_stripe(fee_bps=STRIPE_FEE_BPS, fee_fixed_minor=STRIPE_FEE_FIXED_MINOR)
    yield fake
    fake.stop()


def with_stripe(settings: Settings, fake: FakeStripe) -> Settings:
    return msgspec.structs.replace(
        settings,
        stripe_secret_key="sk_test_centime",
        stripe_publishable_key="pk_test_centime",
        stripe_webhook_secret=STRIPE_WEBHOOK_SECRET,
        stripe_api_base=fake.base_url,
    )


@pytest.fixture(scope="session")
def stripe_settings(settings: Settings, fake_stripe: FakeStripe) -> Settings:
    return with_stripe(settings, fake_stripe)


@pytest.fixture(scope="session")
def stripe_server(stripe_settings: Settings, fake_stripe: FakeStripe) -> Iterator[Server]:
    """centime with top-ups on, the fake Stripe's webhooks pointed at it."""
    running = start_server(stripe_settings)
    register_webhook(
        fake_stripe.base_url,
        running.base_url + "/v1/webhooks/stripe",
        STRIPE_WEBHOOK_SECRET,
        webhook_id=f"centime-{running.port}",
    )
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def silent_fake_stripe() -> Iterator[FakeStripe]:
    """A second fake Stripe, with the same fees, that delivers no webhooks: a test sends
    each event itself, so no delivery of the fake's races it. A test that switches an
    outage on switches it off again (FakeStripe.outage)."""
    fake = start_fake_stripe(fee_bps=STRIPE_FEE_BPS, fee_fixed_minor=STRIPE_FEE_FIXED_MINOR)
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def silent_stripe_server(settings: Settings, silent_fake_stripe: FakeStripe) -> Iterator[Server]:
    """centime with top-ups on the silent fake, on the run's database and Redis prefix."""
    running = start_server(with_stripe(settings, silent_fake_stripe))
    yield running
    stop_server(running)


# Postgres and Redis of a test's own, in-process -------------------------------------

HARNESS_PARTITIONS = 4
"""Few partitions: tests put several wallets in one."""


class Harness(msgspec.Struct):
    pool: asyncpg.Pool
    cache: Cache


@pytest.fixture
async def cache(settings: Settings) -> AsyncIterator[Cache]:
    """A Cache under a Redis prefix of the test's own: no running server or
    sweeper reads its outboxes. For the Lua scripts alone (no database)."""
    prefix = f"{settings.redis_prefix}c{secrets.token_hex(3)}"
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    try:
        yield Cache(client, prefix=prefix, partition_count=HARNESS_PARTITIONS)
    finally:
        await client.aclose()
        await delete_prefix(settings.redis_url, prefix)


@pytest.fixture
async def harness(settings: Settings, private_database: str) -> AsyncIterator[Harness]:
    """A database of the test's own (jobs like drain, rebuild, check and find_drift look at
    every wallet) and a Redis prefix of its own."""
    pool = await asyncpg.create_pool(private_database, min_size=1, max_size=12)
    prefix = f"{settings.redis_prefix}h{secrets.token_hex(3)}"
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    try:
        yield Harness(pool, Cache(client, prefix=prefix, partition_count=HARNESS_PARTITIONS))
    finally:
        await client.aclose()
        await delete_prefix(settings.redis_url, prefix)
        await pool.close()
