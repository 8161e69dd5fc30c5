"""The target agent: TCP listener, authenticated sessions, replicas, control commands.

A session (one TCP connection from a source) goes: HELLO → look up the node and its
key → CHALLENGE → AUTH checked → WELCOME(resume_from) → stream. While streaming,
a receiver task reads frames into a bounded channel (backpressure reaches the
source through TCP) and an applier task drains it: it takes every batch already
waiting (up to ``checkpoint_bytes``), applies them in order in a worker thread,
checkpoints, then sends one cumulative ACK. Nothing a peer sends can crash the
agent: protocol errors end that session with ERROR, and every other session and
the control socket go on.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import structlog
import trio

from protocol.control import Exit, Request, Result, failed, ok
from protocol.errors import AuthenticationError, ProtocolError
from protocol.frames import Ack, Auth, Bye, Error, Hello, Ops, Ping, Pong, Welcome
from protocol.keys import KeyFileError, read_key
from protocol.ops import check_relative_path
from protocol.runtime.control import Emit, serve_control
from protocol.runtime.groups import single_error
from protocol.runtime.sdnotify import notify, watchdog_interval
from protocol.runtime.stream import FrameStream, LinkError
from protocol.session import Role, Session
from target_agent.applier import ApplyError
from target_agent.config import SourceEntry, TargetConfig
from target_agent.replica import Replica

log = structlog.get_logger("target")

HANDSHAKE_TIMEOUT = 15.0
IDLE_TIMEOUT = 60.0
QUEUE_BATCHES = 16


class TargetAgent:
    """Everything one ``mirrorline-target`` process runs."""

    def __init__(self, config: TargetConfig) -> None:
        self.config = config
        self.sources: dict[str, SourceEntry] = {s.node: s for s in config.source}
        self.replicas: dict[tuple[str, int], Replica] = {}
        self.started_at = time.time()
        self.refused_sessions = 0

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
        log.info("target state loaded", replicas=len(self.replicas))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        host, _, port = cfg.listen.rpartition(":")
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_control(
                cfg.control_socket, self.handle, allowed_uids=set(cfg.control_uids),
                allowed_gids=set(cfg.control_gids), task_status=task_status))
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

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            peer = ("?", 0)
        fs = FrameStream(stream, Session(Role.TARGET))
        bound = log.bind(peer=f"{peer[0]}:{peer[1]}")
        try:
            replica = await self._handshake(fs, bound)
            if replica is not None:
                await self._stream(fs, replica)
        except ProtocolError as exc:
            self.refused_sessions += isinstance(exc, AuthenticationError)
            bound.warning("session refused" if fs.session.welcome is None else "session ended",
                          reason=str(exc), code=exc.code)
            await fs.fail(exc)
        except (LinkError, trio.TooSlowError) as exc:
            bound.info("session closed", reason=str(exc) or "handshake timed out")
        except KeyFileError as exc:
            bound.error("cannot read the key for a source", error=str(exc))
            await fs.fail(ProtocolError("the target cannot read its key for this source",
                                        code="config"))
        finally:
            await fs.aclose()

    async def _handshake(self, fs: FrameStream, bound: Any) -> Replica | None:
        session = fs.session
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
        check_relative_path(hello.target_path)
        try:
            target_path = hello.target_path.decode()
        except UnicodeDecodeError:
            raise ProtocolError("target_path must be UTF-8", code="config") from None
        key = (hello.node, hello.conid)
        replica = self.replicas.get(key)
        if replica is None:
            replica = Replica(node=hello.node, conid=hello.conid, target_path=target_path,
                              root=entry.root, state_path=os.path.join(
                                  self.config.state_dir, "connections", hello.node,
                                  f"{hello.conid}.json"))
            await trio.to_thread.run_sync(_make_replica_dir, entry.root, target_path)
            await trio.to_thread.run_sync(replica.save)
            self.replicas[key] = replica
            bound.info("new connection", source=hello.node, conid=hello.conid,
                       replica=replica.replica_path)
        elif replica.target_path != target_path:
            raise ProtocolError(f"connection {hello.conid} of {hello.node} maps to "
                                f"{replica.target_path!r}, not {target_path!r}", code="config")
        replica.root = entry.root
        # A newer session for the same connection replaces the old one (half-open links).
        if replica.session_scope is not None:
            replica.session_scope.cancel()
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await replica.lock.acquire()
        try:
            return await self._welcome(fs, replica, hello, bound)
        except BaseException:
            replica.lock.release()
            raise

    async def _welcome(self, fs: FrameStream, replica: Replica, hello: Hello,
                       bound: Any) -> Replica | None:
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
            mirror_required=replica.mirror_required, message=message)))
        if resume > replica.applied_seq + 1:
            # Nothing before resume will come: treat it as applied (the gap is flagged).
            replica.applied_seq = resume - 1
            await trio.to_thread.run_sync(replica.save)
        return replica

    async def _stream(self, fs: FrameStream, replica: Replica) -> None:
        """Receive and apply until the session ends. Holds ``replica.lock``."""
        bound = log.bind(source=replica.node, conid=replica.conid)
        send_channel, receive_channel = trio.open_memory_channel[Ops](QUEUE_BATCHES)
        replica.state = "replicating"
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
                        await send_channel.send(frame)
                    elif isinstance(frame, Ping):
                        await fs.send(Pong(nonce=frame.nonce))
                    elif isinstance(frame, (Bye, Error)):
                        reason = frame.reason if isinstance(frame, Bye) else frame.message
                        raise LinkError(f"source ended the session: {reason}")

        async def applier() -> None:
            async with receive_channel:
                async for first in receive_channel:
                    batches = [first]
                    size = sum(op.wire_size() for op in first.ops)
                    while size < self.config.checkpoint_bytes:
                        try:
                            more = receive_channel.receive_nowait()
                        except trio.WouldBlock:
                            break
                        batches.append(more)
                        size += sum(op.wire_size() for op in more.ops)
                    ops = [op for b in batches for op in b.ops]
                    try:
                        await replica.apply_with_retry(batches[0].first_seq, ops)
                    except ApplyError as exc:
                        raise ProtocolError(f"refused op: {exc}", code="apply") from exc
                    replica.bytes_applied += size
                    await fs.send(Ack(received=batches[-1].last_seq,
                                      durable=replica.applied_seq))

        with trio.CancelScope() as scope:
            replica.session_scope = scope
            try:
                with single_error():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(receiver)
                        nursery.start_soon(applier)
            finally:
                replica.session_scope = None
                if replica.state == "replicating":
                    replica.state = "idle"
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(replica.close_applier)
                replica.lock.release()
        if scope.cancelled_caught:
            bound.info("session replaced or stopped")

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
        return ok("", role="target", node=self.config.node, listen=self.config.listen,
                  uptime_seconds=round(time.time() - self.started_at, 1),
                  refused_sessions=self.refused_sessions,
                  connections=[r.status() for r in reps])

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


async def run_target(config: TargetConfig) -> None:
    """Run a target agent until SIGTERM/SIGINT."""
    agent = TargetAgent(config)
    agent.open()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.serve)
            async for signum in signals:
                log.info("shutting down", signal=signal.Signals(signum).name)
                notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break
    log.info("target agent stopped")
