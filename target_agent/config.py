"""Target agent configuration (TOML), validated with pydantic."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.config_util import load_toml_model, parse_host_port, require_tls_files


class SourceEntry(BaseModel):
    """A source node allowed to replicate here, its key, and the root it is granted."""

    model_config = ConfigDict(extra="forbid")
    node: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    key_file: str
    root: str

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value.rstrip("/") or "/"


class TargetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    listen: str = "127.0.0.1:7100"
    state_dir: str
    control_socket: str = "/run/mirrorline/target.sock"
    task_dir: str | None = None
    log_level: str = "info"
    control_uids: list[int] = []
    control_gids: list[int] = []
    #: Checkpoint (fsync + persist applied seq) at least this often while ops flow.
    checkpoint_interval: float = Field(default=0.25, gt=0)
    #: ... or after this many bytes of ops were applied since the last one.
    checkpoint_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    #: "host:port" to serve Prometheus metrics at GET /metrics (plain HTTP); off if unset.
    metrics: str | None = None
    source: list[SourceEntry] = []
    #: TLS on the listener: this side presents tls_cert/tls_key and requires every
    #: source to present a certificate signed by tls_ca (verified peers), then the key
    #: handshake runs inside.
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @field_validator("listen", "metrics")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @model_validator(mode="after")
    def _unique(self) -> TargetConfig:
        nodes = [s.node for s in self.source]
        if len(set(nodes)) != len(nodes):
            raise ValueError("source node names must be unique")
        require_tls_files(self)
        return self


def load_target_config(path: str) -> TargetConfig:
    """Load and validate a target config file (raises ConfigError)."""
    return load_toml_model(path, TargetConfig)
