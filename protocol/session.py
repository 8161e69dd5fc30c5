"""The session state machine shared by both ends of a replication connection.

Theory of operation
-------------------
A session is one TCP connection between a source (the client) and a target (the
server) for one replication connection (conid). It has two phases.

Handshake (both directions authenticated with the pre-shared key)::

    source                                target
    HELLO(node, conid, nonce_s)   ──►     looks up the key for node
                                  ◄──     CHALLENGE(nonce_t, proof_t)
    checks proof_t
    AUTH(proof_s)                 ──►     checks proof_s
                                  ◄──     WELCOME(resume_from, flags)  or ERROR

    proof_t = HMAC-SHA256(key, "mirrorline-target" | transcript)
    proof_s = HMAC-SHA256(key, "mirrorline-source" | transcript)
    transcript = len-prefixed(node, conid, volume, target_path, nonce_s, nonce_t)

Both nonces are fresh 32-byte randoms, so a recorded handshake cannot be replayed
against either side, and the role label stops a reflected proof being accepted.
Before any key is looked up, HELLO is checked: a common version, a 32-byte nonce,
conid and seqs within 1..2**62 (so no seq derived from them overflows), a known
purpose and a clean relative target path.

Streaming:
    source → target: OPS, PING, BYE, (ERROR)
    target → source: ACK, TASK_RESULT, CHECK_RESULT, PONG, BYE, (ERROR)

Ordering invariants, checked on every frame:
    * OPS batches are consecutive: the first OPS starts at ``resume_from`` and every
      later one at the previous batch's last seq + 1. A gap or overlap is a
      ProtocolError (the target never applies out of order).
    * ACKs are cumulative: ``received`` and ``durable`` never decrease,
      ``durable <= received``, and neither exceeds the last seq sent.

ERROR from the peer ends the session (surfaced as an event); any ProtocolError we
raise means the caller should send ERROR (see :meth:`Session.error_frame`) and close.

Compression: a source that wants it lists "zstd" in HELLO's capabilities; a target
that can (zstandard installed) answers WELCOME.compression = "zstd", and from then on
both decoders accept compressed frames and whichever end sends OPS compresses them
(only when smaller). A WELCOME naming a compression the HELLO did not offer is a
ProtocolError.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from typing import Final

from protocol.errors import AuthenticationError, LocalProtocolError, ProtocolError
from protocol.frames import (
    DEFAULT_MAX_FRAME,
    VERSION,
    ZSTD,
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
    compress_frame,
    encode_frame,
    encode_ops_frame,
    zstd_available,
)
from protocol.ops import check_relative_path

NONCE_BYTES: Final = 32
MIN_KEY_BYTES: Final = 32
#: Frame limit until the handshake is done: an unauthenticated peer cannot make us
#: buffer or decode more than this.
HANDSHAKE_MAX_FRAME: Final = 64 * 1024
#: Largest conid or seq a peer may name (2**62: seq + batch lengths stay in int64).
MAX_SEQ: Final = 1 << 62


class Role(enum.Enum):
    SOURCE = "source"
    TARGET = "target"


class State(enum.Enum):
    START = "start"
    HELLO_SENT = "hello-sent"          # source
    CHALLENGE_SENT = "challenge-sent"  # target
    AUTH_SENT = "auth-sent"            # source
    AUTHENTICATED = "authenticated"    # target: proof checked, WELCOME not yet sent
    STREAMING = "streaming"
    CLOSED = "closed"


def _transcript(hello: Hello, target_nonce: bytes) -> bytes:
    parts = [hello.node.encode(), str(hello.conid).encode(), hello.volume.encode(),
             hello.target_path, hello.nonce, target_nonce]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _proof(key: bytes, label: bytes, hello: Hello, target_nonce: bytes) -> bytes:
    return hmac.new(key, label + _transcript(hello, target_nonce), hashlib.sha256).digest()


# While streaming, by which end: the ops sender (the source; the target during a
# restore, when the stream runs in reverse) and the ops receiver.
_OPS_SENDER_SENDS: Final = (Ops, Ping, Pong, Bye, Error)
_OPS_RECEIVER_SENDS: Final = (Ack, TaskResult, CheckResult, Ping, Pong, Bye, Error)


class Session:
    """One end of a session: feed it bytes, get validated frames; give it frames, get bytes.

    Args:
        role: which end this is.
        max_frame: largest frame body accepted from the peer.
    """

    def __init__(self, role: Role, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.role = role
        self.state = State.START
        self._max_frame = max_frame
        self._decoder = FrameDecoder(min(max_frame, HANDSHAKE_MAX_FRAME))
        self.hello: Hello | None = None
        self._target_nonce = b""
        self._key = b""
        self._pending_auth = b""
        self.welcome: Welcome | None = None
        # Streaming invariants.
        self.next_seq = 0        # next OPS first_seq expected (target) / to send (source)
        self.acked_received = 0
        self.acked_durable = 0
        #: A restore session: the target sends OPS, the source ACKs (see Welcome.restore).
        self.reverse = False
        #: Negotiated compression of OPS frames (ZSTD) or None.
        self.compression: str | None = None

    # -- handshake -----------------------------------------------------------------

    def start(self, *, node: str, conid: int, volume: str, target_path: bytes, key: bytes,
              capabilities: list[str] | None = None, first_seq: int = 1,
              clear_restore_required: bool = False, purpose: str = "replicate",
              restore_mode: str = "overwrite", restore_orphans: str = "remove",
              restore_seq: int = 0) -> bytes:
        """Source: begin the handshake. Returns the HELLO bytes to send."""
        self._require(Role.SOURCE, State.START)
        if len(key) < MIN_KEY_BYTES:
            raise LocalProtocolError(f"key is {len(key)} bytes; at least {MIN_KEY_BYTES} needed")
        self._key = key
        self.hello = Hello(versions=[VERSION], node=node, conid=conid, volume=volume,
                           target_path=target_path, nonce=os.urandom(NONCE_BYTES),
                           capabilities=capabilities or [], first_seq=first_seq,
                           clear_restore_required=clear_restore_required, purpose=purpose,
                           restore_mode=restore_mode, restore_orphans=restore_orphans,
                           restore_seq=restore_seq)
        self.state = State.HELLO_SENT
        return encode_frame(self.hello)

    def challenge(self, key: bytes) -> bytes:
        """Target: answer the received HELLO with CHALLENGE, using the node's key."""
        self._require(Role.TARGET, State.START)
        if self.hello is None:
            raise LocalProtocolError("no HELLO received yet")
        if len(key) < MIN_KEY_BYTES:
            raise LocalProtocolError(f"key is {len(key)} bytes; at least {MIN_KEY_BYTES} needed")
        self._key = key
        self._target_nonce = os.urandom(NONCE_BYTES)
        proof = _proof(key, b"mirrorline-target", self.hello, self._target_nonce)
        self.state = State.CHALLENGE_SENT
        return encode_frame(Challenge(nonce=self._target_nonce, proof=proof))

    def accept(self, welcome: Welcome) -> bytes:
        """Target: after AUTH was verified, send WELCOME and start streaming."""
        self._require(Role.TARGET, State.AUTHENTICATED)
        assert self.hello is not None
        if ZSTD in self.hello.capabilities and zstd_available() and not welcome.compression:
            welcome = welcome.model_copy(update={"compression": ZSTD})
        if welcome.compression:
            self.compression = self._decoder.compression = welcome.compression
        self.welcome = welcome
        self.reverse = welcome.restore
        self.next_seq = welcome.resume_from
        self.acked_received = self.acked_durable = welcome.resume_from - 1
        self.state = State.STREAMING
        self._decoder.max_frame = self._max_frame
        return encode_frame(welcome)

    # -- sending -------------------------------------------------------------------

    def send(self, frame: Frame) -> bytes:
        """Encode a streaming-phase frame, checking the state allows it."""
        if isinstance(frame, Error):
            self.state = State.CLOSED
            return encode_frame(frame)
        allowed: tuple[type[Frame], ...] = ()
        if self.state is State.STREAMING:
            allowed = _OPS_SENDER_SENDS if self.sends_ops else _OPS_RECEIVER_SENDS
        if not isinstance(frame, allowed):
            raise LocalProtocolError(f"{self.role.value} may not send {type(frame).__name__} "
                                     f"in state {self.state.value}")
        if isinstance(frame, Ops):
            if frame.first_seq != self.next_seq:
                raise LocalProtocolError(
                    f"OPS starts at {frame.first_seq}, expected {self.next_seq}")
            self.next_seq = frame.last_seq + 1
            if self.compression:
                return compress_frame(encode_frame(frame))
        elif isinstance(frame, Bye):
            self.state = State.CLOSED
        return encode_frame(frame)

    def send_encoded_ops(self, first_seq: int, encoded_ops: list[bytes]) -> bytes:
        """An OPS frame from journal-encoded ops, with the same seq checks as send()."""
        if not self.sends_ops or self.state is not State.STREAMING:
            raise LocalProtocolError(f"{self.role.value} may not send OPS in {self.state.value}")
        if first_seq != self.next_seq or not encoded_ops:
            raise LocalProtocolError(f"OPS starts at {first_seq}, expected {self.next_seq}")
        self.next_seq = first_seq + len(encoded_ops)
        encoded = encode_ops_frame(first_seq, encoded_ops)
        return compress_frame(encoded) if self.compression else encoded

    def error_frame(self, exc: ProtocolError) -> bytes:
        """The ERROR frame to send after ``exc``; the session is closed afterwards."""
        self.state = State.CLOSED
        return encode_frame(Error(code=exc.code, message=str(exc)))

    # -- receiving -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Frame]:
        """Feed received bytes; return the frames they complete, after state checks.

        Raises:
            ProtocolError: malformed bytes, a frame not allowed now, a seq gap,
                a failed proof. The session is closed.
        """
        if self.state is State.CLOSED:
            return []
        accepted: list[Frame] = []
        try:
            pending = data
            while True:
                # Until streaming, one frame at a time: WELCOME raises the decoder's
                # frame limit (and may turn on compression) for the frames after it,
                # which can arrive in the same read (a restore's first OPS does).
                handshake = self.state is not State.STREAMING
                frames = self._decoder.feed(pending, limit=1 if handshake else None)
                pending = b""
                if not frames:
                    break
                for frame in frames:
                    if self._closed():
                        return accepted   # nothing after BYE/ERROR counts
                    self._on_frame(frame)
                    accepted.append(frame)
                if not handshake:
                    break
        except ProtocolError:
            self.state = State.CLOSED
            raise
        return accepted

    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, Error):
            self.state = State.CLOSED
            return
        if self.role is Role.TARGET:
            self._target_receives(frame)
        else:
            self._source_receives(frame)

    def _target_receives(self, frame: Frame) -> None:
        if self.state is State.START:
            if not isinstance(frame, Hello) or self.hello is not None:
                raise ProtocolError(f"expected HELLO, got {type(frame).__name__}")
            if VERSION not in frame.versions:
                raise ProtocolError(f"no common protocol version (we speak {VERSION})",
                                    code="version")
            if len(frame.nonce) != NONCE_BYTES:
                raise ProtocolError("HELLO nonce must be 32 bytes")
            # Bounded so that no seq derived from them (resume_from, the seqs of OPS and
            # ACK) can leave msgpack's 64-bit integers.
            if not 1 <= frame.conid <= MAX_SEQ:
                raise ProtocolError(f"HELLO conid {frame.conid} out of range 1..{MAX_SEQ}")
            for name, value in (("first_seq", frame.first_seq),
                                ("restore_seq", frame.restore_seq)):
                if not 0 <= value <= MAX_SEQ:
                    raise ProtocolError(f"HELLO {name} {value} out of range 0..{MAX_SEQ}")
            if frame.purpose not in ("replicate", "restore"):
                raise ProtocolError(f"HELLO purpose {frame.purpose!r} is neither 'replicate' "
                                    "nor 'restore'")
            check_relative_path(frame.target_path)
            self.hello = frame
        elif self.state is State.CHALLENGE_SENT:
            if not isinstance(frame, Auth):
                raise ProtocolError(f"expected AUTH, got {type(frame).__name__}")
            assert self.hello is not None
            expected = _proof(self._key, b"mirrorline-source", self.hello, self._target_nonce)
            if not hmac.compare_digest(expected, frame.proof):
                raise AuthenticationError(f"source {self.hello.node!r} failed authentication "
                                          "(wrong key)")
            self.state = State.AUTHENTICATED
        elif self.state is State.STREAMING:
            self._streaming_receives(frame)
        else:
            raise ProtocolError(f"unexpected {type(frame).__name__} in state {self.state.value}")

    def _source_receives(self, frame: Frame) -> None:
        if self.state is State.HELLO_SENT:
            if not isinstance(frame, Challenge):
                raise ProtocolError(f"expected CHALLENGE, got {type(frame).__name__}")
            assert self.hello is not None
            if len(frame.nonce) != NONCE_BYTES:
                raise ProtocolError("CHALLENGE nonce must be 32 bytes")
            expected = _proof(self._key, b"mirrorline-target", self.hello, frame.nonce)
            if not hmac.compare_digest(expected, frame.proof):
                raise AuthenticationError("target failed authentication (wrong key)")
            self._target_nonce = frame.nonce
            self._pending_auth = encode_frame(
                Auth(proof=_proof(self._key, b"mirrorline-source", self.hello, frame.nonce)))
            self.state = State.AUTH_SENT
        elif self.state is State.AUTH_SENT:
            if not isinstance(frame, Welcome):
                raise ProtocolError(f"expected WELCOME, got {type(frame).__name__}")
            if frame.resume_from < 1:
                raise ProtocolError("WELCOME resume_from must be >= 1")
            assert self.hello is not None
            if frame.compression and (frame.compression != ZSTD
                                      or ZSTD not in self.hello.capabilities):
                raise ProtocolError(f"WELCOME compression {frame.compression!r} was not "
                                    "offered")
            if frame.compression:
                self.compression = self._decoder.compression = frame.compression
            self.welcome = frame
            self._decoder.max_frame = min(self._max_frame, frame.max_frame)
            self.reverse = frame.restore
            self.next_seq = frame.resume_from
            self.acked_received = self.acked_durable = frame.resume_from - 1
            self.state = State.STREAMING
        elif self.state is State.STREAMING:
            self._streaming_receives(frame)
        else:
            raise ProtocolError(f"unexpected {type(frame).__name__} in state {self.state.value}")

    @property
    def sends_ops(self) -> bool:
        """Whether this end sends OPS (and receives ACK) in the streaming phase."""
        return (self.role is Role.SOURCE) != self.reverse

    def _streaming_receives(self, frame: Frame) -> None:
        allowed = _OPS_RECEIVER_SENDS if self.sends_ops else _OPS_SENDER_SENDS
        if not isinstance(frame, allowed):
            raise ProtocolError(f"unexpected {type(frame).__name__} while streaming")
        if isinstance(frame, Ops):
            if frame.first_seq != self.next_seq:
                raise ProtocolError(f"OPS starts at seq {frame.first_seq}, expected "
                                    f"{self.next_seq} (gap or overlap)", code="sequence")
            self.next_seq = frame.last_seq + 1
        elif isinstance(frame, Ack):
            last_sent = self.next_seq - 1
            if not (self.acked_received <= frame.received <= last_sent
                    and self.acked_durable <= frame.durable <= frame.received):
                raise ProtocolError(
                    f"ACK(received={frame.received}, durable={frame.durable}) is not "
                    f"cumulative (had {self.acked_received}/{self.acked_durable}, "
                    f"sent up to {last_sent})", code="sequence")
            self.acked_received, self.acked_durable = frame.received, frame.durable
        elif isinstance(frame, Bye):
            self.state = State.CLOSED

    def _closed(self) -> bool:
        # A method, not an inline test: mypy narrows self.state and cannot see that
        # _on_frame changes it inside the loop.
        return self.state is State.CLOSED

    def take_auth(self) -> bytes:
        """Source: the AUTH bytes to send after a CHALLENGE was accepted."""
        self._require(Role.SOURCE, State.AUTH_SENT)
        data, self._pending_auth = self._pending_auth, b""
        return data

    def _require(self, role: Role, state: State) -> None:
        if self.role is not role or self.state is not state:
            raise LocalProtocolError(f"{self.role.value} in state {self.state.value} cannot "
                                     f"do this (needs {role.value} in {state.value})")
