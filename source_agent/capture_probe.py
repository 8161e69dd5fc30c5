"""A tiny process that mounts :class:`~source_agent.capture.CaptureFS` for tests.

    python -m source_agent.capture_probe DIRECTORY LOGFILE

Opens DIRECTORY, mounts the capture file system over it and appends one msgpack
array per event to LOGFILE, flushed at once so a reader sees every event:

* ``["op", seq, op.to_wire()]`` for each recorded op (seq from 1, gap-free);
* ``["sync", seq]`` for each journal sync an fsync asked for.

pyfuse3 serves one mount per process, which is why tests run this in a child.
SIGTERM or SIGINT unmounts and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import BinaryIO

import msgpack
import trio

from protocol.ops import Op
from source_agent.capture import serve_mount


class LogRecorder:
    """A Recorder that numbers ops and appends them to a msgpack log file."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.seq = 0

    def record(self, op: Op) -> int:
        self.seq += 1
        self._stream.write(msgpack.packb(["op", self.seq, op.to_wire()]))
        self._stream.flush()
        return self.seq

    async def sync(self, seq: int) -> None:
        self._stream.write(msgpack.packb(["sync", seq]))
        self._stream.flush()
        os.fsync(self._stream.fileno())


async def run(directory: str, backing_fd: int, recorder: LogRecorder) -> None:
    """Serve the mount over ``directory`` until SIGTERM/SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_mount, directory, backing_fd, recorder)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m source_agent.capture_probe DIRECTORY LOGFILE", file=sys.stderr)
        return 2
    directory, log_path = args
    # Opened before the mount covers the directory (DESIGN §3).
    backing_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with open(log_path, "ab") as stream:
            trio.run(run, directory, backing_fd, LogRecorder(stream))
    finally:
        os.close(backing_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
