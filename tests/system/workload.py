"""A random workload of every op kind the capture layer handles, run through a mount."""

from __future__ import annotations

import ctypes
import errno
import os
import random
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

NAMES = [b"plain", b"caf\xc3\xa9", b"bad-\xff\xfe", b"sp ace", b"\xe2\x98\x83snow",
         b"x\x01ctl", b"long-" + b"n" * 100]


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Churn:
    """Random mutations under ``root`` (bytes paths, non-UTF-8 names included).

    Every step is a real syscall; failures that the random choice makes likely
    (ENOENT, EEXIST, ENOTEMPTY …) are ignored, as an application would see them.
    """

    def __init__(self, root: Path, seed: int) -> None:
        self.root = os.fsencode(root)
        self.rng = random.Random(seed)
        self.counts: dict[str, int] = {}

    def _pick_dir(self) -> bytes:
        dirs = [self.root]
        for dirpath, dirnames, _ in os.walk(self.root):
            dirs.extend(os.path.join(dirpath, d) for d in dirnames)
        return self.rng.choice(dirs)

    def _pick_entry(self, want: str = "any") -> bytes | None:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            if want in ("any", "dir"):
                found.extend(os.path.join(dirpath, d) for d in dirnames)
            if want in ("any", "file"):
                for f in filenames:
                    p = os.path.join(dirpath, f)
                    if want == "any" or (os.path.isfile(p) and not os.path.islink(p)):
                        found.append(p)
        return self.rng.choice(found) if found else None

    def _new_name(self) -> bytes:
        return os.path.join(self._pick_dir(),
                            self.rng.choice(NAMES) + b"-%d" % self.rng.randrange(40))

    def step(self) -> None:
        kinds = ["write", "write", "write", "sparse", "truncate", "create", "mkdir", "unlink",
                 "rmdir", "rename", "rename_over", "exchange", "noreplace", "link", "symlink",
                 "chmod", "chown", "utime", "setxattr", "removexattr", "mkfifo", "fallocate",
                 "append"]
        kind = self.rng.choice(kinds)
        try:
            getattr(self, f"_{kind}")()
            self.counts[kind] = self.counts.get(kind, 0) + 1
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR,
                                 errno.ENOTDIR, errno.EINVAL, errno.EPERM, errno.ENODATA,
                                 errno.EXDEV, errno.EMLINK, errno.EBUSY):
                raise

    def _file(self) -> bytes:
        path = self._pick_entry("file")
        if path is None or os.path.islink(path) or not os.path.isfile(path):
            path = self._new_name()
        return path

    def _write(self) -> None:
        path = self._file()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, self.rng.randbytes(self.rng.randrange(1, 20000)),
                      self.rng.randrange(0, 100_000))
        finally:
            os.close(fd)

    def _append(self) -> None:
        with open(self._file(), "ab") as f:
            f.write(self.rng.randbytes(self.rng.randrange(1, 3000)))

    def _sparse(self) -> None:
        fd = os.open(self._file(), os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            os.pwrite(fd, b"tail", self.rng.randrange(1 << 20, 8 << 20))
        finally:
            os.close(fd)

    def _truncate(self) -> None:
        os.truncate(self._file(), self.rng.randrange(0, 200_000))

    def _create(self) -> None:
        fd = os.open(self._new_name(), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     self.rng.choice([0o600, 0o644, 0o755]))
        os.write(fd, self.rng.randbytes(self.rng.randrange(0, 5000)))
        os.close(fd)

    def _mkdir(self) -> None:
        os.mkdir(self._new_name(), self.rng.choice([0o755, 0o700, 0o750]))

    def _unlink(self) -> None:
        path = self._pick_entry("file")
        if path:
            os.unlink(path)

    def _rmdir(self) -> None:
        path = self._pick_entry("dir")
        if path:
            os.rmdir(path)

    def _rename(self) -> None:
        path = self._pick_entry()
        if path:
            os.rename(path, self._new_name())

    def _rename_over(self) -> None:
        a, b = self._pick_entry("file"), self._pick_entry("file")
        if a and b and a != b:
            os.rename(a, b)

    def _exchange(self) -> None:
        a, b = self._pick_entry(), self._pick_entry()
        if a and b and a != b:
            renameat2(a, b, RENAME_EXCHANGE)

    def _noreplace(self) -> None:
        a = self._pick_entry()
        if a:
            renameat2(a, self._new_name(), RENAME_NOREPLACE)

    def _link(self) -> None:
        a = self._pick_entry("file")
        if a and not os.path.islink(a):
            os.link(a, self._new_name())

    def _symlink(self) -> None:
        os.symlink(self.rng.choice([b"plain-1", b"../x", b"/etc/passwd", b"bad-\xff"]),
                   self._new_name())

    def _chmod(self) -> None:
        path = self._pick_entry()
        if path and not os.path.islink(path):
            os.chmod(path, self.rng.choice([0o600, 0o640, 0o644, 0o755, 0o700, 0o4755]))

    def _chown(self) -> None:
        path = self._pick_entry()
        if path:
            os.chown(path, self.rng.choice([0, 1000, 4242]), self.rng.choice([0, 100, 4242]),
                     follow_symlinks=False)

    def _utime(self) -> None:
        path = self._pick_entry("file")
        if path and not os.path.islink(path):
            t = self.rng.randrange(10**18, 2 * 10**18)
            os.utime(path, ns=(t, t + self.rng.randrange(10**9)))

    def _setxattr(self) -> None:
        path = self._pick_entry()
        if path and not os.path.islink(path):
            os.setxattr(path, f"user.k{self.rng.randrange(4)}",
                        self.rng.randbytes(self.rng.randrange(0, 200)))

    def _removexattr(self) -> None:
        path = self._pick_entry()
        if path and not os.path.islink(path):
            os.removexattr(path, f"user.k{self.rng.randrange(4)}")

    def _mkfifo(self) -> None:
        os.mkfifo(self._new_name(), 0o640)

    def _fallocate(self) -> None:
        path = self._file()
        # posix_fallocate: the FUSE mount has no fallocate(2), so glibc's fallback
        # (read, then write zeros) runs; it needs a readable descriptor.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, self.rng.randrange(0, 50_000), self.rng.randrange(1, 50_000))
        finally:
            os.close(fd)
