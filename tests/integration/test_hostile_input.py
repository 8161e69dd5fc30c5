"""Hostile peers against a real target agent over loopback TCP (issue 6, point 4).

Every test sends something a broken or malicious peer might, checks the answer is a
clear ERROR (or a clean close), that nothing outside the replica root changed, and
then proves the agent still serves: a good session applies an op and gets it acked.
Hostile paths inside OPS are in ``test_hostile.py``; this file adds the handshake,
framing, ordering, task-name, control-socket and login-flood cases.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import resource
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from structlog.testing import capture_logs

import target_agent.agent as agent_module
from protocol.control import Request, Result, ok
from protocol.errors import AuthenticationError
from protocol.frames import (
    DEFAULT_MAX_FRAME,
    HEADER,
    MAGIC,
    VERSION,
    Ack,
    Auth,
    Bye,
    Challenge,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    Ops,
    TaskResult,
    Welcome,
    checksum,
    encode_frame,
    encode_ops_frame,
)
from protocol.keys import KeyFileError, read_key
from protocol.ops import CreateOp, LinkOp, MkdirOp, RenameOp, SymlinkOp, TaskOp, WriteOp
from protocol.runtime.control import Emit, serve_control
from protocol.runtime.ratelimit import LoginLimiter
from protocol.runtime.stream import FrameStream, LinkError
from protocol.runtime.taskrun import TaskRecord, TaskRefusedError, TaskStore, check_task
from protocol.session import HANDSHAKE_MAX_FRAME, Role, Session
from source_agent.config import SourceConfig
from source_agent.registry import Connection, Registry
from source_agent.tasks import SourceTasks
from target_agent.agent import TargetAgent
from target_agent.config import SourceEntry, TargetConfig
from tests.system.harness import free_port

HOSTILE_ADDRESS = "127.0.0.2"   # loopback too: the limiter tells it from 127.0.0.1


@dataclass
class Site:
    """A target agent (not yet serving) and the places the tests look at."""

    agent: TargetAgent
    port: int
    key: bytes
    key_file: Path
    root: Path          # the source's root on the target
    replica: Path       # root / "d", connection 1's replica
    outside: Path       # must never change
    tmp: Path

    def outside_untouched(self) -> bool:
        return (sorted(os.listdir(self.outside)) == ["victim"]
                and (self.outside / "victim").read_text() == "untouched")


def make_site(tmp: Path, key: bytes | None = None, task_dir: Path | None = None) -> Site:
    port = free_port()
    good = os.urandom(32).hex().encode()
    key_file = tmp / "k"
    key_file.write_bytes(good if key is None else key)
    key_file.chmod(0o600)
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    cfg = TargetConfig(node="tgt", listen=f"127.0.0.1:{port}", state_dir=str(tmp / "st"),
                       control_socket=str(tmp / "t.sock"),
                       task_dir=str(task_dir) if task_dir else None,
                       source=[SourceEntry(node="src", key_file=str(key_file),
                                           root=str(tmp / "rep"))])
    agent = TargetAgent(cfg)
    agent.open()
    return Site(agent, port, good if key is None else key, key_file, tmp / "rep",
                tmp / "rep" / "d", outside, tmp)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


@asynccontextmanager
async def serving(site: Site, seconds: float = 30) -> AsyncIterator[trio.Nursery]:
    with trio.fail_after(seconds):
        async with trio.open_nursery() as nursery:
            await nursery.start(site.agent.serve)
            yield nursery
            nursery.cancel_scope.cancel()


async def connect(port: int, key: bytes, conid: int = 1, target_path: bytes = b"d",
                  local: str | None = None) -> tuple[FrameStream, Welcome]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=local)
    session = Session(Role.SOURCE)
    fs = FrameStream(tcp, session)
    await fs.send_bytes(session.start(node="src", conid=conid, volume="v",
                                      target_path=target_path, key=key))
    await fs.receive()
    await fs.send_bytes(session.take_auth())
    welcome = await fs.receive()
    assert isinstance(welcome, Welcome), welcome
    return fs, welcome


async def wait_durable(fs: FrameStream, seq: int) -> None:
    durable = 0
    while durable < seq:
        frame = await fs.receive()
        if isinstance(frame, Ack):
            durable = frame.durable
        else:
            assert not isinstance(frame, Error), frame


async def good_session(site: Site, name: bytes, local: str | None = None) -> None:
    """The agent still serves: a fresh session applies one op and acks it durable."""
    fs, welcome = await connect(site.port, site.key, local=local)
    await fs.send(Ops(first_seq=welcome.resume_from, ops=[CreateOp(name, 0o644, 0, 0, 1)]))
    await wait_durable(fs, welcome.resume_from)
    await fs.send(Bye(reason="test done"))
    await fs.aclose()
    assert (site.replica / os.fsdecode(name)).exists()


class RawPeer:
    """A peer that sends raw bytes and decodes whatever comes back, no state checks."""

    def __init__(self, tcp: trio.SocketStream) -> None:
        self.tcp = tcp
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.frames: list[Frame] = []

    @classmethod
    async def open(cls, port: int, local: str | None = None) -> RawPeer:
        return cls(await trio.open_tcp_stream("127.0.0.1", port, local_address=local))

    async def send(self, data: bytes) -> None:
        await self.tcp.send_all(data)

    async def next_frame(self) -> Frame | None:
        """The next frame, or None at end of stream."""
        while not self.frames:
            try:
                data = await self.tcp.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def until_close(self) -> list[Frame]:
        """Every frame until the agent closes the connection (which it must)."""
        out = []
        while (frame := await self.next_frame()) is not None:
            out.append(frame)
        await self.tcp.aclose()
        return out

    async def error(self) -> Error:
        """The agent's last word: exactly one ERROR, then it closes."""
        frames = await self.until_close()
        assert frames and isinstance(frames[-1], Error), frames
        return frames[-1]


def raw_frame(ftype: int, body: bytes, length: int | None = None) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, 0, len(body) if length is None else length,
                       checksum(body)) + body


def hello_bytes(conid: int = 1, target_path: bytes = b"d", node: str = "src") -> bytes:
    return encode_frame(Hello(versions=[VERSION], node=node, conid=conid, volume="v",
                              target_path=target_path, nonce=os.urandom(32)))


def source_proof(key: bytes, hello: Hello, target_nonce: bytes) -> bytes:
    """The source's proof as session.py documents it (HMAC over the transcript)."""
    parts = [hello.node.encode(), str(hello.conid).encode(), hello.volume.encode(),
             hello.target_path, hello.nonce, target_nonce]
    transcript = b"".join(struct.pack(">I", len(p)) + p for p in parts)
    return hmac.new(key, b"mirrorline-source" + transcript, hashlib.sha256).digest()


async def handshake_error(site: Site, *, conid: int = 1, target_path: bytes = b"d") -> Error:
    """Run a handshake with the right key and return the ERROR that ends it."""
    peer = await RawPeer.open(site.port)
    session = Session(Role.SOURCE)
    await peer.send(session.start(node="src", conid=conid, volume="v",
                                  target_path=target_path, key=site.key))
    frame = await peer.next_frame()
    if isinstance(frame, Challenge):
        session.receive_data(encode_frame(frame))
        await peer.send(session.take_auth())
    else:
        assert isinstance(frame, Error), frame
        assert await peer.next_frame() is None
        return frame
    return await peer.error()


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries
                       for child in nursery.child_tasks)
    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- a peer that never authenticates ---------------------------------------------------

async def test_peers_that_never_authenticate_time_out_and_leave_nothing_behind(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "HANDSHAKE_TIMEOUT", 1.0)
    async with serving(site):
        await trio.sleep(0.1)
        baseline = count_tasks()
        silent = [await RawPeer.open(site.port) for _ in range(20)]
        partial = [await RawPeer.open(site.port) for _ in range(10)]
        for peer in partial:   # half a HELLO, then nothing
            await peer.send(hello_bytes()[:30])
        await trio.sleep(0.3)
        assert count_tasks() >= baseline + 30     # they are being served ...
        await good_session(site, b"during")       # ... and do not block a good source
        for peer in silent:      # not a byte: closed (ERROR is optional, nobody reads it)
            frames = await peer.until_close()
            assert all(isinstance(f, Error) and f.code == "timeout" for f in frames), frames
        for peer in partial:
            error = await peer.error()
            assert error.code == "timeout" and "no complete handshake" in error.message
        await trio.sleep(0.2)
        assert count_tasks() == baseline          # ... and leave nothing behind
        assert site.agent._handshaking == {}
        await good_session(site, b"after")
    assert site.outside_untouched()


async def test_unauthenticated_connections_per_address_are_capped(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "MAX_HANDSHAKES_PER_PEER", 5)
    async with serving(site):
        idle = [await RawPeer.open(site.port, HOSTILE_ADDRESS) for _ in range(5)]
        await trio.sleep(0.2)
        refused = await RawPeer.open(site.port, HOSTILE_ADDRESS)
        error = await refused.error()
        assert error.code == "rate_limited" and "unauthenticated" in error.message
        await good_session(site, b"other-address")     # 127.0.0.1 is not affected
        for peer in idle:
            await peer.tcp.aclose()
        await trio.sleep(0.2)
        await good_session(site, b"hostile-address-again", local=HOSTILE_ADDRESS)


# -- replay, wrong key, bad key files ---------------------------------------------------

async def test_replayed_handshake_is_refused(site: Site) -> None:
    async with serving(site):
        # Record what a good source sends.
        tcp = await trio.open_tcp_stream("127.0.0.1", site.port)
        session = Session(Role.SOURCE)
        fs = FrameStream(tcp, session)
        hello = session.start(node="src", conid=1, volume="v", target_path=b"d", key=site.key)
        await fs.send_bytes(hello)
        challenge = await fs.receive()
        assert isinstance(challenge, Challenge)
        auth = session.take_auth()
        await fs.send_bytes(auth)
        assert isinstance(await fs.receive(), Welcome)
        await fs.send(Bye())
        await fs.aclose()
        # Replay it byte for byte: the target's fresh nonce makes the old proof wrong.
        peer = await RawPeer.open(site.port)
        await peer.send(hello)
        replayed_challenge = await peer.next_frame()
        assert isinstance(replayed_challenge, Challenge)
        assert replayed_challenge.nonce != challenge.nonce
        await peer.send(auth)
        error = await peer.error()
        assert error.code == "auth" and "wrong key" in error.message
        # Both frames at once (no waiting for the challenge): refused as well.
        peer = await RawPeer.open(site.port)
        await peer.send(hello + auth)
        assert (await peer.error()).code in ("auth", "protocol")
        await good_session(site, b"after-replay")
    assert site.agent.refused_sessions >= 1


async def test_wrong_key_is_refused_both_ways(site: Site) -> None:
    wrong = os.urandom(32).hex().encode()
    async with serving(site):
        # The source holds the wrong key: it sends AUTH anyway, the target refuses it.
        with capture_logs() as logs:
            peer = await RawPeer.open(site.port)
            hello = Hello(versions=[VERSION], node="src", conid=1, volume="v",
                          target_path=b"d", nonce=os.urandom(32))
            await peer.send(encode_frame(hello))
            challenge = await peer.next_frame()
            assert isinstance(challenge, Challenge)
            await peer.send(encode_frame(Auth(proof=source_proof(wrong, hello,
                                                                 challenge.nonce))))
            error = await peer.error()
        assert error.code == "auth" and "wrong key" in error.message
        assert any(e["event"] == "session refused" and "wrong key" in e["reason"]
                   and e["key_file"] == str(site.key_file) for e in logs), logs
        # A real source session with the wrong key finds out from the target's proof.
        with pytest.raises(AuthenticationError, match="wrong key"):
            await connect(site.port, wrong)
        await good_session(site, b"after-wrong-key")
    assert not site.replica.exists() or os.listdir(site.replica) == ["after-wrong-key"]


@pytest.mark.parametrize("content", [b"", b"\n", b"short-key"])
async def test_short_or_empty_key_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    with capture_logs() as logs:
        site = make_site(tmp_path, key=content)
    assert any(e["log_level"] == "error" and str(site.key_file) in e.get("error", "")
               and "at least 32" in e.get("error", "") for e in logs), logs
    # The source side names the file too (it reads the same kind of file).
    with pytest.raises(KeyFileError, match=str(site.key_file)):
        read_key(str(site.key_file))
    good = os.urandom(32).hex().encode()
    async with serving(site):
        with capture_logs() as logs:
            peer = await RawPeer.open(site.port)
            await peer.send(hello_bytes())
            error = await peer.error()
        assert error.code == "config" and "cannot read its key" in error.message
        assert str(site.key_file) not in error.message     # paths stay on the target
        assert any("cannot read the key" in e["event"] and str(site.key_file) in e.get("error", "")
                   for e in logs), logs
        site.key_file.write_bytes(good)        # fixed: read again at the next handshake
        site.key = good
        await good_session(site, b"after-key-fix")


# -- framing: oversize, truncated, bombs -------------------------------------------------

async def test_oversize_frames_are_refused_at_the_header(site: Site) -> None:
    async with serving(site):
        # Before authentication the limit is HANDSHAKE_MAX_FRAME, whatever the type.
        peer = await RawPeer.open(site.port)
        await peer.send(HEADER.pack(MAGIC, VERSION, Hello.TYPE, 0, HANDSHAKE_MAX_FRAME + 1, 0))
        error = await peer.error()
        assert error.code == "too_large" and str(HANDSHAKE_MAX_FRAME) in error.message
        # After it, the negotiated maximum; the body is never sent, the header is enough.
        fs, welcome = await connect(site.port, site.key)
        await fs.send_bytes(HEADER.pack(MAGIC, VERSION, Ops.TYPE, 0, welcome.max_frame + 1, 0))
        frame = await fs.receive()
        assert isinstance(frame, Error) and frame.code == "too_large"
        with pytest.raises(LinkError):
            await fs.receive()
        await good_session(site, b"after-oversize")


async def test_unknown_frame_type_is_refused_at_the_header(site: Site) -> None:
    async with serving(site):
        peer = await RawPeer.open(site.port)
        # A plausible length but a type nobody speaks: refused before any body arrives.
        await peer.send(HEADER.pack(MAGIC, VERSION, 200, 0, 60_000, 0))
        with trio.fail_after(3):
            error = await peer.error()
        assert error.code == "protocol" and "unknown frame type 200" in error.message
        await good_session(site, b"after-unknown-type")


@pytest.mark.parametrize("field, value", [
    ("conid", 0), ("conid", -1), ("conid", 1 << 63), ("first_seq", 1 << 63),
    ("first_seq", -5), ("restore_seq", (1 << 64) - 1), ("purpose", "bogus")])
async def test_hello_fields_out_of_range_are_refused(site: Site, field: str,
                                                     value: object) -> None:
    fields: dict[str, Any] = {"versions": [VERSION], "node": "src", "conid": 1,
                              "volume": "v", "target_path": b"d", "nonce": os.urandom(32)}
    fields[field] = value
    async with serving(site):
        peer = await RawPeer.open(site.port)
        await peer.send(raw_frame(Hello.TYPE, msgpack.packb(fields, use_bin_type=True)))
        error = await peer.error()
        assert error.code == "protocol" and field in error.message, error
        await good_session(site, b"after")
    assert set(site.agent.replicas) == {("src", 1)}     # only the good session's


async def test_truncated_frames_apply_nothing(site: Site) -> None:
    async with serving(site):
        peer = await RawPeer.open(site.port)      # half a HELLO, then the peer leaves
        await peer.send(hello_bytes()[:-5])
        await peer.tcp.aclose()
        fs, welcome = await connect(site.port, site.key)
        whole = encode_ops_frame(welcome.resume_from, [
            msgpack.packb(CreateOp(b"torn", 0o644, 0, 0, 1).to_wire())])
        for cut in (5, HEADER.size, len(whole) - 1):   # header, body missing, last byte
            await fs.send_bytes(whole[:cut])
            await fs.aclose()
            await trio.sleep(0.1)
            assert not (site.replica / "torn").exists()
            fs, again = await connect(site.port, site.key)
            assert again.resume_from == welcome.resume_from    # nothing was applied
        await fs.aclose()
        await good_session(site, b"after-truncation")
    assert not (site.replica / "torn").exists()


def _ops_body(ops_value: bytes) -> bytes:
    head: bytes = msgpack.packb("first_seq") + msgpack.packb(1) + msgpack.packb("ops")
    return b"\x82" + head + ops_value


BOMBS = {
    "array32": b"\xdd\xff\xff\xff\xff" + b"\x00" * 16,
    "map32": b"\xdf\xff\xff\xff\xff" + b"\x00" * 16,
    "bin32": b"\xc6\xff\xff\xff\xff" + b"\x00" * 16,
    "str32": b"\xdb\xff\xff\xff\xff" + b"\x00" * 16,
    "nested-arrays": b"\x91" * 60_000 + b"\xc0",
    "nested-maps": b"\x81\xa1k" * 20_000 + b"\xc0",
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
async def test_msgpack_bombs_are_refused_with_bounded_memory(site: Site, kind: str) -> None:
    bomb = BOMBS[kind]
    rss_before = max_rss_mib()
    async with serving(site):
        # Unauthenticated: as the HELLO body itself, and inside one of its fields.
        for body in (bomb, b"\x81" + msgpack.packb("node") + bomb):
            peer = await RawPeer.open(site.port)
            await peer.send(raw_frame(Hello.TYPE, body))
            error = await peer.error()
            assert error.code == "protocol" and "Hello" in error.message
        # Authenticated: as the ops array, and as one op.
        for body in (_ops_body(bomb), _ops_body(b"\x91" + bomb)):
            fs, _ = await connect(site.port, site.key)
            await fs.send_bytes(raw_frame(Ops.TYPE, body))
            frame = await fs.receive()
            assert isinstance(frame, Error) and frame.code == "protocol", frame
            await fs.aclose()
        await good_session(site, b"after-bomb")
    # A 4 GiB declaration never became a 4 GiB allocation.
    assert max_rss_mib() - rss_before < 64


# -- frames out of order, seq gaps --------------------------------------------------------

def _ops(first_seq: int, name: bytes) -> bytes:
    return encode_frame(Ops(first_seq=first_seq, ops=[CreateOp(name, 0o644, 0, 0, 1)]))


@pytest.mark.parametrize("case", ["ops-first", "ops-before-welcome", "hello-twice",
                                  "auth-twice", "welcome-from-source", "ack-from-source"])
async def test_frames_out_of_order_are_refused(site: Site, case: str) -> None:
    async with serving(site):
        if case in ("auth-twice", "welcome-from-source", "ack-from-source"):
            fs, welcome = await connect(site.port, site.key)
            bad = {"auth-twice": encode_frame(Auth(proof=b"\x00" * 32)),
                   "welcome-from-source": encode_frame(Welcome(node="x", resume_from=1,
                                                               restore_required=False)),
                   "ack-from-source": encode_frame(Ack(received=0, durable=0))}[case]
            await fs.send_bytes(bad + _ops(welcome.resume_from, b"smuggled"))
            frame = await fs.receive()
            assert isinstance(frame, Error) and frame.code == "protocol", frame
            assert "while streaming" in frame.message
            await fs.aclose()
        else:
            peer = await RawPeer.open(site.port)
            if case == "ops-first":
                await peer.send(_ops(1, b"smuggled"))
                expected = "expected HELLO, got Ops"
            elif case == "ops-before-welcome":
                await peer.send(hello_bytes())
                assert isinstance(await peer.next_frame(), Challenge)
                await peer.send(_ops(1, b"smuggled"))
                expected = "expected AUTH, got Ops"
            else:
                await peer.send(hello_bytes() + hello_bytes())
                expected = "Hello"
            error = await peer.error()
            assert expected in error.message, error
        await good_session(site, b"after")
    assert not (site.replica / "smuggled").exists()
    assert site.outside_untouched()


@pytest.mark.parametrize("offset, what", [(3, "gap"), (1000, "gap"), (1, "repeat"),
                                          (0, "backwards")])
async def test_seq_gaps_and_seq_going_backwards_are_refused(site: Site, offset: int,
                                                            what: str) -> None:
    async with serving(site):
        fs, welcome = await connect(site.port, site.key)
        first = welcome.resume_from
        await fs.send(Ops(first_seq=first, ops=[CreateOp(b"one", 0o644, 0, 0, 1)]))
        await fs.send(Ops(first_seq=first + 1, ops=[CreateOp(b"two", 0o644, 0, 0, 1)]))
        await wait_durable(fs, first + 1)
        # The next batch must start at first + 2.
        await fs.send_bytes(_ops(first + offset, b"three"))
        frame = await fs.receive()
        while isinstance(frame, Ack):
            frame = await fs.receive()
        assert isinstance(frame, Error) and frame.code == "sequence", frame
        assert f"expected {first + 2} (gap or overlap)" in frame.message
        await fs.aclose()
        fs, again = await connect(site.port, site.key)
        assert again.resume_from == first + 2
        await fs.aclose()
        await good_session(site, b"after")
    assert (site.replica / "two").exists() and not (site.replica / "three").exists()


# -- hostile paths: what test_hostile.py does not cover ---------------------------------

@pytest.mark.parametrize("target_path", [b"../up", b"/abs", b"a/../../up", b"a/./b", b"",
                                         b"a\x00b", b"\xff/not-utf8"])
async def test_hostile_target_path_in_hello_is_refused(site: Site, target_path: bytes) -> None:
    async with serving(site):
        error = await handshake_error(site, target_path=target_path)
        assert error.code in ("protocol", "config"), error
        assert "path" in error.message
        await good_session(site, b"after")
    assert site.outside_untouched()
    assert sorted(os.listdir(site.root)) == ["d"]
    assert not (site.tmp / "up").exists()


async def test_replica_directory_replaced_by_a_symlink_is_refused(site: Site) -> None:
    """Connection 2 replicates into "d/inner"; connection 1 (whose replica holds it)
    replaces that directory with a symlink out of the root. Connection 2's next
    session must refuse, not follow it."""
    async with serving(site):
        fs, _ = await connect(site.port, site.key, conid=2, target_path=b"d/inner")
        await fs.send(Bye())
        await fs.aclose()
        fs, welcome = await connect(site.port, site.key, conid=1)
        await fs.send(Ops(first_seq=welcome.resume_from, ops=[
            RenameOp(b"inner", b"moved", 0),
            SymlinkOp(b"inner", os.fsencode(site.outside), 0, 0, 1)]))
        await wait_durable(fs, welcome.resume_from + 1)
        await fs.aclose()
        assert (site.replica / "inner").is_symlink()
        error = await handshake_error(site, conid=2, target_path=b"d/inner")
        assert error.code == "config" and "symlink" in error.message
        await good_session(site, b"after")
    assert site.outside_untouched()


@pytest.mark.parametrize("ops", [
    # A hard link to a file outside the root, by a path that climbs out.
    [LinkOp(b"../../outside/victim", b"stolen")],
    # Moving a file in from outside.
    [RenameOp(b"../../outside/victim", b"stolen", 0)],
    # A symlink the peer made itself, then a write through it.
    [SymlinkOp(b"out", b"../../outside", 0, 0, 1), CreateOp(b"out/evil", 0o644, 0, 0, 1)],
    [SymlinkOp(b"v", b"../../outside/victim", 0, 0, 1), WriteOp(b"v", 0, b"owned", 1)],
    [MkdirOp(b"a", 0o755, 0, 0, 1), RenameOp(b"a", b"a/b/../../..", 0)],
], ids=["link-in", "rename-in", "symlink-dir", "symlink-file", "rename-up"])
async def test_ops_that_reach_outside_are_refused(site: Site, ops: list[Any]) -> None:
    async with serving(site):
        fs, welcome = await connect(site.port, site.key)
        wire = [msgpack.packb(op.to_wire(), use_bin_type=True) for op in ops]
        await fs.send_bytes(encode_ops_frame(welcome.resume_from, wire))
        frame = await fs.receive()
        while isinstance(frame, Ack):
            frame = await fs.receive()
        assert isinstance(frame, Error), frame
        assert frame.code in ("protocol", "apply"), frame
        await fs.aclose()
        await good_session(site, b"after")
    assert site.outside_untouched()
    assert not (site.replica / "stolen").exists()
    assert os.stat(site.outside / "victim").st_nlink == 1


# -- task names that escape task_dir ------------------------------------------------------

ESCAPING_NAMES = ["../x", "/bin/sh", "sub/../../x", "..", ".", "", "a\0b", "link-out",
                  "sub"]


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sub").mkdir()
    escaped = tmp_path / "x"
    escaped.write_text("#!/bin/sh\ntouch \"$0.ran\"\n")
    escaped.chmod(0o755)
    (tasks / "link-out").symlink_to(escaped)
    good = tasks / "good"
    good.write_text("#!/bin/sh\nexit 0\n")
    good.chmod(0o755)
    (tasks / "link-in").symlink_to(good)
    return tasks


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_check_task_refuses_names_outside_task_dir(task_dir: Path, name: str) -> None:
    with pytest.raises(TaskRefusedError) as info:
        check_task(str(task_dir), name)
    assert repr(name) in str(info.value)


def test_check_task_returns_the_resolved_path_inside_task_dir(task_dir: Path) -> None:
    assert check_task(str(task_dir), "good") == str(task_dir / "good")
    # A symlink to a task inside task_dir is fine; what runs is the resolved file, so
    # swapping the link after the check cannot redirect the run.
    assert check_task(str(task_dir), "link-in") == str(task_dir / "good")


@pytest.mark.parametrize("trigger", ["queue", "transmit", "receive", "execute"])
@pytest.mark.parametrize("name", ESCAPING_NAMES)
async def test_source_queuetask_refuses_names_outside_task_dir(
        tmp_path: Path, task_dir: Path, name: str, trigger: str) -> None:
    config = SourceConfig.model_validate({
        "node": "src", "state_dir": str(tmp_path / "sst"), "task_dir": str(task_dir),
        "volume": [{"name": "v", "path": str(tmp_path / "vol")}]})
    registry = Registry(config)
    conn = Connection(id=1, volume="v", target="127.0.0.1:1", target_path="d",
                      key_file=str(tmp_path / "k"))
    conn.target_tasks = ["good", "link-in"]      # what a target with this task_dir announces
    registry.connections[1] = conn
    store = TaskStore(str(tmp_path / "tasks.json"))
    tasks = SourceTasks(store, registry, {}, str(task_dir), "src")
    result = await tasks.queue([conn], {"task": name, "trigger": trigger})
    assert not result.ok, result
    assert "nothing was queued" in result.message and repr(name) in result.message
    assert store.records == {}
    assert not (tmp_path / "x.ran").exists()


@pytest.mark.parametrize("name", ["../x", "link-out", "sub", "/bin/sh"])
async def test_target_refuses_a_task_that_escapes_task_dir(tmp_path: Path, task_dir: Path,
                                                           name: str) -> None:
    site = make_site(tmp_path, task_dir=task_dir)
    async with serving(site):
        fs, welcome = await connect(site.port, site.key)
        op = TaskOp("t-escape", 1, name, [], "execute", 10.0)
        await fs.send(Ops(first_seq=welcome.resume_from, ops=[op]))
        result: TaskResult | None = None
        while result is None:
            frame = await fs.receive()
            assert not isinstance(frame, Error), frame
            if isinstance(frame, TaskResult):
                result = frame
        assert result is not None and result.state == "refused"
        assert repr(name) in result.message
        await fs.aclose()
        await good_session(site, b"after")
    record = site.agent.tasks.get("t-escape")
    assert isinstance(record, TaskRecord) and record.state == "refused"
    assert not (tmp_path / "x.ran").exists()


# -- the control socket ----------------------------------------------------------------

NOBODY = 65534


def _as_nobody(path: str) -> tuple[str, str]:
    """Connect to ``path`` from a child running as uid/gid nobody: (outcome, reply)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no trio, no pytest, just a socket
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                try:
                    sock.connect(path)
                except OSError as exc:
                    outcome = ["refused", exc.strerror or str(exc)]
                else:
                    reply = b""
                    try:   # the agent may answer and close before reading the request
                        sock.sendall(b'{"command": "status", "args": {}}\n')
                        while chunk := sock.recv(65536):
                            reply += chunk
                    except OSError:
                        pass
                    outcome = ["connected", reply.decode()]
            os.write(write_fd, json.dumps(outcome).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    outcome, reply = json.loads(data)
    return str(outcome), str(reply)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A short directory anyone may enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ml-ctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")


@needs_root
@pytest.mark.parametrize("mode, allowed, expect", [
    (0o660, set(), "refused"),          # the socket's mode stops nobody at connect()
    (0o666, set(), "uid-refused"),      # the mode lets it in; SO_PEERCRED does not
    (0o666, {NOBODY}, "served"),        # listed in control_uids: served
])
async def test_control_socket_refuses_other_users(open_dir: Path, mode: int,
                                                  allowed: set[int], expect: str) -> None:
    path = str(open_dir / "c.sock")
    served: list[Request] = []

    async def handler(request: Request, emit: Emit) -> Result:
        served.append(request)
        return ok("status ok")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_control(
                path, handler, allowed_uids=allowed, mode=mode, task_status=task_status))
            assert os.stat(path).st_mode & 0o777 == mode
            with capture_logs() as logs:
                outcome, reply = await trio.to_thread.run_sync(_as_nobody, path)
            # The agent's own user is still served afterwards.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                await trio.to_thread.run_sync(sock.connect, path)
                sock.sendall(b'{"command": "status", "args": {}}\n')
                mine = await trio.to_thread.run_sync(sock.recv, 65536)
            assert b"status ok" in mine
            nursery.cancel_scope.cancel()
    if expect == "refused":
        assert outcome == "refused" and "ermission denied" in reply
        assert len(served) == 1
    elif expect == "uid-refused":
        assert outcome == "connected" and f"uid {NOBODY} may not control" in reply
        assert any(e["event"] == "control client refused" and e["uid"] == NOBODY
                   for e in logs)
        assert len(served) == 1
    else:
        assert outcome == "connected" and "status ok" in reply
        assert len(served) == 2


async def test_control_socket_is_created_with_its_mode_not_the_umask(
        open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket file must never exist with a wider mode, not even between bind()
    and the chmod that follows: with the chmod skipped and umask 0, it still has
    exactly the mode asked for (a plain bind would give 0777)."""
    monkeypatch.setattr(os, "chmod", lambda path, mode: None)
    path = str(open_dir / "c.sock")

    async def handler(request: Request, emit: Emit) -> Result:
        return ok("")

    old = os.umask(0)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: serve_control(
                    path, handler, mode=0o600, task_status=task_status))
                mode = os.stat(path).st_mode & 0o777
                nursery.cancel_scope.cancel()
    finally:
        os.umask(old)
    assert mode == 0o600, oct(mode)


# -- a flood of failed logins --------------------------------------------------------------

async def test_failed_login_flood_is_rate_limited(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    site.agent.login_limiter = LoginLimiter(max_failures=5, window=60, block=120,
                                            clock=lambda: clock[0])
    key_reads: list[str] = []
    real_read_key: Callable[[str], bytes] = read_key

    def counting_read_key(path: str) -> bytes:
        key_reads.append(path)
        return real_read_key(path)

    monkeypatch.setattr(agent_module, "read_key", counting_read_key)
    wrong = os.urandom(32).hex().encode()

    async def failed_login() -> Error:
        peer = await RawPeer.open(site.port, HOSTILE_ADDRESS)
        hello = Hello(versions=[VERSION], node="src", conid=1, volume="v", target_path=b"d",
                      nonce=os.urandom(32))
        await peer.send(encode_frame(hello))
        challenge = await peer.next_frame()
        if isinstance(challenge, Challenge):
            await peer.send(encode_frame(Auth(proof=source_proof(wrong, hello,
                                                                 challenge.nonce))))
        else:
            assert isinstance(challenge, Error), challenge
            assert await peer.next_frame() is None
            return challenge
        return await peer.error()

    async with serving(site):
        with capture_logs() as logs:
            for _ in range(5):
                assert (await failed_login()).code == "auth"
            assert len(key_reads) == 5
            for _ in range(200):
                error = await failed_login()
                assert error.code == "rate_limited"
                assert "too many failed logins from 127.0.0.2" in error.message
            assert len(key_reads) == 5       # no key read, no HMAC for refused attempts
            # Good peers at other addresses are unaffected.
            await good_session(site, b"good-during-flood")
        refusals = [e for e in logs if e["event"] == "session refused"]
        blocks = [e for e in logs if "too many failed logins" in e["event"]]
        assert len(refusals) == 5 and all(e["peer"].startswith(HOSTILE_ADDRESS)
                                          for e in refusals)
        assert len(blocks) == 1 and "127.0.0.2" in blocks[0]["event"]
        assert len(logs) < 30                # not one line per refused attempt
        # After the block: one summary line, and the address may try again.
        clock[0] += 121
        with capture_logs() as logs:
            await good_session(site, b"good-after-block", local=HOSTILE_ADDRESS)
        summaries = [e for e in logs if e["event"] == "failed-login block over"]
        assert len(summaries) == 1
        assert summaries[0]["peer"] == HOSTILE_ADDRESS
        assert summaries[0]["refused_attempts"] == 200
        status = await site.agent.cmd_status({}, emit=_no_emit)
        assert status.data["login_attempts_rate_limited"] == 200
    assert site.agent.login_limiter.refused_total == 200
    assert site.outside_untouched()


async def _no_emit(event: dict[str, Any]) -> None:
    pass


def test_login_limiter_window_success_and_memory_bound() -> None:
    now = [0.0]
    limiter = LoginLimiter(max_failures=3, window=10, block=30, max_peers=4,
                           clock=lambda: now[0])
    assert not limiter.failure("a") and not limiter.failure("a")
    now[0] = 11                                  # the first two left the window
    assert not limiter.failure("a") and not limiter.failure("a")
    limiter.success("a")                         # a good login forgets the failures
    assert not limiter.failure("a") and not limiter.failure("a")
    assert limiter.failure("a")                  # third within the window: blocked
    assert limiter.blocked("a") == pytest.approx(30)
    assert limiter.blocked("b") is None
    for i in range(100):                         # a spray of addresses stays bounded ...
        limiter.failure(f"spray-{i}")
    assert len(limiter) <= 4
    assert limiter.blocked("a") is not None      # ... and never frees a blocked one
    now[0] += 31
    assert limiter.blocked("a") is None
    [summary] = limiter.expired()
    assert summary.peer == "a" and summary.refused == 2
    assert limiter.expired() == []

