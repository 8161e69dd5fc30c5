"""Small JSON state files, replaced atomically (write, fsync, rename, fsync dir)."""

from __future__ import annotations

import json
import os
import threading
from typing import Any


class StateFileError(Exception):
    """A state file exists but cannot be read or parsed."""


def load_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file does not exist.

    Raises:
        StateFileError: naming the file, when it is unreadable or not a JSON object.
    """
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateFileError(f"state file {path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(value, dict):
        raise StateFileError(f"state file {path} does not hold a JSON object")
    return value


def save_json(path: str, value: dict[str, Any]) -> None:
    """Replace ``path`` with ``value`` so that a crash leaves the old or the new file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    # A temp name of its own per writer, so two concurrent saves cannot trip on each other.
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(value, indent=1, sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
