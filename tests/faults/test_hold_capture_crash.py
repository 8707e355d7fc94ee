"""A server SIGKILLed while captures wait for their commit (the ledger locked) leaves ledger and
Redis equal once `centime worker` has swept: each capture is in the ledger once and charged if its
commit landed, or reversed with its charge undone if not; either way every hold stays captured, its
captured event is recorded in hold_events by the sweeper, nothing stays held, a retry of the
capture says which it was, and `centime check` passes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import httpx
import msgspec
import pytest
from conftest import (
    ROOT,
    Keys,
    Server,
    auth,
    new_wallet,
    run_cli,
    settings_env,
    start_server,
    stop_server,
)
from fault_support import (
    FAULT_ENV,
    cache_for,
    ledger_balances,
    ledger_debits,
    redis_balances,
    stores_of_own,
    wait_settled,
)

from centime.settings import Settings
from ledger import repo as ledger_repo
from ledger.ids import uuid7
from ledger.schemas import EntryRecord
from wallet.charges import decode_payload, record_from_payload
from wallet.schemas import EntryPayload

pytestmark = pytest.mark.faults

# The killed server waits up to 2 s for a statement and a commit, so the kill surely lands
# while the captures still wait (not after they gave up and answered 503); its grace must then
# be at least max(2 x (2000 + 1000), 2000 + 1000 + 3 x 2000). The worker sweeps with FAULT_ENV.
SERVER_ENV = {
    **FAULT_ENV,
    "CENTIME_COMMIT_TIMEOUT_MS": "2000",
    "CENTIME_DATABASE_TIMEOUT_MS": "2000",
    "CENTIME_SWEEPER_GRACE_MS": "9000",
    # A writer connection for each capture of CASES, so each one's insert waits in Postgres.
    "CENTIME_COMMIT_CONNECTIONS": "4",
}
WAIT_S = 20.0
WAITING = (
    "FROM pg_stat_activity WHERE datname = current_database() "
    "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
)
"""The statements of this database waiting on a lock (each capture's insert, behind the blocker)."""


class Case(msgspec.Struct, frozen=True):
    """A wallet, a hold on it, and a capture whose outcome its balances decide."""

    funded_micros: int
    overdraft_limit_micros: int
    hold_micros: int
    requested_micros: int
    captured_micros: int


CASES = [
    Case(10_000, 0, 3_000, 2_000, 2_000),  # under the hold
    Case(10_000, 1_000, 2_000, 6_000, 6_000),  # over the hold, within the limit
    Case(5_000, 500, 4_000, 9_000, 5_500),  # over what the limit allows: a shortfall
]


@pytest.fixture
async def own(settings: Settings, private_database: str) -> AsyncIterator[tuple[Settings, Keys]]:
    async with stores_of_own(settings, private_database) as own:
        yield own


def key_holder(wallet_id: uuid.UUID, hold_id: str) -> EntryRecord:
    """A debit keyed like the hold's capture, for a transaction that never commits."""
    payload = EntryPayload(
        id=uuid7(),
        wallet_id=wallet_id,
        kind="debit",
        amount_micros=1,
        idempotency_key=f"hold:{hold_id}",
        request_hash="blocker",
        description=None,
        metadata={},
        created_at=datetime.now(UTC),
    )
    return record_from_payload(payload, balance_micros=0, currency="usd")


async def wait_for(what: str, probe: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.01)


async def capture(
    http: httpx.AsyncClient, keys: Keys, hold_id: str, amount_micros: int
) -> httpx.Response | str:
    """The capture's answer, or the error that stood for it (the server died)."""
    try:
        return await http.post(
            f"/v1/holds/{hold_id}/capture", json={"amount_micros": amount_micros}, headers=auth(keys.debit)
        )
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


def start_worker(settings: Settings) -> tuple[subprocess.Popen[str], list[str]]:
    worker = subprocess.Popen(
        [sys.executable, "-m", "centime", "worker"],
        cwd=ROOT,
        env=settings_env(settings, **FAULT_ENV),
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []

    def follow() -> None:
        assert worker.stderr is not None
        log.extend(worker.stderr)

    threading.Thread(target=follow, daemon=True).start()
    return worker, log


async def hold_events(database_url: str, hold_ids: list[str]) -> dict[str, dict[str, asyncpg.Record]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT * FROM hold_events WHERE hold_id = ANY($1::uuid[])", [uuid.UUID(h) for h in hold_ids]
        )
    finally:
        await conn.close()
    found: dict[str, dict[str, asyncpg.Record]] = {h: {} for h in hold_ids}
    for row in rows:
        found[str(row["hold_id"])][row["kind"]] = row
    return found


@pytest.mark.parametrize("commit", ["lands-late", "never-lands"])
async def test_a_capture_killed_mid_commit_is_settled_by_the_sweeper(
    own: tuple[Settings, Keys], commit: str
) -> None:
    settings, keys = own
    assert settings.database_url is not None
    client, cache = cache_for(settings)
    servers: list[Server] = []
    worker: subprocess.Popen[str] | None = None
    try:
        servers.append(start_server(settings, **SERVER_ENV))
        async with httpx.AsyncClient(base_url=servers[0].base_url, timeout=30) as http:
            wallet_ids, hold_ids = [], []
            for case in CASES:
                wallet_id = await new_wallet(
                    http,
                    keys,
                    funded_micros=case.funded_micros,
                    overdraft_limit_micros=case.overdraft_limit_micros,
                )
                created = await http.post(
                    f"/v1/wallets/{wallet_id}/holds",
                    json={"amount_micros": case.hold_micros},
                    headers=auth(keys.debit, f"hold-{wallet_id}"),
                )
                assert created.status_code == 201, created.text
                wallet_ids.append(wallet_id)
                hold_ids.append(created.json()["id"])

            # An open transaction holds each capture's key in the ledger: the captures charge
            # Redis, and their inserts (sent whole) wait on it, one writer connection each.
            blocker = await asyncpg.connect(settings.database_url)
            # pg_stat_activity holds still inside a transaction: watch from outside the blocker's.
            watcher = await asyncpg.connect(settings.database_url)
            try:
                transaction = blocker.transaction()
                await transaction.start()
                await ledger_repo.insert_entries(
                    blocker,
                    [key_holder(uuid.UUID(w), h) for w, h in zip(wallet_ids, hold_ids, strict=True)],
                    timeout_s=5,
                )
                pending = []
                for n, (hold_id, case) in enumerate(zip(hold_ids, CASES, strict=True)):
                    pending.append(asyncio.create_task(capture(http, keys, hold_id, case.requested_micros)))

                    async def inserts_waiting(count: int = n + 1) -> bool:
                        return await watcher.fetchval(f"SELECT count(*) {WAITING}") == count

                    await wait_for(f"{n + 1} capture inserts waiting on the ledger", inserts_waiting)
                for hold_id in hold_ids:
                    state = await cache.hold_state(uuid.UUID(hold_id))
                    assert state is not None and state.status == "captured"
                os.kill(servers[0].process.pid, signal.SIGKILL)
                await asyncio.to_thread(servers[0].process.wait, 10)
                answers = await asyncio.gather(*pending)
                if commit == "never-lands":
                    # The dead server's waiting statements die with their backends.
                    await watcher.execute(f"SELECT pg_terminate_backend(pid) {WAITING}")

                    async def none_waiting() -> bool:
                        return await watcher.fetchval(f"SELECT count(*) {WAITING}") == 0

                    await wait_for("the dead server's statements gone", none_waiting)
                # Give the keys back: a statement still waiting now inserts, and commits.
                await transaction.rollback()
            finally:
                await blocker.close()
                await watcher.close()
        assert all(isinstance(a, str) for a in answers), answers  # no answer reached the client

        # Each capture was an orphan in the outbox when the process died: charged, never settled.
        states = {h: await cache.hold_state(uuid.UUID(h)) for h in hold_ids}
        entry_ids = {h: str(s.entry_id) for h, s in states.items() if s is not None}
        in_outbox = [
            decode_payload(fields[b"e"]).id
            for p in range(cache.partition_count)
            for _, fields in await client.xrange(cache.outbox_key(p))
        ]
        assert sorted(map(str, in_outbox)) == sorted(entry_ids.values())
        assert await cache.outbox_depth() == len(CASES)  # and none abandoned: no request gave up
        for hold_id, case in zip(hold_ids, CASES, strict=True):
            state = states[hold_id]
            assert state is not None and (state.status, state.captured_micros) == (
                "captured",
                case.captured_micros,
            )

        worker, worker_log = start_worker(settings)
        await wait_settled(settings)

        async def all_recorded() -> bool:
            recorded = await hold_events(settings.database_url, hold_ids)
            waiting = sum([await client.xlen(cache.hold_events_key(p)) for p in range(cache.partition_count)])
            return waiting == 0 and all("captured" in kinds for kinds in recorded.values())

        await wait_for("the sweeper recorded every captured event", all_recorded)
        worker.terminate()
        assert await asyncio.to_thread(worker.wait, 15) == 0, "".join(worker_log)
        worker = None

        ledger = await ledger_debits(settings.database_url)
        in_ledger = await ledger_balances(settings.database_url, wallet_ids)
        in_redis = await redis_balances(settings, wallet_ids)
        assert in_redis == in_ledger
        recorded = await hold_events(settings.database_url, hold_ids)
        outcomes = []
        for wallet_id, hold_id, case in zip(wallet_ids, hold_ids, CASES, strict=True):
            found = ledger.get(f"hold:{hold_id}", [])
            standing = [e for e in found if e.reversed_by is None]
            charged = bool(standing)
            if found:
                assert str(found[0].id) == entry_ids[hold_id]
                assert found[0].amount_micros == case.captured_micros
            expected = case.funded_micros - (case.captured_micros if charged else 0)
            assert in_ledger[wallet_id] == expected, (case, found)
            held = await client.hget(cache.wallet_key(uuid.UUID(wallet_id)), "h")
            assert int(held or 0) == 0
            assert set(recorded[hold_id]) == {"held", "captured"}
            event = recorded[hold_id]["captured"]
            assert (event["requested_micros"], event["captured_micros"], str(event["entry_id"])) == (
                case.requested_micros,
                case.captured_micros,
                entry_ids[hold_id],
            )
            outcomes.append("charged" if charged else ("reversed" if found else "absent"))
        print(f"{commit}: {outcomes}")
        assert outcomes == [{"lands-late": "charged", "never-lands": "reversed"}[commit]] * len(CASES)

        # A new server: each hold is captured, holds nothing, and a retry says what happened.
        servers.append(start_server(settings, **FAULT_ENV))
        async with httpx.AsyncClient(base_url=servers[-1].base_url, timeout=30) as http:
            for wallet_id, hold_id, case, outcome in zip(wallet_ids, hold_ids, CASES, outcomes, strict=True):
                got = await http.get(f"/v1/holds/{hold_id}", headers=auth(keys.read))
                assert got.json()["status"] == "captured", got.text
                wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
                assert (wallet["balance_micros"], wallet["held_micros"]) == (in_ledger[wallet_id], 0)
                retry = await capture(http, keys, hold_id, case.requested_micros)
                assert isinstance(retry, httpx.Response)
                if outcome == "charged":
                    assert retry.status_code == 200, retry.text
                    assert retry.json()["entry"]["id"] == entry_ids[hold_id]
                    assert retry.json()["captured_micros"] == case.captured_micros
                else:
                    assert retry.status_code == 409, retry.text
                    assert retry.json()["code"] == "capture_reversed"
        assert await redis_balances(settings, wallet_ids) == in_ledger
        checked = run_cli(settings, "check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=15)
        for server in servers:
            stop_server(server)
        await client.aclose()
