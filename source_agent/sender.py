"""The per-connection sender: journal → OPS frames → target, with acks and reconnects.

One sender task per connection. Each session:

1. TCP connect (10 s bound), handshake (HELLO/CHALLENGE/AUTH/WELCOME, 15 s bound).
2. WELCOME says where to resume (the target's durable seq + 1) and whether the
   target holds a failed-over replica (restore required: stop, say so).
3. Two tasks: the *writer* reads batches from the journal and sends OPS while the
   window of unacknowledged bytes has room; the *reader* takes ACKs (cumulative)
   and moves the connection's ``acked_seq``. A PING goes out every 10 s; 45 s
   without any frame from the target ends the session.

Errors are sorted: a broken link or timeout is temporary (reconnect with backoff
0.2 s → 5 s); a refused authentication or a protocol error from the peer is shown
in status and retried slowly (30 s), since an operator must fix the key or config.
A failed TLS handshake (wrong CA or name, a refused certificate, a target without
TLS) is shown in status too and retried with backoff 1 s → 30 s.

TLS (``tls = true`` on the connection) sits under the key handshake: the client
context is loaded once per sender (again only after a failed load), so a bad file
is reported in status without taking the agent down.

A bandwidth limit (``bandwidth`` / ``bandwidth_schedule``) paces the writer's OPS
frames through a token bucket (source_agent/bandwidth.py); PING and PONG bypass it.
"""

from __future__ import annotations

import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
import trio

from protocol.config_util import parse_host_port
from protocol.errors import AuthenticationError, ProtocolError
from protocol.frames import ZSTD, Ack, Bye, CheckResult, Error, Ping, Pong, TaskResult, Welcome
from protocol.keys import KeyFileError, read_key
from protocol.runtime.groups import single_error
from protocol.runtime.stream import FrameStream, LinkError
from protocol.runtime.tls import (
    TLSConfigError,
    TLSHandshakeError,
    client_context,
    client_stream,
    handshake_error,
)
from protocol.session import Role, Session
from source_agent.bandwidth import Throttle
from source_agent.journal import JournalGapError
from source_agent.registry import Connection
from source_agent.tasks import SourceTasks, is_encoded_task
from source_agent.volume import Volume

log = structlog.get_logger("sender")

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 15.0
PING_INTERVAL = 10.0
IDLE_TIMEOUT = 45.0
#: After the target refused this address for too many failed logins.
RATE_LIMITED_RETRY = 60.0
#: Sender linger: within this long after a send, wait this long for more ops to share
#: the next frame, unless LINGER_OPS are already waiting. Adds at most 5 ms of lag,
#: and only under a steady trickle; it halves the target's CPU per op for 4 KiB
#: writes (one frame, apply and ACK per ~10 ops instead of per 1-2; issue 5, W4).
LINGER_SECONDS = 0.005
LINGER_OPS = 64
#: ERROR codes from the target that an operator must fix ("tls": this connection's TLS
#: setting differs from the target's).
PERMANENT_CODES = ("auth", "unknown_source", "config", "tls")


class RemoteError(Exception):
    """The target sent ERROR."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"target refused: {message} ({code})")
        self.code = code


class PermanentError(Exception):
    """A problem an operator has to fix; retried slowly."""


class Sender:
    """Streams one connection's ops to its target until cancelled.

    Args:
        conn: the connection (flags and positions are updated in place).
        volume: the volume whose journal is read.
        node: this source's node name.
        on_change: called when persisted state of ``conn`` changed.
        batch_bytes / window_bytes: OPS batch size and unacknowledged-bytes window.
    """

    def __init__(self, conn: Connection, volume: Volume, *, node: str,
                 on_change: Callable[[bool], None], batch_bytes: int,
                 window_bytes: int, tasks: SourceTasks | None = None,
                 on_check_result: Callable[[Connection, CheckResult], None] | None = None,
                 on_connected: Callable[[Connection], None] | None = None) -> None:
        self.conn = conn
        self.volume = volume
        self.node = node
        self.on_change = on_change
        self.batch_bytes = batch_bytes
        self.window_bytes = window_bytes
        self._session_scope: trio.CancelScope | None = None
        self.tasks = tasks
        self.on_check_result = on_check_result
        self.on_connected = on_connected
        self._tls_context: ssl.SSLContext | None = None
        #: Sessions ended, by kind ("disconnected": temporary, "error": permanent).
        self.failures: dict[str, int] = {"disconnected": 0, "error": 0}
        #: Wall time of the last ack that advanced acked_seq (None: none yet).
        self.last_ack_time: float | None = None

    def restart_session(self) -> None:
        """Drop the current session (e.g. after replication stop); the loop decides next."""
        if self._session_scope is not None:
            self._session_scope.cancel()

    async def run(self) -> None:
        """Reconnect forever while replication is started. Cancel to stop."""
        conn = self.conn
        backoff = 0.2
        tls_backoff = 1.0
        while True:
            if not conn.replicating:
                conn.state = "restore-required" if conn.restore_required else "stopped"
                await conn.changed.wait()
                continue
            delay = backoff
            with trio.CancelScope() as scope:
                self._session_scope = scope
                try:
                    await self._session()
                    backoff = 0.2
                    tls_backoff = 1.0
                    delay = 0.0
                except TLSHandshakeError as exc:
                    # Wrong CA or name, a refused certificate: an operator must act, and
                    # the other side may be fixed any moment.
                    self._failed("error", str(exc))
                    delay = tls_backoff
                    tls_backoff = min(tls_backoff * 2, 30.0)
                except (LinkError, OSError, trio.TooSlowError) as exc:
                    self._failed("disconnected", str(exc) or type(exc).__name__)
                    backoff = min(backoff * 2, 5.0)
                except (AuthenticationError, KeyFileError, TLSConfigError,
                        PermanentError) as exc:
                    self._failed("error", str(exc))
                    delay = 30.0
                except RemoteError as exc:
                    self._failed("error" if exc.code in PERMANENT_CODES else "disconnected",
                                 str(exc))
                    delay = 30.0 if exc.code in PERMANENT_CODES else backoff
                    if exc.code == "rate_limited":   # the target blocks this address a while
                        delay = RATE_LIMITED_RETRY
                    backoff = min(backoff * 2, 5.0)
                except ProtocolError as exc:
                    if exc.code == "checksum":
                        # Bytes damaged on the link: drop the session and resume at once.
                        self._failed("disconnected", f"corrupted frame from the target: {exc}")
                        backoff = min(backoff * 2, 5.0)
                    else:
                        self._failed("error", f"protocol error from target: {exc}")
                        delay = 5.0
                except Exception as exc:  # a bug here must not stop the agent's other work
                    log.exception("sender failed", conid=conn.id)
                    self._failed("error", f"internal error: {exc}")
                    delay = 5.0
            self._session_scope = None
            conn.connected_since = None
            if scope.cancelled_caught:
                delay = 0.0
            if delay:
                with trio.move_on_after(delay):
                    await conn.changed.wait()  # an operator command retries at once

    def _failed(self, state: str, message: str) -> None:
        if self.conn.last_error != message or self.conn.state != state:
            log.warning("session ended", conid=self.conn.id, target=self.conn.target,
                        reason=message)
        self.conn.state = state
        self.conn.last_error = message
        self.failures[state] = self.failures.get(state, 0) + 1

    async def _session(self) -> None:
        conn = self.conn
        journal = self.volume.journal
        conn.state = "connecting"
        if not conn.tls:
            self._tls_context = None
        elif self._tls_context is None:
            self._tls_context = client_context(conn.tls_ca, conn.tls_cert, conn.tls_key)
        fs, welcome = await open_session(
            conn, self.node, tls_context=self._tls_context,
            first_seq=max(journal.first_seq, conn.base_seq + 1),
            clear_restore_required=conn.clear_restore_pending,
            capabilities=[ZSTD] if conn.compression == ZSTD else [])
        try:
            await self._welcomed(welcome, fs)
        finally:
            await fs.aclose()

    async def _welcomed(self, welcome: Welcome, fs: FrameStream) -> None:
        conn = self.conn
        journal = self.volume.journal
        conn.target_node = welcome.node
        conn.compression_active = welcome.compression
        conn.target_task_processing = welcome.task_processing
        conn.target_tasks = list(welcome.tasks)
        if conn.clear_restore_pending:
            conn.clear_restore_pending = False
            self.on_change(True)
        if welcome.restore_required:
            log.warning("target reports restore required; replication stopped",
                        conid=conn.id, target=conn.target)
            conn.restore_required = True
            conn.replicating = False
            conn.last_error = welcome.message or "the target was failed over"
            self.on_change(True)
            return
        if welcome.mirror_required and not conn.mirror_required:
            conn.mark_mirror_required(welcome.message or "the target skipped ops it never got")
            self.on_change(True)
        resume = welcome.resume_from
        if resume - 1 < conn.acked_seq and resume - 1 < conn.base_seq and conn.acked_seq:
            pass  # a fresh target for a connection made after ops existed: normal
        elif resume - 1 < conn.acked_seq:
            conn.mark_mirror_required(f"the target lost its checkpoint (it had acknowledged "
                                      f"seq {conn.acked_seq}, now resumes at {resume})")
            self.on_change(True)
        if resume > journal.last_seq + 1:
            rec = journal.recovery
            if rec is not None and rec.torn_bytes and conn.mirror_required:
                # The ops lost with the journal's torn tail had reached this target:
                # number on from where it is (no-ops up to there), so seqs stay unique;
                # the restricted mirror that follows the cut repairs what they changed.
                added = journal.skip_to(resume - 1)
                log.warning("journal cut back behind the target; skipped to its position",
                            conid=conn.id, target=conn.target, skipped=added,
                            resume_from=resume)
            else:
                raise PermanentError(
                    f"the target has applied up to seq {resume - 1}, beyond this source's "
                    f"journal (last seq {journal.last_seq}): the journal was reset; a full "
                    f"mirror is needed")
        conn.acked_seq = resume - 1
        conn.sent_seq = resume - 1
        conn.state = "replicating"
        conn.last_error = ""
        conn.connected_since = time.time()
        log.info("replicating", conid=conn.id, target=conn.target, resume_from=resume,
                 captured_seq=journal.last_seq)
        if self.on_connected is not None:
            self.on_connected(conn)
        inflight: deque[tuple[int, int]] = deque()   # (last seq of a batch, its bytes)
        room = trio.lowlevel.ParkingLot()
        state = {"inflight_bytes": 0, "last_rx": time.monotonic()}
        throttle = Throttle(conn.bandwidth_limit)

        async def writer() -> None:
            seq = resume
            last_send = 0.0
            while True:
                while state["inflight_bytes"] >= self.window_bytes:
                    await room.park()
                await journal.wait_for(seq)
                if (journal.last_seq - seq < LINGER_OPS
                        and time.monotonic() - last_send < LINGER_SECONDS):
                    # A trickle of ops right after a send: gather them for a moment
                    # into one frame instead of one send (and one ack) per op. The
                    # first op after a quiet spell goes out at once.
                    await trio.sleep(LINGER_SECONDS)
                try:
                    batch = await journal.read(seq, throttle.batch_bytes(self.batch_bytes),
                                               conn.id)
                except JournalGapError as exc:
                    conn.mark_mirror_required(str(exc))
                    self.on_change(True)
                    # Reconnect at once: the target's WELCOME starts the mirror it needs.
                    raise LinkError(f"journal gap: {exc}") from exc
                size = sum(len(b) for b in batch)
                ops_frame = fs.session.send_encoded_ops(seq, batch)
                await throttle.charge(len(ops_frame))   # OPS only: PING/PONG never wait
                await fs.send_bytes(ops_frame)
                if self.tasks is not None:
                    for i, encoded in enumerate(batch):
                        if is_encoded_task(encoded):
                            # ontransmit: runs once sent; later ops wait (up to its timeout).
                            await self.tasks.on_transmit(conn, seq + i, encoded)
                last_send = time.monotonic()
                seq += len(batch)
                conn.sent_seq = seq - 1
                conn.bytes_sent += size
                conn.ops_sent += len(batch)
                conn.wire_bytes_sent += len(ops_frame)
                inflight.append((seq - 1, size))
                state["inflight_bytes"] += size

        async def reader() -> None:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT) as idle:
                    frame = await fs.receive()
                if idle.cancelled_caught:
                    raise LinkError(f"no frame from the target for {IDLE_TIMEOUT:.0f} s")
                state["last_rx"] = time.monotonic()
                if isinstance(frame, Ack):
                    while inflight and inflight[0][0] <= frame.received:
                        state["inflight_bytes"] -= inflight.popleft()[1]
                    room.unpark_all()
                    if frame.durable > conn.acked_seq:
                        conn.acked_seq = frame.durable
                        self.last_ack_time = time.time()
                        conn.acked.unpark_all()
                        self.on_change(False)
                elif isinstance(frame, Error):
                    raise RemoteError(frame.code, frame.message)
                elif isinstance(frame, Bye):
                    raise LinkError(f"target said goodbye: {frame.reason}")
                elif isinstance(frame, Ping):
                    await fs.send(Pong(nonce=frame.nonce))
                elif isinstance(frame, CheckResult):
                    if self.on_check_result is not None:
                        self.on_check_result(conn, frame)
                elif isinstance(frame, TaskResult):
                    if self.tasks is not None:
                        self.tasks.on_result(conn, frame)
                elif isinstance(frame, Pong):
                    if frame.task_processing is not None:
                        conn.target_task_processing = frame.task_processing
                    if frame.tasks is not None:
                        conn.target_tasks = list(frame.tasks)

        async def pinger() -> None:
            nonce = 0
            while True:
                await trio.sleep(PING_INTERVAL)
                nonce += 1
                await fs.send(Ping(nonce=nonce))

        with single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                nursery.start_soon(reader)
                nursery.start_soon(pinger)


async def open_session(conn: Connection, node: str, *,
                       tls_context: ssl.SSLContext | None = None,
                       **hello: Any) -> tuple[FrameStream, Welcome]:
    """Connect to ``conn``'s target (under TLS when ``conn.tls``) and run the handshake;
    the caller closes the stream.

    ``tls_context``: the client context to use when ``conn.tls`` (loaded from the
    connection's files when not given). ``hello``: extra HELLO fields (first_seq,
    purpose, restore_* …).
    Raises:
        KeyFileError, TLSConfigError, AuthenticationError, RemoteError, ProtocolError,
        TLSHandshakeError, LinkError, OSError, trio.TooSlowError: sorted by
        :meth:`Sender.run` into temporary and permanent.
    """
    key = read_key(conn.key_file)
    if not conn.tls:
        tls_context = None
    elif tls_context is None:
        tls_context = client_context(conn.tls_ca, conn.tls_cert, conn.tls_key)
    host, port = parse_host_port(conn.target)
    with trio.fail_after(CONNECT_TIMEOUT):
        tcp = await trio.open_tcp_stream(host, port)
    stream: trio.abc.Stream = tcp
    if tls_context is not None:
        try:
            stream = await client_stream(tcp, tls_context, conn.tls_server_name or host,
                                         peer=conn.target,
                                         handshake_timeout=HANDSHAKE_TIMEOUT)
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
    session = Session(Role.SOURCE)
    fs = FrameStream(stream, session)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await fs.send_bytes(session.start(
                node=node, conid=conn.id, volume=conn.volume,
                target_path=conn.target_path.encode(errors="surrogateescape"), key=key,
                **hello))
            try:
                frame = await fs.receive()
            except AuthenticationError as exc:
                await fs.fail(exc)       # tell the target why, so it logs it too
                raise
            if isinstance(frame, Error):
                raise RemoteError(frame.code, frame.message)
            await fs.send_bytes(session.take_auth())
            welcome = await fs.receive()
            if isinstance(welcome, Error):
                raise RemoteError(welcome.code, welcome.message)
        assert isinstance(welcome, Welcome)
    except LinkError as exc:
        await fs.aclose()
        # TLS 1.3: the target checks our certificate after our side of the handshake
        # is over, so its refusal (an alert) breaks the first read or write after it.
        if conn.tls and not isinstance(exc, TLSHandshakeError):
            refused = handshake_error(exc, f"TLS handshake with {conn.target}", "client")
            if isinstance(refused, TLSHandshakeError):
                raise refused from exc
        raise
    except BaseException:
        await fs.aclose()
        raise
    return fs, welcome
