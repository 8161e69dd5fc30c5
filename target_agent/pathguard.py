"""Resolve op paths inside a replica root without ever leaving it (DESIGN §5).

Theory of operation
-------------------
The guard holds a descriptor on the replica root. A relative path ``a/b/c`` is
resolved by opening ``a`` relative to the root descriptor, ``b`` relative to
that, and so on, each with ``O_PATH | O_DIRECTORY | O_NOFOLLOW``. The kernel then
refuses a symlink or a non-directory at every intermediate step (``ENOTDIR``), so
a symlink planted in the replica (``evil -> /etc``) cannot carry an op outside the
root, and nothing is ever resolved through a textual path. The last component is
returned as a *name* relative to its parent's descriptor: the caller acts on it
with an ``*at`` call that does not follow a symlink either.

Parent descriptors are cached by directory path (a bounded LRU). A cached
descriptor names the directory *inode*, so it stays correct as long as no
directory on the path is renamed or removed; the applier calls
:meth:`PathGuard.invalidate` after every rename, rmdir and exchange, which is the
only way (for the applier, the replica's single writer) that a cached path can
stop naming the inode it did.

Descriptors handed out are borrowed: they stay open until the next call to
:meth:`open_parent`, :meth:`open_parents`, :meth:`invalidate` or :meth:`close`
(the LRU is trimmed at the *start* of a resolution, never while one is in use).
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from typing import Final

from protocol.errors import ProtocolError
from protocol.ops import check_relative_path

DEFAULT_CACHE_SIZE: Final = 1024

#: A replica root as the operator gives it.
RootPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]

_STEP_FLAGS: Final = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def show_path(path: bytes) -> str:
    """A printable, always-encodable form of a path for messages and logs."""
    return path.decode("utf-8", "backslashreplace")


class PathError(Exception):
    """A path is unsafe to resolve: lexically wrong, or crosses a symlink or non-directory.

    ``path`` is the offending path and ``reason`` a few words saying why.
    """

    def __init__(self, path: bytes, reason: str) -> None:
        super().__init__(f"{show_path(path)!r}: {reason}")
        self.path = path
        self.reason = reason


class PathGuard:
    """Resolve relative ``bytes`` paths under one replica root, one component at a time.

    Not thread-safe: one thread uses a guard at a time.
    """

    def __init__(self, root: RootPath, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """Open (creating it with parents if missing) the replica root.

        Args:
            root: the replica root directory; it may itself be reached through symlinks
                (it is the operator's configuration, not peer input).
            cache_size: how many parent-directory descriptors to keep open.

        Raises:
            OSError: the root cannot be created or opened as a directory.
        """
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        os.makedirs(root, exist_ok=True)
        self._root_fd: int = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cache_size = cache_size
        self._dirs: OrderedDict[bytes, int] = OrderedDict()

    @property
    def root_fd(self) -> int:
        """The root directory's descriptor (``O_RDONLY | O_DIRECTORY``), owned by the guard."""
        if self._root_fd < 0:
            raise ValueError("PathGuard is closed")
        return self._root_fd

    def open_parent(self, path: bytes) -> tuple[int, bytes]:
        """Resolve every component of ``path`` but the last.

        Returns:
            ``(parent_fd, name)``: a borrowed descriptor on the parent directory (valid
            until the next call on this guard) and the last component.

        Raises:
            PathError: the path is not a clean relative path, or an intermediate
                component is a symlink or not a directory.
            OSError: an intermediate directory is missing (``ENOENT``) or cannot be
                opened; the caller decides whether that is tolerable.
        """
        self._trim()
        return self._resolve(path)

    def open_parents(
        self, first: bytes, second: bytes
    ) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        """Resolve two paths at once (rename, link): both results stay valid together.

        Errors as for :meth:`open_parent`.
        """
        self._trim()
        # The cache may exceed its bound by the depth of these two paths until the
        # next call; that keeps the first result open while the second resolves.
        return self._resolve(first), self._resolve(second)

    def invalidate(self) -> None:
        """Close every cached directory descriptor (after a rename, rmdir or exchange)."""
        dirs, self._dirs = self._dirs, OrderedDict()
        for fd in dirs.values():
            os.close(fd)

    def close(self) -> None:
        """Close the cache and the root descriptor. Idempotent."""
        self.invalidate()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> PathGuard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _trim(self) -> None:
        while len(self._dirs) > self._cache_size:
            _, fd = self._dirs.popitem(last=False)
            os.close(fd)

    def _resolve(self, path: bytes) -> tuple[int, bytes]:
        if not isinstance(path, bytes):
            raise PathError(os.fsencode(str(path)), "path is not bytes")
        try:
            check_relative_path(path)
        except ProtocolError as exc:
            raise PathError(path, str(exc)) from exc
        root_fd = self.root_fd
        cut = path.rfind(b"/")
        if cut < 0:
            return root_fd, path
        parent, name = path[:cut], path[cut + 1:]
        fd = self._dirs.get(parent)
        if fd is not None:
            self._dirs.move_to_end(parent)
            return fd, name
        # Start from the longest cached ancestor, or from the root.
        start, fd = 0, root_fd
        ends = [i for i in range(len(parent)) if parent[i] == 0x2F]  # '/' positions
        for end in reversed(ends):
            cached = self._dirs.get(parent[:end])
            if cached is not None:
                self._dirs.move_to_end(parent[:end])
                start, fd = end + 1, cached
                break
        while True:
            end = parent.find(b"/", start)
            stop = len(parent) if end < 0 else end
            fd = self._step(path, fd, parent[start:stop])
            self._dirs[parent[:stop]] = fd
            if end < 0:
                return fd, name
            start = end + 1

    def _step(self, path: bytes, dir_fd: int, component: bytes) -> int:
        try:
            return os.open(component, _STEP_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            try:
                st = os.stat(component, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                raise PathError(path, f"cannot resolve {show_path(component)!r}") from exc
            kind = "symlink" if stat.S_ISLNK(st.st_mode) else "non-directory"
            raise PathError(path, f"{kind} in path at {show_path(component)!r}") from exc
