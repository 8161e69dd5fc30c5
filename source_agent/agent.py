"""The source agent: volume, journal, senders, control commands, and how they start and stop."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog
import trio

from protocol.config_util import parse_host_port
from protocol.control import Exit, Request, Result, failed, ok
from protocol.frames import CheckResult
from protocol.keys import KeyFileError, read_key
from protocol.runtime.control import Emit, serve_control
from protocol.runtime.daemon import ConfigFile, current_config_file
from protocol.runtime.metrics import serve_metrics
from protocol.runtime.sdnotify import notify, watchdog_interval
from protocol.runtime.taskrun import TaskStore
from source_agent.config import SourceConfig
from source_agent.journal import Journal
from source_agent.metrics import collect_source
from source_agent.mirror import MirrorJob
from source_agent.registry import Connection, Registry
from source_agent.restore import RestoreJob
from source_agent.sender import Sender
from source_agent.tasks import SourceTasks
from source_agent.volume import Volume
from source_agent.watch import Watcher
from source_agent.watch_index import WatchIndex

log = structlog.get_logger("source")

#: Free bytes (and at least a quarter of its size) the journal's file system needs
#: before failed appends count as over.
_JOURNAL_ROOM = 4 << 20
_ENOSPC = os.strerror(errno.ENOSPC)

#: Top-level keys a config reload (SIGHUP) applies to the running agent: read from
#: ``self.config`` where they are used, or pushed to the senders and the task runner.
LIVE_SETTINGS = ("log_level", "mirror_on_connect", "batch_bytes", "window_bytes", "task_dir")
#: Keys of a ``[[connection]]`` table a reload applies: the bandwidth paces the next
#: frame; the key file and compression are used from the next session on.
LIVE_CONNECTION_SETTINGS = ("bandwidth", "bandwidth_schedule", "compression", "key_file")
#: Everything else needs a restart: node, state_dir, control_socket and the control
#: socket's uids/gids (bound at start), metrics, queue (the journal is open), volume
#: (mounted), and a connection added, removed, or moved to another target, path or
#: TLS setting (its sender and the target's replica are tied to those).
LIVE_KEYS = frozenset({*LIVE_SETTINGS,
                       *(f"connection[*].{k}" for k in LIVE_CONNECTION_SETTINGS)})


class SourceAgent:
    """Everything one ``mirrorline-source`` process runs.

    ``config_file``: where ``config`` came from, for reloads (see
    :meth:`reload_config`); none: reloads are refused.
    """

    def __init__(self, config: SourceConfig, config_file: ConfigFile | None = None) -> None:
        self.config = config
        self.config_file = config_file or ConfigFile()
        self.registry = Registry(config)
        self.volumes: dict[str, Volume] = {}
        #: Watch volumes' watchers (``mode = "watch"``), by volume name.
        self.watchers: dict[str, Watcher] = {}
        self.senders: dict[int, tuple[Sender, trio.CancelScope]] = {}
        self._nursery: trio.Nursery | None = None
        self.started_at = time.time()
        self.task_store = TaskStore(os.path.join(config.state_dir, "tasks.json"))
        self.tasks = SourceTasks(self.task_store, self.registry, self.volumes, config.task_dir,
                                 config.node)
        #: The current or last mirror/verify/orphans job of each connection.
        self.jobs: dict[int, MirrorJob] = {}
        self.restores: dict[int, RestoreJob] = {}
        #: Jobs paused because the journal neared its disk bound (resumed under half).
        self._bound_paused: set[int] = set()

    # -- start-up ---------------------------------------------------------------------

    def open(self) -> None:
        """Open journals and the connection registry (before mounting anything)."""
        os.makedirs(self.config.state_dir, exist_ok=True)
        for vc in self.config.volume:
            journal = Journal(os.path.join(self.config.state_dir, "journal", vc.name),
                              memory_limit=self.config.queue.memory,
                              segment_bytes=self.config.queue.segment_bytes)
            recovery = journal.open()
            log.info("journal opened", volume=vc.name, last_seq=recovery.last_seq,
                     clean=recovery.clean, torn_bytes=recovery.torn_bytes)
            self.volumes[vc.name] = Volume(
                vc.name, vc.path, journal, on_journal_failure=self._failure_handler(vc.name),
                connections=self._connections_of(vc.name), sync_mode=vc.sync,
                sync_timeout=vc.sync_timeout, disk_limit=self.config.queue.disk,
                on_disk_bound=self._disk_bound_reached, watch=vc.mode == "watch")
            if vc.mode == "watch":
                index = WatchIndex(os.path.join(self.config.state_dir, "watch",
                                                f"{vc.name}.sqlite"))
                self.watchers[vc.name] = Watcher(self.volumes[vc.name], index,
                                                 backend=vc.watch_backend,
                                                 window=vc.watch_window)
        empty = {name: v.is_empty() and v.journal.last_seq == 0
                 for name, v in self.volumes.items()}
        last = {name: v.journal.last_seq for name, v in self.volumes.items()}
        # One volume per process (see config), so one last_seq for all connections.
        self.registry.load(max(last.values(), default=0), empty)
        for name, volume in self.volumes.items():
            found = volume.journal.recovery
            if found and not found.clean:
                # Ops after the last durable journal point may be lost; they were made
                # after the last fsync, which is at most one sync interval before the last
                # write reached the segment (5 s of margin for clocks and slow disks).
                since = found.last_write - self.config.queue.sync_interval - 5.0
                for conn in self.registry.connections.values():
                    if conn.volume != name:
                        continue
                    if conn.mirror_required and conn.restricted_since is None:
                        continue   # already needs a whole mirror, which covers this
                    conn.mark_mirror_required(
                        f"the journal's tail was damaged ({found.torn_bytes} bytes cut back "
                        f"to seq {found.last_seq}, an unclean stop); ops after it may be "
                        f"missing" if found.torn_bytes else
                        "the source agent stopped uncleanly; ops after the last durable "
                        "journal point may be missing")
                    if conn.restricted_since is None or since < conn.restricted_since:
                        conn.restricted_since = since
        for name, watcher in self.watchers.items():
            if watcher.first_start and not empty[name]:
                # Nothing says what the target holds of this tree: a mirror finds out.
                for conn in self._connections_of(name)():
                    if not conn.mirror_required:
                        conn.mark_mirror_required("first start of a watch volume (no index "
                                                  "of what was sent)")
        self.registry.save()
        for record in self.task_store.load():
            log.warning("task was interrupted by a stop of the agent; it will not be re-run",
                        task_id=record.id, conid=record.conid, task=record.name)

    def _failure_handler(self, volume: str) -> Callable[[str], None]:
        return lambda reason: self._journal_failed(volume, reason)

    def _connections_of(self, volume: str) -> Callable[[], list[Connection]]:
        return lambda: [c for c in self.registry.connections.values() if c.volume == volume]

    def _journal_failed(self, volume: str, reason: str) -> None:
        for conn in self.registry.connections.values():
            if conn.volume == volume and not conn.mirror_required:
                conn.mark_mirror_required(reason)
        self.registry.mark_dirty()

    def _journal_writable(self, volume: Volume) -> None:
        """After journal failures: once appends work again, mirror what was missed.

        Connections that are replicating start their automatic mirror now; the
        others start it when they come up (:meth:`_on_connected`).
        """
        for conn in self._connections_of(volume.name)():
            if (conn.mirror_required and conn.state == "replicating"
                    and not conn.journal_dropped):
                self._on_connected(conn)

    def _journal_has_room(self, volume: Volume) -> bool:
        """Whether the journal's file system has room again (probed while it fails)."""
        try:
            st = os.statvfs(volume.journal.directory)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= max(_JOURNAL_ROOM, st.f_blocks * st.f_frsize // 4)

    # -- the journal's disk bound (DESIGN §3) ------------------------------------------

    def _disk_bound_reached(self, volume: Volume) -> None:
        """The journal holds more than ``queue.disk`` bytes: release what no connection
        needs; while still over, drop the connection(s) furthest behind from the journal.

        A dropped connection is marked mirror-required and no longer holds segments,
        so the journal can release what it never acknowledged; its session restarts at
        the journal's first seq, and the automatic mirror brings its target up to date.
        The other connections go on, and the application never waits. Synchronous:
        called from the capture path right after an append.
        """
        journal = volume.journal
        limit = volume.disk_limit
        if journal.disk_bytes > limit * 3 // 4:
            self._pause_mirrors(volume)
        while journal.disk_bytes > limit and len(journal.segments) > 1:
            holders = [c for c in self._connections_of(volume.name)() if not c.journal_dropped]
            upto = min((c.acked_seq for c in holders), default=journal.last_seq)
            if journal.release(upto):
                continue
            if not holders:
                break
            # release() freed nothing, so the connections at ``upto`` hold the oldest
            # segment: they are the lagging ones.
            for conn in holders:
                if conn.acked_seq == upto:
                    self._drop_from_journal(conn, volume)
        volume.forget_samples(min((c.acked_seq for c in self._connections_of(volume.name)()
                                   if not c.journal_dropped), default=journal.last_seq))

    def _pause_mirrors(self, volume: Volume) -> None:
        """Pause the running mirror and verify jobs of ``volume`` (3/4 of the bound).

        A job appends as fast as it reads, far ahead of what its target acknowledges;
        left running it would fill the journal and get its own connection dropped,
        over and over. Paused, its target catches up; :meth:`_release_loop` resumes
        it under half the bound.
        """
        for job in self.jobs.values():
            if (job.volume is volume and not job.done.is_set() and job.state != "paused"
                    and job.conn.id not in self._bound_paused):
                job.pause()
                self._bound_paused.add(job.conn.id)
                log.info("journal near its disk bound: job paused until its target "
                         "catches up", conid=job.conn.id, kind=job.kind,
                         disk_bytes=volume.journal.disk_bytes, disk_limit=volume.disk_limit)

    def _resume_mirrors(self, volume: Volume) -> None:
        for conid in sorted(self._bound_paused):
            job = self.jobs.get(conid)
            if job is None or job.volume is not volume:
                continue
            self._bound_paused.discard(conid)
            if not job.done.is_set():
                job.resume()
                log.info("journal back under half its disk bound: job resumed", conid=conid,
                         kind=job.kind)

    def _drop_from_journal(self, conn: Connection, volume: Volume) -> None:
        journal = volume.journal
        behind = journal.last_seq - conn.acked_seq
        conn.journal_dropped = True
        conn.mark_mirror_required(
            f"the journal reached its disk bound (queue.disk = {volume.disk_limit} bytes) "
            f"while this connection was {behind} ops behind (target durable at seq "
            f"{conn.acked_seq}): dropped from the journal; a mirror runs when it reconnects")
        log.warning("journal disk bound reached: connection dropped from the journal, "
                    "mirror required", conid=conn.id, volume=volume.name,
                    disk_bytes=journal.disk_bytes, disk_limit=volume.disk_limit,
                    acked_seq=conn.acked_seq, captured_seq=journal.last_seq)
        job = self.jobs.get(conn.id)
        if job is not None and not job.done.is_set():
            job.stop()   # its ops are being released: a new mirror starts on reconnect
        self._bound_paused.discard(conn.id)
        entry = self.senders.get(conn.id)
        if entry is not None:
            entry[0].restart_session()   # reconnect at once, from the journal's new start
        self.registry.save()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled: control socket, mounts, senders; ready when all are up."""

        cfg = self.config
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.tasks.nursery = nursery
            await nursery.start(lambda task_status: serve_control(
                cfg.control_socket, self.handle, allowed_uids=set(cfg.control_uids),
                allowed_gids=set(cfg.control_gids), task_status=task_status))
            if cfg.metrics:
                await nursery.start(serve_metrics, cfg.metrics,
                                    lambda scrape: collect_source(self, scrape))
            for volume in self.volumes.values():
                nursery.start_soon(volume.journal.run_flusher, cfg.queue.sync_interval)
                backing_fd = os.open(volume.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                volume.backing_fd = backing_fd
                watcher = self.watchers.get(volume.name)
                if watcher is not None:
                    await nursery.start(watcher.serve)
                    volume.settle = watcher.settle
                    volume.on_mirror_data = watcher.mirror_data
                    continue
                from source_agent.capture import serve_mount  # pyfuse3 is imported only here

                await nursery.start(serve_mount, volume.path, backing_fd, volume)
                volume.mounted = True
                log.info("volume mounted", volume=volume.name, path=volume.path)
            for conn in self.registry.connections.values():
                self._start_sender(conn)
            nursery.start_soon(self.registry.run_saver)
            nursery.start_soon(self._release_loop)
            interval = watchdog_interval()
            if interval:
                nursery.start_soon(_watchdog, interval)
            notify("READY=1")
            log.info("source agent ready", node=cfg.node, socket=cfg.control_socket)
            task_status.started()

    def _start_sender(self, conn: Connection) -> None:
        assert self._nursery is not None
        sender = Sender(conn, self.volumes[conn.volume], node=self.config.node,
                        on_change=self._conn_changed, batch_bytes=self.config.batch_bytes,
                        window_bytes=self.config.window_bytes, tasks=self.tasks,
                        on_check_result=self._on_check_result, on_connected=self._on_connected)
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await sender.run()

        self.senders[conn.id] = (sender, scope)
        self._nursery.start_soon(run)

    def _conn_changed(self, important: bool) -> None:
        if important:
            self.registry.save()
        else:
            self.registry.mark_dirty()

    async def _release_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            for name, volume in self.volumes.items():
                # Connections dropped from the journal hold nothing (see _disk_bound_reached).
                conns = [c for c in self._connections_of(name)() if not c.journal_dropped]
                upto = min((c.acked_seq for c in conns), default=volume.journal.last_seq)
                if volume.journal.release(upto):
                    log.debug("journal segments released", volume=name, upto=upto)
                volume.forget_samples(upto)
                if volume.disk_limit and volume.journal.disk_bytes > volume.disk_limit * 3 // 4:
                    self._disk_bound_reached(volume)   # mirror traffic appends directly
                elif self._bound_paused and (volume.journal.disk_bytes < volume.disk_limit // 2
                                             or len(volume.journal.segments) == 1):
                    self._resume_mirrors(volume)
                if volume.journal_error and self._journal_has_room(volume):
                    log.warning("journal file system has room again", volume=name,
                                failed_appends=volume.journal_failures)
                    volume.journal_error = ""
                    self._journal_writable(volume)

    async def reload_config(self) -> bool:
        """SIGHUP: read the config file again and apply what may change live
        (:data:`LIVE_KEYS`); a rejected file leaves everything as it was. Returns
        whether the file was valid. See protocol/runtime/daemon.py."""
        return await self.config_file.reload(self.config, LIVE_KEYS, self._reconfigure)

    def _reconfigure(self, config: SourceConfig) -> None:
        self.config = config
        self.registry.reconfigure(config)
        self.tasks.task_dir = config.task_dir
        for sender, _ in self.senders.values():
            sender.batch_bytes = config.batch_bytes
            sender.window_bytes = config.window_bytes

    def close(self) -> None:
        """Flush journals and state at shutdown (after the mounts are gone)."""
        for volume in self.volumes.values():
            volume.journal.close()
        for watcher in self.watchers.values():
            watcher.close()     # after the journal: its rows never claim more than it holds
        self.registry.save()
        log.info("source agent stopped cleanly")

    # -- control commands -------------------------------------------------------------

    async def handle(self, request: Request, emit: Emit) -> Result:
        handler = getattr(self, f"cmd_{request.command}", None)
        if handler is None:
            return failed(f"the source agent has no command {request.command!r}", Exit.USAGE)
        result: Result = await handler(request.args, emit)
        return result

    def _select(self, args: dict[str, Any]) -> list[Connection] | Result:
        conid = args.get("conid")
        try:
            conns = self.registry.select(conid)
        except (TypeError, ValueError):
            return failed(f"bad connection id {conid!r}", Exit.USAGE)
        if not conns and conid not in (None, "*"):
            return failed(f"no connection {conid}")
        return conns

    async def cmd_status(self, args: dict[str, Any], emit: Emit) -> Result:
        conns = self._select(args)
        if isinstance(conns, Result):
            return conns
        data = {
            "role": "source",
            "node": self.config.node,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "task_processing": self.registry.task_processing,
            "volumes": [{
                "name": v.name, "path": v.path, "mounted": v.mounted,
                "mode": "watch" if v.watch else "fuse",
                "ready": (self.watchers[v.name].state == "watching" if v.watch
                          else v.mounted),
                **({"watch": self.watchers[v.name].status()} if v.watch else {}),
                "captured_seq": v.journal.last_seq, "durable_seq": v.journal.durable_seq,
                "journal_first_seq": v.journal.first_seq,
                "journal_disk_bytes": v.journal.disk_bytes,
                "journal_memory_bytes": v.journal.memory_bytes,
                "journal_failures": v.journal_failures,
                "journal_error": v.journal_error,
                "journal_disk_limit": v.disk_limit,
                "sync": v.sync_mode, "sync_timeout": v.sync_timeout,
                "sync_replicated": v.sync_replicated, "sync_degraded": v.sync_degraded,
            } for v in self.volumes.values()],
            "connections": [self._conn_status(c) for c in conns],
            "config": self.config_file.status(),
        }
        return ok("", **data)

    def _conn_status(self, c: Connection) -> dict[str, Any]:
        volume = self.volumes[c.volume]
        journal = volume.journal
        return {
            "id": c.id, "volume": c.volume, "target": c.target, "target_path": c.target_path,
            "target_node": c.target_node, "state": c.state, "replicating": c.replicating,
            "restore_required": c.restore_required, "mirror_required": c.mirror_required,
            "mirror_reason": c.mirror_reason, "journal_dropped": c.journal_dropped,
            "acked_seq": c.acked_seq,
            "sent_seq": c.sent_seq, "captured_seq": journal.last_seq,
            "queue_ops": max(journal.last_seq - c.acked_seq, 0),
            "queue_bytes": journal.bytes_after(c.acked_seq),
            "lag_seconds": volume.lag_seconds(c.acked_seq), "bytes_sent": c.bytes_sent,
            # Captured but not sent yet (the rest of the lag is in flight or unacked).
            "unsent_ops": max(journal.last_seq - max(c.sent_seq, c.acked_seq), 0),
            "ops_sent": c.ops_sent,
            **c.bandwidth_status(),
            "last_error": c.last_error,
            "last_error_time": c.error.last_seen,
            "recent_error": c.error.status(),
            "target_task_processing": c.target_task_processing,
            "last_task": last.public() if (last := self.task_store.last(c.id)) else None,
            "mirror": job.status() if (job := self.jobs.get(c.id)) else None,
            "restore": r.status() if (r := self.restores.get(c.id)) else None,
            "data_state": self._data_state(c),
        }

    def _data_state(self, c: Connection) -> str:
        """As the scripting guide names them."""
        restore = self.restores.get(c.id)
        if restore is not None and not restore.done.is_set():
            return "restoring"
        if c.restore_required:
            return "restore required"
        if c.mirror_required:
            return "mirror required"
        return "good"

    async def cmd_replication_start(self, args: dict[str, Any], emit: Emit) -> Result:
        conns = self._select(args)
        if isinstance(conns, Result):
            return conns
        clear = bool(args.get("clear_restore_required"))
        refused = [c for c in conns if c.restore_required and not clear]
        for conn in conns:
            if conn in refused:
                continue
            if conn.restore_required:
                conn.restore_required = False
                conn.clear_restore_pending = True
                conn.mark_mirror_required("restore required was cleared: the target may "
                                          "differ from the source")
                log.warning("restore required cleared by operator", conid=conn.id)
            conn.replicating = True
            conn.last_error = ""
            conn.poke()
        self.registry.save()
        started = [c.id for c in conns if c not in refused]
        if refused:
            ids = ", ".join(str(c.id) for c in refused)
            return failed(f"restore required on connection {ids}: the target may hold data the "
                          f"source lacks. Run `mirrorline restore <conid>`, or override with "
                          f"`mirrorline replication start <conid> clearrestorerequired`",
                          started=started, refused=[c.id for c in refused])
        return ok(f"replication started on {_ids(started)}", started=started)

    async def cmd_replication_stop(self, args: dict[str, Any], emit: Emit) -> Result:
        conns = self._select(args)
        if isinstance(conns, Result):
            return conns
        for conn in conns:
            conn.replicating = False
            conn.poke()
            entry = self.senders.get(conn.id)
            if entry:
                entry[0].restart_session()
        self.registry.save()
        return ok(f"replication stopped on {_ids([c.id for c in conns])}; ops are still "
                  f"journaled and will be sent when it starts again",
                  stopped=[c.id for c in conns])

    async def cmd_connect(self, args: dict[str, Any], emit: Emit) -> Result:
        volume = str(args.get("volume", ""))
        target = str(args.get("target", ""))
        target_path = str(args.get("target_path", ""))
        key_file = args.get("key_file")
        if volume not in self.volumes:
            return failed(f"no volume {volume!r} on this agent (have: "
                          f"{', '.join(self.volumes)})")
        try:
            parse_host_port(target)
        except ValueError as exc:
            return failed(str(exc), Exit.USAGE)
        if not target_path or target_path.startswith("/") or ".." in target_path.split("/"):
            return failed(f"target path {target_path!r} must be relative, without '..'",
                          Exit.USAGE)
        if not key_file:
            same = [c.key_file for c in self.registry.connections.values() if c.target == target]
            if not same:
                return failed("no key file given and no other connection to that target has "
                              "one: add `key <file>`")
            key_file = same[0]
        try:
            read_key(str(key_file))
        except KeyFileError as exc:
            return failed(str(exc))
        vol = self.volumes[volume]
        conn = self.registry.add(volume=volume, target=target, target_path=target_path,
                                 key_file=os.path.abspath(str(key_file)),  # noqa: ASYNC240
                                 last_seq=vol.journal.last_seq,
                                 volume_empty=vol.is_empty() and vol.journal.last_seq == 0)
        self._start_sender(conn)
        log.info("connection made", conid=conn.id, volume=volume, target=target)
        msg = f"connection {conn.id}: {volume} -> {target} {target_path}"
        if conn.mirror_required:
            msg += " (mirror required: the volume already holds data)"
        return ok(msg, id=conn.id)

    async def cmd_disconnect(self, args: dict[str, Any], emit: Emit) -> Result:
        conns = self._select(args)
        if isinstance(conns, Result):
            return conns
        for conn in conns:
            entry = self.senders.pop(conn.id, None)
            if entry:
                entry[1].cancel()
            self.registry.remove(conn.id)
            log.info("connection removed", conid=conn.id)
        return ok(f"disconnected {_ids([c.id for c in conns])}",
                  disconnected=[c.id for c in conns])

    async def cmd_queuetask(self, args: dict[str, Any], emit: Emit) -> Result:
        conns = self._select(args)
        if isinstance(conns, Result):
            return conns
        if not conns:
            return failed("no connections to queue the task on")
        return await self.tasks.queue(conns, args)

    async def cmd_tasks(self, args: dict[str, Any], emit: Emit) -> Result:
        return self.tasks.list(args.get("conid"))

    async def cmd_taskprocessing(self, args: dict[str, Any], emit: Emit) -> Result:
        return await self.tasks.set_processing(bool(args.get("enabled")))

    # -- mirror, verify, orphans ------------------------------------------------------

    def _on_check_result(self, conn: Connection, frame: CheckResult) -> None:
        job = self.jobs.get(conn.id)
        if job is not None:
            job.on_result(frame)

    def _on_connected(self, conn: Connection) -> None:
        """Automatic mirror when a connection that needs one comes up (DESIGN §3)."""
        if conn.journal_dropped:
            # It resumes inside the journal again (at or after its first seq).
            conn.journal_dropped = False
            self.registry.mark_dirty()
        mode = self.config.mirror_on_connect
        job = self.jobs.get(conn.id)
        if not conn.mirror_required or mode == "none" or (job and not job.done.is_set()):
            return
        if self.volumes[conn.volume].journal_error:
            # Its ops could not be journaled: it starts once the journal takes
            # appends again (_journal_writable).
            log.info("automatic mirror waits for the journal to be writable", conid=conn.id)
            return
        restricted = conn.restricted_since
        self._start_job(conn, kind="mirror", mode="different" if restricted else mode,
                        orphans="remove" if restricted else None,
                        restricted_since=restricted,
                        reason=f"automatic: {conn.mirror_reason or 'mirror required'}")

    def _start_job(self, conn: Connection, **kwargs: Any) -> MirrorJob | Result:
        job = self.jobs.get(conn.id)
        if job is not None and not job.done.is_set():
            return failed(f"connection {conn.id}: a {job.kind} is already running "
                          f"(`mirrorline mirror stop {conn.id}` first)")
        job = MirrorJob(conn, self.volumes[conn.volume], **kwargs)
        self.jobs[conn.id] = job
        assert self._nursery is not None
        self._nursery.start_soon(self._run_job, job)
        return job

    async def _run_job(self, job: MirrorJob) -> None:
        await job.run()
        volume = job.volume
        if (job.kind == "mirror" and job.state == "failed"
                and (_ENOSPC in job.error or not self._journal_has_room(volume))):
            # Its own appends hit a full journal disk: mirror again once there is room
            # (a difference mirror skips what the failed one already brought over).
            if not volume.journal_error:
                volume.journal_error = f"journal write failed ({_ENOSPC}) during a mirror"
        if job.kind == "mirror" and job.state == "done":
            await trio.to_thread.run_sync(self.registry.save)
        if job.kind == "verify":
            await trio.to_thread.run_sync(self._write_verify_log, job)

    def _verify_log_path(self, conid: int) -> str:
        return os.path.join(self.config.state_dir, "verify", f"{conid}.log")

    def _write_verify_log(self, job: MirrorJob) -> None:
        path = self._verify_log_path(job.conn.id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.started))
        with open(path, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(f"{stamp} verify connection {job.conn.id}: {job.state}, "
                    f"{job.files_done} entries, {len(job.differences)} differences"
                    f"{' (remirrored)' if job.remirror else ''}\n")
            for diff in job.differences:
                f.write(f"  {','.join(diff.what)}\t{diff.path.decode(errors='surrogateescape')}\n")

    async def _wait_jobs(self, jobs: list[MirrorJob], limit_s: Any,
                         emit: Emit | None = None) -> bool:
        """Wait for ``jobs``, sending a progress event every second through ``emit``."""
        limit = float(limit_s) if limit_s is not None else float("inf")
        with trio.move_on_after(limit):
            for job in jobs:
                while not job.done.is_set():
                    with trio.move_on_after(1.0):
                        await job.done.wait()
                    if emit is not None and not job.done.is_set():
                        await emit(_progress_event(job))
            return True
        return False

    async def cmd_mirror(self, args: dict[str, Any], emit: Emit) -> Result:
        conns = self._select(args)
        if isinstance(conns, Result):
            return conns
        action = str(args.get("action", "start"))
        if action in ("stop", "pause", "resume"):
            touched = []
            for conn in conns:
                job = self.jobs.get(conn.id)
                if job is None or job.done.is_set():
                    continue
                getattr(job, action)()
                touched.append(conn.id)
            if not touched:
                return failed(f"no mirror is running on {_ids([c.id for c in conns])}")
            return ok(f"mirror {action} on {_ids(touched)}", conids=touched)
        mode = str(args.get("mode") or "full")
        jobs: list[MirrorJob] = []
        for conn in conns:
            started = self._start_job(conn, kind="mirror", mode=mode,
                                      newer=bool(args.get("newer")),
                                      orphans="remove" if args.get("orphans") == "remove"
                                      else None, reason="operator request")
            if isinstance(started, Result):
                return started
            jobs.append(started)
        if not args.get("wait"):
            return ok(f"{mode} mirror started on {_ids([j.conn.id for j in jobs])}",
                      mirrors=[j.status() for j in jobs])
        if not await self._wait_jobs(jobs, args.get("wait_timeout"), emit):
            return failed("timed out waiting for the mirror", Exit.TIMEOUT,
                          mirrors=[j.status() for j in jobs])
        bad = [j for j in jobs if j.state != "done"]
        statuses = [j.status() for j in jobs]
        if bad:
            return failed("; ".join(f"connection {j.conn.id}: mirror {j.state}"
                                    f"{': ' + j.error if j.error else ''}" for j in bad),
                          mirrors=statuses)
        sent = sum(j.bytes_sent for j in jobs)
        return ok(f"{mode} mirror done on {_ids([j.conn.id for j in jobs])}: "
                  f"{sum(j.files_done for j in jobs)} entries, {sent} bytes sent",
                  mirrors=statuses)

    async def cmd_verify(self, args: dict[str, Any], emit: Emit) -> Result:
        conns = self._select(args)
        if isinstance(conns, Result):
            return conns
        jobs = []
        for conn in conns:
            job = self._start_job(conn, kind="verify", mode="checksum",
                                  remirror=bool(args.get("remirror")), reason="operator request")
            if isinstance(job, Result):
                return job
            jobs.append(job)
        if not args.get("wait"):
            return ok(f"verify started on {_ids([j.conn.id for j in jobs])}; see status, "
                      f"and the log in {self._verify_log_path(jobs[0].conn.id) if jobs else '-'}")
        if not await self._wait_jobs(jobs, args.get("wait_timeout"), emit):
            return failed("timed out waiting for the verify", Exit.TIMEOUT)
        report = [{"conid": j.conn.id, "in_sync": not j.differences and j.state == "done",
                   "state": j.state, "entries": j.files_done,
                   "differences": [d.public() for d in j.differences],
                   "log": self._verify_log_path(j.conn.id)} for j in jobs]
        bad = [r for r in report if not r["in_sync"]]
        if not bad:
            return ok(f"in sync: {_ids([j.conn.id for j in jobs])}", verify=report)
        lines = []
        for r in bad:
            for d in r["differences"]:  # type: ignore[attr-defined]
                lines.append(f"connection {r['conid']}: {d['path']}: {', '.join(d['what'])}")
            if r["state"] != "done":
                lines.append(f"connection {r['conid']}: verify {r['state']}")
        repaired = " (remirrored)" if args.get("remirror") else ""
        return failed(f"not in sync{repaired}:\n" + "\n".join(lines), verify=report)

    async def cmd_orphans(self, args: dict[str, Any], emit: Emit) -> Result:
        conns = self._select(args)
        if isinstance(conns, Result):
            return conns
        action = str(args.get("action", "list"))
        if args.get("to"):
            return failed("to=<dir> is not supported: orphans are moved to the holding area "
                          "<root>/.mirrorline-orphans/<target_path> on the target", Exit.USAGE)
        older = args.get("older_than_days")
        jobs = []
        for conn in conns:
            job = self._start_job(conn, kind="orphans", orphans=action,
                                  older_than_days=float(older) if older is not None else None,
                                  reason="operator request")
            if isinstance(job, Result):
                return job
            jobs.append(job)
        await self._wait_jobs(jobs, None)
        orphans = [o for j in jobs for o in j.orphan_list]
        removed = sum(j.orphans_removed for j in jobs)
        moved_to = (f"<root of {jobs[0].conn.target_node or jobs[0].conn.target}>/"
                    f".mirrorline-orphans/{jobs[0].conn.target_path}"
                    if action == "move" and jobs else None)
        verb = {"list": "found", "remove": "removed", "move": "moved"}.get(action, action)
        return ok(f"{len(orphans)} orphan(s) {verb}"
                  + (f" to {moved_to} on the target" if moved_to else ""),
                  orphans=orphans, removed=removed, moved_to=moved_to)

    async def cmd_restore(self, args: dict[str, Any], emit: Emit) -> Result:
        conns = self._select(args)
        if isinstance(conns, Result):
            return conns
        if len(conns) != 1:
            return failed("restore takes one connection id", Exit.USAGE)
        conn = conns[0]
        mode = str(args.get("mode") or "overwrite")
        orphans = str(args.get("orphans") or "remove")
        if conn.replicating:
            return failed(f"connection {conn.id} is replicating: stop it first with "
                          f"`mirrorline replication stop {conn.id}` (a restore overwrites the "
                          f"protected directory with the target's copy)")
        running = self.restores.get(conn.id)
        if running is not None and not running.done.is_set():
            return failed(f"a restore of connection {conn.id} is already running")
        mirror = self.jobs.get(conn.id)
        if mirror is not None and not mirror.done.is_set():
            mirror.stop()
        job = RestoreJob(conn, self.volumes[conn.volume], self.config.node, mode=mode,
                         orphans=orphans)
        self.restores[conn.id] = job
        assert self._nursery is not None
        self._nursery.start_soon(job.run, self.registry.save)
        if not args.get("wait"):
            return ok(f"restore of connection {conn.id} started ({mode}, orphans={orphans})",
                      restore=job.status())
        limit = args.get("wait_timeout")
        with trio.move_on_after(float(limit) if limit is not None else float("inf")):
            while not job.done.is_set():
                with trio.move_on_after(1.0):
                    await job.done.wait()
                if not job.done.is_set():
                    st = job.status()
                    await emit({**st, "message": f"restore {conn.id}: {st['ops_applied']} ops, "
                                f"{st['bytes_received'] / 1e6:.1f} MB"})
        if not job.done.is_set():
            return failed("timed out waiting for the restore", Exit.TIMEOUT,
                          restore=job.status())
        if job.state != "done":
            return failed(f"restore of connection {conn.id} failed: {job.error}; restore "
                          f"required stays set", restore=job.status())
        return ok(f"restore of connection {conn.id} done: {job.ops_applied} ops applied, "
                  f"{job.kept_newer} newer files kept, {job.orphans_removed} source-only "
                  f"entries removed; restore required cleared — start replication with "
                  f"`mirrorline replication start {conn.id}`", restore=job.status())

    async def cmd_wait_queue(self, args: dict[str, Any], emit: Emit) -> Result:
        conns = self._select(args)
        if isinstance(conns, Result):
            return conns
        timeout = args.get("timeout")
        for name in {c.volume for c in conns}:
            await self.volumes[name].settled()    # changes made before the call count
        goals = {c.id: self.volumes[c.volume].journal.last_seq for c in conns}
        deadline = trio.current_time() + float(timeout) if timeout is not None else float("inf")
        with trio.move_on_at(deadline):
            for conn in conns:
                while conn.acked_seq < goals[conn.id]:
                    if not conn.replicating:
                        why = "restore required" if conn.restore_required else "stopped"
                        return failed(f"connection {conn.id}: replication is {why}; the queue "
                                      f"cannot drain", pending=goals[conn.id] - conn.acked_seq)
                    with trio.move_on_after(1.0):
                        await conn.acked.park()
            return ok(f"queue drained on {_ids(list(goals))}", acked={
                c.id: c.acked_seq for c in conns})
        behind = {c.id: goals[c.id] - c.acked_seq for c in conns if c.acked_seq < goals[c.id]}
        return failed(f"timed out after {timeout} s; ops still pending: {behind}", Exit.TIMEOUT,
                      pending=behind)


def _progress_event(job: MirrorJob) -> dict[str, Any]:
    st = job.status()
    done_mb, total_mb = st["bytes_done"] / 1e6, st["bytes_total"] / 1e6
    eta = f", ETA {st['eta_seconds']:.0f}s" if st["eta_seconds"] is not None else ""
    total = f"/{st['files_total']}" if st["scan_complete"] else " (scanning)"
    message = (f"{job.kind} {job.conn.id} {st['state']}: {st['files_done']}{total} entries, "
               f"{done_mb:.1f}/{total_mb:.1f} MB, {st['rate_bytes_per_s'] / 1e6:.1f} MB/s{eta}")
    return {**st, "message": message}


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids) if ids else "no connections"


async def _watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


async def run_source(config: SourceConfig, config_file: ConfigFile | None = None) -> None:
    """Run a source agent until SIGTERM/SIGINT, then shut down cleanly; SIGHUP reloads
    the config (``config_file``: by default the one :func:`run_daemon` read)."""
    agent = SourceAgent(config, config_file or current_config_file())
    agent.open()
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                       signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.serve)

                async def wait_signal() -> None:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            await agent.reload_config()
                            continue
                        log.info("shutting down", signal=signal.Signals(signum).name)
                        notify("STOPPING=1")
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(wait_signal)
    finally:
        agent.close()
