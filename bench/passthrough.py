"""The floor of the capture stack: a bare pyfuse3 passthrough mount, nothing recorded.

``python -m bench.passthrough BACKING MOUNTPOINT`` mounts a file system that passes
lookups, creates, writes and the rest straight to BACKING, with the same mount options
and trio/pyfuse3 main loop as the source agent's capture mount, but no journal, no inode
table beyond a path map, no sender. W4 and W5 measure the application's writes through
it in the same run as Mirrorline's: what is left between the two is Mirrorline's own
cost; what is left between it and the plain disk is the FUSE round trip through Python,
which no change inside Mirrorline can remove.

Not a general file system: enough operations for the bench's writers (mkdir, create,
open, write, read, release, getattr, getxattr, unlink, rmdir, readdir) and nothing
else. Stops on SIGTERM/SIGINT and unmounts.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import pyfuse3
import trio

_ATTRS = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
          "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blocks")


class Passthrough(pyfuse3.Operations):
    def __init__(self, root: str) -> None:
        super().__init__()
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: root}

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _attrs(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        self._paths.setdefault(st.st_ino, path)
        attrs = pyfuse3.EntryAttributes()
        for name in _ATTRS:
            setattr(attrs, name, getattr(st, name))
        attrs.st_blksize = 4096
        attrs.entry_timeout = attrs.attr_timeout = 1.0
        return attrs

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None,
                     ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._child(parent_inode, name))

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        attrs = self._attrs(self._path(inode))
        attrs.st_ino = inode
        return attrs

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any,
                    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        _call(os.mkdir, path, mode)
        return self._attrs(path)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any,
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd = _call(os.open, path, flags | os.O_CREAT, mode)
        return pyfuse3.FileInfo(fh=fd), self._attrs(path)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=_call(os.open, self._path(inode), flags & ~os.O_CREAT))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        data: bytes = _call(os.pread, fh, size, off)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        written: int = _call(os.pwrite, fh, buf, off)
        return written

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        _call(os.fdatasync if datasync else os.fsync, fh)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        _call(os.unlink, self._child(parent_inode, name))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        _call(os.rmdir, self._child(parent_inode, name))

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = sorted(os.listdir(self._path(fh)))
        for i, name in enumerate(entries[start_id:], start_id):
            attrs = self._attrs(os.path.join(self._path(fh), name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None


def _call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.passthrough BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    backing, mountpoint = argv
    # The capture mount's options (source_agent/capture.py), so the round trip is the same.
    pyfuse3.init(Passthrough(os.path.abspath(backing)), mountpoint,
                 {"fsname=mirrorline-floor", "allow_other", "default_permissions"})
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
