"""Pre-shared key files: read and check them with errors that name the file."""

from __future__ import annotations

import os

from protocol.session import MIN_KEY_BYTES


class KeyFileError(Exception):
    """A key file is missing, unreadable, too short or readable by others."""


def read_key(path: str) -> bytes:
    """The key in ``path`` (surrounding whitespace stripped), at least 32 bytes.

    Raises:
        KeyFileError: naming the file and the problem.
    """
    try:
        with open(path, "rb") as f:
            key = f.read(4096).strip()
    except OSError as exc:
        raise KeyFileError(f"key file {path}: {exc.strerror}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"key file {path}: key is {len(key)} bytes, at least "
                           f"{MIN_KEY_BYTES} needed (make one with `mirrorline keygen {path}`)")
    return key


def key_file_warning(path: str) -> str | None:
    """A warning when the key file is readable by group or others, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o077:
        return f"key file {path} is readable by group/others (mode {mode & 0o777:o}); chmod 600"
    return None
