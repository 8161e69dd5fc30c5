"""Hand-made frames against a real target agent: hostile paths never escape the root."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest
import trio

from protocol.frames import Ack, Error, Ops, Welcome, encode_frame, encode_ops_frame
from protocol.ops import CreateOp, WriteOp
from protocol.runtime.stream import FrameStream, LinkError
from protocol.session import Role, Session
from target_agent.agent import TargetAgent
from target_agent.config import SourceEntry, TargetConfig
from tests.system.harness import free_port


@pytest.fixture
def setup(tmp_path: Path) -> tuple[TargetAgent, int, bytes, Path, Path]:
    port = free_port()
    key = os.urandom(32).hex().encode()
    (tmp_path / "k").write_bytes(key)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    cfg = TargetConfig(node="tgt", listen=f"127.0.0.1:{port}", state_dir=str(tmp_path / "st"),
                       control_socket=str(tmp_path / "t.sock"),
                       source=[SourceEntry(node="src", key_file=str(tmp_path / "k"),
                                           root=str(tmp_path / "rep"))])
    agent = TargetAgent(cfg)
    agent.open()
    return agent, port, key, tmp_path / "rep" / "d", outside


async def _connect(port: int, key: bytes, conid: int = 1) -> tuple[FrameStream, Welcome]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    session = Session(Role.SOURCE)
    fs = FrameStream(tcp, session)
    await fs.send_bytes(session.start(node="src", conid=conid, volume="v", target_path=b"d",
                                      key=key))
    await fs.receive()
    await fs.send_bytes(session.take_auth())
    welcome = await fs.receive()
    assert isinstance(welcome, Welcome)
    return fs, welcome


def _raw_op(*fields: object) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


HOSTILE = [
    _raw_op(1, b"../escape", 0, b"x", 0),
    _raw_op(1, b"a/../../escape", 0, b"x", 0),
    _raw_op(1, b"/etc/passwd", 0, b"x", 0),
    _raw_op(1, b"a\x00b", 0, b"x", 0),
    _raw_op(3, b"", 0o644, 0, 0, 0),
    _raw_op(3, b"a//b", 0o644, 0, 0, 0),
    _raw_op(8, b"ok", b"../../moved", 0),
    _raw_op(4, b"dev", 0o20644, 0, 0, 0),     # a character device: never
]


@pytest.mark.parametrize("raw", HOSTILE)
async def test_hostile_paths_are_refused(setup: tuple[TargetAgent, int, bytes, Path, Path],
                                         raw: bytes) -> None:
    agent, port, key, replica, outside = setup
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.serve)
            fs, welcome = await _connect(port, key)
            await fs.send_bytes(encode_ops_frame(welcome.resume_from, [raw]))
            frame = await fs.receive()
            assert isinstance(frame, Error)
            assert frame.code == "protocol"
            with pytest.raises(LinkError):
                await fs.receive()
            # The agent still serves: a good session applies a good op.
            fs2, welcome2 = await _connect(port, key)
            await fs2.send(Ops(first_seq=welcome2.resume_from,
                               ops=[CreateOp(b"fine", 0o644, 0, 0, 5)]))
            # The first ACK may say "received" only: the checkpoint follows within ms.
            durable = 0
            while durable < welcome2.resume_from:
                ack = await fs2.receive()
                assert isinstance(ack, Ack)
                durable = ack.durable
            assert durable == welcome2.resume_from
            nursery.cancel_scope.cancel()
    assert (outside / "victim").read_text() == "untouched"
    assert sorted(os.listdir(outside)) == ["victim"]
    assert not (replica.parent / "escape").exists()
    assert not (replica.parent.parent / "escape").exists()
    assert (replica / "fine").exists()


@pytest.mark.parametrize("path", [b"evil/x", b"evil/sub/x"])
async def test_planted_symlink_is_not_followed(setup: tuple[TargetAgent, int, bytes, Path, Path],
                                               path: bytes) -> None:
    agent, port, key, replica, outside = setup
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.serve)
            fs, welcome = await _connect(port, key)
            os.symlink(outside, replica / "evil")      # planted on the target
            await fs.send(Ops(first_seq=welcome.resume_from,
                              ops=[CreateOp(path, 0o644, 0, 0, 1),
                                   WriteOp(path, 0, b"owned", 1)]))
            frame = await fs.receive()
            assert isinstance(frame, Error), frame
            assert "symlink" in frame.message or "not a directory" in frame.message
            nursery.cancel_scope.cancel()
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "untouched"


async def test_write_to_planted_symlink_itself_does_not_follow(
        setup: tuple[TargetAgent, int, bytes, Path, Path]) -> None:
    agent, port, key, replica, outside = setup
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.serve)
            fs, welcome = await _connect(port, key)
            os.symlink(outside / "victim", replica / "link")
            await fs.send(Ops(first_seq=welcome.resume_from,
                              ops=[WriteOp(b"link", 0, b"owned", 1)]))
            frame = await fs.receive()
            assert isinstance(frame, Error), frame
            nursery.cancel_scope.cancel()
    assert (outside / "victim").read_text() == "untouched"


async def test_garbage_and_oversize_frames_get_an_error(
        setup: tuple[TargetAgent, int, bytes, Path, Path]) -> None:
    agent, port, _, replica, _ = setup
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.serve)
            for junk in [b"GET / HTTP/1.1\r\n\r\n" * 3, b"\x00" * 64,
                         b"ML\x01\x01\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00"]:
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                await tcp.send_all(junk)
                reply = b""
                while True:
                    data = await tcp.receive_some(65536)
                    if not data:
                        break
                    reply += data
                assert reply.startswith(b"ML") and b"frame" in reply
            # An unauthenticated peer cannot send OPS.
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            await tcp.send_all(encode_frame(Ops(first_seq=1, ops=[CreateOp(b"x", 0, 0, 0, 0)])))
            assert b"HELLO" in await tcp.receive_some(65536)
            nursery.cancel_scope.cancel()
    assert not (replica / "x").exists()
