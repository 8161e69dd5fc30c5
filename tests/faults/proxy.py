"""A chaos TCP proxy for the fault suite: sits between a source agent and its target.

Plain sockets and threads, so it runs beside the real daemons without sharing their
event loop. Each accepted connection (a *link*) gets an upstream connection to the
target and two pump threads, one per direction: ``up`` (source → target) and ``down``
(target → source). A pump checks the proxy's controls before every read, so when it
holds data back it also stops reading: the sender sees real TCP backpressure.

Controls (all thread-safe, callable while traffic flows):

* :meth:`ChaosProxy.cut`: end every current link now, with RST or FIN.
* :meth:`ChaosProxy.cut_randomly`: cut at random moments (exponential gaps, a rate).
* :meth:`ChaosProxy.stall`: stop forwarding for N seconds; sockets stay open.
* :meth:`ChaosProxy.throttle`: at most N bytes/s per direction.
* :meth:`ChaosProxy.delay`: hold every chunk N ms before forwarding it.
* :meth:`ChaosProxy.half_open`: freeze the current links (no bytes, no close) until
  :meth:`ChaosProxy.release`; links made afterwards forward normally, as when a peer
  vanished behind a NAT that forgot the flow.
* :meth:`ChaosProxy.corrupt`: flip one byte at a random offset after the first N bytes
  of one direction of a link. The proxy follows the frame layout of
  ``protocol.frames`` (header, then ``length`` body bytes) so it can report which
  field it hit, and with ``body_only`` it picks a byte of a frame body, which the frame
  checksum covers.

Counters (:attr:`ChaosProxy.stats`) say what the proxy actually did; the tests add
them to the suite totals only after the scenario has converged.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from protocol.frames import HEADER

Direction = Literal["up", "down"]

#: Byte offsets of the frame header's fields (">2sBBBxII"), for reporting a flip.
HEADER_FIELDS: tuple[tuple[int, int, str], ...] = (
    (0, 2, "magic"), (2, 3, "version"), (3, 4, "type"), (4, 5, "flags"),
    (5, 6, "reserved"), (6, 10, "length"), (10, 14, "checksum"))
_LENGTH_AT = 6
# The table above follows this layout; a change of the header must update it.
assert HEADER.format == ">2sBBBxII", f"frame header changed: {HEADER.format}"
CHUNK = 65536


def _header_field(offset: int) -> str:
    for start, end, name in HEADER_FIELDS:
        if start <= offset < end:
            return name
    raise ValueError(offset)


class FrameTracker:
    """Follows frame boundaries in one direction of the original (uncorrupted) stream."""

    def __init__(self) -> None:
        self.header = bytearray()
        self.body_left = 0

    def regions(self, chunk: bytes) -> list[tuple[int, int, str]]:
        """Split ``chunk`` into (start, end, what) where what is a header field or "body"."""
        out: list[tuple[int, int, str]] = []
        pos = 0
        while pos < len(chunk):
            if self.body_left:
                n = min(self.body_left, len(chunk) - pos)
                out.append((pos, pos + n, "body"))
                self.body_left -= n
                pos += n
                continue
            need = HEADER.size - len(self.header)
            take = chunk[pos:pos + need]
            for i in range(len(take)):
                out.append((pos + i, pos + i + 1, _header_field(len(self.header) + i)))
            self.header += take
            pos += len(take)
            if len(self.header) == HEADER.size:
                (self.body_left,) = struct.unpack_from(">I", self.header, _LENGTH_AT)
                self.header.clear()
        return out


@dataclass
class Corruption:
    """One armed (then done) byte flip."""

    direction: Direction
    after: int                  # first stream offset that may be flipped
    body_only: bool
    done: bool = False
    link: int = -1              # which link it hit
    offset: int = -1            # stream offset of the flipped byte
    where: str = ""             # "body" or the header field
    mask: int = 0


@dataclass
class _Link:
    id: int
    client: socket.socket
    upstream: socket.socket
    frozen: bool = False        # half-open: holds data until released or cut
    dead: threading.Event = field(default_factory=threading.Event)
    rst: bool = True
    closed: bool = False
    sent: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    trackers: dict[str, FrameTracker] = field(
        default_factory=lambda: {"up": FrameTracker(), "down": FrameTracker()})


class ChaosProxy:
    """A TCP proxy on 127.0.0.1 that forwards to ``upstream`` and misbehaves on demand.

    Args:
        upstream: (host, port) of the target agent's listener.
        seed: seeds every random choice (cut moments, corruption offsets and masks).
    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(self, upstream: tuple[str, int], seed: int = 0) -> None:
        self.upstream = upstream
        self.rng = random.Random(seed)
        self.stats: Counter[str] = Counter()
        self.corruptions: list[Corruption] = []
        self._lock = threading.Lock()
        self._links: dict[int, _Link] = {}
        self._next_id = 0
        self._closing = threading.Event()
        self._stall_until = 0.0
        self._rate: float | None = None
        self._delay = 0.0
        self._cutter: threading.Thread | None = None
        self._cutter_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]

    @property
    def address(self) -> str:
        """``host:port`` to give a source connection as its ``target``."""
        return f"127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> ChaosProxy:
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def close(self) -> None:
        """Stop accepting, end every link (FIN), join the threads."""
        self.cut_randomly(None)
        self._closing.set()
        self.cut(rst=False, count=False)
        for t in list(self._threads):
            t.join(5)
        self._listener.close()

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- controls -------------------------------------------------------------------------

    def cut(self, *, rst: bool = True, count: bool = True) -> int:
        """End every current link now (RST, or FIN when ``rst`` is False); how many."""
        with self._lock:
            links = [ln for ln in self._links.values() if not ln.dead.is_set()]
            for link in links:
                link.rst = rst
                link.dead.set()
        for link in links:
            self._close_link(link)
        if count and links:
            self.stats["cuts"] += len(links)
        return len(links)

    def cut_randomly(self, rate: float | None, *, rst_share: float = 0.5) -> None:
        """Cut all links at random moments, ``rate`` times a second on average (None: stop).

        Each cut is an RST with probability ``rst_share``, else a FIN.
        """
        if self._cutter is not None:
            self._cutter_stop.set()
            self._cutter.join(5)
            self._cutter = None
        if not rate:
            return
        self._cutter_stop = threading.Event()
        stop = self._cutter_stop

        def cutter() -> None:
            while not stop.wait(self.rng.expovariate(rate)):
                self.cut(rst=self.rng.random() < rst_share)

        self._cutter = self._spawn(cutter, "proxy-cutter")

    def stall(self, seconds: float) -> None:
        """Forward nothing in either direction for ``seconds``; sockets stay open."""
        with self._lock:
            self._stall_until = max(self._stall_until, time.monotonic() + seconds)
        self.stats["stalls"] += 1

    def throttle(self, bytes_per_second: float | None) -> None:
        """Forward at most ``bytes_per_second`` per direction and link (None: unlimited)."""
        self._rate = bytes_per_second

    def delay(self, milliseconds: float) -> None:
        """Hold each forwarded chunk ``milliseconds`` (0: no delay)."""
        self._delay = milliseconds / 1000.0

    def half_open(self) -> int:
        """Freeze every current link: no bytes forwarded, nothing closed. How many."""
        with self._lock:
            links = [ln for ln in self._links.values() if not ln.dead.is_set()]
            for link in links:
                link.frozen = True
        self.stats["half_open"] += len(links)
        return len(links)

    def release(self) -> None:
        """Let frozen links forward again (if their peers still want them)."""
        with self._lock:
            for link in self._links.values():
                link.frozen = False

    def corrupt(self, direction: Direction, after: int, *, window: int = 4096,
                body_only: bool = True) -> Corruption:
        """Arm one byte flip in ``direction`` at a random stream offset in
        [after, after + window) of the first link that gets that far (or the next frame
        body byte from there when ``body_only``). Returns the record, filled in when done.
        """
        c = Corruption(direction, after + self.rng.randrange(window), body_only,
                       mask=self.rng.randrange(1, 256))
        with self._lock:
            self.corruptions.append(c)
        return c

    # -- observation ----------------------------------------------------------------------

    @property
    def links_opened(self) -> int:
        return self.stats["links"]

    def live_links(self) -> int:
        with self._lock:
            return sum(not ln.dead.is_set() for ln in self._links.values())

    # -- machinery ------------------------------------------------------------------------

    def _spawn(self, fn: object, name: str, *args: object) -> threading.Thread:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)
        return t

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                # The target is down: refuse the source the way the target would.
                self._abort(client)
                self.stats["refused"] += 1
                continue
            for s in (client, upstream):
                s.settimeout(0.05)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                link = _Link(self._next_id, client, upstream)
                self._next_id += 1
                self._links[link.id] = link
            self.stats["links"] += 1
            self._spawn(self._pump, f"proxy-{link.id}-up", link, "up")
            self._spawn(self._pump, f"proxy-{link.id}-down", link, "down")
            # Forget finished pump threads so a long random run does not pile them up.
            self._threads = [t for t in self._threads if t.is_alive()]

    @staticmethod
    def _abort(s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()

    def _close_link(self, link: _Link) -> None:
        with self._lock:
            if link.closed:
                return
            link.closed = True
            self._links.pop(link.id, None)
        for s in (link.client, link.upstream):
            if link.rst:
                self._abort(s)
            else:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _held(self, link: _Link) -> bool:
        return link.frozen or time.monotonic() < self._stall_until

    def _pump(self, link: _Link, direction: Direction) -> None:
        src, dst = ((link.client, link.upstream) if direction == "up"
                    else (link.upstream, link.client))
        try:
            while not link.dead.is_set():
                if self._held(link):
                    time.sleep(0.02)
                    continue
                try:
                    chunk = src.recv(CHUNK)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                chunk = self._maybe_corrupt(link, direction, chunk)
                if self._delay:
                    time.sleep(self._delay)
                self._send(link, dst, chunk)
                link.sent[direction] += len(chunk)
                self.stats[f"bytes_{direction}"] += len(chunk)
        except OSError:
            pass
        finally:
            # One side ended (or a cut): end the whole link, as a router reset would.
            if not link.dead.is_set():
                link.rst = False
                link.dead.set()
            self._close_link(link)

    def _send(self, link: _Link, dst: socket.socket, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view and not link.dead.is_set():
            while self._held(link) and not link.dead.is_set():
                time.sleep(0.02)
            rate = self._rate
            piece = view[:max(1, int(rate / 20))] if rate else view
            try:
                n = dst.send(piece)
            except TimeoutError:
                continue
            view = view[n:]
            if rate:
                time.sleep(n / rate)

    def _maybe_corrupt(self, link: _Link, direction: Direction, chunk: bytes) -> bytes:
        start = link.sent[direction]
        regions = link.trackers[direction].regions(chunk)
        with self._lock:
            pending = [c for c in self.corruptions if not c.done and c.direction == direction]
            if not pending:
                return chunk
            c = pending[0]
            for lo, hi, what in regions:
                if c.body_only and what != "body":
                    continue
                pos = max(lo, c.after - start)
                if pos < hi:
                    c.done, c.link, c.offset, c.where = True, link.id, start + pos, what
                    buf = bytearray(chunk)
                    buf[pos] ^= c.mask
                    self.stats["corruptions"] += 1
                    return bytes(buf)
        return chunk
