"""The nightly run, scheduled by `centime worker`: once a day at a set UTC
time, over the previous UTC day. Two workers never run it at once (the
reconciler's advisory lock), and a window already reconciled for real is not
run again after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, time, timedelta

from reconcile.service import AlreadyReconciled, ReconcileBusy, Reconciler, default_window

log = logging.getLogger(__name__)


def next_run_at(now: datetime, at: time) -> datetime:
    """The next moment at `at` (UTC) strictly after `now`."""
    now = now.astimezone(UTC)
    candidate = datetime.combine(now.date(), at, tzinfo=UTC)
    return candidate if candidate > now else candidate + timedelta(days=1)


def parse_at(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes), tzinfo=UTC)


RETRY_AFTER = timedelta(minutes=30)
"""A failed nightly run is tried again this much later (the same day only)."""


async def run_nightly(
    reconciler: Reconciler, *, at: time, retry_after: timedelta, stop: asyncio.Event
) -> None:
    """At start, catch up on yesterday if it was never reconciled (the worker
    was down at `at`); then daily at `at`, retrying a failed run `retry_after`
    later."""
    while not stop.is_set():
        outcome = await run_once(reconciler, now=datetime.now(UTC))
        now = datetime.now(UTC)
        due = next_run_at(now, at)
        if outcome.startswith("failed"):
            due = min(due, now + retry_after)
        log.info("reconciliation: %s; next at %s", outcome, due.isoformat())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), (due - now).total_seconds())


async def run_once(reconciler: Reconciler, *, now: datetime) -> str:
    """Reconcile the day before `now`, unless already done. Returns what happened."""
    window_start, window_end = default_window(now)
    try:
        run, _ = await reconciler.run(window_start, window_end, dry_run=False, unless_reconciled=True)
    except AlreadyReconciled as done:
        return f"skipped: run {done.run_id} already reconciled {window_start.date()}"
    except ReconcileBusy:
        return "skipped: another worker is running it"
    except Exception as exc:  # the worker keeps sweeping; tomorrow is another run
        log.exception("nightly reconciliation failed")
        return f"failed: {exc!r}"
    log.info("reconciliation run %s of %s: %s, %s", run.id, window_start.date(), run.status, run.counts)
    return f"{run.status}: run {run.id}"
