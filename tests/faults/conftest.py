"""Fixtures of the fault suite: the system tests' Cluster, plus the run's counters."""

from __future__ import annotations

import json
import os
from typing import Any

from tests.faults.stats import KNOWN, TOTALS
from tests.system.conftest import cluster

__all__ = ["cluster"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TOTALS:
        return
    names = [n for n in KNOWN if n in TOTALS] + sorted(set(TOTALS) - set(KNOWN))
    terminalreporter.section("fault suite totals")
    for name in names:
        terminalreporter.write_line(f"{name:>16}: {TOTALS[name]:,}")
    out = os.environ.get("MIRRORLINE_FAULT_STATS")
    if out:
        with open(out, "w") as f:
            json.dump(dict(TOTALS), f, indent=1, sort_keys=True)
