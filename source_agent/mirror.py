"""Mirror, verify and orphans, in-stream (DESIGN §7).

A job walks the volume through the backing descriptor (never the mount) and turns
what it finds into ops appended to the volume journal, scoped to its one
connection. Reading an entry and appending the op made from it happen with no
await in between, on the same thread as capture, so each such op sits at the exact
point of the stream where the source had that state: live writes before it were
captured before the read, live writes after it come after it. Nothing needs to be
quiesced, and the target's answers (CHECK_RESULT) describe real differences.

Modes:
    full       every entry is sent whole (data extents only: holes stay holes)
    different  CHECK with size and mtime; a differing file is sent whole
    checksum   CHECK with xxh3 block hashes per 8 MiB range; only differing blocks
    verify     as checksum, but differences are reported (and repaired on remirror)
    orphans    CHECK of directory listings only; extra target entries are listed,
               removed or moved to a holding area outside the replica
``newer`` leaves target files whose mtime is newer. A restricted mirror (after an
unclean stop) checks only entries whose ctime is at or after a point in time.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
import trio
import trio.lowlevel

from protocol.checks import (
    BATCH_FILE_BYTES,
    BLOCK_SIZE,
    CHECK_FILES,
    RANGE_BYTES,
    block_hashes,
    entry_kind,
    orphan_checks,
    stat_meta,
    xattr_digest,
)
from protocol.frames import CheckResult
from protocol.ops import (
    CHECK_DIFFERENT,
    CHECK_LAST_RANGE,
    CHECK_NEWER,
    CheckOp,
    LinkOp,
    NoteOp,
    Op,
    PrepareOp,
    TruncateOp,
    WriteOp,
)
from protocol.runtime.entries import (
    dir_ops,
    entry_ops,
    fd_xattr_items,
    file_state,
    meta_ops,
    xattr_items,
)
from source_agent.registry import Connection
from source_agent.volume import Volume

log = structlog.get_logger("mirror")

WRITE_CHUNK: Final = 1024 * 1024
MAX_PENDING_CHECKS: Final = 4096
MAX_UNACKED_OPS: Final = 50_000
YIELD_EVERY: Final = 64
#: A CHECK_FILES batch: at most this many files, this many bytes of content read.
BATCH_NAMES: Final = 256
BATCH_BYTES: Final = 2 * 1024 * 1024


@dataclass
class PendingCheck:
    path: bytes
    entry: str
    offset: int
    issued: float
    result: dict[str, Any] | None = None
    #: For a CHECK_FILES batch (entry "files"): the file names under ``path``.
    names: list[bytes] = field(default_factory=list)


@dataclass
class Difference:
    path: bytes
    what: list[str]

    def public(self) -> dict[str, Any]:
        return {"path": self.path.decode(errors="surrogateescape"), "what": self.what}


@dataclass
class MirrorJob:
    """One mirror, verify or orphans pass over one connection."""

    conn: Connection
    volume: Volume
    kind: str                         # "mirror" | "verify" | "orphans"
    mode: str = "checksum"            # full | different | checksum (mirror)
    newer: bool = False
    orphans: str | None = None        # None | "list" | "remove" | "move"
    older_than_days: float | None = None
    remirror: bool = False
    restricted_since: float | None = None
    reason: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "starting"
    started: float = field(default_factory=time.time)
    ended: float | None = None
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_sent: int = 0
    checks: int = 0
    scan_complete: bool = False
    differences: list[Difference] = field(default_factory=list)
    difference_count: int = 0
    orphan_list: list[dict[str, Any]] = field(default_factory=list)
    orphans_removed: int = 0
    error: str = ""
    done: trio.Event = field(default_factory=trio.Event)
    _pending: dict[int, PendingCheck] = field(default_factory=dict)
    # Answers not yet handled. Never dropped: there are at most as many as checks
    # pending, and _pace bounds those.
    _answers: deque[tuple[int, dict[str, Any]]] = field(default_factory=deque)
    _answer_ready: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    #: Unparked whenever answers have been handled (pending checks went away).
    _settled: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    _unyielded: int = 0
    #: Directories known to exist on the target in this job (answered or sent).
    _dirs_ok: set[bytes] = field(default_factory=set)
    #: Hard-link groups: first path -> later paths waiting for the first to be in place.
    _link_waiting: dict[bytes, list[bytes]] = field(default_factory=dict)
    _link_ready: set[bytes] = field(default_factory=set)
    _leaders: set[bytes] = field(default_factory=set)
    _resume: trio.Event = field(default_factory=trio.Event)
    _paused: bool = False
    _links: dict[tuple[int, int], bytes] = field(default_factory=dict)
    _last_seq: int = 0
    _cancel: trio.CancelScope | None = None

    def __post_init__(self) -> None:
        self._resume.set()

    # -- control ----------------------------------------------------------------------

    def pause(self) -> None:
        if not self.done.is_set():
            self._paused = True
            self._resume = trio.Event()
            self.state = "paused"

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self.state = "scanning" if not self.scan_complete else "repairing"
            self._resume.set()

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    def status(self) -> dict[str, Any]:
        elapsed = max((self.ended or time.time()) - self.started, 1e-6)
        rate = self.bytes_done / elapsed
        percent = None
        eta = None
        if self.scan_complete and self.bytes_total:
            percent = round(100.0 * self.bytes_done / self.bytes_total, 1)
            if rate > 0 and not self.done.is_set():
                eta = round((self.bytes_total - self.bytes_done) / rate, 1)
        elif self.done.is_set():
            percent = 100.0
        return {
            "id": self.id, "conid": self.conn.id, "kind": self.kind, "mode": self.mode,
            "state": self.state, "reason": self.reason, "restricted":
                self.restricted_since is not None,
            "files_done": self.files_done, "files_total": self.files_total,
            "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
            "bytes_sent": self.bytes_sent, "checks": self.checks,
            "differences": self.difference_count, "orphans_found": len(self.orphan_list),
            "orphans_removed": self.orphans_removed, "percent": percent,
            "rate_bytes_per_s": round(rate), "eta_seconds": eta,
            "scan_complete": self.scan_complete, "error": self.error,
            "started": self.started, "ended": self.ended,
        }

    # -- results from the target ------------------------------------------------------

    def on_result(self, frame: CheckResult) -> None:
        """Called by the sender for every CHECK_RESULT of this connection."""
        if frame.result.get("job") != self.id:
            return
        self._answers.append((frame.seq, frame.result))
        self._answer_ready.unpark_all()

    # -- the job ----------------------------------------------------------------------

    async def run(self) -> None:
        """Walk, check, repair, until everything is answered and acknowledged."""
        fd = self.volume.backing_fd
        assert fd is not None
        log.info(f"{self.kind} started", conid=self.conn.id, mode=self.mode, reason=self.reason,
                 restricted=self.restricted_since is not None)
        try:
            with trio.CancelScope() as scope:
                self._cancel = scope
                if not self.volume.index_ready.is_set():
                    # A watch volume's first scan: a mirror reading before it could miss
                    # a change the scan records as already there (see watch.py).
                    self.state = "waiting for the watch scan"
                    await self.volume.index_ready.wait()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._answer_loop)
                    self.state = "scanning"
                    await self._walk(fd)
                    self.scan_complete = True
                    if self.state == "scanning":
                        self.state = "repairing"
                    await self._drain()
                    nursery.cancel_scope.cancel()
                if self.kind == "mirror":
                    self._emit(NoteOp("mirror-complete"))
                    await self._wait_acked(self._last_seq)
                    self.conn.mirror_required = False
                    self.conn.mirror_reason = ""
                    self.conn.restricted_since = None
                self.state = "done"
            if scope.cancelled_caught:
                self.state = "stopped"
        except Exception as exc:
            self.state = "failed"
            self.error = str(exc)
            log.exception(f"{self.kind} failed", conid=self.conn.id)
        finally:
            self.ended = time.time()
            self.done.set()
            log.info(f"{self.kind} ended", conid=self.conn.id, state=self.state,
                     files=self.files_done, bytes=self.bytes_done, sent=self.bytes_sent,
                     differences=len(self.differences), orphans=len(self.orphan_list))

    async def _pace(self, weight: int = 1, checks: bool = True) -> None:
        """Wait while paused or too far ahead of the target; yield to the other tasks
        every YIELD_EVERY units of work (not at every entry: a trip through trio's
        scheduler costs about as much as checking a small file).

        ``checks``: also bound the checks pending. False on the answer loop's own
        path, which is what makes pending checks go away (it must not wait for that).
        """
        journal = self.volume.journal
        if (not self._paused and not (checks and len(self._pending) >= MAX_PENDING_CHECKS)
                and journal.last_seq - self.conn.acked_seq <= MAX_UNACKED_OPS):
            self._unyielded += weight
            if self._unyielded >= YIELD_EVERY:
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
            return
        self._unyielded = 0
        await self._resume.wait()
        while ((checks and len(self._pending) >= MAX_PENDING_CHECKS)
               or journal.last_seq - self.conn.acked_seq > MAX_UNACKED_OPS):
            with trio.move_on_after(1.0):
                await self.conn.acked.park()
            await self._resume.wait()

    def _emit(self, op: Op) -> int:
        seq = self.volume.journal.append(op, scope=self.conn.id)
        self._last_seq = seq
        if self.volume.on_mirror_data is not None and isinstance(op, (WriteOp, TruncateOp)):
            self.volume.on_mirror_data(op.path)
        return seq

    def _check(self, op: CheckOp, path: bytes, entry: str, offset: int = 0,
               names: list[bytes] | None = None) -> None:
        seq = self._emit(op)
        self.checks += 1
        self._pending[seq] = PendingCheck(path, entry, offset, time.monotonic(),
                                          names=names or [])

    async def _walk(self, fd: int) -> None:
        for dirpath, dirnames, filenames, dfd in os.fwalk(b".", dir_fd=fd,
                                                           follow_symlinks=False):
            dirnames.sort()
            rel = dirpath[2:] if dirpath.startswith(b"./") else b""
            await self._pace()
            try:
                st = os.stat(b".", dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass   # gone since it was listed: its removal is in the stream
            else:
                self._visit_dir(rel, st, dfd, sorted(dirnames + filenames))
            if self.kind == "orphans":
                continue
            names = sorted(filenames)
            if self._batching():
                names = await self._check_batches(rel, dfd, names)
            for name in names:
                await self._pace()
                path = os.path.join(rel, name)
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue   # gone since it was listed: its unlink is in the stream
                if self.restricted_since is not None and st.st_ctime < self.restricted_since:
                    continue
                self.files_total += 1
                self.bytes_total += st.st_size if stat.S_ISREG(st.st_mode) else 0
                await self._visit(path, name, dfd, st)
                self.files_done += 1

    def _batching(self) -> bool:
        """Whether small files are checked many per CHECK (CHECK_FILES)."""
        return not self.newer and (self.kind == "verify" or (
            self.kind == "mirror" and self.mode in ("different", "checksum")))

    async def _check_batches(self, rel: bytes, dfd: int, names: list[bytes]) -> list[bytes]:
        """Check the small, singly linked regular files among ``names`` (files of the
        directory ``rel``) in CHECK_FILES batches; return the names left to visit one
        by one.

        Each batch reads its files and is appended with no await in between, so it
        is one point of the stream like any CHECK. A file that differs there is then
        checked alone (mirror different: sent whole if missing), so the answers and
        repairs are those of the per-file checks: only the unchanged majority of a
        tree is spared its own op and answer.
        """
        content = self.kind == "verify" or self.mode == "checksum"
        since = self.restricted_since
        rest: list[bytes] = []
        i = 0
        while i < len(names):
            await self._pace()
            batch: list[bytes] = []
            digests: list[bytes] = []
            size = 0
            while i < len(names) and len(batch) < BATCH_NAMES and size < BATCH_BYTES:
                name = names[i]
                i += 1
                found = file_state(dfd, name, content, BATCH_FILE_BYTES)
                if found == "missing":
                    continue   # gone since it was listed: its unlink is in the stream
                if isinstance(found, str) or found[0].st_nlink > 1:
                    rest.append(name)
                    continue
                st, digest = found
                if since is not None and st.st_ctime < since:
                    continue
                batch.append(name)
                digests.append(digest)
                size += st.st_size if content else 0
                self.files_total += 1
                self.files_done += 1
                self.bytes_total += st.st_size
                self.bytes_done += st.st_size
            if batch:
                flags = CHECK_FILES | (0 if content else CHECK_DIFFERENT)
                self._check(CheckOp(self.id, rel or b".", "dir", [0, 0, 0, 0, 0], b"", b"", 0,
                                    BLOCK_SIZE, digests, batch, b"", b"", flags),
                            rel, "files", names=batch)
                # A batch is a lot of work at once: let the sender pass it on now.
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
        return rest

    def _visit_dir(self, path: bytes, st: os.stat_result, dfd: int, names: list[bytes]) -> None:
        restricted = self.restricted_since is not None
        changed = not restricted or st.st_ctime >= self.restricted_since  # type: ignore[operator]
        if path and self.kind != "orphans" and changed:
            if self.kind == "mirror" and self.mode == "full":
                self._send_dir(path)
            else:
                self._check(self._meta_check(path, b".", dfd, st, "dir"), path, "dir")
        want_orphans = (self.kind == "orphans" or self.orphans == "remove") and changed
        if want_orphans:
            for op in orphan_checks(self.id, path, st, names):
                self._check(op, path, "dir-names")

    def _meta_check(self, path: bytes, name: bytes, dfd: int, st: os.stat_result,
                    entry: str) -> CheckOp:
        link = os.readlink(name, dir_fd=dfd) if entry == "symlink" else b""
        flags = CHECK_LAST_RANGE | (CHECK_NEWER if self.newer else 0)
        return CheckOp(self.id, path, entry, stat_meta(st), link, _xattrs_digest(dfd, name, entry),
                       0, BLOCK_SIZE, [], [], b"", b"", flags)

    async def _visit(self, path: bytes, name: bytes, dfd: int, st: os.stat_result) -> None:
        entry = entry_kind(st.st_mode)
        if entry == "other":
            return
        if entry == "file" and st.st_nlink > 1:
            first = self._links.setdefault((st.st_dev, st.st_ino), path)
            self._leaders.add(first)
            if first != path:
                # Linked only once the first name is in place on the target (after its
                # check is answered and repaired), or the link would find nothing.
                if first in self._link_ready or (self.kind == "mirror" and self.mode == "full"):
                    self._link(first, path)
                else:
                    self._link_waiting.setdefault(first, []).append(path)
                self.bytes_done += st.st_size
                return
        if self.kind == "mirror" and self.mode == "full":
            await self._send_entry(path)
            self.bytes_done += st.st_size if entry == "file" else 0
            return
        if await self._check_entry(path, name, dfd, st, entry):
            self.bytes_done += st.st_size if entry == "file" else 0

    async def _check_entry(self, path: bytes, name: bytes, dfd: int, st: os.stat_result,
                           entry: str, *, checks: bool = True) -> bool:
        """Check one entry: by its metadata (anything but a file, or any entry in the
        difference mode) or by its content ranges. True when it was a metadata check
        (the ranges count their own bytes). ``checks``: see :meth:`_check_file_ranges`."""
        if entry != "file" or (self.kind == "mirror" and self.mode == "different"):
            op = self._meta_check(path, name, dfd, st, entry)
            if entry == "file":
                op = CheckOp(op.job, op.path, op.entry, op.meta, op.link, op.xattrs, 0,
                             BLOCK_SIZE, [], [], b"", b"", op.flags | CHECK_DIFFERENT)
            self._check(op, path, entry)
            return True
        await self._check_file_ranges(path, name, dfd, checks=checks)
        return False

    async def _check_file_ranges(self, path: bytes, name: bytes, dfd: int,
                                 checks: bool = True) -> None:
        offset = 0
        while True:
            await self._pace(checks=checks)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except (FileNotFoundError, OSError):
                return
            try:
                # Read, hash and append with no await in between: one point in the stream.
                st = os.fstat(fd)
                data = os.pread(fd, RANGE_BYTES, offset)
                last = offset + len(data) >= st.st_size or len(data) < RANGE_BYTES
                flags = (CHECK_LAST_RANGE if last else 0) | (CHECK_NEWER if self.newer else 0)
                op = CheckOp(self.id, path, "file", stat_meta(st), b"",
                             xattr_digest(fd_xattr_items(fd)) if last else b"", offset,
                             BLOCK_SIZE, block_hashes(data), [], b"", b"", flags)
                self._check(op, path, "file", offset)
            finally:
                os.close(fd)
            self.bytes_done += len(data)
            if last:
                return
            offset += len(data)

    # -- answers and repairs ------------------------------------------------------------

    async def _answer_loop(self) -> None:
        while True:
            if not self._answers:
                with trio.move_on_after(1.0):
                    await self._answer_ready.park()
                if not self._answers:
                    await self._reissue_lost()
                    self._settled.unpark_all()
                    continue
            while self._answers:
                seq, result = self._answers.popleft()
                pending = self._pending.get(seq)
                if pending is not None:
                    # Removed only once its repair ops are appended, so _drain cannot
                    # finish between the answer and the repair.
                    await self._answered(pending, result)
                    self._pending.pop(seq, None)
            self._settled.unpark_all()
            await trio.lowlevel.checkpoint()

    async def _reissue_lost(self) -> None:
        """A check acked as applied but never answered lost its answer with its session
        (answers travel before the ACK covering them, on the same link)."""
        lost = [s for s in self._pending if s <= self.conn.acked_seq]
        for seq in lost:
            pending = self._pending.pop(seq)
            log.info("re-issuing a check whose answer was lost", conid=self.conn.id,
                     path=pending.path)
            await self._redo(pending)

    async def _redo(self, pending: PendingCheck) -> None:
        base = self.volume.backing_fd
        assert base is not None
        try:
            st = os.stat(pending.path or b".", dir_fd=base, follow_symlinks=False)
        except FileNotFoundError:
            return
        if pending.entry == "dir-names":
            return   # that range's orphans wait for the next pass
        if pending.entry == "files":
            for name in pending.names:
                await self._recheck(os.path.join(pending.path, name))
            return
        if pending.entry == "file" and self.kind == "mirror":
            await self._send_entry(pending.path)
        elif pending.entry == "file":
            self._note_difference(pending.path, ["unknown"])
        else:
            self._check(self._meta_check(pending.path, pending.path, base, st, pending.entry),
                        pending.path, pending.entry)

    def _link(self, first: bytes, path: bytes) -> None:
        self._ensure_parents(path)
        self._emit(PrepareOp(path, "file", []))
        self._emit(LinkOp(first, path))

    async def _recheck(self, path: bytes) -> None:
        """Check one file on its own, as the walk does when it does not batch it."""
        base = self.volume.backing_fd
        assert base is not None
        try:
            st = os.stat(path, dir_fd=base, follow_symlinks=False)
        except FileNotFoundError:
            return   # gone since: its unlink is in the stream
        entry = entry_kind(st.st_mode)
        if entry == "other":
            return
        await self._check_entry(path, path, base, st, entry, checks=False)

    async def _answered_files(self, pending: PendingCheck, result: dict[str, Any]) -> None:
        """A CHECK_FILES batch: missing files are differences like a per-file check's
        "missing"; the differing ones are checked alone to learn what differs."""
        files = result.get("files")
        names = pending.names
        if (isinstance(files, list) and len(files) == 2
                and all(isinstance(x, list) for x in files)):
            missing, differing = files
        else:   # a target that does not know CHECK_FILES: check every file alone
            missing, differing = [], list(range(len(names)))
        for index in missing:
            if not (isinstance(index, int) and 0 <= index < len(names)):
                continue
            path = os.path.join(pending.path, names[index])
            self.difference_count += 1
            if self.kind == "verify":
                self._note_difference(path, ["missing"])
            if self.kind != "verify" or self.remirror:
                await self._repair(PendingCheck(path, "file", 0, pending.issued),
                                   ["missing"], [])
        for index in differing:
            if isinstance(index, int) and 0 <= index < len(names):
                await self._recheck(os.path.join(pending.path, names[index]))

    async def _answered(self, pending: PendingCheck, result: dict[str, Any]) -> None:
        if pending.entry == "files":
            await self._answered_files(pending, result)
            return
        if "orphans" in result:
            await self._handle_orphans(pending.path, result["orphans"])
        what = list(result.get("what", []))
        if pending.entry == "dir" and not {"missing", "type"} & set(what):
            self._dirs_ok.add(pending.path)
        if what and not result.get("skip"):
            self.difference_count += 1
            if self.kind == "verify":   # the list only for verify: a mirror may fix 10^6
                self._note_difference(pending.path, what)
            if self.kind != "verify" or self.remirror:
                await self._repair(pending, what, result.get("blocks", []))
        if (pending.entry == "file" and pending.path in self._leaders
                and self._is_last_range(pending.path, pending.offset)):
            self._link_ready.add(pending.path)
            for later in self._link_waiting.pop(pending.path, []):
                if self.kind != "verify" or self.remirror:
                    self._link(pending.path, later)

    def _is_last_range(self, path: bytes, offset: int) -> bool:
        # The last range of a file is the highest offset still pending for it (or none).
        return not any(p.path == path and p.offset > offset for p in self._pending.values())

    def _ensure_parents(self, path: bytes) -> None:
        """Send the directories above ``path`` that this job has not seen on the target.

        A repair can run before the repair of its parent directory (its check was
        answered first, or the parent's answer was lost with a session); without
        this, creating the entry would find no parent.
        """
        parent = os.path.dirname(path)
        missing = []
        while parent and parent not in self._dirs_ok:
            missing.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            self._send_dir(directory)

    def _note_difference(self, path: bytes, what: list[str]) -> None:
        for diff in self.differences:
            if diff.path == path:
                diff.what = sorted(set(diff.what) | set(what))
                return
        self.differences.append(Difference(path, sorted(set(what))))

    async def _repair(self, pending: PendingCheck, what: list[str], blocks: list[int]) -> None:
        await self._resume.wait()
        whole = {"missing", "type", "link"} & set(what) or (
            pending.entry == "file" and "content" not in what and {"size", "mtime"} & set(what)
            and self.mode == "different")
        if whole or pending.entry != "file":
            if whole or pending.entry in ("symlink", "fifo"):
                await self._send_entry(pending.path)
            else:
                self._send_meta(pending.path, what)
            return
        base = self.volume.backing_fd
        assert base is not None
        try:
            fd = os.open(pending.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base)
        except OSError:
            return   # gone or replaced since: the live ops carry it
        try:
            st = os.fstat(fd)
            for index in blocks:
                offset = pending.offset + index * BLOCK_SIZE
                data = os.pread(fd, BLOCK_SIZE, offset)
                if data:
                    self._emit(WriteOp(pending.path, offset, data, st.st_mtime_ns))
                    self.bytes_sent += len(data)
        finally:
            os.close(fd)
        if {"size", "mode", "owner", "mtime", "xattrs"} & set(what):
            self._send_meta(pending.path, what)

    async def _handle_orphans(self, dir_path: bytes, orphans: list[list[Any]]) -> None:
        now = time.time()
        for name, kind, mtime in orphans:
            path = os.path.join(dir_path, name) if dir_path else name
            if self.older_than_days is not None and mtime > now - self.older_than_days * 86400:
                continue
            self.orphan_list.append({"path": path.decode(errors="surrogateescape"),
                                     "type": kind, "mtime": mtime})
            if self.orphans in ("remove", "move"):
                self._emit(PrepareOp(path, "none" if self.orphans == "remove" else "moveout", []))
                self.orphans_removed += 1

    async def _drain(self) -> None:
        # Woken by the answer loop when it has handled answers: waiting for an ACK
        # instead could miss the last answers (handled just after their ACK woke us).
        while self._pending:
            with trio.move_on_after(1.0):
                await self._settled.park()
        await self._wait_acked(self._last_seq)

    async def _wait_acked(self, seq: int) -> None:
        while self.conn.acked_seq < seq:
            with trio.move_on_after(1.0):
                await self.conn.acked.park()

    # -- sending entries whole ----------------------------------------------------------

    def _send_dir(self, path: bytes) -> None:
        base = self.volume.backing_fd
        assert base is not None
        self._dirs_ok.add(path)
        for op in dir_ops(base, path):
            self._emit(op)

    def _send_meta(self, path: bytes, what: list[str]) -> None:
        base = self.volume.backing_fd
        assert base is not None
        for op in meta_ops(base, path, what):
            self._emit(op)

    async def _send_entry(self, path: bytes) -> None:
        """Replace the target entry at ``path`` with the source's, whole, right now."""
        base = self.volume.backing_fd
        assert base is not None
        self._ensure_parents(path)
        try:
            st = os.stat(path, dir_fd=base, follow_symlinks=False)
        except FileNotFoundError:
            return   # gone since: its removal is in the stream
        if stat.S_ISDIR(st.st_mode):
            self._send_dir(path)
            return
        for _ in range(_RESEND_TRIES):
            ops = entry_ops(base, path)
            for op in ops:
                # Appended as soon as it was read; awaiting only after that keeps each
                # chunk at its point of the stream.
                self._emit(op)
                if isinstance(op, WriteOp):
                    self.bytes_sent += len(op.data)
                    await self._pace(weight=16, checks=False)
                    if not _same_inode(base, path, st):
                        # Replaced during the wait (an editor's rename over it, captured
                        # in the stream): the rest of the old file's ops (its size,
                        # times, xattrs) would land on the new one. Send the new one.
                        break
            else:
                break
            ops.close()
            try:
                st = os.stat(path, dir_fd=base, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(st.st_mode):
                self._send_dir(path)
                return
        if path in self._leaders:
            self._link_ready.add(path)


#: A file replaced this many times while it is being sent is left to the next pass.
_RESEND_TRIES: Final = 8


def _same_inode(base: int, path: bytes, st: os.stat_result) -> bool:
    try:
        now = os.stat(path, dir_fd=base, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def _xattrs_digest(dfd: int, name: bytes, entry: str) -> bytes:
    return xattr_digest(xattr_items(dfd, name, entry))
