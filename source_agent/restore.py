"""Restore on the source: take the replica back from the target (DESIGN §7, issue 8).

Replication of the connection must be stopped. The job opens a session with
``purpose = "restore"``; the target streams its replica as ops (reverse stream) and
this side applies them *through the mount*, from a worker thread (the event loop
keeps serving the FUSE requests this causes), with the target's own path guard and
applier, fsyncs each batch, and ACKs it. Going through the mount keeps the capture
layer's view exact, and the captured changes reach every *other* connection of
the volume, as any change would; for the restoring connection they are journaled
as no-ops (scope EXCEPT | conid), since its target already holds them.

When the target says "restore complete" (after every op is durable here), restore
required is cleared on both sides and the journal's older ops are skipped for this
connection: the source now holds the replica's data, which supersedes them.
Applications should not write to the protected directory during a restore.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from protocol.frames import Ack, Bye, CheckResult, Error, Ops, Ping, Pong
from protocol.ops import CHECK_NEWER, CHECK_ORPHANS, CheckOp, Op, WriteOp
from protocol.runtime.stream import FrameStream, LinkError
from source_agent.registry import Connection
from source_agent.sender import open_session
from source_agent.volume import Volume
from target_agent.applier import Applier
from target_agent.checker import check, remove_tree

log = structlog.get_logger("restore")


class RestoreApplier:
    """The target's applier on the source's backing tree, plus the restore's CHECKs."""

    def __init__(self, root: str, *, orphans: str) -> None:
        self.applier = Applier(root)
        self.orphans = orphans
        self.skip_path: bytes | None = None
        self.kept_newer = 0
        self.orphans_removed = 0
        #: checksum mode: (seq, path, result) of CHECKs to answer before the next ACK.
        self.answers: list[tuple[int, bytes, dict[str, Any]]] = []

    def apply(self, op: Op, seq: int = 0) -> None:
        if isinstance(op, CheckOp):
            self.skip_path = None
            if op.hashes or not op.flags & (CHECK_ORPHANS | CHECK_NEWER):
                # checksum mode: which of our blocks differ from the target's?
                self.applier.flush_times()
                result = check(self.applier.guard, op)
                self.answers.append((seq, op.path, {"job": op.job, "offset": op.offset,
                                                    **result}))
                return
            if op.flags & CHECK_ORPHANS and self.orphans == "remove":
                self.applier.flush_times()
                for name, _kind, _mtime in check(self.applier.guard, op).get("orphans", []):
                    path = os.path.join(op.path, name) if op.path != b"." else name
                    parent_fd, leaf = self.applier.guard.open_parent(path)
                    remove_tree(parent_fd, leaf)
                    self.orphans_removed += 1
                self.applier.guard.invalidate()
            elif op.flags & CHECK_NEWER:
                if check(self.applier.guard, op).get("skip") == "newer":
                    self.skip_path = op.path     # ours is newer: keep it
                    self.kept_newer += 1
            return
        if self.skip_path is not None and self.skip_path in op.paths():
            return
        self.applier.apply(op)

    def sync(self) -> None:
        self.applier.sync()

    def close(self) -> None:
        self.applier.close()


@dataclass
class RestoreJob:
    conn: Connection
    volume: Volume
    node: str
    mode: str = "overwrite"
    orphans: str = "remove"
    state: str = "starting"
    ops_applied: int = 0
    bytes_received: int = 0
    bytes_total: int = 0
    kept_newer: int = 0
    orphans_removed: int = 0
    error: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None
    done: trio.Event = field(default_factory=trio.Event)

    def status(self) -> dict[str, Any]:
        elapsed = max((self.ended or time.time()) - self.started, 1e-6)
        percent = 100.0 if self.state == "done" else (
            round(min(99.9, 100.0 * self.bytes_received / self.bytes_total), 1)
            if self.bytes_total else None)
        return {"kind": "restore", "conid": self.conn.id, "mode": self.mode,
                "percent": percent, "bytes_total": self.bytes_total,
                "orphans": self.orphans, "state": self.state, "ops_applied": self.ops_applied,
                "bytes_received": self.bytes_received,
                "rate_bytes_per_s": round(self.bytes_received / elapsed),
                "kept_newer": self.kept_newer, "orphans_removed": self.orphans_removed,
                "error": self.error, "started": self.started, "ended": self.ended}

    async def run(self, on_done: Any) -> None:
        """Run the restore once; ``on_done()`` is called after a successful one."""
        conn = self.conn
        restore_seq = self.volume.journal.last_seq
        applier: RestoreApplier | None = None
        try:
            self.state = "connecting"
            fs, welcome = await open_session(
                conn, self.node, purpose="restore", restore_mode=self.mode,
                restore_orphans=self.orphans, restore_seq=restore_seq)
            self.bytes_total = welcome.restore_bytes
            try:
                self.state = "restoring"
                log.info("restore started", conid=conn.id, mode=self.mode, orphans=self.orphans)
                self.volume.restoring_conid = conn.id
                applier = await trio.to_thread.run_sync(
                    lambda: RestoreApplier(self.volume.path, orphans=self.orphans))
                await self._receive(fs, applier)
            finally:
                await fs.aclose()
            conn.restore_required = False
            conn.mirror_required = False
            conn.mirror_reason = ""
            conn.restricted_since = None
            # Older journal ops are superseded by the restored data: never send them.
            conn.base_seq = max(conn.base_seq, restore_seq)
            conn.acked_seq = max(conn.acked_seq, restore_seq)
            on_done()
            self.state = "done"
            log.info("restore complete", conid=conn.id, ops=self.ops_applied,
                     kept_newer=self.kept_newer, orphans_removed=self.orphans_removed)
        except Exception as exc:   # link, protocol, apply, key … : reported, flag kept
            self.state = "failed"
            self.error = str(exc) or type(exc).__name__
            log.warning("restore failed; restore required stays set", conid=conn.id,
                        error=self.error)
        finally:
            self.volume.restoring_conid = 0
            if applier is not None:
                await trio.to_thread.run_sync(applier.close)
            self.ended = time.time()
            self.done.set()

    async def _receive(self, fs: FrameStream, applier: RestoreApplier) -> None:
        while True:
            frame = await fs.receive()
            if isinstance(frame, Ops):
                await trio.to_thread.run_sync(self._apply_batch, applier, frame.first_seq,
                                              frame.ops)
                answers, applier.answers = applier.answers, []
                for seq, path, result in answers:   # before the ACK that covers them
                    await fs.send(CheckResult(seq=seq, path=path, result=result))
                self.ops_applied += len(frame.ops)
                self.bytes_received += sum(len(op.data) for op in frame.ops
                                           if isinstance(op, WriteOp))
                self.kept_newer = applier.kept_newer
                self.orphans_removed = applier.orphans_removed
                await fs.send(Ack(received=frame.last_seq, durable=frame.last_seq))
            elif isinstance(frame, Ping):
                await fs.send(Pong(nonce=frame.nonce))
            elif isinstance(frame, Bye):
                if frame.reason == "restore complete":
                    return
                raise LinkError(f"target ended the restore: {frame.reason}")
            elif isinstance(frame, Error):
                raise LinkError(f"target refused the restore: {frame.message}")

    @staticmethod
    def _apply_batch(applier: RestoreApplier, first_seq: int, ops: list[Op]) -> None:
        for i, op in enumerate(ops):
            applier.apply(op, first_seq + i)
        applier.sync()
