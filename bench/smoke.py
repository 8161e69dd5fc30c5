"""Smoke run of the bench: every workload once, at tiny sizes, in well under a minute.

``python bench/run.py --smoke`` (or ``python bench/smoke.py``) proves the harness
still works: it exits 1 if any workload crashed, a copy did not converge, or a
workload produced no row; 0 otherwise, whatever the figures. A peer that is not
installed is marked "missing" and is not a failure (nothing is installed in smoke
mode; ``--without rsync,lsyncd`` pretends both are absent). Without FUSE it says why
and exits 0, or 1 when ``MIRRORLINE_REQUIRE_FUSE=1`` (the test suite's policy).
RESULTS.md is never written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.profiles import SMOKE
from bench.report import table

EXPECTED = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9")


def main(args: argparse.Namespace) -> int:
    from bench.run import options_from, run_bench

    opts = options_from(args, SMOKE)
    opts.install = False
    opts.write_results = False
    started = time.monotonic()
    print(f"Mirrorline bench — {SMOKE.label}", flush=True)
    try:
        outcome = run_bench(opts)
    except KeyboardInterrupt:
        print("bench smoke: interrupted; everything started was stopped")
        return 130
    if outcome.skipped:
        print(f"bench smoke: skipped: {outcome.skipped}")
        return 1 if os.environ.get("MIRRORLINE_REQUIRE_FUSE") == "1" else 0
    print(table(outcome.rows))
    problems = list(outcome.errors)
    wanted = [k for k in EXPECTED if not opts.only or k in opts.only
              or (k == "W7" and "W6" in opts.only)]
    got = {r.key for r in outcome.rows}
    problems += [f"{k}: no row" for k in wanted if k not in got]
    elapsed = time.monotonic() - started
    for problem in problems:
        print(f"SMOKE FAILURE: {problem}")
    print(f"bench smoke: {'FAILED' if problems else 'ok'} in {elapsed:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    from bench.run import parse_args

    sys.exit(main(parse_args(["--smoke", *sys.argv[1:]])))
