"""Sizes and run counts: the full bench (issue 5's sizes), quick, and smoke."""

from __future__ import annotations

from dataclasses import dataclass

from bench.data import GIB, MIB


@dataclass(frozen=True)
class Profile:
    name: str
    label: str
    runs: int            # runs of the cheap workloads (W1, W4, W5, W9); the median is shown
    heavy_runs: int      # runs of W3 and W7
    mirror_runs: int     # runs of W6 (each restarts the target over an emptied replica)
    lag_runs: int        # runs of W2 (each pools its samples; the median of p50/p99 is shown)
    w1_file: int         # bytes of the overwritten file
    w1_writes: int       # random 4 KiB overwrites
    w2_seconds: float    # duration of the steady writer
    w2_rate: float       # bytes per second
    w3_bytes: int
    w4_writes: int
    w5_files: int
    w6_files: int
    w6_bytes: int
    w8_bytes: int
    w8_runs: int
    w9_runs: int
    timeout: float       # bound on any single wait


FULL = Profile(
    name="full", label="Full run (`make bench`): issue 5's sizes",
    runs=5, heavy_runs=3, mirror_runs=3, lag_runs=3,
    w1_file=512 * MIB, w1_writes=1000,
    w2_seconds=20.0, w2_rate=20e6,
    w3_bytes=1 * GIB,
    w4_writes=20_000,
    w5_files=2000,
    w6_files=10_000, w6_bytes=800 * 10**6,
    w8_bytes=4 * GIB, w8_runs=2,
    w9_runs=20,
    timeout=1800.0,
)

QUICK = Profile(
    name="quick",
    label="QUICK run (`make bench-quick`): smaller sizes, fewer runs; indicative only, "
          "the goals are for the full sizes",
    runs=3, heavy_runs=2, mirror_runs=1, lag_runs=1,
    w1_file=64 * MIB, w1_writes=1000,
    w2_seconds=3.0, w2_rate=20e6,
    w3_bytes=128 * MIB,
    w4_writes=2000,
    w5_files=500,
    w6_files=500, w6_bytes=40 * 10**6,
    w8_bytes=128 * MIB, w8_runs=1,
    w9_runs=3,
    timeout=300.0,
)

SMOKE = Profile(
    name="smoke",
    label="SMOKE (tiny sizes, one run: checks the harness, not the speed)",
    runs=1, heavy_runs=1, mirror_runs=1, lag_runs=1,
    w1_file=4 * MIB, w1_writes=50,
    w2_seconds=0.5, w2_rate=20e6,
    w3_bytes=8 * MIB,
    w4_writes=300,
    w5_files=50,
    w6_files=40, w6_bytes=2 * 10**6,
    w8_bytes=8 * MIB, w8_runs=1,
    w9_runs=1,
    timeout=60.0,
)

PROFILES = {p.name: p for p in (FULL, QUICK, SMOKE)}
