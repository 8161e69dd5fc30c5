"""Stateful fuzzing of the target side with hostile frame sequences (issue 6, point 5).

Two Hypothesis state machines:

* :class:`TargetSessionMachine` drives the sans-IO ``Session(Role.TARGET)`` with a mix
  of a real source's handshake (good or wrong key), replayed handshake frames, OPS
  with seq gaps, arbitrary frames of every type, byte flips and garbage, each fed in
  random chunks. Invariants: the only exceptions are ``ProtocolError`` (and its
  ``AuthenticationError``); after one the session is closed and stays inert; only a
  peer holding the key ever gets past AUTH; accepted OPS are gap-free from
  ``resume_from``; the decoder never buffers more than one frame.
* :class:`AgentMachine` does the same over TCP against a real :class:`TargetAgent`
  (served from a thread): several concurrent hostile connections, good and failed
  handshakes, hostile paths, out-of-order frames. Invariants: the agent never dies,
  every byte it sends is a valid frame, a good session still applies and acks an op
  after every example, and nothing outside the replica root changes.

Short by default (the file runs in well under a minute); ``make fuzz`` sets
``MIRRORLINE_FUZZ_EXAMPLES`` for a long run. Cases are counted as ``fuzz_cases``
(printed at the end of the run by ``tests/faults/conftest.py``).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from protocol.errors import ProtocolError
from protocol.frames import (
    HEADER,
    MAGIC,
    VERSION,
    Ack,
    Auth,
    Error,
    Frame,
    FrameDecoder,
    Ops,
    Welcome,
    encode_frame,
    encode_ops_frame,
)
from protocol.ops import (
    ChmodOp,
    CreateOp,
    FallocateOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    NoteOp,
    Op,
    RemovexattrOp,
    RenameOp,
    RmdirOp,
    SetxattrOp,
    SymlinkOp,
    TaskOp,
    TruncateOp,
    UnlinkOp,
    UtimensOp,
    WriteOp,
)
from protocol.runtime.ratelimit import LoginLimiter
from protocol.session import HANDSHAKE_MAX_FRAME, Role, Session, State, _proof
from target_agent.agent import TargetAgent
from target_agent.config import SourceEntry, TargetConfig
from tests.faults.stats import count
from tests.system.harness import free_port
from tests.unit.test_codec import FRAME_STRATEGIES, any_frame, any_op

#: Examples of the sans-IO machine; `make fuzz` raises it. The TCP machine runs a fifth
#: as many (each of its steps waits for the agent's answer).
EXAMPLES = int(os.environ.get("MIRRORLINE_FUZZ_EXAMPLES", "0") or 0)
STEPS = int(os.environ.get("MIRRORLINE_FUZZ_STEPS", "0") or 0)

KEY = b"k" * 32
WRONG_KEY = b"w" * 32
SESSION_MAX_FRAME = 256 * 1024


def _settings(default_examples: int, default_steps: int, share: int = 1) -> settings:
    return settings(max_examples=max(EXAMPLES // share, default_examples) if EXAMPLES
                    else default_examples,
                    stateful_step_count=STEPS or default_steps, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


cuts = st.lists(st.integers(0, 1 << 20), max_size=4)
conids = st.sampled_from([1, 2, 7]) | st.integers(-(1 << 63), (1 << 64) - 1)
seq_offsets = st.sampled_from([0, 0, 0, 0, 1, -1, 2, -7, 1000])
target_paths = st.sampled_from([b"d", b"d", b"d/sub", b"../up", b"/abs", b"a/../..", b"",
                                b"a\0b", b"\xff\xfe", b"."])


def _recorded_handshake() -> tuple[bytes, bytes]:
    """A good HELLO and AUTH as they crossed the wire once, for replay attempts."""
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    hello = source.start(node="src", conid=1, volume="v", target_path=b"d", key=KEY)
    target.receive_data(hello)
    source.receive_data(target.challenge(KEY))
    return hello, source.take_auth()


RECORDED_HELLO, RECORDED_AUTH = _recorded_handshake()


# -- the sans-IO target session ---------------------------------------------------------

class TargetSessionMachine(RuleBasedStateMachine):
    """A target Session fed by a partly honest, partly hostile source."""

    cases = 0
    errors = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).cases += 1
        self._fresh()

    def _fresh(self) -> None:
        self.target = Session(Role.TARGET, max_frame=SESSION_MAX_FRAME)
        self.source: Session | None = None
        self.source_has_key = False      # the source that sent HELLO holds KEY
        self.good_auth_fed = False       # a proof from a key holder reached the target
        self.next_seq: int | None = None
        self.closed = False

    # Feeding: the one place bytes reach the target, in random chunks.
    def feed(self, data: bytes, chunking: list[int]) -> None:
        for chunk in _split(data, chunking):
            if self.closed:
                assert self.target.receive_data(chunk) == []
                continue
            state_before = self.target.state
            try:
                frames = self.target.receive_data(chunk)
            except ProtocolError as exc:       # AuthenticationError included
                assert self.target.state is State.CLOSED, exc
                assert exc.code and str(exc)
                self.target.error_frame(exc)   # what the agent sends back must encode
                type(self).errors += 1
                self.closed = True
                continue
            for frame in frames:
                self.check_accepted(frame, state_before)
            if self.target.state is State.CLOSED:
                self.closed = True

    def check_accepted(self, frame: Frame, state_before: State) -> None:
        if isinstance(frame, Ops):
            assert self.next_seq is not None, "OPS accepted before WELCOME"
            assert frame.first_seq == self.next_seq, (frame.first_seq, self.next_seq)
            self.next_seq = frame.last_seq + 1
        elif isinstance(frame, Auth):
            assert self.good_auth_fed, "a proof without the key was accepted"

    # Rules ------------------------------------------------------------------------------

    @precondition(lambda self: self.source is None and not self.closed)
    @rule(conid=conids, first_seq=st.integers(0, 1 << 62) | st.just(1),
          target_path=target_paths, has_key=st.booleans(), chunking=cuts)
    def hello(self, conid: int, first_seq: int, target_path: bytes, has_key: bool,
              chunking: list[int]) -> None:
        self.source = Session(Role.SOURCE)
        self.source_has_key = has_key
        data = self.source.start(node="src", conid=conid, volume="v", target_path=target_path,
                                 key=KEY if has_key else WRONG_KEY, first_seq=first_seq)
        self.feed(data, chunking)

    @precondition(lambda self: not self.closed)
    @rule(chunking=cuts)
    def replayed_hello(self, chunking: list[int]) -> None:
        self.feed(RECORDED_HELLO, chunking)

    @precondition(lambda self: not self.closed and self.target.state is State.START
                  and self.target.hello is not None)
    @rule()
    def challenge(self) -> None:
        out = self.target.challenge(KEY)
        if self.source is not None and self.source.state is State.HELLO_SENT:
            try:
                self.source.receive_data(out)
            except ProtocolError:
                assert not self.source_has_key   # a key holder always accepts our proof

    @precondition(lambda self: not self.closed)
    @rule(kind=st.sampled_from(["honest", "honest", "wrong-key", "replay", "garbage"]),
          proof=st.binary(min_size=32, max_size=32), chunking=cuts)
    def auth(self, kind: str, proof: bytes, chunking: list[int]) -> None:
        if kind == "honest":
            if self.source is None or self.source.state is not State.AUTH_SENT:
                return
            data = self.source.take_auth()
            self.good_auth_fed = self.source_has_key
        elif kind == "wrong-key":
            # A source that ignores the target's proof and answers with the wrong key.
            if self.target.hello is None or self.target.state is not State.CHALLENGE_SENT:
                return
            data = encode_frame(Auth(proof=_proof(WRONG_KEY, b"mirrorline-source",
                                                  self.target.hello,
                                                  self.target._target_nonce)))
        elif kind == "replay":
            data = RECORDED_AUTH
        else:
            data = encode_frame(Auth(proof=proof))
        self.feed(data, chunking)

    @precondition(lambda self: not self.closed and self.target.state is State.AUTHENTICATED)
    @rule(resume=st.integers(1, 1 << 40) | st.just(1))
    def welcome(self, resume: int) -> None:
        out = self.target.accept(Welcome(node="tgt", resume_from=resume, restore_required=False))
        self.next_seq = resume
        if self.source is not None and self.source.state is State.AUTH_SENT:
            self.source.receive_data(out)

    @precondition(lambda self: not self.closed)
    @rule(offset=seq_offsets, ops=st.lists(any_op, min_size=1, max_size=4), chunking=cuts)
    def ops(self, offset: int, ops: list[Op], chunking: list[int]) -> None:
        first = (self.next_seq or 1) + offset
        if first < 1:
            data = encode_frame(Ops.model_construct(first_seq=first, ops=ops))
        else:
            data = encode_ops_frame(first, [msgpack.packb(op.to_wire(), use_bin_type=True)
                                            for op in ops])
        self.feed(data, chunking)

    @precondition(lambda self: not self.closed)
    @rule(frame=any_frame, chunking=cuts)
    def random_frame(self, frame: Frame, chunking: list[int]) -> None:
        self.feed(encode_frame(frame), chunking)

    @precondition(lambda self: not self.closed)
    @rule(frame=any_frame, position=st.integers(0, 1 << 16), value=st.integers(0, 255),
          chunking=cuts)
    def flipped_byte(self, frame: Frame, position: int, value: int,
                     chunking: list[int]) -> None:
        data = bytearray(encode_frame(frame))
        data[position % len(data)] = value
        self.feed(bytes(data), chunking)

    @precondition(lambda self: not self.closed)
    @rule(data=st.binary(max_size=300), chunking=cuts)
    def garbage(self, data: bytes, chunking: list[int]) -> None:
        self.feed(data, chunking)

    @precondition(lambda self: not self.closed and self.target._decoder.buffered == 0)
    @rule(ftype=st.sampled_from(sorted(cls.TYPE for cls in FRAME_STRATEGIES)),
          excess=st.integers(1, 1 << 31))
    def oversize_header(self, ftype: int, excess: int) -> None:
        limit = (SESSION_MAX_FRAME if self.target.state is State.STREAMING
                 else min(SESSION_MAX_FRAME, HANDSHAKE_MAX_FRAME))
        length = min(limit + excess, 0xFFFFFFFF)
        self.feed(HEADER.pack(MAGIC, VERSION, ftype, 0, length, 0), [])
        assert self.closed

    @precondition(lambda self: self.closed)
    @rule()
    def next_session(self) -> None:
        self._fresh()

    # Invariants -------------------------------------------------------------------------

    @invariant()
    def only_a_key_holder_gets_in(self) -> None:
        if self.target.state in (State.AUTHENTICATED, State.STREAMING):
            assert self.good_auth_fed

    @invariant()
    def buffer_is_bounded(self) -> None:
        if not self.closed:
            # Incomplete frames only, each under the current limit.
            limit = self.target._decoder.max_frame
            assert self.target._decoder.buffered <= HEADER.size + limit


def test_target_session_survives_hostile_frame_sequences() -> None:
    TargetSessionMachine.cases = TargetSessionMachine.errors = 0
    run_state_machine_as_test(TargetSessionMachine, settings=_settings(60, 30))
    count("fuzz_cases", TargetSessionMachine.cases)
    count("fuzz_protocol_errors", TargetSessionMachine.errors)
    print(f"fuzz: sans-IO target session: {TargetSessionMachine.cases} cases, "
          f"{TargetSessionMachine.errors} protocol errors raised")


# -- a real target agent over TCP --------------------------------------------------------

class AgentThread:
    """A TargetAgent served by its own trio loop in a thread, as the daemon would be."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        (tmp / "k").write_bytes(KEY)
        self.outside = tmp / "outside"
        self.outside.mkdir()
        (self.outside / "victim").write_text("untouched")
        self.root = tmp / "rep"
        cfg = TargetConfig(node="tgt", listen=f"127.0.0.1:{self.port}",
                           state_dir=str(tmp / "st"), control_socket=str(tmp / "t.sock"),
                           source=[SourceEntry(node="src", key_file=str(tmp / "k"),
                                               root=str(self.root))])
        self.agent = TargetAgent(cfg)
        self.agent.open()
        # Failed logins are most of the traffic here; the limiter has its own tests.
        self.agent.login_limiter = LoginLimiter(max_failures=1 << 40)
        self.error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fuzz-target", daemon=True)
        self._thread.start()
        assert self._ready.wait(20), "the target agent did not start"
        self.snapshot = self.world()

    def _main(self) -> None:
        async def run() -> None:
            async with trio.open_nursery() as nursery:
                self._token = trio.lowlevel.current_trio_token()
                self._scope = nursery.cancel_scope
                await nursery.start(self.agent.serve)
                self._ready.set()
        try:
            trio.run(run)
        except BaseException as exc:  # recorded: the invariant reports it
            self.error = exc

    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self) -> None:
        if self._scope is not None and self._token is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(30)

    def world(self) -> dict[str, Any]:
        """What must never change: everything outside the replica root."""
        victim = os.lstat(self.outside / "victim")
        return {"top": sorted(p.name for p in self.tmp.iterdir() if p.name != "rep"),
                "outside": sorted(os.listdir(self.outside)),
                "victim": (victim.st_mode, victim.st_uid, victim.st_size, victim.st_nlink,
                           victim.st_mtime_ns, (self.outside / "victim").read_text())}


class Client:
    """One TCP connection to the agent, with a blocking socket and short reads."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.decoder = FrameDecoder(1 << 26)
        self.session: Session | None = None
        self.next_seq: int | None = None
        self.closed = False
        self.received: list[Frame] = []
        self.unread: list[Frame] = []      # drained but not yet looked at by wait_for

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def drain(self, wait: float = 0.02) -> list[Frame]:
        """Frames the agent sent within ``wait`` seconds; each must be a valid frame."""
        frames: list[Frame] = []
        self.sock.settimeout(wait)
        while not self.closed:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            frames.extend(self.decoder.feed(data))   # a ProtocolError here: agent bug
        self.received.extend(frames)
        return frames

    def wait_for(self, cls: type[Frame], timeout: float = 5.0) -> Frame | None:
        """The next frame of type ``cls`` (or an ERROR); frames before it are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            while self.unread:
                frame = self.unread.pop(0)
                if isinstance(frame, (cls, Error)):
                    return frame
            if time.monotonic() >= deadline or self.closed:
                return None
            self.unread.extend(self.drain(0.05))

    def handshake(self, conid: int, target_path: bytes, key: bytes) -> bool:
        session = Session(Role.SOURCE)
        self.send(session.start(node="src", conid=conid, volume="v", target_path=target_path,
                                key=key))
        challenge = self.wait_for(Frame)
        if challenge is None or isinstance(challenge, Error):
            return False
        try:
            session.receive_data(encode_frame(challenge))
        except ProtocolError:
            self.send(session.error_frame(ProtocolError("wrong key", code="auth")))
            return False
        self.send(session.take_auth())
        welcome = self.wait_for(Welcome)
        if not isinstance(welcome, Welcome):
            return False
        session.receive_data(encode_frame(welcome))
        self.session = session
        self.next_seq = welcome.resume_from
        return True

    def close(self) -> None:
        self.closed = True
        self.sock.close()


# Ops that stay small on disk (no terabyte fallocate) but reach everywhere on paths.
_parts = st.sampled_from([b"a", b"b", b"c", b"sub", b"out", b"..", b".", b"", b"\xff"])
fuzz_paths = st.one_of(
    st.lists(_parts, min_size=1, max_size=3).map(b"/".join),
    st.sampled_from([b"/etc/passwd", b"../../outside/victim", b"out/victim", b"a\0b"]))
_small = st.integers(0, 1 << 16)
_ids = st.integers(-1, 70000)
_targets = st.sampled_from([b"../../outside", b"../../outside/victim", b"/", b"a", b"sub"])
safe_op = st.one_of(
    st.builds(CreateOp, fuzz_paths, st.sampled_from([0o100644, 0o100755, 0o644]), _ids, _ids,
              _small),
    st.builds(WriteOp, fuzz_paths, _small, st.binary(max_size=64), _small),
    st.builds(TruncateOp, fuzz_paths, _small, _small),
    st.builds(MkdirOp, fuzz_paths, st.just(0o755), _ids, _ids, _small),
    st.builds(MknodOp, fuzz_paths, st.sampled_from([0o10644, 0o100644, 0o20644, 0o60644]),
              _ids, _ids, _small),
    st.builds(UnlinkOp, fuzz_paths),
    st.builds(RmdirOp, fuzz_paths),
    st.builds(RenameOp, fuzz_paths, fuzz_paths, st.integers(0, 3)),
    st.builds(LinkOp, fuzz_paths, fuzz_paths),
    st.builds(SymlinkOp, fuzz_paths, _targets, _ids, _ids, _small),
    st.builds(ChmodOp, fuzz_paths, st.integers(0, 0o7777)),
    st.builds(UtimensOp, fuzz_paths, _small, _small),
    st.builds(SetxattrOp, fuzz_paths, st.sampled_from([b"user.x", b"trusted.y", b"bogus"]),
              st.binary(max_size=32), st.integers(0, 3)),
    st.builds(RemovexattrOp, fuzz_paths, st.sampled_from([b"user.x", b"bogus"])),
    st.builds(FallocateOp, fuzz_paths, st.integers(0, 0x7F), _small, _small, _small),
    st.builds(TaskOp, st.text(min_size=1, max_size=8), st.sampled_from([1, 2]),
              st.sampled_from(["../x", "/bin/sh", "x"]), st.just([]),
              st.sampled_from(["receive", "execute"]), st.just(1.0)),
    st.builds(NoteOp, st.text(max_size=8)),
)
# Every frame type but OPS from the codec's strategies (their OPS may hold huge ops).
non_ops_frames = st.one_of(*(s for cls, s in FRAME_STRATEGIES.items() if cls is not Ops))


class AgentMachine(RuleBasedStateMachine):
    """Hostile sources against one long-lived target agent."""

    site: ClassVar[AgentThread]
    cases = 0
    probes = 0
    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        type(self).cases += 1
        self.all: list[Client] = []

    def _client(self) -> Client:
        client = Client(self.site.port)
        self.all.append(client)
        return client

    @initialize(target=clients)
    def first(self) -> Client:
        return self._client()

    @rule(target=clients, kind=st.sampled_from(["good", "good", "wrong-key", "none"]),
          conid=st.sampled_from([1, 2, 3]), target_path=target_paths)
    def connect(self, kind: str, conid: int, target_path: bytes) -> Client:
        client = self._client()
        if kind != "none":
            client.handshake(conid, target_path, KEY if kind == "good" else WRONG_KEY)
        return client

    @rule(client=clients, offset=seq_offsets, ops=st.lists(safe_op, min_size=1, max_size=5))
    def ops(self, client: Client, offset: int, ops: list[Op]) -> None:
        first = (client.next_seq or 1) + offset
        if first < 1:
            data = encode_frame(Ops.model_construct(first_seq=first, ops=ops))
        else:
            data = encode_ops_frame(first, [msgpack.packb(op.to_wire(), use_bin_type=True)
                                            for op in ops])
        client.send(data)
        if client.next_seq is not None and offset == 0:
            client.next_seq = first + len(ops)
        client.drain()

    @rule(client=clients, frame=non_ops_frames)
    def frame(self, client: Client, frame: Frame) -> None:
        client.send(encode_frame(frame))
        client.drain()

    @rule(client=clients, data=st.binary(max_size=200))
    def garbage(self, client: Client, data: bytes) -> None:
        client.send(data)
        client.drain()

    @rule(client=clients, chunking=cuts)
    def replay(self, client: Client, chunking: list[int]) -> None:
        for part in _split(RECORDED_HELLO + RECORDED_AUTH, chunking):
            client.send(part)
        client.drain()

    @rule(client=consumes(clients))
    def hang_up(self, client: Client) -> None:
        client.close()

    @invariant()
    def agent_alive(self) -> None:
        assert self.site.alive(), f"the target agent died: {self.site.error!r}"

    def teardown(self) -> None:
        for client in self.all:
            if not client.closed:
                client.drain(0)
            client.close()
        assert self.site.alive(), f"the target agent died: {self.site.error!r}"
        # A good source still gets in and gets an op applied and acked durable.
        type(self).probes += 1
        name = f"probe-{type(self).probes}".encode()
        probe = Client(self.site.port)
        try:
            assert probe.handshake(9, b"good", KEY), probe.received
            assert probe.next_seq is not None
            probe.send(encode_frame(Ops(first_seq=probe.next_seq,
                                        ops=[CreateOp(name, 0o644, 0, 0, 1)])))
            durable = 0
            deadline = time.monotonic() + 10
            while durable < probe.next_seq and time.monotonic() < deadline:
                frame = probe.wait_for(Ack, 1.0)
                assert not isinstance(frame, Error), frame
                if isinstance(frame, Ack):
                    durable = frame.durable
            assert durable >= probe.next_seq, "the good session's op was not acked"
        finally:
            probe.close()
        assert (self.site.root / "good" / name.decode()).exists()
        assert self.site.world() == self.site.snapshot, "something outside the root changed"


def test_target_agent_survives_hostile_sources(tmp_path: Path) -> None:
    site = AgentThread(tmp_path)
    AgentMachine.site = site
    AgentMachine.cases = AgentMachine.probes = 0
    try:
        run_state_machine_as_test(AgentMachine, settings=_settings(12, 15, share=5))
    finally:
        site.stop()
    assert site.error is None, site.error
    count("fuzz_cases", AgentMachine.cases)
    count("fuzz_good_sessions", AgentMachine.probes)
    print(f"fuzz: target agent over TCP: {AgentMachine.cases} cases, "
          f"{AgentMachine.probes} good sessions after them")

