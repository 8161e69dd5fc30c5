"""Trees to protect: generated straight into a directory (no mount), fast, deterministic.

:func:`build_tree` makes the kind of directory a user already has when they first protect
it: thousands of small files, a large file, sparse files, hardlinks, symlinks, user xattrs,
odd and non-UTF-8 names, fifos, nested directories with their own modes, owners and times.
:func:`build_flat_tree` makes many tiny files for the memory test.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

ODD_NAMES = [b"caf\xc3\xa9", b"bad-\xff\xfe", b"sp ace", b"\xe2\x98\x83snow", b"x\x01ctl",
             b"long-" + b"n" * 120, b"-dash", b"new\nline", b"star*q?"]
SPARSE_SIZE = 48 << 20


@dataclass
class TreeInfo:
    """What :func:`build_tree` made (bytes paths relative to the root)."""

    root: Path
    files: int = 0                  # regular files (each hardlink name counted once)
    data_bytes: int = 0             # bytes of data, once per inode, holes not counted
    large: bytes = b""
    sparse: list[bytes] = field(default_factory=list)
    hardlinks: list[tuple[bytes, bytes]] = field(default_factory=list)
    symlinks: list[bytes] = field(default_factory=list)
    small: list[bytes] = field(default_factory=list)
    dirs: list[bytes] = field(default_factory=list)


def _write(path: bytes, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.chmod(path, mode)


def build_tree(root: Path, *, seed: int = 1, small_files: int = 2000,
               large_bytes: int = 32 << 20) -> TreeInfo:
    """Fill ``root`` (created if needed) with a varied tree; see the module docstring.

    Directory mtimes are set last, after their contents, so they survive the build.
    """
    rng = random.Random(seed)
    broot = os.fsencode(root)
    os.makedirs(broot, exist_ok=True)
    info = TreeInfo(root)

    # Nested directories: d0..d7, each with two levels below, some with odd names.
    dirs = [b""]
    for i in range(8):
        top = b"d%d" % i if i % 3 else b"d%d-" % i + ODD_NAMES[i % len(ODD_NAMES)]
        dirs.append(top)
        for j in range(3):
            mid = os.path.join(top, b"m%d" % j)
            dirs.append(mid)
            if j == 0:
                dirs.append(os.path.join(mid, b"deep"))
    for d in dirs[1:]:
        os.mkdir(os.path.join(broot, d))
    info.dirs = dirs[1:]

    # Small files, spread over the directories; some odd names, some modes and owners.
    for n in range(small_files):
        d = dirs[n % len(dirs)]
        name = b"f%05d" % n
        if n % 97 == 0:
            name += b"-" + ODD_NAMES[(n // 97) % len(ODD_NAMES)]
        rel = os.path.join(d, name)
        size = rng.choice([0, 1, 17, 511, 1024, 2000, 4096, 4097, 6000])
        data = rng.randbytes(size)
        full = os.path.join(broot, rel)
        _write(full, data, rng.choice([0o644, 0o600, 0o640, 0o755, 0o444]))
        if n % 50 == 1:
            os.chown(full, 4242, 4343)
        if n % 40 == 2:
            os.setxattr(full, "user.tag", b"v%d" % n)
            os.setxattr(full, "user.bin", rng.randbytes(rng.randrange(1, 300)))
        t = rng.randrange(10**18, 17 * 10**17 + 10**18)
        os.utime(full, ns=(t, t))
        info.small.append(rel)
        info.files += 1
        info.data_bytes += size

    # One large file of random bytes (does not compress).
    info.large = os.path.join(dirs[1], b"large.bin")
    _write(os.path.join(broot, info.large), rng.randbytes(large_bytes))
    info.files += 1
    info.data_bytes += large_bytes

    # Sparse files: data islands in a hole, a trailing hole, all hole.
    islands = os.path.join(dirs[2], b"sparse-islands")
    fd = os.open(os.path.join(broot, islands), os.O_WRONLY | os.O_CREAT, 0o640)
    for off in (0, 5 << 20, 20 << 20, SPARSE_SIZE - 4096):
        os.pwrite(fd, rng.randbytes(4096), off)
        info.data_bytes += 4096
    os.close(fd)
    trailing = os.path.join(dirs[3], b"sparse-trailing")
    fd = os.open(os.path.join(broot, trailing), os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, rng.randbytes(8192), 0)
    os.ftruncate(fd, SPARSE_SIZE)
    os.close(fd)
    info.data_bytes += 8192
    allhole = b"sparse-empty"
    fd = os.open(os.path.join(broot, allhole), os.O_WRONLY | os.O_CREAT, 0o600)
    os.ftruncate(fd, SPARSE_SIZE)
    os.close(fd)
    info.sparse = [islands, trailing, allhole]
    info.files += 3

    # Hardlinks: same directory, across directories, three names for one inode.
    for a, b in [(info.small[5], os.path.join(dirs[1], b"hl-same-dir")),
                 (info.small[6], os.path.join(dirs[4], b"hl-across")),
                 (info.small[6], os.path.join(dirs[5], b"hl-third-\xff"))]:
        os.link(os.path.join(broot, a), os.path.join(broot, b))
        info.hardlinks.append((a, b))

    # Symlinks: relative, absolute, dangling, to a directory, non-UTF-8 target; one owned.
    for name, target in [(b"ln-rel", b"d1/f00001"), (b"ln-abs", b"/etc/hostname"),
                         (b"ln-dangling", b"nowhere/at/all"), (b"ln-dir", b"d2"),
                         (b"ln-odd-\xfe", b"bad-\xff\xfe")]:
        full = os.path.join(broot, dirs[6], name)
        os.symlink(target, full)
        info.symlinks.append(os.path.join(dirs[6], name))
    os.chown(os.path.join(broot, info.symlinks[0]), 4242, 4343, follow_symlinks=False)

    # Fifos, an empty directory, a directory xattr.
    os.mkfifo(os.path.join(broot, dirs[7], b"fifo"), 0o640)
    os.mkfifo(os.path.join(broot, b"fifo-\xff"), 0o600)
    os.mkdir(os.path.join(broot, b"empty-dir"), 0o700)
    info.dirs.append(b"empty-dir")
    os.setxattr(os.path.join(broot, dirs[2]), "user.dir", b"on a directory")

    # Directory modes, owners, times: deepest first, so parents keep theirs.
    for k, d in enumerate(sorted(info.dirs, key=len, reverse=True)):
        full = os.path.join(broot, d)
        if k % 4 == 1:
            os.chown(full, 4242, 4343)
        os.chmod(full, [0o755, 0o750, 0o700, 0o775][k % 4])
        t = 1_600_000_000_000_000_000 + k * 10**9
        os.utime(full, ns=(t, t))
    return info


def build_flat_tree(root: Path, files: int, per_dir: int = 1000) -> int:
    """``files`` tiny files (a few bytes each) in directories of ``per_dir``; returns bytes."""
    broot = os.fsencode(root)
    os.makedirs(broot, exist_ok=True)
    total = 0
    for n in range(files):
        d = os.path.join(broot, b"dir%04d" % (n // per_dir))
        if n % per_dir == 0:
            os.mkdir(d)
        data = b"%d\n" % n
        fd = os.open(os.path.join(d, b"f%06d" % n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
        total += len(data)
    return total


def walk_names(root: Path) -> set[bytes]:
    """Every entry below ``root``, as bytes paths relative to it."""
    broot = os.fsencode(root)
    out: set[bytes] = set()
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), broot))
    return out
