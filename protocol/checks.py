"""What both sides compute the same way for in-stream checks: block hashes, xattr digests."""

from __future__ import annotations

import os
import stat
from typing import Final

import msgpack
import xxhash

from protocol.ops import CHECK_ORPHANS, CheckOp

BLOCK_SIZE: Final = 64 * 1024
#: A file is checked in ranges of this many bytes, one CHECK op each, so reading and
#: hashing one range under the volume's ordering point stays short.
RANGE_BYTES: Final = 8 * 1024 * 1024
#: Names of a directory per orphan CHECK, so one op stays far below the frame limit.
NAMES_PER_CHECK: Final = 4096


def block_hashes(data: bytes, block_size: int = BLOCK_SIZE) -> list[bytes]:
    """xxh3-64 of each ``block_size`` block of ``data`` (the last may be short)."""
    return [xxhash.xxh3_64_digest(data[i:i + block_size])
            for i in range(0, len(data), block_size)]


def xattr_digest(items: list[tuple[bytes, bytes]]) -> bytes:
    """A digest of user xattrs (name, value), independent of listing order."""
    return xxhash.xxh3_64_digest(msgpack.packb(sorted(items), use_bin_type=True))


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
