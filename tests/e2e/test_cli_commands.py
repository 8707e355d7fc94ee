"""The commands that set centime up, run as an operator runs them: `centime migrate`
builds the whole schema on an empty database and is a no-op the second time; `centime
serve --workers 2` runs two worker processes, and each one serves on its own."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from pathlib import Path

import asyncpg
import httpx
import msgspec
from conftest import (
    RUN_ID,
    Keys,
    Stores,
    auth,
    create_database,
    drop_database,
    new_wallet,
    run_cli,
    start_server,
    stop_server,
)

from centime.migrate import discover
from centime.settings import Settings

SCHEMA_QUERIES = (
    "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
    " WHERE table_schema = 'public' ORDER BY 1, 2",
    "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
    " WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2",
    "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2",
)


async def schema_of(database_url: str) -> list[list[tuple]]:
    conn = await asyncpg.connect(database_url)
    try:
        return [[tuple(row) for row in await conn.fetch(query)] for query in SCHEMA_QUERIES]
    finally:
        await conn.close()


async def applied_migrations(database_url: str) -> list[tuple]:
    conn = await asyncpg.connect(database_url)
    try:
        return [tuple(r) for r in await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")]
    finally:
        await conn.close()


async def test_migrate_builds_a_fresh_database_and_a_second_run_is_a_no_op(
    stores: Stores, settings: Settings, database_url: str
) -> None:
    name = f"centime_fresh_{RUN_ID}_{secrets.token_hex(3)}"
    fresh = msgspec.structs.replace(settings, database_url=await create_database(stores, name))
    assert fresh.database_url is not None
    try:
        first = run_cli(fresh, "migrate")
        assert first.returncode == 0, first.stderr
        names = [f"{m.version:04d}_{m.name}" for m in discover()]
        assert f"applied {len(names)} migration(s): {', '.join(names)}" in first.stderr
        schema = await schema_of(fresh.database_url)
        assert schema == await schema_of(database_url)  # the schema every other test runs on
        recorded = await applied_migrations(fresh.database_url)
        assert [r[0] for r in recorded] == [m.version for m in discover()]

        second = run_cli(fresh, "migrate")
        assert second.returncode == 0, second.stderr
        assert "applied 0 migration(s): none needed" in second.stderr
        assert await schema_of(fresh.database_url) == schema
        assert await applied_migrations(fresh.database_url) == recorded
    finally:
        await drop_database(stores, name)


def worker_pids(server_pid: int) -> list[int]:
    """The processes `serve` spawned to serve (multiprocessing's spawn_main), not its helpers."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != server_pid:
                continue
            if b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                pids.append(int(stat.parent.name))
    return sorted(pids)


REQUESTS_PER_WORKER = 4
ANSWER_TIMEOUT_S = 15.0
"""Long enough for a worker still starting up; a worker that never serves fails the test."""


async def test_serve_with_two_workers_answers_from_each_worker_alone(settings: Settings, keys: Keys) -> None:
    """One worker stopped (SIGSTOP), the other alone answers every new connection: a
    read, a debit and readiness (Postgres and Redis); then the other way round."""
    server = start_server(settings, serve_args=("--workers", "2"))
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=ANSWER_TIMEOUT_S) as http:
            wallet_id = await new_wallet(http, keys, funded_micros=1_000_000)
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2, workers
        for stopped in workers:
            os.kill(stopped, signal.SIGSTOP)
            try:
                for n in range(REQUESTS_PER_WORKER):
                    # A client per request: a new connection, which only a running worker accepts.
                    async with httpx.AsyncClient(base_url=server.base_url, timeout=ANSWER_TIMEOUT_S) as fresh:
                        assert (await fresh.get("/readyz")).status_code == 200
                        read = await fresh.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))
                        assert read.status_code == 200, read.text
                        debit = await fresh.post(
                            f"/v1/wallets/{wallet_id}/debits",
                            json={"amount_micros": 1_000},
                            headers=auth(keys.debit, f"{stopped}-{n}"),
                        )
                        assert debit.status_code == 201, debit.text
            finally:
                os.kill(stopped, signal.SIGCONT)
    finally:
        stop_server(server)
