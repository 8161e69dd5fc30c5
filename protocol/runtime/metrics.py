"""Prometheus metrics: a tiny HTTP/1.0 server on trio that renders a scrape on each GET.

Nothing is stored here: each scrape calls the agent's collector, which reads the
values from the agent's own state (connections, volumes, replicas) into a fresh
:class:`Scrape`, rendered as Prometheus text format 0.0.4. Labels are kept to a
small fixed set (:data:`LABELS`) so the number of series stays bounded by the
number of connections and volumes.

The server answers one request per TCP connection (HTTP/1.0 style, then closes):
``GET /metrics`` gives 200, any other path 404, any other method 405, a request
head over :data:`MAX_REQUEST_BYTES` 431, and a client that sends nothing complete
within :data:`READ_TIMEOUT` seconds is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class _Family:
    kind: str
    help: str
    samples: list[tuple[tuple[tuple[str, str], ...], float]] = field(default_factory=list)


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

    def _add(self, name: str, kind: str, help: str, value: float,
             labels: dict[str, object]) -> None:
        bad = set(labels) - LABELS
        if bad:
            raise ValueError(f"metric {name}: label(s) {sorted(bad)} not allowed")
        family = self._families.setdefault(PREFIX + name, _Family(kind, help))
        if family.kind != kind:
            raise ValueError(f"metric {name} is both {family.kind} and {kind}")
        family.samples.append((tuple(sorted((k, str(v)) for k, v in labels.items())),
                               float(value)))

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        lines: list[str] = []
        for name, family in self._families.items():
            lines.append(f"# HELP {name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {name} {family.kind}")
            for labels, value in family.samples:
                text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
                lines.append(f"{name}{{{text}}} {_format_value(value)}" if text
                             else f"{name} {_format_value(value)}")
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
