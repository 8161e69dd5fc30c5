"""The target agent: TCP listener, authenticated sessions, replicas, control commands.

A session (one TCP connection from a source) goes: HELLO → look up the node and its
key → CHALLENGE → AUTH checked → WELCOME(resume_from) → stream. While streaming,
a receiver task reads frames into a bounded channel (backpressure reaches the
source through TCP) and an applier task drains it: it takes every batch already
waiting (up to ``checkpoint_bytes``), applies them in order in a worker thread and
sends one cumulative ACK; checkpoints (fsync, then the durable seq in the ACK) are
coalesced over a short quiet spell or ``checkpoint_interval``. Nothing a peer sends can crash the
agent: protocol errors end that session with ERROR, and every other session and
the control socket go on.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from protocol.control import Exit, Request, Result, failed, ok
from protocol.errors import AuthenticationError, ProtocolError
from protocol.frames import (
    Ack,
    Auth,
    Bye,
    CheckResult,
    Error,
    Hello,
    Ops,
    Ping,
    Pong,
    TaskResult,
    Welcome,
    encode_frame,
)
from protocol.keys import KeyFileError, key_file_warning, read_key
from protocol.ops import Op, TaskOp, check_relative_path
from protocol.runtime.control import Emit, serve_control
from protocol.runtime.daemon import ConfigFile, current_config_file
from protocol.runtime.groups import single_error
from protocol.runtime.metrics import serve_metrics
from protocol.runtime.ratelimit import LoginLimiter
from protocol.runtime.sdnotify import notify, watchdog_interval
from protocol.runtime.statefile import load_json, save_json
from protocol.runtime.stream import FrameStream, LinkError
from protocol.runtime.taskrun import (
    TaskRecord,
    TaskRefusedError,
    TaskStore,
    check_task,
    list_tasks,
    run_with_timeout,
)
from protocol.runtime.tls import (
    TLS_HANDSHAKE_RECORD,
    PlaintextPeerError,
    TLSHandshakeError,
    close_gracefully,
    first_byte,
    server_context,
    server_stream,
)
from protocol.session import Role, Session
from target_agent.applier import ApplyError
from target_agent.config import SourceEntry, TargetConfig
from target_agent.metrics import collect_target
from target_agent.replica import Replica
from target_agent.restore import replica_bytes, stream_replica

log = structlog.get_logger("target")

HANDSHAKE_TIMEOUT = 15.0
#: Connections still in the handshake, per peer address and in all: more are refused
#: at once, so peers that connect and never authenticate cannot pile up tasks.
MAX_HANDSHAKES_PER_PEER = 64
MAX_HANDSHAKES = 1024
IDLE_TIMEOUT = 60.0
QUEUE_BATCHES = 16
#: Apply at most this many bytes of waiting batches per worker-thread call.
DRAIN_BYTES = 8 * 1024 * 1024
#: Checkpoint once the input has been quiet this long (seconds).
CHECKPOINT_QUIET = 0.005
#: How a replica's ``last_error`` starts when a session of it ended with an error
#: (cleared when the next session starts streaming).
SESSION_ERROR = "session ended: "

#: Keys a config reload (SIGHUP) applies to the running agent. checkpoint_* and
#: task_dir are read from ``self.config`` where used; a source's key file is read at
#: every handshake, and a source added to the config may connect from then on.
#: Everything else needs a restart: node, listen, state_dir, control_socket and the
#: control socket's uids/gids (bound at start), metrics, TLS (the listener's context
#: is loaded at start), and a source removed or given another root (its replicas and
#: sessions live under that root).
LIVE_KEYS = frozenset({"log_level", "checkpoint_interval", "checkpoint_bytes", "task_dir",
                       "source[*].key_file", "source[+]"})


class TargetAgent:
    """Everything one ``mirrorline-target`` process runs.

    ``config_file``: where ``config`` came from, for reloads (see
    :meth:`reload_config`); none: reloads are refused.
    """

    def __init__(self, config: TargetConfig, config_file: ConfigFile | None = None) -> None:
        self.config = config
        self.config_file = config_file or ConfigFile()
        self.sources: dict[str, SourceEntry] = {s.node: s for s in config.source}
        #: TLS on the listener, loaded at start: a bad file stops the start (TLSConfigError).
        self.server_tls = (server_context(config.tls_ca, config.tls_cert, config.tls_key)
                           if config.tls else None)
        self.replicas: dict[tuple[str, int], Replica] = {}
        self.started_at = time.time()
        self.refused_sessions = 0
        #: Failed logins per peer address; a flooding address is refused unchecked.
        self.login_limiter = LoginLimiter()
        #: Connections not yet authenticated, by peer address (the accepted TCP streams).
        self._handshaking: dict[str, set[trio.abc.Stream]] = {}
        self.tasks = TaskStore(os.path.join(config.state_dir, "tasks.json"))
        self.settings_path = os.path.join(config.state_dir, "settings.json")
        self.task_processing = True
        self._task_nursery: trio.Nursery | None = None
        # Frames to push to a replica's source while it has a session (task results,
        # task-setting changes).
        self._results: dict[tuple[str, int], trio.MemorySendChannel[TaskResult | Pong]] = {}

    def open(self) -> None:
        """Load every replica's persisted state."""
        base = os.path.join(self.config.state_dir, "connections")
        os.makedirs(base, exist_ok=True)
        for node in sorted(os.listdir(base)):
            entry = self.sources.get(node)
            for name in sorted(os.listdir(os.path.join(base, node))):
                if not name.endswith(".json"):
                    continue
                path = os.path.join(base, node, name)
                replica = Replica.load(path, entry.root if entry else "")
                if replica is not None:
                    if entry is None:
                        replica.state = "unconfigured"
                    self.replicas[(node, replica.conid)] = replica
        self._check_keys(self.config.source)
        settings = load_json(self.settings_path) or {}
        self.task_processing = bool(settings.get("task_processing", True))
        for record in self.tasks.load():
            log.warning("task was interrupted by a stop of the agent; it will not be re-run",
                        task_id=record.id, source=record.source, conid=record.conid,
                        seq=record.seq, task=record.name)
        log.info("target state loaded", replicas=len(self.replicas),
                 task_processing=self.task_processing)

    @staticmethod
    def _check_keys(entries: list[SourceEntry]) -> None:
        """Say now, naming the file, when a source's key cannot be used (not only when
        that source connects)."""
        for entry in entries:
            try:
                read_key(entry.key_file)
            except KeyFileError as exc:
                log.error("sessions from this source will be refused", source=entry.node,
                          error=str(exc))
            else:
                warning = key_file_warning(entry.key_file)
                if warning:
                    log.warning(warning, source=entry.node)

    async def reload_config(self) -> bool:
        """SIGHUP: read the config file again and apply what may change live
        (:data:`LIVE_KEYS`); a rejected file leaves everything as it was. Returns
        whether the file was valid. See protocol/runtime/daemon.py."""
        return await self.config_file.reload(self.config, LIVE_KEYS, self._reconfigure)

    def _reconfigure(self, config: TargetConfig) -> None:
        old = self.sources
        self.config = config
        self.sources = {s.node: s for s in config.source}
        self._check_keys([s for s in config.source if s != old.get(s.node)])
        for replica in self.replicas.values():
            entry = self.sources.get(replica.node)
            if replica.state == "unconfigured" and entry is not None:
                replica.root = entry.root
                replica.state = "idle"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        host, _, port = cfg.listen.rpartition(":")
        async with trio.open_nursery() as nursery:
            self._task_nursery = nursery
            await nursery.start(lambda task_status: serve_control(
                cfg.control_socket, self.handle, allowed_uids=set(cfg.control_uids),
                allowed_gids=set(cfg.control_gids), task_status=task_status))
            if cfg.metrics:
                await nursery.start(serve_metrics, cfg.metrics,
                                    lambda scrape: collect_target(self, scrape))
            listeners = await trio.open_tcp_listeners(int(port), host=host.strip("[]"))
            nursery.start_soon(trio.serve_listeners, self._serve_client, listeners)
            interval = watchdog_interval()
            if interval:
                nursery.start_soon(_watchdog, interval)
            notify("READY=1")
            log.info("target agent ready", node=cfg.node, listen=cfg.listen,
                     socket=cfg.control_socket)
            task_status.started()

    # -- sessions ---------------------------------------------------------------------

    async def _tls_link(self, tcp: trio.SocketStream, peer: str,
                        bound: Any) -> trio.abc.Stream | None:
        """``tcp`` as sessions use it: under TLS when ``config.tls``, else as is.

        None when the source's TLS does not match this listener (TLS vs plaintext, a
        refused certificate) or it went away: logged, answered with an ERROR frame
        when the source can read one, ``tcp`` closed.
        """
        refusal: ProtocolError | None = None
        farewell = b""
        try:
            if self.server_tls is not None:
                link = await server_stream(tcp, self.server_tls, peer=peer,
                                           handshake_timeout=HANDSHAKE_TIMEOUT)
                bound.debug("TLS established", version=link.version(), cipher=link.cipher())
                return link
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                if await first_byte(tcp) != TLS_HANDSHAKE_RECORD:
                    return tcp
            refusal = ProtocolError(
                f"TLS handshake from {peer} refused: this target has tls = false (set tls, "
                "tls_ca, tls_cert and tls_key in the target config, or tls = false on the "
                "source's connection)", code="tls")
        except PlaintextPeerError as exc:
            refusal = ProtocolError(str(exc), code="tls")
        except TLSHandshakeError as exc:
            self.refused_sessions += 1
            bound.warning("session refused", reason=str(exc), code="tls")
        except (LinkError, trio.TooSlowError) as exc:
            bound.info("session closed", reason=str(exc) or "handshake timed out")
            await trio.aclose_forcefully(tcp)
            return None
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        if refusal is not None:
            self.refused_sessions += 1
            bound.warning("session refused", reason=str(refusal), code=refusal.code)
            # In plaintext: a plaintext source reads the ERROR; a TLS one fails its
            # handshake with "wrong version number" (the target does not speak TLS).
            farewell = Session(Role.TARGET).error_frame(refusal)
        await close_gracefully(tcp, farewell)
        return None

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            peer = ("?", 0)
        address = str(peer[0])
        bound = log.bind(peer=f"{peer[0]}:{peer[1]}")
        for summary in self.login_limiter.expired():
            log.warning("failed-login block over", peer=summary.peer,
                        refused_attempts=summary.refused, seconds=summary.seconds)
        refusal = self._admission(address)
        if refusal is not None:
            # Before reading a byte: no key file read, no HMAC, no log line per attempt.
            await close_gracefully(stream, encode_frame(Error(code=refusal.code,
                                                              message=str(refusal))),
                                   linger=0.5)
            return
        # Counted from here (TLS included) until authenticated or gone.
        self._handshaking.setdefault(address, set()).add(stream)
        try:
            link = await self._tls_link(stream, f"{peer[0]}:{peer[1]}", bound)
        except BaseException:
            self._handshake_over(address, stream)
            raise
        if link is None:
            self._handshake_over(address, stream)
            return
        fs = FrameStream(link, Session(Role.TARGET))
        replica: Replica | None = None
        try:
            replica = await self._handshake(fs, bound, address, stream)
            if replica is not None:
                await self._stream(fs, replica)
        except ProtocolError as exc:
            if replica is not None:      # authenticated: status says why it ended
                replica.last_error = f"{SESSION_ERROR}{exc}"
            self.refused_sessions += isinstance(exc, AuthenticationError)
            where: dict[str, str] = {}
            hello = fs.session.hello
            entry = self.sources.get(hello.node) if hello is not None else None
            if isinstance(exc, AuthenticationError) and entry is not None:
                where["key_file"] = entry.key_file     # for the operator, not the peer
            bound.warning("session refused" if fs.session.welcome is None else "session ended",
                          reason=str(exc), code=exc.code, **where)
            if isinstance(exc, AuthenticationError) and self.login_limiter.failure(address):
                bound.warning(
                    f"too many failed logins from {address}: "
                    f"{self.login_limiter.max_failures} within "
                    f"{self.login_limiter.window:g} s; refusing its connections for "
                    f"{self.login_limiter.block:g} s without checking them",
                    blocked_peer=address)
            await fs.fail(exc)
        except LinkError as exc:
            bound.info("session closed", reason=str(exc))
        except KeyFileError as exc:
            bound.error("cannot read the key for a source", error=str(exc))
            await fs.fail(ProtocolError("the target cannot read its key for this source "
                                        "(see the target's log)", code="config"))
        except Exception as exc:  # a bug in one session must not stop the agent
            if replica is not None:
                replica.last_error = f"{SESSION_ERROR}internal error: {exc}"
            bound.exception("session failed", error=str(exc))
            await fs.fail(ProtocolError(f"internal error: {exc}", code="internal"))
        finally:
            self._handshake_over(address, stream)
            await fs.aclose()

    def _admission(self, address: str) -> ProtocolError | None:
        """Why a new connection from ``address`` is refused unread, or None."""
        left = self.login_limiter.blocked(address)
        if left is not None:
            return ProtocolError(f"too many failed logins from {address}; refused for "
                                 f"{math.ceil(left)} s more", code="rate_limited")
        if (len(self._handshaking.get(address, ())) >= MAX_HANDSHAKES_PER_PEER
                or sum(map(len, self._handshaking.values())) >= MAX_HANDSHAKES):
            return ProtocolError(f"too many unauthenticated connections from {address}",
                                 code="rate_limited")
        return None

    def _handshake_over(self, address: str, stream: trio.abc.Stream) -> None:
        pending = self._handshaking.get(address)
        if pending is not None:
            pending.discard(stream)
            if not pending:
                del self._handshaking[address]

    async def _handshake(self, fs: FrameStream, bound: Any, address: str,
                         tcp: trio.abc.Stream) -> Replica | None:
        session = fs.session
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                hello = await fs.receive()
                if not isinstance(hello, Hello):
                    raise ProtocolError(f"expected HELLO, got {type(hello).__name__}")
                entry = self.sources.get(hello.node)
                if entry is None:
                    raise AuthenticationError(f"unknown source node {hello.node!r}",
                                              code="unknown_source")
                await fs.send_bytes(session.challenge(read_key(entry.key_file)))
                auth = await fs.receive()
                if isinstance(auth, Error):
                    raise AuthenticationError(
                        f"source {hello.node!r} rejected this target's proof: the key for "
                        f"{hello.node!r} differs on the two sides (wrong key)")
                if not isinstance(auth, Auth):
                    raise ProtocolError(f"expected AUTH, got {type(auth).__name__}")
        except trio.TooSlowError:
            raise ProtocolError(f"no complete handshake within {HANDSHAKE_TIMEOUT:g} s",
                                code="timeout") from None
        self.login_limiter.success(address)
        self._handshake_over(address, tcp)
        check_relative_path(hello.target_path)
        try:
            target_path = hello.target_path.decode()
        except UnicodeDecodeError:
            raise ProtocolError("target_path must be UTF-8", code="config") from None
        key = (hello.node, hello.conid)
        replica = self.replicas.get(key)
        if replica is not None and replica.target_path != target_path:
            raise ProtocolError(f"connection {hello.conid} of {hello.node} maps to "
                                f"{replica.target_path!r}, not {target_path!r}", code="config")
        # Every session, not only the first: another connection's replica may have
        # put a symlink where this one's directory was (nested target paths).
        try:
            await trio.to_thread.run_sync(_make_replica_dir, entry.root, target_path)
        except OSError as exc:
            reason = ("a symlink or non-directory is in the way"
                      if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror)
            raise ProtocolError(f"cannot use replica directory {target_path!r} under the "
                                f"root of {hello.node}: {reason}", code="config") from exc
        if replica is None:
            replica = Replica(node=hello.node, conid=hello.conid, target_path=target_path,
                              root=entry.root, state_path=os.path.join(
                                  self.config.state_dir, "connections", hello.node,
                                  f"{hello.conid}.json"))
            await trio.to_thread.run_sync(replica.save)
            self.replicas[key] = replica
            bound.info("new connection", source=hello.node, conid=hello.conid,
                       replica=replica.replica_path)
        replica.root = entry.root
        # A newer session for the same connection replaces the old one (half-open links).
        if replica.session_scope is not None:
            replica.session_scope.cancel()
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as waited:
            await replica.lock.acquire()
        if waited.cancelled_caught:
            raise ProtocolError(f"connection {hello.conid} of {hello.node} is busy: its "
                                f"previous session did not end within {HANDSHAKE_TIMEOUT:g} s",
                                code="busy")
        try:
            return await self._welcome(fs, replica, hello, bound)
        except BaseException:
            replica.lock.release()
            raise

    async def _welcome(self, fs: FrameStream, replica: Replica, hello: Hello,
                       bound: Any) -> Replica | None:
        if hello.purpose == "restore":
            await self._serve_restore(fs, replica, hello, bound)
            return None
        if hello.clear_restore_required and replica.restore_required:
            replica.restore_required = False
            replica.failed_over = False
            replica.mirror_required = True
            replica.mirror_reason = "restore required was cleared by the operator"
            await trio.to_thread.run_sync(replica.save)
            bound.warning("restore required cleared by the source", source=replica.node,
                          conid=replica.conid)
        resume = replica.applied_seq + 1
        message = ""
        if hello.first_seq > resume:
            if replica.applied_seq > 0:
                replica.mirror_required = True
                replica.mirror_reason = (f"ops {resume}..{hello.first_seq - 1} are no longer "
                                         "in the source journal")
                message = replica.mirror_reason
                await trio.to_thread.run_sync(replica.save)
            resume = hello.first_seq
        if replica.restore_required:
            message = (f"connection {replica.conid} was failed over on {self.config.node}: "
                       "the replica is the live copy; restore it or clear restore required")
            await fs.send_bytes(fs.session.accept(Welcome(
                node=self.config.node, resume_from=resume, restore_required=True,
                mirror_required=replica.mirror_required, message=message)))
            await fs.send(Bye(reason="restore required"))
            replica.lock.release()
            return None
        await fs.send_bytes(fs.session.accept(Welcome(
            node=self.config.node, resume_from=resume, restore_required=False,
            mirror_required=replica.mirror_required, message=message,
            task_processing=self.task_processing, tasks=list_tasks(self.config.task_dir))))
        if resume > replica.applied_seq + 1:
            # Nothing before resume will come: treat it as applied (the gap is flagged).
            replica.applied_seq = resume - 1
            await trio.to_thread.run_sync(replica.save)
        return replica

    async def _serve_restore(self, fs: FrameStream, replica: Replica, hello: Hello,
                             bound: Any) -> None:
        """Stream the replica back to its source; on success leave failover for good."""
        try:
            if hello.restore_mode not in ("overwrite", "newer", "checksum") or \
                    hello.restore_orphans not in ("remove", "keep"):
                raise ProtocolError(f"bad restore mode {hello.restore_mode!r}/"
                                    f"{hello.restore_orphans!r}", code="config")
            total = await trio.to_thread.run_sync(replica_bytes, replica.replica_path)
            await fs.send_bytes(fs.session.accept(Welcome(
                node=self.config.node, resume_from=1, restore_required=replica.restore_required,
                mirror_required=replica.mirror_required, restore=True, restore_bytes=total)))
            replica.state = "restoring"
            bound.info("restore started", source=replica.node, conid=replica.conid,
                       mode=hello.restore_mode, orphans=hello.restore_orphans)
            sent = await stream_replica(fs, replica, hello)
            replica.restore_required = False
            replica.failed_over = False
            replica.mirror_required = False
            replica.mirror_reason = ""
            replica.applied_seq = max(hello.restore_seq, 0)
            await trio.to_thread.run_sync(replica.save)
            await fs.send(Bye(reason="restore complete"))
            replica.state = "idle"
            bound.info("restore complete: the source holds the replica's data; replication "
                       "may start again", source=replica.node, conid=replica.conid, ops=sent,
                       applied_seq=replica.applied_seq)
        finally:
            if replica.state == "restoring":
                replica.state = "failed-over" if replica.failed_over else "idle"
        # On success only: when this raises, _handshake releases the lock.
        replica.lock.release()

    async def _stream(self, fs: FrameStream, replica: Replica) -> None:
        """Receive and apply until the session ends. Holds ``replica.lock``."""
        bound = log.bind(source=replica.node, conid=replica.conid)
        send_channel, receive_channel = trio.open_memory_channel[Ops](QUEUE_BATCHES)
        replica.state = "replicating"
        if replica.last_error.startswith(SESSION_ERROR):
            replica.last_error = ""
        replica.received_seq = replica.applied_seq
        bound.info("session started", resume_from=replica.applied_seq + 1)

        async def receiver() -> None:
            async with send_channel:
                while True:
                    with trio.move_on_after(IDLE_TIMEOUT) as idle:
                        frame = await fs.receive()
                    if idle.cancelled_caught:
                        raise LinkError(f"no frame from the source for {IDLE_TIMEOUT:.0f} s")
                    if isinstance(frame, Ops):
                        replica.received_seq = frame.last_seq
                        for i, op in enumerate(frame.ops):
                            if isinstance(op, TaskOp) and self._is_task(op, replica, "receive"):
                                # onreceive: runs on arrival; later ops wait (up to timeout).
                                await self._run_target_task(replica, frame.first_seq + i, op)
                        await send_channel.send(frame)
                    elif isinstance(frame, Ping):
                        await fs.send(Pong(nonce=frame.nonce,
                                           task_processing=self.task_processing,
                                           tasks=list_tasks(self.config.task_dir)))
                    elif isinstance(frame, (Bye, Error)):
                        reason = frame.reason if isinstance(frame, Bye) else frame.message
                        raise LinkError(f"source ended the session: {reason}")

        async def applier() -> None:
            # Each drained batch is applied at once (visible on the replica), but the
            # checkpoint (fsync + state file, then the ACK's durable seq) waits until
            # the input is quiet for CHECKPOINT_QUIET, checkpoint_interval has passed,
            # checkpoint_bytes were applied, or an execute task is next: a trickle of
            # small batches costs one checkpoint per interval, not one per batch.
            received = replica.applied_seq
            due = math.inf                  # trio clock: when the pending checkpoint is due
            retry_at = 0.0                  # after a failed idle checkpoint: not before
            pending_bytes = 0

            async def keepalive() -> None:
                # While an apply is paused (disk full) the receiver stops, and with it
                # the PONGs: a repeated ACK tells the source this side is alive.
                # The failed batch's ops before the failing one may be durable by now
                # (all of them were received).
                durable = replica.applied_seq
                await fs.send(Ack(received=max(received, durable), durable=durable))

            async with receive_channel:
                try:
                    while True:
                        first: Ops | None = None
                        try:
                            if replica.checkpoint_pending:
                                now = trio.current_time()
                                wait = max(min(CHECKPOINT_QUIET, due - now), retry_at - now)
                                with trio.move_on_after(max(wait, 0.0)):
                                    first = await receive_channel.receive()
                            else:
                                first = await receive_channel.receive()
                        except trio.EndOfChannel:
                            break
                        if first is None:   # quiet, or the interval is up
                            try:
                                await trio.to_thread.run_sync(replica.checkpoint)
                            except ApplyError as exc:
                                if exc.permanent:
                                    raise ProtocolError(f"checkpoint failed: {exc}",
                                                        code="apply") from exc
                                # e.g. the state file's disk is full: keep the ops
                                # applied, say so, and try again in a second.
                                replica.last_error = f"checkpoint failed: {exc}"
                                bound.warning("checkpoint failed; retrying", error=str(exc))
                                retry_at = trio.current_time() + 1.0
                                continue
                            due, pending_bytes = math.inf, 0
                            await fs.send(Ack(received=received, durable=replica.applied_seq))
                            continue
                        batches = [first]
                        size = sum(op.wire_size() for op in first.ops)
                        while size < DRAIN_BYTES:
                            try:
                                more = receive_channel.receive_nowait()
                            except trio.WouldBlock:
                                break
                            batches.append(more)
                            size += sum(op.wire_size() for op in more.ops)
                        ops = [op for b in batches for op in b.ops]
                        if not replica.checkpoint_pending:
                            due = trio.current_time() + self.config.checkpoint_interval
                        pending_bytes += size
                        now_due = (pending_bytes >= self.config.checkpoint_bytes
                                   or trio.current_time() >= due)
                        try:
                            await self._apply_with_tasks(replica, batches[0].first_seq, ops,
                                                         checkpoint=now_due,
                                                         keepalive=keepalive)
                        except ApplyError as exc:
                            raise ProtocolError(f"refused op: {exc}", code="apply") from exc
                        if not replica.checkpoint_pending:
                            due, pending_bytes = math.inf, 0
                        replica.bytes_applied += size
                        # Answers to CHECK ops go before the ACK that covers them, all
                        # in one send.
                        results, replica.check_results = replica.check_results, []
                        received = batches[-1].last_seq
                        out = [fs.session.send(CheckResult(
                                   seq=seq, path=op.path,
                                   result={"job": op.job, "offset": op.offset, **result}))
                               for seq, op, result in results]
                        out.append(fs.session.send(Ack(received=received,
                                                       durable=replica.applied_seq)))
                        await fs.send_bytes(b"".join(out))
                finally:
                    if replica.checkpoint_pending:
                        with trio.CancelScope(shield=True):
                            try:
                                await trio.to_thread.run_sync(replica.checkpoint)
                            except ApplyError as exc:
                                bound.warning("checkpoint at session end failed",
                                              error=str(exc))

        results_in, results_out = trio.open_memory_channel[TaskResult | Pong](256)

        async def result_sender() -> None:
            async for result in results_out:
                await fs.send(result)

        key = (replica.node, replica.conid)
        # Results the source may have missed (its session dropped, or it restarted).
        for record in self.tasks.recent(replica.conid, limit=20):
            if record.source == replica.node and record.side == "target":
                results_in.send_nowait(_result_frame(record))
        with trio.CancelScope() as scope:
            replica.session_scope = scope
            self._results[key] = results_in
            try:
                with single_error():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(receiver)
                        nursery.start_soon(applier)
                        nursery.start_soon(result_sender)
            finally:
                if self._results.get(key) is results_in:
                    del self._results[key]
                replica.session_scope = None
                if replica.state == "replicating":
                    replica.state = "idle"
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(replica.close_applier)
                replica.lock.release()
        if scope.cancelled_caught:
            bound.info("session replaced or stopped")

    # -- tasks ------------------------------------------------------------------------

    @staticmethod
    def _is_task(op: Op, replica: Replica, trigger: str) -> bool:
        return isinstance(op, TaskOp) and op.conid == replica.conid and op.trigger == trigger

    async def _apply_with_tasks(self, replica: Replica, first_seq: int, ops: list[Op], *,
                                checkpoint: bool = True,
                                keepalive: Callable[[], Awaitable[None]] | None = None,
                                ) -> None:
        """Apply ops in order; an ``execute`` task runs after everything before it is
        applied and durable, and the ops after it wait for it (DESIGN §6).

        ``checkpoint``: make the last of ``ops`` durable before returning (False: the
        caller checkpoints later)."""
        start = 0
        for i, op in enumerate(ops):
            if self._is_task(op, replica, "execute") and first_seq + i > replica.applied_seq:
                if i > start:
                    await replica.apply_with_retry(first_seq + start, ops[start:i],
                                                   keepalive=keepalive)
                # Earlier batches may still wait for their checkpoint: the task sees
                # everything before it durable.
                await trio.to_thread.run_sync(replica.checkpoint)
                assert isinstance(op, TaskOp)
                await self._run_target_task(replica, first_seq + i, op)
                start = i
        await replica.apply_with_retry(first_seq + start, ops[start:], checkpoint=checkpoint,
                                       keepalive=keepalive)

    async def _run_target_task(self, replica: Replica, seq: int, op: TaskOp) -> None:
        """Run a target-side task at most once and report its result to the source."""
        assert self._task_nursery is not None
        existing = self.tasks.get(op.task_id)
        if existing is not None:
            # Seen before (a resend after a reconnect or a restart): never run twice.
            if not existing.final and existing.state == "running":
                limit = float("inf") if existing.timeout < 0 else existing.timeout
                with trio.move_on_after(limit):
                    await self.tasks.wait_final(op.task_id)
            self._report(existing)
            return
        record = TaskRecord(id=op.task_id, conid=op.conid, source=replica.node, seq=seq,
                            name=op.name, args=list(op.args), trigger=op.trigger,
                            timeout=op.timeout, side="target")
        try:
            if not self.task_processing:
                raise TaskRefusedError(
                    f"task processing is disabled on target {self.config.node}; enable it "
                    f"there with `mirrorline --socket {self.config.control_socket} "
                    f"taskprocessing enable`")
            path = check_task(self.config.task_dir, op.name)
        except TaskRefusedError as exc:
            record.state = "refused"
            record.message = str(exc)
            record.ended = time.time()
            await trio.to_thread.run_sync(self.tasks.put, record)
            log.warning("task refused", task_id=op.task_id, source=replica.node,
                        conid=op.conid, seq=seq, reason=str(exc))
            self._report(record)
            return
        env = {"MIRRORLINE_CONID": str(op.conid), "MIRRORLINE_SOURCE": replica.node,
               "MIRRORLINE_SEQ": str(seq), "MIRRORLINE_TASK_ID": op.task_id,
               "MIRRORLINE_TARGET_PATH": os.path.abspath(replica.replica_path),  # noqa: ASYNC240
               "MIRRORLINE_TRIGGER": op.trigger}
        await run_with_timeout(self._task_nursery, record, path, cwd=replica.replica_path,
                               env=env, store=self.tasks, on_update=self._report)

    def _report(self, record: TaskRecord) -> None:
        channel = self._results.get((record.source, record.conid))
        if channel is not None:
            try:
                channel.send_nowait(_result_frame(record))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass   # sent again at the next session start

    # -- control ----------------------------------------------------------------------

    async def handle(self, request: Request, emit: Emit) -> Result:
        handler = getattr(self, f"cmd_{request.command}", None)
        if handler is None:
            return failed(f"the target agent has no command {request.command!r}", Exit.USAGE)
        result: Result = await handler(request.args, emit)
        return result

    def _select(self, conid: Any, source: str | None = None) -> list[Replica]:
        reps = sorted(self.replicas.values(), key=lambda r: (r.node, r.conid))
        if source is not None:
            reps = [r for r in reps if r.node == source]
        if conid not in (None, "*"):
            reps = [r for r in reps if r.conid == int(conid)]
        return reps

    async def cmd_status(self, args: dict[str, Any], emit: Emit) -> Result:
        try:
            reps = self._select(args.get("conid"))
        except (TypeError, ValueError):
            return failed(f"bad connection id {args.get('conid')!r}", Exit.USAGE)
        conns = []
        for r in reps:
            last = self.tasks.last(r.conid, r.node)
            conns.append({**r.status(), "last_task": last.public() if last else None})
        return ok("", role="target", node=self.config.node, listen=self.config.listen,
                  uptime_seconds=round(time.time() - self.started_at, 1),
                  refused_sessions=self.refused_sessions,
                  login_attempts_rate_limited=self.login_limiter.refused_total,
                  task_processing=self.task_processing,
                  tasks_available=list_tasks(self.config.task_dir), connections=conns,
                  config=self.config_file.status())

    async def cmd_tasks(self, args: dict[str, Any], emit: Emit) -> Result:
        conid = args.get("conid")
        records = self.tasks.recent(None if conid in (None, "*") else int(conid))
        return ok("", tasks=[r.public() for r in records])

    async def cmd_taskprocessing(self, args: dict[str, Any], emit: Emit) -> Result:
        self.task_processing = bool(args.get("enabled"))
        await trio.to_thread.run_sync(save_json, self.settings_path,
                                      {"task_processing": self.task_processing})
        word = "enabled" if self.task_processing else "disabled"
        log.info(f"task processing {word}")
        update = Pong(nonce=0, task_processing=self.task_processing,
                      tasks=list_tasks(self.config.task_dir))
        for channel in self._results.values():   # sources learn it now, not at the next ping
            try:
                channel.send_nowait(update)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return ok(f"task processing {word} on target {self.config.node}",
                  task_processing=self.task_processing)

    async def cmd_failback(self, args: dict[str, Any], emit: Emit) -> Result:
        """End a failover without restoring: restore required stays set."""
        source = str(args.get("source", ""))
        try:
            reps = self._select(args.get("conid"), source)
        except (TypeError, ValueError):
            return failed(f"bad connection id {args.get('conid')!r}", Exit.USAGE)
        reps = [r for r in reps if r.failed_over]
        if not reps:
            return failed(f"no failed-over connection {args.get('conid')} from {source!r}")
        for replica in reps:
            replica.failed_over = False
            replica.state = "idle"
            await trio.to_thread.run_sync(replica.save)
        return ok(f"failover ended on {', '.join(f'{r.node}/{r.conid}' for r in reps)}; "
                  "restore required stays set until a restore or clearrestorerequired")

    async def cmd_failover(self, args: dict[str, Any], emit: Emit) -> Result:
        source = str(args.get("source", ""))
        try:
            reps = self._select(args.get("conid"), source)
        except (TypeError, ValueError):
            return failed(f"bad connection id {args.get('conid')!r}", Exit.USAGE)
        if not reps:
            return failed(f"no connection {args.get('conid')} from source {source!r}")
        for replica in reps:
            replica.restore_required = True
            replica.failed_over = True
            if replica.session_scope is not None:
                replica.session_scope.cancel()
            async with replica.lock:   # the session has ended and checkpointed
                await trio.to_thread.run_sync(replica.save)
            replica.state = "failed-over"
            log.warning("failed over: replica is now the live copy", source=replica.node,
                        conid=replica.conid, applied_seq=replica.applied_seq)
        return ok(f"failed over {', '.join(f'{r.node}/{r.conid}' for r in reps)}: "
                  f"replication into it stopped; restore required is set",
                  failed_over=[{"source": r.node, "id": r.conid,
                                "applied_seq": r.applied_seq,
                                "replica_path": r.replica_path} for r in reps])


def _result_frame(record: TaskRecord) -> TaskResult:
    return TaskResult(task_id=record.id, seq=record.seq, state=record.state,
                      exit_code=record.exit_code, output=record.output,
                      started=record.started, ended=record.ended, message=record.message)


def _make_replica_dir(root: str, target_path: str) -> None:
    """Create ``root/target_path`` without following symlinks below ``root``."""
    os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in target_path.split("/"):
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


async def _watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


async def run_target(config: TargetConfig, config_file: ConfigFile | None = None) -> None:
    """Run a target agent until SIGTERM/SIGINT; SIGHUP reloads the config
    (``config_file``: by default the one :func:`run_daemon` read)."""
    agent = TargetAgent(config, config_file or current_config_file())
    agent.open()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.serve)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await agent.reload_config()
                    continue
                log.info("shutting down", signal=signal.Signals(signum).name)
                notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break
    log.info("target agent stopped")
