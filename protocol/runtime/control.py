"""Unix control socket server: one JSON request line in, response lines out.

Every connection is checked with SO_PEERCRED: root, the agent's own uid, and the
uids/gids listed in config are allowed; anyone else gets a refusal and is logged.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from protocol.control import (
    MAX_LINE,
    ControlError,
    Exit,
    Request,
    Result,
    decode_request,
    encode,
    failed,
)

log = structlog.get_logger("control")

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[Request, Emit], Awaitable[Result]]


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


async def serve_control(path: str, handler: Handler, *, allowed_uids: set[int] | None = None,
                        allowed_gids: set[int] | None = None, mode: int = 0o660,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket at ``path`` until cancelled.

    A stale socket file left by a crash is replaced; a live one (another agent
    answering) is an error. Cancellation closes the listener and removes the file.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):  # noqa: ASYNC240 - once, at start-up
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise RuntimeError(f"control socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise RuntimeError(f"control socket {path} is in use by another process")
        finally:
            probe.close()
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Linux creates the socket file with the socket inode's mode minus the umask: set
    # it first, so the file never exists with a wider mode than ``mode``, even for
    # the instant before the chmod (which restores bits a strict umask removed).
    os.fchmod(listener.fileno(), mode)
    await listener.bind(path)
    os.chmod(path, mode)
    listener.listen(64)
    allowed = {0, os.getuid()} | (allowed_uids or set())
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(_serve_one, sock, handler, allowed, allowed_gids or set())
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


async def _serve_one(sock: trio.socket.SocketType, handler: Handler, allowed_uids: set[int],
                     allowed_gids: set[int]) -> None:
    stream = trio.SocketStream(sock)
    try:
        pid, uid, gid = peer_credentials(sock)
        if uid not in allowed_uids and gid not in allowed_gids:
            log.warning("control client refused", pid=pid, uid=uid, gid=gid)
            await stream.send_all(encode(failed(f"uid {uid} may not control this agent")))
            # Closing with its request unread would reset the connection and could drop
            # the refusal before the client reads it: end our side, drain briefly.
            with trio.move_on_after(1):
                await stream.send_eof()
                while await stream.receive_some(65536):
                    pass
            return
        line = await _read_line(stream)
        if line is None:
            return

        async def emit(event: dict[str, Any]) -> None:
            await stream.send_all(encode({"type": "progress", **event}))

        try:
            request = decode_request(line)
        except ControlError as exc:
            result = failed(str(exc), Exit.USAGE)
        else:
            try:
                result = await handler(request, emit)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except Exception as exc:  # a handler bug must not take the agent down
                log.exception("control command failed", command=request.command)
                result = failed(f"internal error in {request.command}: {exc}")
        await stream.send_all(encode(result))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _read_line(stream: trio.SocketStream) -> bytes | None:
    buf = bytearray()
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            await stream.send_all(encode(failed("control request too long", Exit.USAGE)))
            return None
        data = await stream.receive_some(65536)
        if not data:
            return bytes(buf) if buf.strip() else None
        buf += data
    return bytes(buf.split(b"\n", 1)[0])
