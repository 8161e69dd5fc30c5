"""The benchmark harness must not rot: its smoke mode runs every workload once, tiny."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.fuse]

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke(require_fuse: None, tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for workload in ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9"):
        assert workload in result.stdout, f"{workload} missing from the smoke table"
