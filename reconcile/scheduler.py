"""The nightly run, scheduled by `centime worker`: once a day at a set UTC
time, over the previous UTC day. Two workers never run it at once (the
reconciler's advisory lock), and a window already reconciled for real is not
run again after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, time, timedelta

import asyncpg

from reconcile import repo
from reconcile.service import ReconcileBusy, Reconciler, default_window

log = logging.getLogger(__name__)


def next_run_at(now: datetime, at: time) -> datetime:
    """The next moment at `at` (UTC) strictly after `now`."""
    now = now.astimezone(UTC)
    candidate = datetime.combine(now.date(), at, tzinfo=UTC)
    return candidate if candidate > now else candidate + timedelta(days=1)


def parse_at(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes), tzinfo=UTC)


async def run_nightly(reconciler: Reconciler, pool: asyncpg.Pool, *, at: time, stop: asyncio.Event) -> None:
    while not stop.is_set():
        due = next_run_at(datetime.now(UTC), at)
        log.info("next reconciliation at %s", due.isoformat())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), (due - datetime.now(UTC)).total_seconds())
        if stop.is_set():
            return
        await run_once(reconciler, pool, now=datetime.now(UTC))


async def run_once(reconciler: Reconciler, pool: asyncpg.Pool, *, now: datetime) -> str:
    """Reconcile the day before `now`, unless already done. Returns what happened."""
    window_start, window_end = default_window(now)
    try:
        async with pool.acquire() as conn:
            done = await repo.finished_run_of_window(conn, window_start, window_end)
        if done is not None:
            return f"skipped: run {done} already reconciled {window_start.date()}"
        run, _ = await reconciler.run(window_start, window_end, dry_run=False)
    except ReconcileBusy:
        return "skipped: another worker is running it"
    except Exception as exc:  # the worker keeps sweeping; tomorrow is another run
        log.exception("nightly reconciliation failed")
        return f"failed: {exc!r}"
    log.info("reconciliation run %s of %s: %s, %s", run.id, window_start.date(), run.status, run.counts)
    return f"{run.status}: run {run.id}"
