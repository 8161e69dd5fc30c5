"""The journal on a real directory: append, read back, survive torn tails, release."""

from __future__ import annotations

import os

import pytest
import trio

from protocol.frames import encode_op
from protocol.ops import WriteOp
from source_agent.journal import Journal, JournalGapError


def _op(i: int) -> WriteOp:
    return WriteOp(b"f%d" % (i % 7), i * 10, b"x" * (i % 50), 1_000 + i)


async def test_append_read_memory_and_disk(tmp_path: str) -> None:
    j = Journal(str(tmp_path), memory_limit=1 << 20, segment_bytes=1 << 20)
    rec = j.open()
    assert rec.last_seq == 0 and rec.clean
    for i in range(1, 3001):
        assert j.append(_op(i)) == i
    # From memory.
    got = await j.read(10, 1 << 30)
    assert got[0] == encode_op(_op(10)) and len(got) == 2991
    await j.sync()
    assert j.durable_seq == 3000
    j.close()
    # From disk after reopening: memory tail is empty.
    j2 = Journal(str(tmp_path), memory_limit=1 << 20, segment_bytes=1 << 20)
    rec = j2.open()
    assert rec.last_seq == 3000 and rec.clean and rec.torn_bytes == 0
    got = await j2.read(1234, 1 << 30)
    assert got[0] == encode_op(_op(1234)) and got[-1] == encode_op(_op(3000))
    assert j2.append(_op(3001)) == 3001
    j2.close()


async def test_memory_tail_is_bounded_and_reads_fall_back_to_disk(tmp_path: str) -> None:
    j = Journal(str(tmp_path), memory_limit=1 << 20, segment_bytes=1 << 20)
    j.open()
    for i in range(1, 501):
        j.append(WriteOp(b"big", i, b"y" * 8192, i))
    assert j.memory_bytes <= (1 << 20) + 9000
    assert len(j.segments) > 1          # rolled over at 1 MiB
    got = await j.read(1, 64 * 1024)    # long evicted from memory
    assert got[0] == encode_op(WriteOp(b"big", 1, b"y" * 8192, 1))
    assert 1 <= len(got) <= 9
    j.close()


def test_torn_tail_is_cut_back_to_last_good_record(tmp_path: str) -> None:
    j = Journal(str(tmp_path))
    j.open()
    for i in range(1, 101):
        j.append(_op(i))
    path = j.segments[-1].path
    os.fsync(j._fd)
    # Simulate a crash: no clean mark, and half a record of garbage at the end.
    os.close(j._fd)
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x01\x00garbage")
    j2 = Journal(str(tmp_path))
    rec = j2.open()
    assert rec.last_seq == 100 and not rec.clean and rec.torn_bytes == 11
    assert j2.append(_op(101)) == 101
    # A corrupted byte in the middle cuts everything from that record on.
    j2.close()
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    j3 = Journal(str(tmp_path))
    rec = j3.open()
    assert 0 < rec.last_seq < 101 and rec.torn_bytes > 0
    j3.close()


async def test_release_deletes_only_fully_acked_segments(tmp_path: str) -> None:
    j = Journal(str(tmp_path), segment_bytes=1 << 20)
    j.open()
    for i in range(1, 401):
        j.append(WriteOp(b"f", 0, b"z" * 8192, i))
    first_segments = len(j.segments)
    assert first_segments >= 3
    cut = j.segments[1].last_seq
    assert j.release(cut) == 2
    assert j.first_seq == cut + 1
    with pytest.raises(JournalGapError):
        j._tail_first = 10**9  # force the disk path
        await j.read(5, 1000)
    j.close()


async def test_reader_waits_for_append(tmp_path: str) -> None:
    j = Journal(str(tmp_path))
    j.open()
    got: list[bytes] = []

    async def reader() -> None:
        got.extend(await j.read(1, 1 << 20))

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.05)
            assert not got
            j.append(_op(1))
    assert got == [encode_op(_op(1))]
    j.close()
