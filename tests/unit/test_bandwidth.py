"""Bandwidth limits: size parsing, schedule selection at fixed times, the throttle's pace."""

from __future__ import annotations

import datetime as dt

import pytest
import trio
import trio.testing
from pydantic import ValidationError

from source_agent.bandwidth import (
    BandwidthWindowConfig,
    Throttle,
    Window,
    limit_at,
    parse_limit,
    parse_size,
)
from source_agent.config import ConnectionConfig

MiB = 1024 * 1024


@pytest.mark.parametrize(("text", "expected"), [
    ("2MiB", 2 * MiB), ("500k", 500_000), ("10M", 10_000_000), ("65536", 65536),
    ("1.5GB/s", 1_500_000_000), ("512 KiB", 512 * 1024), ("4mib/s", 4 * MiB),
    ("1Ti", 1024 ** 4), ("3 kb", 3000),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("", "not a size"), ("fast", "not a size"), ("2 MiBs", "not a size"),
    ("-1M", "not a size"), ("10X", "not a size"), ("i", "not a size"),
    ("0", "below the smallest"), ("100", "below the smallest"),
])
def test_parse_size_errors_say_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_size(text)


def test_unlimited() -> None:
    assert parse_limit("unlimited") is None
    assert parse_limit(" Unlimited ") is None
    assert parse_limit("1M") == 1_000_000


def _windows(*raw: dict[str, object]) -> list[Window]:
    return [BandwidthWindowConfig.model_validate(r).window() for r in raw]


# 2026-11-23 is a Monday.
def _at(day: int, hh: int, mm: int) -> dt.datetime:
    return dt.datetime(2026, 11, 23 + day, hh, mm)


def test_schedule_first_matching_window_wins_else_default() -> None:
    schedule = _windows(
        {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "08:00", "end": "18:00",
         "limit": "1MiB"},
        {"days": ["mon"], "start": "12:00", "end": "13:00", "limit": "unlimited"},
        {"days": ["sat", "sun"], "start": "00:00", "end": "24:00", "limit": "10M"},
    )
    default = 5 * MiB
    assert limit_at(_at(0, 8, 0), schedule, default) == (MiB, 0)       # start inclusive
    assert limit_at(_at(0, 12, 30), schedule, default) == (MiB, 0)     # first wins
    assert limit_at(_at(0, 18, 0), schedule, default) == (default, None)  # end exclusive
    assert limit_at(_at(0, 7, 59), schedule, default) == (default, None)
    assert limit_at(_at(4, 17, 59), schedule, default) == (MiB, 0)
    assert limit_at(_at(5, 0, 0), schedule, default) == (10_000_000, 2)
    assert limit_at(_at(6, 23, 59), schedule, default) == (10_000_000, 2)
    assert limit_at(_at(6, 23, 59), schedule, None) == (10_000_000, 2)
    assert limit_at(_at(0, 3, 0), [], None) == (None, None)


def test_schedule_unlimited_window_overrides_bandwidth() -> None:
    schedule = _windows({"days": ["tue"], "start": "00:00", "end": "06:00",
                         "limit": "unlimited"})
    assert limit_at(_at(1, 5, 59), schedule, MiB) == (None, 0)
    assert limit_at(_at(1, 6, 0), schedule, MiB) == (MiB, None)


def test_schedule_window_past_midnight_belongs_to_its_opening_day() -> None:
    schedule = _windows({"days": ["fri"], "start": "22:00", "end": "06:00", "limit": "2M"})
    assert limit_at(_at(4, 21, 59), schedule, None) == (None, None)
    assert limit_at(_at(4, 22, 0), schedule, None) == (2_000_000, 0)   # Friday night
    assert limit_at(_at(5, 5, 59), schedule, None) == (2_000_000, 0)   # Saturday morning
    assert limit_at(_at(5, 6, 0), schedule, None) == (None, None)
    assert limit_at(_at(5, 22, 30), schedule, None) == (None, None)    # not Saturday night
    assert limit_at(_at(3, 23, 0), schedule, None) == (None, None)     # not Thursday night
    sunday = _windows({"days": ["sun"], "start": "23:00", "end": "01:00", "limit": "2M"})
    assert limit_at(_at(7, 0, 30), sunday, None) == (2_000_000, 0)     # wraps to Monday


def test_schedule_days_default_to_every_day() -> None:
    schedule = _windows({"start": "09:00", "end": "10:00", "limit": "1M"})
    assert all(limit_at(_at(d, 9, 30), schedule, None) == (1_000_000, 0) for d in range(7))


@pytest.mark.parametrize(("window", "why"), [
    ({"days": ["monday"], "start": "08:00", "end": "09:00", "limit": "1M"}, "days"),
    ({"days": [], "start": "08:00", "end": "09:00", "limit": "1M"}, "days"),
    ({"start": "8am", "end": "09:00", "limit": "1M"}, "not a time HH:MM"),
    ({"start": "24:00", "end": "09:00", "limit": "1M"}, "not a time HH:MM"),
    ({"start": "08:60", "end": "09:00", "limit": "1M"}, "not a time HH:MM"),
    ({"start": "08:00", "end": "24:01", "limit": "1M"}, "not a time HH:MM"),
    ({"start": "08:00", "end": "08:00", "limit": "1M"}, "empty"),
    ({"start": "00:00", "end": "24:00", "limit": "lots"}, "not a size"),
    ({"start": "00:00", "end": "24:00"}, "limit"),
    ({"start": "00:00", "end": "24:00", "limit": "1M", "when": "x"}, "when"),
])
def test_bad_window_is_refused_naming_the_problem(window: dict[str, object], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        BandwidthWindowConfig.model_validate(window)


def _conn(**extra: object) -> dict[str, object]:
    return {"id": 1, "volume": "data", "target": "127.0.0.1:7100", "target_path": "d",
            "key_file": "/k", **extra}


def test_connection_config_fields() -> None:
    cc = ConnectionConfig.model_validate(_conn(
        bandwidth="2MiB",
        bandwidth_schedule=[{"days": ["sat"], "start": "00:00", "end": "24:00",
                             "limit": "unlimited"}]))
    assert cc.bandwidth == "2MiB" and len(cc.bandwidth_schedule) == 1
    assert ConnectionConfig.model_validate(_conn()).bandwidth is None
    with pytest.raises(ValidationError, match=r"(?s)bandwidth.*not a size"):
        ConnectionConfig.model_validate(_conn(bandwidth="quick"))


async def test_throttle_paces_10mib_at_2mib_per_s_in_small_steps(
        autojump_clock: trio.testing.MockClock) -> None:
    throttle = Throttle(lambda: 2 * MiB)
    batch = throttle.batch_bytes(MiB)
    assert batch == int(2 * MiB * 0.1)          # frames of a tenth of a second
    sent: list[tuple[float, int]] = []
    start = trio.current_time()
    with trio.fail_after(60):
        remaining = 10 * MiB
        while remaining:
            n = min(batch, remaining)
            await throttle.charge(n)
            sent.append((trio.current_time() - start, n))
            remaining -= n
    elapsed = sent[-1][0]
    assert 4.8 <= elapsed <= 5.2, elapsed
    # No second ever carries more than its share plus one frame.
    for t0 in range(6):
        in_second = sum(n for t, n in sent if t0 <= t < t0 + 1)
        assert in_second <= 2 * MiB + batch, (t0, in_second)


async def test_throttle_idle_credit_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    throttle = Throttle(lambda: 1_000_000)
    await throttle.charge(100_000)
    await trio.sleep(60)                        # a minute idle saves no minute of credit
    start = trio.current_time()
    await throttle.charge(1_000_000)
    assert trio.current_time() - start >= 0.85  # at most 0.1 s of credit kept


async def test_throttle_follows_rate_changes(autojump_clock: trio.testing.MockClock) -> None:
    rate: list[int | None] = [1_000_000]
    throttle = Throttle(lambda: rate[0])
    assert throttle.batch_bytes(4 * MiB) == 100_000
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        async def lift() -> None:
            await trio.sleep(1.0)
            rate[0] = None                      # the schedule lifts the limit
        nursery.start_soon(lift)
        await throttle.charge(10_000_000)       # would take 10 s at the old rate
    assert trio.current_time() - start <= 1.2
    assert throttle.batch_bytes(4 * MiB) == 4 * MiB
    start = trio.current_time()
    await throttle.charge(10_000_000)
    assert trio.current_time() == start         # unlimited: never waits
