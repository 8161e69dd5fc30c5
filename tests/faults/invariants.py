"""A workload whose history can be checked, and the checks the fault suite runs all along.

:class:`RecordWorkload` appends numbered records in one global order across ``k`` files
(record ``i`` goes to ``rec/r{i % k}.log`` and starts with ``R{i:09d}``), and between
records creates, renames and unlinks small files under ``churn/``. It remembers exactly
what each record file must hold, so at any moment the source's history is known.

:class:`Sampler` runs beside it and checks, many times a second, that

* the target's applied seq (its state file, and ``status`` now and then) never goes
  backwards, across target crashes included;
* every record file of the replica is a byte prefix of the source's file (so no record
  was applied twice, lost in the middle, or torn);
* the replica is a prefix of the *global* history: if record ``i`` is in the replica,
  every record ``< i`` is too. Files are read one after another while the replica grows,
  so the check compares a file read earlier against files read later: a record present
  in an earlier read with an older record missing in a later read means that the older
  one was missing at the earlier moment too (the replica only grows).

:class:`TaskLog` is a task script that appends its task id to a log outside the replica,
to check that a task ran at most once.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import os
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.system.harness import Agent

REC_DIR = "rec"
CHURN_DIR = "churn"


def record(i: int) -> bytes:
    """Record ``i``: ``R<i> <payload>\\n``, 20 B to 3 KiB, a pure function of ``i``."""
    digest = hashlib.sha256(b"%d" % i).hexdigest().encode()
    size = 8 + (int(digest[:6], 16) % 3000)
    payload = (digest * (size // len(digest) + 1))[:size]
    return b"R%09d " % i + payload + b"\n"


def record_numbers(content: bytes) -> list[int]:
    """The record numbers in a record file, in order (the last line may be incomplete)."""
    return [int(line[1:10]) for line in content.split(b"\n")[:-1]]


class RecordWorkload:
    """Numbered records across ``files`` files plus create/rename/unlink churn, in a thread.

    When a write fails (the source agent was killed under it) the thread stops writing
    and waits: the test restarts the source and calls :meth:`reconcile`, which reads the
    source files to learn whether the record in flight landed, then :meth:`resume`.

    Args:
        root: the protected directory (writes go through the source's mount).
        files: how many record files share the global order.
        seed: seeds the churn.
        pace: seconds to sleep between records (keeps the data volume modest).
    """

    def __init__(self, root: Path, *, files: int = 4, seed: int = 0,
                 pace: float = 0.002) -> None:
        self.root = root
        self.k = files
        self.rng = random.Random(seed)
        self.pace = pace
        self.next = 0                                   # records 0..next-1 are committed
        self._inflight: int | None = None               # the record being written
        self._content = [bytearray() for _ in range(files)]
        self._ends: list[list[int]] = [[] for _ in range(files)]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._resume = threading.Event()
        self.broken = threading.Event()                 # a write failed; waiting for resume
        self.parked = threading.Event()                 # the thread waits for resume
        self.error: BaseException | None = None         # an unexpected failure
        self.last_oserror: OSError | None = None        # why the last write failed
        self.churn_ops = 0
        self._churn_names: list[str] = []
        self._churn_seq = 0
        self._thread: threading.Thread | None = None
        (root / REC_DIR).mkdir(parents=True, exist_ok=True)
        (root / CHURN_DIR).mkdir(exist_ok=True)

    # -- what the source's history says ---------------------------------------------------

    def path(self, j: int) -> Path:
        return self.root / REC_DIR / f"r{j}.log"

    def expected(self, j: int) -> bytes:
        """What record file ``j`` holds after every committed record."""
        with self._lock:
            return bytes(self._content[j])

    def view(self, j: int) -> tuple[bytes, list[int]]:
        """What file ``j`` may hold on a replica now, and its records' end offsets: the
        committed records plus the one being written (a replica can get it before
        ``write`` returns here)."""
        with self._lock:
            content, ends = bytes(self._content[j]), list(self._ends[j])
            i = self._inflight
        if i is not None and i % self.k == j:
            content += record(i)
            ends.append(len(content))
        return content, ends

    def _begin(self, i: int) -> None:
        with self._lock:
            self._inflight = i

    def _commit(self, i: int) -> None:
        j = i % self.k
        with self._lock:
            self._content[j] += record(i)
            self._ends[j].append(len(self._content[j]))
            self.next = i + 1
            self._inflight = None

    # -- the thread -----------------------------------------------------------------------

    def start(self) -> RecordWorkload:
        self._resume.set()
        self._thread = threading.Thread(target=self._run, name="record-workload", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop writing and join; raises what the thread raised, if anything unexpected."""
        self._stop.set()
        self._resume.set()
        if self._thread is not None:
            self._thread.join(60)
            assert not self._thread.is_alive(), "the workload thread is stuck in a write"
        if self.error is not None:
            raise AssertionError(f"the workload failed: {self.error!r}") from self.error

    def stop_quietly(self) -> None:
        """Stop and join without raising (cleanup after a failed test)."""
        self._stop.set()
        self._resume.set()
        if self._thread is not None:
            self._thread.join(30)

    def wait_records(self, n: int, timeout: float = 60) -> None:
        """Block until at least ``n`` more records than now are committed."""
        goal = self.next + n
        deadline = time.monotonic() + timeout
        while self.next < goal:
            if self.error is not None or self.broken.is_set():
                raise AssertionError(f"the workload stopped: {self.error!r}, last failed "
                                     f"write: {self.last_oserror!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the workload made {n - (goal - self.next)} of {n} "
                                     f"records in {timeout} s")
            time.sleep(0.01)

    def _run(self) -> None:
        handles: dict[int, int] = {}
        try:
            while not self._stop.is_set():
                if not self._resume.is_set():
                    self.parked.set()
                    self._resume.wait()
                    self.parked.clear()
                    for fd in handles.values():
                        _close_quietly(fd)
                    handles.clear()
                    continue
                i = self.next
                j = i % self.k
                try:
                    if j not in handles:
                        handles[j] = os.open(self.path(j), os.O_WRONLY | os.O_APPEND
                                             | os.O_CREAT, 0o644)
                    data = record(i)
                    self._begin(i)
                    written = os.write(handles[j], data)
                    if written != len(data):
                        # Only when the source dies mid-write (the kernel returns what the
                        # FUSE server had accepted): treated as the mount dying.
                        raise OSError(errno.EIO, f"short write of record {i}: {written}")
                    self._commit(i)
                    if self.rng.random() < 0.2:
                        self._churn()
                except OSError as exc:
                    # The mount died (source killed): wait for the test to reconcile.
                    self.last_oserror = exc
                    self._resume.clear()
                    self.broken.set()
                    continue
                if self.pace:
                    time.sleep(self.pace)
        except BaseException as exc:
            self.error = exc
        finally:
            for fd in handles.values():
                _close_quietly(fd)

    def _churn(self) -> None:
        d = self.root / CHURN_DIR
        roll = self.rng.random()
        if roll < 0.5 or len(self._churn_names) < 3:
            self._churn_seq += 1
            name = f"c{self._churn_seq}"
            (d / name).write_bytes(record(self._churn_seq)[: self.rng.randrange(1, 2000)])
            self._churn_names.append(name)
        elif roll < 0.8:
            old = self._churn_names.pop(self.rng.randrange(len(self._churn_names)))
            self._churn_seq += 1
            new = f"m{self._churn_seq}"
            os.rename(d / old, d / new)
            self._churn_names.append(new)
        else:
            old = self._churn_names.pop(self.rng.randrange(len(self._churn_names)))
            os.unlink(d / old)
        self.churn_ops += 1

    # -- after a source crash -------------------------------------------------------------

    def pause(self, timeout: float = 30) -> None:
        """Stop writing until :meth:`resume`; returns once the thread is parked."""
        self._resume.clear()
        self.wait_parked(timeout)

    def wait_parked(self, timeout: float = 30) -> None:
        """Block until the thread waits for :meth:`resume` (after :meth:`pause`, or after a
        failed write when the source's mount died)."""
        deadline = time.monotonic() + timeout
        while not self.parked.is_set():
            if self._thread is None or not self._thread.is_alive():
                raise AssertionError(f"the workload thread ended: {self.error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the workload did not stop writing within {timeout} s")
            time.sleep(0.005)

    def reconcile(self) -> bool:
        """After a source restart: learn from the source files whether the record in
        flight at the crash landed. Anything else than "exactly the committed records,
        maybe plus that one" is lost or corrupted application data: an AssertionError.

        Returns True when the record in flight landed (the agent applied it to its
        backing tree and was killed before it answered, maybe before it journaled it).
        """
        self.wait_parked()
        landed = False
        i = self.next
        j = i % self.k
        for f in range(self.k):
            try:
                have = self.path(f).read_bytes()
            except FileNotFoundError:
                have = b""
            want = self.expected(f)
            if have == want:
                continue
            if f == j and have == want + record(i):
                self._commit(i)
                landed = True
                continue
            raise AssertionError(
                f"source file {self.path(f)} after the crash: {len(have)} bytes, expected "
                f"{len(want)} (committed records) or that plus record {i}; first difference "
                f"at byte {_first_difference(have, want)}")
        with self._lock:
            self._inflight = None           # it did not land: it never happened
        self._churn_names = sorted(os.listdir(self.root / CHURN_DIR))
        return landed

    def resume(self) -> None:
        self.broken.clear()
        self._resume.set()

    # -- final check ----------------------------------------------------------------------

    def check_replica(self, replica: Path) -> int:
        """Every record file of ``replica`` equals the committed history, each record once.

        Returns the bytes compared.
        """
        total = 0
        for j in range(self.k):
            want = self.expected(j)
            have = (replica / REC_DIR / f"r{j}.log").read_bytes()
            numbers = record_numbers(have)
            dupes = [n for n, c in Counter(numbers).items() if c > 1]
            assert not dupes, f"records applied twice in r{j}.log: {dupes[:10]}"
            assert have == want, (
                f"replica r{j}.log differs from the source history: {len(have)} bytes vs "
                f"{len(want)}, first difference at byte {_first_difference(have, want)}")
            assert numbers == list(range(j, self.next, self.k)), f"r{j}.log records out of order"
            total += len(have)
        return total


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _first_difference(a: bytes, b: bytes) -> int:
    for n, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return n
    return min(len(a), len(b))


def durable_seq(target: Agent, source_node: str = "src1", conid: int = 1) -> int | None:
    """The applied seq in the target's state file (what survives a crash); None if unreadable."""
    path = (Path(target.config_path).parent / "state" / "connections" / source_node
            / f"{conid}.json")
    try:
        return int(json.loads(path.read_text())["applied_seq"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, OSError):
        return None      # mid-replace is atomic (rename), so this is a real problem if it lasts


class Sampler:
    """Checks the invariants in a background thread until :meth:`stop`.

    Args:
        workload: the source history.
        target: the target agent (its state file and ``status``).
        replica: the replica root of the connection.
        status_every: seconds between ``status`` calls (a subprocess each).
        interval: seconds between samples of the state file and the replica.
    """

    def __init__(self, workload: RecordWorkload, target: Agent, replica: Path, *,
                 source_node: str = "src1", conid: int = 1, status_every: float = 2.0,
                 interval: float = 0.05) -> None:
        self.workload = workload
        self.target = target
        self.replica = replica
        self.source_node = source_node
        self.conid = conid
        self.status_every = status_every
        self.interval = interval
        self.violations: list[str] = []
        self.samples = 0
        self.status_samples = 0
        self.high_seq = 0
        self.high_where = ""
        self.unreadable_state = 0
        self.relaxed: str | None = None     # why the prefix checks are off, if they are
        self.relaxations = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def assert_ok(self) -> None:
        """Raise an AssertionError naming the first violations, if any."""
        assert not self.violations, (f"{len(self.violations)} invariant violations in "
                                     f"{self.samples} samples:\n" + "\n".join(self.violations[:20]))
        assert self.samples > 0, "the sampler never sampled"

    def relax(self, why: str) -> None:
        """Turn the prefix checks off (the seq check stays) until :meth:`strict`.

        Only for the window DESIGN §3 allows: an op the source agent applied to its backing
        tree but was killed before journaling reaches the replica through the restricted
        difference mirror after the restart, out of the global order.
        """
        self.relaxed = why
        self.relaxations += 1

    def strict(self) -> None:
        self.relaxed = None

    def _violation(self, text: str) -> None:
        if len(self.violations) < 100:
            self.violations.append(f"[sample {self.samples}] {text}")

    def _seq(self, seq: int, where: str) -> None:
        if seq < self.high_seq:
            self._violation(f"applied seq went backwards: {where} says {seq} after "
                            f"{self.high_where} said {self.high_seq}")
        if seq > self.high_seq:
            self.high_seq, self.high_where = seq, f"{where} (sample {self.samples})"

    def _run(self) -> None:
        next_status = 0.0
        while not self._stop.is_set():
            try:
                self.sample()
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + self.status_every
                    self._sample_status()
            except Exception as exc:  # a bug in the sampler must show, not hang the test
                self._violation(f"sampler error: {exc!r}")
            self._stop.wait(self.interval)

    def _sample_status(self) -> None:
        try:
            res = self.target.cli("status", check=False, timeout=20)
        except subprocess.TimeoutExpired:
            return
        if res.returncode != 0:
            return           # the target is down (killed by the test): nothing to read
        for conn in json.loads(res.stdout)["data"]["connections"]:
            if conn["source"] == self.source_node and conn["id"] == self.conid:
                self.status_samples += 1
                self._seq(int(conn["applied_seq"]), "status")

    def sample(self) -> None:
        """One sample: the durable seq, then every record file in order."""
        self.samples += 1
        seq = durable_seq(self.target, self.source_node, self.conid)
        if seq is None:
            self.unreadable_state += 1
        else:
            self._seq(seq, "the state file")
        if self.relaxed is not None:
            return
        w = self.workload
        newest_present = -1        # highest record seen in the files read so far
        newest_file = -1
        for j in range(w.k):
            try:
                have = (self.replica / REC_DIR / f"r{j}.log").read_bytes()
            except FileNotFoundError:
                have = b""
            want, ends = w.view(j)        # read after the replica: at least as long
            if want[:len(have)] != have:
                if len(have) > len(want):
                    self._violation(f"replica r{j}.log has {len(have)} bytes, the source "
                                    f"history only {len(want)}")
                else:
                    at = _first_difference(have, want)
                    self._violation(f"replica r{j}.log is not a prefix of the source's: "
                                    f"first difference at byte {at} of {len(have)}")
                continue
            complete = bisect.bisect_right(ends, len(have))   # whole records present
            first_missing = j + complete * w.k
            if newest_present >= first_missing:
                self._violation(
                    f"replica is not a prefix of the history: record {newest_present} "
                    f"(r{newest_file}.log, read first) is present but record "
                    f"{first_missing} (r{j}.log, read after) is missing")
            if complete:
                last = j + (complete - 1) * w.k
                if last > newest_present:
                    newest_present, newest_file = last, j


class TaskLog:
    """A task script that logs ``start <task id> <seq>`` and ``end <task id>`` outside the
    replica, sleeping ``$1`` seconds in between (a task that is running for a while)."""

    NAME = "once"

    def __init__(self, log: Path) -> None:
        self.log = log

    def install(self, agent: Agent) -> None:
        task_dir = agent.config_path.parent / "tasks.d"
        task_dir.mkdir(exist_ok=True)
        path = task_dir / self.NAME
        path.write_text('#!/bin/sh\n'
                        f'echo "start $MIRRORLINE_TASK_ID $MIRRORLINE_SEQ" >> "{self.log}"\n'
                        'sleep "${1:-0}"\n'
                        f'echo "end $MIRRORLINE_TASK_ID" >> "{self.log}"\n')
        path.chmod(0o755)

    def starts(self) -> Counter[str]:
        """How many times each task id started."""
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return Counter()
        return Counter(ln.split()[1] for ln in lines if ln.startswith("start "))

    def assert_at_most_once(self) -> None:
        twice = {t: n for t, n in self.starts().items() if n > 1}
        assert not twice, f"tasks run more than once (task id: runs): {twice}"


# -- scenario plumbing shared by test_link.py and test_crash.py ---------------------------

#: Mirror/verify job states that are still working.
JOB_RUNNING = ("queued", "scanning", "repairing", "paused")


def seed_for(default: int) -> int:
    """The seed of a scenario: ``$MIRRORLINE_FAULT_SEED`` if set, else ``default``.

    Printed by the caller so a failure can be replayed.
    """
    return int(os.environ.get("MIRRORLINE_FAULT_SEED", default))


def connection(agent: Agent) -> dict[str, Any]:
    """Connection 1 as ``status`` shows it."""
    conn: dict[str, Any] = agent.status()["connections"][0]
    return conn


def settle(source: Agent, timeout: float = 240) -> None:
    """Wait until connection 1 replicates with no mirror pending or running, then until
    the target acknowledged everything captured so far (``wait queue``)."""
    from tests.system.harness import wait_synced, wait_until

    def quiet() -> object:
        conn = connection(source)
        job = conn.get("mirror")
        running = isinstance(job, dict) and job.get("state") in JOB_RUNNING
        return (conn["state"] == "replicating" and not conn["mirror_required"]
                and not running) or None

    wait_until(quiet, timeout, interval=0.2,
               what="connection 1 replicating with no mirror pending "
                    f"(source log: {source.log_path})")
    wait_synced(source, timeout=timeout)


def kill_source(source: Agent, workload: RecordWorkload | None) -> None:
    """SIGKILL the source agent, abort its FUSE connection and unmount it.

    Unlike :meth:`Agent.kill` it waits, between the abort and the unmount, until the
    workload saw its mount die: after a lazy unmount the same paths lead to the bare
    backing directory, and a write there would bypass capture (an operator error, not a
    crash this suite is about).
    """
    from tests.system.harness import abort_fuse

    assert source.proc is not None
    source.proc.kill()
    for vol in source.extra.get("volumes", []):
        abort_fuse(vol)
    if workload is not None:
        workload.wait_parked()
    source.proc.wait(30)
    for vol in source.extra.get("volumes", []):
        subprocess.run(["fusermount3", "-u", "-z", vol], capture_output=True)


def restart_source(source: Agent, workload: RecordWorkload | None,
                   sampler: Sampler | None) -> bool:
    """Start the source again and let the workload go on; True if the record in flight
    at the kill had landed (then the prefix checks pause until :meth:`Sampler.strict`)."""
    source.start()
    if workload is None:
        return False
    landed = workload.reconcile()
    if landed and sampler is not None:
        sampler.relax("the record in flight at the source kill landed in its backing tree")
    workload.resume()
    return landed
