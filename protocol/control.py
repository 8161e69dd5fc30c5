"""Control-socket messages between the CLI and an agent (JSON lines over a Unix socket).

The client sends one request line and reads response lines until a ``result``::

    → {"command": "replication_start", "args": {"conid": "*", "clear_restore_required": false}}
    ← {"type": "progress", "message": "...", ...}          (zero or more)
    ← {"type": "result", "ok": false, "exit": 1, "message": "restore required …",
       "data": {...}}

``exit`` is the CLI's exit code for the command (see :class:`Exit`). ``conid`` is an
integer or the string ``"*"`` (every connection). Bytes never appear here: paths in
control messages are ``str`` decoded with ``surrogateescape``.

Commands (agent that serves it in brackets):

    status            {conid?}                                  [both]
    replication_start {conid, clear_restore_required}           [source]
    replication_stop  {conid}                                   [source]
    connect           {volume, target, target_path, key_file?}  [source] data: {"id"}
    disconnect        {conid}                                   [source]
    wait_queue        {conid, timeout?}                         [source] exit 4 on timeout
    failover          {source, conid}                           [target]
"""

from __future__ import annotations

import enum
import json
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, ValidationError

MAX_LINE: Final = 1024 * 1024


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    TIMEOUT = 4


class ControlError(Exception):
    """A control line that is not valid JSON or not a valid request/response."""


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str
    args: dict[str, Any] = {}


class Result(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "result"
    ok: bool
    exit: int
    message: str = ""
    data: dict[str, Any] = {}


def encode(message: BaseModel | dict[str, Any]) -> bytes:
    """One JSON line, newline included."""
    body = message.model_dump() if isinstance(message, BaseModel) else message
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes) -> Request:
    """Parse one request line.

    Raises:
        ControlError: not JSON, or not a request object.
    """
    try:
        return Request.model_validate(json.loads(line))
    except (ValueError, ValidationError) as exc:
        raise ControlError(f"bad control request: {exc}") from exc


def decode_response(line: bytes) -> dict[str, Any]:
    """Parse one response line (progress or result)."""
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise ControlError(f"bad control response: {exc}") from exc
    if not isinstance(value, dict) or "type" not in value:
        raise ControlError("bad control response: not an object with a 'type'")
    return value


def ok(message: str = "", **data: Any) -> Result:
    return Result(ok=True, exit=Exit.OK, message=message, data=data)


def failed(message: str, exit: Exit = Exit.FAILED, **data: Any) -> Result:
    return Result(ok=False, exit=exit, message=message, data=data)
