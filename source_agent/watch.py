"""Watch mode: protect a directory without a FUSE mount (``mode = "watch"``).

Theory of operation
-------------------
A kernel notification backend (``watch_events``: fanotify on the whole file system
filtered to the volume, or recursive inotify) reports *which paths* changed, never
what the change was. The watcher therefore works from state, not from events:

1. A reader task moves events from the kernel queue into an in-memory list.
2. The reconciler waits for the first event, lets a short window pass (``window``,
   50 ms by default) so that a burst of writes to one file becomes one pass over
   it, then takes every event of the window in order:
   * a paired rename within the volume is sent at once as a RENAME (after a
     PREPARE that clears its destination, so it cannot fail on the target), and
     the index rows and pending paths under the old name move to the new one;
   * every other event marks its path dirty; rescans (queue overflow, a lost
     watch, a directory that appeared) mark a subtree.
3. Each dirty path is compared with its row in the index (``watch_index``): a file
   is read in 64 KiB blocks and only blocks whose xxh3 hash differs from the row
   are sent; a new entry is sent whole; a vanished one is removed (PREPARE "none");
   metadata and xattrs that differ are sent as their own ops.
4. The ops go into the volume journal like captured ones, and the index rows are
   committed only after the journal holds those ops durable, so the index never
   claims more than was sent.

The guarantee is weaker than a FUSE capture's, and status says so: a change is
seen only after it happened, as a file-level state, so the replica converges to
the source (eventually consistent) but is not write-ordered, and a write that is
overwritten within the window is never sent. A task waits for the watcher to send
every change made before it was queued (:meth:`Watcher.settle`), so it still runs
at its point in the stream.

First start and restart
-----------------------
Without a complete index (first start), the tree is scanned and recorded without
sending anything, every connection is marked mirror-required, and the automatic
mirror (held back until the scan is done, see ``Volume.index_ready``) brings the
target in sync. A change during the scan is either in the recorded state, which
the mirror reads later, or an event after it, which is compared with the row.
With an index, a restart walks the tree comparing stat with the rows (reading only
entries whose stat changed, or whose row is racy) and sends what changed while the
agent was stopped: no whole-tree read, no mirror.

Hard links are replicated as separate files; sockets and device nodes are skipped.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import structlog
import trio
import trio.lowlevel
import xxhash

from protocol.checks import BLOCK_SIZE, block_hashes, entry_kind
from protocol.ops import (
    RENAME_EXCHANGE,
    ChmodOp,
    ChownOp,
    CreateOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    Op,
    PrepareOp,
    RemovexattrOp,
    RenameOp,
    SetxattrOp,
    SymlinkOp,
    TruncateOp,
    UtimensOp,
    WriteOp,
)
from protocol.runtime.entries import fd_xattr_items, xattr_items
from source_agent.volume import Volume
from source_agent.watch_events import (
    PAIR_WAIT,
    WatchBackend,
    WatchEvent,
    is_under,
    open_backend,
)
from source_agent.watch_index import IndexEntry, WatchIndex

log = structlog.get_logger("watch")

GUARANTEE: Final = "file-level, eventually consistent, not write-ordered"
#: A file is read and compared in ranges of this many bytes, each in a worker thread
#: (files up to one range are read in the agent's thread).
RANGE_BYTES: Final = 8 * 1024 * 1024
#: Events held in memory before the agent treats its own queue as overflowed.
MAX_QUEUED_EVENTS: Final = 1_000_000
#: Entries handled between two checkpoints of a walk.
YIELD_EVERY: Final = 64
_ZERO_HASH: Final = xxhash.xxh3_64_digest(bytes(BLOCK_SIZE))
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class _NotDirectory(Exception):
    """A component of a path is missing or not a directory; ``path`` is that prefix."""

    def __init__(self, path: bytes) -> None:
        super().__init__(path)
        self.path = path


@dataclass
class WatchStats:
    events: int = 0
    rescans: int = 0
    overflows: int = 0
    entries_checked: int = 0
    files_read: int = 0
    bytes_read: int = 0
    ops_sent: int = 0
    data_bytes_sent: int = 0
    renames: int = 0
    deletes: int = 0
    last_rescan: dict[str, Any] | None = None
    errors: int = 0
    last_error: dict[str, Any] | None = None


class Watcher:
    """Watch one volume and send what changes in it as ops of its journal.

    Args:
        volume: the volume; its ``backing_fd`` is the directory itself (no mount).
        index: the volume's persisted index.
        backend: "auto", "fanotify" or "inotify" (see ``watch_events.open_backend``).
        window: seconds between the first event of a batch and its processing.
    """

    def __init__(self, volume: Volume, index: WatchIndex, *, backend: str = "auto",
                 window: float = 0.05) -> None:
        self.volume = volume
        self.index = index
        self.backend_name = backend
        self.window = window
        self.backend: WatchBackend | None = None
        self.first_start = not index.complete
        #: The last stop was clean: the index's racy rows can be trusted (watch_index).
        self.after_clean_stop = index.meta("clean") == "1"
        self._stopped_cleanly = False
        self.state = "starting"
        self.startup = ""
        self.stats = WatchStats()
        self._events: deque[WatchEvent] = deque()
        self._arrived = trio.lowlevel.ParkingLot()
        self._batch_lock = trio.Lock()
        self._dirty: dict[bytes, None] = {}
        self._rescans: dict[bytes, str] = {}
        self._touched_dirs: set[bytes] = set()
        self._failed = False
        self._last_seq = 0
        self._unyielded = 0
        #: Paths named by events not yet compared (read, or in this batch's list).
        self._unsettled: set[bytes] = set()
        #: Files a mirror sent data of while an event for them was unsettled.
        self._raced: set[bytes] = set()

    # -- service ----------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Open the backend, then (started) scan or walk the tree and follow events.

        Raises:
            WatchError (from ``open_backend``) when the backend cannot be set up.
        """
        root = self.volume.backing_fd
        assert root is not None, "the agent opens the volume directory first"
        self.backend = await trio.to_thread.run_sync(open_backend, self.volume.path,
                                                     self.backend_name)
        log.info("watching volume", volume=self.volume.name, path=self.volume.path,
                 backend=self.backend.name, window_ms=round(self.window * 1000),
                 guarantee=GUARANTEE)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                task_status.started()
                await self._start()
                self.state = "watching"
                self.volume.index_ready.set()
                await self._reconcile_loop()
        except BaseException as exc:
            if self.state == "watching" and _only_cancelled(exc):
                # Shutdown: one last batch with whatever the kernel still holds, so the
                # index can be marked clean (see watch_index on racy rows).
                with trio.CancelScope(shield=True), trio.move_on_after(10) as final:
                    await self._final_batch()
                self._stopped_cleanly = not final.cancelled_caught
            raise
        finally:
            self.backend.close()

    async def _final_batch(self) -> None:
        assert self.backend is not None
        while True:
            with trio.move_on_after(0.05) as idle:
                self._events.extend(await self.backend.read())
            if idle.cancelled_caught:
                break
        async with self._batch_lock:
            await self._batch()

    def close(self) -> None:
        """Mark the index clean if the last batch ran at shutdown, and close it."""
        self.index.set_meta("clean", "1" if self._stopped_cleanly else "0")
        self.index.close()

    async def _start(self) -> None:
        self.index.set_meta("clean", "0")
        self.index.commit()
        started = time.monotonic()
        if self.first_start:
            self.state = "scanning"
            count = await self._walk(b"", send=False)
            self.index.set_meta("complete", "1")
            self.index.commit()
            self.startup = (f"first start: {count} entries indexed in "
                            f"{time.monotonic() - started:.2f} s; a mirror brings the "
                            f"target in sync")
        else:
            self.state = "resuming"
            before = self.stats.ops_sent
            async with self._batch_lock:
                count = await self._walk(b"", send=True)
                await self._commit()
            stop = ("a clean stop" if self.after_clean_stop else
                    "an unclean stop (recently changed files compared by content)")
            self.startup = (f"resumed from the index after {stop}: {count} entries compared "
                            f"by stat in {time.monotonic() - started:.2f} s, "
                            f"{self.stats.ops_sent - before} ops sent for changes made "
                            f"while stopped")
        log.info("watch volume ready", volume=self.volume.name, startup=self.startup)

    async def _read_loop(self) -> None:
        assert self.backend is not None
        while True:
            events = await self.backend.read()
            self.stats.events += len(events)
            if len(self._events) + len(events) > MAX_QUEUED_EVENTS:
                self._events.clear()
                self.stats.overflows += 1
                events = [WatchEvent("rescan", b"", reason="overflow (agent queue)")]
            self._events.extend(events)
            for event in events:
                self._unsettled.add(event.path)
                if event.new_path:
                    self._unsettled.add(event.new_path)
            self._arrived.unpark_all()

    async def _reconcile_loop(self) -> None:
        while True:
            while not (self._events or self._dirty or self._rescans):
                await self._arrived.park()
            await trio.sleep(self.window)
            async with self._batch_lock:
                await self._batch()

    async def settle(self) -> None:
        """Send every change made before this call (for a task queued next).

        Returns once every event the kernel had queued when it was called has been
        turned into journal ops; the caller appends right after, with no await in
        between, so its op follows them in the stream.
        """
        await self.volume.index_ready.wait()
        fd = _fileno(self.backend)
        # The reader may hold a rename's first half for up to PAIR_WAIT (inotify);
        # after that it has returned everything it read before this call.
        for _ in range(1000):
            if fd < 0 or not select.select([fd], [], [], 0)[0]:
                break
            await trio.sleep(0.001)     # the reader's turn
        await trio.sleep(2 * PAIR_WAIT)
        async with self._batch_lock:
            if self._events or self._dirty or self._rescans:
                await self._batch()

    # -- a batch ----------------------------------------------------------------------

    async def _batch(self) -> None:
        # A path leaves _dirty/_rescans only once handled: a batch cut short by the
        # shutdown leaves the rest to the final batch.
        events = list(self._events)
        self._events.clear()
        skip: set[int] = set()
        for i, event in enumerate(events):
            if i in skip:
                continue
            partner = _exchange_partner(events, i)
            if partner is not None:
                self._exchange(event.path, event.new_path)   # renameat2 RENAME_EXCHANGE
                skip.add(partner)
            else:
                self._absorb(event)
        done: list[bytes] = []
        for path in sorted(self._rescans):
            reason = self._rescans[path]
            if any(is_under(path, d) for d in done) or await self._guarded(
                    self._rescan(path, reason), path):
                done.append(path)
                self._rescans.pop(path, None)
        for path in sorted(self._dirty):
            self._unsettled.add(path)
            if any(is_under(path, d) for d in done) or await self._guarded(
                    self._reconcile(path, by_stat=False), path):
                self._dirty.pop(path, None)
        for path in sorted(self._touched_dirs):
            if await self._guarded(self._reconcile(path, by_stat=False), path):
                self._touched_dirs.discard(path)
        await self._commit()
        self._unsettled = {e.path for e in self._events} | {e.new_path for e in self._events}
        self._unsettled.update(self._dirty)

    def mirror_data(self, path: bytes) -> None:
        """A mirror sends data of ``path`` now (``Volume.on_mirror_data``).

        The row's hashes say what was sent before; the mirror sends what the file
        holds now. If an event for the file is still waiting, the change it stands
        for may be undone again before it is compared, and the comparison with the
        row would then find nothing to send while the target kept the mirror's copy.
        Such a file is sent whole at its next comparison instead.
        """
        pending = (path in self._unsettled or path in self._dirty
                   or any(is_under(path, r) for r in self._rescans))
        if not pending and self.backend is not None:
            fd = _fileno(self.backend)
            pending = fd >= 0 and bool(select.select([fd], [], [], 0)[0])
        if pending:
            self._raced.add(path)

    async def _guarded(self, work: Coroutine[Any, Any, None], path: bytes) -> bool:
        """Run one path's work; False after an OS error, which is logged and counted:
        the path stays pending for the next batch, and one bad entry never stops the
        watcher."""
        try:
            await work
            return True
        except OSError as exc:
            self.stats.errors += 1
            self.stats.last_error = {"path": _show(path), "error": str(exc),
                                     "time": time.time()}
            log.error("watch could not read an entry; it is retried with the next batch",
                      volume=self.volume.name, path=_show(path), error=str(exc))
            await trio.sleep(min(1.0, self.window * 10))   # no busy loop on a lasting error
            return False

    def _absorb(self, event: WatchEvent) -> None:
        if event.kind == "move":
            self._move(event.path, event.new_path, event.is_dir)
        elif event.kind == "rescan":
            self._rescans[event.path] = event.reason
            if event.reason.startswith(("overflow", "watch lost")):
                self.stats.overflows += event.reason.startswith("overflow")
                log.warning("watch events were lost; rescanning to catch up",
                            volume=self.volume.name, path=_show(event.path),
                            reason=event.reason, overflows=self.stats.overflows)
        else:
            self._dirty[event.path] = None

    def _move(self, old: bytes, new: bytes, is_dir: bool) -> None:
        # Pending paths under the old name are looked at under the new one too, and stay
        # pending: the old name may hold something else by now (an exchange, a create).
        for p in [p for p in self._dirty if is_under(p, old)]:
            self._dirty[new + p[len(old):]] = None
        for p, reason in [(p, r) for p, r in self._rescans.items() if is_under(p, old)]:
            self._rescans[new + p[len(old):]] = reason
        self._dirty[old] = None
        new_parent = new.rpartition(b"/")[0]
        parent_row = self.index.get(new_parent) if new_parent else None
        if self.index.get(old) is None or (new_parent and (parent_row is None
                                                           or parent_row.kind != "dir")):
            # Never sent (or already gone), or the new parent is not on the target yet
            # (the rename would find no directory there): compared as new instead.
            if is_dir:
                self._rescans[new] = "moved, not yet sent"
            else:
                self._dirty[new] = None
            return
        self._send(PrepareOp(new, "none", []))
        self._send(RenameOp(old, new, 0))
        self.index.move_tree(old, new)
        self.stats.renames += 1
        self._dirty[new] = None
        self._touch_parent(old)
        self._touch_parent(new)

    def _exchange(self, a: bytes, b: bytes) -> None:
        for path in (a, b):
            for p in [p for p in self._dirty if is_under(p, path)]:
                self._dirty[(b if path == a else a) + p[len(path):]] = None
            for p, reason in [(p, r) for p, r in self._rescans.items() if is_under(p, path)]:
                self._rescans[(b if path == a else a) + p[len(path):]] = reason
        self._dirty[a] = self._dirty[b] = None
        if self.index.get(a) is None or self.index.get(b) is None:
            # Not both on the target: each name is compared as what it holds now.
            self._rescans.setdefault(a, "exchanged, not yet sent")
            self._rescans.setdefault(b, "exchanged, not yet sent")
            return
        self._send(RenameOp(a, b, RENAME_EXCHANGE))
        self.index.exchange(a, b)
        self.stats.renames += 1
        self._touch_parent(a)
        self._touch_parent(b)

    async def _commit(self) -> None:
        """Make the batch's ops durable in the journal, then commit the index rows."""
        if self._failed:
            # Some op was not journaled: the connections need a mirror anyway (the
            # volume marked them), and rows for ops that were lost must not stay.
            self.index.rollback()
            self._failed = False
            return
        if self._last_seq:
            await self.volume.journal.sync(self._last_seq)
        self.index.commit()

    def _send(self, op: Op) -> None:
        seq = self.volume.record(op)
        if not seq:
            self._failed = True
            return
        self._last_seq = seq
        self.stats.ops_sent += 1

    def _touch_parent(self, path: bytes) -> None:
        parent = path.rpartition(b"/")[0]
        if parent:
            self._touched_dirs.add(parent)

    async def _checkpoint(self) -> None:
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()

    # -- walking ----------------------------------------------------------------------

    async def _rescan(self, path: bytes, reason: str) -> None:
        started = time.monotonic()
        before = self.stats.ops_sent
        self.stats.rescans += 1
        try:
            count = await self._walk(path, send=True)
        except _NotDirectory as exc:
            await self._reconcile(exc.path, by_stat=False)    # gone, or not a directory
            count = 1
        self.stats.last_rescan = {"path": _show(path), "reason": reason, "time": time.time(),
                                  "entries": count, "ops": self.stats.ops_sent - before,
                                  "seconds": round(time.monotonic() - started, 3)}
        # A rescan after lost events is news; one of a new directory is routine.
        lost = reason.startswith(("overflow", "watch lost"))
        (log.warning if lost else log.debug)("rescan done", volume=self.volume.name,
                                             **self.stats.last_rescan)

    async def _walk(self, path: bytes, *, send: bool) -> int:
        """Compare (or, without ``send``, just record) everything under the directory
        ``path``; rows under it with no entry left are removed. Returns entries seen."""
        top = self._open_dir(path)
        if path and send:
            # The directory itself first (it may be new), then its contents.
            try:
                parent, name = self._open_parent(path)
            except _NotDirectory:
                os.close(top)
                raise
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                await self._reconcile_at(parent, name, path, st, by_stat=True, walk=False)
            finally:
                os.close(parent)
        seen: set[bytes] = set()
        # Directories still to list, by path: holding a descriptor for each would run
        # out of them on a wide tree.
        pending: list[bytes] = []
        rel, dfd = path, top
        while True:
            try:
                # A listing or stat that fails for another reason than the entry being
                # gone raises: treating it as empty would remove the target's copy.
                names = sorted(os.fsencode(n) for n in os.listdir(dfd))
                for name in names:
                    child = rel + b"/" + name if rel else name
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    seen.add(child)
                    if send:
                        await self._reconcile_at(dfd, name, child, st, by_stat=True,
                                                 walk=False)
                    else:
                        await self._record(dfd, name, child, st)
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(child)
                    await self._checkpoint()
            finally:
                os.close(dfd)
            while pending:
                rel = pending.pop()
                try:
                    dfd = self._open_dir(rel)
                    break
                except _NotDirectory:
                    continue    # gone or replaced since: its own event follows
            else:
                break
        for gone in [p for p in self.index.under(path) if p not in seen]:
            if self.index.get(gone) is not None:   # not already removed with a parent
                self._remove(gone)
        return len(seen)

    def _open_dir(self, path: bytes) -> int:
        root = self.volume.backing_fd
        assert root is not None
        fd = os.dup(root)
        for i, part in enumerate(path.split(b"/") if path else []):
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                raise _NotDirectory(b"/".join(path.split(b"/")[:i + 1])) from exc
            finally:
                os.close(fd)
            fd = nxt
        return fd

    def _open_parent(self, path: bytes) -> tuple[int, bytes]:
        parent, _, name = path.rpartition(b"/")
        return self._open_dir(parent), name

    # -- one entry --------------------------------------------------------------------

    async def _reconcile(self, path: bytes, *, by_stat: bool) -> None:
        """Bring the target's ``path`` to what the tree holds there now."""
        try:
            dfd, name = self._open_parent(path)
        except _NotDirectory as exc:
            if exc.path != path:
                await self._reconcile(exc.path, by_stat=by_stat)
            return
        try:
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            await self._reconcile_at(dfd, name, path, st, by_stat=by_stat, walk=True)
        finally:
            os.close(dfd)

    async def _reconcile_at(self, dfd: int, name: bytes, path: bytes,
                            st: os.stat_result | None, *, by_stat: bool, walk: bool) -> None:
        self.stats.entries_checked += 1
        old = self.index.get(path)
        kind = entry_kind(st.st_mode) if st is not None else "none"
        if st is None or kind == "other":
            if old is not None:
                self._remove(path)
            return
        if old is not None and (old.kind != kind or old.ino != st.st_ino):
            # Another kind, or another inode under the same name (unlinked and made
            # again): replaced whole. Comparing it with the row would write into the
            # target's old inode, which other names may still share there.
            self._remove(path)
            old = None
        if old is None:
            await self._ensure_parents(path)
            old = self.index.get(path)    # sent with a new parent just now?
            if old is not None and old.kind != kind:
                self._remove(path)
                old = None
            self._touch_parent(path)
        if kind == "file":
            if by_stat and old is not None and old.same_stat(st, racy_ok=self.after_clean_stop):
                return
            if old is None and st.st_nlink > 1:
                old = self._link(path, st)    # then compared with the name it links to
            await self._sync_file(dfd, name, path, old)
        elif kind == "dir":
            self._sync_dir(dfd, name, path, st, old)
            if old is None and walk:
                try:
                    await self._walk(path, send=True)     # a new directory: its contents
                except _NotDirectory:
                    pass    # replaced since: its own event follows
        elif kind == "symlink":
            self._sync_symlink(dfd, name, path, st, old)
        else:
            self._sync_fifo(dfd, name, path, st, old)

    def _link(self, path: bytes, st: os.stat_result) -> IndexEntry | None:
        """A new name of a file already sent: a LINK to it, not a copy. Returns the row
        the new name now has on the target (the other name's), or None."""
        for other in self.index.with_ino(st.st_ino):
            if other.path == path:
                continue
            try:
                dfd, name = self._open_parent(other.path)
            except _NotDirectory:
                continue
            try:
                there = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                continue
            finally:
                os.close(dfd)
            if (there.st_ino, there.st_dev) != (st.st_ino, st.st_dev):
                continue
            self._send(PrepareOp(path, "none", []))
            self._send(LinkOp(other.path, path))
            # A create keeps the linked entry (several links: left as it is) and makes an
            # empty file where the link could not be made; the content is sent too (as
            # for "raced" in mirror_data): the other name's row says what was sent to
            # it, not what the target's inode holds after every later op on every name.
            self._raced.add(path)
            self._send(CreateOp(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                st.st_mtime_ns))
            other.path = path
            self.index.put(other)
            self._touch_parent(path)
            return other
        return None

    def _remove(self, path: bytes) -> None:
        self._send(PrepareOp(path, "none", []))
        self.index.remove_tree(path)
        self.stats.deletes += 1
        self._touch_parent(path)

    async def _ensure_parents(self, path: bytes) -> None:
        """Make every ancestor of ``path`` a directory on the target first. One the index
        does not hold as a directory is compared as a whole (it is new, or something
        else was there), which sends it with everything in it."""
        parts = path.split(b"/")[:-1]
        for i in range(len(parts)):
            parent = b"/".join(parts[:i + 1])
            row = self.index.get(parent)
            if row is not None and row.kind == "dir":
                continue
            await self._reconcile(parent, by_stat=False)
            return

    def _sync_dir(self, dfd: int, name: bytes, path: bytes, st: os.stat_result,
                  old: IndexEntry | None) -> None:
        mode = stat.S_IMODE(st.st_mode)
        items = xattr_items(dfd, name, "dir")
        digest = _xattr_state(items)
        if old is None:
            self._send(PrepareOp(path, "dir", [n for n, _ in items]))
            self._send(MkdirOp(path, mode, st.st_uid, st.st_gid, st.st_mtime_ns))
            self._send(ChmodOp(path, mode))
            self._send(ChownOp(path, st.st_uid, st.st_gid))
            for key, value in items:
                self._send(SetxattrOp(path, key, value, 0))
            self._send(UtimensOp(path, st.st_atime_ns, st.st_mtime_ns))
        else:
            self._send_meta(path, "dir", st, old, items, digest)
        self.index.put(_row(path, "dir", st, xattrs=digest))

    def _sync_symlink(self, dfd: int, name: bytes, path: bytes, st: os.stat_result,
                      old: IndexEntry | None) -> None:
        try:
            target = os.readlink(name, dir_fd=dfd)
        except OSError:
            return
        if (old is None or old.link != target or (old.uid, old.gid) != (st.st_uid, st.st_gid)
                or old.mtime_ns != st.st_mtime_ns):
            self._send(PrepareOp(path, "symlink", []))
            self._send(SymlinkOp(path, target, st.st_uid, st.st_gid, st.st_mtime_ns))
        self.index.put(_row(path, "symlink", st, link=target))

    def _sync_fifo(self, dfd: int, name: bytes, path: bytes, st: os.stat_result,
                   old: IndexEntry | None) -> None:
        items = xattr_items(dfd, name, "fifo")
        digest = _xattr_state(items)
        if old is None:
            self._send(PrepareOp(path, "fifo", [n for n, _ in items]))
            self._send(MknodOp(path, stat.S_IFIFO | stat.S_IMODE(st.st_mode), st.st_uid,
                               st.st_gid, st.st_mtime_ns))
            for key, value in items:
                self._send(SetxattrOp(path, key, value, 0))
        else:
            self._send_meta(path, "fifo", st, old, items, digest)
        self.index.put(_row(path, "fifo", st, xattrs=digest))

    def _send_meta(self, path: bytes, kind: str, st: os.stat_result, old: IndexEntry,
                   items: list[tuple[bytes, bytes]], digest: bytes) -> bool:
        """Ops for the metadata of ``path`` that differs from its row; True if any."""
        sent = False
        mode = stat.S_IMODE(st.st_mode)
        if digest != old.xattrs:
            # Names gone are removed one by one (a PREPARE would also unlink a file with
            # other hard links); new or changed values are set.
            before = dict(msgpack.unpackb(old.xattrs, use_list=True)) if old.xattrs else {}
            now = dict(items)
            for key in sorted(set(before) - set(now)):
                self._send(RemovexattrOp(path, key))
            for key, value in items:
                if before.get(key) != xxhash.xxh3_64_digest(value):
                    self._send(SetxattrOp(path, key, value, 0))
            sent = True
        if (st.st_uid, st.st_gid) != (old.uid, old.gid):
            self._send(ChownOp(path, st.st_uid, st.st_gid))
            sent = True
        if mode != old.mode or (sent and mode & (stat.S_ISUID | stat.S_ISGID)):
            self._send(ChmodOp(path, mode))    # after chown, which clears set-id bits
            sent = True
        if sent or st.st_mtime_ns != old.mtime_ns:
            self._send(UtimensOp(path, st.st_atime_ns, st.st_mtime_ns))
            sent = True
        return sent

    async def _sync_file(self, dfd: int, name: bytes, path: bytes,
                         old: IndexEntry | None) -> None:
        """Send what differs between the file and its row (all of it when new)."""
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError:
            return      # gone or replaced since the stat: its own event follows
        try:
            recorded = time.time_ns()
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            self.stats.files_read += 1
            if old is None:
                self._send(PrepareOp(path, "none", []))
                self._send(CreateOp(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                    st.st_mtime_ns))
            hashes = bytearray()
            changed = old is None
            # A file a mirror raced (see mirror_data): every block is sent, and its size.
            raced = path in self._raced
            self._raced.discard(path)
            against = None if raced else old
            known_size = None if raced else (old.size if old is not None else 0)
            for start in range(0, st.st_size, RANGE_BYTES):
                length = min(RANGE_BYTES, st.st_size - start)
                if length <= BLOCK_SIZE * 16:
                    blocks, digest = _compare_range(fd, start, length, against, known_size)
                else:
                    blocks, digest = await trio.to_thread.run_sync(
                        _compare_range, fd, start, length, against, known_size)
                self.stats.bytes_read += length
                hashes += digest
                for offset, data in blocks:
                    self._send(WriteOp(path, offset, data, st.st_mtime_ns))
                    self.stats.data_bytes_sent += len(data)
                    changed = True
            if raced or old is None or st.st_size != old.size:
                self._send(TruncateOp(path, st.st_size, st.st_mtime_ns))
                changed = True
            items = fd_xattr_items(fd)
            digest_x = _xattr_state(items)
            if old is None:
                for key, value in items:
                    self._send(SetxattrOp(path, key, value, 0))
                if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                    self._send(ChmodOp(path, stat.S_IMODE(st.st_mode)))
                self._send(UtimensOp(path, st.st_atime_ns, st.st_mtime_ns))
            elif self._send_meta(path, "file", st, old, items, digest_x):
                changed = True
            elif changed:
                self._send(UtimensOp(path, st.st_atime_ns, st.st_mtime_ns))
            self.index.put(_row(path, "file", st, xattrs=digest_x, hashes=bytes(hashes),
                                recorded_ns=recorded))
            if changed and st.st_nlink > 1:
                # A write, chmod, chown or xattr change through one name changes every
                # name of the inode, but the kernel reports only the name used: the
                # others are compared too (the target may hold them as separate files).
                # This ends: each is compared with its own row, so the name that changed
                # first finds nothing more to send.
                for other in self.index.with_ino(st.st_ino):
                    if other.path != path:
                        self._dirty[other.path] = None
        finally:
            os.close(fd)

    async def _record(self, dfd: int, name: bytes, path: bytes, st: os.stat_result) -> None:
        """First start: a row for the entry as it is, nothing sent."""
        kind = entry_kind(st.st_mode)
        if kind == "other":
            return
        if kind == "symlink":
            try:
                self.index.put(_row(path, kind, st, link=os.readlink(name, dir_fd=dfd)))
            except OSError:
                pass
            return
        if kind != "file":
            self.index.put(_row(path, kind, st, xattrs=_xattr_state(xattr_items(dfd, name,
                                                                               kind))))
            return
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError:
            return
        try:
            recorded = time.time_ns()
            st = os.fstat(fd)
            hashes = bytearray()
            for start in range(0, st.st_size, RANGE_BYTES):
                length = min(RANGE_BYTES, st.st_size - start)
                hashes += (await trio.to_thread.run_sync(_hash_range, fd, start, length)
                           if length > BLOCK_SIZE * 16 else _hash_range(fd, start, length))
            self.index.put(_row(path, "file", st, xattrs=_xattr_state(fd_xattr_items(fd)),
                                hashes=bytes(hashes), recorded_ns=recorded))
        finally:
            os.close(fd)

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        backend = self.backend
        return {
            "mode": "watch", "guarantee": GUARANTEE, "state": self.state,
            "backend": backend.name if backend else self.backend_name,
            "window_ms": round(self.window * 1000), "startup": self.startup,
            "pending_events": len(self._events), "events": self.stats.events,
            "overflows": self.stats.overflows + (backend.overflows if backend else 0),
            "lost_watches": backend.lost_watches if backend else 0,
            "watches": backend.watches if backend else 0,
            "rescans": self.stats.rescans, "last_rescan": self.stats.last_rescan,
            "entries_checked": self.stats.entries_checked, "files_read": self.stats.files_read,
            "bytes_read": self.stats.bytes_read, "ops_sent": self.stats.ops_sent,
            "data_bytes_sent": self.stats.data_bytes_sent, "renames": self.stats.renames,
            "deletes": self.stats.deletes, "errors": self.stats.errors,
            "last_error": self.stats.last_error, "index_entries": self.index.count(),
        }


def _compare_range(fd: int, start: int, length: int, old: IndexEntry | None,
                   known_size: int | None) -> tuple[list[tuple[int, bytes]], bytes]:
    """Read ``length`` bytes at ``start``; return the blocks that differ from ``old``
    (runs of adjacent ones merged, up to 1 MiB) and every block's hash.

    Whole blocks of zeros at or past ``known_size`` (the size the target's file is
    known to have; None: unknown) are not returned: the truncate that follows makes
    them (holes stay holes)."""
    data = os.pread(fd, length, start)
    view = memoryview(data)
    hashes = bytearray()
    runs: list[tuple[int, bytes]] = []
    old_blocks = len(old.hashes) // 8 if old is not None else 0
    old_size = old.size if old is not None else 0
    run_start = -1
    for pos in range(0, len(data), BLOCK_SIZE):
        block = view[pos:pos + BLOCK_SIZE]
        digest = xxhash.xxh3_64_digest(block)
        hashes += digest
        number = (start + pos) // BLOCK_SIZE
        same = (number < old_blocks and old is not None
                and old.block_hash(number) == digest and start + pos + len(block) <= old_size)
        skip = same or (known_size is not None and start + pos >= known_size
                        and len(block) == BLOCK_SIZE and digest == _ZERO_HASH)
        if skip:
            if run_start >= 0:
                runs.append((start + run_start, bytes(view[run_start:pos])))
                run_start = -1
        elif run_start < 0 or pos - run_start >= 16 * BLOCK_SIZE:
            if run_start >= 0:
                runs.append((start + run_start, bytes(view[run_start:pos])))
            run_start = pos
    if run_start >= 0:
        runs.append((start + run_start, bytes(view[run_start:])))
    return runs, bytes(hashes)


def _hash_range(fd: int, start: int, length: int) -> bytes:
    return b"".join(block_hashes(os.pread(fd, length, start)))


def _row(path: bytes, kind: str, st: os.stat_result, *, xattrs: bytes = b"", link: bytes = b"",
         hashes: bytes = b"", recorded_ns: int = 0) -> IndexEntry:
    return IndexEntry(path, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                      st.st_mtime_ns, st.st_ctime_ns, st.st_ino, xattrs, link, hashes,
                      recorded_ns or time.time_ns())


def _exchange_partner(events: list[WatchEvent], i: int) -> int | None:
    """The index of the other half of an exchange starting at ``events[i]``: the next
    event, not counting rescans of either name, being the same move backwards."""
    event = events[i]
    if event.kind != "move":
        return None
    for j in range(i + 1, len(events)):
        other = events[j]
        if other.kind == "rescan" and other.path in (event.path, event.new_path):
            continue
        if other.kind == "move" and (other.path, other.new_path) == (event.new_path,
                                                                      event.path):
            return j
        return None
    return None


def _only_cancelled(exc: BaseException) -> bool:
    """True for trio.Cancelled, or a group of nothing else (a cancelled nursery)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def _xattr_state(items: list[tuple[bytes, bytes]]) -> bytes:
    """What the index keeps of user xattrs: sorted (name, xxh3 of the value) pairs."""
    return msgpack.packb(sorted((k, xxhash.xxh3_64_digest(v)) for k, v in items),
                         use_bin_type=True) if items else b""


def _fileno(backend: WatchBackend | None) -> int:
    return backend.fileno() if backend is not None else -1


def _show(path: bytes) -> str:
    return path.decode(errors="surrogateescape") or "."
