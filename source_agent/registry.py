"""Connections of a source agent and their persisted state.

``<state_dir>/connections.json`` keeps, per conid: where it goes, whether replication
is started, the restore-required and mirror-required flags, the last seq the target
acknowledged as durable, and the journal position when the connection was made.
conids are stable across restarts and never reused (``next_id`` only grows).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from protocol.runtime.metrics import ErrorRecord
from protocol.runtime.statefile import load_json, save_json
from source_agent.bandwidth import Window, limit_at, parse_size
from source_agent.config import ConnectionConfig, SourceConfig

log = structlog.get_logger("registry")


@dataclass
class Connection:
    """One replication set → one target path, with its persisted flags."""

    id: int
    volume: str
    target: str
    target_path: str
    key_file: str
    replicating: bool = True
    restore_required: bool = False
    mirror_required: bool = False
    mirror_reason: str = ""
    acked_seq: int = 0
    base_seq: int = 0
    #: `clearrestorerequired` was given; tell the target at the next handshake.
    clear_restore_pending: bool = False
    from_config: bool = False
    #: After an unclean stop: the restricted mirror checks entries changed since then.
    restricted_since: float | None = None
    #: Dropped from the journal when its disk bound was reached: holds no segments
    #: (the journal may release what it never acknowledged) until it reconnects and
    #: mirrors (DESIGN §3).
    journal_dropped: bool = False

    # From the config file only (not persisted): TLS under the key handshake.
    tls: bool = field(default=False, metadata={"runtime": True})
    tls_ca: str | None = field(default=None, metadata={"runtime": True})
    tls_cert: str | None = field(default=None, metadata={"runtime": True})
    tls_key: str | None = field(default=None, metadata={"runtime": True})
    tls_server_name: str | None = field(default=None, metadata={"runtime": True})
    # From the config file only (not persisted): bytes/s of OPS frames (None: no limit),
    # overridden by the first schedule window matching local time.
    bandwidth: int | None = field(default=None, metadata={"runtime": True})
    bandwidth_schedule: list[Window] = field(default_factory=list, metadata={"runtime": True})
    #: "zstd": offered at the handshake; compression_active: what the target accepted.
    compression: str = field(default="none", metadata={"runtime": True})

    # Runtime only (not persisted).
    state: str = field(default="starting", metadata={"runtime": True})
    #: The error now (``last_error``) and the last one with its times, kept after it
    #: cleared (status: last_error_time, recent_error).
    error: ErrorRecord = field(default_factory=ErrorRecord, metadata={"runtime": True})
    sent_seq: int = field(default=0, metadata={"runtime": True})
    target_node: str = field(default="", metadata={"runtime": True})
    bytes_sent: int = field(default=0, metadata={"runtime": True})
    ops_sent: int = field(default=0, metadata={"runtime": True})
    #: OPS frame bytes on the wire (after compression); bytes_sent counts op bytes.
    wire_bytes_sent: int = field(default=0, metadata={"runtime": True})
    compression_active: str = field(default="", metadata={"runtime": True})
    connected_since: float | None = field(default=None, metadata={"runtime": True})
    #: What the target said about tasks at the last handshake/keepalive (None: unknown).
    target_task_processing: bool | None = field(default=None, metadata={"runtime": True})
    target_tasks: list[str] | None = field(default=None, metadata={"runtime": True})
    changed: trio.Event = field(default_factory=trio.Event, metadata={"runtime": True})
    acked: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot,
                                            metadata={"runtime": True})

    _PERSISTED = ("id", "volume", "target", "target_path", "key_file", "replicating",
                  "restore_required", "mirror_required", "mirror_reason", "acked_seq",
                  "base_seq", "clear_restore_pending", "from_config", "restricted_since",
                  "journal_dropped")

    def persisted(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._PERSISTED}

    @property
    def last_error(self) -> str:
        """Why the connection does not work now ("" when it does)."""
        return self.error.current

    @last_error.setter
    def last_error(self, message: str) -> None:
        self.error.set(message)

    def configure(self, cc: ConnectionConfig) -> None:
        """Take the settings of its ``[[connection]]`` table that are not persisted
        (at load, and on a config reload): TLS, key file, bandwidth, compression.

        The sender reads the bandwidth at every frame, so a new limit paces the next
        one; TLS, the key file and compression are used from the next session on.
        """
        self.key_file = cc.key_file
        self.tls, self.tls_ca, self.tls_cert = cc.tls, cc.tls_ca, cc.tls_cert
        self.tls_key, self.tls_server_name = cc.tls_key, cc.tls_server_name
        self.bandwidth = None if cc.bandwidth is None else parse_size(cc.bandwidth)
        self.bandwidth_schedule = [w.window() for w in cc.bandwidth_schedule]
        self.compression = cc.compression

    def poke(self) -> None:
        """Wake whoever waits for a change of flags (the sender)."""
        self.changed.set()
        self.changed = trio.Event()

    def bandwidth_limit(self, when: dt.datetime | None = None) -> int | None:
        """Bytes/s of OPS frames in effect at local time ``when`` (now); None: no limit.

        Asked twice per batch by the sender: without a schedule there is no clock to read.
        """
        if not self.bandwidth_schedule:
            return self.bandwidth
        return limit_at(when or dt.datetime.now(), self.bandwidth_schedule, self.bandwidth)[0]

    def bandwidth_status(self) -> dict[str, Any]:
        """For status: the limit in effect now and where it comes from; compression."""
        limit, window = limit_at(dt.datetime.now(), self.bandwidth_schedule, self.bandwidth)
        return {"bandwidth_limit": limit, "bandwidth_configured": self.bandwidth,
                "bandwidth_window": window, "compression": self.compression,
                "compression_active": self.compression_active,
                "wire_bytes_sent": self.wire_bytes_sent}

    def mark_mirror_required(self, reason: str) -> None:
        self.mirror_required = True
        self.mirror_reason = reason


class Registry:
    """All connections of this agent, loaded from config and the state file."""

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.path = os.path.join(config.state_dir, "connections.json")
        self.connections: dict[int, Connection] = {}
        self.next_id = 1
        self.task_processing = True
        self._dirty_since: float | None = None
        #: Why the last save failed ("" once a save works again).
        self.save_error = ""

    def load(self, journal_last_seq: int, volume_empty: dict[str, bool]) -> None:
        """Merge persisted state with the config's [[connection]] entries.

        A connection new to the state file starts at the journal's current end and is
        marked mirror-required when its volume already holds data.
        """
        saved = load_json(self.path) or {}
        self.next_id = int(saved.get("next_id", 1))
        self.task_processing = bool(saved.get("task_processing", True))
        for raw in saved.get("connections", []):
            conn = Connection(**{k: raw[k] for k in Connection._PERSISTED if k in raw})
            self.connections[conn.id] = conn
        configured = {c.id for c in self.config.connection}
        for cc in self.config.connection:
            existing = self.connections.get(cc.id)
            if existing is None:
                self.connections[cc.id] = self._new(cc, journal_last_seq, volume_empty)
            else:  # config wins for where it goes; flags and positions are kept
                existing.volume, existing.target = cc.volume, cc.target
                existing.target_path = cc.target_path
                existing.from_config = True
        for cc in self.config.connection:
            self.connections[cc.id].configure(cc)
        for conid in [c.id for c in self.connections.values()
                      if c.from_config and c.id not in configured]:
            del self.connections[conid]  # removed from the config file
        self.next_id = max([self.next_id, *[c + 1 for c in self.connections]])
        self.save()

    def reconfigure(self, config: SourceConfig) -> None:
        """A reloaded config (already merged: only live keys differ from the running
        one): the connections it lists take their new settings."""
        self.config = config
        for cc in config.connection:
            conn = self.connections.get(cc.id)
            if conn is not None and conn.from_config:
                conn.configure(cc)

    def _new(self, cc: ConnectionConfig, last_seq: int,
             volume_empty: dict[str, bool]) -> Connection:
        conn = Connection(id=cc.id, volume=cc.volume, target=cc.target,
                          target_path=cc.target_path, key_file=cc.key_file,
                          base_seq=last_seq, acked_seq=last_seq, from_config=True)
        if not volume_empty.get(cc.volume, True):
            conn.mark_mirror_required("the volume held data when the connection was made")
        return conn

    def add(self, *, volume: str, target: str, target_path: str, key_file: str,
            last_seq: int, volume_empty: bool) -> Connection:
        """A new connection made with `connect`; gets the next never-used conid."""
        conid = self.next_id
        self.next_id += 1
        conn = Connection(id=conid, volume=volume, target=target, target_path=target_path,
                          key_file=key_file, base_seq=last_seq, acked_seq=last_seq)
        if not volume_empty:
            conn.mark_mirror_required("the volume held data when the connection was made")
        self.connections[conid] = conn
        self.save()
        return conn

    def remove(self, conid: int) -> None:
        del self.connections[conid]
        self.save()

    def save(self) -> None:
        """Persist the state file. Never raises: when the state directory cannot be
        written (a full disk), the failure is logged once and :meth:`run_saver`
        retries every second until it works."""
        try:
            save_json(self.path, {
                "next_id": self.next_id,
                "task_processing": self.task_processing,
                "connections": [c.persisted() for c in sorted(self.connections.values(),
                                                              key=lambda c: c.id)],
            })
        except OSError as exc:
            if not self.save_error:
                log.error("cannot save the connection state; retrying every second",
                          path=self.path, error=str(exc))
            self.save_error = str(exc)
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            return
        if self.save_error:
            log.info("connection state saved again", path=self.path)
            self.save_error = ""
        self._dirty_since = None

    def mark_dirty(self) -> None:
        """Ack positions changed; saved by :meth:`run_saver` within a second."""
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

    async def run_saver(self, interval: float = 1.0) -> None:
        while True:
            await trio.sleep(interval)
            if self._dirty_since is not None:
                await trio.to_thread.run_sync(self.save)

    def select(self, conid: int | str | None) -> list[Connection]:
        """Connections named by a CLI argument: an id, "*" or None (all)."""
        if conid in (None, "*"):
            return sorted(self.connections.values(), key=lambda c: c.id)
        conn = self.connections.get(int(conid))
        return [conn] if conn else []
