"""Source agent configuration (TOML), validated with pydantic."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.config_util import load_toml_model, parse_host_port, require_tls_files
from protocol.frames import zstd_available
from source_agent.bandwidth import BandwidthWindowConfig, parse_size


class VolumeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str
    #: "journal": fsync returns when the journal is durable; "replicated" also waits
    #: for every target (bounded by sync_timeout).
    sync: Literal["journal", "replicated"] = "journal"
    #: sync = "replicated": the longest an application fsync waits for the targets
    #: (seconds) before it returns anyway, with a warning and a counter.
    sync_timeout: float = Field(default=5.0, gt=0)
    #: "fuse": a FUSE mount over the directory captures every write, in order.
    #: "watch": no mount; kernel notifications (fanotify, else inotify) say which
    #: files changed, and their changed blocks are sent: file-level, eventually
    #: consistent, not write-ordered (see source_agent/watch.py).
    mode: Literal["fuse", "watch"] = "fuse"
    #: mode = "watch": "auto" (fanotify where the kernel and privileges allow it,
    #: else inotify), or one of them.
    watch_backend: Literal["auto", "fanotify", "inotify"] = "auto"
    #: mode = "watch": seconds from a change to its processing, so a burst of writes
    #: to one file is read once.
    watch_window: float = Field(default=0.05, gt=0, le=10)

    @model_validator(mode="after")
    def _watch_sync(self) -> VolumeConfig:
        if self.mode == "watch" and self.sync == "replicated":
            raise ValueError('sync = "replicated" needs mode = "fuse": a watch volume sees '
                             "no application fsync to hold")
        return self

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value.rstrip("/") or "/"


class ConnectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=1)
    volume: str
    target: str
    target_path: str = Field(min_length=1)
    key_file: str
    #: TLS under the key handshake: the target's certificate is verified against
    #: tls_ca (and its name against tls_server_name, default the target host); this
    #: side presents tls_cert/tls_key, which the target verifies in turn.
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    #: Bytes per second of OPS frames ("2MiB", "500k", "10M"); None: no limit. The
    #: first bandwidth_schedule window matching local time overrides it.
    bandwidth: str | None = None
    bandwidth_schedule: list[BandwidthWindowConfig] = []
    #: "zstd": offer compressed OPS frames at the handshake (used when the target
    #: accepts; a frame is sent compressed only when that makes it smaller).
    compression: Literal["none", "zstd"] = "none"

    @field_validator("compression")
    @classmethod
    def _zstd_installed(cls, value: str) -> str:
        if value == "zstd" and not zstd_available():
            raise ValueError('"zstd" needs the zstandard package (the mirrorline[zstd] extra)')
        return value

    @field_validator("bandwidth")
    @classmethod
    def _bandwidth(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> ConnectionConfig:
        require_tls_files(self)
        return self

    @field_validator("target")
    @classmethod
    def _host_port(cls, value: str) -> str:
        parse_host_port(value)
        return value


class QueueConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    memory: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    disk: int = Field(default=8 * 1024 * 1024 * 1024, ge=16 * 1024 * 1024)
    segment_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    #: How often the journal is fsynced when no application asks (seconds).
    sync_interval: float = Field(default=1.0, gt=0)


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    state_dir: str
    control_socket: str = "/run/mirrorline/source.sock"
    task_dir: str | None = None
    log_level: str = "info"
    control_uids: list[int] = []
    control_gids: list[int] = []
    batch_bytes: int = Field(default=1024 * 1024, ge=4096)
    window_bytes: int = Field(default=16 * 1024 * 1024, ge=65536)
    queue: QueueConfig = QueueConfig()
    #: Mirror run automatically when a connection that needs one comes up.
    mirror_on_connect: Literal["different", "checksum", "full", "none"] = "checksum"
    #: "host:port" to serve Prometheus metrics at GET /metrics (plain HTTP); off if unset.
    metrics: str | None = None
    volume: list[VolumeConfig] = Field(min_length=1)
    connection: list[ConnectionConfig] = []

    @field_validator("metrics")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @model_validator(mode="after")
    def _references(self) -> SourceConfig:
        names = [v.name for v in self.volume]
        if len(set(names)) != len(names):
            raise ValueError("volume names must be unique")
        if len(self.volume) > 1:
            raise ValueError("one volume per source agent process (pyfuse3 serves one mount "
                             "per process): run one agent, with its own config, per volume")
        ids = [c.id for c in self.connection]
        if len(set(ids)) != len(ids):
            raise ValueError("connection ids must be unique")
        for c in self.connection:
            if c.volume not in names:
                raise ValueError(f"connection {c.id} names unknown volume {c.volume!r}")
        return self


def load_source_config(path: str) -> SourceConfig:
    """Load and validate a source config file (raises ConfigError)."""
    return load_toml_model(path, SourceConfig)
