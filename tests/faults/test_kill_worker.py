"""A server SIGKILLed in the middle of a debit load loses no money: after the
sweeper (the standalone `centime worker`) and a restart, every 201 is in the
ledger once, no error answer stands charged, each lost answer is charged at
most once and its retry says which, and `centime check` passes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

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
    AMOUNT_MICROS,
    FAULT_ENV,
    Answer,
    classify,
    debit_load,
    expected_balances,
    ledger_balances,
    ledger_debits,
    post_debit,
    redis_balances,
    stores_of_own,
    summary,
    unsettled,
    wait_settled,
)

from centime.settings import Settings

pytestmark = pytest.mark.faults

HOLD_BEFORE_KILL_S = 0.3
WALLETS = 8
POOR_WALLET_DEBITS = 40  # one wallet runs dry under the load: some answers are 402
CONCURRENCY = 16  # more only queues requests in front of the one server process
LOAD_BEFORE_KILL_S = 2.5
KILL_ROUNDS_MAX = 3


@pytest.fixture
async def own(settings: Settings, private_database: str) -> AsyncIterator[tuple[Settings, Keys]]:
    async with stores_of_own(settings, private_database) as own:
        yield own


async def _load_then_kill(
    server: Server, keys: Keys, wallet_ids: list[str], database_url: str
) -> list[Answer]:
    stop = asyncio.Event()
    load = asyncio.create_task(debit_load(server.base_url, keys, wallet_ids, stop, concurrency=CONCURRENCY))
    await asyncio.sleep(LOAD_BEFORE_KILL_S)
    # Hold the ledger's inserts for a moment before the kill, so that charges
    # are sure to wait in the outbox when the process dies (a slow commit).
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE journal_entries IN SHARE ROW EXCLUSIVE MODE")
            await asyncio.sleep(HOLD_BEFORE_KILL_S)
            os.kill(server.process.pid, signal.SIGKILL)
            await asyncio.to_thread(server.process.wait, 10)
    finally:
        await blocker.close()
    stop.set()
    return await asyncio.wait_for(load, 30)


def _start_worker(settings: Settings) -> tuple[subprocess.Popen[str], threading.Event, list[str]]:
    worker = subprocess.Popen(
        [sys.executable, "-m", "centime", "worker"],
        cwd=ROOT,
        env=settings_env(settings, **FAULT_ENV),
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    sweeping = threading.Event()

    def follow() -> None:
        assert worker.stderr is not None
        for line in worker.stderr:
            log.append(line)
            if "sweeping every" in line:
                sweeping.set()

    threading.Thread(target=follow, daemon=True).start()
    return worker, sweeping, log


async def test_sigkill_mid_load_loses_nothing(own: tuple[Settings, Keys]) -> None:
    settings, keys = own
    assert settings.database_url is not None
    servers: list[Server] = []
    try:
        servers.append(start_server(settings, **FAULT_ENV))
        async with httpx.AsyncClient(base_url=servers[0].base_url, timeout=30) as http:
            funding = [
                (POOR_WALLET_DEBITS if n == 0 else 100_000) * AMOUNT_MICROS * 2 for n in range(WALLETS)
            ]
            wallet_ids = [await new_wallet(http, keys, funded_micros=micros) for micros in funding]
            funded = dict(zip(wallet_ids, funding, strict=True))

        # Kill until the kill lands while charges wait in the outbox (usually
        # the first round): those are the orphans the sweeper must settle.
        answers: list[Answer] = []
        orphans = 0
        for round_no in range(KILL_ROUNDS_MAX):
            if round_no:
                servers.append(start_server(settings, **FAULT_ENV))
            answers += await _load_then_kill(servers[-1], keys, wallet_ids, settings.database_url)
            orphans = await unsettled(settings)
            print(f"round {round_no}: {dict(summary(answers))}, {orphans} entries left in the outbox")
            if orphans:
                break
        killed_at = time.monotonic()
        seen = summary(answers)
        assert orphans, f"in {KILL_ROUNDS_MAX} rounds no kill left a charge in the outbox: {dict(seen)}"
        assert seen["201"] > 50, f"the load barely ran before the kill: {dict(seen)}"
        lost = [a for a in answers if a.status is None]
        assert lost, "the kill cut no request"
        assert {a.status for a in answers} <= {201, 402, None}, dict(seen)

        # The standalone worker, with no server running, settles the outbox.
        worker, sweeping, worker_log = _start_worker(settings)
        try:
            settle_s = await wait_settled(settings)
            assert await asyncio.to_thread(sweeping.wait, 30), "".join(worker_log)
        finally:
            worker.terminate()
            code = await asyncio.to_thread(worker.wait, 15)
        print("".join(worker_log), end="")
        assert code == 0, "".join(worker_log)

        ledger = await ledger_debits(settings.database_url)
        assert classify(answers, ledger) == {}
        charged_lost = sum(1 for a in lost if ledger.get(a.key))

        # A retry of each lost key, with its key and body, tells which it was.
        servers.append(start_server(settings, **FAULT_ENV))
        retried: list[Answer] = []
        async with httpx.AsyncClient(base_url=servers[-1].base_url, timeout=30) as http:
            for a in lost:
                before = ledger.get(a.key, [])
                retry = await post_debit(http, keys, msgspec.structs.replace(a))
                retried.append(retry)
                if before and before[0].reversed_by is None:
                    assert (retry.status, retry.replayed, retry.entry_id) == (201, True, str(before[0].id)), (
                        retry
                    )
                elif before:
                    assert (retry.status, retry.code) == (409, "idempotency_key_reversed"), retry
                else:  # never charged: the retry charges it now (or the wallet ran dry)
                    assert retry.status in (201, 402) and not retry.replayed, retry
        await wait_settled(settings)
        ledger = await ledger_debits(settings.database_url)
        assert classify(retried, ledger) == {}

        # Invariants 2 and 4 after quiescence, then the operator's check.
        in_ledger = await ledger_balances(settings.database_url, wallet_ids)
        in_redis = await redis_balances(settings, wallet_ids)
        assert in_redis == in_ledger
        assert expected_balances(funded, [*answers, *retried], ledger) == in_ledger
        assert min(in_ledger.values()) >= 0
        async with httpx.AsyncClient(base_url=servers[-1].base_url, timeout=30) as http:
            for wallet_id in wallet_ids:
                got = await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))
                assert got.json()["balance_micros"] == in_ledger[wallet_id]
        checked = run_cli(settings, "check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        print(
            f"{len(answers)} debits, {len(lost)} answers lost to the kill ({charged_lost} of them charged), "
            f"{orphans} orphans settled by `centime worker` in {settle_s:.1f} s "
            f"({time.monotonic() - killed_at:.1f} s after the kill to the end)"
        )
    finally:
        for server in servers:
            stop_server(server)
