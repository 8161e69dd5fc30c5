"""Sender and target agent in one process over real loopback TCP, no FUSE.

Ops are appended straight to a real journal (the capture layer has its own tests);
everything after that is the real path: sender, frames, handshake, target session,
applier, checkpoint, acks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from protocol.ops import CreateOp, MkdirOp, RenameOp, UnlinkOp, WriteOp
from source_agent.journal import Journal
from source_agent.registry import Connection
from source_agent.sender import Sender
from source_agent.volume import Volume
from target_agent.agent import TargetAgent
from target_agent.config import SourceEntry, TargetConfig
from tests.system.harness import free_port


def _key(tmp: Path, name: str) -> str:
    path = tmp / f"{name}.key"
    path.write_text(os.urandom(32).hex())
    return str(path)


def _target(tmp: Path, port: int, key: str) -> TargetAgent:
    cfg = TargetConfig(node="tgt", listen=f"127.0.0.1:{port}", state_dir=str(tmp / "tstate"),
                       control_socket=str(tmp / "t.sock"),
                       source=[SourceEntry(node="src", key_file=key, root=str(tmp / "rep"))])
    agent = TargetAgent(cfg)
    agent.open()
    return agent


def _sender(tmp: Path, port: int, key: str) -> tuple[Sender, Volume, Connection]:
    journal = Journal(str(tmp / "journal"))
    journal.open()
    volume = Volume("data", str(tmp / "vol"), journal, on_journal_failure=lambda r: None)
    conn = Connection(id=1, volume="data", target=f"127.0.0.1:{port}", target_path="d",
                      key_file=key)
    sender = Sender(conn, volume, node="src", on_change=lambda important: None,
                    batch_bytes=64 * 1024, window_bytes=256 * 1024)
    return sender, volume, conn


async def _wait_acked(conn: Connection, seq: int) -> None:
    while conn.acked_seq < seq:
        await conn.acked.park()


async def test_ops_arrive_in_order_and_are_acked(tmp_path: Path) -> None:
    port = free_port()
    key = _key(tmp_path, "k")
    target = _target(tmp_path, port, key)
    sender, volume, conn = _sender(tmp_path, port, key)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(target.serve)
            nursery.start_soon(sender.run)
            volume.record(MkdirOp(b"dir", 0o755, 0, 0, 1))
            volume.record(CreateOp(b"dir/a", 0o644, 0, 0, 2))
            for i in range(2000):   # more than one batch and one window
                volume.record(WriteOp(b"dir/a", i * 512, bytes([i % 256]) * 512, 10 + i))
            volume.record(CreateOp(b"b", 0o600, 0, 0, 3))
            volume.record(RenameOp(b"b", b"dir/b", 0))
            last = volume.record(UnlinkOp(b"dir/b"))
            await _wait_acked(conn, last)
            replica = tmp_path / "rep" / "d"
            data = (replica / "dir" / "a").read_bytes()
            assert data == b"".join(bytes([i % 256]) * 512 for i in range(2000))
            assert not (replica / "dir" / "b").exists()
            status = (await target.cmd_status({}, _no_emit)).data["connections"][0]
            assert status["applied_seq"] == last
            assert conn.state == "replicating"
            nursery.cancel_scope.cancel()


async def test_wrong_key_is_refused_and_good_source_still_served(tmp_path: Path) -> None:
    port = free_port()
    key = _key(tmp_path, "k")
    target = _target(tmp_path, port, key)
    bad_sender, _, bad_conn = _sender(tmp_path / "bad", port, _key(tmp_path, "wrong"))
    (tmp_path / "bad").mkdir(exist_ok=True)
    good_sender, good_volume, good_conn = _sender(tmp_path, port, key)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(target.serve)
            nursery.start_soon(bad_sender.run)
            nursery.start_soon(good_sender.run)
            last = good_volume.record(CreateOp(b"x", 0o644, 0, 0, 1))
            await _wait_acked(good_conn, last)
            # The sender signals no event when conn.state changes, so poll it.
            while bad_conn.state != "error":  # noqa: ASYNC110
                await trio.sleep(0.05)
            assert "authentication" in bad_conn.last_error or "wrong key" in bad_conn.last_error
            assert target.refused_sessions >= 1
            nursery.cancel_scope.cancel()


async def _no_emit(event: dict[str, object]) -> None:
    raise AssertionError("status emits nothing")


@pytest.fixture(autouse=True)
def _make_dirs(tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    (tmp_path / "bad").mkdir()
