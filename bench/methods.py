"""How each figure is measured: the Methods section of RESULTS.md."""

from __future__ import annotations

METHODS = """\
## Methods

All data lives in one temp dir on the same file system (the work dir named in each
section; `--workdir` moves it), generated fresh for each bench: incompressible blocks cut
from one random pool, each prefixed with a tag and its index. Mirrorline runs as real
processes started by the system-test harness (`tests/system/harness.py`: a target and a
source agent on loopback TCP, the real FUSE mount over the volume), at log level `info`
as deployed. Peers run in the same bench on the same data: lsyncd 2 with
`default.rsync`, `delay = 0`, to a local target dir (its rsync is `-lts --delete -r`,
whole-file copies since the target is local), and an rsync daemon on 127.0.0.1.
Every timed figure is the median of the runs listed in the details; `os.sync()` runs
before each timed region so one run's writeback does not land in the next. After each
timed region, outside the timing, the copy is compared with its source byte for byte
(names, types, sizes, content); a copy that differs makes the bench fail.

"Until the replica is identical / durable" for Mirrorline is the return of
`wait queue 1`, which answers when the target has made durable (fsynced and
checkpointed) every op captured before the call. Inside timed regions that request is
sent from the bench process with the CLI's own grammar and socket client: the very
request `mirrorline wait queue 1` sends, without starting a Python process (about
0.2 s, shown under W9). For lsyncd, "identical" is the first moment a 2 ms (W1) or
5 ms (W5) poll sees the copy's size and mtime equal the source's (rsync sets them on
its temp file before the rename, so a match is a finished file); the content compare
follows outside the timing, and polling resumes if it failed. lsyncd's figures have no
fsync: it never makes the copy durable.

- **W1**: a file of the stated size is written (through the mount, or into lsyncd's
  source) and replicated before timing. Timed: from the return of `fsync` after the
  random 4 KiB `pwrite`s (same offsets and data for both) until identical. The file is
  closed right after the fsync, since lsyncd only acts on close-write. lsyncd's runs
  start 1.1 s apart: its rsync's quick check compares mtimes to the whole second, so a
  same-size rewrite within the second of the previous sync is silently never copied
  (this bench hit it before the pause was added: a stale replica, forever). That is a
  correctness gap of the peer as deployed by default, not a speed figure.
- **W2**: a writer appends 64 KiB blocks at the stated rate on an absolute schedule
  (one `open(O_APPEND)`, `write`, `close` per block, so lsyncd sees each one; the same
  pattern on Mirrorline) and notes CLOCK_MONOTONIC when each `write()` returns. A
  separate probe process (`bench/probe.py`) reopens the copy every 1 ms and notes when
  each block's header becomes readable there. Lag = seen - returned, per block; p50 and
  p99 (nearest rank) over all blocks of a run, median over runs. "Visible on target" is
  the applied state (page cache of the replica), not the durable checkpoint. Resolution
  is the 1 ms poll; the probe competes for the same 2 cores. A writer that falls
  behind its schedule says so in the details.
- **W3**: timed from the first write of the stated size in 1 MiB `write`s, through
  `fsync` and `close`, until `wait queue` returns (source and target both durable). Peer:
  the same writes + `fsync` to a plain file, then `shutil.copyfile` to a second file on
  the same disk + `fsync`. Figures are MB/s (10^6 bytes); the details also give the rate
  of the application's writes alone.
- **W4**: writes per second of sequential 4 KiB `write`s (no fsync) to a new file:
  through the mount with replication running, through the mount after
  `replication stop 1` (ops are still journaled), and on the plain disk. "Adds" is
  stopped/replicating - 1, the extra time per write.
- **W5**: timed from creating the directory and its first file (0.5-8 KiB each, sizes
  from a seeded generator, same for both) until identical, so it includes the time the
  application spends creating the files through the mount.
- **W6**: a tree (log-normal sizes, 100 files per directory) is copied into the
  source volume before the agent mounts it, so the replica starts empty. Timed:
  `mirror start 1 full --wait` then `wait queue 1`; between runs the target is
  stopped, its replica emptied and restarted. Peer: `rsync -a tree/
  rsync://127.0.0.1:PORT/mod/` into an empty module. rsync does not fsync.
- **W7**: right after W6, nothing changed: `mirror start 1 different --wait` and
  `checksum --wait` (+ `wait queue 1`) against `rsync -a` and `rsync -a --checksum`
  into the already identical module.
- **W8**: the target is stopped (SIGTERM), the stated size is written through the
  mount in 1 MiB writes + fsync, the target is started; timed from the target being
  ready (its control socket answers) until `wait queue 1` returns, which includes the
  source's reconnect (its backoff is at most 5 s; the details give it). Catch-up MB/s is
  compared with Mirrorline's own W3 rate in the same bench. Peak RSS is `VmHWM` of the
  source agent process (`/proc/PID/status`) after the catch-up, over the agent's life
  (a fresh source agent is started for W8).
- **W9**: on an idle connection (0.3 s without traffic before each call), the round
  trip of `mirrorline queuetask 1 noop --wait` where `noop` is `exit 0` in both agents'
  `tasks.d`: as the wall time of the real CLI process, and over the control socket from
  the bench process. The difference between `mirrorline status` as a process and over
  the socket gives the CLI's start-up cost.

`make bench-quick` runs the same workloads at smaller sizes with fewer runs: its ratios
are indicative only; the goals are stated for the full sizes. `python bench/run.py
--smoke` runs each workload once at tiny sizes to prove the harness works (it fails when a
workload crashes or a copy does not converge), and never writes this file.
"""
