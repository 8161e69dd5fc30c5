"""The watcher on real directories: kernel events → journal ops → the real applier.

No agents, no network: a Watcher over a real source directory appends to a real
journal; the ops are read back and applied by the target's Applier to a replica
directory, which must then equal the source (content, names, metadata).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import trio

from protocol.ops import Op, WriteOp, op_from_wire
from source_agent.journal import Journal
from source_agent.volume import Volume
from source_agent.watch import Watcher
from source_agent.watch_index import WatchIndex
from target_agent.applier import Applier
from tests.system.harness import diff_trees
from tests.system.workload import Churn

BACKENDS = ["fanotify", "inotify"]


@dataclass
class Rig:
    src: Path
    dst: Path
    watcher: Watcher
    journal: Journal
    applied: int = 0
    ops: list[Op] | None = None

    async def sync(self) -> list[Op]:
        """Settle the watcher, apply every new op to the replica; returns the ops."""
        await self.watcher.settle()
        ops: list[Op] = []
        while self.applied < self.journal.last_seq:
            for encoded in await self.journal.read(self.applied + 1, 1 << 26):
                ops.append(op_from_wire(msgpack.unpackb(encoded, raw=False)))
                self.applied += 1
        with Applier(self.dst) as applier:
            for op in ops:
                applier.apply(op)
        return ops


@asynccontextmanager
async def rig(tmp_path: Path, backend: str, window: float = 0.01) -> AsyncIterator[Rig]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(exist_ok=True)
    dst.mkdir(exist_ok=True)
    journal = Journal(str(tmp_path / "journal"), memory_limit=1 << 24, segment_bytes=1 << 24)
    journal.open()
    volume = Volume("v", str(src), journal, on_journal_failure=lambda reason: None, watch=True)
    volume.backing_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    watcher = Watcher(volume, WatchIndex(str(tmp_path / "index.sqlite")), backend=backend,
                      window=window)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.serve)
            await volume.index_ready.wait()
            yield Rig(src, dst, watcher, journal)
            nursery.cancel_scope.cancel()
    finally:
        journal.close()
        watcher.close()
        os.close(volume.backing_fd)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_churn_converges(tmp_path: Path, backend: str) -> None:
    with trio.fail_after(120):
        async with rig(tmp_path, backend) as r:
            churn = Churn(r.src, seed=11)
            for round_ in range(6):
                for _ in range(150):
                    churn.step()
                await r.sync()
                problems = diff_trees(r.src, r.dst, links=False)
                assert problems == [], f"round {round_}: " + "\n".join(problems[:20])


@pytest.mark.parametrize("backend", BACKENDS)
async def test_only_changed_blocks_are_sent(tmp_path: Path, backend: str) -> None:
    with trio.fail_after(60):
        async with rig(tmp_path, backend) as r:
            data = bytearray(os.urandom(1 << 20)) * 16      # 16 MiB
            (r.src / "f").write_bytes(data)
            await r.sync()
            fd = os.open(r.src / "f", os.O_WRONLY)
            os.pwrite(fd, b"x" * 4096, 6 * 65536 - 100)    # blocks 5 and 6
            os.pwrite(fd, b"y" * 10, 15 << 20)
            os.close(fd)
            ops = await r.sync()
            writes = [op for op in ops if isinstance(op, WriteOp)]
            assert sum(len(w.data) for w in writes) == 3 * 65536, [
                (w.offset, len(w.data)) for w in writes]
            assert diff_trees(r.src, r.dst) == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_restart_sends_offline_changes(tmp_path: Path, backend: str) -> None:
    with trio.fail_after(60):
        async with rig(tmp_path, backend) as r:
            for i in range(30):
                (r.src / f"f{i}").write_bytes(b"%d" % i * 999)
            (r.src / "d").mkdir()
            (r.src / "d" / "x").write_bytes(b"x")
            await r.sync()
            applied = r.applied
        (tmp_path / "src" / "f1").write_bytes(b"offline")
        os.unlink(tmp_path / "src" / "d" / "x")
        (tmp_path / "src" / "g").write_bytes(b"new")
        async with rig(tmp_path, backend) as r2:
            r2.applied = applied
            assert r2.watcher.startup.startswith("resumed from the index"), r2.watcher.startup
            assert r2.watcher.stats.files_read <= 4, r2.watcher.stats
            await r2.sync()
            assert diff_trees(r2.src, r2.dst) == []
