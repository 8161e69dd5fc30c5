"""Shared test fixtures: FUSE availability policy."""

from __future__ import annotations

import os
import shutil

import pytest


def fuse_unavailable_reason() -> str | None:
    """Why a FUSE mount cannot work here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 is not importable: {exc}"
    return None


@pytest.fixture
def require_fuse() -> None:
    """Skip a FUSE test when FUSE is missing, or fail if MIRRORLINE_REQUIRE_FUSE=1."""
    reason = fuse_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("MIRRORLINE_REQUIRE_FUSE") == "1":
        pytest.fail(f"FUSE required (MIRRORLINE_REQUIRE_FUSE=1) but {reason}")
    pytest.skip(reason)
