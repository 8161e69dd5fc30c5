"""Task command processing, the part both agents share: checking, running, recording.

A task is an executable file directly inside an agent's ``task_dir``. It runs without
a shell, with its arguments, a working directory and MIRRORLINE_* variables, and its
output's tail is kept. Each task runs at most once: its record is persisted as
``running`` *before* the process starts, so an agent that dies during a task finds
it ``running`` at start-up, marks it ``interrupted``, and never starts it again.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import structlog
import trio

from protocol.runtime.statefile import load_json, save_json

log = structlog.get_logger("tasks")

OUTPUT_TAIL: Final = 4096
KEEP_RECORDS: Final = 500
#: States after which nothing changes any more (timed-out still gets its exit code).
FINAL_STATES: Final = frozenset({"done", "failed", "timed-out", "interrupted", "refused"})
#: A task may be started only from these states: each task runs at most once.
TASK_RUNNABLE_STATES: Final = frozenset({"queued"})
SOURCE_TRIGGERS: Final = ("queue", "transmit")
TARGET_TRIGGERS: Final = ("receive", "execute")


class TaskRefusedError(Exception):
    """The task cannot run here: bad name, missing, not executable, processing disabled."""


@dataclass
class TaskRecord:
    id: str
    conid: int
    source: str
    seq: int
    name: str
    args: list[str]
    trigger: str
    timeout: float
    side: str                       # "source" or "target": where it runs
    state: str = "queued"           # queued running done failed timed-out interrupted refused
    exit_code: int | None = None
    output: str = ""
    message: str = ""
    queued: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES and (self.state != "timed-out" or self.ended is not None)

    def public(self) -> dict[str, Any]:
        return asdict(self)


def check_task(task_dir: str | None, name: str) -> str:
    """The absolute path of task ``name`` in ``task_dir``.

    Raises:
        TaskRefusedError: naming why (no task_dir, a path rather than a name, missing,
            not a regular file, not executable, a symlink leading out of task_dir).
    """
    if not task_dir:
        raise TaskRefusedError("no task_dir is configured on this agent")
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise TaskRefusedError(f"task {name!r} must be a plain file name inside {task_dir}, "
                               "not a path")
    path = os.path.join(task_dir, name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TaskRefusedError(f"task {name!r} does not exist in {task_dir}") from None
    except OSError as exc:
        raise TaskRefusedError(f"task {name!r}: {exc.strerror}") from exc
    real_dir = os.path.realpath(task_dir)
    real_path = os.path.realpath(path)
    if os.path.dirname(real_path) != real_dir:
        raise TaskRefusedError(f"task {name!r} is a symlink leading out of {task_dir}")
    if not stat.S_ISREG(st.st_mode):
        raise TaskRefusedError(f"task {name!r} in {task_dir} is not a regular file")
    if not os.access(real_path, os.X_OK):
        raise TaskRefusedError(f"task {name!r} in {task_dir} is not executable (chmod +x)")
    # The resolved path, not the name: a symlink swapped after this check cannot
    # redirect the run outside task_dir.
    return real_path


def list_tasks(task_dir: str | None) -> list[str]:
    """Names of the runnable tasks in ``task_dir`` (sorted; empty when none)."""
    if not task_dir:
        return []
    try:
        names = os.listdir(task_dir)
    except OSError:
        return []
    out = []
    for name in names:
        try:
            check_task(task_dir, name)
        except TaskRefusedError:
            continue
        out.append(name)
    return sorted(out)


class TaskStore:
    """Recent task records of one agent, persisted in ``<state_dir>/tasks.json``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: dict[str, TaskRecord] = {}
        self._save_lock = threading.Lock()   # put() runs on the loop and in worker threads
        self.changed = trio.lowlevel.ParkingLot()

    def load(self) -> list[TaskRecord]:
        """Load records; tasks found ``running`` are marked ``interrupted`` and returned."""
        raw = load_json(self.path) or {}
        interrupted = []
        for item in raw.get("tasks", []):
            record = TaskRecord(**item)
            if record.state in ("running",):
                record.state = "interrupted"
                record.ended = time.time()
                record.message = "the agent stopped while the task was running; not re-run"
                interrupted.append(record)
            self.records[record.id] = record
        if interrupted:
            self.save()
        return interrupted

    def result_counts(self) -> dict[str, int]:
        """How many kept records ended in each final state (every state present)."""
        counts = dict.fromkeys(sorted(FINAL_STATES), 0)
        for record in list(self.records.values()):
            if record.state in counts:
                counts[record.state] += 1
        return counts

    def save(self) -> None:
        with self._save_lock:
            records = sorted(self.records.values(), key=lambda r: r.queued)[-KEEP_RECORDS:]
            self.records = {r.id: r for r in records}
            save_json(self.path, {"tasks": [r.public() for r in records]})

    def put(self, record: TaskRecord) -> None:
        """Add or update a record and persist it (before the caller acts on it)."""
        self.records[record.id] = record
        self.save()
        self.changed.unpark_all()

    def get(self, task_id: str) -> TaskRecord | None:
        return self.records.get(task_id)

    def recent(self, conid: int | None = None, limit: int = 50) -> list[TaskRecord]:
        records = [r for r in self.records.values() if conid is None or r.conid == conid]
        return sorted(records, key=lambda r: r.queued)[-limit:]

    def last(self, conid: int, source: str | None = None) -> TaskRecord | None:
        records = [r for r in self.records.values()
                   if r.conid == conid and (source is None or r.source == source)]
        return max(records, key=lambda r: r.queued) if records else None

    async def wait_final(self, task_id: str) -> TaskRecord:
        """Return the record once it is final (or has timed out, when waiting stops)."""
        while True:
            record = self.records.get(task_id)
            if record is not None and record.final:
                return record
            await self.changed.park()


async def run_task(record: TaskRecord, path: str, *, cwd: str, env: dict[str, str],
                   store: TaskStore, on_update: Callable[[TaskRecord], None] | None = None,
                   finished: trio.Event | None = None) -> None:
    """Like :func:`_run_task`, but a bug or an OS error fails the task, never the agent."""
    try:
        await _run_task(record, path, cwd=cwd, env=env, store=store, on_update=on_update,
                        finished=finished)
    except Exception as exc:
        log.exception("task runner failed", task_id=record.id)
        record.state = "failed"
        record.message = f"task runner error: {exc}"
        record.ended = time.time()
        try:
            store.put(record)
        except OSError:
            pass
        if finished is not None:
            finished.set()


async def _run_task(record: TaskRecord, path: str, *, cwd: str, env: dict[str, str],
                    store: TaskStore, on_update: Callable[[TaskRecord], None] | None = None,
                    finished: trio.Event | None = None) -> None:
    """Run the task process to its end, keeping ``record`` and ``store`` up to date.

    The record is persisted ``running`` before the process starts (at most once).
    If the caller marks it ``timed-out`` meanwhile, that state is kept and the exit
    code and end time are still filled in. Cancellation terminates the process
    (SIGTERM, then SIGKILL after 5 s) and records ``interrupted``.
    """
    record.state = "running"
    record.started = time.time()
    store.put(record)
    if on_update is not None:
        on_update(record)
    log.info("task started", task_id=record.id, conid=record.conid, seq=record.seq,
             task=record.name, trigger=record.trigger)
    tail = bytearray()
    try:
        proc = await trio.lowlevel.open_process(
            [path, *record.args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=cwd, env={**_base_env(), **env},
            start_new_session=True)
    except OSError as exc:
        record.state = "failed"
        record.message = f"cannot start task {record.name!r}: {exc.strerror or exc}"
        record.ended = time.time()
        store.put(record)
        if on_update is not None:
            on_update(record)
        if finished is not None:
            finished.set()
        return
    try:
        assert proc.stdout is not None
        async with proc.stdout:
            while True:
                chunk = await proc.stdout.receive_some(65536)
                if not chunk:
                    break
                tail += chunk
                if len(tail) > OUTPUT_TAIL:
                    del tail[:-OUTPUT_TAIL]
        code = await proc.wait()
    except BaseException:
        with trio.CancelScope(shield=True):
            await _terminate(proc)
            record.state = "interrupted"
            record.message = "the agent stopped while the task was running"
            record.ended = time.time()
            record.output = tail.decode(errors="replace")
            store.put(record)
            if finished is not None:
                finished.set()
        raise
    record.exit_code = code
    record.output = tail.decode(errors="replace")
    record.ended = time.time()
    if record.state != "timed-out":
        record.state = "done" if code == 0 else "failed"
        if code < 0:
            record.message = f"killed by signal {signal.Signals(-code).name}"
    store.put(record)
    if on_update is not None:
        on_update(record)
    if finished is not None:
        finished.set()
    log.info("task finished", task_id=record.id, conid=record.conid, seq=record.seq,
             task=record.name, state=record.state, exit_code=code,
             seconds=round(record.ended - (record.started or record.ended), 3),
             output_tail=record.output[-400:])


async def _terminate(proc: trio.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with trio.move_on_after(5):
        await proc.wait()
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await proc.wait()


def _base_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return env


async def run_with_timeout(nursery: trio.Nursery, record: TaskRecord, path: str, *, cwd: str,
                           env: dict[str, str], store: TaskStore,
                           on_update: Callable[[TaskRecord], None] | None = None) -> None:
    """Start the task in ``nursery`` and wait for it at most ``record.timeout`` seconds.

    ``timeout < 0`` waits forever, ``0`` does not wait. When the wait ends first the
    record becomes ``timed-out`` and the task keeps running in ``nursery``.
    """
    finished = trio.Event()
    nursery.start_soon(lambda: run_task(record, path, cwd=cwd, env=env, store=store,
                                        on_update=on_update, finished=finished))
    limit = float("inf") if record.timeout < 0 else record.timeout
    with trio.move_on_after(limit):
        await finished.wait()
        return
    if record.state == "running" and record.timeout != 0:
        record.state = "timed-out"
        record.message = f"still running after {record.timeout:g} s; later ops went on"
        store.put(record)
        if on_update is not None:
            on_update(record)
        log.warning("task timed out; later ops proceed", task_id=record.id, conid=record.conid,
                    seq=record.seq, timeout=record.timeout)
