"""Per-(source node, conid) replica state on the target, and how a session applies ops.

Why the checkpoint rule keeps the replica crash-consistent
-----------------------------------------------------------
Ops are applied strictly in seq order. After a batch, and before anything that
must see a durable state, :meth:`Replica.checkpoint` fsyncs every file and
directory the batch touched and only then persists ``applied_seq`` (atomic
replace of a small JSON file). So the persisted seq never claims more than is on
disk. After a crash the source resends from ``applied_seq + 1``; ops between the
checkpoint and the crash are applied a second time, which is harmless for every
op kind except rename and link (a replayed ``rename A B`` would move a newer
``A``, a replayed ``unlink B`` before it would delete what the rename put at ``B``,
a replayed exchange swaps back). So around each rename and link:

1. checkpoint *before* it: the replay window then holds that one op alone;
2. persist an *intent* (its seq and the inode numbers of its source and
   destination) in the same state file;
3. apply it, then checkpoint after it (which clears the intent).

If the target dies between 2 and 3, the op comes again with the intent's seq, and
the inode numbers tell whether it already happened (the destination now holds
the source's inode; for an exchange, the source holds the destination's): then it
is skipped instead of being done twice. A replayed link finds its name already
pointing at the same inode, which the applier accepts.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from protocol.ops import RENAME_EXCHANGE, CheckOp, NoteOp, Op, RenameOp
from protocol.runtime.metrics import ErrorRecord, Histogram
from protocol.runtime.statefile import load_json, save_json
from target_agent.applier import TRANSIENT_ERRNOS, Applier, ApplyError
from target_agent.checker import check
from target_agent.pathguard import PathError

log = structlog.get_logger("replica")

MAX_BACKOFF = 5.0
FLAG_AFTER_FAILURES = 10
#: A full file system loses nothing while the op is retried: the connection pauses
#: (state "paused") until space is freed, without being flagged mirror-required.
_FULL: frozenset[int] = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass
class Replica:
    """The persisted state of one connection's replica, plus its runtime status."""

    node: str
    conid: int
    target_path: str
    root: str
    state_path: str
    applied_seq: int = 0
    restore_required: bool = False
    mirror_required: bool = False
    mirror_reason: str = ""
    failed_over: bool = False
    #: {"seq", "old_ino", "new_ino"} while a rename is being applied (see above).
    intent: dict[str, Any] | None = None
    # Runtime only.
    state: str = "idle"
    #: The error now (``last_error``) and the last one with its times, kept after it
    #: cleared (status: last_error_time, recent_error).
    error: ErrorRecord = field(default_factory=ErrorRecord)
    apply_failures: int = 0
    received_seq: int = 0
    ops_applied: int = 0
    bytes_applied: int = 0
    last_checkpoint: float | None = None
    #: wall time the current pause began (apply failing and being retried), else None
    paused_since: float | None = None
    session_scope: trio.CancelScope | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    applier: Applier | None = None
    #: (seq, op, result) of CHECK ops applied but not yet answered; drained by the session.
    check_results: list[tuple[int, CheckOp, dict[str, Any]]] = field(default_factory=list)
    #: How long each checkpoint took, and its fsync of the touched files and
    #: directories alone (the rest is the state file's write, fsync and rename).
    checkpoint_latency: Histogram = field(default_factory=Histogram)
    fsync_latency: Histogram = field(default_factory=Histogram)

    _PERSISTED = ("node", "conid", "target_path", "applied_seq", "restore_required",
                  "mirror_required", "mirror_reason", "failed_over", "intent")

    @classmethod
    def load(cls, state_path: str, root: str) -> Replica | None:
        raw = load_json(state_path)
        if raw is None:
            return None
        return cls(node=raw["node"], conid=int(raw["conid"]), target_path=raw["target_path"],
                   root=root, state_path=state_path, applied_seq=int(raw["applied_seq"]),
                   restore_required=bool(raw.get("restore_required")),
                   mirror_required=bool(raw.get("mirror_required")),
                   mirror_reason=str(raw.get("mirror_reason", "")),
                   failed_over=bool(raw.get("failed_over")), intent=raw.get("intent"))

    @property
    def last_error(self) -> str:
        """Why applying fails now, or why the last session was refused ("" when fine)."""
        return self.error.current

    @last_error.setter
    def last_error(self, message: str) -> None:
        self.error.set(message)

    @property
    def replica_path(self) -> str:
        return os.path.join(self.root, self.target_path)

    @property
    def data_state(self) -> str:
        """As the scripting guide names them."""
        if self.state == "restoring":
            return "restoring"
        if self.failed_over:
            return "failed over"
        if self.restore_required:
            return "restore required"
        if self.mirror_required:
            return "mirror required"
        return "good"

    def save(self, **override: Any) -> None:
        """Persist the state; ``override`` replaces fields in what is written only."""
        state = {k: getattr(self, k) for k in self._PERSISTED}
        state.update(override)
        save_json(self.state_path, state)

    def status(self) -> dict[str, Any]:
        return {
            "source": self.node, "id": self.conid, "applied_seq": self.applied_seq,
            "data_state": self.data_state,
            "received_seq": self.received_seq, "state": self.state,
            "restore_required": self.restore_required, "mirror_required": self.mirror_required,
            "mirror_reason": self.mirror_reason, "failed_over": self.failed_over,
            "target_path": self.target_path, "replica_path": self.replica_path,
            "ops_applied": self.ops_applied, "bytes_applied": self.bytes_applied,
            "apply_failures": self.apply_failures, "last_error": self.last_error,
            "last_error_time": self.error.last_seen, "recent_error": self.error.status(),
            "last_checkpoint": self.last_checkpoint,
            "paused_since": self.paused_since,
            "tolerated_missing": self.applier.tolerated_missing if self.applier else 0,
        }

    # -- applying (runs in a worker thread) ---------------------------------------------

    def open_applier(self) -> Applier:
        if self.applier is None:
            self.applier = Applier(self.replica_path)
            self.applier.holding_dir = os.path.join(self.root, ".mirrorline-orphans",
                                                    self.target_path)
        return self.applier

    def close_applier(self) -> None:
        if self.applier is not None:
            self.applier.close()
            self.applier = None

    def apply_ops(self, first_seq: int, ops: list[Op], *, checkpoint: bool = True) -> int:
        """Apply ops with seqs ``first_seq…`` in order, checkpointing after rename/link.

        Returns how many were applied. With ``checkpoint`` False the ops are applied
        (visible) but the checkpoint is left to a later call (the caller coalesces
        checkpoints). Stops at the first ApplyError, which it re-raises after
        checkpointing everything applied before it, so ``applied_seq`` then names
        exactly where to retry.
        Runs in a worker thread: it touches no trio object.
        """
        applier = self.open_applier()
        done = 0
        finished = False
        try:
            for op in ops:
                seq = first_seq + done
                if seq <= self.applied_seq:   # duplicate after a reconnect: skip
                    done += 1
                    continue
                if isinstance(op, CheckOp):
                    applier.flush_times()   # mtimes of earlier writes are part of the state
                    self.check_results.append((seq, op, check(applier.guard, op)))
                    self._pending_seq = seq
                elif isinstance(op, NoteOp):
                    if op.note == "mirror-complete" and self.mirror_required:
                        self.mirror_required = False
                        self.mirror_reason = ""
                    self._pending_seq = seq
                elif applier.needs_checkpoint(op):
                    self._apply_guarded(seq, op)
                else:
                    applier.apply(op)
                    self._pending_seq = seq
                done += 1
                self.ops_applied += 1
            finished = True
        finally:
            if checkpoint or not finished:
                self.checkpoint()
        return done

    @property
    def checkpoint_pending(self) -> bool:
        """Ops were applied that the last checkpoint does not cover."""
        return self._pending_seq > self.applied_seq

    _pending_seq: int = 0

    def _apply_guarded(self, seq: int, op: Op) -> None:
        """Apply a rename or link so that a crash can never make it run twice."""
        assert self.applier is not None
        self.checkpoint()
        if isinstance(op, RenameOp):
            if self.intent and self.intent.get("seq") == seq and self._rename_done(op):
                log.info("replayed rename was already applied; skipped", seq=seq,
                         node=self.node, conid=self.conid)
            else:
                self.intent = {"seq": seq, "old_ino": self._ino(op.old),
                               "new_ino": self._ino(op.new)}
                self.save()
                self.applier.apply(op)
        else:
            self.applier.apply(op)
        self._pending_seq = seq
        self.checkpoint()

    def _ino(self, path: bytes) -> int | None:
        assert self.applier is not None
        try:
            parent_fd, name = self.applier.guard.open_parent(path)
            return os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_ino
        except (OSError, PathError):
            return None

    def _rename_done(self, op: RenameOp) -> bool:
        assert self.intent is not None
        old_ino: int | None = self.intent.get("old_ino")
        new_ino: int | None = self.intent.get("new_ino")
        if old_ino is None:
            return False
        if op.flags & RENAME_EXCHANGE:
            return new_ino is not None and self._ino(op.old) == new_ino
        return self._ino(op.new) == old_ino and self._ino(op.old) != old_ino

    def checkpoint(self) -> None:
        """fsync what was applied, then persist the applied seq (DESIGN §5)."""
        if self._pending_seq <= self.applied_seq:
            return
        assert self.applier is not None
        started = time.perf_counter()
        self.applier.sync()
        self.fsync_latency.observe(time.perf_counter() - started)
        try:
            # Written first, published after: status, ACKs and a new session's
            # resume point (read from other threads) never show a seq the file does
            # not hold yet.
            self.save(applied_seq=self._pending_seq, intent=None)
        except OSError as exc:
            # The state file's file system is full (or failing): the seq stays where
            # the file says, so no ACK claims more than a restart would resume from.
            raise ApplyError(f"checkpoint: cannot save {self.state_path}: "
                             f"{exc.strerror or exc}",
                             permanent=exc.errno not in TRANSIENT_ERRNOS,
                             errno=exc.errno) from exc
        self.applied_seq = self._pending_seq
        self.intent = None
        self.last_checkpoint = time.time()
        self.checkpoint_latency.observe(time.perf_counter() - started)

    async def apply_with_retry(self, first_seq: int, ops: list[Op], *,
                               checkpoint: bool = True,
                               keepalive: Callable[[], Awaitable[None]] | None = None) -> None:
        """Apply a batch; on temporary errors (ENOSPC, EIO, EACCES) retry with backoff.

        Never drops an op: while an op fails the connection is *paused* (state
        "paused", ``last_error`` says why, one warning in the log) and the same op is
        retried every few seconds, so freeing space lets it resume by itself. A full
        file system (ENOSPC, EDQUOT) only pauses; other temporary errors flag the
        connection mirror-required after repeated failures (DESIGN §5), retries going on.
        Cancellation (session end) stops the retries; the next session resumes at
        the checkpoint. ``keepalive`` is awaited after every failed attempt, so the
        session can show the source it is alive while paused (e.g. a repeated ACK:
        a paused applier stops the receiver, and with it the answers to PINGs).
        Raises:
            ApplyError: a permanent error (the caller ends the session).
        """
        backoff = 0.2
        start = 0
        failures = 0
        while True:
            try:
                if start < len(ops):
                    start += await trio.to_thread.run_sync(
                        functools.partial(self.apply_ops, first_seq + start, ops[start:],
                                          checkpoint=checkpoint))
                elif checkpoint and self.checkpoint_pending:
                    # Everything applied, but the checkpoint failed (its state file's
                    # file system is full): retry that alone.
                    await trio.to_thread.run_sync(self.checkpoint)
                else:
                    break
            except ApplyError as exc:
                if exc.permanent:
                    raise
                failures += 1
                self.apply_failures += 1
                # Everything before the failing op is applied (and, unless the checkpoint
                # itself failed, checkpointed): go on from the first op not applied.
                done = max(self._pending_seq, self.applied_seq)
                start = max(done - first_seq + 1, 0)
                self._pause(exc, first_seq + start, backoff, failures)
                if (failures >= FLAG_AFTER_FAILURES and exc.errno not in _FULL
                        and not self.mirror_required):
                    self.mirror_required = True
                    self.mirror_reason = f"repeated apply failures: {exc}"
                    log.error("apply keeps failing: connection flagged mirror-required "
                              "(retries go on)", node=self.node, conid=self.conid,
                              error=str(exc))
                    await trio.to_thread.run_sync(self.save)
                if keepalive is not None:
                    await keepalive()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        if self.state == "paused":
            log.warning("apply resumed", node=self.node, conid=self.conid,
                        seq=first_seq + start - 1, failures=failures,
                        paused_seconds=round(time.time() - (self.paused_since or 0), 1))
        self.state = "replicating"
        self.last_error = ""
        self.paused_since = None

    def _pause(self, exc: ApplyError, seq: int, retry_in: float, failures: int) -> None:
        name = errno.errorcode.get(exc.errno or 0, "error")
        if exc.errno in _FULL:
            reason = (f"{name}: the replica's file system is full; paused at seq {seq}, "
                      f"retrying until space is freed ({exc})")
        else:
            reason = f"{name}: apply failed at seq {seq}, retrying ({exc})"
        first = self.state != "paused" or self.last_error.split(":")[0] != name
        self.state = "paused"
        self.last_error = reason
        if self.paused_since is None:
            self.paused_since = time.time()
        if first:
            log.warning("connection paused: apply failed", node=self.node, conid=self.conid,
                        seq=seq, error=str(exc), errno=name, reason=reason)
        else:
            log.debug("apply still failing; retrying", node=self.node, conid=self.conid,
                      seq=seq, error=str(exc), failures=failures, retry_in=retry_in)
