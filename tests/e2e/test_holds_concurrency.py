"""Holds over HTTP under concurrency: holds, captures, releases and debits racing on one wallet never
take balance - held below -overdraft_limit (invariant 4) and leave Redis equal to the ledger
(`centime check`); identical captures of a hold charge it once; a release racing a capture lets
exactly one win; and holds expiring under load are each ended exactly once."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as redis
from conftest import (
    RUN_ID,
    Keys,
    Server,
    Stores,
    auth,
    create_database,
    delete_prefix,
    drop_database,
    make_keys,
    new_wallet,
    run_cli,
    start_server,
    stop_server,
)

from centime.settings import Settings
from wallet.cache import Cache

WAIT_S = 20.0
"""Longest a test waits for the sweeper (expiry every 200 ms here) or the event recorder."""


class Own(msgspec.Struct):
    settings: Settings
    server: Server
    keys: Keys
    cache: Cache


@pytest.fixture(scope="module")
async def own(settings: Settings, stores: Stores, template_database: str) -> AsyncIterator[Own]:
    """A server of this module's own: its own database (`centime check` looks at every wallet) and
    Redis prefix (no other server's sweeper may settle its charges), sweeping every 200 ms."""
    name = f"centime_holdc_{RUN_ID}_{secrets.token_hex(3)}"
    url = await create_database(stores, name, template_database)
    mine = msgspec.structs.replace(
        settings, database_url=url, redis_prefix=f"{settings.redis_prefix}q{secrets.token_hex(3)}"
    )
    server = start_server(mine, CENTIME_SWEEPER_INTERVAL_MS="200")
    assert mine.redis_url is not None
    client = redis.Redis.from_url(mine.redis_url)
    try:
        cache = Cache(client, prefix=mine.redis_prefix, partition_count=mine.partition_count)
        yield Own(mine, server, await make_keys(url), cache)
    finally:
        stop_server(server)
        await client.aclose()
        await delete_prefix(mine.redis_url, mine.redis_prefix)
        await drop_database(stores, name)


@pytest.fixture
async def http(own: Own) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=own.server.base_url, timeout=60, limits=limits) as client:
        yield client


# Requests ----------------------------------------------------------------------


async def post_hold(
    http: httpx.AsyncClient, keys: Keys, wallet_id: str, amount_micros: int, *, expires_in_s: int = 300
) -> httpx.Response:
    return await http.post(
        f"/v1/wallets/{wallet_id}/holds",
        json={"amount_micros": amount_micros, "expires_in_s": expires_in_s},
        headers=auth(keys.debit, f"hold-{secrets.token_hex(8)}"),
    )


async def post_debit(
    http: httpx.AsyncClient, keys: Keys, wallet_id: str, amount_micros: int, key: str | None = None
) -> httpx.Response:
    return await http.post(
        f"/v1/wallets/{wallet_id}/debits",
        json={"amount_micros": amount_micros},
        headers=auth(keys.debit, key or f"debit-{secrets.token_hex(8)}"),
    )


async def post_capture(
    http: httpx.AsyncClient, keys: Keys, hold_id: str, amount_micros: int
) -> httpx.Response:
    return await http.post(
        f"/v1/holds/{hold_id}/capture", json={"amount_micros": amount_micros}, headers=auth(keys.debit)
    )


async def post_release(http: httpx.AsyncClient, keys: Keys, hold_id: str) -> httpx.Response:
    return await http.post(f"/v1/holds/{hold_id}/release", headers=auth(keys.debit))


async def get_wallet(http: httpx.AsyncClient, keys: Keys, wallet_id: str) -> dict[str, Any]:
    response = await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))
    assert response.status_code == 200, response.text
    return response.json()


async def get_hold(http: httpx.AsyncClient, keys: Keys, hold_id: str) -> dict[str, Any]:
    response = await http.get(f"/v1/holds/{hold_id}", headers=auth(keys.read))
    assert response.status_code == 200, response.text
    return response.json()


def code(response: httpx.Response) -> str | None:
    return response.json().get("code") if response.status_code >= 400 else None


# What the stores hold ----------------------------------------------------------


class LedgerEntry(msgspec.Struct, frozen=True):
    id: str
    kind: str
    amount_micros: int
    idempotency_key: str | None
    reversed: bool


async def ledger_of(settings: Settings, wallet_id: str) -> tuple[int, list[LedgerEntry]]:
    """The wallet's ledger balance and its entries."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        balance = await conn.fetchval(
            "SELECT coalesce(-sum(amount_micros), 0)::bigint FROM journal_lines WHERE account_id = $1",
            uuid.UUID(wallet_id),
        )
        rows = await conn.fetch(
            """
            SELECT e.id, e.kind, e.amount_micros, e.idempotency_key,
                   EXISTS (SELECT 1 FROM journal_entries r WHERE r.reverses_entry_id = e.id) AS reversed
              FROM journal_entries e
             WHERE e.wallet_id = $1
            """,
            uuid.UUID(wallet_id),
        )
    finally:
        await conn.close()
    entries = [
        LedgerEntry(str(r["id"]), r["kind"], r["amount_micros"], r["idempotency_key"], r["reversed"])
        for r in rows
    ]
    return balance, entries


def captures_in(entries: list[LedgerEntry]) -> dict[str, list[LedgerEntry]]:
    """Capture entries by hold id (their key is hold:<hold id>)."""
    found: dict[str, list[LedgerEntry]] = {}
    for entry in entries:
        if entry.kind == "debit" and (entry.idempotency_key or "").startswith("hold:"):
            found.setdefault(entry.idempotency_key.removeprefix("hold:"), []).append(entry)  # type: ignore[union-attr]
    return found


async def end_events(settings: Settings, hold_ids: list[str]) -> dict[str, list[tuple[str, int | None]]]:
    """Each hold's recorded events that end it: (kind, captured_micros)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT hold_id, kind, captured_micros FROM hold_events WHERE hold_id = ANY($1::uuid[]) AND kind <> 'held'",
            [uuid.UUID(h) for h in hold_ids],
        )
    finally:
        await conn.close()
    found: dict[str, list[tuple[str, int | None]]] = {h: [] for h in hold_ids}
    for row in rows:
        found[str(row["hold_id"])].append((row["kind"], row["captured_micros"]))
    return found


async def wait_for(what: str, probe: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.1)


async def all_recorded(own: Own, hold_ids: list[str]) -> bool:
    """Every hold has its end event in Postgres, and no event waits in Redis."""
    recorded = await end_events(own.settings, hold_ids)
    if any(not kinds for kinds in recorded.values()):
        return False
    cache = own.cache
    lengths = [await cache.client.xlen(cache.hold_events_key(p)) for p in range(cache.partition_count)]
    return sum(lengths) == 0


class Watch:
    """Reads the wallets from Redis (one HMGET: a consistent snapshot) as fast as it can while a
    race runs, and keeps every snapshot that breaks invariant 4: balance - held >= -overdraft."""

    def __init__(self, cache: Cache, wallet_ids: list[str]) -> None:
        self.cache = cache
        self.wallet_ids = [uuid.UUID(w) for w in wallet_ids]
        self.samples = 0
        self.broken: list[tuple[str, int, int, int]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            for wallet_id in self.wallet_ids:
                wallet = await self.cache.wallet(wallet_id)
                assert wallet is not None
                self.samples += 1
                if wallet.balance_micros - wallet.held_micros < -wallet.overdraft_limit_micros:
                    self.broken.append(
                        (
                            str(wallet_id),
                            wallet.balance_micros,
                            wallet.held_micros,
                            wallet.overdraft_limit_micros,
                        )
                    )
            await asyncio.sleep(0.002)  # leave the event loop to the requests under test

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


def check_passes(settings: Settings) -> None:
    checked = run_cli(settings, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok:" in checked.stdout


# The tests ---------------------------------------------------------------------


@pytest.mark.parametrize("overdraft", [0, 3_000], ids=["no-overdraft", "overdraft"])
async def test_holds_captures_releases_and_debits_racing_never_pass_the_limit(
    own: Own, http: httpx.AsyncClient, overdraft: int
) -> None:
    keys = own.keys
    funded = 20_000
    wallet_id = await new_wallet(http, keys, funded_micros=funded, overdraft_limit_micros=overdraft)
    # Ten holds made first: eight are captured over their amount, two released, in the race.
    early = [(await post_hold(http, keys, wallet_id, 1_000)).json() for _ in range(10)]
    assert all(h["status"] == "held" for h in early), early
    to_capture, to_release = early[:8], early[8:]

    async with Watch(own.cache, [wallet_id]) as watch:
        answers = await asyncio.gather(
            *(post_hold(http, keys, wallet_id, 700) for _ in range(30)),
            *(post_debit(http, keys, wallet_id, 450) for _ in range(30)),
            *(post_capture(http, keys, h["id"], 1_500) for h in to_capture),
            *(post_release(http, keys, h["id"]) for h in to_release),
        )
    holds, debits = answers[:30], answers[30:60]
    captures, releases = answers[60:68], answers[68:]
    assert watch.samples > 2 and watch.broken == [], watch.broken

    assert {r.status_code for r in holds} <= {201, 402}, [r.text for r in holds]
    assert {r.status_code for r in debits} <= {201, 402}, [r.text for r in debits]
    assert all(r.status_code == 200 for r in captures + releases), [r.text for r in captures + releases]
    refused = [r for r in holds + debits if r.status_code == 402]
    assert refused, "demand never met the limit: the race tested nothing"
    assert all(code(r) == "insufficient_funds" for r in refused), refused[0].text

    captured = {}
    for response in captures:
        body = response.json()
        assert body["captured_micros"] + body["shortfall_micros"] == body["requested_micros"] == 1_500
        assert 0 <= body["captured_micros"] <= 1_500
        assert body["hold"]["status"] == "captured"
        if body["captured_micros"]:
            assert body["entry"]["amount_micros"] == body["captured_micros"]
        else:
            assert body["entry"] is None
        captured[body["hold"]["id"]] = body
    assert all(r.json()["status"] == "released" for r in releases)

    spent = sum(450 for r in debits if r.status_code == 201) + sum(
        c["captured_micros"] for c in captured.values()
    )
    still_held = sum(700 for r in holds if r.status_code == 201)
    wallet = await get_wallet(http, keys, wallet_id)
    assert (wallet["balance_micros"], wallet["held_micros"]) == (funded - spent, still_held)
    assert wallet["balance_micros"] - wallet["held_micros"] >= -overdraft
    assert wallet["available_micros"] >= 0

    balance, entries = await ledger_of(own.settings, wallet_id)
    assert balance == wallet["balance_micros"]
    by_hold = captures_in(entries)
    assert {h: [e.amount_micros for e in found] for h, found in by_hold.items()} == {
        h: [c["captured_micros"]] for h, c in captured.items() if c["captured_micros"]
    }
    assert not any(e.reversed for e in entries)
    check_passes(own.settings)

    # Releasing what is left frees it all; each hold ends once, as recorded.
    for response in holds:
        if response.status_code == 201:
            assert (await post_release(http, keys, response.json()["id"])).status_code == 200
    wallet = await get_wallet(http, keys, wallet_id)
    assert wallet["held_micros"] == 0
    assert wallet["available_micros"] == wallet["balance_micros"] + overdraft
    hold_ids = [h["id"] for h in early] + [r.json()["id"] for r in holds if r.status_code == 201]
    await wait_for("every end event recorded", lambda: all_recorded(own, hold_ids))
    recorded = await end_events(own.settings, hold_ids)
    for h in to_capture:
        assert recorded[h["id"]] == [("captured", captured[h["id"]]["captured_micros"])]
    for hold_id in hold_ids[8:]:
        assert recorded[hold_id] == [("released", None)]


async def test_identical_captures_of_one_hold_charge_it_once(own: Own, http: httpx.AsyncClient) -> None:
    keys = own.keys
    wallet_id = await new_wallet(http, keys, funded_micros=100_000)
    holds = [(await post_hold(http, keys, wallet_id, 2_000)).json() for _ in range(6)]
    amounts = {h["id"]: 1_000 + 500 * n for n, h in enumerate(holds)}  # under and over the hold
    copies = 12
    answers = await asyncio.gather(
        *(post_capture(http, keys, h["id"], amounts[h["id"]]) for h in holds for _ in range(copies))
    )
    entries_by_hold: dict[str, set[str]] = {}
    for n, response in enumerate(answers):
        hold_id = holds[n // copies]["id"]
        # The first to arrive captures; a copy that lands while its commit is pending is told to
        # retry (as a debit's is); every other copy replays the same entry.
        assert response.status_code in (200, 409), response.text
        if response.status_code == 409:
            assert code(response) == "request_in_progress", response.text
            continue
        body = response.json()
        assert (body["captured_micros"], body["entry"]["amount_micros"]) == (
            amounts[hold_id],
            amounts[hold_id],
        )
        entries_by_hold.setdefault(hold_id, set()).add(body["entry"]["id"])
    assert all(len(found) == 1 for found in entries_by_hold.values()), entries_by_hold
    assert set(entries_by_hold) == set(amounts), "every hold had a copy answered 200"

    # Retried after the race, each answers that entry.
    for h in holds:
        again = await post_capture(http, keys, h["id"], amounts[h["id"]])
        assert again.status_code == 200, again.text
        assert {again.json()["entry"]["id"]} == entries_by_hold[h["id"]]

    balance, entries = await ledger_of(own.settings, wallet_id)
    by_hold = captures_in(entries)
    assert {h: [(e.id, e.amount_micros) for e in found] for h, found in by_hold.items()} == {
        h: [(next(iter(entries_by_hold[h])), amounts[h])] for h in amounts
    }
    assert balance == 100_000 - sum(amounts.values())
    wallet = await get_wallet(http, keys, wallet_id)
    assert (wallet["balance_micros"], wallet["held_micros"]) == (balance, 0)
    check_passes(own.settings)


async def test_a_release_racing_a_capture_lets_exactly_one_win(own: Own, http: httpx.AsyncClient) -> None:
    keys = own.keys
    funded = 100_000
    wallet_id = await new_wallet(http, keys, funded_micros=funded)
    holds = [(await post_hold(http, keys, wallet_id, 1_000)).json() for _ in range(30)]
    calls = []
    for n, h in enumerate(holds):  # half the pairs send the release first
        pair = [post_capture(http, keys, h["id"], 800), post_release(http, keys, h["id"])]
        calls += pair if n % 2 else pair[::-1]
    answers = await asyncio.gather(*calls)

    won: dict[str, str] = {}
    for n, h in enumerate(holds):
        first, second = answers[2 * n], answers[2 * n + 1]
        capture, release = (first, second) if n % 2 else (second, first)
        outcome = (capture.status_code, release.status_code)
        assert outcome in ((200, 409), (409, 200)), (capture.text, release.text)
        loser = release if outcome == (200, 409) else capture
        assert code(loser) == "hold_not_held", loser.text
        if outcome == (200, 409):
            assert capture.json()["captured_micros"] == 800
            won[h["id"]] = "captured"
        else:
            assert release.json()["status"] == "released"
            won[h["id"]] = "released"
        assert (await get_hold(http, keys, h["id"]))["status"] == won[h["id"]]

    print(f"winners: {dict(Counter(won.values()))}")
    captured_ids = {h for h, outcome in won.items() if outcome == "captured"}
    balance, entries = await ledger_of(own.settings, wallet_id)
    assert set(captures_in(entries)) == captured_ids
    assert balance == funded - 800 * len(captured_ids)
    wallet = await get_wallet(http, keys, wallet_id)
    assert (wallet["balance_micros"], wallet["held_micros"]) == (balance, 0)
    hold_ids = list(won)
    await wait_for("every end event recorded", lambda: all_recorded(own, hold_ids))
    recorded = await end_events(own.settings, hold_ids)
    assert {h: [kind for kind, _ in kinds] for h, kinds in recorded.items()} == {
        h: [k] for h, k in won.items()
    }
    check_passes(own.settings)


async def test_holds_expiring_under_load_are_each_ended_once(own: Own, http: httpx.AsyncClient) -> None:
    keys = own.keys
    wallets_count, per_wallet, amount, sentinel = 4, 50, 100, 5_000
    funded = sentinel + per_wallet * amount + 2_000
    wallet_ids = [await new_wallet(http, keys, funded_micros=funded) for _ in range(wallets_count)]
    # A long hold per wallet stays through it all, larger than any short one: if any short hold
    # were released twice, its wallet would end up holding less than this.
    sentinels = [(await post_hold(http, keys, w, sentinel)).json() for w in wallet_ids]

    debited: Counter[str] = Counter()
    stop = asyncio.Event()

    async def debit_until_stopped(wallet_id: str) -> None:
        while not stop.is_set():
            response = await post_debit(http, keys, wallet_id, 37)
            assert response.status_code in (201, 402), response.text
            if response.status_code == 201:
                debited[wallet_id] += 37

    async with Watch(own.cache, wallet_ids) as watch:
        started = time.monotonic()
        created = await asyncio.gather(
            *(
                post_hold(http, keys, w, amount, expires_in_s=1 if n % 5 else 4)
                for w in wallet_ids
                for n in range(per_wallet)
            )
        )
        assert all(r.status_code == 201 for r in created), [r.text for r in created if r.status_code != 201][
            :3
        ]
        short = [r.json() for r in created]
        made_s = time.monotonic() - started
        # Debits take what each expiry frees, and one hold in five (those of 4 s, to outlast
        # making them all) is released by its caller around its expiry time, racing the sweeper.
        debits = [asyncio.create_task(debit_until_stopped(w)) for w in wallet_ids for _ in range(3)]
        now_ms = await own.cache.server_time_ms()

        async def release_near_expiry(n: int, hold: dict[str, Any]) -> httpx.Response:
            expires_ms = datetime.fromisoformat(hold["expires_at"]).timestamp() * 1000
            await asyncio.sleep(max(0.0, (expires_ms - now_ms) / 1000 + (n % 5 - 3) * 0.2))  # -0.6..+0.2 s
            return await post_release(http, keys, hold["id"])

        releases = await asyncio.gather(*(release_near_expiry(n, h) for n, h in enumerate(short[::5])))
        print(f"made in {made_s:.1f} s; releases: {Counter(r.json()['status'] for r in releases)}")
        assert all(r.status_code == 200 and r.json()["status"] in ("released", "expired") for r in releases)

        async def short_holds_ended() -> bool:
            states = [await own.cache.hold_state(uuid.UUID(h["id"])) for h in short]
            return all(s is not None and s.status != "held" for s in states)

        await wait_for("the sweeper expired every short hold", short_holds_ended)
        stop.set()
        await asyncio.gather(*debits)
    assert watch.samples > 100 and watch.broken == [], watch.broken
    assert sum(debited.values()) > 0

    for wallet_id in wallet_ids:
        wallet = await get_wallet(http, keys, wallet_id)
        assert (wallet["balance_micros"], wallet["held_micros"]) == (funded - debited[wallet_id], sentinel)
    cache = own.cache
    due = [
        m
        for p in range(cache.partition_count)
        for m in await cache.client.zrange(cache.hold_expiry_key(p), 0, -1)
    ]
    mine = [m.decode().split(":")[0] for m in due if m.decode().split(":")[1] in wallet_ids]
    assert sorted(mine) == sorted(s["id"] for s in sentinels)

    short_ids = [h["id"] for h in short]
    await wait_for("every end event recorded", lambda: all_recorded(own, short_ids))
    recorded = await end_events(own.settings, short_ids)
    ends = Counter()
    for h in short:
        kinds = recorded[h["id"]]
        assert len(kinds) == 1, (h["id"], kinds)
        state = await cache.hold_state(uuid.UUID(h["id"]))
        assert state is not None and kinds[0] == (state.status, None)
        ends[state.status] += 1
        # Expired never before its time; released only before it (a late release expires it).
        assert state.ended_at_ms is not None
        assert (state.ended_at_ms >= state.expires_at_ms) == (state.status == "expired"), state
    print(f"{len(short)} short holds ended: {dict(ends)}; {watch.samples} snapshots")
    assert ends["expired"] > 0

    for s in sentinels:
        assert (await post_release(http, keys, s["id"])).status_code == 200
    for wallet_id in wallet_ids:
        balance, _ = await ledger_of(own.settings, wallet_id)
        wallet = await get_wallet(http, keys, wallet_id)
        assert (wallet["balance_micros"], wallet["held_micros"]) == (balance, 0)
    check_passes(own.settings)


async def test_captures_and_releases_answer_the_same_once_redis_lets_the_hold_go(
    own: Own, http: httpx.AsyncClient
) -> None:
    """Redis keeps an ended hold for the idempotency TTL only; Postgres keeps its events and the
    ledger its capture forever, so a retry must get the same answer after that as before."""
    keys, cache = own.keys, own.cache
    wallet_id = await new_wallet(http, keys, funded_micros=10_000)
    captured_id = (await post_hold(http, keys, wallet_id, 1_000)).json()["id"]
    released_id = (await post_hold(http, keys, wallet_id, 1_000)).json()["id"]
    first = await post_capture(http, keys, captured_id, 1_500)
    assert first.status_code == 200, first.text
    assert (await post_release(http, keys, released_id)).status_code == 200
    await wait_for("every end event recorded", lambda: all_recorded(own, [captured_id, released_id]))
    # What the TTL does an hour later (idempotency_ttl_s), at once.
    wallet_uuid = uuid.UUID(wallet_id)
    gone = [
        cache.hold_key(uuid.UUID(captured_id)),
        cache.hold_key(uuid.UUID(released_id)),
        cache.idempotency_key(wallet_uuid, f"hold:{captured_id}"),
    ]
    assert await cache.client.delete(*gone) == 3

    again = await post_capture(http, keys, captured_id, 1_500)
    assert again.status_code == 200, again.text
    assert again.json()["entry"] == first.json()["entry"]
    assert (again.json()["captured_micros"], again.json()["hold"]["status"]) == (1_500, "captured")
    other = await post_capture(http, keys, captured_id, 1_600)
    assert (other.status_code, code(other)) == (409, "idempotency_conflict"), other.text
    released_again = await post_release(http, keys, released_id)
    assert released_again.status_code == 200, released_again.text
    assert released_again.json()["status"] == "released"
    refused = await post_release(http, keys, captured_id)
    assert (refused.status_code, code(refused)) == (409, "hold_not_held")
    refused = await post_capture(http, keys, released_id, 10)
    assert (refused.status_code, code(refused)) == (409, "hold_not_held")

    balance, entries = await ledger_of(own.settings, wallet_id)
    assert balance == 10_000 - 1_500
    assert [e.id for e in captures_in(entries)[captured_id]] == [first.json()["entry"]["id"]]
    wallet = await get_wallet(http, keys, wallet_id)
    assert (wallet["balance_micros"], wallet["held_micros"]) == (balance, 0)


async def test_a_debit_cannot_take_the_key_of_a_capture(own: Own, http: httpx.AsyncClient) -> None:
    keys = own.keys
    wallet_id = await new_wallet(http, keys, funded_micros=10_000)
    hold_id = (await post_hold(http, keys, wallet_id, 3_000)).json()["id"]
    squatter = await post_debit(http, keys, wallet_id, 10, key=f"hold:{hold_id}")
    assert squatter.status_code == 400, squatter.text
    assert squatter.json()["fields"] == ["Idempotency-Key"]
    captured = await post_capture(http, keys, hold_id, 2_000)
    balance, _ = await ledger_of(own.settings, wallet_id)
    if captured.status_code == 200:  # the capture charged what it says
        assert captured.json()["entry"]["amount_micros"] == 2_000
        assert balance == 10_000 - (10 if squatter.status_code == 201 else 0) - 2_000
    else:  # or it was refused and the hold is still there to capture or release
        assert squatter.status_code == 201, "a debit refused at the door leaves the capture's key free"
        assert (await get_hold(http, keys, hold_id))["status"] == "held", captured.text
