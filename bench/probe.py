"""W2 lag probe: watch a replica file and note when each block becomes visible.

Runs as its own process (``python bench/probe.py PATH BLOCKS BLOCK_SIZE TAG_HEX OUT
TIMEOUT``) so it never competes with the writer for the GIL. Block ``i`` is visible
when the 16-byte header at ``i * BLOCK_SIZE`` reads (tag, i) (see ``data.Pool.block``);
the probe writes the CLOCK_MONOTONIC time it first saw each block (``null`` for a
block never seen) as JSON to OUT. CLOCK_MONOTONIC is system-wide, so these times
compare directly with the writer's.

The file is reopened on every poll: an rsync-based peer replaces it by rename.
Polls are 1 ms apart, which bounds the probe's own error.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time

HEADER = struct.Struct("<8sQ")
POLL_INTERVAL = 0.001


def watch(path: str, blocks: int, block_size: int, tag: bytes, timeout: float,
          ) -> list[float | None]:
    seen: list[float | None] = [None] * blocks
    nxt = 0
    deadline = time.monotonic() + timeout
    while nxt < blocks and time.monotonic() < deadline:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            time.sleep(POLL_INTERVAL)
            continue
        try:
            while nxt < blocks:
                head = os.pread(fd, HEADER.size, nxt * block_size)
                if head != HEADER.pack(tag, nxt):
                    break
                seen[nxt] = time.monotonic()
                nxt += 1
        finally:
            os.close(fd)
        if nxt < blocks:
            time.sleep(POLL_INTERVAL)
    return seen


def main(argv: list[str]) -> int:
    path, blocks, block_size, tag_hex, out, timeout = argv
    seen = watch(path, int(blocks), int(block_size), bytes.fromhex(tag_hex), float(timeout))
    with open(out, "w") as f:
        json.dump(seen, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
