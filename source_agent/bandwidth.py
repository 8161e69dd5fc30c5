"""Bandwidth limits of a connection: sizes, schedule windows and the sender's throttle.

A connection may set ``bandwidth = "2MiB"`` (bytes per second) and a list of
``bandwidth_schedule`` windows; the limit in effect is the first window that matches
local time, else ``bandwidth`` (:func:`limit_at`). The sender charges every OPS frame
to a :class:`Throttle` before sending it; control frames (PING, PONG, BYE) are not
charged, so keepalives never wait behind bulk data.

Why the throttle is smooth: tokens accrue at the rate in effect and are capped at
:data:`BURST_SECONDS` worth, so an idle link cannot save up a burst. A frame takes its
whole size at once (the balance may go negative) and the sender then waits until the
balance is back to zero *before* sending, in steps of at most :data:`STEP_SECONDS`, so
a schedule change or an operator's new limit takes effect within a step. With batches
capped at :data:`BATCH_SECONDS` of the rate, the largest burst on the wire is about a
tenth of a second's worth (10 MiB at 2 MiB/s: 5 s, in ~200 KiB frames).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Largest credit an idle link keeps (seconds of the rate).
BURST_SECONDS: Final = 0.1
#: Longest single sleep while waiting for credit.
STEP_SECONDS: Final = 0.1
#: Batch bound under a limit (seconds of the rate), and its floor in bytes.
BATCH_SECONDS: Final = 0.1
MIN_BATCH_BYTES: Final = 64 * 1024
#: Smallest limit accepted: below it one op of 64 KiB would take a minute.
MIN_LIMIT: Final = 1024

DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i)?)?b?(?:/s)?\s*$", re.IGNORECASE)
_POWERS: Final = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: str) -> int:
    """Bytes per second from ``"500k"``, ``"10M"``, ``"2MiB"``, ``"1.5GB/s"``, ``"65536"``.

    k/M/G/T are powers of 1000, Ki/Mi/Gi/Ti powers of 1024; a trailing "B" and "/s" are
    optional; letters are case-insensitive.

    Raises:
        ValueError: not a size, or below :data:`MIN_LIMIT` (the message says which).
    """
    m = _SIZE.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not a size such as \"500k\", \"10M\" or \"2MiB\"")
    number, prefix, binary = m.group(1), (m.group(2) or "").lower(), m.group(3)
    size = int(float(number) * (1024 if binary else 1000) ** _POWERS[prefix])
    if size < MIN_LIMIT:
        raise ValueError(f"{value!r} is below the smallest limit of {MIN_LIMIT} bytes/s "
                         "(omit the setting for no limit)")
    return size


def parse_limit(value: str) -> int | None:
    """:func:`parse_size`, or None for ``"unlimited"``."""
    if value.strip().lower() == "unlimited":
        return None
    return parse_size(value)


def _minutes(value: str, *, end: bool) -> int:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", value.strip())
    hours, minutes = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    if m is None or minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        raise ValueError(f"{value!r} is not a time HH:MM (00:00 to 23:59"
                         f"{', or 24:00 as an end' if end else ''})")
    return hours * 60 + minutes


@dataclass(frozen=True)
class Window:
    """One schedule window, parsed. Minutes since midnight; ``end < start`` wraps past
    midnight (22:00-06:00), and then ``days`` names the day the window opens."""

    days: frozenset[int]      # 0 = Monday, as datetime.weekday()
    start: int
    end: int
    limit: int | None         # bytes/s; None: unlimited

    def matches(self, when: dt.datetime) -> bool:
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return ((day in self.days and minute >= self.start)
                or ((day - 1) % 7 in self.days and minute < self.end))


class BandwidthWindowConfig(BaseModel):
    """``[[connection.bandwidth_schedule]]``: days, start, end, limit."""

    model_config = ConfigDict(extra="forbid")
    days: list[Day] = Field(default=list(DAYS), min_length=1)
    start: str
    end: str
    limit: str

    @field_validator("start")
    @classmethod
    def _start(cls, value: str) -> str:
        _minutes(value, end=False)
        return value

    @field_validator("end")
    @classmethod
    def _end(cls, value: str) -> str:
        _minutes(value, end=True)
        return value

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: str) -> str:
        parse_limit(value)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> BandwidthWindowConfig:
        if _minutes(self.start, end=False) == _minutes(self.end, end=True):
            raise ValueError(f"window {self.start}-{self.end} is empty (start equals end; "
                             "use 00:00-24:00 for a whole day)")
        return self

    def window(self) -> Window:
        return Window(days=frozenset(DAYS.index(d) for d in self.days),
                      start=_minutes(self.start, end=False),
                      end=_minutes(self.end, end=True),
                      limit=parse_limit(self.limit))


def limit_at(when: dt.datetime, schedule: Sequence[Window],
             default: int | None) -> tuple[int | None, int | None]:
    """The limit in effect at local time ``when``: (bytes/s or None, index of the window
    that set it or None when ``default`` applies)."""
    for i, window in enumerate(schedule):
        if window.matches(when):
            return window.limit, i
    return default, None


class Throttle:
    """A token bucket on the bytes of OPS frames, at a rate that may change at any time.

    Args:
        rate: called at every charge and wait step; bytes/s, or None for no limit.
        clock: trio's clock by default (tests use the autojump clock).
    """

    def __init__(self, rate: Callable[[], int | None],
                 clock: Callable[[], float] = trio.current_time) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = 0.0
        self._last: float | None = None

    def batch_bytes(self, default: int) -> int:
        """The batch bound: ``default``, or less under a limit so frames stay small."""
        rate = self._rate()
        if rate is None:
            return default
        return min(default, max(int(rate * BATCH_SECONDS), MIN_BATCH_BYTES))

    def _refill(self, rate: int) -> None:
        now = self._clock()
        if self._last is not None:
            self._tokens = min(self._tokens + (now - self._last) * rate,
                               rate * BURST_SECONDS)
        self._last = now

    async def charge(self, nbytes: int) -> None:
        """Take ``nbytes`` and wait until the balance is no longer negative.

        Returns at once without a limit. Cancellation: safe at any point (the bytes
        stay charged; a new session makes a new throttle).
        """
        rate = self._rate()
        if rate is None:
            self._tokens, self._last = 0.0, None
            return
        self._refill(rate)
        self._tokens -= nbytes
        while self._tokens < 0:
            # At least 1 ms: a deficit of a fraction of a byte must not become a sleep
            # too short to move the clock (an endless loop).
            await trio.sleep(max(min(-self._tokens / rate, STEP_SECONDS), 0.001))
            new_rate = self._rate()
            if new_rate is None:     # the schedule lifted the limit meanwhile
                self._tokens, self._last = 0.0, None
                return
            rate = new_rate
            self._refill(rate)
