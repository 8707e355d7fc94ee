"""The `centime` command: serve, worker, migrate, api-key, rebuild-cache, check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import click
import msgspec

from centime.settings import Settings, SettingsError, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def _stores(settings: Settings) -> Iterator[Settings]:
    """Settings with both storage URLs: from the environment, else embedded
    Postgres and Redis under data_dir (joined if another centime process on
    this machine runs them already, else started and stopped around us)."""
    if settings.database_url and settings.redis_url:
        yield settings
        return
    if settings.database_url or settings.redis_url:
        raise click.ClickException(
            "set both CENTIME_DATABASE_URL and CENTIME_REDIS_URL, or neither (embedded)"
        )
    from centime.embedded import embedded_stores

    with embedded_stores(Path(settings.data_dir)) as stores:
        yield msgspec.structs.replace(settings, database_url=stores.database_url, redis_url=stores.redis_url)


def _run(main: Callable[[], Awaitable[Any]]) -> Any:
    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return asyncio.run(main())


def _info(message: str) -> None:
    click.echo(message, err=True)


@click.group()
def main() -> None:
    """centime: wallets and a double-entry ledger for micro-payments."""
    logging.basicConfig(
        level=os.environ.get("CENTIME_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def _migrate(database_url: str) -> list[str]:
    from centime.migrate import MigrationError, migrate

    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return [f"{m.version:04d}_{m.name}" for m in await migrate(conn)]
    except MigrationError as exc:
        raise click.ClickException(f"migrate: {exc}") from None
    finally:
        await conn.close()


@main.command("migrate")
def migrate_command() -> None:
    """Apply the migrations that are missing (safe to run concurrently)."""
    with _stores(_settings()) as settings:
        assert settings.database_url is not None
        applied = _run(lambda: _migrate(settings.database_url))
    _info(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none needed'}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
def serve(host: str, port: int, workers: int) -> None:
    """Migrate and serve the API. With no storage URLs, starts embedded ones."""
    import uvicorn

    with _stores(_settings()) as settings:
        assert settings.database_url is not None and settings.redis_url is not None
        _run(lambda: _migrate(settings.database_url))
        os.environ["CENTIME_DATABASE_URL"] = settings.database_url
        os.environ["CENTIME_REDIS_URL"] = settings.redis_url
        _info(f"centime serving on http://{host}:{port} (OpenAPI at /schema), {workers} worker(s)")
        uvicorn.run(
            "centime.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            loop="uvloop",
            http="httptools",
            access_log=False,
            # Longer than the idle timeout of common load balancers (60 s), so
            # the server never closes a kept-alive connection a client or
            # proxy is about to reuse.
            timeout_keep_alive=75,
            log_level="warning",
        )


@main.command()
def worker() -> None:
    """Run background jobs (the sweeper) until SIGINT or SIGTERM."""
    with _stores(_settings()) as settings:
        _run(lambda: _work(settings))


async def _work(settings: Settings) -> None:
    from centime.app import redis_client
    from wallet.cache import Cache
    from wallet.sweeper import run_sweeper

    assert settings.database_url is not None and settings.redis_url is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=1,
        max_size=4,
        command_timeout=settings.database_timeout_ms / 1000,
    )
    client = redis_client(settings.redis_url, settings)
    try:
        cache = Cache(client, prefix=settings.redis_prefix, partition_count=settings.partition_count)
        _info(f"centime worker: sweeping every {settings.sweeper_interval_ms} ms")
        await run_sweeper(pool, cache, settings, stop=stop)
    finally:
        await client.aclose()
        await pool.close()
    _info("centime worker: stopped")


@main.group("api-key")
def api_key() -> None:
    """Manage API keys."""


@api_key.command("create")
@click.option("--name", required=True, help="Who or what uses the key (1..128 chars).")
@click.option("--scope", required=True, type=click.Choice(["admin", "debit", "read"]))
def api_key_create(name: str, scope: str) -> None:
    """Create a key; prints the key alone on stdout (details on stderr)."""
    if not 1 <= len(name) <= 128:
        raise click.BadParameter("1..128 characters", param_hint="--name")

    async def run(database_url: str) -> tuple[Any, str]:
        from centime.auth import create_api_key

        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            return await create_api_key(conn, name, scope)  # type: ignore[arg-type]
        finally:
            await conn.close()

    with _stores(_settings()) as settings:
        assert settings.database_url is not None
        key, secret = _run(lambda: run(settings.database_url))
    _info(
        f"created API key {key.id} name={key.name!r} scope={key.scope}; store it now, it is not shown again"
    )
    click.echo(secret)


async def _with_pool_and_cache(settings: Settings, job: Callable[[asyncpg.Pool, Any], Awaitable[Any]]) -> Any:
    from centime.app import redis_client
    from wallet.cache import Cache

    assert settings.database_url is not None and settings.redis_url is not None
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2, command_timeout=60)
    client = redis_client(settings.redis_url, msgspec.structs.replace(settings, redis_timeout_ms=10_000))
    try:
        return await job(
            pool,
            Cache(client, prefix=settings.redis_prefix, partition_count=settings.partition_count),
        )
    finally:
        await client.aclose()
        await pool.close()


def _progress(verb: str) -> Callable[[int], None]:
    def report(count: int) -> None:
        _info(f"{verb} {count} wallets...")

    return report


@main.command("rebuild-cache")
def rebuild_cache_command() -> None:
    """Set every wallet's Redis balance from the ledger, and restore the
    idempotency records of recent entries. Run when quiescent."""
    from wallet.maintenance import rebuild_cache

    with _stores(_settings()) as settings:
        report = _run(
            lambda: _with_pool_and_cache(
                settings,
                lambda pool, cache: rebuild_cache(
                    pool, cache, idempotency_ttl_s=settings.idempotency_ttl_s, progress=_progress("rebuilt")
                ),
            )
        )
    _info(
        f"rebuilt {report.wallets} wallet balances and restored {report.keys_restored} idempotency records "
        "from the ledger"
    )


@main.command()
def check() -> None:
    """Verify the invariants: balanced entries, Redis == ledger per wallet.
    Exits 1 and names each violation."""
    from wallet.maintenance import check as run_check

    with _stores(_settings()) as settings:
        report = _run(
            lambda: _with_pool_and_cache(
                settings, lambda pool, cache: run_check(pool, cache, progress=_progress("checked"))
            )
        )
    for problem in [
        *report.entries_unbalanced,
        *report.reversals_mismatched,
        *report.wallets_drifted,
    ]:
        click.echo(f"VIOLATION {problem}")
    if report.lines_total_micros:
        click.echo(f"VIOLATION all lines sum to {report.lines_total_micros} micros, not 0")
    if report.unsettled_entries:
        click.echo(
            f"note: {report.unsettled_entries} entries are not settled yet (outbox); balances may differ until the sweeper runs"
        )
    if report.unapplied_changes:
        click.echo(
            f"note: {report.unapplied_changes} wallet changes (top-ups, refunds, disputes) are not applied to Redis yet; balances may differ until the sweeper runs"
        )
    click.echo(f"{'ok' if report.ok else 'FAILED'}: {report.wallets_checked} wallets checked")
    sys.exit(0 if report.ok else 1)
