"""Mirrorline against rsync and lsyncd, side by side on the same data (issue 5).

    make bench         full sizes (issue 5's table), medians of several runs
    make bench-quick   smaller sizes, fewer runs, under two minutes
    python bench/run.py --smoke   every workload once at tiny sizes (see bench/smoke.py)

Prints one table (workload, Mirrorline, peers, ratio, goal, met?) and, except in smoke
mode, rewrites this profile's section of bench/RESULTS.md. Exit status: 0 when every
workload ran (goals met or not), 1 when one crashed or a copy did not converge, 2 on
bad arguments. Everything started is stopped, and every FUSE mount unmounted, on the
way out, also on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.data import MIB, Pool  # noqa: E402
from bench.methods import METHODS  # noqa: E402
from bench.peers import find_peers  # noqa: E402
from bench.procs import Processes, mounts_under  # noqa: E402
from bench.profiles import PROFILES, Profile  # noqa: E402
from bench.report import (  # noqa: E402
    Row,
    git_commit,
    load_average,
    machine_facts,
    render_section,
    table,
    update_results,
)
from bench.spy import Spy, find_py_spy  # noqa: E402
from bench.spy import active as active_spy  # noqa: E402

WORKLOAD_KEYS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9")


@dataclass
class Options:
    profile: Profile
    only: set[str] = field(default_factory=set)
    workdir_parent: Path | None = None
    keep: bool = False
    install: bool = True
    without: set[str] = field(default_factory=set)
    write_results: bool = True
    log_level: str = "info"


@dataclass
class Outcome:
    rows: list[Row]
    errors: list[str]
    notes: list[str]
    facts: dict[str, str] = field(default_factory=dict)
    skipped: str = ""   # why nothing ran (no FUSE), empty otherwise


def fuse_unavailable_reason() -> str | None:
    """Why a FUSE mount cannot work here, or None (same policy as the tests)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 is not importable: {exc}"
    return None


def default_workdir_parent() -> Path:
    """On disk, not tmpfs: $BENCH_TMPDIR, else /var/tmp, else the temp dir."""
    env = os.environ.get("BENCH_TMPDIR")
    if env:
        return Path(env)
    return Path("/var/tmp") if os.path.isdir("/var/tmp") else Path(tempfile.gettempdir())


def sizes_text(p: Profile) -> list[str]:
    return [
        f"W1 {p.w1_file // MIB} MiB file, {p.w1_writes} overwrites, {p.runs} runs",
        f"W2 {p.w2_rate / 1e6:g} MB/s for {p.w2_seconds:g} s, {p.lag_runs} run(s)",
        f"W3 {p.w3_bytes // MIB} MiB, {p.heavy_runs} runs",
        f"W4 {p.w4_writes} writes, {p.runs} runs",
        f"W5 {p.w5_files} files, {p.runs} runs",
        f"W6 {p.w6_files} files / {p.w6_bytes / 1e6:g} MB, {p.mirror_runs} run(s)",
        f"W7 that tree, {p.heavy_runs} runs",
        f"W8 {p.w8_bytes // MIB} MiB, {p.w8_runs} run(s)",
        f"W9 {p.w9_runs} runs",
    ]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(opts: Options) -> Outcome:
    """Run the selected workloads of ``opts.profile``; never leaves a process or mount."""
    from bench import replicator

    why = fuse_unavailable_reason() or replicator.agents_installed()
    if why is not None:
        return Outcome([], [], [], skipped=why)
    from bench.workloads import RUN_ORDER, WORKLOADS, Bench

    p = opts.profile
    load_start = load_average()
    parent = opts.workdir_parent or default_workdir_parent()
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mirrorline-bench-", dir=parent))
    procs = Processes(workdir)
    notes: list[str] = []
    old_term = signal.signal(signal.SIGTERM, _terminate)
    old_hup = signal.signal(signal.SIGHUP, _terminate)
    rows: dict[str, list[Row]] = {}
    bench: Bench | None = None
    facts: dict[str, str] = {}
    try:
        peers = find_peers(opts.install, opts.without)
        for message in peers.messages:
            _say(message)
        notes += peers.messages
        replicator.use_log_level(workdir, opts.log_level)
        bench = Bench(p, workdir, procs, peers, Pool())
        try:
            bench.main = replicator.Replicator(procs, workdir / "main")
            bench.main.start()
        except Exception as exc:
            bench.main_error = f"{type(exc).__name__}: {exc}"
            bench.errors.append(f"starting the Mirrorline pair: {bench.main_error}")
            _say(f"the Mirrorline pair did not start: {bench.main_error}")
        for key in RUN_ORDER:
            if opts.only and key not in opts.only and not (key == "W6" and "W7" in opts.only):
                continue
            _say(f"{key} …")
            t0 = time.monotonic()
            spy = active_spy()
            if spy is not None:
                spy.begin(key, workdir)
            try:
                rows[key] = WORKLOADS[key](bench)
            except Exception as exc:  # outside a side's attempt (data generation, …)
                traceback.print_exc()
                message = f"{key}: {type(exc).__name__}: {exc}"
                bench.errors.append(message)
                rows[key] = [Row(key, "crashed", "error", "error", "n/a", "", "n/a",
                                 [message[:600]])]
            if spy is not None:
                for top in spy.end():
                    _say(f"profile: {top}")
            _say(f"{key} done in {time.monotonic() - t0:.1f} s")
        versions = {"rsync": peers.version("rsync"), "lsyncd": peers.version("lsyncd")}
        facts = machine_facts(workdir, versions, load_start)
    finally:
        for problem in procs.close():
            _say(problem)
            notes.append(problem)
        if mounts_under(workdir):
            _say(f"FUSE mounts remain under {workdir}: not removing it")
        elif not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            _say(f"kept {workdir}")
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
    ordered = [r for key in ("W1", "W2", "W3", "W4", "W5", "W6", "W8", "W9")
               for r in rows.get(key, [])]
    return Outcome(ordered, bench.errors if bench else [], notes, facts)


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller sizes, fewer runs")
    mode.add_argument("--smoke", action="store_true",
                      help="each workload once at tiny sizes; no RESULTS.md")
    ap.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W5")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="parent of the temp dir (default $BENCH_TMPDIR or /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install missing peers")
    ap.add_argument("--without", default="",
                    help="treat these peers as missing (rsync,lsyncd)")
    ap.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    ap.add_argument("--log-level", default="info", help="the agents' log level (info)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="sample the agents with py-spy during each workload; raw stacks "
                         "and top-frame summaries go to DIR (see bench/spy.py)")
    return ap.parse_args(list(argv))


def options_from(args: argparse.Namespace, profile: Profile) -> Options:
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    unknown = only - set(WORKLOAD_KEYS)
    if unknown:
        raise SystemExit(f"bench/run.py: unknown workload(s): {', '.join(sorted(unknown))}")
    without = {w.strip() for w in args.without.split(",") if w.strip()}
    return Options(profile, only, args.workdir, args.keep, not args.no_install, without,
                   not args.no_results, args.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        from bench import smoke

        return smoke.main(args)
    profile = PROFILES["quick" if args.quick else "full"]
    opts = options_from(args, profile)
    if args.profile is not None:
        exe = find_py_spy()
        if exe is None:
            _say("--profile: py-spy not found (pip install py-spy); running unprofiled")
        else:
            Spy(args.profile.resolve(), exe).start()
    started = time.monotonic()
    commit = git_commit(REPO)
    print(f"Mirrorline bench — {profile.label}", flush=True)
    try:
        outcome = run_bench(opts)
    except KeyboardInterrupt:
        _say("interrupted; everything started was stopped")
        return 130
    if outcome.skipped:
        print(f"bench: cannot run Mirrorline here: {outcome.skipped}")
        return 1
    print()
    print(table(outcome.rows))
    print()
    for error in outcome.errors:
        print(f"ERROR: {error}")
    elapsed = time.monotonic() - started
    if opts.write_results and not opts.only:
        section = render_section(profile, commit, outcome.facts, sizes_text(profile),
                                 outcome.rows,
                                 outcome.notes + [f"ERROR: {e}" for e in outcome.errors],
                                 elapsed)
        update_results(profile, section, METHODS)
        print(f"wrote {Path(__file__).resolve().parent / 'RESULTS.md'} ({profile.name} section)")
    print(f"bench took {elapsed:.0f} s")
    return 1 if outcome.errors else 0


if __name__ == "__main__":
    sys.exit(main())
