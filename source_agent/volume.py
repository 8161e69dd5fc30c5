"""A protected volume: its journal, and the recorder the capture layer appends through."""

from __future__ import annotations

import os
import time
from bisect import bisect_right
from collections.abc import Callable

import structlog

from protocol.ops import Op
from source_agent.journal import EXCEPT, Journal

log = structlog.get_logger("volume")


class Volume:
    """The journal of one protected directory, plus capture-time samples for lag.

    Implements the capture layer's ``Recorder`` protocol (``record``/``sync``).
    """

    def __init__(self, name: str, path: str, journal: Journal,
                 on_journal_failure: Callable[[str], None]) -> None:
        self.name = name
        self.path = path
        self.journal = journal
        self.mounted = False
        #: Descriptor of the directory under the mount, set by the agent before mounting.
        #: Anything the agent reads of the volume goes through it: touching the mount
        #: path from the agent's own process would deadlock on its own FUSE server.
        self.backing_fd: int | None = None
        #: While a restore from this connection's target writes into the volume, what
        #: it writes is captured for every other connection, not sent back to it.
        self.restoring_conid = 0
        self._on_journal_failure = on_journal_failure
        # (seq, monotonic time) samples, at most one per 10 ms, for lag_seconds.
        self._sample_seqs: list[int] = []
        self._sample_times: list[float] = []
        self.journal_failures = 0

    def record(self, op: Op) -> int:
        """Append ``op`` to the journal; returns its seq, or 0 when the journal failed.

        The op is already applied to the backing tree, so a journal failure cannot
        be undone: every connection of the volume is marked mirror-required instead
        of blocking the application.
        """
        try:
            scope = EXCEPT | self.restoring_conid if self.restoring_conid else 0
            seq = self.journal.append(op, scope)
        except OSError as exc:
            self.journal_failures += 1
            reason = f"journal write failed ({exc.strerror or exc}); ops were not recorded"
            log.error("journal append failed", volume=self.name, error=str(exc))
            self._on_journal_failure(reason)
            return 0
        now = time.monotonic()
        if not self._sample_times or now - self._sample_times[-1] >= 0.01:
            self._sample_seqs.append(seq)
            self._sample_times.append(now)
        return seq

    async def sync(self, seq: int) -> None:
        """Make the journal durable through ``seq`` (application fsync)."""
        if seq:
            await self.journal.sync(seq)

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
