"""Fixtures of the system tests: a Cluster of real agents, always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.harness import Cluster


@pytest.fixture
def cluster(tmp_path: Path, require_fuse: None) -> Iterator[Cluster]:
    """Agents started in ``tmp_path``; all stopped (and unmounted) after the test."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
