"""When the nightly reconciliation runs and over what: next_run_at is the next set UTC time
strictly after now, whatever now's offset; parse_at reads HH:MM as a UTC time and refuses
anything else; default_window is the previous UTC day."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta, timezone

import pytest

from reconcile.scheduler import next_run_at, parse_at
from reconcile.service import default_window

AT = time(2, 0, tzinfo=UTC)
PLUS_5 = timezone(timedelta(hours=5))
MINUS_8 = timezone(timedelta(hours=-8))


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("now", "due"),
    [
        (utc(2026, 3, 1, 0, 0), utc(2026, 3, 1, 2, 0)),  # later today
        (utc(2026, 3, 1, 1, 59, 59, 999_999), utc(2026, 3, 1, 2, 0)),
        (utc(2026, 3, 1, 2, 0), utc(2026, 3, 2, 2, 0)),  # strictly after: not again at 02:00 itself
        (utc(2026, 3, 1, 2, 0, 0, 1), utc(2026, 3, 2, 2, 0)),
        (utc(2026, 3, 1, 23, 59), utc(2026, 3, 2, 2, 0)),
        (utc(2026, 12, 31, 3, 0), utc(2027, 1, 1, 2, 0)),  # across a year
        (utc(2028, 2, 28, 12, 0), utc(2028, 2, 29, 2, 0)),  # a leap day
        (datetime(2026, 3, 1, 6, 30, tzinfo=PLUS_5), utc(2026, 3, 1, 2, 0)),  # 01:30 UTC
        (datetime(2026, 3, 1, 17, 30, tzinfo=MINUS_8), utc(2026, 3, 2, 2, 0)),  # 01:30 UTC, the next day
        (datetime(2026, 3, 1, 18, 30, tzinfo=MINUS_8), utc(2026, 3, 3, 2, 0)),  # 02:30 UTC, the next day
    ],
)
def test_next_run_at_is_the_next_set_time_strictly_after_now(now: datetime, due: datetime) -> None:
    assert next_run_at(now, AT) == due
    assert next_run_at(now, AT).utcoffset() == timedelta(0)
    assert timedelta(0) < next_run_at(now, AT) - now <= timedelta(days=1)


def test_next_run_at_steps_a_day_at_a_time() -> None:
    due = next_run_at(utc(2026, 3, 1, 12, 0), time(23, 59, tzinfo=UTC))
    seen = [due]
    for _ in range(5):
        seen.append(next_run_at(seen[-1], time(23, 59, tzinfo=UTC)))
    assert [d - seen[0] for d in seen] == [timedelta(days=n) for n in range(6)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("02:00", time(2, 0, tzinfo=UTC)),
        ("00:00", time(0, 0, tzinfo=UTC)),
        ("23:59", time(23, 59, tzinfo=UTC)),
    ],
)
def test_parse_at_reads_hours_and_minutes_in_utc(text: str, expected: time) -> None:
    assert parse_at(text) == expected
    assert parse_at(text).tzinfo is UTC


@pytest.mark.parametrize("text", ["24:00", "12:60", "0200", "02:00:00", "", "noon", "-1:30", "02:"])
def test_parse_at_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_at(text)


@pytest.mark.parametrize(
    ("now", "window"),
    [
        (utc(2026, 3, 1, 2, 0), (utc(2026, 2, 28), utc(2026, 3, 1))),
        (utc(2026, 3, 1, 0, 0), (utc(2026, 2, 28), utc(2026, 3, 1))),  # midnight: the day just ended
        (utc(2026, 3, 1, 23, 59, 59), (utc(2026, 2, 28), utc(2026, 3, 1))),
        (utc(2027, 1, 1, 2, 0), (utc(2026, 12, 31), utc(2027, 1, 1))),
        (utc(2028, 3, 1, 2, 0), (utc(2028, 2, 29), utc(2028, 3, 1))),
        # Local times: the UTC day decides, not the local one.
        (datetime(2026, 3, 1, 3, 0, tzinfo=PLUS_5), (utc(2026, 2, 27), utc(2026, 2, 28))),
        (datetime(2026, 3, 1, 20, 0, tzinfo=MINUS_8), (utc(2026, 3, 1), utc(2026, 3, 2))),
    ],
)
def test_the_nightly_window_is_the_previous_utc_day(now: datetime, window: tuple[datetime, datetime]) -> None:
    assert default_window(now) == window
    start, end = default_window(now)
    assert end - start == timedelta(days=1) and start.utcoffset() == timedelta(0)
