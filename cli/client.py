"""Synchronous client for an agent's control socket (JSON lines over a Unix socket).

One connection per command: connect, send the request line, read response lines until
the ``result``. OS errors are translated here, at one boundary, into the three ways a
call can go wrong for the CLI: the daemon cannot be reached (exit 3), the client-side
deadline passed (exit 4), or the daemon answered something that is not the protocol
(exit 1).
"""

from __future__ import annotations

import errno
import os
import socket
import time

from protocol.control import MAX_LINE, ControlError, Exit, Request, decode_response, encode

TYPE_CHECKING = False  # no typing import at run time: start-up time (see cli.grammar)
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from typing import Any, Final

DEFAULT_SOCKET: Final = "/run/mirrorline/source.sock"
CONNECT_TIMEOUT: Final = 10.0
_RECV_SIZE: Final = 65536


class ClientError(Exception):
    """A control call that produced no result; ``exit`` is the CLI's exit code for it."""

    exit: Exit = Exit.FAILED


class UnreachableError(ClientError):
    """No daemon answered on the socket, or it went away before the result (exit 3)."""

    exit = Exit.UNREACHABLE


class TimedOutError(ClientError):
    """The client-side deadline passed before the result arrived (exit 4)."""

    exit = Exit.TIMEOUT


class ResponseError(ClientError):
    """The daemon sent something that is not a control response (exit 1)."""

    exit = Exit.FAILED


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """``$MIRRORLINE_SOCKET`` when set and non-empty, else the source agent's socket."""
    env = os.environ if environ is None else environ
    return env.get("MIRRORLINE_SOCKET") or DEFAULT_SOCKET


def exchange(
    path: str,
    request: Request,
    *,
    timeout: float | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> Iterator[dict[str, Any]]:
    """Send ``request`` to the agent at ``path``; yield each response, the result last.

    Progress events (``{"type": "progress", ...}``) are yielded as they arrive; the
    generator ends after yielding the ``{"type": "result", ...}`` dict. The socket is
    closed when the generator finishes or is closed early.

    Args:
        path: the control socket.
        request: the request to send.
        timeout: seconds from now until the result must have arrived, or None to wait
            indefinitely (only the connect is bounded then).
        connect_timeout: bound on connecting (a daemon that does not accept).

    Raises:
        UnreachableError: no socket, connection refused, permission denied, connect
            timed out, or the daemon closed the connection before the result.
        TimedOutError: ``timeout`` passed first.
        ResponseError: a response line is not valid JSON, not an object with a
            ``type``, or longer than the protocol's line limit.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        _connect(sock, path, deadline, timeout, connect_timeout)
        try:
            sock.settimeout(_remaining(deadline, timeout))
            sock.sendall(encode(request))
        except TimeoutError:
            raise _timed_out(request, timeout) from None
        except OSError as exc:
            raise _lost(path, exc) from exc
        yield from _responses(sock, path, request, deadline, timeout)


def _connect(
    sock: socket.socket,
    path: str,
    deadline: float | None,
    timeout: float | None,
    connect_timeout: float,
) -> None:
    limit = connect_timeout
    if deadline is not None:
        # settimeout(0) would mean non-blocking, not "no time left"
        limit = min(limit, max(deadline - time.monotonic(), 0.001))
    sock.settimeout(limit)
    try:
        sock.connect(path)
    except FileNotFoundError as exc:
        raise _unreachable(path, "no such socket (is the daemon running?)") from exc
    except ConnectionRefusedError as exc:
        raise _unreachable(path, "connection refused (daemon not running?)") from exc
    except PermissionError as exc:
        raise _unreachable(
            path, "permission denied (run as root or as a user the agent allows)"
        ) from exc
    except TimeoutError as exc:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimedOutError(f"timed out after {timeout:g} s connecting to {path}") from exc
        raise _unreachable(
            path, f"the daemon did not accept the connection within {connect_timeout:g} s"
        ) from exc
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.ENOTSOCK:
            reason = "not a socket"
        raise _unreachable(path, reason) from exc


def _responses(
    sock: socket.socket,
    path: str,
    request: Request,
    deadline: float | None,
    timeout: float | None,
) -> Iterator[dict[str, Any]]:
    buffer = bytearray()
    while True:
        while b"\n" in buffer:
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer = bytearray(rest)
            if not line.strip():
                continue
            try:
                response = decode_response(line)
            except ControlError as exc:
                raise ResponseError(f"bad response from the daemon at {path}: {exc}") from exc
            yield response
            if response.get("type") == "result":
                return
        if len(buffer) > MAX_LINE:
            raise ResponseError(f"response line from the daemon at {path} is too long")
        try:
            sock.settimeout(_remaining(deadline, timeout))
            chunk = sock.recv(_RECV_SIZE)
        except TimeoutError:
            raise _timed_out(request, timeout) from None
        except OSError as exc:
            raise _lost(path, exc) from exc
        if not chunk:
            raise _lost(path, None)
        buffer += chunk


def _remaining(deadline: float | None, timeout: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _service_hint(path: str) -> str:
    unit = "mirrorline-target" if "target" in os.path.basename(path) else "mirrorline-source"
    return f"check: systemctl status {unit}"


def _unreachable(path: str, reason: str) -> UnreachableError:
    return UnreachableError(f"cannot reach the mirrorline daemon at {path}: {reason}; "
                            f"{_service_hint(path)}")


def _lost(path: str, exc: OSError | None) -> UnreachableError:
    why = f" ({os.strerror(exc.errno) if exc.errno else exc})" if exc is not None else ""
    return UnreachableError(
        f"the mirrorline daemon at {path} closed the connection before answering{why}; "
        f"the command's outcome is unknown; {_service_hint(path)}"
    )


def _timed_out(request: Request, timeout: float | None) -> TimedOutError:
    after = f" after {timeout:g} s" if timeout is not None else ""
    return TimedOutError(
        f"timed out{after} waiting for {request.command}; "
        "the operation may still be running on the agent"
    )
