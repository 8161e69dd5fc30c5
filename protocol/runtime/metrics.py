"""Prometheus metrics: a tiny HTTP/1.0 server on trio that renders a scrape on each GET.

Each scrape calls the agent's collector, which reads the values from the agent's own
state (connections, volumes, replicas) into a fresh :class:`Scrape`, rendered as
Prometheus text format 0.0.4. Labels are kept to a small fixed set (:data:`LABELS`) so
the number of series stays bounded by the number of connections and volumes.

The only values kept for metrics (and status) are the ones no other state holds: a
:class:`Histogram` per timed operation (journal fsync, checkpoint), observed where it
happens, and an :class:`ErrorRecord` per connection (its error now, and the last one
with its times after it cleared).

The server answers one request per TCP connection (HTTP/1.0 style, then closes):
``GET /metrics`` gives 200, any other path 404, any other method 405, a request
head over :data:`MAX_REQUEST_BYTES` 431, and a client that sends nothing complete
within :data:`READ_TIMEOUT` seconds is dropped.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

log = structlog.get_logger("metrics")

#: The only label names a metric may carry (low cardinality: one value per
#: connection, volume or peer node, or a small fixed set for state/reason/result).
LABELS = frozenset({"conid", "volume", "node", "state", "reason", "result"})
#: Largest request head read before answering 431 (a scraper sends a few hundred bytes).
MAX_REQUEST_BYTES = 8192
#: Seconds a client has to send its request head.
READ_TIMEOUT = 5.0
PREFIX = "mirrorline_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Upper bounds (seconds) of the latency buckets: fsyncs and checkpoints, 0.5 ms to 10 s.
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: A histogram's ``recent_max`` covers the last one to two of these (seconds).
MAX_WINDOW = 60.0

Labels = tuple[tuple[str, str], ...]


class Histogram:
    """Observations of one duration: counts per bucket, sum, count, and the largest in
    the last one to two minutes (``recent_max``; a maximum since start would show a
    start-up stall forever).

    Observed from worker threads (fsyncs run there) and read by scrapes in the trio
    thread, hence the lock; one observation costs about a microsecond.
    """

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)   # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._max = 0.0            # in the window that began at _window_start
        self._previous_max = 0.0   # in the window before it

    def observe(self, seconds: float) -> None:
        """Count one duration."""
        i = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._roll(time.monotonic())
            self._counts[i] += 1
            self._sum += seconds
            if seconds > self._max:
                self._max = seconds

    def _roll(self, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed >= MAX_WINDOW:
            self._previous_max = self._max if elapsed < 2 * MAX_WINDOW else 0.0
            self._max = 0.0
            self._window_start = now

    def snapshot(self) -> tuple[list[int], float, int, float]:
        """(cumulative count per bucket, +Inf last; sum; count; recent max)."""
        with self._lock:
            self._roll(time.monotonic())
            counts, total = list(self._counts), self._sum
            recent = max(self._max, self._previous_max)
        cumulative = []
        running = 0
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total, running, recent


class ErrorRecord:
    """A connection's error now (``current``, "" when there is none) and the most recent
    one, kept with its wall-clock times after it cleared.

    ``set`` is called wherever the connection's ``last_error`` is assigned: with the
    same message again (a retry failing the same way) it counts a repeat; a new
    message, or one after the error cleared, starts a new record.
    """

    __slots__ = ("cleared_at", "count", "current", "first_seen", "last_seen", "message")

    def __init__(self) -> None:
        self.current = ""
        self.message = ""
        self.first_seen: float | None = None
        self.last_seen: float | None = None
        self.count = 0
        self.cleared_at: float | None = None

    def set(self, message: str, now: float | None = None) -> None:
        """The connection's error is now ``message`` ("" once it works again)."""
        now = time.time() if now is None else now
        if message:
            if message != self.current:
                self.first_seen, self.count = now, 0
            self.message, self.last_seen, self.cleared_at = message, now, None
            self.count += 1
        elif self.current:
            self.cleared_at = now
        self.current = message

    def status(self) -> dict[str, Any] | None:
        """The most recent error for status (None when there was none since start)."""
        if not self.message:
            return None
        return {"message": self.message, "first_seen": self.first_seen,
                "last_seen": self.last_seen, "count": self.count,
                "cleared_at": self.cleared_at}


@dataclass
class _Family:
    kind: str
    help: str
    #: (sample name, labels, value); a histogram's samples have three names.
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)


class Scrape:
    """One scrape's metric families, filled by a collector, then rendered."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def gauge(self, name: str, help: str, value: float, **labels: object) -> None:
        """Add a gauge sample ``mirrorline_<name>{labels} value``."""
        self._add(name, "gauge", help, value, labels)

    def counter(self, name: str, help: str, value: float, **labels: object) -> None:
        """Add a counter sample ``mirrorline_<name>_total{labels} value``."""
        self._add(name + "_total", "counter", help, value, labels)

    def histogram(self, name: str, help: str, histogram: Histogram,
                  **labels: object) -> None:
        """Add ``mirrorline_<name>_bucket{le=...}``, ``_sum`` and ``_count`` samples
        (``le``: the histogram's fixed bucket bounds, then ``+Inf``)."""
        family = self._family(name, "histogram", help, labels)
        base = PREFIX + name
        cumulative, total, count, _ = histogram.snapshot()
        bounds = [*(_format_value(b) for b in histogram.buckets), "+Inf"]
        fixed = tuple(sorted((k, str(v)) for k, v in labels.items()))
        for bound, c in zip(bounds, cumulative, strict=True):
            family.samples.append((base + "_bucket", (*fixed, ("le", bound)), float(c)))
        family.samples.append((base + "_sum", fixed, total))
        family.samples.append((base + "_count", fixed, float(count)))

    def _family(self, name: str, kind: str, help: str, labels: dict[str, object]) -> _Family:
        bad = set(labels) - LABELS
        if bad:
            raise ValueError(f"metric {name}: label(s) {sorted(bad)} not allowed")
        family = self._families.setdefault(PREFIX + name, _Family(kind, help))
        if family.kind != kind:
            raise ValueError(f"metric {name} is both {family.kind} and {kind}")
        return family

    def _add(self, name: str, kind: str, help: str, value: float,
             labels: dict[str, object]) -> None:
        family = self._family(name, kind, help, labels)
        family.samples.append((PREFIX + name,
                               tuple(sorted((k, str(v)) for k, v in labels.items())),
                               float(value)))

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        lines: list[str] = []
        for name, family in self._families.items():
            lines.append(f"# HELP {name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {name} {family.kind}")
            for sample, labels, value in family.samples:
                text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
                lines.append(f"{sample}{{{text}}} {_format_value(value)}" if text
                             else f"{sample} {_format_value(value)}")
        return ("\n".join(lines) + "\n").encode()


Collector = Callable[[Scrape], None]


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def parse_address(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:9100"); raise ValueError naming the problem."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]"), int(port)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    """The request head (up to the blank line), or None when too large."""
    data = bytearray()
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST_BYTES:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            break   # the client half-closed: answer what we have
        data += chunk
    return bytes(data)


def answer(head: bytes | None, collect: Collector) -> bytes:
    """The full HTTP response to one request head (None: the head was too large)."""
    if head is None:
        return _response("431 Request Header Fields Too Large", b"request too large\n")
    parts = head.split(b"\n", 1)[0].strip().split()
    if len(parts) < 2:
        return _response("400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", b"only GET\n")
    if target != b"/metrics":
        return _response("404 Not Found", b"not found; metrics are at /metrics\n")
    scrape = Scrape()
    try:
        collect(scrape)
    except Exception:   # a bug in a collector must not stop the agent
        log.exception("metrics collection failed")
        return _response("500 Internal Server Error", b"collection failed\n")
    body = scrape.render()
    response = _response("200 OK", body, CONTENT_TYPE)
    return response[:len(response) - len(body)] if method == b"HEAD" else response


async def serve_metrics(address: str, collect: Collector, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on ``address`` ("host:port") until cancelled.

    Args:
        address: where to listen, e.g. "127.0.0.1:9410".
        collect: called once per scrape (in the trio thread) to fill a :class:`Scrape`.

    Errors: OSError from binding propagates before ``task_status.started()``.
    Cancellation: stops listening and drops clients in flight.
    """
    host, port = parse_address(address)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(READ_TIMEOUT) as timer:
                head = await _read_head(stream)
            if timer.cancelled_caught:
                return
            with trio.move_on_after(READ_TIMEOUT):
                await stream.send_all(answer(head, collect))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass   # the scraper went away; nothing to tell it
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host)
    log.info("metrics served", address=address, path="/metrics")
    task_status.started()
    await trio.serve_listeners(handle, listeners)
