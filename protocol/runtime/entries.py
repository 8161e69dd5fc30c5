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
from collections.abc import Generator, Iterator
from typing import Final

from protocol.checks import entry_kind, state_digest, xattr_digest
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
    # One l*xattr call through the directory's /proc link, instead of an O_PATH open,
    # the calls and a close: the last component is not followed (no symlink escapes).
    proc = b"/proc/self/fd/%d/%s" % (dfd, name)
    try:
        keys = os.listxattr(proc, follow_symlinks=False)
    except OSError:
        return []
    return _user_items(proc, keys)


def fd_xattr_items(fd: int) -> list[tuple[bytes, bytes]]:
    """The user.* xattrs of the open file ``fd`` (none on error)."""
    try:
        keys = os.listxattr(fd)
    except OSError:
        return []
    return _user_items(fd, keys)


def _user_items(where: int | bytes, keys: list[str]) -> list[tuple[bytes, bytes]]:
    items = []
    for key in keys:
        if key.startswith("user."):
            try:
                value = (os.getxattr(where, key) if isinstance(where, int)
                         else os.getxattr(where, key, follow_symlinks=False))
            except OSError:
                continue
            items.append((key.encode(), value))
    return items


def file_state(dfd: int, name: bytes, content: bool,
               max_size: int) -> tuple[os.stat_result, bytes] | str:
    """(stat, :func:`~protocol.checks.state_digest`) of the regular file ``name`` under
    ``dfd``, content included if ``content``; else "missing", "other" (not a regular
    file, never followed) or "large" (content over ``max_size`` bytes, not read)."""
    if not content:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return "missing"
        if not stat.S_ISREG(st.st_mode):
            return "other"
        return st, state_digest(st, xattr_digest(xattr_items(dfd, name, "file")), None)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dfd)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError:
        return "other"      # a symlink (ELOOP), or not readable
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "other"
        if st.st_size > max_size:
            return "large"
        data = os.pread(fd, st.st_size, 0) if st.st_size else b""
        return st, state_digest(st, xattr_digest(fd_xattr_items(fd)), data)
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
    # Owner before mode: chown(2) clears the set-user-ID and set-group-ID bits of
    # anything but a directory, so a chmod before it would not hold.
    ops: list[Op] = [ChownOp(path, st.st_uid, st.st_gid)]
    if entry != "symlink":
        ops.append(ChmodOp(path, stat.S_IMODE(st.st_mode)))
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
    """Ops that replace ``path`` with the regular file under ``base``, data extents only.

    Whatever is at ``path`` goes first (PrepareOp "none"), so the file is created new:
    CreateOp gives it its owner, mode and mtime, no old data or xattr is left to
    clear, and no second prepare, chown or chmod is needed after the data (a chmod
    only for set-id bits, which a write by an unprivileged applier clears).
    """
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
        yield PrepareOp(path, "none", [])
        yield CreateOp(path, mode, st.st_uid, st.st_gid, st.st_mtime_ns)
        size = st.st_size
        written = 0     # where the data sent so far ends
        for start, end in data_extents(fd, size):
            offset = start
            while offset < end:
                data = os.pread(fd, min(WRITE_CHUNK, end - offset), offset)
                if not data:
                    break
                yield WriteOp(path, offset, data, os.fstat(fd).st_mtime_ns)
                offset += len(data)
                written = max(written, offset)
        st = os.fstat(fd)
        if st.st_size != written or st.st_size != size:
            # A hole at the end, or the size changed while it was read: the size the
            # file has at this point of the stream.
            yield TruncateOp(path, st.st_size, st.st_mtime_ns)
        for key, value in fd_xattr_items(fd):
            yield SetxattrOp(path, key, value, 0)
    finally:
        os.close(fd)
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        yield ChmodOp(path, stat.S_IMODE(st.st_mode))
    yield UtimensOp(path, st.st_atime_ns, st.st_mtime_ns)


def entry_ops(base: int, path: bytes) -> Generator[Op, None, None]:
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
