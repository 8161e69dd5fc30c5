"""Kernel change notifications for watch mode, as events relative to the volume root.

Watch mode protects a directory without a FUSE mount: the consumer
(``source_agent/watch.py``) reconciles its index against the real tree for every path
reported here. It is state-based (it lstat()s and compares), so an event means "look
at this path now", never a fact to replay: reporting a path too often costs a stat,
reporting too little loses a change. Every place where events can be missing says so
with a ``rescan`` event (and a log line, and a counter).

Theory of operation
-------------------
``open_backend`` picks one of two backends; both turn one kernel read into a list of
:class:`WatchEvent` in kernel order.

* **fanotify** (preferred): one ``FAN_MARK_FILESYSTEM`` mark with
  ``FAN_REPORT_DFID_NAME``. Each event names a directory by file handle plus an entry
  name. A handle is resolved to a path with ``open_by_handle_at`` at *processing*
  time, so a path can be newer than the event (the directory may have been renamed
  since). Two rules keep that safe:

  1. The handle -> path cache is cleared whenever a directory rename is processed
     (a directory's path changes only by a rename of itself or of an ancestor), and on
     overflow.
  2. Every directory path used for an emitted event is remembered until the kernel
     queue is next found empty. A directory rename processed in that window whose new
     path is (an ancestor of) a remembered path gets an extra ``rescan`` of its new
     path: an earlier event may have been reported under the new name although it
     happened under the old one (a later event for ``Q/a`` when the change was to
     ``P/a`` before ``P`` became ``Q``). Why the window suffices: a resolution at
     time T sees exactly the renames queued before T; the queue is found empty only
     after all of them were processed, and the last rename before T that touched an
     ancestor of the resolved directory has a new path that is a prefix of it.

  The mark covers the whole file system, so events are filtered to paths equal to or
  under the root's real path.

* **inotify**: one watch per directory (added at open by a walk that never follows
  symlinks), kept as a tree of wds (parent wd + name) updated in event order, so a
  directory rename moves one node and its subtree follows. A new directory
  (created, or moved in from outside) gets its watch *before* it is listed, then each
  subdirectory the same way, then ``rescan(newdir)``: entries made before the watch
  existed are covered by the rescan, entries made after by the watch. Renames pair
  ``IN_MOVED_FROM``/``IN_MOVED_TO`` by cookie; an unpaired ``IN_MOVED_FROM`` waits at
  most ``PAIR_WAIT`` seconds for more events, then counts as moved out: "delete", and
  the watches of that subtree are removed so their stale wds stop reporting.

  Watches are added by path at processing time, so the kernel answers for the tree
  as it is *now*, while the queue may still hold older events (``mkdir a; mv a b;
  mkdir a`` read late: the watch added for the first ``a`` is on the second one).
  ``inotify_add_watch`` returns the wd of the directory now at that path; its node is
  re-attached there and whatever node the tree had there is displaced. Every such
  misplacement is undone by a later event of the same queue: the directory now at the
  path got there after the event being processed, and its arrival (create, move in,
  rename) is queued after it and re-attaches it. After a directory rename inside the
  volume, its known subtree is checked the same way (one ``inotify_add_watch`` per
  known subdirectory); a mismatch is walked and rescanned. An event from a displaced
  directory (place unknown; not expected) is reported as a rescan of the whole volume.
  On overflow the whole tree is walked again, which re-attaches every directory where
  it is now (repairing renames whose events were lost) and finds the new ones; wds no
  longer found are removed.

Ordering caveats for the consumer
---------------------------------
* fanotify merges queued events for the same directory+name by the same process into
  one (``FAN_CREATE|FAN_DELETE`` …); such a merged event is reported as "delete" then
  "dirty", whatever the real order was, and possibly before other events that followed
  it. lstat() tells the truth.
* A rename over an existing entry reports only the "move" (no "delete" of the target);
  ``RENAME_EXCHANGE`` reports two moves, a -> b and b -> a.
* "dirty" may name a path that no longer exists.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio

log = structlog.get_logger("watch")

#: How long (seconds) an unpaired IN_MOVED_FROM waits for its IN_MOVED_TO.
PAIR_WAIT = 0.010
#: Bytes per read(): inotify events are 16 + name bytes, fanotify ones ~60 + name.
_READ_SIZE = 256 * 1024
#: Handle -> path cache entries; the whole cache is cleared past this.
_CACHE_LIMIT = 4096
#: Directory paths remembered for the rename check (theory, rule 2); past this,
#: every directory rename inside the volume gets a rescan until the queue drains.
_USED_LIMIT = 4096

# fanotify_init/fanotify_mark errors that mean "not available here": fall back.
FALLBACK_ERRNOS = frozenset({errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.EXDEV,
                             errno.EOPNOTSUPP, errno.ENODEV})

# <linux/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_CLOEXEC = os.O_CLOEXEC
IN_NONBLOCK = os.O_NONBLOCK
#: Watches are added through an O_PATH descriptor's /proc link (the exact directory
#: that was opened with O_NOFOLLOW), so that link must be followed: no IN_DONT_FOLLOW.
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _proc_fd(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd


def _raise_fd_limit() -> None:
    """One descriptor per watched directory: let the soft limit go up to the hard one."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        pass


_IN_MASK = (IN_CREATE | IN_DELETE | IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB | IN_MOVED_FROM
            | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
            | IN_EXCL_UNLINK)
_FD_MASK = _IN_MASK & ~IN_DONT_FOLLOW
_IN_CHANGED = IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB

# <linux/fanotify.h>
FAN_MODIFY = 0x00000002
FAN_ATTRIB = 0x00000004
FAN_CLOSE_WRITE = 0x00000008
FAN_CREATE = 0x00000100
FAN_DELETE = 0x00000200
FAN_Q_OVERFLOW = 0x00004000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_REPORT_DIR_FID = 0x00000400
FAN_REPORT_NAME = 0x00000800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_MARK_ADD = 0x00000001
FAN_MARK_FILESYSTEM = 0x00000100
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME = 10
FAN_EVENT_INFO_TYPE_NEW_DFID_NAME = 12
FANOTIFY_METADATA_VERSION = 3
AT_FDCWD = -100
MAX_HANDLE_SZ = 128
# FAN_DELETE_SELF is not asked for: without FAN_REPORT_FID the kernel does not report
# it for a directory (seen on 6.18), and every deletion is also a FAN_DELETE in its
# parent, the root's included (its parent is on the marked file system too).
# FAN_RENAME (5.17+) carries the old and the new directory+name in one event, so a
# rename needs no pairing; FAN_MOVED_FROM/FAN_MOVED_TO would report the same rename
# twice more, as two halves without a cookie, so they are not asked for.
_FAN_MASK = (FAN_CREATE | FAN_DELETE | FAN_MODIFY | FAN_CLOSE_WRITE | FAN_ATTRIB | FAN_RENAME
             | FAN_ONDIR)
_FAN_CHANGED = FAN_CREATE | FAN_MODIFY | FAN_CLOSE_WRITE | FAN_ATTRIB
_FAN_NAMED = (FAN_EVENT_INFO_TYPE_DFID_NAME, FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
              FAN_EVENT_INFO_TYPE_NEW_DFID_NAME)
_FAN_HANDLE_TYPES = (FAN_EVENT_INFO_TYPE_DFID, *_FAN_NAMED)

_IN_HEADER = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len
_FAN_METADATA = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_FAN_INFO_HEADER = struct.Struct("=BBH")  # info_type, pad, len
_FAN_FSID_SIZE = 8  # __kernel_fsid_t
_FILE_HANDLE = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change under the volume root, normalized from either backend.

    Attributes:
        kind: ``"dirty"`` (created or changed: lstat it), ``"delete"`` (removed or moved
            out of the volume), ``"move"`` (renamed inside the volume from ``path`` to
            ``new_path``) or ``"rescan"`` (events under ``path`` may be missing).
        path: relative to the volume root, ``b"/"``-separated, no leading slash;
            ``b""`` is the root itself. The old path for a move.
        new_path: the new path of a move, else ``b""``.
        is_dir: True when the entry is known to be a directory.
        reason: why, for a rescan (``"overflow"``, ``"new directory"``, ``"moved in"``,
            ``"watch lost: ..."``, ``"directory renamed"``, ``"volume root deleted"``...).
    """

    kind: str
    path: bytes
    new_path: bytes = b""
    is_dir: bool = False
    reason: str = ""


class WatchError(OSError):
    """A backend cannot be set up or its kernel interface failed (errno says why)."""


class WatchBackend(Protocol):
    """What both backends offer: a stream of :class:`WatchEvent` lists.

    Attributes:
        name: ``"fanotify"`` or ``"inotify"``.
        overflows: kernel queue overflows seen (each reported as a root rescan).
        lost_watches: inotify watches that could not be added (0 for fanotify).
        watches: inotify watches held (1 for fanotify's single mark).
    """

    name: str
    overflows: int
    lost_watches: int
    watches: int

    async def read(self) -> list[WatchEvent]:
        """Wait for events and return those of one kernel read (never empty)."""
        ...

    def close(self) -> None:
        """Release the kernel objects; a pending read() gets ClosedResourceError."""
        ...

    def fileno(self) -> int:
        """The kernel queue's descriptor (-1 once closed), to poll for pending events."""
        ...


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def is_under(path: bytes, top: bytes) -> bool:
    """``path`` is ``top`` or inside it (a relative ``top`` of ``b""`` holds everything)."""
    return not top or path == top or path.startswith(top + b"/")


def _rescan(path: bytes, reason: str) -> WatchEvent:
    return WatchEvent("rescan", path, is_dir=True, reason=reason)


# -- libc ---------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_functions: dict[str, Any] = {}


def _libc_call(name: str, argtypes: tuple[Any, ...], *args: Any) -> int:
    """Call libc ``name``; a -1 return raises OSError with errno."""
    func = _functions.get(name)
    if func is None:
        func = getattr(_libc, name, None)
        if func is None:
            raise OSError(errno.ENOSYS, f"libc has no {name}")
        func.argtypes = argtypes
        func.restype = ctypes.c_int
        _functions[name] = func
    result = int(func(*args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def _inotify_init1(flags: int) -> int:
    return _libc_call("inotify_init1", (ctypes.c_int,), flags)


def _inotify_add_watch(fd: int, path: bytes, mask: int) -> int:
    return _libc_call("inotify_add_watch", (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32),
                      fd, path, mask)


def _inotify_rm_watch(fd: int, wd: int) -> None:
    _libc_call("inotify_rm_watch", (ctypes.c_int, ctypes.c_int), fd, wd)


def _fanotify_init(flags: int, event_f_flags: int) -> int:
    return _libc_call("fanotify_init", (ctypes.c_uint, ctypes.c_uint), flags, event_f_flags)


def _fanotify_mark(fd: int, flags: int, mask: int, dirfd: int, path: bytes) -> None:
    _libc_call("fanotify_mark", (ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                 ctypes.c_char_p), fd, flags, mask, dirfd, path)


def _name_to_handle_at(dirfd: int, path: bytes) -> bytes:
    """The file handle of ``path`` as a cache key: handle_type (i32) + f_handle."""
    buf = ctypes.create_string_buffer(_FILE_HANDLE.pack(MAX_HANDLE_SZ, 0), 8 + MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    _libc_call("name_to_handle_at", (ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_int),
               dirfd, path, ctypes.addressof(buf), ctypes.addressof(mount_id), 0)
    size, handle_type = _FILE_HANDLE.unpack_from(buf.raw)
    return struct.pack("=i", handle_type) + buf.raw[8:8 + size]


def _open_by_handle_at(mount_fd: int, key: bytes, flags: int) -> int:
    """Open the object of a handle key (see :func:`_name_to_handle_at`)."""
    handle = struct.pack("=I", len(key) - 4) + key
    return _libc_call("open_by_handle_at", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int),
                      mount_fd, handle, flags)


def _lost(what: str, exc: OSError) -> WatchError:
    err = exc.errno or errno.EIO
    return WatchError(err, f"{what}: {os.strerror(err)}")


# -- inotify ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class InotifyRecord:
    """One ``struct inotify_event``, name without its NUL padding."""

    wd: int
    mask: int
    cookie: int
    name: bytes


def parse_inotify(buf: bytes) -> list[InotifyRecord]:
    """Split one inotify read() into records.

    Raises:
        WatchError: (EIO) a record runs past the end of the buffer.
    """
    records: list[InotifyRecord] = []
    offset = 0
    while offset < len(buf):
        if len(buf) - offset < _IN_HEADER.size:
            raise WatchError(errno.EIO, "truncated inotify event header")
        wd, mask, cookie, length = _IN_HEADER.unpack_from(buf, offset)
        start = offset + _IN_HEADER.size
        if start + length > len(buf):
            raise WatchError(errno.EIO, "inotify event name runs past the read")
        name = buf[start:start + length].split(b"\0", 1)[0]
        records.append(InotifyRecord(wd, mask, cookie, name))
        offset = start + length
    return records


def _has_unpaired_move(records: list[InotifyRecord]) -> bool:
    """True when some IN_MOVED_FROM has no later IN_MOVED_TO with its cookie."""
    waiting: set[int] = set()
    for record in records:
        if record.mask & IN_MOVED_FROM:
            waiting.add(record.cookie)
        elif record.mask & IN_MOVED_TO:
            waiting.discard(record.cookie)
    return bool(waiting)


@dataclass(slots=True)
class _Dir:
    """A watched directory: where it is (parent wd, name) and its watched subdirectories.

    ``parent`` is ``_DETACHED`` for the root and for a directory whose place is unknown
    (displaced by another one, or deleted and waiting for its IN_IGNORED).
    """

    parent: int
    name: bytes
    children: dict[bytes, int] = field(default_factory=dict)


_DETACHED = -1
_MAX_DEPTH = 4096  # deeper than PATH_MAX allows: only a cycle gets there


class InotifyBackend:
    """Recursive inotify watches over ``root`` (see the module's theory of operation).

    The watched directories form a tree keyed by wd (parent wd + name), so a rename
    moves one node and its subtree follows. ``inotify_add_watch`` on a path returns
    the wd of the directory there *now*; the node of that wd is (re)attached at that
    path, so a watch added while the queue still holds older renames converges: the
    later events of the queue re-attach what an earlier one misplaced, and a renamed
    directory's known subtree is checked against the kernel after the rename.

    Args:
        root: the volume root directory.

    Raises:
        WatchError: no inotify instance, or the root itself cannot be watched.
    """

    name = "inotify"

    def __init__(self, root: str) -> None:
        self.overflows = 0
        self.lost_watches = 0
        self.watches = 0
        self._root = os.fsencode(os.path.realpath(root))
        self._dirs: dict[int, _Dir] = {}
        #: An O_PATH descriptor of each watched directory, by wd: its path is read from
        #: the kernel (/proc/self/fd) when an event is handled, as fanotify resolves
        #: handles, so events are named by where the directory is *now* whatever
        #: renames the queue still holds (see _path).
        self._fds: dict[int, int] = {}
        self._raw: list[InotifyRecord] = []  # read, waiting for a rename partner
        self._ready: list[WatchEvent] = []  # processed, not yet returned
        self._root_gone = False
        try:
            self._fd = _inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except OSError as exc:
            raise _lost("inotify_init1", exc) from exc
        _raise_fd_limit()
        try:
            # The root has no descriptor: one held open would keep its IN_DELETE_SELF
            # from coming (the kernel sends it when the inode goes), and its path is "".
            self._root_wd = _inotify_add_watch(self._fd, self._root, _IN_MASK)
            root_stat = os.stat(self._root)
        except OSError as exc:
            os.close(self._fd)
            raise _lost(f"inotify_add_watch {self._root!r}", exc) from exc
        self._root_id = (root_stat.st_dev, root_stat.st_ino)
        self._dirs[self._root_wd] = _Dir(_DETACHED, b"")
        self._watch_tree(self._root_wd, self._ready)
        self.watches = len(self._dirs)

    async def read(self) -> list[WatchEvent]:
        """Wait for changes and return the events of one read, in kernel order.

        Raises:
            trio.ClosedResourceError: the backend is (being) closed.
            trio.BusyResourceError: another task is already reading.
            WatchError: the inotify read failed.

        Cancellation: safe at any point; records already read are kept for the next
        call, none are lost.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._ready:
            if not self._raw:
                self._raw.extend(await self._read_records())
            deadline = trio.current_time() + PAIR_WAIT
            while _has_unpaired_move(self._raw) and trio.current_time() < deadline:
                with trio.move_on_at(deadline):
                    self._raw.extend(await self._read_records())
            records, self._raw = self._raw, []
            self._process(records, self._ready)
            self.watches = len(self._dirs)
        events, self._ready = self._ready, []
        await trio.lowlevel.cancel_shielded_checkpoint()
        return events

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Close the inotify instance (and with it every watch). Idempotent."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:  # not inside trio: nobody can be waiting
            pass
        os.close(fd)
        self._dirs.clear()
        for dfd in self._fds.values():
            os.close(dfd)
        self._fds.clear()
        self.watches = 0

    async def _read_records(self) -> list[InotifyRecord]:
        while True:
            if self._fd < 0:
                raise trio.ClosedResourceError("watch backend closed")
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as exc:
                raise _lost("inotify read", exc) from exc
            return parse_inotify(data)

    # -- events --

    def _process(self, records: list[InotifyRecord], out: list[WatchEvent]) -> None:
        move_to: dict[int, int] = {}  # cookie -> index of its IN_MOVED_TO
        for index, record in enumerate(records):
            if record.mask & IN_MOVED_TO:
                move_to.setdefault(record.cookie, index)
        paired: set[int] = set()
        misplaced_reported = False
        for index, record in enumerate(records):
            mask = record.mask
            if mask & IN_Q_OVERFLOW:
                self._overflow(out)
                continue
            if mask & IN_IGNORED:
                self._forget(record.wd, out)
                continue
            if record.wd not in self._dirs or index in paired:
                continue  # a removed (moved-out) subtree, or the second half of a move
            base = self._path(record.wd)
            if base is None and record.wd in self._fds:
                continue  # deleted, or not under the root now: its parent's events say so
            if base is None:
                # A displaced directory: where it is now is unknown until a later event
                # places it again. Its self events need no report (its parent's do).
                if mask & (_IN_CHANGED | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO) and not (
                        misplaced_reported):
                    misplaced_reported = True
                    log.warning("inotify event in a directory of unknown place",
                                root=self._root, wd=record.wd)
                    out.append(_rescan(b"", "watch paths inconsistent"))
                continue
            if not record.name:  # an event on the watched directory itself
                self._self_event(record.wd, base, mask, out)
                continue
            is_dir = bool(mask & IN_ISDIR)
            path = _join(base, record.name)
            if mask & IN_MOVED_FROM:
                partner = move_to.get(record.cookie, -1)
                target = records[partner] if partner > index else None
                new_base = self._path(target.wd) if target is not None else None
                if target is None or new_base is None:
                    if target is not None and not misplaced_reported:  # into a displaced one
                        misplaced_reported = True
                        log.warning("inotify event in a directory of unknown place",
                                    root=self._root, wd=target.wd)
                        out.append(_rescan(b"", "watch paths inconsistent"))
                    self._moved_out(record.wd, record.name, path, is_dir, out)
                else:
                    paired.add(partner)
                    new_path = _join(new_base, target.name)
                    out.append(WatchEvent("move", path, new_path, is_dir=is_dir))
                    if is_dir:
                        # Events read with this batch were named by where directories are
                        # now (see _path): some under it may already carry the new name.
                        out.append(_rescan(new_path, "directory renamed"))
                        self._moved_within(record.wd, record.name, target.wd, target.name,
                                           out)
            elif mask & IN_MOVED_TO:
                if is_dir:
                    self._new_directory(record.wd, record.name, "moved in", out)
                else:
                    out.append(WatchEvent("dirty", path))
            elif mask & IN_CREATE and is_dir:
                self._new_directory(record.wd, record.name, "new directory", out)
            elif mask & IN_DELETE:
                out.append(WatchEvent("delete", path, is_dir=is_dir))
                child = self._dirs[record.wd].children.pop(record.name, None) if is_dir else None
                if child is not None and child in self._dirs:
                    self._dirs[child].parent = _DETACHED  # its IN_IGNORED follows
                    # ... once the inode goes, which our descriptor would prevent.
                    self._close_fd(child)
            elif mask & _IN_CHANGED:
                out.append(WatchEvent("dirty", path, is_dir=is_dir))

    def _self_event(self, wd: int, base: bytes, mask: int, out: list[WatchEvent]) -> None:
        # A subdirectory's own DELETE_SELF/MOVE_SELF is reported by its parent's watch as
        # IN_DELETE / IN_MOVED_FROM; only the root has no parent watch.
        if wd == self._root_wd and mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
            reason = ("volume root deleted" if mask & IN_DELETE_SELF else
                      "volume root moved" if mask & IN_MOVE_SELF else "file system unmounted")
            self._root_gone = True
            log.error("watch: volume root changed", root=self._root, reason=reason)
            out.append(_rescan(b"", reason))
        elif mask & _IN_CHANGED:
            out.append(WatchEvent("dirty", base, is_dir=True))

    def _close_fd(self, wd: int) -> None:
        dfd = self._fds.pop(wd, None)
        if dfd is not None:
            os.close(dfd)

    def _forget(self, wd: int, out: list[WatchEvent]) -> None:
        if wd != self._root_wd:
            self._close_fd(wd)
        node = self._dirs.pop(wd, None)
        if node is None:
            return
        parent = self._dirs.get(node.parent)
        if parent is not None and parent.children.get(node.name) == wd:
            del parent.children[node.name]
        for child in node.children.values():
            if child in self._dirs:
                self._dirs[child].parent = _DETACHED
        if wd == self._root_wd and not self._root_gone:
            self.lost_watches += 1
            log.error("inotify watch lost", directory=self._root, error="root watch removed")
            out.append(_rescan(b"", "watch lost: volume root no longer watched"))

    def _moved_within(self, old_parent: int, old_name: bytes, new_parent: int,
                      new_name: bytes, out: list[WatchEvent]) -> None:
        child = self._dirs[old_parent].children.get(old_name)
        if child is not None:
            self._attach(child, new_parent, new_name)
        self._verify(new_parent, new_name, child, out)

    def _moved_out(self, parent: int, name: bytes, path: bytes, is_dir: bool,
                   out: list[WatchEvent]) -> None:
        out.append(WatchEvent("delete", path, is_dir=is_dir))
        child = self._dirs[parent].children.pop(name, None) if is_dir else None
        if child is not None:
            self._remove_tree([child])

    def _new_directory(self, parent: int, name: bytes, reason: str,
                       out: list[WatchEvent]) -> None:
        base = self._path(parent)
        if base is None:
            return
        added = self._add_watch(parent, name, out)
        if added is not None:
            self._watch_tree(added[0], out)
        out.append(_rescan(_join(base, name), reason))

    def _overflow(self, out: list[WatchEvent]) -> None:
        self.overflows += 1
        log.warning("watch queue overflow", backend=self.name, root=self._root,
                    overflows=self.overflows)
        # Walk everything again: directories created while events were dropped get
        # their watches, and every known one is re-attached where it is now.
        seen: set[int] = {self._root_wd}
        self._watch_tree(self._root_wd, out, seen)
        self._remove_tree([wd for wd in self._dirs if wd not in seen], recursive=False)
        out.append(_rescan(b"", "overflow"))

    # -- the tree --

    def _abs(self, rel: bytes) -> bytes:
        return _join(self._root, rel) if rel else self._root

    def _path(self, wd: int) -> bytes | None:
        """The relative path of a watched directory now, or None when it is not under
        the root (moved out, deleted) or its place is unknown."""
        if wd == self._root_wd:
            return b""
        dfd = self._fds.get(wd)
        if dfd is not None:
            try:
                where = os.readlink(_proc_fd(dfd))
                if where.endswith(b" (deleted)") and os.fstat(dfd).st_nlink == 0:
                    return None
            except OSError:
                return None
            if where == self._root:
                return b""
            if where.startswith(self._root + b"/"):
                return where[len(self._root) + 1:]
            return None
        return self._tree_path(wd)

    def _tree_path(self, wd: int) -> bytes | None:
        parts: list[bytes] = []
        for _ in range(_MAX_DEPTH):
            if wd == self._root_wd:
                return b"/".join(reversed(parts))
            node = self._dirs.get(wd)
            if node is None or node.parent == _DETACHED:
                return None
            parts.append(node.name)
            wd = node.parent
        return None

    def _attach(self, wd: int, parent: int, name: bytes) -> None:
        """Place ``wd`` at ``parent``/``name``; a directory that was there is displaced."""
        ancestor = parent
        for _ in range(_MAX_DEPTH):  # never under itself (a stale map could ask for it)
            if ancestor == wd:
                self._dirs[wd].parent = _DETACHED
                return
            if ancestor == self._root_wd or ancestor not in self._dirs:
                break
            ancestor = self._dirs[ancestor].parent
        node = self._dirs[wd]
        old_parent = self._dirs.get(node.parent)
        if old_parent is not None and old_parent.children.get(node.name) == wd:
            del old_parent.children[node.name]
        siblings = self._dirs[parent].children
        other = siblings.get(name)
        if other is not None and other != wd and other in self._dirs:
            self._dirs[other].parent = _DETACHED
        siblings[name] = wd
        node.parent, node.name = parent, name

    def _remove_tree(self, tops: list[int], *, recursive: bool = True) -> None:
        """Forget ``tops`` (and, if ``recursive``, their subtrees) and remove their watches."""
        stack = list(tops)
        while stack:
            wd = stack.pop()
            node = self._dirs.pop(wd, None) if wd != self._root_wd else None
            if node is None:
                continue
            self._close_fd(wd)
            parent = self._dirs.get(node.parent)
            if parent is not None and parent.children.get(node.name) == wd:
                del parent.children[node.name]
            if recursive:
                stack.extend(node.children.values())
            try:
                _inotify_rm_watch(self._fd, wd)
            except OSError:  # EINVAL: already gone (its IN_IGNORED is on its way)
                pass

    def _add_watch(self, parent: int, name: bytes,
                   out: list[WatchEvent]) -> tuple[int, bool] | None:
        """Watch directory ``parent``/``name``: (wd, was already watched), or None.

        A directory that is gone or no longer a directory is skipped quietly (its
        parent's events report that); any other failure is a lost watch: counted,
        logged, and reported as a rescan of the directory.
        """
        base = self._path(parent)
        if base is None:
            return None
        rel = _join(base, name)
        try:
            dfd = os.open(self._abs(rel), _PATH_FLAGS)
            try:
                wd = _inotify_add_watch(self._fd, _proc_fd(dfd), _FD_MASK)
            except OSError:
                os.close(dfd)
                raise
            if wd in self._fds:
                os.close(dfd)      # the same directory again: one descriptor per wd
            else:
                self._fds[wd] = dfd
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                self._check_root(out)
                return None
            err = exc.errno or errno.EIO
            self.lost_watches += 1
            log.error("inotify watch lost", directory=self._abs(rel),
                      errno=errno.errorcode.get(err, str(err)), error=os.strerror(err),
                      lost_watches=self.lost_watches)
            out.append(_rescan(rel, f"watch lost: {os.strerror(err)}"))
            return None
        if wd == self._root_wd:
            return None  # the root again, through a bind mount or a raced symlink
        known = wd in self._dirs
        if not known:
            self._dirs[wd] = _Dir(_DETACHED, name)
        self._attach(wd, parent, name)
        return wd, known

    def _check_root(self, out: list[WatchEvent]) -> None:
        """Report once when the root's path no longer leads to the root (an ancestor
        was renamed: watches are added by path, so new directories would go unwatched)."""
        if self._root_gone:
            return
        try:
            st = os.stat(self._root)
            moved = (st.st_dev, st.st_ino) != self._root_id
        except OSError:
            moved = True
        if moved:
            self._root_gone = True
            log.error("watch: volume root changed", root=self._root, reason="volume root moved")
            out.append(_rescan(b"", "volume root moved"))

    def _watch_tree(self, top: int, out: list[WatchEvent], seen: set[int] | None = None) -> None:
        """Watch every directory under the watched directory ``top``.

        Each directory is watched before it is listed, so an entry created in it is
        either in the listing (covered by the rescan the caller reports) or reported
        by its watch: the directory-creation race has no gap. Symlinks are not
        followed. ``seen`` collects the wds found.
        """
        stack = [top]
        visited = {top}
        while stack:
            wd = stack.pop()
            rel = self._path(wd)
            if rel is None:
                continue
            try:
                with os.scandir(self._abs(rel)) as entries:
                    names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone since: its parent's events say so
            except OSError as exc:
                err = exc.errno or errno.EIO
                log.error("watch: cannot list directory", directory=self._abs(rel),
                          error=os.strerror(err))
                out.append(_rescan(rel, f"listing failed: {os.strerror(err)}"))
                continue
            for name in names:
                added = self._add_watch(wd, name, out)
                if added is not None and added[0] not in visited:
                    visited.add(added[0])
                    stack.append(added[0])
        if seen is not None:
            seen.update(visited)

    def _verify(self, parent: int, name: bytes, expected: int | None,
                out: list[WatchEvent]) -> None:
        """After a rename, check the moved directory's known subtree against the kernel.

        A directory whose wd is not the one the tree expected there (its watch was
        added after later renames, or never) is re-attached, walked, and rescanned.
        """
        stack: list[tuple[int, bytes, int | None]] = [(parent, name, expected)]
        while stack:
            parent, name, expected = stack.pop()
            added = self._add_watch(parent, name, out)
            if added is None:
                continue  # gone again: the queue says where
            wd = added[0]
            if wd != expected:
                self._watch_tree(wd, out)
                out.append(_rescan(self._path(wd) or b"", "unwatched directory renamed"
                                   if expected is None else "watch paths repaired"))
                continue
            stack.extend((wd, n, c) for n, c in self._dirs[wd].children.items())


# -- fanotify -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FanotifyRecord:
    """One directory-handle info record: the handle as a cache key, and the name.

    ``name`` is None for ``FAN_EVENT_INFO_TYPE_DFID`` (an event on the directory itself).
    """

    info_type: int
    handle: bytes  # handle_type (i32) + f_handle
    name: bytes | None


@dataclass(frozen=True, slots=True)
class FanotifyEvent:
    """One ``struct fanotify_event_metadata`` with its directory-handle records.

    ``fd`` is FAN_NOFD (-1) with FID reporting; the backend closes any other.
    """

    mask: int
    fd: int
    records: tuple[FanotifyRecord, ...]

    def record(self, info_type: int) -> FanotifyRecord | None:
        """The first record of ``info_type``, if any."""
        for record in self.records:
            if record.info_type == info_type:
                return record
        return None


def parse_fanotify(buf: bytes) -> list[FanotifyEvent]:
    """Split one fanotify read() into events; records other than handles are skipped.

    Raises:
        WatchError: (EIO) a length field points outside its event or the buffer, or the
            metadata version is not the one this parser knows.
    """
    events: list[FanotifyEvent] = []
    offset = 0
    while offset < len(buf):
        if len(buf) - offset < _FAN_METADATA.size:
            raise WatchError(errno.EIO, "truncated fanotify event metadata")
        event_len, version, _, metadata_len, mask, fd, _ = _FAN_METADATA.unpack_from(buf, offset)
        if version != FANOTIFY_METADATA_VERSION:
            raise WatchError(errno.EIO, f"fanotify metadata version {version}, expected "
                                        f"{FANOTIFY_METADATA_VERSION}")
        end = offset + event_len
        if metadata_len < _FAN_METADATA.size or event_len < metadata_len or end > len(buf):
            raise WatchError(errno.EIO, "fanotify event length out of range")
        records: list[FanotifyRecord] = []
        position = offset + metadata_len
        while position < end:
            if end - position < _FAN_INFO_HEADER.size:
                raise WatchError(errno.EIO, "truncated fanotify info header")
            info_type, _, length = _FAN_INFO_HEADER.unpack_from(buf, position)
            if length < _FAN_INFO_HEADER.size or position + length > end:
                raise WatchError(errno.EIO, "fanotify info record length out of range")
            if info_type in _FAN_HANDLE_TYPES:
                records.append(_parse_handle_record(buf[position:position + length],
                                                    info_type))
            position += length
        events.append(FanotifyEvent(mask, fd, tuple(records)))
        offset = end
    return events


def _parse_handle_record(record: bytes, info_type: int) -> FanotifyRecord:
    start = _FAN_INFO_HEADER.size + _FAN_FSID_SIZE
    if len(record) < start + _FILE_HANDLE.size:
        raise WatchError(errno.EIO, "truncated fanotify file handle")
    size, handle_type = _FILE_HANDLE.unpack_from(record, start)
    handle_start = start + _FILE_HANDLE.size
    if size > MAX_HANDLE_SZ or handle_start + size > len(record):
        raise WatchError(errno.EIO, "fanotify file handle size out of range")
    handle = struct.pack("=i", handle_type) + record[handle_start:handle_start + size]
    if info_type not in _FAN_NAMED:
        return FanotifyRecord(info_type, handle, None)
    name, nul, _ = record[handle_start + size:].partition(b"\0")
    if not nul:
        raise WatchError(errno.EIO, "fanotify entry name without NUL")
    return FanotifyRecord(info_type, handle, name)


class FanotifyBackend:
    """One fanotify file-system mark, filtered to ``root`` (see the theory of operation).

    A new directory is reported as ``rescan(newdir, "new directory")``, like inotify
    does, though for another reason: the mark covers it at once (no creation race),
    but events in a directory that has been deleted by the time they are read cannot
    be resolved, so after ``rm -r d; mkdir d`` only "delete d" says that d's old
    entries are gone, and the rescan of the new ``d`` is what removes them. A
    directory moved in from outside the volume is ``rescan(newdir, "moved in")``.
    Events whose directory no longer exists are dropped: the deletion of that
    directory (or of its topmost deleted ancestor) is reported instead.

    Args:
        root: the volume root directory.

    Raises:
        WatchError: fanotify cannot be used here; ``errno`` in :data:`FALLBACK_ERRNOS`
            means "not supported/permitted" (old kernel, no CAP_SYS_ADMIN, a file
            system without file handles), anything else is a resource problem.
    """

    name = "fanotify"

    def __init__(self, root: str) -> None:
        self.overflows = 0
        self.lost_watches = 0
        self.watches = 0
        self._root = os.fsencode(os.path.realpath(root))
        self._prefix = self._root.rstrip(b"/") + b"/"
        self._cache: dict[bytes, bytes | None] = {}  # handle -> absolute dir path | gone
        self._used: set[bytes] = set()  # theory, rule 2
        self._used_overflowed = False
        self._fd = -1
        self._mount_fd = -1
        step = "open"
        try:
            self._mount_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            step = "name_to_handle_at"  # EOPNOTSUPP: a file system without file handles
            root_handle = _name_to_handle_at(AT_FDCWD, self._root)
            step = "open_by_handle_at"  # needs CAP_DAC_READ_SEARCH: check it now
            os.close(_open_by_handle_at(self._mount_fd, root_handle, os.O_PATH | os.O_CLOEXEC))
            step = "fanotify_init"
            self._fd = _fanotify_init(
                FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME,
                os.O_RDONLY | getattr(os, "O_LARGEFILE", 0))
            step = "fanotify_mark"
            _fanotify_mark(self._fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, _FAN_MASK, AT_FDCWD,
                           self._root)
        except OSError as exc:
            self.close()
            raise _lost(f"{step} {self._root!r}", exc) from exc
        self.watches = 1

    async def read(self) -> list[WatchEvent]:
        """Wait for changes under the root and return the events of one read.

        Reads until at least one event is about the volume (events elsewhere on the
        file system are dropped).

        Raises:
            trio.ClosedResourceError: the backend is (being) closed.
            trio.BusyResourceError: another task is already reading.
            WatchError: the fanotify read failed.

        Cancellation: safe; events are only taken from the kernel when they are
        processed and returned in the same step.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        events: list[WatchEvent] = []
        while not events:
            for event in parse_fanotify(await self._read_raw()):
                self._process(event, events)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return events

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Close the fanotify group (removing its mark). Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                trio.lowlevel.notify_closing(fd)
            except RuntimeError:  # not inside trio: nobody can be waiting
                pass
            os.close(fd)
        if self._mount_fd >= 0:
            os.close(self._mount_fd)
            self._mount_fd = -1
        self.watches = 0

    async def _read_raw(self) -> bytes:
        while True:
            if self._fd < 0:
                raise trio.ClosedResourceError("watch backend closed")
            try:
                return os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                # Queue empty: every rename queued before any remembered resolution has
                # been processed (theory, rule 2).
                self._used.clear()
                self._used_overflowed = False
                await trio.lowlevel.wait_readable(self._fd)
            except OSError as exc:
                raise _lost("fanotify read", exc) from exc

    def _process(self, event: FanotifyEvent, out: list[WatchEvent]) -> None:
        if event.fd >= 0:  # never with FID reporting; do not leak one anyway
            os.close(event.fd)
        mask = event.mask
        if mask & FAN_Q_OVERFLOW:
            self.overflows += 1
            self._cache.clear()  # renames may be among the lost events
            log.warning("watch queue overflow", backend=self.name, root=self._root,
                        overflows=self.overflows)
            out.append(_rescan(b"", "overflow"))
            return
        is_dir = bool(mask & FAN_ONDIR)
        if mask & FAN_RENAME:  # never merged with other events
            self._rename(event, is_dir, out)
            return
        record = (event.record(FAN_EVENT_INFO_TYPE_DFID_NAME)
                  or event.record(FAN_EVENT_INFO_TYPE_DFID))
        path = self._path(record, out) if record is not None else None
        if path is None:
            return
        if record is not None and record.name is None:
            is_dir = True  # an event on the directory itself
        # A merged event's parts have lost their order: "delete" first, then "dirty",
        # so that the last word is "look at it" (the module's ordering caveats).
        if mask & FAN_DELETE and path == b"":
            log.error("watch: volume root changed", root=self._root, reason="volume root deleted")
            out.append(_rescan(b"", "volume root deleted"))
        elif mask & FAN_DELETE:
            out.append(WatchEvent("delete", path, is_dir=is_dir))
        if mask & FAN_CREATE and is_dir and record is not None and record.name is not None:
            # Not for the creation race (the mark covers the new directory at once), but
            # for "rm -r d; mkdir d": the deletions of d's old entries name the handle
            # of a deleted directory, which no longer resolves, so only "delete d" is
            # reported; an lstat of the new d would not show that its entries are gone.
            out.append(_rescan(path, "new directory"))
        elif mask & _FAN_CHANGED:
            out.append(WatchEvent("dirty", path, is_dir=is_dir))

    def _rename(self, event: FanotifyEvent, is_dir: bool, out: list[WatchEvent]) -> None:
        old_record = event.record(FAN_EVENT_INFO_TYPE_OLD_DFID_NAME)
        new_record = event.record(FAN_EVENT_INFO_TYPE_NEW_DFID_NAME)
        old_abs = self._absolute(old_record, out) if old_record is not None else None
        new_abs = self._absolute(new_record, out) if new_record is not None else None
        old = self._relative(old_abs) if old_abs is not None else None
        new = self._relative(new_abs) if new_abs is not None else None
        if is_dir:
            self._cache.clear()  # paths under it (theory, rule 1)
        if is_dir and old_abs is not None and is_under(self._root, old_abs):
            # The root or one of its ancestors: every path from now on is outside.
            log.error("watch: volume root changed", root=self._root, reason="volume root moved",
                      renamed=old_abs)
            out.append(_rescan(b"", "volume root moved"))
        elif old is not None and new is not None:
            out.append(WatchEvent("move", old, new, is_dir=is_dir))
            if is_dir and self._maybe_reported_under(new):
                out.append(_rescan(new, "directory renamed"))
        elif old is not None:
            out.append(WatchEvent("delete", old, is_dir=is_dir))
        elif new is not None:
            out.append(_rescan(new, "moved in") if is_dir else WatchEvent("dirty", new))

    def _maybe_reported_under(self, rel: bytes) -> bool:
        """Whether an event since the last drain may have used ``rel``'s new name early."""
        if self._used_overflowed:
            return True
        top = self._prefix + rel
        return any(used == top or used.startswith(top + b"/") for used in self._used)

    def _path(self, record: FanotifyRecord, out: list[WatchEvent]) -> bytes | None:
        """The volume-relative path of a record, or None when outside or gone."""
        path = self._absolute(record, out)
        return self._relative(path) if path is not None else None

    def _absolute(self, record: FanotifyRecord, out: list[WatchEvent]) -> bytes | None:
        """The absolute path of a record (directory + name), or None once it is gone.

        The name is joined before filtering: the root's own deletion or rename is an
        event in its parent, outside the volume.
        """
        directory = self._resolve(record.handle, out)
        if directory is None:
            return None
        if self._relative(directory) is not None:
            if len(self._used) >= _USED_LIMIT:
                self._used_overflowed = True
            else:
                self._used.add(directory)
        if record.name is None or record.name == b".":
            return directory
        return directory.rstrip(b"/") + b"/" + record.name

    def _relative(self, path: bytes) -> bytes | None:
        if path == self._root:
            return b""
        if path.startswith(self._prefix):
            return path[len(self._prefix):]
        return None

    def _resolve(self, handle: bytes, out: list[WatchEvent]) -> bytes | None:
        """The current absolute path of a directory handle; None once it is deleted."""
        if handle in self._cache:
            return self._cache[handle]
        try:
            try:
                fd = _open_by_handle_at(self._mount_fd, handle, os.O_PATH | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno in (errno.ESTALE, errno.ENOENT):
                    raise
                # Seen once in a stress run: ENOMEM while directories were being removed
                # and renamed (the kernel reconnecting the path, racing). Retry once.
                fd = _open_by_handle_at(self._mount_fd, handle, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.ESTALE, errno.ENOENT):
                # Cannot tell where it happened (EMFILE, ENOMEM...): say so, loudly.
                err = exc.errno or errno.EIO
                log.error("watch: cannot resolve a directory handle", root=self._root,
                          error=os.strerror(err))
                out.append(_rescan(b"", f"handle not resolved: {os.strerror(err)}"))
                return None
            path: bytes | None = None
        else:
            try:
                # A removed directory may still open: it has no links then, and
                # readlink would give ".../name (deleted)".
                path = None if os.fstat(fd).st_nlink == 0 else os.readlink(
                    b"/proc/self/fd/%d" % fd)
            finally:
                os.close(fd)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[handle] = path
        return path


# -- choice -------------------------------------------------------------------------

def open_backend(root: str, backend: str = "auto") -> WatchBackend:
    """Start watching the directory tree at ``root``.

    Args:
        root: the volume root (a directory; symlinks in it are not followed).
        backend: ``"fanotify"``, ``"inotify"``, or ``"auto"``: fanotify when it can be
            set up, else inotify (logged with the reason, logger ``watch``).

    Returns:
        The backend; close it with ``close()``.

    Raises:
        ValueError: an unknown ``backend``.
        WatchError: the asked backend (for ``"auto"``: inotify, or fanotify failing
            for a reason other than "unsupported/not permitted") cannot be set up.
    """
    if backend not in ("auto", "fanotify", "inotify"):
        raise ValueError(f"unknown watch backend {backend!r} (auto, fanotify, inotify)")
    chosen: WatchBackend
    if backend == "inotify":
        chosen = InotifyBackend(root)
    else:
        try:
            chosen = FanotifyBackend(root)
        except WatchError as exc:
            if backend == "fanotify" or exc.errno not in FALLBACK_ERRNOS:
                raise
            log.warning("fanotify unavailable, falling back to inotify", root=root,
                        error=str(exc))
            chosen = InotifyBackend(root)
    log.info("watch backend", backend=chosen.name, root=root, watches=chosen.watches,
             lost_watches=chosen.lost_watches)
    return chosen
