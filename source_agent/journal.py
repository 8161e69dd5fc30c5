"""The volume journal (the "source queue"): durable, segmented, with a memory tail.

Layout: ``<dir>/<first_seq:020d>.seg`` files; each holds consecutive records

    length u32 | crc32(seq, scope and op bytes) u32 | seq u64 | scope u32 | op (msgpack)

``scope`` is 0 for ops every connection gets (captured writes), a conid for ops
meant for one connection only (its mirror and verify traffic), or EXCEPT | conid
for ops every connection but that one gets (what a restore from that connection's
target writes into the volume). Connections an op is not for read it as a no-op,
so their seqs stay gap-free.

Why it is right
---------------
* Appends happen on the event-loop thread right after the backing file system
  accepted the op, with no await in between (see capture.py), so seq order is the
  order the source tree passed through. ``append`` only ``write()``s: durability is
  a separate, coalesced ``fsync`` (:meth:`Journal.sync`), asked for by application
  fsync, by the periodic flusher, and at shutdown — never one per op.
* A crash can tear the tail of the last segment. :meth:`Journal.open` checks every
  record (length, checksum, seq continuity) and cuts the file back to the last
  good record, so a torn record is never sent.
* A segment's name is its first seq, so even an empty active segment tells the
  next seq after restart: seqs are never reused.
* Segments are deleted only when every connection has acknowledged all of their
  ops as durable on its target (:meth:`Journal.release`), and never the active one.

Memory
------
Memory stays bounded however long a target is away (issue 5, W8: 4 GiB of backlog
in a 256 MiB agent):

* The memory tail holds at most ``memory_limit`` bytes of encoded ops. An op that
  falls out of it loses its reference at once (its slot gets ``_EVICTED``); the
  list itself is compacted now and then. Keeping evicted ops until compaction
  (every 4096 ops) held 4 GiB with 1 MiB FUSE writes.
* Reads behind the tail come from the segment files in a worker thread: the
  sparse index has an entry every INDEX_EVERY records *or* INDEX_BYTES bytes, and
  records before the asked seq are skipped with a seek, not read, so a read costs
  about what it returns, not the segment up to it.
"""

from __future__ import annotations

import errno
import os
import struct
import time
import zlib
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Final

import structlog
import trio

from protocol.frames import encode_op
from protocol.ops import NoteOp, Op
from protocol.runtime.metrics import Histogram

log = structlog.get_logger("journal")

RECORD: Final = struct.Struct(">IIQI")
EXCEPT: Final = 0x80000000
NOOP: Final = encode_op(NoteOp(""))
INDEX_EVERY: Final = 256
INDEX_BYTES: Final = 256 << 10
#: What an evicted slot of the memory tail holds (the op's bytes are let go).
_EVICTED: Final[tuple[int, bytes]] = (0, b"")
CLEAN_MARK: Final = "clean-shutdown"


class JournalError(Exception):
    """The journal directory cannot be used (unreadable, corrupt beyond repair)."""


class JournalGapError(JournalError):
    """The ops asked for were released or lost: that connection needs a mirror."""


@dataclass
class Segment:
    first_seq: int
    path: str
    last_seq: int = 0                # first_seq - 1 while empty
    size: int = 0
    #: Sparse index: (seq, offset) of the first record, then of the first record at
    #: least INDEX_EVERY records or INDEX_BYTES bytes after the previous entry.
    index: list[tuple[int, int]] = field(default_factory=list)

    def add_index(self, seq: int, offset: int) -> None:
        """Note the record ``seq`` starting at ``offset`` (records come in order)."""
        if self.index:
            last_seq, last_offset = self.index[-1]
            if seq - last_seq < INDEX_EVERY and offset - last_offset < INDEX_BYTES:
                return
        self.index.append((seq, offset))

    def offset_for(self, seq: int) -> tuple[int, int]:
        """The (seq, offset) of the indexed record at or before ``seq``."""
        pos = bisect_right(self.index, (seq, 1 << 62)) - 1
        return self.index[max(pos, 0)] if self.index else (self.first_seq, 0)


@dataclass
class Recovery:
    """What :meth:`Journal.open` found."""

    last_seq: int
    clean: bool
    torn_bytes: int
    segments: int
    #: mtime of the newest segment as found (before any repair): the last write.
    last_write: float = 0.0


class Journal:
    """A volume's op journal.

    Args:
        directory: where segments live (created if missing).
        memory_limit: bytes of encoded ops kept in memory for fast reads.
        segment_bytes: roll to a new segment after this many bytes.
    """

    def __init__(self, directory: str, *, memory_limit: int = 64 << 20,
                 segment_bytes: int = 64 << 20) -> None:
        self.directory = directory
        self.memory_limit = memory_limit
        self.segment_bytes = segment_bytes
        self.segments: list[Segment] = []
        self._fd = -1
        self.last_seq = 0
        self.durable_seq = 0
        # Memory tail: _tail[i] is (scope, encoded op) of seq _tail_first + i.
        self._tail: list[tuple[int, bytes]] = []
        self._tail_head = 0
        self._tail_first = 1
        self._tail_bytes = 0
        self._appended = trio.lowlevel.ParkingLot()
        self._sync_lock = trio.Lock()
        self.disk_bytes = 0
        self.recovery: Recovery | None = None
        #: Bytes of records appended since open (metrics: throughput into the journal).
        self.appended_bytes = 0
        #: How long each fsync of a segment took (coalesced syncs and segment rolls).
        self.fsync_latency = Histogram()

    # -- opening and closing ----------------------------------------------------------

    def open(self) -> Recovery:
        """Scan, verify and repair the segments; open the active one for appends.

        Raises:
            JournalError: the directory cannot be read or written.
        """
        try:
            os.makedirs(self.directory, exist_ok=True)
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".seg"))
        except OSError as exc:
            raise JournalError(f"journal directory {self.directory}: {exc.strerror}") from exc
        clean_path = os.path.join(self.directory, CLEAN_MARK)
        clean = os.path.exists(clean_path) or not names
        last_write = os.stat(os.path.join(self.directory, names[-1])).st_mtime if names else 0.0
        torn = 0
        expected = 0
        for i, name in enumerate(names):
            try:
                first = int(name.removesuffix(".seg"))
            except ValueError:
                log.warning("ignoring stray file in journal", file=name)
                continue
            seg = Segment(first, os.path.join(self.directory, name), last_seq=first - 1)
            if expected and first != expected:
                log.error("journal segment does not follow the previous one; dropping it "
                          "and everything after", segment=name, expected_seq=expected)
                for rest in names[i:]:
                    os.unlink(os.path.join(self.directory, rest))
                break
            cut = self._scan(seg)
            self.segments.append(seg)
            expected = seg.last_seq + 1
            if cut:
                torn += cut
                log.warning("journal tail torn by a crash: cut back to the last good record",
                            segment=name, bytes_cut=cut, last_seq=seg.last_seq)
                for rest in names[i + 1:]:
                    os.unlink(os.path.join(self.directory, rest))
                break
        if not self.segments:
            self.segments.append(self._new_segment(1))
        active = self.segments[-1]
        self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)
        self.last_seq = self.durable_seq = active.last_seq
        self._tail_first = self.last_seq + 1
        self.disk_bytes = sum(s.size for s in self.segments)
        if os.path.exists(clean_path):
            os.unlink(clean_path)
            _fsync_dir(self.directory)
        self.recovery = Recovery(self.last_seq, clean and not torn, torn, len(self.segments),
                                 last_write)
        return self.recovery

    def _scan(self, seg: Segment) -> int:
        """Index ``seg``; truncate a torn or corrupt tail. Returns bytes cut."""
        with open(seg.path, "r+b") as f:
            data = f.read()
            offset = 0
            seq = seg.first_seq
            while offset + RECORD.size <= len(data):
                length, crc, rseq, _scope = RECORD.unpack_from(data, offset)
                end = offset + RECORD.size + length
                if rseq != seq or end > len(data):
                    break
                if zlib.crc32(data[offset + 8:end]) != crc:
                    break
                seg.add_index(seq, offset)
                offset = end
                seq += 1
            seg.last_seq = seq - 1
            seg.size = offset
            cut = len(data) - offset
            if cut:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
        return cut

    def _new_segment(self, first_seq: int) -> Segment:
        seg = Segment(first_seq, os.path.join(self.directory, f"{first_seq:020d}.seg"),
                      last_seq=first_seq - 1)
        fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        _fsync_dir(self.directory)
        return seg

    def close(self) -> None:
        """Make everything durable and mark a clean shutdown (call once, at the end)."""
        if self._fd < 0:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.durable_seq = self.last_seq
        with open(os.path.join(self.directory, CLEAN_MARK), "w") as f:
            f.write(f"{self.last_seq}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.directory)

    # -- appending --------------------------------------------------------------------

    def append(self, op: Op, scope: int = 0) -> int:
        """Record ``op`` with the next seq and return that seq. Synchronous, no fsync.

        ``scope``: 0 for every connection, or the one conid this op is for.

        Raises:
            OSError: the journal file could not be written (e.g. ENOSPC); the op has
                no seq and nothing was recorded.
        """
        encoded = encode_op(op)
        seq = self.last_seq + 1
        seg = self.segments[-1]
        if seg.size >= self.segment_bytes:
            seg = self._roll(seq)
        head = struct.pack(">QI", seq, scope)
        header = RECORD.pack(len(encoded), zlib.crc32(encoded, zlib.crc32(head)), seq, scope)
        # writev: no copy of a (up to 1 MiB) op just to put its header in front.
        written = os.writev(self._fd, (header, encoded))
        record_size = len(header) + len(encoded)
        if written != record_size:
            # A short write on a regular file means the disk is full: undo it.
            os.ftruncate(self._fd, seg.size)
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write to the "
                          f"journal)")
        seg.add_index(seq, seg.size)
        seg.size += record_size
        seg.last_seq = seq
        self.disk_bytes += record_size
        self.appended_bytes += record_size
        self.last_seq = seq
        self._tail.append((scope, encoded))
        self._tail_bytes += len(encoded)
        while self._tail_bytes > self.memory_limit and self._tail_head < len(self._tail) - 1:
            self._tail_bytes -= len(self._tail[self._tail_head][1])
            self._tail[self._tail_head] = _EVICTED   # let the op go now (see Memory)
            self._tail_head += 1
            self._tail_first += 1
        if self._tail_head > 4096 and self._tail_head * 2 > len(self._tail):
            del self._tail[:self._tail_head]
            self._tail_head = 0
        self._appended.unpark_all()
        return seq

    def skip_to(self, seq: int) -> int:
        """Append no-op records until ``last_seq`` is ``seq``; returns how many.

        For a journal cut back after a crash: the ops lost with its torn tail may
        have reached a target already (the sender reads the memory tail before the
        fsync), so that target can be ahead of the journal. Numbering on from the
        cut would give its seqs to new ops, which the target would skip as already
        applied. Skipping to the target's position keeps seqs unique; what the lost
        ops changed is repaired by the restricted mirror that follows the cut.

        Raises:
            OSError: as :meth:`append` (the no-ops written so far stay).
        """
        added = 0
        while self.last_seq < seq:
            self.append(NoteOp(""))
            added += 1
        return added

    def _roll(self, next_seq: int) -> Segment:
        # The new segment is made and opened before the old one is let go: when that
        # fails (ENOSPC, EMFILE) the journal keeps appending to the old segment, and
        # never holds a closed descriptor.
        seg = self._new_segment(next_seq)
        try:
            fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError:
            _unlink_quietly(seg.path)
            raise
        try:
            self._fsync(self._fd)
        except OSError:
            os.close(fd)
            _unlink_quietly(seg.path)
            raise
        os.close(self._fd)
        self._fd = fd
        self.durable_seq = max(self.durable_seq, next_seq - 1)
        self.segments.append(seg)
        return seg

    async def sync(self, seq: int | None = None) -> None:
        """Return once every op up to ``seq`` (default: the last) is on stable storage.

        Concurrent callers share one fsync. Cancellation leaves the fsync running in
        its thread; a later call repeats it if needed.
        """
        target = self.last_seq if seq is None else seq
        while self.durable_seq < target:
            async with self._sync_lock:
                if self.durable_seq >= target:
                    return
                upto = self.last_seq
                fd = os.dup(self._fd)
                try:
                    await trio.to_thread.run_sync(self._fsync, fd)
                finally:
                    os.close(fd)
                self.durable_seq = max(self.durable_seq, upto)

    def _fsync(self, fd: int) -> None:
        """``os.fsync(fd)``, timed into :attr:`fsync_latency` (any thread)."""
        started = time.perf_counter()
        os.fsync(fd)
        self.fsync_latency.observe(time.perf_counter() - started)

    async def run_flusher(self, interval: float) -> None:
        """fsync every ``interval`` seconds while there is something new (until cancelled)."""
        while True:
            await trio.sleep(interval)
            if self.durable_seq < self.last_seq:
                await self.sync()

    # -- reading ----------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """The oldest seq still held (last_seq + 1 when nothing is held)."""
        for seg in self.segments:
            if seg.last_seq >= seg.first_seq:
                return seg.first_seq
        return self.last_seq + 1

    async def wait_for(self, seq: int) -> None:
        """Return once ``seq`` has been appended."""
        while self.last_seq < seq:
            await self._appended.park()

    async def read(self, seq: int, max_bytes: int, scope: int = 0) -> list[bytes]:
        """Encoded ops ``seq, seq+1, …`` (at least one; waits for ``seq`` to exist).

        Records scoped to another connection than ``scope`` come back as no-ops.
        Raises:
            JournalGapError: ``seq`` was released or lost.
        """
        await self.wait_for(seq)
        if seq >= self._tail_first:
            start = self._tail_head + (seq - self._tail_first)
            out: list[bytes] = []
            size = 0
            tail = self._tail
            for i in range(start, min(len(tail), start + 65536)):
                rscope, encoded = tail[i]
                if rscope and not _for(rscope, scope):
                    encoded = NOOP
                out.append(encoded)
                size += len(encoded)
                if size >= max_bytes:
                    break
            return out
        if seq < self.first_seq:
            raise JournalGapError(f"seq {seq} is no longer in the journal "
                                  f"(oldest is {self.first_seq})")
        return await trio.to_thread.run_sync(self._read_disk, seq, max_bytes, scope)

    def _read_disk(self, seq: int, max_bytes: int, scope: int) -> list[bytes]:
        firsts = [s.first_seq for s in self.segments]
        seg = self.segments[bisect_right(firsts, seq) - 1]
        at_seq, offset = seg.offset_for(seq)
        out: list[bytes] = []
        size = 0
        with open(seg.path, "rb") as f:
            f.seek(offset)
            limit = min(seg.last_seq, self.last_seq)
            while at_seq <= limit and size < max_bytes:
                header = f.read(RECORD.size)
                if len(header) < RECORD.size:
                    break
                length, _crc, rseq, rscope = RECORD.unpack(header)
                if rseq != at_seq:
                    raise JournalError(f"journal segment {seg.path} is damaged at seq {at_seq}")
                if at_seq < seq:
                    f.seek(length, os.SEEK_CUR)   # before the asked seq: skip, don't read
                    at_seq += 1
                    continue
                body = f.read(length)
                if len(body) != length:
                    raise JournalError(f"journal segment {seg.path} is damaged at seq {at_seq}")
                if rscope and not _for(rscope, scope):
                    body = NOOP
                out.append(body)
                size += len(body)
                at_seq += 1
        if not out:
            raise JournalError(f"seq {seq} not found in {seg.path}")
        return out

    # -- releasing --------------------------------------------------------------------

    def release(self, upto: int) -> int:
        """Delete whole segments whose ops are all <= ``upto``. Returns segments deleted."""
        removed = 0
        while len(self.segments) > 1 and self.segments[0].last_seq <= upto:
            seg = self.segments.pop(0)
            try:
                os.unlink(seg.path)
            except FileNotFoundError:
                pass
            self.disk_bytes -= seg.size
            removed += 1
        return removed

    def bytes_after(self, seq: int) -> int:
        """Estimated journal bytes of the ops after ``seq`` (a connection's backlog):
        the disk bytes in proportion to the ops held. Exact enough for status and metrics,
        without reading the segments."""
        behind = self.last_seq - seq
        if behind <= 0:
            return 0
        held = max(self.last_seq - self.first_seq + 1, 1)
        return int(self.disk_bytes * min(behind / held, 1.0))

    @property
    def memory_bytes(self) -> int:
        return self._tail_bytes


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _for(record_scope: int, conid: int) -> bool:
    """Whether a record with ``record_scope`` (non-zero) is for connection ``conid``."""
    if record_scope & EXCEPT:
        return record_scope & ~EXCEPT != conid
    return record_scope == conid
