"""Log lines are what centime.logs promises: access lines in text or as JSON
that parses, buffered but written once the line bound or the time bound is
reached; every other line carries the request id in both formats; and the
log settings are validated like every other."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import pytest

from centime.logs import (
    ACCESS_LOG_FLUSH_S,
    ACCESS_LOG_LINES_MAX,
    AccessLog,
    JsonFormatter,
    TextFormatter,
    request_id_var,
    utc_timestamp,
)
from centime.settings import SettingsError, load_settings

ROUTE = "/v1/wallets/{wallet_id}/debits"
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_timestamps_are_utc_with_milliseconds() -> None:
    assert utc_timestamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert utc_timestamp(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"
    assert utc_timestamp(1_700_000_000.999) == "2023-11-14T22:13:20.999Z"
    assert utc_timestamp(1_700_000_001.0) == "2023-11-14T22:13:21.000Z"


async def test_an_access_line_in_text_and_in_json() -> None:
    text, as_json = io.StringIO(), io.StringIO()
    for stream, is_json in ((text, False), (as_json, True)):
        log = AccessLog(stream, json=is_json)
        log.write("POST", ROUTE, 201, 1.23456, "a1b2c3d4e5f6-1f")
        log.flush()
    assert re.fullmatch(
        TIMESTAMP + r" INFO centime\.access: POST /v1/wallets/\{wallet_id\}/debits 201 1\.235ms "
        r"request_id=a1b2c3d4e5f6-1f\n",
        text.getvalue(),
    ), text.getvalue()
    line = json.loads(as_json.getvalue())
    assert re.fullmatch(TIMESTAMP, line.pop("time"))
    assert line == {
        "level": "INFO",
        "logger": "centime.access",
        "method": "POST",
        "route": ROUTE,
        "status": 201,
        "duration_ms": 1.235,
        "request_id": "a1b2c3d4e5f6-1f",
    }


async def test_access_lines_wait_for_the_line_bound_or_the_time_bound() -> None:
    stream = io.StringIO()
    log = AccessLog(stream, json=True)
    for n in range(ACCESS_LOG_LINES_MAX - 1):
        log.write("GET", "/healthz", 200, 0.1, f"id-{n}")
    assert stream.getvalue() == ""
    log.write("GET", "/healthz", 200, 0.1, "the-last")
    assert len(stream.getvalue().splitlines()) == ACCESS_LOG_LINES_MAX
    log.write("GET", "unmatched", 404, 0.1, "late")
    assert len(stream.getvalue().splitlines()) == ACCESS_LOG_LINES_MAX
    await asyncio.sleep(ACCESS_LOG_FLUSH_S * 2)
    last = json.loads(stream.getvalue().splitlines()[-1])
    assert (last["route"], last["request_id"]) == ("unmatched", "late")


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("centime", logging.WARNING, __file__, 1, message, None, None)


def test_log_lines_carry_the_request_id_in_both_formats() -> None:
    outside = TextFormatter().format(record("sweeping"))
    assert re.fullmatch(TIMESTAMP + " WARNING centime: sweeping", outside), outside
    token = request_id_var.set("req-1")
    try:
        text = TextFormatter().format(record("storage unavailable"))
        line = json.loads(JsonFormatter().format(record('a "quoted" message')))
    finally:
        request_id_var.reset(token)
    assert text.endswith(" WARNING centime: storage unavailable request_id=req-1"), text
    assert (line["level"], line["logger"], line["message"], line["request_id"]) == (
        "WARNING",
        "centime",
        'a "quoted" message',
        "req-1",
    )


def test_a_traceback_is_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        failed = logging.LogRecord(
            "centime",
            logging.ERROR,
            __file__,
            1,
            "unhandled error",
            None,
            (
                type(exc),
                exc,
                exc.__traceback__,
            ),
        )
    line = JsonFormatter().format(failed)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_log_settings_are_validated() -> None:
    assert load_settings({}).log_format == "text"
    assert load_settings({}).access_log is True
    assert load_settings({"CENTIME_LOG_FORMAT": "json", "CENTIME_ACCESS_LOG": "false"}).access_log is False
    with pytest.raises(SettingsError, match="CENTIME_LOG_FORMAT='xml' is invalid"):
        load_settings({"CENTIME_LOG_FORMAT": "xml"})
    with pytest.raises(SettingsError, match="CENTIME_ACCESS_LOG='sometimes' is invalid"):
        load_settings({"CENTIME_ACCESS_LOG": "sometimes"})
