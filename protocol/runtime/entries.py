"""Turning an entry of a tree into the ops that recreate it whole elsewhere.

Used by the source's mirror (source tree → target) and by the target's restore
(replica → source). Everything is read relative to a directory descriptor, never
following a symlink. The generators read lazily: a file's data is read one chunk
per yielded WriteOp, so a caller that appends each op as soon as it gets it (and
awaits only after that) puts every chunk at the point of its stream where the tree
held that data.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from typing import Final

from protocol.checks import entry_kind
from protocol.ops import (
    ChmodOp,
    ChownOp,
    CreateOp,
    MkdirOp,
    MknodOp,
    NoteOp,
    Op,
    PrepareOp,
    SetxattrOp,
    SymlinkOp,
    TruncateOp,
    UtimensOp,
    WriteOp,
)

WRITE_CHUNK: Final = 1024 * 1024


def xattr_items(dfd: int, name: bytes, entry: str) -> list[tuple[bytes, bytes]]:
    """The user.* xattrs of ``name`` under ``dfd`` (none for symlinks or on error)."""
    if entry == "symlink":
        return []
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return []
    try:
        proc = f"/proc/self/fd/{fd}"
        items = []
        for key in os.listxattr(proc):
            if key.startswith("user."):
                try:
                    items.append((key.encode(), os.getxattr(proc, key)))
                except OSError:
                    pass
        return items
    except OSError:
        return []
    finally:
        os.close(fd)


def xattr_names(dfd: int, name: bytes, entry: str) -> list[bytes]:
    return [n for n, _ in xattr_items(dfd, name, entry)]


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the data regions of a file; the whole file if SEEK_DATA fails."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return          # only a hole from here on
            if offset == 0:
                yield 0, size   # SEEK_DATA unsupported: treat it all as data
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        offset = end


def dir_ops(base: int, path: bytes) -> list[Op]:
    """Ops that make ``path`` the same directory as under ``base`` (not its contents)."""
    try:
        st = os.stat(path, dir_fd=base, follow_symlinks=False)
    except FileNotFoundError:
        return []
    mode = stat.S_IMODE(st.st_mode)
    ops: list[Op] = [PrepareOp(path, "dir", xattr_names(base, path, "dir")),
                     MkdirOp(path, mode, st.st_uid, st.st_gid, st.st_mtime_ns),
                     ChmodOp(path, mode), ChownOp(path, st.st_uid, st.st_gid)]
    ops += [SetxattrOp(path, n, v, 0) for n, v in xattr_items(base, path, "dir")]
    return ops


def meta_ops(base: int, path: bytes, what: list[str] | tuple[str, ...]) -> list[Op]:
    """Ops that set mode, owner and times (and xattrs, size when named in ``what``)."""
    try:
        st = os.stat(path, dir_fd=base, follow_symlinks=False)
    except FileNotFoundError:
        return []
    entry = entry_kind(st.st_mode)
    ops: list[Op] = []
    if entry != "symlink":
        ops.append(ChmodOp(path, stat.S_IMODE(st.st_mode)))
    ops.append(ChownOp(path, st.st_uid, st.st_gid))
    if "xattrs" in what and entry != "symlink":
        # PrepareOp drops xattrs not kept; it would also unlink a multiply linked file.
        ops.append(PrepareOp(path, entry, xattr_names(base, path, entry))
                   if entry != "file" or st.st_nlink == 1 else NoteOp(""))
        ops += [SetxattrOp(path, n, v, 0) for n, v in xattr_items(base, path, entry)]
    if "size" in what and entry == "file":
        ops.append(TruncateOp(path, st.st_size, st.st_mtime_ns))
    if entry == "file" or "mtime" in what:
        ops.append(UtimensOp(path, st.st_atime_ns, st.st_mtime_ns))
    return ops


def file_ops(base: int, path: bytes) -> Iterator[Op]:
    """Ops that replace ``path`` with the regular file under ``base``, data extents only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=base)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        mode = stat.S_IMODE(st.st_mode)
        yield PrepareOp(path, "file", xattr_names(base, path, "file"))
        yield CreateOp(path, mode, st.st_uid, st.st_gid, st.st_mtime_ns)
        yield TruncateOp(path, 0, st.st_mtime_ns)
        yield TruncateOp(path, st.st_size, st.st_mtime_ns)
        for start, end in data_extents(fd, st.st_size):
            offset = start
            while offset < end:
                data = os.pread(fd, min(WRITE_CHUNK, end - offset), offset)
                if not data:
                    break
                yield WriteOp(path, offset, data, os.fstat(fd).st_mtime_ns)
                offset += len(data)
    finally:
        os.close(fd)
    yield from meta_ops(base, path, ("mode", "owner", "xattrs", "mtime"))


def entry_ops(base: int, path: bytes) -> Iterator[Op]:
    """Ops that replace ``path`` with whatever entry is there under ``base``, whole."""
    try:
        st = os.stat(path, dir_fd=base, follow_symlinks=False)
    except FileNotFoundError:
        return
    entry = entry_kind(st.st_mode)
    if entry == "dir":
        yield from dir_ops(base, path)
    elif entry == "symlink":
        yield PrepareOp(path, "symlink", [])
        yield SymlinkOp(path, os.readlink(path, dir_fd=base), st.st_uid, st.st_gid,
                        st.st_mtime_ns)
    elif entry == "fifo":
        yield PrepareOp(path, "fifo", xattr_names(base, path, entry))
        yield MknodOp(path, stat.S_IFIFO | stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                      st.st_mtime_ns)
        yield from meta_ops(base, path, ("mode", "owner", "xattrs", "mtime"))
    elif entry == "file":
        yield from file_ops(base, path)
