"""Apply ops to a replica, one at a time and in seq order (DESIGN §5).

Theory of operation
-------------------
Every path goes through :class:`~target_agent.pathguard.PathGuard`, which gives a
parent-directory descriptor and a final name; the op is then done with an ``*at``
call that never follows a symlink (``O_NOFOLLOW``, ``follow_symlinks=False``, or an
``O_PATH | O_NOFOLLOW`` descriptor reached through ``/proc/self/fd/N``). So no op can
reach outside the replica root, even through a symlink planted in it.

Durability is the caller's business, through :meth:`Applier.sync`: the applier
remembers what it touched (dirty file descriptors, and a read-only descriptor on
every other inode and directory it changed, keyed by ``(st_dev, st_ino)``), and
``sync`` fsyncs each inode once. Every descriptor kept pins its inode, so a key can
never be reused by another file while it is held.

mtimes. Content-changing ops carry the source's mtime after the op. Setting it on
every write would double the syscalls, so the latest one per inode is kept
*pending* and set in ``sync`` (or earlier, when the descriptor that carries it is
closed). An explicit ``utimens`` drops the pending mtime of its inode first, so a
later-in-stream time always wins.

Replay idempotence. After a target crash the caller re-applies every op after the
last checkpoint, on a tree that already holds some or all of their effects:

* create/mknod/mkdir/symlink keep an existing entry (never truncating it). They
  set its owner, mode and mtime again only when it has the op's type and (unless
  a directory) a single link, so that an op interrupted between making the entry
  and setting its attributes completes on retry or replay; an entry of another
  type, or one reachable through other hard links, belongs to later ops of the
  stream, which are replayed too;
* unlink/rmdir tolerate a missing entry;
* ENOENT anywhere (the entry or one of its parent directories is missing) is
  tolerated and counted in ``tolerated_missing``: a replayed op on a name that a
  later op of the stream removed or renamed; the later op is replayed too;
* writes and truncates replayed in order over their own result give that result
  again (each byte ends with the last write covering it; a truncate resets what
  follows it);
* setxattr is applied without XATTR_CREATE/XATTR_REPLACE (they held on the source;
  replaying them would fail);
* link tolerates an existing name only when it is already the same inode.

rename, link and exchange are not idempotent (``Op.CHECKPOINT_AFTER``). The caller
must checkpoint right after each, *and right before each* (when anything was
applied since the last checkpoint). With the checkpoint after only, a crash between
applying one and that checkpoint replays the ops before it as well, and those can
remake its source as a new inode: ``unlink a; create a; link a b`` replayed finds
``b`` taken by the old inode (EEXIST), NOREPLACE likewise, and ``mkdir a; ...;
rename a b`` finds ``b`` not empty. With both, such an op is only ever replayed
alone: a replayed rename finds its source gone (ENOENT, tolerated) and a replayed
link finds its own link. A replayed exchange still swaps back; only a record of
the inodes on each side, kept with the checkpoint, could tell it was done.

Not thread-safe: one thread at a time uses an applier.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from protocol.ops import (
    CheckOp,
    ChmodOp,
    ChownOp,
    CreateOp,
    FallocateOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    NoteOp,
    Op,
    PrepareOp,
    RemovexattrOp,
    RenameOp,
    RmdirOp,
    SetxattrOp,
    SymlinkOp,
    TaskOp,
    TruncateOp,
    UnlinkOp,
    UtimensOp,
    WriteOp,
)
from target_agent.checker import prepare
from target_agent.pathguard import (
    DEFAULT_CACHE_SIZE,
    PathError,
    PathGuard,
    RootPath,
    show_path,
)

DEFAULT_FILE_CACHE_SIZE: Final = 256
DEFAULT_SYNC_FD_LIMIT: Final = 256

#: OS errors worth retrying with backoff; any other error is permanent.
TRANSIENT_ERRNOS: Final = frozenset(
    {errno.ENOSPC, errno.EIO, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EMFILE,
     errno.ENFILE, errno.ENOMEM, errno.EAGAIN}
)

_Inode = tuple[int, int]

_PATH_FLAGS: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Linux ABI numbers (include/uapi/linux/fcntl.h, falloc.h, stat.h).
_AT_SYMLINK_NOFOLLOW: Final = 0x100
_UTIME_OMIT: Final = (1 << 30) - 2
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10


class ApplyError(Exception):
    """An op could not be applied.

    ``permanent`` False means the cause may go away (disk full, I/O error, permission,
    read-only file system, descriptor exhaustion): retry the same op with backoff.
    ``permanent`` True means retrying cannot help (unsafe path, replica diverged from
    the source, failed fsync): stop the connection and require a remirror.
    ``errno`` is the OS error number when there is one.
    """

    def __init__(self, message: str, *, permanent: bool, errno: int | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.errno = errno


class _FsyncError(Exception):
    """fsync failed. Permanent whatever the errno: after a failed fsync Linux may have
    dropped the dirty pages and a retry would succeed without them."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc_renameat2: Any = _libc.renameat2
_libc_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc_renameat2.restype = ctypes.c_int
_libc_fallocate: Any = getattr(_libc, "fallocate64", None) or _libc.fallocate
_libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc_fallocate.restype = ctypes.c_int
_libc_utimensat: Any = _libc.utimensat
_libc_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec),
                            ctypes.c_int]
_libc_utimensat.restype = ctypes.c_int
_libc_futimens: Any = _libc.futimens
_libc_futimens.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]
_libc_futimens.restype = ctypes.c_int


_libc_syncfs: Any = _libc.syncfs
_libc_syncfs.argtypes = [ctypes.c_int]
_libc_syncfs.restype = ctypes.c_int
#: From this many inodes to make durable at a checkpoint, one syncfs(2) instead.
SYNCFS_AT = 16


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes, flags: int) -> None:
    """renameat2(2) (RENAME_NOREPLACE, RENAME_EXCHANGE). Raises OSError."""
    _check(_libc_renameat2(src_dir_fd, src, dst_dir_fd, dst, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode bits. Raises OSError."""
    _check(_libc_fallocate(fd, mode, offset, length))


def _timespec(ns: int | None) -> tuple[int, int]:
    return (0, _UTIME_OMIT) if ns is None else divmod(ns, 1_000_000_000)


def set_times(dir_fd: int, name: bytes | None, atime_ns: int | None, mtime_ns: int) -> None:
    """utimensat(2) without following a symlink; ``atime_ns`` None keeps the atime.

    ``name`` None sets the times of ``dir_fd`` itself (futimens). Raises OSError.
    """
    times = (_Timespec * 2)(_Timespec(*_timespec(atime_ns)), _Timespec(*_timespec(mtime_ns)))
    if name is None:
        _check(_libc_futimens(dir_fd, times))
    else:
        _check(_libc_utimensat(dir_fd, name, times, _AT_SYMLINK_NOFOLLOW))


def _proc_fd(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _wrong_type(st: os.stat_result) -> OSError:
    if stat.S_ISLNK(st.st_mode):
        return OSError(errno.ELOOP, "entry is a symlink, not a regular file")
    if stat.S_ISDIR(st.st_mode):
        return OSError(errno.EISDIR, "entry is a directory, not a regular file")
    return OSError(errno.EINVAL, "entry is not a regular file")


@dataclass(slots=True)
class _OpenFile:
    fd: int
    inode: _Inode
    dirty: bool = False


class Applier:
    """Apply ops to one replica root. Synchronous: run it in a worker thread."""

    def __init__(
        self,
        root: RootPath,
        *,
        file_cache_size: int = DEFAULT_FILE_CACHE_SIZE,
        dir_cache_size: int = DEFAULT_CACHE_SIZE,
        sync_fd_limit: int = DEFAULT_SYNC_FD_LIMIT,
    ) -> None:
        """Open the replica root, creating it with parents if missing.

        Args:
            root: the replica root directory.
            file_cache_size: writable file descriptors kept open (LRU).
            dir_cache_size: parent directory descriptors the path guard keeps (LRU).
            sync_fd_limit: touched inodes held for the next sync; past it they are
                fsynced early (harmless: durable sooner), between two ops, to bound open
                descriptors (one op may add up to ``file_cache_size`` + 3 more).

        Raises:
            OSError: the root cannot be created or opened.
            RuntimeError: /proc is not mounted (needed to act on O_PATH descriptors).
        """
        if file_cache_size < 1 or sync_fd_limit < 1:
            raise ValueError("cache sizes must be at least 1")
        if not os.path.isdir("/proc/self/fd"):
            raise RuntimeError("/proc is not mounted; the applier needs /proc/self/fd")
        self._guard = PathGuard(root, cache_size=dir_cache_size)
        self._file_cache_size = file_cache_size
        self._sync_fd_limit = sync_fd_limit
        self._files: OrderedDict[bytes, _OpenFile] = OrderedDict()
        # inode -> (cached descriptor carrying it, mtime to set); see module docstring.
        self._pending_mtime: dict[_Inode, tuple[int, int]] = {}
        # inode -> descriptor owned only so that sync() can fsync it.
        self._sync_fds: dict[_Inode, int] = {}
        #: Ops (or parts of ops) skipped because their entry or a parent was missing.
        self.tolerated_missing = 0
        self._handlers: dict[type[Op], Callable[[Any], None]] = {
            WriteOp: self._write,
            TruncateOp: self._truncate,
            FallocateOp: self._fallocate,
            CreateOp: self._create,
            MknodOp: self._mknod,
            MkdirOp: self._mkdir,
            SymlinkOp: self._symlink,
            UnlinkOp: self._unlink,
            RmdirOp: self._rmdir,
            RenameOp: self._rename,
            LinkOp: self._link,
            ChmodOp: self._chmod,
            ChownOp: self._chown,
            UtimensOp: self._utimens,
            SetxattrOp: self._setxattr,
            RemovexattrOp: self._removexattr,
            TaskOp: self._nothing,
            NoteOp: self._nothing,
            PrepareOp: self._prepare,
            CheckOp: self._nothing,     # compared by the caller (target_agent.checker)
        }
        #: Where PrepareOp "moveout" puts orphans (outside the replica); set by the owner.
        self.holding_dir: str | None = None

    # -- public API -------------------------------------------------------------

    @property
    def guard(self) -> PathGuard:
        """The path guard of this replica (its root descriptor, for the caller's own use)."""
        return self._guard

    def apply(self, op: Op) -> None:
        """Apply one op. TaskOp and NoteOp do nothing here (the caller runs tasks).

        The op's effect is in the replica's page cache, not yet durable: call
        :meth:`sync` before acknowledging it.

        Raises:
            ApplyError: ``permanent`` says whether retrying the op can help. A missing
                entry (ENOENT) is not an error: it is counted in ``tolerated_missing``.
        """
        handler = self._handlers.get(type(op))
        if handler is None:
            raise ApplyError(f"{op.kind}: not supported by the applier", permanent=True)
        try:
            self._bound_sync_fds()
            handler(op)
        except PathError as exc:
            raise ApplyError(f"{_describe(op)}: unsafe path: {exc.reason}",
                             permanent=True) from exc
        except _FsyncError as exc:
            raise ApplyError(f"{_describe(op)}: fsync failed: {exc.cause.strerror}",
                             permanent=True, errno=exc.cause.errno) from exc
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                self.tolerated_missing += 1
                return
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._guard.invalidate()
            raise ApplyError(f"{_describe(op)}: {exc.strerror or exc}",
                             permanent=exc.errno not in TRANSIENT_ERRNOS,
                             errno=exc.errno) from exc
        except (ValueError, OverflowError) as exc:
            raise ApplyError(f"{_describe(op)}: {exc}", permanent=True) from exc

    @staticmethod
    def needs_checkpoint(op: Op) -> bool:
        """True for rename and link: checkpoint right after ``op`` (and right before it,
        see the module docstring)."""
        return op.CHECKPOINT_AFTER

    def sync(self) -> None:
        """Make every op applied so far durable.

        Sets the pending mtimes, then fsyncs each touched file and directory once
        per inode, then forgets them.

        Raises:
            ApplyError: setting a time failed (``permanent`` as for apply), or an fsync
                failed (always permanent: the data may be lost, remirror).
        """
        try:
            self._flush_mtimes()
        except OSError as exc:  # nothing forgotten: a retried sync does it all again
            raise ApplyError(f"sync: setting an mtime failed: {exc.strerror or exc}",
                             permanent=exc.errno not in TRANSIENT_ERRNOS,
                             errno=exc.errno) from exc
        try:
            done: set[_Inode] = set()
            if len(self._sync_fds) + len(self._files) >= SYNCFS_AT:
                done = self._syncfs()
            for entry in self._files.values():
                if entry.dirty:
                    if entry.inode not in done:
                        _fsync(entry.fd)
                        done.add(entry.inode)
                    entry.dirty = False
            for inode, fd in self._sync_fds.items():
                if inode not in done:
                    _fsync(fd)
                    done.add(inode)
        except _FsyncError as exc:
            raise ApplyError(f"sync: fsync failed: {exc.cause.strerror}", permanent=True,
                             errno=exc.cause.errno) from exc
        finally:
            self._close_sync_fds()

    def close(self) -> None:
        """Close every descriptor without syncing (call :meth:`sync` first). Idempotent."""
        files, self._files = self._files, OrderedDict()
        for entry in files.values():
            os.close(entry.fd)
        self._pending_mtime.clear()
        self._close_sync_fds()
        self._guard.close()

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- content-changing ops -----------------------------------------------------

    def _write(self, op: WriteOp) -> None:
        entry = self._open_file(op.path)
        entry.dirty = True
        view = memoryview(op.data)
        offset = op.offset
        while view:
            written = os.pwrite(entry.fd, view, offset)
            if written <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            view = view[written:]
            offset += written
        self._mark_written(entry, op.mtime_ns)

    def _truncate(self, op: TruncateOp) -> None:
        entry = self._open_file(op.path)
        entry.dirty = True
        os.ftruncate(entry.fd, op.size)
        self._mark_written(entry, op.mtime_ns)

    def _fallocate(self, op: FallocateOp) -> None:
        entry = self._open_file(op.path)
        entry.dirty = True
        try:
            fallocate(entry.fd, op.mode, op.offset, op.length)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            _emulate_fallocate(entry.fd, op.mode, op.offset, op.length, exc)
        self._mark_written(entry, op.mtime_ns)

    def _mark_written(self, entry: _OpenFile, mtime_ns: int) -> None:
        self._pending_mtime[entry.inode] = (entry.fd, mtime_ns)

    # -- entry-creating ops -------------------------------------------------------
    #
    # Every op registers what it is about to change for the next sync *before*
    # changing it: an op that fails halfway (and is retried, or replayed after a
    # crash, and then finds its work done) still gets it fsynced.

    def _create(self, op: CreateOp | MknodOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        mode = stat.S_IMODE(op.mode)
        self._touch_dir(parent_fd)
        try:
            fd = os.open(name, _CREATE_FLAGS, mode, dir_fd=parent_fd)
        except FileExistsError:
            self._set_entry_attrs(parent_fd, name, stat.S_IFREG, op.uid, op.gid, mode,
                                  op.mtime_ns, existing=True)
            return
        entry = self._cache_file(op.path, fd, os.fstat(fd))
        entry.dirty = True
        os.fchown(fd, op.uid, op.gid)
        os.fchmod(fd, mode)  # after chown, which may clear set-id bits; and no umask
        set_times(fd, None, None, op.mtime_ns)

    def _mknod(self, op: MknodOp) -> None:
        kind = stat.S_IFMT(op.mode)
        if kind == stat.S_IFREG:
            self._create(op)
            return
        if kind != stat.S_IFIFO:
            raise OSError(errno.EINVAL, "mknod may only make regular files and FIFOs")
        parent_fd, name = self._guard.open_parent(op.path)
        self._touch_dir(parent_fd)
        try:
            os.mknod(name, stat.S_IFIFO | stat.S_IMODE(op.mode), 0, dir_fd=parent_fd)
            existing = False
        except FileExistsError:
            existing = True
        self._set_entry_attrs(parent_fd, name, stat.S_IFIFO, op.uid, op.gid,
                              stat.S_IMODE(op.mode), op.mtime_ns, existing=existing)

    def _mkdir(self, op: MkdirOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        self._touch_dir(parent_fd)
        try:
            os.mkdir(name, stat.S_IMODE(op.mode), dir_fd=parent_fd)
            existing = False
        except FileExistsError:
            existing = True
        self._set_entry_attrs(parent_fd, name, stat.S_IFDIR, op.uid, op.gid,
                              stat.S_IMODE(op.mode), op.mtime_ns, existing=existing)

    def _symlink(self, op: SymlinkOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        self._touch_dir(parent_fd)
        try:
            os.symlink(op.target, name, dir_fd=parent_fd)
            existing = False
        except FileExistsError:
            existing = True
        self._set_entry_attrs(parent_fd, name, stat.S_IFLNK, op.uid, op.gid, None,
                              op.mtime_ns, existing=existing)

    def _set_entry_attrs(self, parent_fd: int, name: bytes, kind: int, uid: int, gid: int,
                         mode: int | None, mtime_ns: int, *, existing: bool) -> None:
        """Owner, then mode, then mtime of an entry made by the op.

        ``existing``: the name was taken (replay, or a retry after a failure halfway
        through this op). The attributes are set again only when the entry has the
        op's type and, unless a directory, a single link: then it can only be this
        op's own entry. Anything else is kept as it is (module docstring).
        """
        pfd = os.open(name, _PATH_FLAGS, dir_fd=parent_fd)
        try:
            st = os.fstat(pfd)
            if stat.S_IFMT(st.st_mode) != kind:
                if existing:
                    return
                raise OSError(errno.EEXIST, "the new entry was replaced")
            if existing and kind != stat.S_IFDIR and st.st_nlink > 1:
                return
            self._touch_inode(pfd, st, parent_fd)
            os.chown(name, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
            if mode is not None:
                os.chmod(_proc_fd(pfd), mode)
            set_times(parent_fd, name, None, mtime_ns)
        finally:
            os.close(pfd)

    # -- namespace ops ------------------------------------------------------------

    def _unlink(self, op: UnlinkOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        self._touch_dir(parent_fd)
        cached = self._files.pop(op.path, None)
        try:
            os.unlink(name, dir_fd=parent_fd)
        finally:
            if cached is not None:
                self._release_file(cached, unlinked=True)

    def _rmdir(self, op: RmdirOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        try:
            self._touch_dir(parent_fd)
            os.rmdir(name, dir_fd=parent_fd)
        finally:
            self._guard.invalidate()

    def _rename(self, op: RenameOp) -> None:
        # Cached file descriptors are keyed by path, which a rename changes (for a
        # whole subtree when a directory moves): drop them all.
        self._drop_files()
        try:
            (old_fd, old_name), (new_fd, new_name) = self._guard.open_parents(op.old, op.new)
            self._touch_dir(old_fd)
            self._touch_dir(new_fd)
            if op.flags:
                renameat2(old_fd, old_name, new_fd, new_name, op.flags)
            else:
                os.rename(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
        finally:
            self._guard.invalidate()

    def _link(self, op: LinkOp) -> None:
        (old_fd, old_name), (new_fd, new_name) = self._guard.open_parents(op.old, op.new)
        self._touch_dir(new_fd)
        with self._entry(old_fd, old_name) as (pfd, st):
            self._touch_inode(pfd, st, old_fd)  # its link count changes
        try:
            os.link(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd,
                    follow_symlinks=False)
        except FileExistsError:
            old = os.stat(old_name, dir_fd=old_fd, follow_symlinks=False)
            new = os.stat(new_name, dir_fd=new_fd, follow_symlinks=False)
            if (old.st_dev, old.st_ino) != (new.st_dev, new.st_ino):
                raise OSError(errno.EEXIST, "new name exists and is another entry") from None

    # -- attribute ops ------------------------------------------------------------

    @contextmanager
    def _entry(self, parent_fd: int, name: bytes) -> Iterator[tuple[int, os.stat_result]]:
        """An O_PATH descriptor on the entry itself (never its symlink target)."""
        pfd = os.open(name, _PATH_FLAGS, dir_fd=parent_fd)
        try:
            yield pfd, os.fstat(pfd)
        finally:
            os.close(pfd)

    def _chmod(self, op: ChmodOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        with self._entry(parent_fd, name) as (pfd, st):
            if stat.S_ISLNK(st.st_mode):
                return  # a symlink has no mode of its own on Linux
            self._touch_inode(pfd, st, parent_fd)
            os.chmod(_proc_fd(pfd), stat.S_IMODE(op.mode))

    def _chown(self, op: ChownOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        with self._entry(parent_fd, name) as (pfd, st):
            self._touch_inode(pfd, st, parent_fd)
            os.chown(name, op.uid, op.gid, dir_fd=parent_fd, follow_symlinks=False)

    def _utimens(self, op: UtimensOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        with self._entry(parent_fd, name) as (pfd, st):
            self._touch_inode(pfd, st, parent_fd)
            self._pending_mtime.pop((st.st_dev, st.st_ino), None)  # this time wins
            set_times(parent_fd, name, op.atime_ns, op.mtime_ns)

    def _setxattr(self, op: SetxattrOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        with self._entry(parent_fd, name) as (pfd, st):
            if stat.S_ISLNK(st.st_mode):
                return  # user.* xattrs cannot be set on a symlink
            self._touch_inode(pfd, st, parent_fd)
            # No XATTR_CREATE/REPLACE: they held on the source, and a replay must not fail.
            os.setxattr(_proc_fd(pfd), op.name, op.value, 0)

    def _removexattr(self, op: RemovexattrOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        with self._entry(parent_fd, name) as (pfd, st):
            if stat.S_ISLNK(st.st_mode):
                return
            self._touch_inode(pfd, st, parent_fd)
            try:
                os.removexattr(_proc_fd(pfd), op.name)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise

    def _prepare(self, op: PrepareOp) -> None:
        parent_fd, name = self._guard.open_parent(op.path)
        try:
            os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            # Nothing there (every file of a full mirror into an empty replica): nothing
            # is removed or moved, so the cached descriptors and parents stay valid.
            self._touch_dir(parent_fd)
            return
        # Entries may be removed or moved: cached descriptors and parents are stale.
        self._drop_files()
        try:
            parent_fd, _ = self._guard.open_parent(op.path)
            self._touch_dir(parent_fd)
            prepare(self._guard, op, self.holding_dir)
        finally:
            self._guard.invalidate()

    def _nothing(self, op: Op) -> None:
        pass

    # -- writable file cache ------------------------------------------------------

    def _open_file(self, path: bytes) -> _OpenFile:
        entry = self._files.get(path)
        if entry is not None:
            self._files.move_to_end(path)
            return entry
        parent_fd, name = self._guard.open_parent(path)
        found = self._open_regular(parent_fd, name)
        if isinstance(found, os.stat_result):
            raise _wrong_type(found)
        return self._cache_file(path, *found)

    def _open_regular(
        self, parent_fd: int, name: bytes
    ) -> tuple[int, os.stat_result] | os.stat_result:
        """Open an existing regular file for writing, or return the stat of what is there.

        Goes through an O_PATH descriptor so that opening never follows a symlink and
        never opens a FIFO or a device node planted in the replica.
        """
        pfd = os.open(name, _PATH_FLAGS, dir_fd=parent_fd)
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode):
                return st
            return os.open(_proc_fd(pfd), os.O_WRONLY | os.O_CLOEXEC), st
        finally:
            os.close(pfd)

    def _cache_file(self, path: bytes, fd: int, st: os.stat_result) -> _OpenFile:
        old = self._files.pop(path, None)
        if old is not None:
            self._release_file(old)
        while len(self._files) >= self._file_cache_size:
            _, evicted = self._files.popitem(last=False)
            self._release_file(evicted)
        entry = _OpenFile(fd, (st.st_dev, st.st_ino))
        self._files[path] = entry
        return entry

    def _release_file(self, entry: _OpenFile, *, unlinked: bool = False) -> None:
        """Close a cached descriptor; its pending mtime is set, its dirt kept for sync."""
        try:
            pending = self._pending_mtime.get(entry.inode)
            if pending is not None and pending[0] == entry.fd:
                del self._pending_mtime[entry.inode]
                set_times(entry.fd, None, None, pending[1])
            if (entry.dirty and entry.inode not in self._sync_fds
                    and not (unlinked and os.fstat(entry.fd).st_nlink == 0)):
                self._sync_fds[entry.inode] = entry.fd
                entry.fd = -1
        finally:
            if entry.fd >= 0:
                os.close(entry.fd)

    def _drop_files(self) -> None:
        files, self._files = self._files, OrderedDict()
        for entry in files.values():
            self._release_file(entry)

    def flush_times(self) -> None:
        """Set the pending mtimes of written files now (no fsync), e.g. before a check."""
        self._flush_mtimes()

    def _flush_mtimes(self) -> None:
        while self._pending_mtime:
            inode, (fd, mtime_ns) = next(iter(self._pending_mtime.items()))
            set_times(fd, None, None, mtime_ns)
            del self._pending_mtime[inode]

    # -- touched inodes, for sync -------------------------------------------------

    def _touch_dir(self, dir_fd: int) -> None:
        st = os.fstat(dir_fd)
        inode = (st.st_dev, st.st_ino)
        if inode not in self._sync_fds:
            self._sync_fds[inode] = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                            dir_fd=dir_fd)

    def _touch_inode(self, path_fd: int, st: os.stat_result, parent_fd: int) -> None:
        """Remember an inode whose metadata changed, through its O_PATH descriptor.

        Only regular files and directories can be opened to fsync; a symlink or FIFO
        is made durable through its parent directory, as far as the file system allows.
        """
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            self._touch_dir(parent_fd)
            return
        inode = (st.st_dev, st.st_ino)
        if inode not in self._sync_fds:
            self._sync_fds[inode] = os.open(_proc_fd(path_fd), os.O_RDONLY | os.O_CLOEXEC)

    def _syncfs(self) -> set[_Inode]:
        """syncfs(2) of the replica's file system when many inodes wait for an fsync:
        one journal commit instead of one per file. Returns the inodes it covered
        (those on the root's device; anything mounted below is fsynced one by one)."""
        root_fd = self._guard.root_fd
        dev = os.fstat(root_fd).st_dev
        covered = {inode for inode in self._sync_fds if inode[0] == dev}
        covered.update(e.inode for e in self._files.values() if e.dirty and e.inode[0] == dev)
        if not covered:
            return covered
        if _libc_syncfs(root_fd) != 0:
            err = ctypes.get_errno()
            raise _FsyncError(OSError(err, os.strerror(err)))
        return covered

    def _bound_sync_fds(self) -> None:
        # Only between ops: an op registers inodes before changing them (above).
        if len(self._sync_fds) > self._sync_fd_limit:
            try:
                for fd in self._sync_fds.values():
                    _fsync(fd)
            finally:
                self._close_sync_fds()

    def _close_sync_fds(self) -> None:
        fds, self._sync_fds = self._sync_fds, {}
        for fd in fds.values():
            os.close(fd)


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _FsyncError(exc) from exc


def _emulate_fallocate(fd: int, mode: int, offset: int, length: int, exc: OSError) -> None:
    """Give the content fallocate would have given, on a file system that lacks the mode.

    Holes and preallocation are not visible in content, so dropping them is fine;
    PUNCH_HOLE and ZERO_RANGE become zero writes, and a size change is kept.
    COLLAPSE_RANGE and INSERT_RANGE move data and are not emulated.
    """
    if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        raise exc
    size = os.fstat(fd).st_size
    end = offset + length
    if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        zero_end = min(end, size)
        chunk = bytes(min(1 << 20, max(zero_end - offset, 0)))
        position = offset
        while position < zero_end:
            position += os.pwrite(fd, chunk[: zero_end - position], position)
    if not mode & FALLOC_FL_KEEP_SIZE and end > size:
        os.ftruncate(fd, end)


def _describe(op: Op) -> str:
    paths = op.paths()
    if not paths:
        return op.kind
    return f"{op.kind} " + " -> ".join(repr(show_path(p)) for p in paths)
