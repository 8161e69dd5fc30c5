"""Workloads W1-W9 of issue 5, each run on Mirrorline and on its peer in the same bench.

Every workload returns one table row (two for W7). A side that cannot run reads
"missing" (peer not installed) or "not available" (a Mirrorline command that does not
exist yet, e.g. ``mirror``); a side that raised reads "error" and makes the bench exit
non-zero. After each timed region the copy is compared with its source outside the
timing: a copy that did not converge is an error too.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from bench.data import (
    KIB,
    MIB,
    Pool,
    files_equal,
    make_tree,
    new_tag,
    size_mtime,
    size_mtime_index,
    tree_diff,
    write_file,
)
from bench.peers import Lsyncd, PeerMissingError, Peers, RsyncDaemon
from bench.procs import Processes
from bench.profiles import Profile
from bench.replicator import Replicator, cli_seconds, control, peak_rss_kib
from bench.report import Row, rate, seconds
from tests.system.harness import is_mounted

T = TypeVar("T")
PROBE = Path(__file__).resolve().parent / "probe.py"
W2_BLOCK = 64 * KIB


class NotAvailableError(Exception):
    """A Mirrorline feature the workload needs is not there (yet)."""


class DivergedError(Exception):
    """The copy is not identical to its source after the timed region."""


@dataclass
class Outcome(Generic[T]):
    value: T | None = None
    status: str = "ok"          # ok | missing | not available | error
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def cell(self, fmt: Callable[[T], str]) -> str:
        if self.value is not None and self.ok:
            return fmt(self.value)
        if self.status == "error":
            return "error (see details)"
        return self.status


@dataclass
class Bench:
    """What every workload shares."""

    profile: Profile
    workdir: Path
    procs: Processes
    peers: Peers
    pool: Pool
    main: Replicator | None = None
    main_error: str = ""
    errors: list[str] = field(default_factory=list)
    w3_rate: float | None = None   # Mirrorline's W3 MB/s, the yardstick of W8

    def attempt(self, what: str, fn: Callable[[], T]) -> Outcome[T]:
        """Run one side of a workload; sort its failure into missing / not available / error."""
        try:
            return Outcome(fn())
        except PeerMissingError as exc:
            return Outcome(status="missing", detail=str(exc))
        except NotAvailableError as exc:
            return Outcome(status="not available", detail=str(exc))
        except Exception as exc:
            print(f"bench: {what} failed:", file=sys.stderr)
            traceback.print_exc()
            message = f"{what}: {type(exc).__name__}: {exc}"
            self.errors.append(message)
            return Outcome(status="error", detail=message[:600])

    def replicator(self) -> Replicator:
        if self.main is None:
            raise RuntimeError(f"the Mirrorline pair did not start: {self.main_error}")
        return self.main

    def dir(self, *parts: str) -> Path:
        path = self.workdir.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


# -- helpers ------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def poll(predicate: Callable[[], bool], timeout: float, what: str,
         interval: float = 0.002) -> float:
    """Poll until ``predicate()``; return the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def converged(problems: list[str], what: str) -> None:
    if problems:
        raise DivergedError(f"{what} differs from its source: " + "; ".join(problems[:5]))


def ratio_cell(ml: Outcome[Any], peer: Outcome[Any], value: Callable[[], float],
               label: str) -> str:
    if not (ml.ok and peer.ok):
        return "n/a"
    return f"{value():.3g} ({label})"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def runs_note(name: str, values: list[float], fmt: Callable[[float], str]) -> str:
    return f"{name} runs: " + ", ".join(fmt(v) for v in values)


def sync_disk() -> None:
    """Flush dirty pages so one run's writeback does not land in the next run's timing."""
    os.sync()


@contextmanager
def floor_mount(b: Bench, name: str) -> Iterator[Path]:
    """A bare pyfuse3 passthrough mount (bench/passthrough.py): the capture stack's floor."""
    backing, mnt = b.dir(name, "backing"), b.dir(name, "mnt")
    proc = b.procs.spawn([sys.executable, "-m", "bench.passthrough", str(backing), str(mnt)],
                         b.workdir / f"{name}.log", cwd=Path(__file__).resolve().parent.parent)
    try:
        poll(lambda: is_mounted(mnt) or proc.poll() is not None, 30, "the passthrough mount")
        if proc.poll() is not None:
            raise RuntimeError(f"the passthrough mount exited {proc.returncode}; "
                               f"see {b.workdir / f'{name}.log'}")
        yield mnt
    finally:
        b.procs.stop(proc)
        poll(lambda: not is_mounted(mnt), 30, "the passthrough unmount")
        shutil.rmtree(b.workdir / name, ignore_errors=True)


# -- W1: random overwrites + fsync in a large file -----------------------------------------


def w1(b: Bench) -> list[Row]:
    p = b.profile
    pages = p.w1_file // (4 * KIB)
    base_tag = b"w1base00"

    def overwrite(path: Path, run: int) -> float:
        """The overwrites and the fsync; return the time fsync returned."""
        rng = random.Random(1000 + run)
        tag = b"w1r%05d" % run
        fd = os.open(path, os.O_WRONLY)
        try:
            for i in range(p.w1_writes):
                os.pwrite(fd, b.pool.block(tag, i, 4 * KIB), rng.randrange(pages) * 4 * KIB)
            os.fsync(fd)
            t0 = time.monotonic()
        finally:
            os.close(fd)  # lsyncd acts on close-write
        return t0

    def mirrorline() -> list[float]:
        rep = b.replicator()
        d = rep.volume / "w1"
        d.mkdir()
        path = d / "big.dat"
        write_file(path, b.pool, p.w1_file, base_tag)
        rep.wait_synced()
        times = []
        for run in range(p.runs):
            sync_disk()
            t0 = overwrite(path, run)
            rep.wait_synced()
            times.append(time.monotonic() - t0)
            converged([] if files_equal(path, rep.replica / "w1" / "big.dat")
                      else ["big.dat"], "W1 replica")
        shutil.rmtree(d)
        rep.wait_synced()
        return times

    def lsyncd() -> list[float]:
        ls = Lsyncd(b.peers, b.procs, b.dir("w1-lsyncd"))
        path, copy = ls.src / "big.dat", ls.dst / "big.dat"
        write_file(path, b.pool, p.w1_file, base_tag)
        try:
            ls.start(p.timeout)
            poll(lambda: size_mtime(copy) == size_mtime(path), p.timeout, "lsyncd startup copy")
            times = []
            for run in range(p.runs):
                sync_disk()
                # rsync's quick check compares mtimes to the whole second: a same-size
                # rewrite within the second of the previous sync is never copied (seen
                # here: lsyncd ran rsync, which skipped the file). Give it a new second.
                time.sleep(1.1)
                t0 = overwrite(path, run)
                expect = size_mtime(path)
                deadline = time.monotonic() + p.timeout

                def arrived(e: tuple[int, int] | None = expect) -> bool:
                    return size_mtime(copy) == e

                t1 = poll(arrived, p.timeout, "lsyncd W1 copy")
                # the content compare is outside the timing (t1 is taken); should it
                # fail, the figure becomes the time a later compare succeeded
                while not files_equal(path, copy):
                    if time.monotonic() > deadline:
                        raise DivergedError("W1 lsyncd copy never matched its source")
                    time.sleep(0.01)
                    t1 = poll(arrived, p.timeout, "lsyncd W1 copy")
                times.append(t1 - t0)
        finally:
            ls.stop()
        shutil.rmtree(ls.base)
        return times

    peer = b.attempt("W1 lsyncd", lsyncd)
    ml = b.attempt("W1 Mirrorline", mirrorline)
    mv = median(ml.value) if ml.ok and ml.value else math.nan
    pv = median(peer.value) if peer.ok and peer.value else math.nan
    verdict = "n/a"
    if ml.ok and peer.ok:
        verdict = met(mv <= 0.15 and mv / pv <= 0.05)
    elif ml.ok:
        verdict = f"{met(mv <= 0.15)} (≤ 0.15 s part only: no lsyncd figure)"
    row = Row("W1", f"{p.w1_writes} random 4 KiB overwrites + fsync in a "
                    f"{p.w1_file // MIB} MiB file: fsync → replica identical",
              ml.cell(lambda v: seconds(median(v))),
              "lsyncd " + peer.cell(lambda v: seconds(median(v))),
              ratio_cell(ml, peer, lambda: mv / pv, "Mirrorline/lsyncd"),
              "≤ 0.15 s and ratio ≤ 0.05 (20x faster than lsyncd)", verdict)
    _side_notes(row, ml, peer, seconds)
    return [row]


# -- W2: lag at a steady 20 MB/s of 64 KiB writes -----------------------------------------


@dataclass
class LagRun:
    lags: list[float]
    missing: int
    behind: float        # how late the writer fell behind its schedule at worst (s)

    @property
    def p50(self) -> float:
        return percentile(self.lags, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.lags, 0.99)


def _steady_writer(path: Path, pool: Pool, tag: bytes, blocks: int, rate_bps: float,
                   ) -> tuple[list[float], float]:
    """Append ``blocks`` 64 KiB blocks at ``rate_bps``; return write-return times and lag.

    Each write opens the file (O_APPEND), writes one block and closes it, so lsyncd
    (which acts on close-write) sees every write; the same pattern runs on Mirrorline.
    """
    period = W2_BLOCK / rate_bps
    returned: list[float] = []
    worst = 0.0
    start = time.monotonic() + 0.05
    for i in range(blocks):
        due = start + i * period
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        else:
            worst = max(worst, now - due)
        block = pool.block(tag, i, W2_BLOCK)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, block)
            returned.append(time.monotonic())
        finally:
            os.close(fd)
    return returned, worst


def _lag_run(b: Bench, write_path: Path, copy_path: Path, name: str) -> LagRun:
    p = b.profile
    blocks = max(2, int(p.w2_seconds * p.w2_rate / W2_BLOCK))
    tag = new_tag()
    out = b.workdir / f"{name}.probe.json"
    timeout = p.w2_seconds + min(p.timeout, 120.0)
    probe = b.procs.spawn([sys.executable, str(PROBE), str(copy_path), str(blocks),
                           str(W2_BLOCK), tag.hex(), str(out), f"{timeout:g}"],
                          b.workdir / f"{name}.probe.log")
    try:
        time.sleep(0.3)  # let the probe start polling
        returned, behind = _steady_writer(write_path, b.pool, tag, blocks, p.w2_rate)
        probe.wait(timeout + 30)
    finally:
        b.procs.stop(probe)
    seen: list[float | None] = json.loads(out.read_text()) if out.exists() else [None] * blocks
    lags = [s - w for s, w in zip(seen, returned, strict=True) if s is not None]
    missing = sum(1 for s in seen if s is None)
    if not lags:
        raise RuntimeError(f"{name}: the probe saw none of {blocks} blocks in {timeout:g} s")
    return LagRun(lags, missing, behind)


def w2(b: Bench) -> list[Row]:
    p = b.profile

    def mirrorline() -> list[LagRun]:
        rep = b.replicator()
        (rep.volume / "w2").mkdir()
        runs = []
        for run in range(p.lag_runs):
            sync_disk()
            name = f"lag-{run}.dat"
            runs.append(_lag_run(b, rep.volume / "w2" / name, rep.replica / "w2" / name,
                                 f"w2-ml-{run}"))
            rep.wait_synced()
            converged([] if files_equal(rep.volume / "w2" / name, rep.replica / "w2" / name)
                      else [name], "W2 replica")
        shutil.rmtree(rep.volume / "w2")
        rep.wait_synced()
        return runs

    def lsyncd() -> list[LagRun]:
        ls = Lsyncd(b.peers, b.procs, b.dir("w2-lsyncd"))
        try:
            ls.start(p.timeout)
            runs = []
            for run in range(p.lag_runs):
                sync_disk()
                name = f"lag-{run}.dat"
                runs.append(_lag_run(b, ls.src / name, ls.dst / name, f"w2-lsyncd-{run}"))
                expect = size_mtime(ls.src / name)
                poll(lambda n=name, e=expect: size_mtime(ls.dst / n) == e,  # type: ignore[misc]
                     p.timeout, "lsyncd W2 final copy", interval=0.01)
                converged([] if files_equal(ls.src / name, ls.dst / name) else [name],
                          "W2 lsyncd copy")
        finally:
            ls.stop()
        shutil.rmtree(ls.base)
        return runs

    peer = b.attempt("W2 lsyncd", lsyncd)
    ml = b.attempt("W2 Mirrorline", mirrorline)

    def fmt(runs: list[LagRun]) -> str:
        return (f"p50 {seconds(median([r.p50 for r in runs]))}, "
                f"p99 {seconds(median([r.p99 for r in runs]))}")

    goal_ok = None
    if ml.ok and ml.value:
        p50, p99 = median([r.p50 for r in ml.value]), median([r.p99 for r in ml.value])
        goal_ok = p50 <= 0.020 and p99 <= 0.200 and all(r.missing == 0 for r in ml.value)
    ratio = "n/a"
    if ml.ok and peer.ok and ml.value and peer.value:
        r50 = median([r.p50 for r in ml.value]) / median([r.p50 for r in peer.value])
        ratio = f"{r50:.3g} (p50 Mirrorline/lsyncd)"
    mb = p.w2_rate / 1e6
    row = Row("W2", f"steady {mb:g} MB/s of 64 KiB writes for {p.w2_seconds:g} s: "
                    "write() return → visible on target",
              ml.cell(fmt), "lsyncd " + peer.cell(fmt), ratio,
              "p50 ≤ 20 ms, p99 ≤ 200 ms", met(goal_ok))
    for side, out in (("Mirrorline", ml), ("lsyncd", peer)):
        if out.ok and out.value:
            for i, r in enumerate(out.value):
                row.notes.append(
                    f"{side} run {i + 1}: {len(r.lags)} samples, p50 {seconds(r.p50)}, "
                    f"p99 {seconds(r.p99)}, max {seconds(max(r.lags))}, never seen "
                    f"{r.missing}, writer at worst {seconds(r.behind)} behind schedule")
        elif out.detail:
            row.notes.append(f"{side}: {out.detail}")
    return [row]


# -- W3: 1 GiB in 1 MiB writes until durable on the target ---------------------------------


def w3(b: Bench) -> list[Row]:
    p = b.profile
    size = p.w3_bytes

    def mirrorline() -> list[tuple[float, float]]:
        rep = b.replicator()
        d = rep.volume / "w3"
        d.mkdir()
        out = []
        for run in range(p.heavy_runs):
            path = d / f"f{run}"
            sync_disk()
            t0 = time.monotonic()
            write_file(path, b.pool, size, b"w3r%05d" % run, MIB, fsync=True)
            t_written = time.monotonic()
            rep.wait_synced()
            t1 = time.monotonic()
            out.append((size / (t1 - t0) / 1e6, size / (t_written - t0) / 1e6))
            converged([] if files_equal(path, rep.replica / "w3" / path.name)
                      else [path.name], "W3 replica")
            path.unlink()
            rep.wait_synced()
        shutil.rmtree(d)
        rep.wait_synced()
        return out

    def plain() -> list[float]:
        d = b.dir("w3-plain")
        rates = []
        for run in range(p.heavy_runs):
            a, c = d / f"f{run}", d / f"f{run}.copy"
            sync_disk()
            t0 = time.monotonic()
            write_file(a, b.pool, size, b"w3r%05d" % run, MIB, fsync=True)
            shutil.copyfile(a, c)
            fd = os.open(c, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            rates.append(size / (time.monotonic() - t0) / 1e6)
            a.unlink()
            c.unlink()
        return rates

    peer = b.attempt("W3 plain disk", plain)
    ml = b.attempt("W3 Mirrorline", mirrorline)
    mv = median([r for r, _ in ml.value]) if ml.ok and ml.value else math.nan
    pv = median(peer.value) if peer.ok and peer.value else math.nan
    if ml.ok:
        b.w3_rate = mv
    row = Row("W3", f"{size // MIB} MiB in 1 MiB writes + fsync through the mount → "
                    "durable on target",
              ml.cell(lambda v: rate(mv)),
              "write + fsync + copy + fsync on plain disk " + peer.cell(lambda v: rate(pv)),
              ratio_cell(ml, peer, lambda: mv / pv, "Mirrorline/plain"),
              "≥ 0.6 of plain", met(mv / pv >= 0.6 if ml.ok and peer.ok else None))
    if ml.ok and ml.value:
        row.notes.append(runs_note("Mirrorline MB/s (write → durable on target)",
                                   [r for r, _ in ml.value], rate))
        row.notes.append(runs_note("Mirrorline MB/s of the application's writes + fsync alone",
                                   [w for _, w in ml.value], rate))
    _side_notes(row, ml, peer, rate, values=False)
    if peer.ok and peer.value:
        row.notes.append(runs_note("plain disk MB/s", peer.value, rate))
    return [row]


# -- W4: 4 KiB sequential writes per second -----------------------------------------------


def _seq_writes(path: Path, pool: Pool, writes: int) -> float:
    """Writes per second of ``writes`` sequential 4 KiB writes (no fsync)."""
    block = pool.block(b"w4block0", 0, 4 * KIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(writes):
            os.write(fd, block)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return writes / elapsed


def w4(b: Bench) -> list[Row]:
    p = b.profile

    def plain() -> list[float]:
        d = b.dir("w4-plain")
        rates = []
        for run in range(p.runs):
            sync_disk()
            rates.append(_seq_writes(d / f"f{run}", b.pool, p.w4_writes))
        shutil.rmtree(d)
        return rates

    def mirrorline() -> tuple[list[float], list[float]]:
        rep = b.replicator()
        d = rep.volume / "w4"
        d.mkdir()
        running, stopped = [], []
        for run in range(p.runs):
            sync_disk()
            running.append(_seq_writes(d / f"running{run}", b.pool, p.w4_writes))
            rep.wait_synced()
            control_ok(rep, "replication", "stop", "1")
            try:
                sync_disk()
                stopped.append(_seq_writes(d / f"stopped{run}", b.pool, p.w4_writes))
            finally:
                control_ok(rep, "replication", "start", "1")
            rep.wait_connected()
            rep.wait_synced()
        converged(tree_diff(d, rep.replica / "w4"), "W4 replica")
        shutil.rmtree(d)
        rep.wait_synced()
        return running, stopped

    def floor() -> list[float]:
        rates = []
        with floor_mount(b, "w4-floor") as mnt:
            for run in range(p.runs):
                sync_disk()
                rates.append(_seq_writes(mnt / f"f{run}", b.pool, p.w4_writes))
        return rates

    peer = b.attempt("W4 plain disk", plain)
    bare = b.attempt("W4 bare pyfuse3 passthrough", floor)
    ml = b.attempt("W4 Mirrorline", mirrorline)
    bare_v = median(bare.value) if bare.ok and bare.value else math.nan
    run_v = median(ml.value[0]) if ml.ok and ml.value else math.nan
    stop_v = median(ml.value[1]) if ml.ok and ml.value else math.nan
    plain_v = median(peer.value) if peer.ok and peer.value else math.nan
    overhead = stop_v / run_v - 1  # extra time per write that replication adds
    peers = (f"mount, replication stopped {rate(stop_v, 'w/s') if ml.ok else ml.status}; "
             f"plain disk {peer.cell(lambda v: rate(plain_v, 'w/s'))}; "
             f"bare pyfuse3 passthrough (the floor) {bare.cell(lambda v: rate(bare_v, 'w/s'))}")
    ratio = "n/a"
    if ml.ok:
        ratio = f"{overhead * 100:+.0f} % time vs stopped"
        if peer.ok:
            ratio += f"; {run_v / plain_v:.3g} of plain"
        if bare.ok:
            ratio += f"; {run_v / bare_v:.3g} of the floor"
    row = Row("W4", f"{p.w4_writes} sequential 4 KiB writes through the mount, replicating",
              ml.cell(lambda v: rate(run_v, "w/s")), peers, ratio,
              "replication adds ≤ 20 %; ≥ 15,000 w/s",
              met(overhead <= 0.20 and run_v >= 15_000 if ml.ok else None))
    if ml.ok and ml.value:
        row.notes.append(runs_note("replicating w/s", ml.value[0], lambda v: rate(v, "w/s")))
        row.notes.append(runs_note("replication stopped w/s", ml.value[1],
                                   lambda v: rate(v, "w/s")))
    _side_notes(row, ml, peer, lambda v: rate(v, "w/s"), values=False)
    if peer.ok and peer.value:
        row.notes.append(runs_note("plain disk w/s", peer.value, lambda v: rate(v, "w/s")))
    if bare.ok and bare.value:
        row.notes.append(runs_note("bare pyfuse3 passthrough w/s", bare.value,
                                   lambda v: rate(v, "w/s")))
        row.notes.append("the floor mounts a pyfuse3 file system that only passes each "
                         "request to the disk (bench/passthrough.py), with the capture "
                         "mount's options: no journal, no replication")
    elif not bare.ok:
        row.notes.append(f"bare passthrough: {bare.status} {bare.detail}")
    return [row]


def control_ok(rep: Replicator, *words: str) -> None:
    result = control(rep.source, *words, timeout=60)
    if not result.get("ok"):
        raise RuntimeError(f"mirrorline {' '.join(words)}: {result.get('message')}")


# -- W5: 2000 new small files --------------------------------------------------------------


def _small_files(d: Path, pool: Pool, files: int, run: int) -> None:
    rng = random.Random(5000 + run)
    tag = b"w5r%05d" % run
    d.mkdir()
    for i in range(files):
        fd = os.open(d / f"s{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, pool.block(tag, i, rng.randint(512, 8 * KIB)))
        finally:
            os.close(fd)


def w5(b: Bench) -> list[Row]:
    p = b.profile

    def mirrorline() -> list[float]:
        rep = b.replicator()
        top = rep.volume / "w5"
        top.mkdir()
        times = []
        for run in range(p.runs):
            sync_disk()
            t0 = time.monotonic()
            _small_files(top / f"run{run}", b.pool, p.w5_files, run)
            writer_times.append(time.monotonic() - t0)
            rep.wait_synced()
            times.append(time.monotonic() - t0)
            converged(tree_diff(top / f"run{run}", rep.replica / "w5" / f"run{run}"),
                      "W5 replica")
        shutil.rmtree(top)
        rep.wait_synced()
        return times

    def floor() -> list[float]:
        times = []
        with floor_mount(b, "w5-floor") as mnt:
            for run in range(p.runs):
                sync_disk()
                t0 = time.monotonic()
                _small_files(mnt / f"run{run}", b.pool, p.w5_files, run)
                times.append(time.monotonic() - t0)
        return times

    def lsyncd() -> list[float]:
        ls = Lsyncd(b.peers, b.procs, b.dir("w5-lsyncd"))
        try:
            ls.start(p.timeout)
            times = []
            for run in range(p.runs):
                src, dst = ls.src / f"run{run}", ls.dst / f"run{run}"
                sync_disk()
                t0 = time.monotonic()
                _small_files(src, b.pool, p.w5_files, run)
                expect = size_mtime_index(src)

                def arrived(d: Path = dst, e: dict[str, tuple[int, int]] | None = expect,
                            ) -> bool:
                    # a name count first (cheap), so the poller does not stat 2000
                    # files every 5 ms and steal a core from lsyncd's rsync
                    try:
                        count = sum(1 for n in os.listdir(d) if not n.startswith("."))
                    except FileNotFoundError:
                        return False
                    return count == p.w5_files and size_mtime_index(d) == e

                t1 = poll(arrived, p.timeout, "lsyncd W5 copy", interval=0.005)
                times.append(t1 - t0)
                converged(tree_diff(src, dst), "W5 lsyncd copy")
        finally:
            ls.stop()
        shutil.rmtree(ls.base)
        return times

    writer_times: list[float] = []
    peer = b.attempt("W5 lsyncd", lsyncd)
    bare = b.attempt("W5 bare pyfuse3 passthrough", floor)
    ml = b.attempt("W5 Mirrorline", mirrorline)
    mv = median(ml.value) if ml.ok and ml.value else math.nan
    pv = median(peer.value) if peer.ok and peer.value else math.nan
    row = Row("W5", f"{p.w5_files} new 0.5-8 KiB files: first create → replica identical",
              ml.cell(lambda v: seconds(mv)), "lsyncd " + peer.cell(lambda v: seconds(pv)),
              ratio_cell(ml, peer, lambda: mv / pv, "Mirrorline/lsyncd"),
              "≤ 0.5x lsyncd", met(mv / pv <= 0.5 if ml.ok and peer.ok else None))
    _side_notes(row, ml, peer, seconds)
    if writer_times:
        row.notes.append(runs_note("the application creating the files through the "
                                   "Mirrorline mount (part of the figure)", writer_times,
                                   seconds))
    if bare.ok and bare.value:
        row.notes.append(runs_note("the same files created through a bare pyfuse3 "
                                   "passthrough mount (the floor of any FUSE capture)",
                                   bare.value, seconds))
    elif not bare.ok:
        row.notes.append(f"bare passthrough: {bare.status} {bare.detail}")
    return [row]


# -- W6 / W7: mirrors of a 10,000-file tree ------------------------------------------------


MIRROR_TIMEOUT = "3600"


def _mirror(rep: Replicator, mode: str) -> float:
    """``mirror start 1 <mode> --wait``, then ``wait queue``; return the seconds taken."""
    t0 = time.monotonic()
    try:
        result = control(rep.source, "mirror", "start", "1", mode, "--wait",
                         "--timeout", MIRROR_TIMEOUT, timeout=float(MIRROR_TIMEOUT) + 10)
    except Exception as exc:  # the grammar or the agent may not know the command yet
        raise NotAvailableError(f"mirror start 1 {mode}: {type(exc).__name__}: {exc}") from exc
    if not result.get("ok"):
        raise NotAvailableError(f"mirror start 1 {mode} --wait: exit {result.get('exit')}: "
                                f"{result.get('message')}")
    rep.wait_synced()
    return time.monotonic() - t0


def w6_w7(b: Bench) -> list[Row]:
    p = b.profile
    tree = b.dir("tree")
    files, nbytes = make_tree(tree, b.pool, p.w6_files, p.w6_bytes)
    sync_disk()

    def mirrorline() -> dict[str, list[float]]:
        # no automatic mirror when the pre-filled volume connects: the bench starts them
        rep = Replicator(b.procs, b.dir("w6"), source_extra='mirror_on_connect = "none"')
        try:
            shutil.copytree(tree, rep.volume, symlinks=True, dirs_exist_ok=True)
            sync_disk()
            rep.start()
            out: dict[str, list[float]] = {"full": []}
            for run in range(p.mirror_runs):
                if run:  # an empty replica again, as rsync gets
                    rep.target.stop()
                    _empty(rep.replica)
                    rep.target.start()
                    rep.wait_connected()
                sync_disk()
                out["full"].append(_mirror(rep, "full"))
                converged(tree_diff(tree, rep.replica), "W6 replica")
            for mode in ("different", "checksum"):
                out[mode] = []
                for _ in range(p.heavy_runs):
                    sync_disk()
                    try:
                        out[mode].append(_mirror(rep, mode))
                    except NotAvailableError as exc:
                        out[mode + "-unavailable"] = []
                        b_notes.append(f"W7 {mode}: not available: {exc}")
                        break
                    converged(tree_diff(tree, rep.replica), f"W7 {mode} replica")
            return out
        finally:
            rep.close()

    def rsync() -> dict[str, list[float]]:
        daemon = RsyncDaemon(b.peers, b.procs, b.dir("w6-rsyncd"))
        try:
            daemon.start()
            out: dict[str, list[float]] = {"full": [], "different": [], "checksum": []}
            for _ in range(p.mirror_runs):
                daemon.clear()
                sync_disk()
                out["full"].append(daemon.push(tree))
            converged(tree_diff(tree, daemon.module), "W6 rsync copy")
            for mode, flags in (("different", ()), ("checksum", ("--checksum",))):
                for _ in range(p.heavy_runs):
                    sync_disk()
                    out[mode].append(daemon.push(tree, *flags))
        finally:
            daemon.stop()
        shutil.rmtree(daemon.base)
        return out

    b_notes: list[str] = []
    peer = b.attempt("W6/W7 rsync daemon", rsync)
    ml = b.attempt("W6/W7 Mirrorline", mirrorline)
    shutil.rmtree(tree)

    rows = []
    specs = (("W6", "full", f"full mirror of a {files}-file, {nbytes / 1e6:.0f} MB tree",
              "rsync -a to daemon"),
             ("W7", "different", "difference mirror (size/mtime) of that tree, "
              "nothing changed", "rsync -a"),
             ("W7", "checksum", "checksum mirror of that tree, nothing changed",
              "rsync -a --checksum"))
    for key, mode, label, peer_label in specs:
        ml_mode = _mode_outcome(ml, mode)
        peer_mode = _mode_outcome(peer, mode)
        mv = median(ml_mode.value) if ml_mode.ok and ml_mode.value else math.nan
        pv = median(peer_mode.value) if peer_mode.ok and peer_mode.value else math.nan
        row = Row(key, label, ml_mode.cell(lambda v, m=mv: seconds(m)),  # type: ignore[misc]
                  f"{peer_label} " + peer_mode.cell(lambda v, x=pv: seconds(x)),  # type: ignore[misc]
                  ratio_cell(ml_mode, peer_mode, lambda m=mv, x=pv: m / x,  # type: ignore[misc]
                             "Mirrorline/rsync"),
                  "≤ 1.0x rsync", met(mv / pv <= 1.0 if ml_mode.ok and peer_mode.ok else None))
        _side_notes(row, ml_mode, peer_mode, seconds, prefix=f"{mode}: " if key == "W7" else "")
        rows.append(row)
    if rows:
        rows[0].notes.append("rsync does not fsync what it writes; Mirrorline's figure ends "
                             "when the target has checkpointed (fsynced) the data")
        rows[-1].notes.extend(b_notes)
    return rows


def _mode_outcome(out: Outcome[dict[str, list[float]]], mode: str) -> Outcome[list[float]]:
    if not out.ok or out.value is None:
        return Outcome(status=out.status, detail=out.detail)
    if mode + "-unavailable" in out.value or not out.value.get(mode):
        return Outcome(status="not available", detail=f"mirror {mode} did not run")
    return Outcome(out.value[mode])


def _empty(d: Path) -> None:
    if not d.exists():
        return
    for entry in d.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# -- W8: target down, a backlog written, then the target back ------------------------------


@dataclass
class CatchUp:
    rate: float          # MB/s from target ready to caught up
    seconds: float
    reconnect: float     # target ready → connection replicating
    write_rate: float    # MB/s of the writes while the target was down
    journal_bytes: int


def w8(b: Bench) -> list[Row]:
    p = b.profile
    size = p.w8_bytes
    hwm: list[int] = []

    def mirrorline() -> list[CatchUp]:
        rep = Replicator(b.procs, b.dir("w8"))
        try:
            rep.start()
            d = rep.volume / "w8"
            d.mkdir()
            rep.wait_synced()
            out = []
            for run in range(p.w8_runs):
                rep.target.stop()
                path = d / f"backlog{run}"
                t0 = time.monotonic()
                write_file(path, b.pool, size, b"w8r%05d" % run, MIB, fsync=True)
                write_rate = size / (time.monotonic() - t0) / 1e6
                vols = control(rep.source, "status").get("data", {}).get("volumes", [{}])
                journal = int(vols[0].get("journal_disk_bytes", 0)) if vols else 0
                sync_disk()
                rep.target.start()
                t_ready = time.monotonic()
                t_conn = rep.wait_connected(p.timeout)
                rep.wait_synced(p.timeout)
                t_done = time.monotonic()
                out.append(CatchUp(size / (t_done - t_ready) / 1e6, t_done - t_ready,
                                   t_conn - t_ready, write_rate, journal))
                peak = peak_rss_kib(rep.source_pid())
                if peak is not None:
                    hwm.append(peak)
                converged([] if files_equal(path, rep.replica / "w8" / path.name)
                          else [path.name], "W8 replica")
                path.unlink()
                rep.wait_synced()
            return out
        finally:
            rep.close()

    ml = b.attempt("W8 Mirrorline", mirrorline)
    peak_mib = max(hwm) / 1024 if hwm else math.nan
    cr = median([c.rate for c in ml.value]) if ml.ok and ml.value else math.nan
    w3r = b.w3_rate
    fig = (f"catch-up {rate(cr)}; source peak RSS {peak_mib:.0f} MiB"
           if ml.ok and hwm else ml.cell(lambda v: rate(cr)))
    ratio = f"{cr / w3r:.3g} of W3's {rate(w3r)}" if ml.ok and w3r else "n/a"
    goal_ok = None
    if ml.ok and hwm:
        goal_ok = peak_mib <= 256 and (w3r is None or cr / w3r >= 0.6)
    row = Row("W8", f"target down, {size // MIB} MiB written, target back: catch-up",
              fig, "—", ratio, "peak RSS ≤ 256 MiB; catch-up ≥ 0.6 of W3", met(goal_ok))
    if ml.ok and ml.value:
        for i, c in enumerate(ml.value):
            row.notes.append(
                f"run {i + 1}: caught up in {seconds(c.seconds)} after the target was ready "
                f"(reconnect took {seconds(c.reconnect)}); writes while the target was down "
                f"{rate(c.write_rate)}; journal on disk {c.journal_bytes / MIB:.0f} MiB")
        row.notes.append(f"source VmHWM (KiB) after each run: {hwm}")
    elif ml.detail:
        row.notes.append(f"Mirrorline: {ml.detail}")
    return [row]


# -- W9: queuetask --wait of a no-op task ---------------------------------------------------


def w9(b: Bench) -> list[Row]:
    p = b.profile

    def mirrorline() -> dict[str, list[float]]:
        rep = b.replicator()
        rep.wait_synced()
        out: dict[str, list[float]] = {"cli": [], "socket": [], "cli_status": [],
                                       "socket_status": []}
        cli_seconds(rep.source, "status")   # untimed: writes the CLI's bytecode cache
        for _ in range(p.w9_runs):
            time.sleep(0.3)  # an idle connection
            elapsed, done = cli_seconds(rep.source, "queuetask", "1", "noop", "--wait",
                                        "--timeout", "60")
            if done.returncode != 0:
                raise RuntimeError(f"queuetask exited {done.returncode}: {done.stdout} "
                                   f"{done.stderr}")
            out["cli"].append(elapsed)
            time.sleep(0.3)
            t0 = time.perf_counter()
            result = control(rep.source, "queuetask", "1", "noop", "--wait", "--timeout", "60",
                             timeout=70)
            out["socket"].append(time.perf_counter() - t0)
            if not result.get("ok"):
                raise RuntimeError(f"queuetask: {result.get('message')}")
            elapsed, done = cli_seconds(rep.source, "status")
            out["cli_status"].append(elapsed)
            t0 = time.perf_counter()
            control(rep.source, "status")
            out["socket_status"].append(time.perf_counter() - t0)
        return out

    ml = b.attempt("W9 Mirrorline", mirrorline)
    if ml.ok and ml.value:
        v = ml.value
        cli, sock = median(v["cli"]), median(v["socket"])
        start = median(v["cli_status"]) - median(v["socket_status"])
        row = Row("W9", "queuetask 1 noop --wait on an idle connection",
                  f"{seconds(cli)} (CLI process); {seconds(sock)} (control socket)", "—",
                  "—", "≤ 100 ms round trip",
                  f"{met(cli <= 0.1)} (CLI); {met(sock <= 0.1)} (socket)")
        row.notes.append(runs_note("CLI wall", v["cli"], seconds))
        row.notes.append(runs_note("control socket", v["socket"], seconds))
        row.notes.append("the CLI runs as installed: with its bytecode cache (one untimed "
                         "call first), not under PYTHONDONTWRITEBYTECODE")
        row.notes.append(f"starting the mirrorline CLI process costs about {seconds(start)} "
                         f"(median `mirrorline status` {seconds(median(v['cli_status']))} vs "
                         f"{seconds(median(v['socket_status']))} over the socket)")
        return [row]
    row = Row("W9", "queuetask 1 noop --wait on an idle connection", ml.cell(str), "—", "—",
              "≤ 100 ms round trip", "n/a")
    if ml.detail:
        row.notes.append(f"Mirrorline: {ml.detail}")
    return [row]


def _side_notes(row: Row, ml: Outcome[Any], peer: Outcome[Any], fmt: Callable[[float], str],
                values: bool = True, prefix: str = "") -> None:
    for side, out in (("Mirrorline", ml), ("peer", peer)):
        if out.ok and values and isinstance(out.value, list):
            row.notes.append(prefix + runs_note(side, out.value, fmt))
        elif not out.ok and out.detail:
            row.notes.append(f"{prefix}{side}: {out.status}: {out.detail}")


WORKLOADS: dict[str, Callable[[Bench], list[Row]]] = {
    "W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W6": w6_w7, "W8": w8, "W9": w9,
}
# The order they run in: short and latency-sensitive first, the big writers last, so
# writeback from a large workload does not land in a small one's timing.
RUN_ORDER = ("W9", "W1", "W2", "W4", "W5", "W3", "W6", "W8")
