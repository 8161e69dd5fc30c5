"""Watch-mode figures: index scan, restart by stat, changed-block detection.

    .venv/bin/python bench/watch.py [--files 10000] [--big-mib 1024] [--backend auto]

Runs the real Watcher over a real directory with a real journal (no agents, no
network: what is measured is the watcher's own work). Prints:

* first start: seconds to index N files of 4 KiB (nothing sent);
* restart after a clean stop: seconds to compare N entries by stat, files read;
* a file of --big-mib MiB already indexed, five 4 KiB writes at random offsets:
  seconds from the last write until the ops are in the journal, data bytes sent
  (a whole-file resend would be the file size).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from source_agent.journal import Journal
from source_agent.volume import Volume
from source_agent.watch import Watcher
from source_agent.watch_index import WatchIndex


async def _run(base: Path, backend: str, work: object) -> Watcher:
    journal = Journal(str(base / "journal"), memory_limit=1 << 26, segment_bytes=1 << 26)
    journal.open()
    volume = Volume("v", str(base / "src"), journal, on_journal_failure=lambda r: None,
                    watch=True)
    volume.backing_fd = os.open(base / "src", os.O_RDONLY | os.O_DIRECTORY)
    watcher = Watcher(volume, WatchIndex(str(base / "index.sqlite")), backend=backend)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.serve)
            await volume.index_ready.wait()
            if callable(work):
                await work(watcher)
            nursery.cancel_scope.cancel()
    finally:
        journal.close()
        watcher.close()
        os.close(volume.backing_fd)
    return watcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirrorline-watch-bench-") as tmp:
        base = Path(tmp)
        src = base / "src"
        (src / "small").mkdir(parents=True)
        for i in range(args.files):
            d = src / "small" / f"d{i // 500}"
            d.mkdir(exist_ok=True)
            (d / f"f{i}").write_bytes(os.urandom(4096))
        started = time.perf_counter()
        first = trio.run(_run, base, args.backend, None)
        print(f"backend: {first.backend.name if first.backend else args.backend}")
        print(f"first start, index {args.files} files of 4 KiB: "
              f"{time.perf_counter() - started:.2f} s ({first.startup})")
        time.sleep(2.1)     # rows older than the racy margin, as on a real restart
        started = time.perf_counter()
        again = trio.run(_run, base, args.backend, None)
        print(f"restart after a clean stop: {time.perf_counter() - started:.2f} s, "
              f"files read {again.stats.files_read} ({again.startup})")

        big = src / "big.db"
        chunk = random.Random(1).randbytes(1 << 20)
        with open(big, "wb") as f:
            for i in range(args.big_mib):
                f.write(chunk[:-8] + i.to_bytes(8, "little"))

        async def change(watcher: Watcher) -> None:
            await watcher.settle()          # the new big file is indexed and sent
            sent_before = watcher.stats.data_bytes_sent
            rng = random.Random(5)
            fd = os.open(big, os.O_WRONLY)
            for _ in range(5):
                os.pwrite(fd, rng.randbytes(4096), rng.randrange(0, (args.big_mib << 20) - 4096))
            os.close(fd)
            t0 = time.perf_counter()
            await watcher.settle()
            print(f"five 4 KiB writes to a {args.big_mib} MiB file: in the journal "
                  f"{time.perf_counter() - t0:.2f} s after the last write, "
                  f"{watcher.stats.data_bytes_sent - sent_before} data bytes sent "
                  f"(whole file: {args.big_mib << 20})")

        trio.run(_run, base, args.backend, change)


if __name__ == "__main__":
    main()
