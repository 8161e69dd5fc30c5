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

# The CLI imports this module, and its start-up time is part of every scripted
# command's latency (issue 5, W9: a round trip in <= 100 ms). So: no pydantic (~0.3 s
# to import), no dataclasses (it imports inspect and ast) and no typing at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

MAX_LINE: Final = 1024 * 1024


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    TIMEOUT = 4


class ControlError(Exception):
    """A control line that is not valid JSON or not a valid request/response."""


class _Message:
    """Equality, repr and JSON from ``_fields``, as a dataclass would give (see the imports)."""

    _fields: tuple[str, ...] = ()
    __hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass with eq

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._fields)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"

    def to_json(self) -> dict[str, Any]:
        """The message as the JSON object that goes on the wire."""
        return {name: getattr(self, name) for name in self._fields}


class Request(_Message):
    _fields = ("command", "args")

    def __init__(self, command: str, args: dict[str, Any] | None = None) -> None:
        self.command = command
        self.args: dict[str, Any] = {} if args is None else args

    @classmethod
    def from_json(cls, value: Any) -> Request:
        """Check the shape of a decoded request object.

        Raises:
            ControlError: not an object with a string ``command`` and an object ``args``.
        """
        if not isinstance(value, dict) or set(value) - {"command", "args"}:
            raise ControlError("bad control request: expected {\"command\", \"args\"}")
        command, args = value.get("command"), value.get("args", {})
        if not isinstance(command, str) or not isinstance(args, dict):
            raise ControlError("bad control request: command must be a string, args an object")
        return cls(command, args)


class Result(_Message):
    _fields = ("ok", "exit", "message", "data", "type")

    def __init__(self, ok: bool, exit: int, message: str = "",
                 data: dict[str, Any] | None = None, type: str = "result") -> None:
        self.ok = ok
        self.exit = exit
        self.message = message
        self.data: dict[str, Any] = {} if data is None else data
        self.type = type

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Result:
        """Check the shape of a decoded result line.

        Raises:
            ControlError: a field is missing or of the wrong type.
        """
        ok_, exit_ = value.get("ok"), value.get("exit")
        message, data = value.get("message", ""), value.get("data", {})
        if (not isinstance(ok_, bool) or not isinstance(exit_, int) or isinstance(exit_, bool)
                or not isinstance(message, str) or not isinstance(data, dict)):
            raise ControlError("bad control result: needs ok (bool), exit (int), "
                               "message (str), data (object)")
        return cls(ok_, exit_, message, data)


def encode(message: Request | Result | dict[str, Any]) -> bytes:
    """One JSON line, newline included."""
    body = message if isinstance(message, dict) else message.to_json()
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes) -> Request:
    """Parse one request line.

    Raises:
        ControlError: not JSON, or not a request object.
    """
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise ControlError(f"bad control request: {exc}") from exc
    return Request.from_json(value)


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
