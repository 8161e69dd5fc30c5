"""Capture: the FUSE passthrough mounted over a protected directory (DESIGN §3).

Theory of operation
-------------------
The agent opens the protected directory (``backing_fd``) *before* mounting
:class:`CaptureFS` over it, then serves every request with ``*at`` calls relative
to that descriptor (``dir_fd=``, ``follow_symlinks=False``). Applications keep
their paths; the agent never touches the mount path itself, which would deadlock
(it would wait for a reply only this process can send).

Ordering. Every mutating handler does, with **no await in between**:

    apply the change to the backing tree  ->  recorder.record(op)  ->  reply

pyfuse3 runs handlers as trio tasks on one thread, and a trio task only yields at
an ``await``. So "apply + record" is atomic with respect to every other handler:
the trio scheduler *is* the volume's sequencing lock, and seq order is exactly
the order in which the backing tree passed through the changes. Two rules keep
that true:

* never put an ``await`` between applying a change and recording it;
* run the syscalls on the event-loop thread (they block it briefly; that is the
  price). Moving them to ``trio.to_thread`` would need an explicit lock.

Only ``fsync``/``fsyncdir`` await (``recorder.sync``), after their own syscalls.
A failed syscall records nothing and replies with its errno. A syscall that
partly succeeded (a short write) records exactly the part that was applied.

Inodes. FUSE names objects by 64-bit node ids. The table maps each node id to the
``(parent node id, name)`` links the kernel has seen for it; a node's relative
path (``a/b/c``, bytes, non-UTF-8 allowed) is the path of any link's parent plus
the name, so renaming a directory moves one link, not its whole subtree. A hard
linked file has one node with several links; any one gives a valid path. The node
id is the backing ``st_ino`` when that is free and on the root's device, else a
synthetic number; the root is ``pyfuse3.ROOT_INODE`` and has the empty path.
Nodes carry the kernel's lookup count and are dropped on ``forget`` once the
kernel, open handles and known children no longer need them. When the last link
of a backing inode goes away (unlink, rmdir, rename over it) its node is detached
from ``(st_dev, st_ino)``, so a new file that reuses the inode number gets a
fresh node id instead of aliasing a deleted one the kernel still holds.

Limits
------
* pyfuse3 keeps one global session: **one mount per process** (:func:`serve_mount`
  refuses a second).
* pyfuse3 3.5 has no ``fallocate`` handler: the kernel answers ``EOPNOTSUPP``
  itself (glibc's ``posix_fallocate`` then falls back to writes, which are
  captured), so nothing is applied unrecorded. ``copy_file_range`` falls back to
  read/write the same way; reflink ioctls fail.
* Shared writable mmap reaches the agent only at page writeback, as ordinary
  writes: their order is writeback order, and ``msync``/``fsync`` forces them
  out (and makes the journal durable). Reads through mmap use the page cache.
* Changes to the volume root's own metadata (chmod, chown, utimens, xattrs of
  the protected directory itself) are applied but not recorded: the op model has
  no path for the root (``check_relative_path`` rejects ``b""``).
* A change to an open file whose every *known* name was removed while another,
  never looked-up hard link keeps it alive has no path to record: it is applied,
  logged, and needs a difference mirror.
* ``mknod`` makes only regular files and FIFOs (sockets and devices: ``EPERM``).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, ParamSpec, Protocol, TypeVar

import pyfuse3
import structlog
import trio

from protocol.ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ChmodOp,
    ChownOp,
    CreateOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    Op,
    RemovexattrOp,
    RenameOp,
    RmdirOp,
    SetxattrOp,
    SymlinkOp,
    TruncateOp,
    UnlinkOp,
    UtimensOp,
    WriteOp,
)

log = structlog.get_logger("capture")

ROOT_INODE: Final[int] = pyfuse3.ROOT_INODE
# Node ids handed out when the backing st_ino cannot be used (taken, or another
# device below the volume), counting down from here.
_SYNTHETIC_TOP: Final = (1 << 63) - 1
# Open flags the backing open must not see: creation is done by create(),
# O_APPEND would make pwrite() ignore the kernel's offset (Linux pwrite(2) BUGS),
# O_DIRECT needs aligned buffers python bytes do not have.
_STRIP_OPEN_FLAGS: Final = (os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND
                            | getattr(os, "O_DIRECT", 0))
_MAX_DEPTH: Final = 4096

_P = ParamSpec("_P")
_T = TypeVar("_T")


class Recorder(Protocol):
    """Where captured ops go (the volume's journal)."""

    def record(self, op: Op) -> int:
        """Append ``op`` (already applied to the backing tree); return its seq.

        Called synchronously right after the change was applied, with no await in
        between. Must not block on I/O for long and should not raise; a seq of 0
        means the journal could not take the op (it handles that itself).
        """
        ...

    async def sync(self, seq: int) -> None:
        """Make the journal durable up to ``seq`` (application fsync)."""
        ...


@dataclass(eq=False)
class _Node:
    ino: int
    #: (st_dev, st_ino) of the backing inode, None once it is known to be gone.
    key: tuple[int, int] | None
    #: (parent node id, name) -> None; a dict for a stable "first" link.
    links: dict[tuple[int, bytes], None] = field(default_factory=dict)
    lookups: int = 0
    #: Backing fds open on this node (files and directories).
    fds: set[int] = field(default_factory=set)
    #: Links of other nodes naming this node as their parent.
    children: int = 0


class _InodeTable:
    """Node ids <-> backing inodes and the names the kernel knows them by."""

    def __init__(self, root_key: tuple[int, int]) -> None:
        root = _Node(ROOT_INODE, root_key)
        self._nodes: dict[int, _Node] = {ROOT_INODE: root}
        self._by_key: dict[tuple[int, int], int] = {root_key: ROOT_INODE}
        self._entries: dict[tuple[int, bytes], int] = {}
        self._root_dev = root_key[0]
        self._next_synthetic = _SYNTHETIC_TOP

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, ino: int) -> _Node:
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def path_or_none(self, node: _Node) -> bytes | None:
        """The node's path relative to the root (b"" for the root), or None."""
        parts: list[bytes] = []
        while node.ino != ROOT_INODE:
            if not node.links or len(parts) > _MAX_DEPTH:
                return None
            parent_ino, name = next(iter(node.links))
            parts.append(name)
            parent = self._nodes.get(parent_ino)
            if parent is None:
                return None
            node = parent
        return b"/".join(reversed(parts))

    def path(self, node: _Node) -> bytes:
        path = self.path_or_none(node)
        if path is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return path

    def child_path(self, parent_ino: int, name: bytes) -> bytes:
        parent = self.path(self.node(parent_ino))
        return parent + b"/" + name if parent else name

    def parent_of(self, node: _Node) -> _Node:
        if node.ino == ROOT_INODE:
            return node
        if not node.links:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return self.node(next(iter(node.links))[0])

    def at_entry(self, parent_ino: int, name: bytes) -> _Node | None:
        ino = self._entries.get((parent_ino, name))
        return None if ino is None else self._nodes.get(ino)

    def by_stat(self, st: os.stat_result) -> _Node | None:
        ino = self._by_key.get((st.st_dev, st.st_ino))
        return None if ino is None else self._nodes.get(ino)

    def remember(self, parent_ino: int, name: bytes, st: os.stat_result) -> _Node:
        """The node for ``st``, linked as ``name`` in ``parent_ino`` (made if new).

        The caller increments ``lookups`` when the kernel learns of the node, or
        calls :meth:`maybe_drop` when it does not.
        """
        key = (st.st_dev, st.st_ino)
        node = self.by_stat(st)
        if node is None:
            node = _Node(self._allocate(key), key)
            self._nodes[node.ino] = node
            self._by_key[key] = node.ino
        self._link(node, parent_ino, name)
        return node

    def _allocate(self, key: tuple[int, int]) -> int:
        dev, ino = key
        if dev == self._root_dev and ino > ROOT_INODE and ino not in self._nodes:
            return ino
        while self._next_synthetic in self._nodes:
            self._next_synthetic -= 1
        ino = self._next_synthetic
        self._next_synthetic -= 1
        return ino

    def _link(self, node: _Node, parent_ino: int, name: bytes) -> None:
        entry = (parent_ino, name)
        other = self._entries.get(entry)
        if other == node.ino:
            return
        if other is not None:
            self._unlink(self._nodes[other], entry)
        parent = self._nodes.get(parent_ino)
        if parent is None:  # the kernel already forgot the directory: nothing to name
            return
        self._entries[entry] = node.ino
        node.links[entry] = None
        parent.children += 1

    def _unlink(self, node: _Node, entry: tuple[int, bytes]) -> None:
        del self._entries[entry]
        del node.links[entry]
        parent = self._nodes.get(entry[0])
        if parent is not None:
            parent.children -= 1
            self.maybe_drop(parent)
        self.maybe_drop(node)

    def detach(self, node: _Node) -> None:
        """Forget which backing inode ``node`` was: that inode no longer exists."""
        if node.key is not None and self._by_key.get(node.key) == node.ino:
            del self._by_key[node.key]
        node.key = None

    def removed(self, parent_ino: int, name: bytes, before: os.stat_result) -> None:
        """``name`` in ``parent_ino`` was unlinked/rmdir'ed; ``before`` is its lstat."""
        node = self.at_entry(parent_ino, name) or self.by_stat(before)
        if node is None:
            return
        if stat.S_ISDIR(before.st_mode) or before.st_nlink <= 1:
            self.detach(node)
        if (parent_ino, name) in node.links:
            self._unlink(node, (parent_ino, name))

    def renamed(self, old: tuple[int, bytes], new: tuple[int, bytes], flags: int,
                moved_st: os.stat_result, victim_st: os.stat_result | None) -> None:
        """Mirror a successful rename(2)/renameat2(2) of entry ``old`` to ``new``."""
        moved = self.at_entry(*old) or self.by_stat(moved_st)
        victim = self.at_entry(*new)
        if victim is None and victim_st is not None:
            victim = self.by_stat(victim_st)
        if flags & RENAME_EXCHANGE:
            if moved is not None and old in moved.links:
                self._unlink_keep(moved, old)
            if victim is not None and new in victim.links:
                self._unlink_keep(victim, new)
            if moved is not None:
                self._link(moved, *new)
            if victim is not None:
                self._link(victim, *old)
            for node in (moved, victim):
                if node is not None:
                    self.maybe_drop(node)
            return
        if victim_st is not None and (victim_st.st_dev, victim_st.st_ino) == (
                moved_st.st_dev, moved_st.st_ino):
            return  # two links of one inode: rename(2) does nothing
        if victim is not None:
            if victim_st is not None and (stat.S_ISDIR(victim_st.st_mode)
                                          or victim_st.st_nlink <= 1):
                self.detach(victim)
            if new in victim.links:
                self._unlink(victim, new)
        if moved is not None:
            if old in moved.links:
                self._unlink_keep(moved, old)
            self._link(moved, *new)
            self.maybe_drop(moved)

    def _unlink_keep(self, node: _Node, entry: tuple[int, bytes]) -> None:
        # Like _unlink, but the node is about to be relinked: do not drop it.
        del self._entries[entry]
        del node.links[entry]
        parent = self._nodes.get(entry[0])
        if parent is not None:
            parent.children -= 1
            self.maybe_drop(parent)

    def forget(self, ino: int, nlookup: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - nlookup)
        self.maybe_drop(node)

    def maybe_drop(self, node: _Node) -> None:
        """Drop ``node`` if neither the kernel, an open handle nor a child needs it."""
        if (node.ino == ROOT_INODE or node.lookups or node.fds or node.children
                or self._nodes.get(node.ino) is not node):
            return
        del self._nodes[node.ino]
        self.detach(node)
        for entry in list(node.links):
            self._unlink_keep(node, entry)


@dataclass(eq=False)
class _OpenFile:
    fd: int
    node: _Node


@dataclass(eq=False)
class _OpenDir:
    fd: int
    node: _Node
    names: list[bytes] | None = None


@contextmanager
def _os_errors() -> Iterator[None]:
    """The one translation boundary: OSError -> FUSEError(errno)."""
    try:
        yield
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc


def _handler(fn: Callable[_P, Coroutine[Any, Any, _T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Wrap a request handler: OS errors become their errno, bugs become EIO.

    pyfuse3 lets a handler raise only FUSEError; anything else would end the
    session and leave a dead mount behind.
    """

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        except Exception as exc:
            log.exception("capture handler failed", handler=fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return wrapper


def _fd(fd: int | None) -> int:
    if fd is None:  # setattr resolved a path or an fd before calling this
        raise pyfuse3.FUSEError(errno.ESTALE)
    return fd


_libc: ctypes.CDLL | None = None


def _renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int) -> None:
    """renameat2(2) through libc (python's os has no flags argument)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(_libc, "renameat2", None)
    if func is None:
        raise OSError(errno.ENOSYS, "libc has no renameat2")
    func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                     ctypes.c_uint)
    func.restype = ctypes.c_int
    if func(old_dir_fd, old, new_dir_fd, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class CaptureFS(pyfuse3.Operations):
    """Passthrough file system over ``backing_fd`` that records every mutation.

    Args:
        backing_fd: an ``O_DIRECTORY`` descriptor opened on the protected directory
            before the mount covers it. Not closed by this class.
        recorder: receives each applied op (see :class:`Recorder`).
        entry_timeout, attr_timeout: seconds the kernel may cache names and
            attributes. Every change goes through this file system, so the kernel's
            cache stays right; keep them small anyway for changes made directly in
            the backing tree (restore).
    """

    supports_dot_lookup = False
    enable_writeback_cache = False  # DESIGN §3: it would hide and reorder writes
    enable_acl = False

    def __init__(self, backing_fd: int, recorder: Recorder, *, entry_timeout: float = 1.0,
                 attr_timeout: float = 1.0) -> None:
        super().__init__()
        self._backing = backing_fd
        self._recorder = recorder
        self._entry_timeout = entry_timeout
        self._attr_timeout = attr_timeout
        root = os.fstat(backing_fd)
        if not stat.S_ISDIR(root.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "backing_fd is not a directory")
        self._table = _InodeTable((root.st_dev, root.st_ino))
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, _OpenDir] = {}
        self.last_seq = 0
        #: Set once the kernel's INIT request was answered: the mount is usable.
        self.ready = trio.Event()

    # -- plumbing -----------------------------------------------------------------

    def init(self) -> None:
        self.ready.set()

    def _record(self, op: Op) -> None:
        seq = self._recorder.record(op)
        if seq > self.last_seq:
            self.last_seq = seq

    def _record_at(self, node: _Node, path: bytes | None,
                   make: Callable[[bytes], Op]) -> None:
        """Record ``make(path)``, unless the changed object has no path to name.

        No path: the volume root itself (b"", which the op model cannot name), or
        a file whose last name is gone (nothing to replicate), or — the gap — a
        file still alive under a hard link this mount never looked up.
        """
        if path:
            self._record(make(path))
        elif path == b"":
            log.warning("change to the volume root's own metadata is not replicated",
                        op=make(b"-").kind)
        elif node.key is not None:
            log.warning("change to a file with no known name was not recorded; "
                        "a difference mirror is needed", inode=node.ino)

    @staticmethod
    def _mtime_after(fd: int) -> int:
        # Between applying and recording: a failure here must not lose the op.
        try:
            return os.fstat(fd).st_mtime_ns
        except OSError as exc:
            log.warning("fstat after a change failed; recording the clock instead",
                        error=str(exc))
            return time.time_ns()

    def _lstat(self, path: bytes) -> os.stat_result:
        if not path:
            return os.fstat(self._backing)
        return os.stat(path, dir_fd=self._backing, follow_symlinks=False)

    def _stat_node(self, node: _Node) -> os.stat_result:
        if node.ino == ROOT_INODE:
            return os.fstat(self._backing)
        for fd in node.fds:
            return os.fstat(fd)
        st = self._lstat(self._table.path(node))
        if node.key is not None and (st.st_dev, st.st_ino) != node.key:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return st

    def _attrs(self, node: _Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.generation = 0
        attrs.entry_timeout = self._entry_timeout
        attrs.attr_timeout = self._attr_timeout
        attrs.st_mode = st.st_mode
        attrs.st_nlink = st.st_nlink
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = st.st_rdev
        attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    def _entry(self, parent_ino: int, name: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Register a new or looked-up entry; the kernel now holds one lookup."""
        node = self._table.remember(parent_ino, name, st)
        node.lookups += 1
        return self._attrs(node, st)

    def _owner(self, parent_ino: int, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """uid/gid a new entry gets: the caller's, or the set-gid directory's group."""
        parent = self._stat_node(self._table.node(parent_ino))
        gid = parent.st_gid if parent.st_mode & stat.S_ISGID else ctx.gid
        return ctx.uid, gid

    def _finish_new(self, path: bytes, fd: int | None, mode: int, uid: int,
                    gid: int) -> os.stat_result:
        """Give a just-made entry its owner and exact permission bits.

        chown first (it clears set-id bits), then chmod if the process umask or
        chown changed the bits; a directory keeps the set-gid bit it inherited.
        Removes the entry again if this fails, so nothing half-made is left.
        """
        try:
            if fd is not None:
                os.fchown(fd, uid, gid)
                st = os.fstat(fd)
            else:
                os.chown(path, uid, gid, dir_fd=self._backing, follow_symlinks=False)
                st = self._lstat(path)
            if stat.S_ISLNK(st.st_mode):
                return st
            want = stat.S_IMODE(mode)
            if stat.S_ISDIR(st.st_mode):
                want |= st.st_mode & stat.S_ISGID
            if stat.S_IMODE(st.st_mode) != want:
                if fd is not None:
                    os.fchmod(fd, want)
                    st = os.fstat(fd)
                else:
                    os.chmod(path, want, dir_fd=self._backing)
                    st = self._lstat(path)
            return st
        except BaseException:
            try:
                if stat.S_ISDIR(mode):
                    os.rmdir(path, dir_fd=self._backing)
                else:
                    os.unlink(path, dir_fd=self._backing)
            except OSError:
                log.warning("could not remove half-made entry", path=path)
            raise

    @contextmanager
    def _xattr_target(self, node: _Node) -> Iterator[tuple[int | str, bytes | None]]:
        """Something os.*xattr accepts for ``node``, and its path (None: unknown).

        The root and open nodes use their fd. Others get an O_PATH fd named via
        /proc/self/fd, which reaches symlinks and FIFOs without opening them, the
        way libfuse's passthrough_ll does.
        """
        if node.ino == ROOT_INODE:
            yield self._backing, b""
            return
        path = self._table.path_or_none(node)
        if node.fds:
            # An open file or directory: its own descriptor, no open/close. The kernel
            # asks for security.capability before every write, so this is hot.
            yield next(iter(node.fds)), path
            return
        if path is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._backing)
        try:
            yield f"/proc/self/fd/{fd}", path
        finally:
            os.close(fd)

    # -- names --------------------------------------------------------------------

    @_handler
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._table.node(parent_inode)
        if name in (b".", b".."):
            node = parent if name == b"." else self._table.parent_of(parent)
            st = self._stat_node(node)
            node.lookups += 1
            return self._attrs(node, st)
        st = self._lstat(self._table.child_path(parent_inode, name))
        return self._entry(parent_inode, name, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self._table.forget(ino, nlookup)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._table.node(inode)
        return self._attrs(node, self._stat_node(node))

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        path = self._table.path(self._table.node(inode))
        return os.readlink(path, dir_fd=self._backing)

    # -- attributes ---------------------------------------------------------------

    @_handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._table.node(inode)
        path = self._table.path_or_none(node)
        fd = self._files[fh].fd if fh is not None and fh in self._files else None
        if path == b"":
            fd = self._backing
        elif path is None and fd is None:
            if not node.fds:
                raise pyfuse3.FUSEError(errno.ESTALE)
            fd = next(iter(node.fds))
        # Order: size, owner (chown clears set-id bits), mode, then times last,
        # since the others change times.
        if fields.update_size:
            self._truncate(node, path, None if path == b"" else fd, attr.st_size)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if path:
                os.chown(path, uid, gid, dir_fd=self._backing, follow_symlinks=False)
            else:
                os.fchown(_fd(fd), uid, gid)
            self._record_at(node, path, lambda p: ChownOp(p, uid, gid))
        if fields.update_mode:
            mode = stat.S_IMODE(attr.st_mode)
            try:
                if path:
                    os.chmod(path, mode, dir_fd=self._backing, follow_symlinks=False)
                else:
                    os.fchmod(_fd(fd), mode)
            except (NotImplementedError, ValueError) as exc:  # chmod on a symlink
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP) from exc
            self._record_at(node, path, lambda p: ChmodOp(p, mode))
        if fields.update_atime or fields.update_mtime:
            self._utimens(node, path, fd, attr, fields)
        return self._attrs(node, self._stat_node(node))

    def _truncate(self, node: _Node, path: bytes | None, fd: int | None, size: int) -> None:
        if fd is not None:
            os.ftruncate(fd, size)
            mtime = self._mtime_after(fd)
        else:
            if not path:
                raise pyfuse3.FUSEError(errno.EISDIR if path == b"" else errno.ESTALE)
            tmp = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                          dir_fd=self._backing)
            try:
                os.ftruncate(tmp, size)
                mtime = self._mtime_after(tmp)
            finally:
                os.close(tmp)
        self._record_at(node, path, lambda p: TruncateOp(p, size, mtime))

    def _utimens(self, node: _Node, path: bytes | None, fd: int | None,
                 attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
        # pyfuse3 has already turned UTIME_NOW into the current time. os.utime has
        # no UTIME_OMIT, so an unchanged time is passed back as it is.
        current = self._stat_node(node)
        times = (attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                 attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns)
        if path:
            os.utime(path, ns=times, dir_fd=self._backing, follow_symlinks=False)
        else:
            os.utime(_fd(fd), ns=times)
        try:  # resolved and rounded as the backing fs stores them
            after = self._stat_node(node)
            times = (after.st_atime_ns, after.st_mtime_ns)
        except (OSError, pyfuse3.FUSEError) as exc:
            log.warning("stat after utimens failed; recording the requested times",
                        error=str(exc))
        self._record_at(node, path, lambda p: UtimensOp(p, *times))

    # -- files --------------------------------------------------------------------

    def _add_file(self, fd: int, node: _Node) -> pyfuse3.FileInfo:
        self._files[fd] = _OpenFile(fd, node)
        node.fds.add(fd)
        # Page cache for reads (and read-only mmap), dropped on every open.
        return pyfuse3.FileInfo(fh=fd, direct_io=False, keep_cache=False)

    @_handler
    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._table.node(inode)
        path = self._table.path_or_none(node)
        oflags = (flags & ~_STRIP_OPEN_FLAGS) | os.O_CLOEXEC
        if path:
            fd = os.open(path, oflags | os.O_NOFOLLOW, dir_fd=self._backing)
        elif node.fds:  # opened through /proc/PID/fd after its last name went away
            fd = os.open(f"/proc/self/fd/{next(iter(node.fds))}", oflags)
        else:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if flags & os.O_TRUNC:  # FUSE_CAP_ATOMIC_O_TRUNC: the kernel leaves it to us
            mtime = self._mtime_after(fd)
            self._record_at(node, path, lambda p: TruncateOp(p, 0, mtime))
        return self._add_file(fd, node)

    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        path = self._table.child_path(parent_inode, name)
        uid, gid = self._owner(parent_inode, ctx)
        oflags = ((flags & ~(_STRIP_OPEN_FLAGS | os.O_TRUNC))
                  | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC)
        fd = os.open(path, oflags, stat.S_IMODE(mode), dir_fd=self._backing)
        try:
            st = self._finish_new(path, fd, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)
        except BaseException:
            os.close(fd)
            raise
        self._record(CreateOp(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                              st.st_mtime_ns))
        attrs = self._entry(parent_inode, name, st)
        return self._add_file(fd, self._table.node(attrs.st_ino)), attrs

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._files[fh].fd, size, off)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._files[fh]
        written = 0
        failure: OSError | None = None
        view = memoryview(buf)
        while written < len(buf):
            try:
                count = os.pwrite(handle.fd, view[written:], off + written)
            except OSError as exc:
                failure = exc
                break
            if count <= 0:
                break
            written += count
        if written == 0:
            raise pyfuse3.FUSEError(failure.errno if failure and failure.errno else errno.EIO)
        data = buf if written == len(buf) else bytes(view[:written])
        mtime = self._mtime_after(handle.fd)
        self._record_at(handle.node, self._table.path_or_none(handle.node),
                        lambda p: WriteOp(p, off, data, mtime))
        return written

    async def flush(self, fh: int) -> None:
        # close(2) of one descriptor: nothing to write back (no writeback cache).
        return None

    async def release(self, fh: int) -> None:
        self._close_handle(self._files.pop(fh, None), "file")

    def _close_handle(self, handle: Any, what: str) -> None:
        """Close a file or directory handle's backing descriptor and forget it."""
        if handle is None:
            return
        handle.node.fds.discard(handle.fd)
        try:
            os.close(handle.fd)
        except OSError as exc:
            log.warning(f"close of backing {what} failed", error=str(exc))
        self._table.maybe_drop(handle.node)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._files[fh].fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        # Everything recorded so far: a superset of this file's ops, and the
        # journal syncs by prefix anyway.
        await self._recorder.sync(self.last_seq)

    # -- directories --------------------------------------------------------------

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._table.node(inode)
        path = self._table.path_or_none(node)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        if node.ino == ROOT_INODE:
            fd = os.open(".", flags, dir_fd=self._backing)
        elif path:
            fd = os.open(path, flags | os.O_NOFOLLOW, dir_fd=self._backing)
        elif node.fds:
            fd = os.open(f"/proc/self/fd/{next(iter(node.fds))}", flags)
        else:
            raise pyfuse3.FUSEError(errno.ESTALE)
        self._dirs[fd] = _OpenDir(fd, node)
        node.fds.add(fd)
        return fd

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        # A snapshot per pass (start_id 0 = opendir or rewinddir): offsets are
        # indexes into it, so no entry is skipped or repeated between calls.
        if start_id == 0 or handle.names is None:
            handle.names = [b".", b"..", *(os.fsencode(n) for n in os.listdir(handle.fd))]
        names = handle.names
        for index in range(start_id, len(names)):
            name = names[index]
            if index < 2:  # "." and "..": listed, but the kernel takes no lookup on them
                node = handle.node
                if index == 1 and (node.links or node.ino == ROOT_INODE):
                    node = self._table.parent_of(node)
                attrs = self._attrs(node, self._stat_node(node))
                if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                    return
                continue
            try:
                st = os.stat(name, dir_fd=handle.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            node = self._table.remember(handle.node.ino, name, st)
            if not pyfuse3.readdir_reply(token, name, self._attrs(node, st), index + 1):
                self._table.maybe_drop(node)
                return
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self._close_handle(self._dirs.pop(fh, None), "directory")

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        os.fsync(self._dirs[fh].fd)
        await self._recorder.sync(self.last_seq)

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.fstatvfs(self._backing)
        data = pyfuse3.StatvfsData()
        data.f_bsize = sv.f_bsize
        data.f_frsize = sv.f_frsize
        data.f_blocks = sv.f_blocks
        data.f_bfree = sv.f_bfree
        data.f_bavail = sv.f_bavail
        data.f_files = sv.f_files
        data.f_ffree = sv.f_ffree
        data.f_favail = sv.f_favail
        data.f_namemax = sv.f_namemax
        return data

    # -- entries ------------------------------------------------------------------

    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise pyfuse3.FUSEError(errno.EPERM)  # devices and sockets are not replicated
        path = self._table.child_path(parent_inode, name)
        uid, gid = self._owner(parent_inode, ctx)
        os.mknod(path, stat.S_IFMT(mode) | stat.S_IMODE(mode), dir_fd=self._backing)
        st = self._finish_new(path, None, mode, uid, gid)
        self._record(MknodOp(path, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns))
        return self._entry(parent_inode, name, st)

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._table.child_path(parent_inode, name)
        uid, gid = self._owner(parent_inode, ctx)
        os.mkdir(path, stat.S_IMODE(mode), dir_fd=self._backing)
        st = self._finish_new(path, None, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)
        self._record(MkdirOp(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                             st.st_mtime_ns))
        return self._entry(parent_inode, name, st)

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._table.child_path(parent_inode, name)
        uid, gid = self._owner(parent_inode, ctx)
        os.symlink(target, path, dir_fd=self._backing)
        st = self._finish_new(path, None, stat.S_IFLNK | 0o777, uid, gid)
        self._record(SymlinkOp(path, target, st.st_uid, st.st_gid, st.st_mtime_ns))
        return self._entry(parent_inode, name, st)

    @_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._table.node(inode)
        old = self._table.path(node)
        new = self._table.child_path(new_parent_inode, new_name)
        os.link(old, new, src_dir_fd=self._backing, dst_dir_fd=self._backing,
                follow_symlinks=False)
        self._record(LinkOp(old, new))
        return self._entry(new_parent_inode, new_name, self._lstat(new))

    @_handler
    async def unlink(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> None:
        path = self._table.child_path(parent_inode, name)
        before = self._lstat(path)
        os.unlink(path, dir_fd=self._backing)
        self._record(UnlinkOp(path))
        self._table.removed(parent_inode, name, before)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes,
                    ctx: pyfuse3.RequestContext) -> None:
        path = self._table.child_path(parent_inode, name)
        before = self._lstat(path)
        os.rmdir(path, dir_fd=self._backing)
        self._record(RmdirOp(path))
        self._table.removed(parent_inode, name, before)

    @_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._table.child_path(parent_inode_old, name_old)
        new = self._table.child_path(parent_inode_new, name_new)
        moved_st = self._lstat(old)
        try:
            victim_st: os.stat_result | None = self._lstat(new)
        except FileNotFoundError:
            victim_st = None
        if flags:
            _renameat2(self._backing, old, self._backing, new, flags)
        else:
            os.rename(old, new, src_dir_fd=self._backing, dst_dir_fd=self._backing)
        self._record(RenameOp(old, new, flags))
        self._table.renamed((parent_inode_old, name_old), (parent_inode_new, name_new),
                            flags, moved_st, victim_st)

    # -- extended attributes ------------------------------------------------------

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        # pyfuse3 checks XATTR_CREATE/XATTR_REPLACE itself (through getxattr, in
        # the same uninterrupted step) and never passes them on: flags are 0.
        node = self._table.node(inode)
        with self._xattr_target(node) as (target, path):
            os.setxattr(target, name, value, 0)
            self._record_at(node, path, lambda p: SetxattrOp(p, name, value, 0))

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._table.node(inode)
        if node.fds:  # the hot case (security.capability before each write), inline
            return os.getxattr(next(iter(node.fds)), name)
        with self._xattr_target(node) as (target, _):
            return os.getxattr(target, name)

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        with self._xattr_target(self._table.node(inode)) as (target, _):
            return [os.fsencode(n) for n in os.listxattr(target)]

    @_handler
    async def removexattr(self, inode: int, name: bytes,
                          ctx: pyfuse3.RequestContext) -> None:
        node = self._table.node(inode)
        with self._xattr_target(node) as (target, path):
            os.removexattr(target, name)
            self._record_at(node, path, lambda p: RemovexattrOp(p, name))


_mounted = False


async def serve_mount(path: str, backing_fd: int, recorder: Recorder, *,
                      entry_timeout: float = 1.0, attr_timeout: float = 1.0,
                      debug: bool = False,
                      task_status: trio.TaskStatus[CaptureFS] = trio.TASK_STATUS_IGNORED,
                      ) -> None:
    """Mount :class:`CaptureFS` over ``path`` and serve it until cancelled.

    ``backing_fd`` must be open on ``path`` itself (opened before this call).
    Reports started (with the CaptureFS) once the kernel's INIT request was
    answered, so the mount is usable — but never from this process's own thread:
    a blocking syscall on the mount from the event-loop thread deadlocks.

    Returns when the file system is unmounted from outside (``umount``). On
    cancellation it unmounts (lazily, as libfuse does for root) before
    re-raising. pyfuse3 holds one global session, so one mount per process:
    a second concurrent call raises RuntimeError.

    Mount options: ``fsname=mirrorline``, ``subtype=mirrorline`` (fstype
    ``fuse.mirrorline``), ``allow_other``, ``default_permissions``. No writeback
    cache. libfuse 3 always allows large writes (up to its 1 MiB buffer, as far
    as the kernel's max_pages allows); there is no option to tune here.
    """
    global _mounted
    if _mounted:
        raise RuntimeError("pyfuse3 serves one mount per process; one is already active")
    ops = CaptureFS(backing_fd, recorder, entry_timeout=entry_timeout,
                    attr_timeout=attr_timeout)
    options = {"fsname=mirrorline", "subtype=mirrorline", "allow_other",
               "default_permissions"}
    if debug:
        options.add("debug")
    pyfuse3.init(ops, path, options)
    _mounted = True
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            await ops.ready.wait()
            log.info("capture mount live", path=path)
            task_status.started(ops)
    finally:
        _mounted = False
        pyfuse3.close(unmount=True)
        log.info("capture mount closed", path=path)
