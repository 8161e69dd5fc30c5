"""In-stream checks and mirror preparation on the target (DESIGN §7).

Why a CHECK gives no false positives on a busy volume
------------------------------------------------------
A CHECK op carries the source entry's state read at the op's place in the stream
(under the source's ordering point). The target handles it in seq order like any
op, so it compares against its replica *at exactly that point*: every write the
source made before the read has been applied, none after it. A difference found
here is a real one, not a write still in flight.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any

from protocol.checks import (
    BATCH_FILE_BYTES,
    CHECK_FILES,
    block_hashes,
    entry_kind,
    xattr_digest,
)
from protocol.ops import (
    CHECK_DIFFERENT,
    CHECK_LAST_RANGE,
    CHECK_NEWER,
    CHECK_ORPHANS,
    CheckOp,
    PrepareOp,
)
from protocol.runtime.entries import file_state, xattr_items
from target_agent.pathguard import PathError, PathGuard

_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def check(guard: PathGuard, op: CheckOp) -> dict[str, Any]:
    """Compare the replica with the source state in ``op``; the CHECK_RESULT body.

    Keys: ``missing`` (bool), ``what`` (list of differing aspects), ``blocks``
    (indices of differing blocks, relative to ``op.offset``), ``orphans``
    ([name, kind, mtime] extra in a directory range), ``skip`` ("newer"); for a
    CHECK_FILES batch only ``files`` ([missing, differing] indices into ``op.names``).
    """
    if op.flags & CHECK_FILES:
        return {"files": _check_files(guard, op)}
    try:
        if op.path == b".":
            parent_fd, name = guard.root_fd, b"."
        else:
            parent_fd, name = guard.open_parent(op.path)
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError, PathError):
        return {"missing": True, "what": ["missing"]}
    mode, uid, gid, size, mtime_ns = op.meta
    kind = entry_kind(st.st_mode)
    if kind != op.entry:
        return {"what": ["type"]}
    if op.flags & CHECK_NEWER and kind == "file" and st.st_mtime_ns > mtime_ns:
        return {"skip": "newer"}
    what: list[str] = []
    result: dict[str, Any] = {}
    last = bool(op.flags & CHECK_LAST_RANGE)
    if last:
        if kind != "symlink" and stat.S_IMODE(st.st_mode) != stat.S_IMODE(mode):
            what.append("mode")
        if (st.st_uid, st.st_gid) != (uid, gid):
            what.append("owner")
        if kind == "file":
            if st.st_size != size:
                what.append("size")
            if st.st_mtime_ns != mtime_ns:
                what.append("mtime")
        if kind == "symlink" and os.readlink(name, dir_fd=parent_fd) != op.link:
            what.append("link")
        if xattr_digest(xattr_items(parent_fd, name, kind)) != op.xattrs:
            what.append("xattrs")
    if kind == "file" and op.hashes and not op.flags & CHECK_DIFFERENT:
        blocks = _differing_blocks(parent_fd, name, op)
        if blocks:
            what.append("content")
            result["blocks"] = blocks
    if kind == "dir" and op.flags & CHECK_ORPHANS:
        orphans = _orphans(parent_fd, name, op)
        if orphans:
            result["orphans"] = orphans
    if what:
        result["what"] = what
    return result


def _check_files(guard: PathGuard, op: CheckOp) -> list[list[int]]:
    """[missing, differing]: indices of ``op.names`` absent from the directory
    ``op.path`` and of those whose state digest is not ``op.hashes[i]``."""
    everything = list(range(len(op.names)))
    try:
        if op.path == b".":
            dfd = os.dup(guard.root_fd)
        else:
            parent_fd, name = guard.open_parent(op.path)
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=parent_fd)
    except (FileNotFoundError, NotADirectoryError, PathError):
        return [everything, []]
    except OSError:
        return [[], everything]   # something else there (ELOOP: a symlink): per file
    missing: list[int] = []
    differing: list[int] = []
    content = not op.flags & CHECK_DIFFERENT
    try:
        for i, (entry, digest) in enumerate(zip(op.names, op.hashes, strict=False)):
            found = file_state(dfd, entry, content, BATCH_FILE_BYTES)
            if found == "missing":
                missing.append(i)
            elif isinstance(found, str) or found[1] != digest:
                differing.append(i)
    finally:
        os.close(dfd)
    differing += everything[len(op.hashes):]   # malformed: no hash, so it differs
    return [missing, differing]


def _differing_blocks(parent_fd: int, name: bytes, op: CheckOp) -> list[int]:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 dir_fd=parent_fd)
    try:
        data = os.pread(fd, op.block_size * len(op.hashes), op.offset)
    finally:
        os.close(fd)
    mine = block_hashes(data, op.block_size)
    return [i for i, h in enumerate(op.hashes) if i >= len(mine) or mine[i] != h]


def _orphans(parent_fd: int, name: bytes, op: CheckOp) -> list[list[Any]]:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=parent_fd)
    try:
        names = os.listdir(fd)
        wanted = set(op.names)
        out = []
        for entry in sorted(os.fsencode(n) for n in names):
            if (op.lo and entry <= op.lo) or (op.hi and entry > op.hi) or entry in wanted:
                continue
            try:
                st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            out.append([entry, entry_kind(st.st_mode), st.st_mtime])
        return out
    finally:
        os.close(fd)


def remove_tree(parent_fd: int, name: bytes) -> None:
    """Remove ``name`` under ``parent_fd``, a directory with all it holds; never follows
    a symlink (a symlink is removed, not its target)."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=parent_fd)
    try:
        for child in os.listdir(fd):
            remove_tree(fd, os.fsencode(child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def prepare(guard: PathGuard, op: PrepareOp, holding_dir: str | None) -> None:
    """Make ``op.path`` ready for a mirrored entry of kind ``op.entry`` (see PrepareOp)."""
    parent_fd, name = guard.open_parent(op.path)
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    kind = entry_kind(st.st_mode)
    if op.entry == "moveout":
        if holding_dir is None:
            raise OSError(errno.EINVAL, "no orphan holding directory for this replica")
        dest = os.path.join(os.fsencode(holding_dir), op.path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        hfd = os.open(os.path.dirname(dest), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            target = os.path.basename(dest)
            if os.path.lexists(dest):
                target += b".%d" % time.time_ns()
            os.rename(name, target, src_dir_fd=parent_fd, dst_dir_fd=hfd)
        finally:
            os.close(hfd)
        return
    replace = (op.entry == "none" or kind != op.entry or kind == "symlink"
               or (kind == "file" and st.st_nlink > 1))
    if replace:
        remove_tree(parent_fd, name)
        return
    keep = set(op.keep_xattrs)
    fd = os.open(name, _PATH, dir_fd=parent_fd)
    try:
        proc = f"/proc/self/fd/{fd}"
        for key in os.listxattr(proc):
            if key.startswith("user.") and key.encode() not in keep:
                os.removexattr(proc, key)
    finally:
        os.close(fd)
