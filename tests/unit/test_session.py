"""Two real session state machines joined back to back, as h11's tests do.

Bytes one side emits are fed to the other; the assertions are on the frames each
side surfaces, its state, and the ProtocolError (with its code) it raises.
Proofs are also recomputed here from the transcript the session module documents,
so a silent change of the handshake's cryptography fails a test.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

import pytest

from protocol.errors import AuthenticationError, LocalProtocolError, ProtocolError
from protocol.frames import (
    Ack,
    Auth,
    Bye,
    Challenge,
    CheckResult,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    Ops,
    Ping,
    Pong,
    TaskResult,
    Welcome,
    encode_frame,
    encode_op,
)
from protocol.ops import CreateOp, Op, RenameOp, UnlinkOp, WriteOp
from protocol.session import NONCE_BYTES, Role, Session, State

KEY = b"k" * 32
OTHER_KEY = b"K" * 32
NODE, CONID, VOLUME, TARGET_PATH = "src1", 7, "data", b"data/\xff\xfe"


def some_ops(n: int) -> list[Op]:
    kinds: list[Op] = [CreateOp(b"f\xff", 0o100644, 1000, 1000, 1),
                       WriteOp(b"f\xff", 0, b"hello", 2),
                       RenameOp(b"f\xff", b"g", 0),
                       UnlinkOp(b"g")]
    return [kinds[i % len(kinds)] for i in range(n)]


def documented_proof(key: bytes, label: bytes, hello: Hello, target_nonce: bytes) -> bytes:
    """HMAC-SHA256(key, label | len-prefixed(node, conid, volume, target_path, nonces))."""
    parts = [hello.node.encode(), str(hello.conid).encode(), hello.volume.encode(),
             hello.target_path, hello.nonce, target_nonce]
    transcript = b"".join(struct.pack(">I", len(p)) + p for p in parts)
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


@dataclass
class Wire:
    """What crossed the wire during a handshake, for replay attacks."""

    hello: bytes = b""
    challenge: bytes = b""
    auth: bytes = b""
    welcome: bytes = b""


def one(frames: list[Frame]) -> Frame:
    assert len(frames) == 1, frames
    return frames[0]


def states(source: Session, target: Session) -> tuple[State, State]:
    # A function, so mypy does not narrow .state across the steps of one test.
    return source.state, target.state


def handshake(resume_from: int = 1, *, wire: Wire | None = None) -> tuple[Session, Session]:
    """Run a full handshake between a fresh SOURCE and TARGET; return (source, target)."""
    wire = wire if wire is not None else Wire()
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    wire.hello = source.start(node=NODE, conid=CONID, volume=VOLUME, target_path=TARGET_PATH,
                              key=KEY, capabilities=["zstd"])
    assert states(source, target) == (State.HELLO_SENT, State.START)
    hello = one(target.receive_data(wire.hello))
    assert isinstance(hello, Hello)
    assert target.hello == hello == source.hello
    wire.challenge = target.challenge(KEY)
    assert states(source, target) == (State.HELLO_SENT, State.CHALLENGE_SENT)
    assert isinstance(one(source.receive_data(wire.challenge)), Challenge)
    assert states(source, target) == (State.AUTH_SENT, State.CHALLENGE_SENT)
    wire.auth = source.take_auth()
    assert isinstance(one(target.receive_data(wire.auth)), Auth)
    assert states(source, target) == (State.AUTH_SENT, State.AUTHENTICATED)
    wire.welcome = target.accept(Welcome(node="tgt1", resume_from=resume_from,
                                         restore_required=False))
    assert states(source, target) == (State.AUTH_SENT, State.STREAMING)
    assert isinstance(one(source.receive_data(wire.welcome)), Welcome)
    assert states(source, target) == (State.STREAMING, State.STREAMING)
    return source, target


def streaming_pair(resume_from: int = 1, sent: int = 0) -> tuple[Session, Session]:
    """A streaming pair where the source has sent (and the target received) ``sent`` ops."""
    source, target = handshake(resume_from)
    if sent:
        batch = Ops(first_seq=resume_from, ops=some_ops(sent))
        assert one(target.receive_data(source.send(batch))) == batch
    return source, target


# -- handshake ----------------------------------------------------------------------

def test_full_handshake_reaches_streaming_on_both_sides() -> None:
    source, target = handshake(resume_from=42)
    assert source.state is State.STREAMING and target.state is State.STREAMING
    assert target.hello is not None
    assert (target.hello.node, target.hello.conid, target.hello.volume) == (NODE, CONID, VOLUME)
    assert target.hello.target_path == TARGET_PATH
    assert target.hello.capabilities == ["zstd"]
    assert source.welcome is not None and source.welcome.resume_from == 42
    assert source.welcome.node == "tgt1"
    # Nothing is acknowledged yet beyond what the target already holds durably.
    assert (source.acked_received, source.acked_durable) == (41, 41)
    assert source.next_seq == target.next_seq == 42


def test_handshake_proofs_follow_the_documented_transcript() -> None:
    wire = Wire()
    source, _ = handshake(wire=wire)
    hello = one(FrameDecoder().feed(wire.hello))
    challenge = one(FrameDecoder().feed(wire.challenge))
    auth = one(FrameDecoder().feed(wire.auth))
    assert isinstance(hello, Hello) and isinstance(challenge, Challenge)
    assert isinstance(auth, Auth)
    assert len(hello.nonce) == len(challenge.nonce) == NONCE_BYTES
    assert hello.nonce != challenge.nonce
    assert challenge.proof == documented_proof(KEY, b"mirrorline-target", hello, challenge.nonce)
    assert auth.proof == documented_proof(KEY, b"mirrorline-source", hello, challenge.nonce)
    assert source.state is State.STREAMING


def test_every_handshake_uses_fresh_nonces() -> None:
    wires = [Wire() for _ in range(3)]
    for wire in wires:
        handshake(wire=wire)
    hellos = [one(FrameDecoder().feed(w.hello)) for w in wires]
    challenges = [one(FrameDecoder().feed(w.challenge)) for w in wires]
    assert len({h.nonce for h in hellos if isinstance(h, Hello)}) == 3
    assert len({c.nonce for c in challenges if isinstance(c, Challenge)}) == 3
    assert len({w.auth for w in wires}) == 3


def test_target_with_the_wrong_key_is_detected_by_the_source() -> None:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    target.receive_data(source.start(node=NODE, conid=CONID, volume=VOLUME,
                                     target_path=TARGET_PATH, key=KEY))
    challenge = target.challenge(OTHER_KEY)
    with pytest.raises(AuthenticationError) as info:
        source.receive_data(challenge)
    assert info.value.code == "auth"
    assert source.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        source.take_auth()  # no AUTH may leave a source that refused the target
    # The source tells the target why; the target surfaces ERROR and closes.
    error = one(target.receive_data(source.error_frame(info.value)))
    assert isinstance(error, Error) and error.code == "auth"
    assert target.state is State.CLOSED


def test_source_with_the_wrong_key_is_detected_by_the_target() -> None:
    # A source holding the wrong key cannot verify the CHALLENGE, so an honest one stops
    # there; an impostor sends an AUTH anyway, computed with the key it has.
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    hello_bytes = source.start(node=NODE, conid=CONID, volume=VOLUME, target_path=TARGET_PATH,
                               key=OTHER_KEY)
    hello = one(target.receive_data(hello_bytes))
    assert isinstance(hello, Hello)
    challenge = one(FrameDecoder().feed(target.challenge(KEY)))
    assert isinstance(challenge, Challenge)
    forged = documented_proof(OTHER_KEY, b"mirrorline-source", hello, challenge.nonce)
    with pytest.raises(AuthenticationError) as info:
        target.receive_data(encode_frame(Auth(proof=forged)))
    assert info.value.code == "auth"
    assert "src1" in str(info.value)
    assert target.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        target.accept(Welcome(node="tgt1", resume_from=1, restore_required=False))
    error = one(source.receive_data(target.error_frame(info.value)))
    assert isinstance(error, Error) and error.code == "auth"
    assert source.state is State.CLOSED


@pytest.mark.parametrize("proof", [b"", b"\0" * 32, os.urandom(32), os.urandom(64)])
def test_auth_with_a_made_up_proof_is_rejected(proof: bytes) -> None:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    target.receive_data(source.start(node=NODE, conid=CONID, volume=VOLUME,
                                     target_path=TARGET_PATH, key=KEY))
    target.challenge(KEY)
    with pytest.raises(AuthenticationError):
        target.receive_data(encode_frame(Auth(proof=proof)))


def test_replayed_auth_from_an_earlier_handshake_is_rejected() -> None:
    recorded = Wire()
    handshake(wire=recorded)
    # The attacker replays the recorded HELLO and AUTH to a fresh target session.
    target = Session(Role.TARGET)
    target.receive_data(recorded.hello)
    fresh_challenge = one(FrameDecoder().feed(target.challenge(KEY)))
    old_challenge = one(FrameDecoder().feed(recorded.challenge))
    assert isinstance(fresh_challenge, Challenge) and isinstance(old_challenge, Challenge)
    assert fresh_challenge.nonce != old_challenge.nonce
    with pytest.raises(AuthenticationError):
        target.receive_data(recorded.auth)
    assert target.state is State.CLOSED


def test_replayed_challenge_from_an_earlier_handshake_is_rejected() -> None:
    recorded = Wire()
    handshake(wire=recorded)
    # A fake target replays a recorded CHALLENGE to a fresh source session.
    source = Session(Role.SOURCE)
    source.start(node=NODE, conid=CONID, volume=VOLUME, target_path=TARGET_PATH, key=KEY)
    with pytest.raises(AuthenticationError):
        source.receive_data(recorded.challenge)
    assert source.state is State.CLOSED


def test_reflected_target_proof_is_rejected() -> None:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    target.receive_data(source.start(node=NODE, conid=CONID, volume=VOLUME,
                                     target_path=TARGET_PATH, key=KEY))
    challenge = one(FrameDecoder().feed(target.challenge(KEY)))
    assert isinstance(challenge, Challenge)
    # An attacker without the key sends the target's own proof back as its AUTH.
    with pytest.raises(AuthenticationError):
        target.receive_data(encode_frame(Auth(proof=challenge.proof)))


def test_challenge_for_another_hello_is_rejected() -> None:
    # A fake target relays a CHALLENGE that a real target made for a different HELLO.
    honest, relay_target = Session(Role.SOURCE), Session(Role.TARGET)
    relay_target.receive_data(honest.start(node=NODE, conid=CONID + 1, volume=VOLUME,
                                           target_path=TARGET_PATH, key=KEY))
    foreign = relay_target.challenge(KEY)
    victim = Session(Role.SOURCE)
    victim.start(node=NODE, conid=CONID, volume=VOLUME, target_path=TARGET_PATH, key=KEY)
    with pytest.raises(AuthenticationError):
        victim.receive_data(foreign)


def test_version_and_nonce_checks_in_hello_and_challenge() -> None:
    hello = Hello(versions=[99], node=NODE, conid=CONID, volume=VOLUME,
                  target_path=TARGET_PATH, nonce=os.urandom(NONCE_BYTES))
    with pytest.raises(ProtocolError) as info:
        Session(Role.TARGET).receive_data(encode_frame(hello))
    assert info.value.code == "version"
    short = hello.model_copy(update={"versions": [1], "nonce": b"short"})
    with pytest.raises(ProtocolError):
        Session(Role.TARGET).receive_data(encode_frame(short))
    source = Session(Role.SOURCE)
    source.start(node=NODE, conid=CONID, volume=VOLUME, target_path=TARGET_PATH, key=KEY)
    with pytest.raises(ProtocolError):
        source.receive_data(encode_frame(Challenge(nonce=b"short", proof=b"x" * 32)))


def test_short_keys_are_our_own_bug() -> None:
    with pytest.raises(LocalProtocolError):
        Session(Role.SOURCE).start(node=NODE, conid=CONID, volume=VOLUME,
                                   target_path=TARGET_PATH, key=b"short")
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    target.receive_data(source.start(node=NODE, conid=CONID, volume=VOLUME,
                                     target_path=TARGET_PATH, key=KEY))
    with pytest.raises(LocalProtocolError):
        target.challenge(b"short")


def test_welcome_with_resume_from_zero_is_refused() -> None:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    target.receive_data(source.start(node=NODE, conid=CONID, volume=VOLUME,
                                     target_path=TARGET_PATH, key=KEY))
    source.receive_data(target.challenge(KEY))
    target.receive_data(source.take_auth())
    with pytest.raises(ProtocolError):
        source.receive_data(encode_frame(Welcome(node="t", resume_from=0,
                                                 restore_required=False)))


# -- streaming: OPS sequence ---------------------------------------------------------

def test_consecutive_ops_batches_and_cumulative_acks() -> None:
    source, target = handshake(resume_from=5)
    first = Ops(first_seq=5, ops=some_ops(3))
    second = Ops(first_seq=8, ops=some_ops(2))
    assert target.receive_data(source.send(first) + source.send(second)) == [first, second]
    assert source.next_seq == target.next_seq == 10
    for received, durable in [(6, 4), (7, 7), (7, 7), (9, 8), (9, 9)]:
        ack = Ack(received=received, durable=durable)
        assert one(source.receive_data(target.send(ack))) == ack
        assert (source.acked_received, source.acked_durable) == (received, durable)


def test_journal_encoded_ops_keep_the_same_sequence() -> None:
    source, target = handshake(resume_from=3)
    batch = some_ops(4)
    data = source.send_encoded_ops(3, [encode_op(op) for op in batch])
    assert one(target.receive_data(data)) == Ops(first_seq=3, ops=batch)
    assert source.next_seq == target.next_seq == 7
    for first_seq, encoded in [(6, [encode_op(batch[0])]), (8, [encode_op(batch[0])]),
                               (7, [])]:
        with pytest.raises(LocalProtocolError):
            source.send_encoded_ops(first_seq, encoded)
    with pytest.raises(LocalProtocolError):
        target.send_encoded_ops(7, [encode_op(batch[0])])
    assert one(target.receive_data(source.send(Ops(first_seq=7, ops=batch[:1]))))


def test_source_options_travel_in_hello() -> None:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    hello = one(target.receive_data(source.start(
        node=NODE, conid=CONID, volume=VOLUME, target_path=TARGET_PATH, key=KEY,
        first_seq=1234, clear_restore_required=True)))
    assert isinstance(hello, Hello)
    assert (hello.first_seq, hello.clear_restore_required) == (1234, True)


@pytest.mark.parametrize(("first_seq", "what"), [(9, "gap"), (11, "gap"), (7, "overlap"),
                                                 (5, "overlap"), (1, "overlap")])
def test_ops_gap_or_overlap_is_a_sequence_error(first_seq: int, what: str) -> None:
    source, target = streaming_pair(resume_from=5, sent=3)  # seqs 5..7 sent, 8 expected
    assert target.next_seq == 8
    with pytest.raises(ProtocolError) as info:
        target.receive_data(encode_frame(Ops(first_seq=first_seq, ops=some_ops(2))))
    assert info.value.code == "sequence", what
    assert target.state is State.CLOSED
    # The sender refuses to make the same mistake itself.
    with pytest.raises(LocalProtocolError):
        source.send(Ops(first_seq=first_seq, ops=some_ops(1)))


@pytest.mark.parametrize("first_seq", [1, 4, 6])
def test_first_ops_must_start_at_resume_from(first_seq: int) -> None:
    _, target = handshake(resume_from=5)
    with pytest.raises(ProtocolError) as info:
        target.receive_data(encode_frame(Ops(first_seq=first_seq, ops=some_ops(1))))
    assert info.value.code == "sequence"


def test_bad_batch_after_good_one_in_the_same_chunk_is_refused() -> None:
    _, target = handshake()
    data = (encode_frame(Ops(first_seq=1, ops=some_ops(2)))
            + encode_frame(Ops(first_seq=4, ops=some_ops(1))))
    with pytest.raises(ProtocolError) as info:
        target.receive_data(data)
    assert info.value.code == "sequence"
    assert target.state is State.CLOSED


# -- streaming: ACK ------------------------------------------------------------------

@pytest.mark.parametrize(("received", "durable", "why"), [
    (3, 2, "received goes backwards"),
    (4, 1, "durable goes backwards"),
    (8, 4, "received beyond the last seq sent"),
    (4, 5, "durable beyond received"),
    (4, 8, "durable beyond the last seq sent"),
    (-1, -1, "negative"),
])
def test_bad_ack_is_a_protocol_error(received: int, durable: int, why: str) -> None:
    source, target = streaming_pair(resume_from=1, sent=7)
    source.receive_data(target.send(Ack(received=4, durable=2)))
    with pytest.raises(ProtocolError) as info:
        source.receive_data(encode_frame(Ack(received=received, durable=durable)))
    assert info.value.code == "sequence", why
    assert source.state is State.CLOSED


def test_ack_before_anything_was_sent() -> None:
    source, _ = handshake(resume_from=10)
    # Acknowledging exactly what the target already had is fine …
    assert one(source.receive_data(encode_frame(Ack(received=9, durable=9))))
    # … anything past it was never sent.
    with pytest.raises(ProtocolError):
        source.receive_data(encode_frame(Ack(received=10, durable=9)))


# -- frames out of state ---------------------------------------------------------------

def _hello_bytes() -> bytes:
    return Session(Role.SOURCE).start(node=NODE, conid=CONID, volume=VOLUME,
                                      target_path=TARGET_PATH, key=KEY)


OPS_FRAME = encode_frame(Ops(first_seq=1, ops=some_ops(1)))
WELCOME_FRAME = encode_frame(Welcome(node="t", resume_from=1, restore_required=False))


def _target_in(state: State) -> Session:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    if state is State.START:
        return target
    target.receive_data(source.start(node=NODE, conid=CONID, volume=VOLUME,
                                     target_path=TARGET_PATH, key=KEY))
    source.receive_data(target.challenge(KEY))
    if state is State.CHALLENGE_SENT:
        return target
    target.receive_data(source.take_auth())
    assert target.state is State.AUTHENTICATED
    return target


@pytest.mark.parametrize("state", [State.START, State.CHALLENGE_SENT, State.AUTHENTICATED])
@pytest.mark.parametrize("frame", [
    OPS_FRAME, encode_frame(Ping(nonce=1)), encode_frame(Bye()),
    encode_frame(Auth(proof=b"x" * 32)), encode_frame(Ack(received=0, durable=0)),
    WELCOME_FRAME,
], ids=["ops", "ping", "bye", "auth", "ack", "welcome"])
def test_target_refuses_frames_before_welcome(state: State, frame: bytes) -> None:
    # (AUTH in CHALLENGE_SENT is expected, but its made-up proof is refused all the same.)
    target = _target_in(state)
    with pytest.raises(ProtocolError):
        target.receive_data(frame)
    assert target.state is State.CLOSED


def test_ops_before_welcome_in_the_same_chunk_as_hello() -> None:
    with pytest.raises(ProtocolError):
        Session(Role.TARGET).receive_data(_hello_bytes() + OPS_FRAME)


def test_hello_twice_is_refused() -> None:
    # In one chunk, in two chunks before CHALLENGE, and after CHALLENGE.
    with pytest.raises(ProtocolError):
        Session(Role.TARGET).receive_data(_hello_bytes() + _hello_bytes())
    target = Session(Role.TARGET)
    target.receive_data(_hello_bytes())
    with pytest.raises(ProtocolError):
        target.receive_data(_hello_bytes())
    target = Session(Role.TARGET)
    target.receive_data(_hello_bytes())
    target.challenge(KEY)
    with pytest.raises(ProtocolError):
        target.receive_data(_hello_bytes())


def test_handshake_frames_while_streaming_are_refused() -> None:
    for frame in (_hello_bytes(), encode_frame(Auth(proof=b"p")), WELCOME_FRAME):
        _, target = handshake()
        with pytest.raises(ProtocolError):
            target.receive_data(frame)
    for frame in (WELCOME_FRAME, encode_frame(Challenge(nonce=b"n" * 32, proof=b"p")),
                  OPS_FRAME):
        source, _ = handshake()
        with pytest.raises(ProtocolError):
            source.receive_data(frame)


def test_auth_twice_is_refused() -> None:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    target.receive_data(source.start(node=NODE, conid=CONID, volume=VOLUME,
                                     target_path=TARGET_PATH, key=KEY))
    source.receive_data(target.challenge(KEY))
    auth = source.take_auth()
    with pytest.raises(ProtocolError):
        target.receive_data(auth + auth)


@pytest.mark.parametrize("frame", [WELCOME_FRAME, encode_frame(Ack(received=0, durable=0)),
                                   encode_frame(Pong(nonce=1)), OPS_FRAME],
                         ids=["welcome", "ack", "pong", "ops"])
def test_source_refuses_anything_but_challenge_after_hello(frame: bytes) -> None:
    # In particular a WELCOME without a CHALLENGE would skip authenticating the target.
    source = Session(Role.SOURCE)
    source.start(node=NODE, conid=CONID, volume=VOLUME, target_path=TARGET_PATH, key=KEY)
    with pytest.raises(ProtocolError):
        source.receive_data(frame)
    assert source.state is State.CLOSED


def test_source_refuses_a_second_challenge() -> None:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    target.receive_data(source.start(node=NODE, conid=CONID, volume=VOLUME,
                                     target_path=TARGET_PATH, key=KEY))
    challenge = target.challenge(KEY)
    with pytest.raises(ProtocolError):
        source.receive_data(challenge + challenge)


def test_streaming_frames_are_checked_by_direction() -> None:
    source, target = handshake()
    with pytest.raises(LocalProtocolError):
        source.send(Ack(received=0, durable=0))
    with pytest.raises(LocalProtocolError):
        target.send(Ops(first_seq=1, ops=some_ops(1)))
    with pytest.raises(LocalProtocolError):
        Session(Role.SOURCE).send(Ping(nonce=1))  # before the handshake
    # Each side's own streaming frames are accepted by the other.
    for frame in (Ping(nonce=3), Pong(nonce=4)):
        assert one(target.receive_data(source.send(frame))) == frame
        assert one(source.receive_data(target.send(frame))) == frame
    result = TaskResult(task_id="t1", seq=1, state="done", exit_code=0)
    check = CheckResult(seq=1, path=b"p", result={"blocks": [1, 2]})
    assert source.receive_data(target.send(result) + target.send(check)) == [result, check]
    with pytest.raises(ProtocolError):
        target.receive_data(encode_frame(result))


# -- closing: ERROR and BYE ------------------------------------------------------------

def test_error_frame_from_the_peer_closes_the_session() -> None:
    source, target = streaming_pair(sent=2)
    error = Error(code="disk_full", message="ENOSPC on /replica")
    assert one(source.receive_data(target.send(error))) == error
    assert target.state is State.CLOSED and source.state is State.CLOSED
    # Nothing more is surfaced or sent once closed.
    assert source.receive_data(encode_frame(Ack(received=2, durable=2))) == []
    with pytest.raises(LocalProtocolError):
        source.send(Ops(first_seq=3, ops=some_ops(1)))


def test_error_frame_during_the_handshake_closes_the_session() -> None:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    target.receive_data(source.start(node=NODE, conid=CONID, volume=VOLUME,
                                     target_path=TARGET_PATH, key=KEY))
    refusal = target.error_frame(AuthenticationError("unknown source node 'src1'"))
    assert target.state is State.CLOSED
    error = one(source.receive_data(refusal))
    assert isinstance(error, Error) and error.code == "auth"
    assert "unknown source node" in error.message
    assert source.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        source.take_auth()


def test_error_frame_after_a_protocol_error_carries_its_code() -> None:
    source, target = streaming_pair(sent=1)
    with pytest.raises(ProtocolError) as info:
        target.receive_data(encode_frame(Ops(first_seq=9, ops=some_ops(1))))
    error = one(source.receive_data(target.error_frame(info.value)))
    assert isinstance(error, Error) and error.code == "sequence"
    assert source.state is State.CLOSED


def test_bye_closes_the_session() -> None:
    source, target = streaming_pair(sent=1)
    assert isinstance(one(target.receive_data(source.send(Bye(reason="shutdown")))), Bye)
    assert source.state is State.CLOSED and target.state is State.CLOSED
    source, target = streaming_pair(sent=1)
    assert isinstance(one(source.receive_data(target.send(Bye()))), Bye)
    assert source.state is State.CLOSED and target.state is State.CLOSED


def test_garbage_closes_the_session() -> None:
    _, target = streaming_pair(sent=1)
    with pytest.raises(ProtocolError):
        target.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    assert target.state is State.CLOSED
    assert target.receive_data(encode_frame(Ops(first_seq=2, ops=some_ops(1)))) == []


# -- known protocol bugs (see each reason) ----------------------------------------------

@pytest.mark.parametrize("closing", [Bye(reason="done"), Error(code="x", message="y")],
                         ids=["bye", "error"])
def test_frames_after_close_do_not_depend_on_chunking(closing: Frame) -> None:
    tail = encode_frame(Ping(nonce=1))
    _, split_target = streaming_pair(sent=1)
    split = split_target.receive_data(encode_frame(closing)) + split_target.receive_data(tail)
    _, joined_target = streaming_pair(sent=1)
    joined = joined_target.receive_data(encode_frame(closing) + tail)
    assert joined == split


@pytest.mark.parametrize("target_path", [b"../../etc", b"/etc", b"a/../../b", b"a\0b", b""])
def test_hostile_target_path_in_hello_is_refused(target_path: bytes) -> None:
    hello = Hello(versions=[1], node=NODE, conid=CONID, volume=VOLUME,
                  target_path=target_path, nonce=os.urandom(NONCE_BYTES))
    with pytest.raises(ProtocolError):
        Session(Role.TARGET).receive_data(encode_frame(hello))
