"""A Redis client for the debit hot path: one connection, one socket write per event-loop tick.

redis-py's asyncio client checks a connection out of its pool per command and writes each command
on its own, so N concurrent debits cost N connections, N writes and N reads. Here every command
issued during one event-loop tick, from any number of coroutines, is encoded into one buffer that
a `loop.call_soon` flush hands to the transport in one write; Redis answers in order, so replies
(parsed by hiredis) are matched FIFO to a deque of futures. A reply given up on (timeout) breaks
that order, so it fails every pending command and drops the connection; the next call reconnects.
Errors are redis-py's own types, so `except redis.exceptions.RedisError` keeps working. It speaks
RESP2 to one server: no pub/sub, no blocking commands, no Redis Cluster routing.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.connection import SSLConnection, parse_url
from redis.exceptions import (
    AuthenticationError,
    DataError,
    InvalidResponse,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from centime.errors import invariant

# Commands sent but not answered yet, on one connection. Past it, callers fail fast: Redis is
# not keeping up and queueing more would only grow memory and latency.
PENDING_COMMANDS_MAX = 100_000
# A tick's buffer is written as soon as it reaches this size, without waiting for the tick's end.
WRITE_BUFFER_BYTES_MAX = 1 << 20
# EVALSHA answered NOSCRIPT: load the script and try again this many times (NOSCRIPT means
# the script did not run, so one more try is safe).
SCRIPT_LOAD_RETRIES_MAX = 1
# asyncio may run a timer up to its clock resolution early: a deadline this close counts as passed.
TIMER_SLACK_S = 0.001

_NOT_ENOUGH_DATA = object()
_CRLF = b"\r\n"
_SSL_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_URL_OPTIONS = frozenset(
    {
        "host",
        "port",
        "path",
        "db",
        "username",
        "password",
        "connection_class",
        "ssl_cert_reqs",
        "ssl_ca_certs",
    }
)


class Script:
    """A Lua script's text and its sha1 (hex), computed once."""

    __slots__ = ("_sha_bytes", "sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
        self._sha_bytes = self.sha.encode()

    def __repr__(self) -> str:
        return f"Script(sha={self.sha})"


class _Connection(asyncio.Protocol):
    """One socket to Redis: a tick's write buffer, the FIFO of pending replies and one timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float, where: str) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.where = where
        self.broken = False  # once true, never false again: the client opens a new connection
        self.writes = 0
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,
            notEnoughData=_NOT_ENOUGH_DATA,
        )
        # (future, deadline on the loop's clock): deadlines never decrease along the deque.
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.buffer = bytearray()
        self.flush_scheduled = False
        self.tick_deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # The hot path.

    def send(self, args: tuple[bytes | str | int, ...]) -> asyncio.Future[Any]:
        """Queue one command for this tick's write; the future resolves with its reply."""
        if self.broken:
            raise RedisConnectionError(f"Connection to {self.where} is closed")
        pending = self.pending
        if len(pending) >= PENDING_COMMANDS_MAX:
            raise RedisConnectionError(
                f"Redis at {self.where} has too many pending commands ({PENDING_COMMANDS_MAX})"
            )
        # Encoded whole before it joins the buffer: a half-encoded command never reaches the socket.
        parts = [b"*%d\r\n" % len(args)]
        append = parts.append
        for arg in args:
            kind = type(arg)
            if kind is bytes:
                data = arg
            elif kind is str:
                data = arg.encode()
            elif kind is int:
                data = b"%d" % arg
            else:
                data = _encode_other(arg)
            append(b"$%d\r\n" % len(data))
            append(data)
            append(_CRLF)
        buffer = self.buffer
        buffer += b"".join(parts)
        loop = self.loop
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.tick_deadline = loop.time() + self.timeout_s
            loop.call_soon(self.flush)
        future = loop.create_future()
        pending.append((future, self.tick_deadline))
        if self.timer is None:
            self.timer = loop.call_at(self.tick_deadline, self.on_timer)
        if len(buffer) >= WRITE_BUFFER_BYTES_MAX:
            self.write()
        return future

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.buffer and not self.broken:
            self.write()

    def write(self) -> None:
        transport = self.transport
        invariant(transport is not None, "a command was queued before the connection was made")
        if transport.is_closing():  # lost, and connection_lost has not run yet
            self.give_up(RedisConnectionError, f"Connection to {self.where} is closing")
            return
        # A fresh buffer each time: the transport may keep a reference to the one it was handed.
        buffer, self.buffer = self.buffer, bytearray()
        transport.write(buffer)
        self.writes += 1

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        reader = self.reader
        pending = self.pending
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except InvalidResponse as exc:
                self.give_up(RedisConnectionError, f"Protocol error from {self.where}: {exc}")
                return
            if reply is _NOT_ENOUGH_DATA:
                return
            if not pending:
                self.give_up(RedisConnectionError, f"Redis at {self.where} sent a reply nobody asked for")
                return
            future = pending.popleft()[0]
            if future.done():
                continue  # its caller was cancelled; the reply is read and dropped, FIFO holds
            if isinstance(reply, RedisError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    # Timer, failures, lifecycle.

    def on_timer(self) -> None:
        """The one timer: fires at the oldest pending deadline, re-arms for the next one."""
        self.timer = None
        if self.broken or not self.pending:
            return
        deadline = self.pending[0][1]
        if deadline <= self.loop.time() + TIMER_SLACK_S:
            self.give_up(
                RedisTimeoutError,
                f"Timeout reading from {self.where}: no reply within {self.timeout_s} s",
            )
        else:
            self.timer = self.loop.call_at(deadline, self.on_timer)

    def give_up(self, error: type[RedisError], message: str) -> None:
        """Fail every pending command with `error` and drop the connection."""
        self.broken = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.buffer = bytearray()
        pending = self.pending
        self.pending = deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(error(message))
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.broken:
            reason = f": {exc}" if exc is not None else ""
            self.give_up(RedisConnectionError, f"Connection to {self.where} lost{reason}")


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as read (no "exception was never retrieved" log)."""
    if not future.cancelled():
        future.exception()


def _encode_other(arg: object) -> bytes:
    """What the hot path's exact type checks did not cover; the rest is refused like redis-py does."""
    if isinstance(arg, bool):
        raise DataError(f"Invalid input of type bool: {arg!r}. Convert to bytes, str or int first.")
    if isinstance(arg, bytes | bytearray | memoryview):
        return bytes(arg)
    if isinstance(arg, str):
        return str(arg).encode()
    if isinstance(arg, int):
        return b"%d" % int(arg)
    raise DataError(f"Invalid input of type {type(arg).__name__}. Convert to bytes, str or int first.")


class TickClient:
    """A Redis client that sends all commands of one event-loop tick in one write on one connection.

    The connection opens on first use (concurrent first callers share one attempt) and again on
    the first call after it broke. `timeout_s` bounds each reply from when its command was queued
    (precisely: from the first command of the same tick, so a deadline is never late);
    `connect_timeout_s` (default: `timeout_s`) bounds connecting, AUTH and the choice of db together.
    Errors: `ResponseError` (and its subclasses such as `NoScriptError`) for that command only;
    `TimeoutError` and `ConnectionError` for every command pending on the connection at the time.
    """

    def __init__(self, url: str, *, timeout_s: float, connect_timeout_s: float | None = None) -> None:
        invariant(timeout_s > 0, f"timeout_s must be positive, got {timeout_s}")
        invariant(
            connect_timeout_s is None or connect_timeout_s > 0,
            f"connect_timeout_s must be positive, got {connect_timeout_s}",
        )
        options = parse_url(url)
        unknown = set(options) - _URL_OPTIONS
        if unknown:
            raise ValueError(f"Redis URL options not supported by TickClient: {sorted(unknown)}")
        self.timeout_s = timeout_s
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self._path: str | None = options.get("path")
        self._host: str = options.get("host", "localhost")
        self._port: int = options.get("port", 6379)
        self._db: int = options.get("db", 0)
        self._username: str | None = options.get("username")
        self._password: str | None = options.get("password")
        self._ssl: ssl.SSLContext | None = None
        if options.get("connection_class") is SSLConnection:
            context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
            cert_reqs = options.get("ssl_cert_reqs", "required")
            if cert_reqs not in _SSL_CERT_REQS:
                raise ValueError(f"ssl_cert_reqs must be one of {sorted(_SSL_CERT_REQS)}, got {cert_reqs!r}")
            if _SSL_CERT_REQS[cert_reqs] != ssl.CERT_REQUIRED:
                context.check_hostname = False
                context.verify_mode = _SSL_CERT_REQS[cert_reqs]
            self._ssl = context
        self._where = self._path if self._path is not None else f"{self._host}:{self._port}"
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False
        self._writes_of_old_connections = 0

    @property
    def writes(self) -> int:
        """Socket writes made so far, over every connection this client opened."""
        current = self._connection.writes if self._connection is not None else 0
        return self._writes_of_old_connections + current

    async def execute(self, *args: bytes | str | int) -> Any:
        """Send one command, e.g. `execute("GET", key)`, and return its reply as redis-py would
        with decode_responses=False: bytes, int, None or (nested) lists."""
        connection = self._connection
        if connection is None or connection.broken:
            connection = await self._connect()
        return await connection.send(args)

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[bytes | str | int]) -> Any:
        """Run a Lua script by its sha; if Redis does not know it (NOSCRIPT), load it and retry once."""
        command = (b"EVALSHA", script._sha_bytes, len(keys), *keys, *args)
        for _ in range(SCRIPT_LOAD_RETRIES_MAX):
            connection = self._connection  # execute()'s body, inlined: this is the hot path
            if connection is None or connection.broken:
                connection = await self._connect()
            try:
                return await connection.send(command)
            except NoScriptError:
                pass
            loaded = await self.execute(b"SCRIPT", b"LOAD", script.text)
            invariant(loaded == script._sha_bytes, f"SCRIPT LOAD answered {loaded!r}, expected {script.sha}")
        return await self.execute(*command)

    async def evalsha_many(
        self, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[bytes | str | int]]]
    ) -> list[Any]:
        """`evalsha` for each (keys, args) call, all queued at once: one write, one round trip, and
        no task per call (what `asyncio.gather` of `evalsha` coroutines would cost). Replies in call
        order; the first error raises once every reply is in. A call answered NOSCRIPT did not run:
        it alone goes again through `evalsha`, which loads the script."""
        connection = self._connection
        if connection is None or connection.broken:
            connection = await self._connect()
        sha = script._sha_bytes
        futures: list[asyncio.Future[Any]] = []
        try:
            for keys, args in calls:
                futures.append(connection.send((b"EVALSHA", sha, len(keys), *keys, *args)))
        except BaseException:
            for future in futures:  # failed with the connection; nobody will read them
                future.add_done_callback(_retrieve)
            raise
        replies: list[Any] = await asyncio.gather(*futures, return_exceptions=True)
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                try:
                    replies[i] = await self.evalsha(script, *calls[i])
                except ResponseError as exc:  # this call's own error: the others still run
                    replies[i] = exc
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def close(self) -> None:
        """Fail pending commands with ConnectionError and close the connection; later calls fail too."""
        self._closed = True
        connecting = self._connecting
        if connecting is not None:
            connecting.cancel()
            await asyncio.wait({connecting})
        if self._connection is not None and not self._connection.broken:
            self._connection.give_up(RedisConnectionError, f"TickClient for {self._where} closed")

    # Connecting.

    async def _connect(self) -> _Connection:
        if self._closed:
            raise RedisConnectionError(f"TickClient for {self._where} is closed")
        connecting = self._connecting
        if connecting is None:
            connecting = asyncio.get_running_loop().create_task(self._open())
            connecting.add_done_callback(self._connected)
            self._connecting = connecting
        # shield: one caller cancelled must not cancel the attempt the others wait on.
        return await asyncio.shield(connecting)

    def _connected(self, task: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # read here, so an attempt whose waiters all left logs no warning

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = _Connection(loop, self.timeout_s, self._where)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self._path is not None:
                    await loop.create_unix_connection(lambda: connection, self._path)
                else:
                    await loop.create_connection(
                        lambda: connection,
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl is not None else None,
                    )
                await self._handshake(connection)
        except asyncio.CancelledError:
            connection.give_up(RedisConnectionError, f"TickClient for {self._where} closed")
            if self._closed:
                raise RedisConnectionError(f"TickClient for {self._where} closed while connecting") from None
            raise
        except TimeoutError as exc:  # asyncio's (the builtin); redis' TimeoutError is another class
            connection.give_up(RedisConnectionError, "connect timed out")
            raise RedisConnectionError(
                f"Timeout connecting to {self._where} within {self.connect_timeout_s} s"
            ) from exc
        except OSError as exc:
            connection.give_up(RedisConnectionError, "connect failed")
            raise RedisConnectionError(f"Error connecting to {self._where}: {exc}") from exc
        except RedisConnectionError:  # AuthenticationError is one too
            connection.give_up(RedisConnectionError, "handshake failed")
            raise
        except RedisError as exc:  # a reply to AUTH or to the choice of db timed out
            connection.give_up(RedisConnectionError, "handshake failed")
            raise RedisConnectionError(f"Error connecting to {self._where}: {exc}") from exc
        if self._closed:
            connection.give_up(RedisConnectionError, f"TickClient for {self._where} closed")
            raise RedisConnectionError(f"TickClient for {self._where} closed while connecting")
        if self._connection is not None:
            self._writes_of_old_connections += self._connection.writes
        self._connection = connection
        return connection

    async def _handshake(self, connection: _Connection) -> None:
        """AUTH and SELECT, before any caller's command: the connection is not handed out yet."""
        if self._password is not None:
            auth = (b"AUTH", self._username, self._password) if self._username else (b"AUTH", self._password)
            try:
                await connection.send(auth)
            except ResponseError as exc:
                raise AuthenticationError(f"AUTH refused by {self._where}: {exc}") from exc
        if self._db != 0:
            try:
                await connection.send((b"SELECT", self._db))
            except ResponseError as exc:
                raise RedisConnectionError(f"db {self._db} refused by {self._where}: {exc}") from exc
