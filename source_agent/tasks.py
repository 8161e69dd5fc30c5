"""Task command processing on the source: queueing tasks into the stream, running the
source-side ones (``queue``, ``transmit``), and keeping every task's record.

A task is a TASK op appended to the volume journal like any write, so it sits at an
exact point of the op stream: after everything captured before ``queuetask`` and
before everything captured after. Target-side tasks (``receive``, ``execute``) are
checked here against what the target announced (task processing on, the task
exists there), so a task that cannot run is refused at queue time and nothing is
queued. The target reports results back (TASK_RESULT); ``--wait`` waits on them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgpack
import structlog
import trio

from protocol.control import Exit, Result, failed, ok
from protocol.frames import TaskResult
from protocol.ops import TaskOp, op_from_wire
from protocol.runtime.taskrun import (
    SOURCE_TRIGGERS,
    TASK_RUNNABLE_STATES,
    TaskRecord,
    TaskRefusedError,
    TaskStore,
    check_task,
    run_with_timeout,
)
from source_agent.registry import Connection, Registry
from source_agent.volume import Volume

log = structlog.get_logger("tasks")

_TASK_PREFIX = bytes([0x90 | 7, TaskOp.CODE])   # fixarray of 7, then the kind code


def is_encoded_task(encoded: bytes) -> bool:
    """Cheap test on a journal-encoded op: is it a TASK op?"""
    return encoded[:2] == _TASK_PREFIX


class SourceTasks:
    """Tasks of one source agent."""

    def __init__(self, store: TaskStore, registry: Registry, volumes: dict[str, Volume],
                 task_dir: str | None, node: str) -> None:
        self.store = store
        self.registry = registry
        self.volumes = volumes
        self.task_dir = task_dir
        self.node = node
        self.nursery: trio.Nursery | None = None

    # -- queueing ---------------------------------------------------------------------

    def _refusal(self, conn: Connection, name: str, trigger: str) -> str | None:
        """Why this task cannot be queued on ``conn``, or None."""
        if trigger in SOURCE_TRIGGERS:
            if not self.registry.task_processing:
                return ("task processing is disabled on this source (enable it with "
                        "`mirrorline taskprocessing enable`); target-side tasks "
                        "(on=execute, on=receive) still work")
            try:
                check_task(self.task_dir, name)
            except TaskRefusedError as exc:
                return f"source: {exc}"
            return None
        if "/" in name or name in ("", ".", "..") or "\0" in name:
            return f"task {name!r} must be a plain file name inside the target's task_dir"
        if conn.target_task_processing is False:
            return (f"task processing is disabled on target {conn.target_node or conn.target}; "
                    f"enable it there with `mirrorline --socket <target socket> "
                    f"taskprocessing enable`")
        if conn.target_tasks is not None and name not in conn.target_tasks:
            runnable = ", ".join(conn.target_tasks) or "none"
            return (f"task {name!r} is not an executable file in the task_dir of target "
                    f"{conn.target_node or conn.target} (runnable there: {runnable})")
        return None

    async def queue(self, conns: list[Connection], args: dict[str, Any]) -> Result:
        """``queuetask``: check on every connection first, then queue on each."""
        name = str(args.get("task", ""))
        task_args = [str(a) for a in args.get("args") or []]
        trigger = str(args.get("trigger") or "execute")
        timeout = float(args.get("timeout", -1.0))
        if trigger not in ("queue", "transmit", "receive", "execute"):
            return failed(f"unknown trigger {trigger!r}", Exit.USAGE)
        refusals = [f"connection {c.id}: {why}" for c in conns
                    if (why := self._refusal(c, name, trigger))]
        if refusals:
            return failed("task refused, nothing was queued: " + "; ".join(refusals),
                          refused=refusals)
        for volume in {c.volume for c in conns}:
            await self.volumes[volume].settled()   # changes made before the task go first
        # No await from here to the appends: each task sits right after them.
        records = []
        for conn in conns:
            op = TaskOp(uuid.uuid4().hex[:16], conn.id, name, task_args, trigger, timeout)
            record = TaskRecord(id=op.task_id, conid=conn.id, source=self.node, seq=0,
                                name=name, args=task_args, trigger=trigger, timeout=timeout,
                                side="source" if trigger in SOURCE_TRIGGERS else "target")
            # In the store before the op can be sent: a fast target's result must find it.
            self.store.records[record.id] = record
            record.seq = self.volumes[conn.volume].record(op)
            if not record.seq:
                del self.store.records[record.id]
                return failed(f"connection {conn.id}: the journal could not record the task")
            await trio.to_thread.run_sync(self.store.save)
            records.append(record)
            log.info("task queued", task_id=record.id, conid=conn.id, seq=record.seq, task=name,
                     trigger=trigger)
        for record in records:
            if record.trigger == "queue":   # onqueue: runs now, on the source
                await self._run_here(record)
        ids = ", ".join(f"{r.id} (connection {r.conid}, seq {r.seq})" for r in records)
        data: dict[str, Any] = {"task_id": records[0].id, "task_ids": [r.id for r in records],
                                "tasks": [r.public() for r in records]}
        if not args.get("wait"):
            return ok(f"queued task {name!r} as {ids}", **data)
        wait_timeout = args.get("wait_timeout")
        limit = float(wait_timeout) if wait_timeout is not None else float("inf")
        finals: list[TaskRecord] = []
        with trio.move_on_after(limit):
            for record in records:
                finals.append(await self.store.wait_final(record.id))
        if len(finals) < len(records):
            return failed(f"timed out after {wait_timeout} s waiting for task {name!r} "
                          f"({ids})", Exit.TIMEOUT, **data)
        data["tasks"] = [r.public() for r in finals]
        return _outcome(finals, data)

    async def _run_here(self, record: TaskRecord) -> None:
        assert self.nursery is not None
        conn = self.registry.connections.get(record.conid)
        if record.state not in TASK_RUNNABLE_STATES:
            return   # ran (or was refused) before: at most once
        try:
            path = check_task(self.task_dir, record.name)
            if not self.registry.task_processing:
                raise TaskRefusedError("task processing is disabled on this source")
        except TaskRefusedError as exc:
            record.state = "refused"
            record.message = str(exc)
            record.ended = time.time()
            await trio.to_thread.run_sync(self.store.put, record)
            return
        volume = self.volumes[conn.volume] if conn else None
        env = {"MIRRORLINE_CONID": str(record.conid), "MIRRORLINE_SOURCE": self.node,
               "MIRRORLINE_SEQ": str(record.seq), "MIRRORLINE_TASK_ID": record.id,
               "MIRRORLINE_TARGET_PATH": conn.target_path if conn else "",
               "MIRRORLINE_VOLUME_PATH": volume.path if volume else "",
               "MIRRORLINE_TRIGGER": record.trigger}
        await run_with_timeout(self.nursery, record, path, cwd=volume.path if volume else "/",
                               env=env, store=self.store)

    async def on_transmit(self, conn: Connection, seq: int, encoded: bytes) -> None:
        """The sender just sent this TASK op: run it if it is this connection's ontransmit."""
        op = op_from_wire(msgpack.unpackb(encoded, raw=False))
        assert isinstance(op, TaskOp)
        if op.conid != conn.id or op.trigger != "transmit":
            return
        record = self.store.get(op.task_id)
        if record is None:   # queued just before a crash: the journal kept it, the store not
            record = TaskRecord(id=op.task_id, conid=op.conid, source=self.node, seq=seq,
                                name=op.name, args=list(op.args), trigger=op.trigger,
                                timeout=op.timeout, side="source")
        await self._run_here(record)

    def on_result(self, conn: Connection, frame: TaskResult) -> None:
        """A target reported a task's state: update our record of it."""
        record = self.store.get(frame.task_id)
        if record is None:
            record = TaskRecord(id=frame.task_id, conid=conn.id, source=self.node,
                                seq=frame.seq, name="?", args=[], trigger="execute",
                                timeout=-1.0, side="target")
        if (record.state, record.exit_code, record.ended) == (frame.state, frame.exit_code,
                                                               frame.ended):
            return
        record.state = frame.state
        record.exit_code = frame.exit_code
        record.output = frame.output
        record.started = frame.started
        record.ended = frame.ended
        record.message = frame.message
        self.store.put(record)
        log.info("task result", task_id=record.id, conid=conn.id, seq=record.seq,
                 task=record.name, state=record.state, exit_code=record.exit_code)

    # -- listing and settings ---------------------------------------------------------

    def list(self, conid: Any) -> Result:
        records = self.store.recent(None if conid in (None, "*") else int(conid))
        return ok("", tasks=[r.public() for r in records])

    async def set_processing(self, enabled: bool) -> Result:
        self.registry.task_processing = enabled
        await trio.to_thread.run_sync(self.registry.save)
        word = "enabled" if enabled else "disabled"
        log.info(f"task processing {word}")
        return ok(f"task processing {word} on source {self.node}"
                  + ("" if enabled else " (target-side tasks still go through)"),
                  task_processing=enabled)


def _outcome(records: list[TaskRecord], data: dict[str, Any]) -> Result:
    """The exit of `queuetask --wait`: the task's own code, or 1 with the reason."""
    for record in records:
        label = f"task {record.name!r} ({record.id}, connection {record.conid})"
        if record.state in ("refused", "interrupted", "timed-out"):
            return failed(f"{label} {record.state}: {record.message}", **data)
        if record.state == "failed":
            code = record.exit_code if record.exit_code and record.exit_code > 0 else 1
            return Result(ok=False, exit=code, message=f"{label} failed with exit code "
                          f"{record.exit_code}{': ' + record.message if record.message else ''}",
                          data=data)
    names = ", ".join(f"{r.id}" for r in records)
    return ok(f"task {records[0].name!r} done ({names}), exit code 0", **data)
