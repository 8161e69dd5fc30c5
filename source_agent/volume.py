"""A protected volume: its journal, and the recorder the capture layer appends through.

Replicated sync (``sync = "replicated"``)
-----------------------------------------
An application fsync first makes the journal durable through the op (as in
``journal`` mode), then waits until every connection of the volume has had that
seq acknowledged as durable by its target (``conn.acked_seq >= seq``; acks are
cumulative, and connections an op is not for get it as a no-op, so every
connection's ack passes every seq). The wait is bounded by ``sync_timeout``; after
it the fsync returns anyway, with a warning and ``sync_degraded`` counted. A
connection that is not replicating when the fsync comes (stopped, disconnected,
reconnecting) degrades it at once: waiting the whole timeout for a target that is
known to be away would only stall the application.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from typing import Literal

import structlog
import trio

from protocol.ops import Op
from source_agent.journal import EXCEPT, Journal
from source_agent.registry import Connection

log = structlog.get_logger("volume")

#: How often a waiting replicated fsync looks again at connection states (seconds).
_SYNC_RECHECK = 0.25
#: At most one "sync degraded" warning per this many seconds (the counter counts all).
_DEGRADED_LOG_EVERY = 10.0


class Volume:
    """The journal of one protected directory, plus capture-time samples for lag.

    Implements the capture layer's ``Recorder`` protocol (``record``/``sync``).

    Args:
        on_journal_failure: called with a reason when an append failed.
        connections: the connections of this volume (for replicated sync).
        on_disk_bound: called after an append while the journal holds more than 3/4
            of ``disk_limit`` bytes (it pauses mirrors, and over the limit drops
            lagging connections: see the agent).
    """

    def __init__(self, name: str, path: str, journal: Journal,
                 on_journal_failure: Callable[[str], None], *,
                 connections: Callable[[], list[Connection]] | None = None,
                 sync_mode: Literal["journal", "replicated"] = "journal",
                 sync_timeout: float = 5.0, disk_limit: int = 0,
                 on_disk_bound: Callable[[Volume], None] | None = None,
                 watch: bool = False) -> None:
        self.name = name
        self.path = path
        self.journal = journal
        self.mounted = False
        #: Set once the volume's capture is complete enough for a mirror to start: at
        #: once for a FUSE mount, after the first scan for a watch volume.
        self.index_ready = trio.Event()
        #: True for ``mode = "watch"`` (no mount: see source_agent/watch.py).
        self.watch = watch
        if not watch:
            self.index_ready.set()
        #: Watch mode: sends every change made before the call (a task is queued
        #: right after it). None for a FUSE volume, whose capture is synchronous.
        self.settle: Callable[[], Awaitable[None]] | None = None
        #: Watch mode: told the path of every file a mirror sends data of.
        self.on_mirror_data: Callable[[bytes], None] | None = None
        #: Descriptor of the directory under the mount, set by the agent before mounting.
        #: Anything the agent reads of the volume goes through it: touching the mount
        #: path from the agent's own process would deadlock on its own FUSE server.
        self.backing_fd: int | None = None
        #: While a restore from this connection's target writes into the volume, what
        #: it writes is captured for every other connection, not sent back to it.
        self.restoring_conid = 0
        self._on_journal_failure = on_journal_failure
        self._connections = connections or (lambda: [])
        self.sync_mode = sync_mode
        self.sync_timeout = sync_timeout
        self.disk_limit = disk_limit
        self._on_disk_bound = on_disk_bound
        # (seq, monotonic time) samples, at most one per 10 ms, for lag_seconds.
        self._sample_seqs: list[int] = []
        self._sample_times: list[float] = []
        self.journal_failures = 0
        #: Why the journal cannot be written now ("" when it can).
        self.journal_error = ""
        #: Replicated fsyncs that returned with every target durable / without.
        self.sync_replicated = 0
        self.sync_degraded = 0
        self._degraded_logged = -_DEGRADED_LOG_EVERY

    def record(self, op: Op) -> int:
        """Append ``op`` to the journal; returns its seq, or 0 when the journal failed.

        The op is already applied to the backing tree, so a journal failure cannot
        be undone: every connection of the volume is marked mirror-required instead
        of blocking the application. Never raises, never waits.
        """
        try:
            scope = EXCEPT | self.restoring_conid if self.restoring_conid else 0
            seq = self.journal.append(op, scope)
        except OSError as exc:
            self.journal_failures += 1
            reason = f"journal write failed ({exc.strerror or exc}); ops were not recorded"
            if not self.journal_error:   # once per spell, not once per op
                log.error("journal append failed: every connection of the volume needs a "
                          "mirror", volume=self.name, error=str(exc),
                          journal=self.journal.directory)
            self.journal_error = reason
            self._on_journal_failure(reason)
            return 0
        # journal_error stays set until the agent sees room on the journal's file system
        # again: a nearly full disk takes small appends and refuses large ones, and
        # the spell is one failure, not one per refused op.
        now = time.monotonic()
        if not self._sample_times or now - self._sample_times[-1] >= 0.01:
            self._sample_seqs.append(seq)
            self._sample_times.append(now)
        if (self.disk_limit and self.journal.disk_bytes > self.disk_limit * 3 // 4
                and self._on_disk_bound is not None):
            self._on_disk_bound(self)
        return seq

    async def sync(self, seq: int) -> None:
        """Application fsync: make the journal durable through ``seq``; with
        ``sync = "replicated"`` also wait (at most ``sync_timeout``) for every
        connection's target to hold it durable.

        Never raises for a slow or absent target: it degrades (warning, counter).
        Cancellation (the application gave up, or shutdown) just ends the wait.
        """
        if not seq:
            return
        await self.journal.sync(seq)
        if self.sync_mode == "replicated":
            await self._wait_replicated(seq)

    async def _wait_replicated(self, seq: int) -> None:
        behind: list[Connection] = []
        with trio.move_on_after(self.sync_timeout):
            while True:
                behind = [c for c in self._connections() if c.acked_seq < seq]
                if not behind:
                    self.sync_replicated += 1
                    return
                away = [c for c in behind if c.state != "replicating"]
                if away:
                    self._degraded(seq, away, "not replicating")
                    return
                with trio.move_on_after(_SYNC_RECHECK):
                    await behind[0].acked.park()
        self._degraded(seq, behind, f"no durable ack within {self.sync_timeout:g} s")

    def _degraded(self, seq: int, conns: list[Connection], why: str) -> None:
        self.sync_degraded += 1
        now = time.monotonic()
        if now - self._degraded_logged >= _DEGRADED_LOG_EVERY:
            self._degraded_logged = now
            log.warning("replicated sync degraded: fsync returned before every target held "
                        "the data durable", volume=self.name, seq=seq, reason=why,
                        conids=[c.id for c in conns],
                        states={c.id: c.state for c in conns},
                        sync_degraded=self.sync_degraded)

    async def settled(self) -> None:
        """Return once every change made before the call is journaled (watch mode sends
        its pending changes; a FUSE volume's capture already did)."""
        if self.settle is not None:
            await self.settle()

    def captured_at(self, seq: int) -> float | None:
        """Monotonic time around which ``seq`` was captured (None if not sampled)."""
        pos = bisect_right(self._sample_seqs, seq)
        if pos >= len(self._sample_times):
            return None
        return self._sample_times[pos - 1] if pos else self._sample_times[0]

    def lag_seconds(self, acked_seq: int) -> float:
        """Age of the oldest op not yet durable on the target (0 when caught up)."""
        if acked_seq >= self.journal.last_seq:
            return 0.0
        pos = bisect_right(self._sample_seqs, acked_seq)
        if pos >= len(self._sample_times):
            return 0.0
        return round(time.monotonic() - self._sample_times[pos], 3)

    def forget_samples(self, upto: int) -> None:
        """Drop samples every connection has passed."""
        pos = bisect_right(self._sample_seqs, upto)
        if pos > 1024:
            del self._sample_seqs[:pos - 1]
            del self._sample_times[:pos - 1]

    def is_empty(self) -> bool:
        try:
            where: int | str = self.backing_fd if self.backing_fd is not None else self.path
            return not os.listdir(where)
        except OSError:
            return True
