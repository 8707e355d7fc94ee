"""wallet.tick_client.TickClient against real Redis servers returns what redis-py returns, sends a tick's
commands in one socket write, fails only the command an error reply belongs to, loads an unknown script
once, and on a timeout, a killed server, a cancelled caller or a close keeps every later reply matched to
its own command; AUTH, SELECT and unix sockets work."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.exceptions
from conftest import RUN_ID, Stores, delete_prefix, free_port
from redis import asyncio as aioredis

from centime.embedded import REDIS_SERVER
from wallet import tick_client
from wallet.tick_client import Script, TickClient

TIMEOUT_S = 2.0
SHORT_TIMEOUT_S = 0.2
SHORT_TIMEOUT_LATE_S_MAX = 1.5
"""A short timeout must be reported within this of the call. A stalled Redis
never answers, so a timeout not honoured hangs for good; room above the 0.2 s
for a loaded 2-core machine, and below TIMEOUT_S, so no other timer passes."""
PROMPT_S_MAX = 1.0  # "promptly": well under TIMEOUT_S, so no timer was needed
START_S_MAX = 10.0
CONCURRENT_INCRS = 2_000
CONCURRENT_INCRS_WRITES_MAX = 20


@pytest.fixture
async def prefix(stores: Stores) -> AsyncIterator[str]:
    """A key prefix of the test's own on the shared Redis; its keys are deleted afterwards."""
    prefix = f"tick{RUN_ID}{secrets.token_hex(4)}"
    yield prefix
    await delete_prefix(stores.redis_url, prefix)


@pytest.fixture
async def tick(stores: Stores) -> AsyncIterator[TickClient]:
    client = TickClient(stores.redis_url, timeout_s=TIMEOUT_S)
    yield client
    await client.close()


@pytest.fixture
async def plain(stores: Stores) -> AsyncIterator[aioredis.Redis]:
    """redis-py itself, decode_responses=False: the reference for reply types."""
    client = aioredis.Redis.from_url(stores.redis_url, decode_responses=False)
    yield client
    await client.aclose()


class RedisDidNotStart(Exception):
    pass


class OwnRedis:
    """A redis-server of the test's own on a free loopback port, to stop, kill and restart."""

    def __init__(self, *extra_args: str, binary: str | None = None) -> None:
        self.port = free_port()
        self.extra_args = extra_args
        self.binary = binary or shutil.which("redis-server") or str(REDIS_SERVER)
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", *self.extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_S_MAX
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() >= deadline:
                self.kill()
                raise RedisDidNotStart(f"{self.binary} {' '.join(self.extra_args)}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        """Any reply to PING (+PONG, or -NOAUTH): its event loop runs, so every listener is open."""
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as probe,
        ):
            probe.sendall(b"PING\r\n")
            return bool(probe.recv(64))
        return False

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        """kill -9, and reap it: the port is free again when this returns."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()  # a stopped one too, without running again first (no SIGCONT)
        self.process.wait(timeout=START_S_MAX)


@contextlib.contextmanager
def own_redis(*extra_args: str, binary: str | None = None) -> Iterator[OwnRedis]:
    server = OwnRedis(*extra_args, binary=binary)
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def own() -> Iterator[OwnRedis]:
    with own_redis() as server:
        yield server


async def test_replies_have_redis_py_types(tick: TickClient, plain: aioredis.Redis, prefix: str) -> None:
    binary = bytes(range(256)) + b"\r\n$-1\r\n*"
    large = secrets.token_bytes(3 * tick_client.WRITE_BUFFER_BYTES_MAX)  # forces a write mid-tick
    assert await tick.execute("PING") == b"PONG"
    assert await tick.execute("SET", f"{prefix}:binary", binary) == b"OK"
    assert await tick.execute(b"SET", f"{prefix}:text", "centime é ✓") == b"OK"
    assert await tick.execute("SET", f"{prefix}:large", large) == b"OK"
    commands: list[tuple[bytes | str | int, ...]] = [
        ("GET", f"{prefix}:binary"),
        ("GET", f"{prefix}:text"),
        ("GET", f"{prefix}:large"),
        ("GET", f"{prefix}:missing"),
        ("INCRBY", f"{prefix}:counter", -(2**53 - 1)),
        ("MGET", f"{prefix}:text", f"{prefix}:missing", f"{prefix}:binary"),
        ("LRANGE", f"{prefix}:missing", 0, -1),
        ("EVAL", "return {1, {2, 'x', {}}, false, KEYS[1], ARGV[1], {err = 'nested'}}", 1, f"{prefix}:k", 7),
        ("EVAL", "return {ok = 'FINE'}", 0),
        ("EXISTS", f"{prefix}:binary", f"{prefix}:missing"),
    ]
    ours = await asyncio.gather(*(tick.execute(*command) for command in commands))
    assert ours[0] == binary
    assert ours[1] == "centime é ✓".encode()
    assert ours[2] == large
    assert ours[3] is None
    assert ours[4] == -(2**53 - 1)
    assert ours[5] == [b"centime \xc3\xa9 \xe2\x9c\x93", None, binary]
    assert ours[6] == []
    assert ours[7][:5] == [1, [2, b"x", []], None, f"{prefix}:k".encode(), b"7"]
    assert isinstance(ours[7][5], redis.exceptions.ResponseError)  # nested errors stay values
    assert ours[8] == b"FINE"
    assert ours[9] == 1
    await tick.execute("DEL", f"{prefix}:counter")
    theirs = [await plain.execute_command(*command) for command in commands]
    assert [type(reply) for reply in ours] == [type(reply) for reply in theirs]
    assert ours[:7] + ours[8:] == theirs[:7] + theirs[8:]


async def test_concurrent_commands_share_few_writes(tick: TickClient, prefix: str) -> None:
    assert await tick.execute("PING") == b"PONG"  # connected: the writes below are the INCRs only
    writes_before = tick.writes
    counts = await asyncio.gather(*(tick.execute("INCR", f"{prefix}:n") for _ in range(CONCURRENT_INCRS)))
    writes = tick.writes - writes_before
    assert sorted(counts) == list(range(1, CONCURRENT_INCRS + 1))
    assert await tick.execute("GET", f"{prefix}:n") == str(CONCURRENT_INCRS).encode()
    assert 1 <= writes <= CONCURRENT_INCRS_WRITES_MAX, writes


async def test_concurrent_first_callers_share_one_connection(stores: Stores) -> None:
    client = TickClient(stores.redis_url, timeout_s=TIMEOUT_S)
    try:
        ids = await asyncio.gather(*(client.execute("CLIENT", "ID") for _ in range(50)))
        assert len(set(ids)) == 1
    finally:
        await client.close()


async def test_error_reply_fails_only_its_command(tick: TickClient, prefix: str) -> None:
    connection_id = await tick.execute("CLIENT", "ID")
    key = f"{prefix}:word"
    replies = await asyncio.gather(
        tick.execute("SET", key, "not a number"),
        tick.execute("INCR", key),
        tick.execute("GET", key),
        tick.execute("HSET", key, "field", 1),
        tick.execute("NOSUCHCOMMAND"),
        tick.execute("APPEND", key, "!"),
        return_exceptions=True,
    )
    assert replies[0] == b"OK"
    assert type(replies[1]) is redis.exceptions.ResponseError
    assert "not an integer" in str(replies[1])
    assert replies[2] == b"not a number"
    assert type(replies[3]) is redis.exceptions.ResponseError
    assert "WRONGTYPE" in str(replies[3])
    assert type(replies[4]) is redis.exceptions.ResponseError
    assert replies[5] == len(b"not a number!")
    assert await tick.execute("CLIENT", "ID") == connection_id  # the same connection carries on


async def test_arguments_that_cannot_be_encoded_are_refused_and_leave_the_buffer_clean(
    tick: TickClient, prefix: str
) -> None:
    for bad in (1.5, True, None, [b"x"]):
        with pytest.raises(redis.exceptions.DataError):
            await tick.execute("SET", f"{prefix}:bad", bad)  # type: ignore[arg-type]
    assert await tick.execute("EXISTS", f"{prefix}:bad") == 0
    assert await tick.execute("SET", f"{prefix}:good", bytearray(b"ok")) == b"OK"  # type: ignore[arg-type]
    assert await tick.execute("GET", f"{prefix}:good") == b"ok"


async def test_evalsha_loads_a_script_redis_does_not_know(tick: TickClient, prefix: str) -> None:
    script = Script(f"-- tick client test {secrets.token_hex(16)}\nreturn {{KEYS[1], ARGV[1] + 1, #ARGV}}")
    assert await tick.execute("SCRIPT", "EXISTS", script.sha) == [0]
    key = f"{prefix}:script"
    assert await tick.evalsha(script, [key], [41, "x"]) == [key.encode(), 42, 2]
    assert await tick.execute("SCRIPT", "EXISTS", script.sha) == [1]
    replies = await asyncio.gather(*(tick.evalsha(script, [key], [n]) for n in range(100)))
    assert replies == [[key.encode(), n + 1, 1] for n in range(100)]


async def test_concurrent_evalsha_of_an_unknown_script_all_succeed(tick: TickClient, prefix: str) -> None:
    script = Script(f"-- tick client test {secrets.token_hex(16)}\nreturn redis.call('INCR', KEYS[1])")
    key = f"{prefix}:script-counter"
    counts = await asyncio.gather(*(tick.evalsha(script, [key], []) for _ in range(200)))
    assert sorted(counts) == list(range(1, 201))


async def test_evalsha_error_from_the_script_is_a_response_error(tick: TickClient) -> None:
    script = Script(
        f"-- tick client test {secrets.token_hex(16)}\nreturn redis.error_reply('REFUSED by script')"
    )
    with pytest.raises(redis.exceptions.ResponseError, match="REFUSED by script"):
        await tick.evalsha(script, [], [])
    assert await tick.execute("PING") == b"PONG"


async def test_evalsha_many_answers_in_call_order_in_one_write(tick: TickClient, prefix: str) -> None:
    script = Script(
        f"-- tick client test {secrets.token_hex(16)}\nreturn {{KEYS[1], redis.call('INCR', KEYS[1])}}"
    )
    await tick.evalsha(script, [f"{prefix}:warm"], [])  # connected and loaded: the writes below are the calls
    writes_before = tick.writes
    keys = [f"{prefix}:many:{n % 7}" for n in range(50)]
    replies = await tick.evalsha_many(script, [([key], []) for key in keys])
    assert tick.writes - writes_before == 1
    assert replies == [[key.encode(), keys[: n + 1].count(key)] for n, key in enumerate(keys)]


async def test_evalsha_many_loads_an_unknown_script_and_runs_each_call_once(
    tick: TickClient, prefix: str
) -> None:
    script = Script(
        f"-- tick client test {secrets.token_hex(16)}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    )
    assert await tick.execute("SCRIPT", "EXISTS", script.sha) == [0]
    key = f"{prefix}:many-unknown"
    replies = await tick.evalsha_many(script, [([key], [n]) for n in range(1, 11)])
    assert replies == [sum(range(1, n + 1)) for n in range(1, 11)]  # each ran once, in order
    assert await tick.execute("GET", key) == str(sum(range(1, 11))).encode()


async def test_evalsha_many_makes_no_task_per_call(tick: TickClient, prefix: str) -> None:
    script = Script(f"-- tick client test {secrets.token_hex(16)}\nreturn redis.call('INCR', KEYS[1])")
    await tick.evalsha(script, [f"{prefix}:warm"], [])
    running = asyncio.ensure_future(tick.evalsha_many(script, [([f"{prefix}:tasks"], [])] * 50))
    tasks_before = len(asyncio.all_tasks())
    await asyncio.sleep(0)  # the call has queued its commands and waits for the replies
    assert len(asyncio.all_tasks()) == tasks_before  # a gather of 50 coroutines would add 50
    assert await running == list(range(1, 51))


class _FlushMidway(list):  # type: ignore[type-arg]
    """Calls whose iteration drops every script from Redis after the first `after` calls are
    queued: those run, the rest are answered NOSCRIPT."""

    def __init__(self, calls: list, tick: TickClient, after: int) -> None:  # type: ignore[type-arg]
        super().__init__(calls)
        self.tick, self.after = tick, after

    def __iter__(self) -> Iterator:  # type: ignore[type-arg]
        for n, call in enumerate(super().__iter__()):
            if n == self.after:
                connection = self.tick._connection
                assert connection is not None
                connection.send((b"SCRIPT", b"FLUSH"))
            yield call


async def test_evalsha_many_runs_each_call_once_when_redis_forgets_the_script_midway(
    tick: TickClient, prefix: str
) -> None:
    script = Script(f"-- tick client test {secrets.token_hex(16)}\nreturn redis.call('INCR', KEYS[1])")
    await tick.evalsha(script, [f"{prefix}:warm"], [])
    keys = [f"{prefix}:midway:{n}" for n in range(6)]
    replies = await tick.evalsha_many(script, _FlushMidway([([key], []) for key in keys], tick, after=3))
    assert replies == [1] * 6
    assert [await tick.execute("GET", key) for key in keys] == [b"1"] * 6  # none ran twice


async def test_evalsha_many_raises_a_call_error_after_every_call_ran(tick: TickClient, prefix: str) -> None:
    script = Script(
        f"-- tick client test {secrets.token_hex(16)}\n"
        "if ARGV[1] == 'bad' then return redis.error_reply('REFUSED by script') end\n"
        "return redis.call('INCR', KEYS[1])"
    )
    key = f"{prefix}:many-error"
    calls = [([key], ["good"]), ([key], ["bad"]), ([key], ["good"])]
    for count in (b"2", b"4"):  # the script unknown to Redis first (NOSCRIPT), then known
        with pytest.raises(redis.exceptions.ResponseError, match="REFUSED by script"):
            await tick.evalsha_many(script, calls)
        assert await tick.execute("GET", key) == count  # the calls around the refused one ran
    assert await tick.execute("PING") == b"PONG"


async def test_evalsha_loads_once_then_gives_up(own: OwnRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A script flushed again right after its SCRIPT LOAD: the second NOSCRIPT is raised, not retried."""
    client = TickClient(own.url, timeout_s=TIMEOUT_S)
    script = Script("return 'never runs'")
    execute = client.execute

    async def flush_after_load(*args: bytes | str | int) -> object:
        reply = await execute(*args)
        if args[:2] == (b"SCRIPT", b"LOAD"):
            await execute("SCRIPT", "FLUSH")
        return reply

    monkeypatch.setattr(client, "execute", flush_after_load)
    try:
        await execute("CONFIG", "RESETSTAT")
        with pytest.raises(redis.exceptions.NoScriptError):
            await client.evalsha(script, [], [])
        stats = (await execute("INFO", "commandstats")).decode()
        assert "cmdstat_evalsha:calls=2," in stats, stats
    finally:
        await client.close()


async def test_no_reply_in_time_fails_every_pending_command_and_reconnects(own: OwnRedis) -> None:
    client = TickClient(own.url, timeout_s=SHORT_TIMEOUT_S)
    try:
        assert await client.execute("SET", "k", "v") == b"OK"
        own.signal(signal.SIGSTOP)
        started = time.monotonic()
        replies = await asyncio.gather(
            client.execute("GET", "k"), client.execute("PING"), return_exceptions=True
        )
        elapsed_s = time.monotonic() - started
        assert all(type(reply) is redis.exceptions.TimeoutError for reply in replies), replies
        assert SHORT_TIMEOUT_S - tick_client.TIMER_SLACK_S <= elapsed_s <= SHORT_TIMEOUT_LATE_S_MAX, elapsed_s
        own.signal(signal.SIGCONT)
        assert await client.execute("GET", "k") == b"v"
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.close()


async def test_killed_server_fails_commands_promptly_and_a_restart_is_picked_up(own: OwnRedis) -> None:
    client = TickClient(own.url, timeout_s=TIMEOUT_S)
    script = Script(f"-- tick client test {secrets.token_hex(16)}\nreturn ARGV[1] * 2")
    try:
        assert await client.evalsha(script, [], [21]) == 42
        own.signal(signal.SIGSTOP)  # so the command below is surely still pending at the kill
        pending = asyncio.ensure_future(client.execute("SET", "k", "v"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        own.kill()
        with pytest.raises(redis.exceptions.ConnectionError):
            await pending
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.execute("PING")  # nothing listens: refused
        assert time.monotonic() - started < PROMPT_S_MAX
        own.start()  # same port, empty script cache
        assert await client.execute("PING") == b"PONG"
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
        assert await client.evalsha(script, [], [5]) == 10
    finally:
        await client.close()


async def test_a_cancelled_caller_does_not_shift_later_replies(own: OwnRedis) -> None:
    client = TickClient(own.url, timeout_s=TIMEOUT_S)
    try:
        await client.execute("MSET", "a", "1", "b", "2", "c", "3")
        own.signal(signal.SIGSTOP)  # hold every reply until the cancel has happened
        cancelled = asyncio.ensure_future(client.execute("GET", "a"))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        follower = asyncio.ensure_future(client.execute("GET", "b"))
        await asyncio.sleep(0.05)
        own.signal(signal.SIGCONT)
        assert await follower == b"2"
        assert cancelled.cancelled()
        assert await client.execute("GET", "c") == b"3"
    finally:
        await client.close()


async def test_many_cancelled_callers_leave_the_others_their_own_replies(
    tick: TickClient, prefix: str
) -> None:
    count = 600
    await tick.execute("MSET", *[part for n in range(count) for part in (f"{prefix}:{n}", n)])
    tasks = [asyncio.ensure_future(tick.execute("GET", f"{prefix}:{n}")) for n in range(count)]
    await asyncio.sleep(0)  # queued and written, replies not read yet
    for task in tasks[::3]:
        task.cancel()
    replies = await asyncio.gather(*tasks, return_exceptions=True)
    for n, reply in enumerate(replies):
        if n % 3 == 0:
            assert isinstance(reply, asyncio.CancelledError) or reply == str(n).encode()
        else:
            assert reply == str(n).encode()
    assert await tick.execute("GET", f"{prefix}:7") == b"7"


async def test_auth_and_select_run_first() -> None:
    with own_redis("--requirepass", "secret") as server:
        client = TickClient(f"redis://:secret@127.0.0.1:{server.port}/3", timeout_s=TIMEOUT_S)
        wrong = TickClient(f"redis://:wrong@127.0.0.1:{server.port}/0", timeout_s=TIMEOUT_S)
        reference = aioredis.Redis(port=server.port, password="secret", db=3)
        reference_db0 = aioredis.Redis(port=server.port, password="secret", db=0)
        try:
            assert await client.execute("SET", "landed", "in-3") == b"OK"
            assert await reference.get("landed") == b"in-3"
            assert await reference_db0.get("landed") is None
            with pytest.raises(redis.exceptions.AuthenticationError):
                await wrong.execute("PING")
            assert issubclass(redis.exceptions.AuthenticationError, redis.exceptions.ConnectionError)
        finally:
            await client.close()
            await wrong.close()
            await reference.aclose()
            await reference_db0.aclose()


async def test_unix_socket_url_with_db() -> None:
    with tempfile.TemporaryDirectory(prefix="tick-") as directory:
        path = Path(directory) / "redis.sock"
        with own_redis("--unixsocket", str(path), "--unixsocketperm", "700") as server:
            client = TickClient(f"unix://{path}?db=2", timeout_s=TIMEOUT_S)
            reference = aioredis.Redis(port=server.port, db=2)
            try:
                assert await client.execute("SET", "over-unix", "yes") == b"OK"
                assert await reference.get("over-unix") == b"yes"
            finally:
                await client.close()
                await reference.aclose()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def redis_server_binaries() -> list[str]:
    """Every redis-server here, the one on PATH first: not every build has TLS."""
    found = (shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/local/bin/redis-server")
    return list(dict.fromkeys(path for path in found if path is not None and Path(path).exists()))


async def test_tls_url_verifies_the_server() -> None:
    """rediss:// with the server's CA verifies it; without that CA the connect fails as a ConnectionError."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    with tempfile.TemporaryDirectory(prefix="tick-tls-") as directory:
        cert, key = make_certificate(Path(directory))
        tls_port = free_port()
        tls_args = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                    "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")  # fmt: skip
        for binary in redis_server_binaries():  # not every build has TLS: one without it refuses --tls-port
            with contextlib.suppress(RedisDidNotStart), own_redis(*tls_args, binary=binary):
                verified = TickClient(
                    f"rediss://127.0.0.1:{tls_port}/2?ssl_ca_certs={cert}", timeout_s=TIMEOUT_S
                )
                unverified = TickClient(f"rediss://127.0.0.1:{tls_port}/0", timeout_s=TIMEOUT_S)
                try:
                    assert await verified.execute("SET", "over-tls", "yes") == b"OK"
                    assert await verified.execute("GET", "over-tls") == b"yes"
                    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                        await unverified.execute("PING")
                finally:
                    await verified.close()
                    await unverified.close()
                return
        pytest.skip("no redis-server built with TLS")


async def test_connect_failure_is_a_connection_error() -> None:
    client = TickClient(f"redis://127.0.0.1:{free_port()}/0", timeout_s=TIMEOUT_S)
    try:
        started = time.monotonic()
        replies = await asyncio.gather(*(client.execute("PING") for _ in range(10)), return_exceptions=True)
        assert all(type(reply) is redis.exceptions.ConnectionError for reply in replies), replies
        assert time.monotonic() - started < PROMPT_S_MAX
    finally:
        await client.close()


async def test_pending_commands_are_bounded(
    tick: TickClient, monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    assert await tick.execute("PING") == b"PONG"
    monkeypatch.setattr(tick_client, "PENDING_COMMANDS_MAX", 10)
    replies = await asyncio.gather(
        *(tick.execute("INCR", f"{prefix}:bounded") for _ in range(11)), return_exceptions=True
    )
    assert sorted(replies[:10]) == list(range(1, 11))  # type: ignore[type-var]
    assert type(replies[10]) is redis.exceptions.ConnectionError
    assert "too many pending" in str(replies[10])
    assert await tick.execute("GET", f"{prefix}:bounded") == b"10"


async def test_close_fails_pending_commands_and_later_calls(own: OwnRedis) -> None:
    client = TickClient(own.url, timeout_s=TIMEOUT_S)
    assert await client.execute("PING") == b"PONG"
    own.signal(signal.SIGSTOP)
    pending = asyncio.ensure_future(client.execute("PING"))
    await asyncio.sleep(0.05)
    await client.close()
    with pytest.raises(redis.exceptions.ConnectionError):
        await pending
    with pytest.raises(redis.exceptions.ConnectionError):
        await client.execute("PING")
    own.signal(signal.SIGCONT)


async def test_close_while_connecting_fails_the_waiters(own: OwnRedis) -> None:
    client = TickClient(own.url.removesuffix("/0") + "/1", timeout_s=TIMEOUT_S)
    own.signal(signal.SIGSTOP)  # TCP connects (the kernel accepts), SELECT never answers
    waiter = asyncio.ensure_future(client.execute("PING"))
    await asyncio.sleep(0.05)
    await client.close()
    with pytest.raises(redis.exceptions.ConnectionError):
        await waiter
    own.signal(signal.SIGCONT)


# The service serves on uvloop, whose transports differ from asyncio's: every scenario above runs on
# it too, each on a fresh uvloop loop with its fixtures built here (pytest-asyncio's loop is asyncio's).
SCENARIOS = [
    test_replies_have_redis_py_types,
    test_concurrent_commands_share_few_writes,
    test_concurrent_first_callers_share_one_connection,
    test_error_reply_fails_only_its_command,
    test_arguments_that_cannot_be_encoded_are_refused_and_leave_the_buffer_clean,
    test_evalsha_loads_a_script_redis_does_not_know,
    test_concurrent_evalsha_of_an_unknown_script_all_succeed,
    test_evalsha_error_from_the_script_is_a_response_error,
    test_evalsha_loads_once_then_gives_up,
    test_no_reply_in_time_fails_every_pending_command_and_reconnects,
    test_killed_server_fails_commands_promptly_and_a_restart_is_picked_up,
    test_a_cancelled_caller_does_not_shift_later_replies,
    test_many_cancelled_callers_leave_the_others_their_own_replies,
    test_auth_and_select_run_first,
    test_unix_socket_url_with_db,
    test_tls_url_verifies_the_server,
    test_connect_failure_is_a_connection_error,
    test_pending_commands_are_bounded,
    test_close_fails_pending_commands_and_later_calls,
    test_close_while_connecting_fails_the_waiters,
]


async def _run_with_fixtures(
    scenario: Callable[..., Awaitable[None]], stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    wanted = inspect.signature(scenario).parameters
    async with contextlib.AsyncExitStack() as stack:
        arguments: dict[str, object] = {"stores": stores, "monkeypatch": monkeypatch}
        if "own" in wanted:
            arguments["own"] = stack.enter_context(own_redis())
        if "prefix" in wanted:
            prefix = f"tick{RUN_ID}{secrets.token_hex(4)}"
            stack.push_async_callback(delete_prefix, stores.redis_url, prefix)
            arguments["prefix"] = prefix
        if "tick" in wanted:
            client = TickClient(stores.redis_url, timeout_s=TIMEOUT_S)
            stack.push_async_callback(client.close)
            arguments["tick"] = client
        if "plain" in wanted:
            plain = aioredis.Redis.from_url(stores.redis_url, decode_responses=False)
            stack.push_async_callback(plain.aclose)
            arguments["plain"] = plain
        await scenario(**{name: arguments[name] for name in wanted})


@pytest.mark.parametrize(
    "scenario", SCENARIOS, ids=[scenario.__name__.removeprefix("test_") for scenario in SCENARIOS]
)
def test_scenario_on_uvloop(
    scenario: Callable[..., Awaitable[None]], stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(_run_with_fixtures(scenario, stores, monkeypatch))
