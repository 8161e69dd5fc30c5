"""The journal's memory stays bounded by ``memory_limit`` however large the backlog
(issue 5, W8), and reads behind the memory tail cost about what they return."""

from __future__ import annotations

import gc
import sys

import trio

from protocol.frames import encode_op
from protocol.ops import WriteOp
from source_agent.journal import INDEX_BYTES, Journal


def _big(i: int, size: int) -> WriteOp:
    return WriteOp(b"big", i * size, bytes([i % 251]) * size, 1_000 + i)


def _tail_held_bytes(j: Journal) -> int:
    """Bytes of op data the memory tail still references (evicted slots included)."""
    return sum(sys.getsizeof(encoded) for _scope, encoded in j._tail)


async def test_memory_tail_lets_evicted_ops_go(tmp_path: str) -> None:
    # 1 MiB ops, as FUSE delivers big writes: fewer than the 4096 evicted entries after
    # which the tail list is compacted, so only dropping each reference at eviction
    # keeps the memory at the limit.
    size = 1 << 20
    j = Journal(str(tmp_path), memory_limit=8 * size, segment_bytes=16 * size)
    j.open()
    for i in range(1, 65):
        j.append(_big(i, size))
    gc.collect()
    assert j.memory_bytes <= 8 * size + size
    assert _tail_held_bytes(j) <= 9 * size + 64 * 1024
    # What was evicted reads back from disk; what is held reads from memory.
    with trio.fail_after(10):
        assert await j.read(3, 1) == [encode_op(_big(3, size))]
        assert await j.read(64, 1) == [encode_op(_big(64, size))]
    j.close()


async def test_disk_reads_skip_to_the_asked_seq(tmp_path: str) -> None:
    # Big records get an index entry every INDEX_BYTES, so a read near the end of a
    # segment does not read the whole segment before it.
    size = 300 * 1024
    j = Journal(str(tmp_path), memory_limit=1 << 20, segment_bytes=64 << 20)
    j.open()
    for i in range(1, 101):
        j.append(_big(i, size))
    seg = j.segments[-1]
    assert len(seg.index) == 100  # each record is bigger than INDEX_BYTES
    assert size > INDEX_BYTES
    j._tail_first = 10**9  # force the disk path
    with trio.fail_after(10):
        for seq in (1, 2, 50, 99, 100):
            got = await j.read(seq, 1)
            assert got == [encode_op(_big(seq, size))]
        got = await j.read(97, 1 << 30)
        assert got == [encode_op(_big(s, size)) for s in range(97, 101)]
    j.close()
    # The same index after a restart (rebuilt by the scan in open()).
    j2 = Journal(str(tmp_path), memory_limit=1 << 20, segment_bytes=64 << 20)
    j2.open()
    assert j2.segments[-1].index == seg.index
    with trio.fail_after(10):
        assert await j2.read(77, 1) == [encode_op(_big(77, size))]
    j2.close()


async def test_small_records_are_indexed_every_256(tmp_path: str) -> None:
    j = Journal(str(tmp_path), memory_limit=1 << 20, segment_bytes=64 << 20)
    j.open()
    for i in range(1, 1001):
        j.append(WriteOp(b"f", i, b"x", i))
    assert [seq for seq, _ in j.segments[-1].index] == [1, 257, 513, 769]
    j._tail_first = 10**9
    with trio.fail_after(10):
        for seq in (1, 256, 257, 700, 1000):
            assert (await j.read(seq, 1))[0] == encode_op(WriteOp(b"f", seq, b"x", seq))
    j.close()
