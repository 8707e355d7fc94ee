"""Log lines (kernel): every line of a request carries its id, text by
default, one JSON object a line with CENTIME_LOG_FORMAT=json.

The access log (one line per request) does not go through `logging`: a
LogRecord and a Formatter cost more than the line is worth on the hot path.
It is an f-string (text) or a msgspec encoding (json) appended to a buffer
written out in one call per ACCESS_LOG_LINES_MAX lines or
ACCESS_LOG_FLUSH_S, whichever comes first."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from contextvars import ContextVar
from typing import TextIO

import msgspec

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
"""The id of the request being answered, set by centime.access for its whole run."""

ACCESS_LOGGER = "centime.access"
ACCESS_LOG_LINES_MAX = 256
"""Lines buffered before they are written out, at most."""
ACCESS_LOG_FLUSH_S = 0.2
"""How late a buffered line is written, at most."""

_MILLISECONDS = [f"{ms:03d}Z" for ms in range(1000)]
_second = -1
_second_text = ""


def utc_timestamp(t: float) -> str:
    """`2026-11-23T10:00:00.123Z`; the part up to the second is made once a second."""
    global _second, _second_text
    second, millisecond = divmod(int(t * 1000), 1000)
    if second != _second:
        _second, _second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
    return _second_text + _MILLISECONDS[millisecond]


class _JsonLine(msgspec.Struct, omit_defaults=True):
    time: str
    level: str
    logger: str
    message: str
    request_id: str | None = None
    exception: str | None = None


_json_line = msgspec.json.Encoder()


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message> request_id=<id>`, the traceback below."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{utc_timestamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        request_id = request_id_var.get()
        if request_id is not None:
            line += f" request_id={request_id}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = _JsonLine(
            time=utc_timestamp(record.created),
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
            request_id=request_id_var.get(),
            exception=self.formatException(record.exc_info) if record.exc_info else None,
        )
        return _json_line.encode(line).decode()


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Every logger (uvicorn's too) through one handler on the root logger."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class AccessLog:
    """One line per answered request, buffered (see the module's docstring).

    `method` and `request_id` are tokens with no quote or backslash in them
    (centime.access makes sure), so the JSON line is an f-string too; the
    route, a template from the route table, is JSON-encoded once.

    Cost (bench/access_overhead.py, best of 5, on the 2-core VM shared with
    other work, load 2.4 to 4.3): a line 1.6 to 3.7 us, text or JSON alike,
    where a `logging` call for the same line costs 16 to 21 us. Per request,
    centime.access costs 5.0 to 7.0 us with the access log off and 6.3 to
    10.3 us with it on, where the count-only middleware it replaced cost 1.7
    to 2.1 us: 3 to 8 us more per request, against the ~240 us of server CPU
    a debit costs."""

    def __init__(self, stream: TextIO, *, json: bool) -> None:
        self._stream = stream
        self._json = json
        self._lines: list[str] = []
        self._flush_due: asyncio.TimerHandle | None = None
        self._route_json: dict[str, str] = {}

    def write(self, method: str, route: str, status: int, duration_ms: float, request_id: str) -> None:
        at = utc_timestamp(time.time())
        if self._json:
            route_json = self._route_json.get(route)
            if route_json is None:
                route_json = self._route_json[route] = msgspec.json.encode(route).decode()
            line = (
                f'{{"time":"{at}","level":"INFO","logger":"{ACCESS_LOGGER}","method":"{method}",'
                f'"route":{route_json},"status":{status},"duration_ms":{duration_ms:.3f},'
                f'"request_id":"{request_id}"}}\n'
            )
        else:
            line = f"{at} INFO {ACCESS_LOGGER}: {method} {route} {status} {duration_ms:.3f}ms request_id={request_id}\n"
        self._lines.append(line)
        if len(self._lines) >= ACCESS_LOG_LINES_MAX:
            self.flush()
        elif self._flush_due is None:
            self._flush_due = asyncio.get_running_loop().call_later(ACCESS_LOG_FLUSH_S, self.flush)

    def flush(self) -> None:
        if self._flush_due is not None:
            self._flush_due.cancel()
            self._flush_due = None
        if self._lines:
            lines, self._lines = self._lines, []
            try:
                self._stream.write("".join(lines))
                self._stream.flush()
            except (OSError, ValueError):  # stderr closed or full: the lines are lost, the answers are not
                pass
