"""What both sides compute the same way for in-stream checks: block hashes, xattr digests."""

from __future__ import annotations

import os
import stat
import struct
from typing import Final

import msgpack
import xxhash

from protocol.ops import CHECK_ORPHANS, CheckOp

BLOCK_SIZE: Final = 64 * 1024
#: A file is checked in ranges of this many bytes, one CHECK op each, so reading and
#: hashing one range under the volume's ordering point stays short.
RANGE_BYTES: Final = 8 * 1024 * 1024
#: CheckOp flag (with entry "dir"): ``names`` are regular files of the directory
#: ``path`` and ``hashes[i]`` is :func:`state_digest` of ``names[i]`` (its content
#: left out under CHECK_DIFFERENT). The answer is ``{"files": [missing, differing]}``,
#: indices into ``names``; the source then checks or sends those files one by one.
CHECK_FILES: Final = 16
#: Files up to this size have their content in CHECK_FILES batches (larger ones:
#: CHECKs per range). Without content (CHECK_DIFFERENT) every regular file can be.
BATCH_FILE_BYTES: Final = 1024 * 1024
#: Names of a directory per orphan CHECK, so one op stays far below the frame limit.
NAMES_PER_CHECK: Final = 4096


def block_hashes(data: bytes, block_size: int = BLOCK_SIZE) -> list[bytes]:
    """xxh3-64 of each ``block_size`` block of ``data`` (the last may be short)."""
    if len(data) <= block_size:
        return [xxhash.xxh3_64_digest(data)] if data else []
    view = memoryview(data)   # no copy of each block
    return [xxhash.xxh3_64_digest(view[i:i + block_size])
            for i in range(0, len(data), block_size)]


def state_digest(st: os.stat_result, xattrs: bytes, content: bytes | None) -> bytes:
    """xxh3-64 of what a mirror compares of a regular file: mode bits, owner, size,
    mtime, the :func:`xattr_digest` ``xattrs`` and, unless None, the ``content``."""
    head = _STATE.pack(stat.S_IMODE(st.st_mode), st.st_uid & _U32, st.st_gid & _U32,
                       st.st_size, st.st_mtime_ns) + xattrs
    if content is None:
        return xxhash.xxh3_64_digest(head)
    h = xxhash.xxh3_64(head)
    h.update(content)
    return h.digest()


_STATE: Final = struct.Struct("<IIIQq")
_U32: Final = 0xFFFFFFFF


def xattr_digest(items: list[tuple[bytes, bytes]]) -> bytes:
    """A digest of user xattrs (name, value), independent of listing order."""
    if not items:
        return _NO_XATTRS
    return xxhash.xxh3_64_digest(msgpack.packb(sorted(items), use_bin_type=True))


_NO_XATTRS: Final = xxhash.xxh3_64_digest(msgpack.packb([], use_bin_type=True))


def entry_kind(mode: int) -> str:
    """"file", "dir", "symlink", "fifo", or "other" for a stat mode."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "other"


def stat_meta(st: os.stat_result) -> list[int]:
    """The ``meta`` of a CHECK: [mode, uid, gid, size, mtime_ns]."""
    return [st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns]


def orphan_checks(job: str, path: bytes, st: os.stat_result,
                  names: list[bytes]) -> list[CheckOp]:
    """CHECKs naming a directory's sorted entries in ranges (lo, hi]; the other side
    reports what it has in each range beyond them (an empty directory: one range)."""
    checks = []
    for i in range(0, max(len(names), 1), NAMES_PER_CHECK):
        chunk = names[i:i + NAMES_PER_CHECK]
        lo = names[i - 1] if i else b""
        hi = chunk[-1] if i + NAMES_PER_CHECK < len(names) else b""
        checks.append(CheckOp(job, path or b".", "dir", stat_meta(st), b"", b"", 0, BLOCK_SIZE,
                              [], chunk, lo, hi, CHECK_ORPHANS))
    return checks
