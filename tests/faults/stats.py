"""Counters of what the fault suite did, printed at the end of the run.

Every fault test adds what it survived (``count("kills")``, ``count("bytes_compared",
n)``…); ``tests/faults/conftest.py`` prints the totals after the run and writes them
to ``$MIRRORLINE_FAULT_STATS`` (a JSON file) when that is set, so ``make faults`` can
quote them. The counters are facts of this run, never expectations: a test asserts
its own outcome, these only add it up.
"""

from __future__ import annotations

from collections import Counter

TOTALS: Counter[str] = Counter()

#: The counters the closing notes quote, in print order; any other name is printed too.
KNOWN = ("scenarios", "kills", "link_cuts", "stalls", "corruptions", "bytes_compared",
         "files_compared", "enospc_pauses", "fuzz_cases")


def count(name: str, amount: int = 1) -> None:
    """Add ``amount`` to the counter ``name``."""
    TOTALS[name] += amount
