"""Proves embedded_stores starts a real Postgres and Redis under a data dir, serves asyncpg and
redis-py over 127.0.0.1, stops both on exit, keeps their data across restarts, and recovers from
a crashed run's leftover servers and stale pid files."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import msgspec
import psutil
import pytest
import redis.asyncio as aioredis

from centime.embedded import EmbeddedStores, embedded_stores


def _accepts(url: str) -> bool:
    """True if something accepts TCP connections on the url's host:port."""
    host_port = url.split("@")[-1].split("//")[-1].split("/")[0]
    host, port = host_port.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


async def _fetchval(url: str, query: str) -> object:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def _exercise(stores: EmbeddedStores) -> None:
    conn = await asyncpg.connect(stores.database_url, timeout=10)
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("select current_database()") == "centime"
        await conn.execute("create table scratch (id bigint primary key)")
        await conn.execute("drop table scratch")
        await conn.execute("create table kept (id bigint primary key, note text)")
        await conn.execute("insert into kept values (42, 'written in run one')")
    finally:
        await conn.close()

    r = aioredis.from_url(stores.redis_url, socket_timeout=5)
    try:
        assert await r.set("greeting", "hello")
        assert await r.get("greeting") == b"hello"
        script = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
        assert await r.eval(script, 1, "balance", 7) == 7
        assert await r.eval(script, 1, "balance", -2) == 5
        entry_id = await r.xadd("outbox", {"amount_micros": "5"})
        assert await r.xlen("outbox") == 1
        assert entry_id
    finally:
        await r.aclose()


async def _read_back(stores: EmbeddedStores) -> tuple[list[tuple[int, str]], bytes | None]:
    conn = await asyncpg.connect(stores.database_url, timeout=10)
    try:
        rows = [tuple(r) for r in await conn.fetch("select id, note from kept")]
    finally:
        await conn.close()
    r = aioredis.from_url(stores.redis_url, socket_timeout=5)
    try:
        return rows, await r.get("greeting")
    finally:
        await r.aclose()


def test_start_use_stop_and_restart_keeps_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "centime data"  # does not exist yet; a space in the path
    with embedded_stores(data_dir) as stores:
        assert stores.database_url.startswith("postgresql://postgres@127.0.0.1:")
        assert stores.database_url.endswith("/centime")
        assert stores.redis_url.startswith("redis://127.0.0.1:")
        assert (data_dir / "postgres" / "PG_VERSION").exists()
        asyncio.run(_exercise(stores))
    assert not _accepts(stores.database_url)
    assert not _accepts(stores.redis_url)
    assert not (data_dir / "postgres" / "postmaster.pid").exists()
    assert (data_dir / "redis" / "dump.rdb").exists()  # saved on shutdown

    with embedded_stores(data_dir) as again:
        rows, greeting = asyncio.run(_read_back(again))
    assert rows == [(42, "written in run one")]
    assert greeting == b"hello"
    assert not _accepts(again.database_url)
    assert not _accepts(again.redis_url)


def test_stops_on_exception_and_shares_between_nested_users(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), embedded_stores(tmp_path) as stores:
        raise KeyboardInterrupt
    assert not _accepts(stores.database_url)
    assert not _accepts(stores.redis_url)

    with embedded_stores(tmp_path) as outer:
        with embedded_stores(tmp_path) as inner:
            assert inner == outer  # joined, not started twice
        assert _accepts(outer.database_url)  # the inner exit left them running
        assert _accepts(outer.redis_url)
    assert not _accepts(outer.database_url)
    assert not _accepts(outer.redis_url)


CHILD = textwrap.dedent(
    """
    import sys, time, msgspec
    from pathlib import Path
    from centime.embedded import embedded_stores
    with embedded_stores(Path(sys.argv[1])) as stores:
        print(msgspec.json.encode(stores).decode(), flush=True)
        time.sleep(600)
    """
)


@pytest.fixture
def start_child(tmp_path: Path) -> Iterator[Callable[[], tuple[subprocess.Popen, EmbeddedStores]]]:
    """Starts a process that holds embedded_stores(tmp_path) open; kills it at teardown."""
    children: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[subprocess.Popen, EmbeddedStores]:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE)
        children.append(child)
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 90)
        assert ready, "the child did not start the embedded stores within 90 s"
        return child, msgspec.json.decode(child.stdout.readline(), type=EmbeddedStores)

    yield start
    for child in children:
        child.kill()
        child.wait(10)
        assert child.stdout is not None
        child.stdout.close()


def _gone(pid: int) -> bool:
    """True if pid has exited (a zombie counts: PID 1 in a container may be slow to reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _pid(pidfile: Path) -> int:
    return int(pidfile.read_text().split()[0])


@pytest.mark.faults
def test_recovers_from_a_killed_run_and_stale_pid_files(tmp_path: Path, start_child) -> None:
    child, crashed = start_child()
    pg_pid = _pid(tmp_path / "postgres" / "postmaster.pid")
    redis_pid = _pid(tmp_path / "redis" / "redis.pid")
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert _accepts(crashed.database_url)  # left behind by the killed process
    assert _accepts(crashed.redis_url)

    with embedded_stores(tmp_path) as stores:  # stops the leftovers, starts afresh
        assert _gone(pg_pid)
        assert _gone(redis_pid)
        assert asyncio.run(_fetchval(stores.database_url, "select 1")) == 1

    # A pid file naming a live process that is not our server (pid reuse after a reboot).
    (tmp_path / "postgres" / "postmaster.pid").write_text(f"{os.getpid()}\n{tmp_path}\n")
    (tmp_path / "redis" / "redis.pid").write_text(f"{os.getpid()}\n")
    with embedded_stores(tmp_path) as stores:
        assert asyncio.run(_fetchval(stores.database_url, "select 1")) == 1
    assert not _accepts(stores.database_url)
    assert not _accepts(stores.redis_url)

    # SIGTERM to a process inside the context stops both servers.
    child, running = start_child()
    child.send_signal(signal.SIGTERM)
    assert child.wait(60) == 128 + signal.SIGTERM
    assert not _accepts(running.database_url)
    assert not _accepts(running.redis_url)
