"""Watch mode's persisted index: what was last sent of every entry of a watch volume.

One SQLite database per volume (``state_dir/watch/<volume>.sqlite``), keyed by the
entry's path relative to the volume root (bytes). A row holds the entry's kind,
its metadata as last sent, and for regular files the xxh3-64 hash of every 64 KiB
block as sent, so a change sends only the blocks that differ from it.

The index never runs ahead of the journal: a batch of rows is committed only after
the ops made from them are durable in the journal (see ``watch.Watcher``). After a
crash it may lag behind (ops durable, rows not): the next comparison then finds a
difference that is already on its way, and sends it again, which is harmless.

Stat comparisons and "racy" entries
-----------------------------------
A restart compares each entry's stat with its row instead of reading it. That is
only sound for rows recorded well after the entry's last change: file system
timestamps are coarse (one clock tick), so a write in the same tick as the state
that was read leaves mtime and ctime unchanged. A row whose mtime or ctime is less
than :data:`RACY_NS` before the moment it was recorded is *racy* (git's name for
the same problem) and is compared by content after an unclean stop.

After a clean stop racy rows are trusted: while the agent runs, a write in the same
tick as a read of the file comes after that read, so its event makes the watcher
read the file again, and a clean stop handles every event queued before it (the
watcher's final batch) before it marks the index clean. Only a write in the few
milliseconds between that last batch and the end of the process could be missed.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

#: A row recorded less than this long after its entry's mtime/ctime is compared by
#: content, never by stat alone (two seconds covers any kernel clock tick).
RACY_NS: Final = 2_000_000_000
_SCHEMA_VERSION: Final = "1"
_HASH: Final = 8


@dataclass(slots=True)
class IndexEntry:
    """What was last sent of one entry (kind: file, dir, symlink, fifo)."""

    path: bytes
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    xattrs: bytes = b""
    link: bytes = b""
    hashes: bytes = b""
    recorded_ns: int = 0

    def block_hash(self, index: int) -> bytes:
        return self.hashes[index * _HASH:(index + 1) * _HASH]

    def same_stat(self, st: os.stat_result, *, racy_ok: bool = False) -> bool:
        """True when ``st`` says nothing changed since the row, and the row is not racy
        (unless ``racy_ok``: after a clean stop, see the module docstring)."""
        return (st.st_size == self.size and st.st_mtime_ns == self.mtime_ns
                and st.st_ctime_ns == self.ctime_ns and st.st_ino == self.ino
                and (racy_ok or max(self.mtime_ns, self.ctime_ns)
                     < self.recorded_ns - RACY_NS))


def subtree_bounds(path: bytes) -> tuple[bytes, bytes]:
    """(low, high): every path strictly under ``path`` sorts in [low, high)."""
    if not path:
        return b"", b"\xff" * 4097
    return path + b"/", path + b"0"     # "0" is the byte after "/"


class WatchIndex:
    """The rows of one watch volume. Used from the agent's trio thread only.

    Changes are buffered in an SQLite transaction until :meth:`commit`.
    """

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (path BLOB PRIMARY KEY, kind TEXT, mode INT, "
            "uid INT, gid INT, size INT, mtime_ns INT, ctime_ns INT, ino INT, xattrs BLOB, "
            "link BLOB, hashes BLOB, recorded_ns INT) WITHOUT ROWID")
        self._db.execute("CREATE INDEX IF NOT EXISTS entries_ino ON entries (ino)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        version = self.meta("version")
        if version is None:
            self.set_meta("version", _SCHEMA_VERSION)
        elif version != _SCHEMA_VERSION:
            raise ValueError(f"{path}: watch index version {version!r}, this agent reads "
                             f"{_SCHEMA_VERSION!r} (move the file away to start afresh)")
        self._db.commit()

    # -- meta -------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def complete(self) -> bool:
        """True once a whole-tree scan has filled the index."""
        return self.meta("complete") == "1"

    # -- rows -------------------------------------------------------------------------

    def get(self, path: bytes) -> IndexEntry | None:
        row = self._db.execute("SELECT * FROM entries WHERE path = ?", (path,)).fetchone()
        return None if row is None else _entry(row)

    def put(self, entry: IndexEntry) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.path, entry.kind, entry.mode, entry.uid, entry.gid, entry.size,
             entry.mtime_ns, entry.ctime_ns, entry.ino, entry.xattrs, entry.link,
             entry.hashes, entry.recorded_ns))

    def with_ino(self, ino: int) -> list[IndexEntry]:
        """Rows of regular files with inode number ``ino`` (hard link candidates)."""
        rows = self._db.execute("SELECT * FROM entries WHERE ino = ? AND kind = 'file'",
                                (ino,)).fetchall()
        return [_entry(r) for r in rows]

    def remove_tree(self, path: bytes) -> int:
        """Remove ``path`` and everything under it; returns how many rows went."""
        low, high = subtree_bounds(path)
        removed = self._db.execute("DELETE FROM entries WHERE path = ? OR "
                                   "(path >= ? AND path < ?)", (path, low, high)).rowcount
        return int(removed)

    def under(self, path: bytes) -> Iterator[bytes]:
        """Paths of the rows strictly under ``path``, sorted."""
        low, high = subtree_bounds(path)
        rows = self._db.execute("SELECT path FROM entries WHERE path >= ? AND path < ? "
                                "ORDER BY path", (low, high)).fetchall()
        return (bytes(r[0]) for r in rows)

    def move_tree(self, old: bytes, new: bytes) -> int:
        """Rename the rows of ``old`` and everything under it to ``new``; whatever the
        index held at ``new`` goes first (a rename replaces its destination)."""
        self.remove_tree(new)
        low, high = subtree_bounds(old)
        rows = self._db.execute("SELECT * FROM entries WHERE path = ? OR (path >= ? AND "
                                "path < ?)", (old, low, high)).fetchall()
        self.remove_tree(old)
        for row in rows:
            entry = _entry(row)
            entry.path = new + entry.path[len(old):]
            self.put(entry)
        return len(rows)

    def exchange(self, a: bytes, b: bytes) -> None:
        """Swap the rows of ``a`` and ``b`` and of everything under each."""
        rows = {}
        for top in (a, b):
            low, high = subtree_bounds(top)
            rows[top] = [_entry(r) for r in self._db.execute(
                "SELECT * FROM entries WHERE path = ? OR (path >= ? AND path < ?)",
                (top, low, high)).fetchall()]
        for top in (a, b):
            self.remove_tree(top)
        for top, other in ((a, b), (b, a)):
            for entry in rows[top]:
                entry.path = other + entry.path[len(top):]
                self.put(entry)

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM entries").fetchone()[0])

    def commit(self) -> None:
        self._db.commit()

    def rollback(self) -> None:
        self._db.rollback()

    def close(self) -> None:
        self._db.commit()
        self._db.close()


def _entry(row: tuple[Any, ...]) -> IndexEntry:
    path, kind, mode, uid, gid, size, mtime, ctime, ino, xattrs, link, hashes, recorded = row
    return IndexEntry(bytes(path), str(kind), int(mode), int(uid), int(gid), int(size),
                      int(mtime), int(ctime), int(ino), bytes(xattrs), bytes(link),
                      bytes(hashes), int(recorded))
