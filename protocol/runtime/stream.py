"""Frame stream adapter: a :class:`protocol.session.Session` over a ``trio.abc.Stream``.

One reader (whoever calls :meth:`FrameStream.receive`) and any number of senders,
serialised by one ``trio.Lock`` (the trio-websocket shape). OS and trio errors are
translated here, once, into :class:`LinkError` (temporary: reconnect with backoff).
"""

from __future__ import annotations

from collections import deque

import trio

from protocol.errors import ProtocolError
from protocol.frames import Frame
from protocol.session import Session

RECEIVE_CHUNK = 256 * 1024


class LinkError(Exception):
    """The TCP link broke or closed; the session is over, a new one may be tried."""


class FrameStream:
    """Frames in and out of one stream.

    Args:
        stream: the byte stream (TCP, TLS, or a memory stream in tests).
        session: the sans-IO state machine for this end.
    """

    def __init__(self, stream: trio.abc.Stream, session: Session) -> None:
        self.stream = stream
        self.session = session
        self._send_lock = trio.Lock()
        self._pending: deque[Frame] = deque()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send_bytes(self, data: bytes) -> None:
        """Send already-encoded bytes under the send lock.

        Raises:
            LinkError: the link is broken or closed.
        """
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise LinkError(f"send failed: {exc}") from exc
            self.bytes_sent += len(data)

    async def send(self, frame: Frame) -> None:
        """Encode ``frame`` through the session (state checks) and send it."""
        await self.send_bytes(self.session.send(frame))

    async def receive(self) -> Frame:
        """The next frame from the peer.

        Raises:
            ProtocolError: the peer sent something invalid (send ERROR, then close).
            LinkError: end of stream or a broken link.
        """
        while not self._pending:
            try:
                data = await self.stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise LinkError(f"receive failed: {exc}") from exc
            if not data:
                raise LinkError("peer closed the connection")
            self.bytes_received += len(data)
            self._pending.extend(self.session.receive_data(bytes(data)))
        return self._pending.popleft()

    async def fail(self, exc: ProtocolError) -> None:
        """Tell the peer why we are closing (best effort, bounded), then close."""
        with trio.move_on_after(2):
            try:
                await self.send_bytes(self.session.error_frame(exc))
            except LinkError:
                pass
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)
