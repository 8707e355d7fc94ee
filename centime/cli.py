"""The `centime` command: serve, worker, migrate, api-key, rebuild-cache, check, reconcile."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import click
import msgspec

from centime.logs import configure_logging
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


log = logging.getLogger("centime")
"""What `serve` and `worker` say as they run: log lines, in the log's format."""


def _info(message: str) -> None:
    click.echo(message, err=True)


@click.group()
def main() -> None:
    """centime: wallets and a double-entry ledger for micro-payments."""
    # Before the settings are read, so that a bad one is reported by the
    # command that reads them; a bad level or format here falls back to the default.
    level = os.environ.get("CENTIME_LOG_LEVEL") or "INFO"
    configure_logging(
        level if level in logging.getLevelNamesMapping() else "INFO",
        "json" if os.environ.get("CENTIME_LOG_FORMAT") == "json" else "text",
    )


async def _migrate(database_url: str) -> list[str]:
    from centime.migrate import MigrationError, migrate_database

    try:
        applied = await migrate_database(database_url, connect_timeout_s=10)
    except MigrationError as exc:
        raise click.ClickException(f"migrate: {exc}") from None
    return [f"{m.version:04d}_{m.name}" for m in applied]


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
@click.option(
    "--app",
    "app_factory",
    default="centime.app:serve_app",
    hidden=True,
    help="The app factory to serve; `make bench` serves bench.server:create_bench_app the same way.",
)
def serve(host: str, port: int, workers: int, app_factory: str) -> None:
    """Migrate and serve the API. With no storage URLs, starts embedded ones."""
    import uvicorn

    with _stores(_settings()) as settings:
        assert settings.database_url is not None and settings.redis_url is not None
        _run(lambda: _migrate(settings.database_url))
        os.environ["CENTIME_DATABASE_URL"] = settings.database_url
        os.environ["CENTIME_REDIS_URL"] = settings.redis_url
        log.info(f"centime serving on http://{host}:{port} (OpenAPI at /schema), {workers} worker(s)")
        uvicorn.run(
            app_factory,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            loop="uvloop",
            http="httptools",
            access_log=False,  # centime.access writes its own
            log_config=None,  # uvicorn's lines through centime's handler, in its format
            # Longer than the idle timeout of common load balancers (60 s), so
            # the server never closes a kept-alive connection a client or
            # proxy is about to reuse.
            timeout_keep_alive=75,
            log_level="warning",
        )


@main.command()
def worker() -> None:
    """Run background jobs until SIGINT or SIGTERM: the sweeper, and the
    nightly reconciliation when Stripe is set up."""
    with _stores(_settings()) as settings:
        _run(lambda: _work(settings))


async def _work(settings: Settings) -> None:
    from centime.app import record_sweep_pass, redis_client
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
        max_size=6,
        command_timeout=settings.database_timeout_ms / 1000,
    )
    client = redis_client(settings.redis_url, settings)
    try:
        cache = Cache(client, prefix=settings.redis_prefix, partition_count=settings.partition_count)
        log.info(f"centime worker: sweeping every {settings.sweeper_interval_ms} ms")
        async with contextlib.AsyncExitStack() as stack:
            jobs = [run_sweeper(pool, cache, settings, stop=stop, on_pass=record_sweep_pass)]
            if settings.reconcile_nightly and settings.stripe_secret_key is not None:
                from centime.reconciling import reconciler
                from reconcile.scheduler import RETRY_AFTER, parse_at, run_nightly

                nightly = await stack.enter_async_context(reconciler(settings, pool, cache))
                log.info(f"centime worker: reconciling nightly at {settings.reconcile_at_utc} UTC")
                at = parse_at(settings.reconcile_at_utc)
                jobs.append(run_nightly(nightly, at=at, retry_after=RETRY_AFTER, stop=stop))
            await asyncio.gather(*jobs)
    finally:
        await client.aclose()
        await pool.close()
    log.info("centime worker: stopped")


@main.group("api-key")
def api_key() -> None:
    """Manage API keys."""


async def _with_connection(database_url: str, job: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    conn = await asyncpg.connect(database_url, timeout=10, command_timeout=60)
    try:
        return await job(conn)
    finally:
        await conn.close()


def _on_database(job: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    with _stores(_settings()) as settings:
        assert settings.database_url is not None
        return _run(lambda: _with_connection(settings.database_url, job))


@api_key.command("create")
@click.option("--name", required=True, help="Who or what uses the key (1..128 chars).")
@click.option("--scope", required=True, type=click.Choice(["admin", "debit", "read"]))
@click.option(
    "--owner",
    "owner_ids",
    multiple=True,
    help="Repeatable (1..100): the key sees only these owners' wallets. Without it: every owner's.",
)
def api_key_create(name: str, scope: str, owner_ids: tuple[str, ...]) -> None:
    """Create a key; prints the key alone on stdout (details on stderr)."""
    from centime.auth import create_api_key, valid_owner_ids

    if not 1 <= len(name) <= 128:
        raise click.BadParameter("1..128 characters", param_hint="--name")
    try:
        owners = valid_owner_ids(owner_ids) if owner_ids else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--owner") from None
    key, secret = _on_database(lambda conn: create_api_key(conn, name, scope, owners))  # type: ignore[arg-type]
    reach = "every owner" if key.owner_ids is None else "owners " + ", ".join(sorted(key.owner_ids))
    _info(
        f"created API key {key.id} name={key.name!r} scope={key.scope}, seeing {reach}; "
        "store it now, it is not shown again"
    )
    click.echo(secret)


API_KEYS_PAGE_SIZE = 500
API_KEYS_PAGES_MAX = 1000
"""`api-key list` shows at most 500,000 keys."""


@api_key.command("list")
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="json: one JSON object per key and line.",
)
def api_key_list(output: str) -> None:
    """List every key (never its secret): id, name, scope, owners, created,
    the day last used, and when revoked."""
    from centime.auth import api_keys_page

    async def all_keys(conn: asyncpg.Connection) -> list[Any]:
        found: list[Any] = []
        for _page in range(API_KEYS_PAGES_MAX):
            page = await api_keys_page(conn, after=found[-1].id if found else None, limit=API_KEYS_PAGE_SIZE)
            found += page
            if len(page) < API_KEYS_PAGE_SIZE:
                break
        return found

    keys = _on_database(all_keys)
    if output == "json":
        for key in keys:
            click.echo(msgspec.json.encode(key).decode())
        return
    click.echo(
        f"{'id':<36}  {'name':<20} {'scope':<6} {'created':<10} {'last used':<10} {'revoked':<10} owners"
    )
    for key in keys:
        revoked = key.revoked_at.date().isoformat() if key.revoked_at else "-"
        used = key.last_used_on.isoformat() if key.last_used_on else "never"
        owners = "(every owner)" if key.owner_ids is None else ",".join(key.owner_ids)
        click.echo(
            f"{key.id!s:<36}  {key.name[:20]:<20} {key.scope:<6} {key.created_at.date().isoformat():<10} "
            f"{used:<10} {revoked:<10} {owners}"
        )


@api_key.command("revoke")
@click.argument("key_id")
def api_key_revoke(key_id: str) -> None:
    """Revoke a key, for good: every serving process refuses it within a second."""
    import uuid

    from centime.auth import revoke_api_key

    try:
        parsed = uuid.UUID(key_id)
    except ValueError:
        raise click.BadParameter(f"{key_id!r} is not a key id (a UUID; see `centime api-key list`)") from None
    key, revoked_now = _on_database(lambda conn: revoke_api_key(conn, parsed))
    if key is None:
        raise click.ClickException(f"no API key {parsed} (see `centime api-key list`)")
    if revoked_now:
        _info(f"revoked API key {key.id} name={key.name!r} scope={key.scope}; refused everywhere within 1 s")
    else:
        _info(f"API key {key.id} name={key.name!r} was already revoked at {key.revoked_at.isoformat()}")


async def _with_pool_and_cache(
    settings: Settings, job: Callable[[asyncpg.Pool, Any], Awaitable[Any]], *, pool_max: int = 2
) -> Any:
    from centime.app import redis_client
    from wallet.cache import Cache

    assert settings.database_url is not None and settings.redis_url is not None
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=pool_max, command_timeout=60)
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


EXIT_CLEAN, EXIT_UNMATCHED, EXIT_FAILED = 0, 1, 2
RECONCILE_EARLIEST = datetime(2010, 1, 1, tzinfo=UTC)
"""Before Stripe's balance transactions existed."""


def _instant(text: str | None, name: str) -> datetime | None:
    """An ISO 8601 date or time; naive means UTC."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an ISO 8601 date or time", param_hint=name) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class _Progress:
    """Progress on stderr: one line rewritten on a terminal, else a line per step."""

    STEP = 1000

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last: dict[str, int] = {}

    def __call__(self, phase: str, count: int) -> None:
        label = {"stripe": "Stripe transactions matched", "ledger": "ledger entries checked"}[phase]
        if self.tty:
            click.echo(f"\r{label}: {count}", err=True, nl=False)
        elif count // self.STEP > self.last.get(phase, -1):
            self.last[phase] = count // self.STEP
            click.echo(f"{label}: {count}", err=True)

    def done(self) -> None:
        if self.tty:
            click.echo("", err=True)


@main.command()
@click.option("--since", help="Window start, ISO 8601 (UTC if no offset). Default: the previous UTC day.")
@click.option(
    "--until", help="Window end (exclusive). Default: the end of --since's day, or today 00:00 UTC."
)
@click.option("--dry-run", is_flag=True, help="Report only: heal nothing, repair nothing.")
@click.option(
    "--format", "output", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True
)
def reconcile(since: str | None, until: str | None, dry_run: bool, output: str) -> None:
    """Match Stripe's balance transactions of a window against the ledger,
    heal what is safe (lost top-up credits, missing fees, Redis drift), and
    report the rest. Exit 0: clean; 1: unmatched items remain; 2: the run failed."""
    from reconcile.service import ReconcileBusy, default_window

    start, end = _instant(since, "--since"), _instant(until, "--until")
    now = datetime.now(UTC)
    try:
        if start is None and end is None:
            start, end = default_window(now)
        elif start is None:
            assert end is not None
            start = end - timedelta(days=1)
        elif end is None:
            end = start + timedelta(days=1)
    except OverflowError:
        raise click.BadParameter(
            "the window falls outside the calendar", param_hint="--since/--until"
        ) from None
    if start < RECONCILE_EARLIEST or end > now + timedelta(days=1):
        raise click.BadParameter(
            f"the window must lie between {RECONCILE_EARLIEST.date()} and tomorrow",
            param_hint="--since/--until",
        )
    settings = _settings()
    if settings.stripe_secret_key is None:
        _info("reconcile needs CENTIME_STRIPE_SECRET_KEY")
        sys.exit(EXIT_FAILED)
    progress = _Progress()
    try:
        with _stores(settings) as settings:
            run, items = _run(lambda: _reconcile(settings, start, end, dry_run, progress))
    except ReconcileBusy as exc:
        _info(exc.detail)
        sys.exit(EXIT_FAILED)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    progress.done()
    _print_run(run, items, output)
    sys.exit({"clean": EXIT_CLEAN, "unmatched": EXIT_UNMATCHED}.get(run.status, EXIT_FAILED))


async def _reconcile(settings: Settings, start: datetime, end: datetime, dry_run: bool, progress: Any) -> Any:
    from centime.reconciling import reconciler

    async def job(pool: asyncpg.Pool, cache: Any) -> Any:
        async with reconciler(settings, pool, cache) as r:
            return await r.run(start, end, dry_run=dry_run, progress=progress)

    return await _with_pool_and_cache(settings, job, pool_max=4)


def _print_run(run: Any, items: list[Any], output: str) -> None:
    if output == "json":
        click.echo(msgspec.json.format(msgspec.json.encode({"run": run, "items": items})).decode())
        return
    if output == "csv":
        from reconcile.schemas import Item

        fields = Item.__struct_fields__  # the same columns whether or not there are items
        writer = csv.writer(sys.stdout)
        writer.writerow(fields)
        for item in items:
            writer.writerow(["" if getattr(item, f) is None else getattr(item, f) for f in fields])
        return
    click.echo(
        f"run {run.id}  {run.window_start.isoformat()} .. {run.window_end.isoformat()}"
        f"{'  (dry run)' if run.dry_run else ''}"
    )
    click.echo(
        f"status {run.status}: {run.transactions_seen} Stripe transactions, {run.wallets_checked} wallets, "
        f"{run.healed} healed, {run.duration_ms} ms"
    )
    if run.error:
        click.echo(f"error: {run.error}")
    for category, count in run.counts.items():
        if count:
            totals = ", ".join(
                f"{micros} {currency}" for currency, micros in run.totals.get(category, {}).items()
            )
            click.echo(f"  {category:<18} {count:>7}   ({totals} micros)")
    listed = sum(run.counts.values())
    if listed > len(items):
        click.echo(
            f"(the first {len(items)} of {listed} items; all are in GET /v1/reconciliation/runs/{run.id})"
        )
    if items:
        click.echo(
            f"{'#':>5}  {'category':<18} {'object':<28} {'stripe':>14} {'ledger':>14} {'healed':<6} detail"
        )
    for item in items:
        click.echo(
            f"{item.item_no:>5}  {item.category:<18} {item.stripe_object_id or item.wallet_id or ''!s:<28} "
            f"{'' if item.stripe_amount_micros is None else item.stripe_amount_micros:>14} "
            f"{'' if item.ledger_amount_micros is None else item.ledger_amount_micros:>14} "
            f"{'yes' if item.healed else 'no':<6} {item.detail}"
        )


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
