"""What both sides compute the same way for in-stream checks: block hashes, xattr digests."""

from __future__ import annotations

import stat
from typing import Final

import msgpack
import xxhash

BLOCK_SIZE: Final = 64 * 1024
#: A file is checked in ranges of this many bytes, one CHECK op each, so reading and
#: hashing one range under the volume's ordering point stays short.
RANGE_BYTES: Final = 8 * 1024 * 1024


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
