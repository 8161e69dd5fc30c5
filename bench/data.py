"""Test data the workloads write, and the checks that a copy really converged.

Content is incompressible: slices of one random pool, each block prefixed with a tag
and its index so no two blocks of a run are equal and a reader can tell which write
it is looking at (the W2 lag probe reads exactly that header).
"""

from __future__ import annotations

import os
import random
import stat
import struct
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

POOL_BYTES = 16 * MIB
HEADER = struct.Struct("<8sQ")  # tag, block index


class Pool:
    """A random pool that blocks and files are cut from."""

    def __init__(self, seed: int = 20261127) -> None:
        self.data = random.Random(seed).randbytes(POOL_BYTES)

    def block(self, tag: bytes, index: int, size: int) -> bytes:
        """Block ``index`` of a run tagged ``tag`` (8 bytes): header, then pool bytes."""
        head = HEADER.pack(tag, index)
        if size <= HEADER.size:
            return head[:size]
        body = size - HEADER.size
        start = (index * 7919 * 4096) % (POOL_BYTES - body) if body < POOL_BYTES else 0
        chunk = self.data[start:start + body]
        while len(chunk) < body:  # a block larger than the pool
            chunk += self.data[:body - len(chunk)]
        return head + chunk


def new_tag() -> bytes:
    """A fresh 8-byte tag for one run's blocks."""
    return os.urandom(8)


def write_file(path: Path, pool: Pool, size: int, tag: bytes, chunk: int = MIB,
               fsync: bool = False) -> None:
    """Write ``size`` bytes of pool blocks to ``path`` in ``chunk`` writes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        index = 0
        while done < size:
            n = min(chunk, size - done)
            os.write(fd, pool.block(tag, index, n))
            done += n
            index += 1
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def tree_sizes(files: int, total: int, seed: int) -> list[int]:
    """Log-normal file sizes (many small, a few large) adding up to about ``total``."""
    rng = random.Random(seed)
    raw = [rng.lognormvariate(0.0, 1.5) for _ in range(files)]
    scale = total / sum(raw)
    return [max(1, int(r * scale)) for r in raw]


def make_tree(root: Path, pool: Pool, files: int, total: int, seed: int = 7,
              per_dir: int = 100) -> tuple[int, int]:
    """Create ``files`` files of about ``total`` bytes under ``root``; return (files, bytes)."""
    sizes = tree_sizes(files, total, seed)
    tag = b"tree%04d" % (seed % 10000)
    written = 0
    for i, size in enumerate(sizes):
        d = root / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(pool.block(tag, i, size))
        written += size
    return len(sizes), written


def files_equal(a: Path, b: Path, chunk: int = 4 * MIB) -> bool:
    """Byte-for-byte equality of two regular files."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
            return False
        while True:
            x = fa.read(chunk)
            y = fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def tree_diff(a: Path, b: Path, limit: int = 20) -> list[str]:
    """Differences between two trees: names, types, sizes, file content, link targets.

    Streams file content (no tree is held in memory); ``limit`` bounds the report.
    Modes, owners and times are left out on purpose: lsyncd's rsync (-lts) does not
    carry modes, and the question asked here is whether the data converged.
    """
    problems: list[str] = []
    ea, eb = _entries(a), _entries(b)
    for rel in sorted(set(ea) | set(eb)):
        if len(problems) >= limit:
            problems.append("…")
            break
        if rel not in eb:
            problems.append(f"missing from copy: {rel}")
            continue
        if rel not in ea:
            problems.append(f"only in copy: {rel}")
            continue
        (ka, sa), (kb, sb) = ea[rel], eb[rel]
        if ka != kb:
            problems.append(f"type differs: {rel}")
        elif stat.S_ISREG(ka) and (sa != sb or not files_equal(a / rel, b / rel)):
            problems.append(f"content differs: {rel}")
        elif stat.S_ISLNK(ka) and os.readlink(a / rel) != os.readlink(b / rel):
            problems.append(f"link target differs: {rel}")
    return problems


def _entries(root: Path) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (stat.S_IFMT(st.st_mode), st.st_size)
    return out


def size_mtime_index(root: Path) -> dict[str, tuple[int, int]] | None:
    """{name: (size, mtime_ns)} of the regular files directly in ``root`` (None if absent).

    The cheap test a poller uses to see a plain copy arrive; rsync sets the times on
    its temp file before renaming it, so a matching entry is a finished file.
    """
    try:
        with os.scandir(root) as it:
            return {e.name: (st.st_size, st.st_mtime_ns)
                    for e in it if not e.name.startswith(".")
                    for st in (e.stat(follow_symlinks=False),) if stat.S_ISREG(st.st_mode)}
    except FileNotFoundError:
        return None


def size_mtime(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns
