"""Restore on the target: stream a connection's replica back to its source (DESIGN §7).

The stream runs in reverse on an ordinary authenticated session: the target sends
OPS (seq 1, 2, … for this restore), the source applies them to its backing tree and
ACKs. The ops are those a full mirror sends (``protocol.runtime.entries``), plus a
CHECK per directory range naming the replica's entries, so the source can remove
what only it has (``orphans=remove``), and, for ``newer``, a CHECK with the file's
mtime before each file so the source keeps files of its own that are newer.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Iterator
from typing import Final

import structlog
import trio
import trio.lowlevel

from protocol.checks import (
    BLOCK_SIZE,
    RANGE_BYTES,
    block_hashes,
    entry_kind,
    orphan_checks,
    stat_meta,
)
from protocol.frames import Ack, Bye, CheckResult, Error, Hello, Ops, Ping, Pong
from protocol.ops import (
    CHECK_LAST_RANGE,
    CHECK_NEWER,
    CheckOp,
    CreateOp,
    LinkOp,
    Op,
    PrepareOp,
    TruncateOp,
    WriteOp,
)
from protocol.runtime.entries import dir_ops, entry_ops, meta_ops
from protocol.runtime.groups import single_error
from protocol.runtime.stream import FrameStream, LinkError
from target_agent.replica import Replica

log = structlog.get_logger("restore")

BATCH_BYTES: Final = 1024 * 1024
WINDOW_BYTES: Final = 16 * 1024 * 1024


def replica_bytes(path: str) -> int:
    """Bytes of regular-file data under ``path`` (a stat walk), for restore progress."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


async def stream_replica(fs: FrameStream, replica: Replica, hello: Hello) -> int:
    """Send the whole replica as ops and wait until the source has them durable.

    Returns the number of ops sent. Raises LinkError/ProtocolError when the session
    breaks; nothing on the target changes then (the restore can simply run again).
    """
    base = os.open(replica.replica_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    acked = trio.lowlevel.ParkingLot()
    state = {"durable": 0, "received": 0}
    inflight: list[tuple[int, int]] = []

    # checksum mode: CHECK seq -> (path, offset) until the source answers it.
    pending: dict[int, tuple[bytes, int]] = {}
    answers: deque[CheckResult] = deque()

    async def reader() -> None:
        while True:
            frame = await fs.receive()
            if isinstance(frame, CheckResult):
                answers.append(frame)
                acked.unpark_all()
            elif isinstance(frame, Ack):
                state["durable"], state["received"] = frame.durable, frame.received
                acked.unpark_all()
            elif isinstance(frame, Ping):
                await fs.send(Pong(nonce=frame.nonce))
            elif isinstance(frame, (Bye, Error)):
                raise LinkError(f"source ended the restore: {getattr(frame, 'message', '')}"
                                f"{getattr(frame, 'reason', '')}")

    sent = 0
    try:
        with single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                batch: list[Op] = []
                size = 0
                seq = 1
                for op in _walk(base, hello):
                    batch.append(op)
                    size += op.wire_size()
                    if size < BATCH_BYTES:
                        continue
                    _note_checks(seq, batch, pending)
                    seq = await _send(fs, seq, batch, state, acked, inflight)
                    sent += len(batch)
                    batch, size = _repairs(base, answers, pending), 0
                while True:
                    if batch:
                        _note_checks(seq, batch, pending)
                        seq = await _send(fs, seq, batch, state, acked, inflight)
                        sent += len(batch)
                    batch = _repairs(base, answers, pending)
                    if batch:
                        continue
                    if not pending and state["durable"] >= seq - 1:
                        break
                    await acked.park()
                nursery.cancel_scope.cancel()
    finally:
        os.close(base)
    return sent


def _note_checks(seq: int, batch: list[Op], pending: dict[int, tuple[bytes, int]]) -> None:
    for i, op in enumerate(batch):
        if isinstance(op, CheckOp) and op.hashes:
            pending[seq + i] = (op.path, op.offset)


def _repairs(base: int, answers: deque[CheckResult],
             pending: dict[int, tuple[bytes, int]]) -> list[Op]:
    """Ops that send the blocks (and metadata) the source found different."""
    ops: list[Op] = []
    while answers:
        answer = answers.popleft()
        if pending.pop(answer.seq, None) is None:
            continue
        blocks = answer.result.get("blocks", [])
        what = list(answer.result.get("what", []))
        if blocks:
            try:
                fd = os.open(answer.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=base)
            except OSError:
                continue
            try:
                mtime = os.fstat(fd).st_mtime_ns
                offset0 = int(answer.result.get("offset", 0))
                for index in blocks:
                    offset = offset0 + int(index) * BLOCK_SIZE
                    data = os.pread(fd, BLOCK_SIZE, offset)
                    if data:
                        ops.append(WriteOp(answer.path, offset, data, mtime))
            finally:
                os.close(fd)
        if blocks or what:
            ops += meta_ops(base, answer.path, ["mode", "owner", "xattrs", "mtime", "size"])
    return ops


async def _send(fs: FrameStream, seq: int, batch: list[Op], state: dict[str, int],
                acked: trio.lowlevel.ParkingLot, inflight: list[tuple[int, int]]) -> int:
    while sum(b for s, b in inflight if s > state["received"]) > WINDOW_BYTES:
        await acked.park()
    inflight[:] = [(s, b) for s, b in inflight if s > state["received"]]
    await fs.send(Ops(first_seq=seq, ops=batch))
    inflight.append((seq + len(batch) - 1, sum(op.wire_size() for op in batch)))
    await trio.lowlevel.checkpoint()
    return seq + len(batch)


def _walk(base: int, hello: Hello) -> Iterator[Op]:
    """Every op of the restore, in tree order (parents before children)."""
    links: dict[tuple[int, int], bytes] = {}
    newer = hello.restore_mode == "newer"
    checksum = hello.restore_mode == "checksum"
    orphans = hello.restore_orphans == "remove"
    for dirpath, dirnames, filenames, dfd in os.fwalk(b".", dir_fd=base, follow_symlinks=False):
        dirnames.sort()
        rel = dirpath[2:] if dirpath.startswith(b"./") else b""
        if rel:
            yield from dir_ops(base, rel)
        if orphans:
            names = sorted(dirnames + filenames)
            yield from orphan_checks("restore", rel, os.stat(b".", dir_fd=dfd), names)
        for name in sorted(filenames):
            path = os.path.join(rel, name) if rel else name
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            kind = entry_kind(st.st_mode)
            if kind == "other":
                continue
            if newer and kind == "file":
                yield CheckOp("restore", path, "file", stat_meta(st), b"", b"", 0, BLOCK_SIZE, [],
                              [], b"", b"", CHECK_NEWER | CHECK_LAST_RANGE)
            if kind == "file" and st.st_nlink > 1:
                first = links.setdefault((st.st_dev, st.st_ino), path)
                if first != path:
                    yield PrepareOp(path, "file", [])
                    yield LinkOp(first, path)
                    continue
            if checksum and kind == "file":
                yield from _checksum_file_ops(base, path, st)
            else:
                yield from entry_ops(base, path)


def _checksum_file_ops(base: int, path: bytes, st: os.stat_result) -> Iterator[Op]:
    """A file in checksum mode: make it exist at the right size, then CHECK each range
    by block hashes; the source answers which blocks differ and only those are sent."""
    yield PrepareOp(path, "file", [])
    yield CreateOp(path, st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns)
    yield TruncateOp(path, st.st_size, st.st_mtime_ns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base)
    except OSError:
        return
    try:
        offset = 0
        while True:
            data = os.pread(fd, RANGE_BYTES, offset)
            last = offset + len(data) >= st.st_size or len(data) < RANGE_BYTES
            yield CheckOp("restore", path, "file", stat_meta(st), b"", b"", offset, BLOCK_SIZE,
                          block_hashes(data), [], b"", b"", CHECK_LAST_RANGE if last else 0)
            if last:
                return
            offset += len(data)
    finally:
        os.close(fd)
