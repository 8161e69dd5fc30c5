"""The target's durable state file: applied seq and whatever else the session keeps.

A save is atomic and durable: the JSON goes to ``<name>.tmp`` beside the state file,
is fsynced, renamed over the state file, and the directory is fsynced. After a crash
the file holds either the old state or the new one, never a mix; a leftover
``.tmp`` is simply overwritten by the next save. One store has one writer.
"""

from __future__ import annotations

import json
import os
from typing import Any


class CheckpointError(Exception):
    """The state file exists but cannot be read as a checkpoint (corrupt or not an object)."""


class CheckpointStore:
    """Load and atomically save one JSON state file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        directory, name = os.path.split(os.path.abspath(self.path))
        self._dir = directory
        self._tmp = os.path.join(directory, f".{name}.tmp")

    def load(self) -> dict[str, Any]:
        """The saved state, or ``{}`` when no state was ever saved.

        Raises:
            CheckpointError: the file is not a JSON object (names the file).
            OSError: the file exists but cannot be read.
        """
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        try:
            state = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint file {self.path} is corrupt: {exc}") from exc
        if not isinstance(state, dict):
            raise CheckpointError(
                f"checkpoint file {self.path} is corrupt: holds a {type(state).__name__}, "
                "not an object")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Replace the saved state with ``state``, durably, before returning.

        Raises:
            TypeError, ValueError: ``state`` is not JSON-serialisable (nothing written).
            OSError: writing, syncing or renaming failed; the old state is intact.
        """
        data = json.dumps(state, sort_keys=True, allow_nan=False).encode() + b"\n"
        os.makedirs(self._dir, exist_ok=True)
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _remove_quietly(self._tmp)
            raise
        os.close(fd)
        try:
            os.replace(self._tmp, self.path)
        except BaseException:
            _remove_quietly(self._tmp)
            raise
        dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
