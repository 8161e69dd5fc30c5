"""Every process, cluster and mount the bench starts, so one cleanup stops them all.

Peers (lsyncd, the rsync daemon) run in their own process group, so stopping one
also stops the rsync children it forked; the group id is the pid we started, never a
name. Mirrorline agents belong to the system-test harness's ``Cluster``, whose
``close`` stops them and unmounts their volumes; whatever FUSE mount is still left
under the work dir afterwards is unmounted here.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Protocol


class Closable(Protocol):
    def close(self) -> None: ...


class Processes:
    """A registry of what the bench started under one work dir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[subprocess.Popen[bytes]] = []
        self._closables: list[Closable] = []

    def spawn(self, argv: Sequence[str], log: Path, cwd: Path | None = None,
              ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new process group, output appended to ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=cwd,
                                    start_new_session=True)
        self._procs.append(proc)
        return proc

    def spawn_piped(self, argv: Sequence[str], stderr: IO[bytes] | int | None = None,
                    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new process group (no output redirection but stderr)."""
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM the process group of ``proc``, SIGKILL it after ``timeout``."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # children that outlived the leader (an rsync lsyncd forked) share its group
        _signal_group(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)

    def adopt(self, thing: Closable) -> None:
        """Close ``thing`` (a harness Cluster) at cleanup, before the mount sweep."""
        self._closables.append(thing)

    def release(self, thing: Closable) -> None:
        thing.close()
        if thing in self._closables:
            self._closables.remove(thing)

    def close(self) -> list[str]:
        """Stop everything still running; return what had to be cleaned by force."""
        problems: list[str] = []
        for proc in reversed(list(self._procs)):
            self.stop(proc)
        for thing in reversed(list(self._closables)):
            try:
                self.release(thing)
            except Exception as exc:  # cleanup goes on whatever one part says
                problems.append(f"closing {thing!r}: {exc}")
        for mount in mounts_under(self.workdir):
            subprocess.run(["fusermount3", "-u", "-z", mount], capture_output=True)
            problems.append(f"unmounted a leftover FUSE mount: {mount}")
        return problems


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = line.split(b" ")[4].replace(b"\\040", b" ").decode(errors="replace")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found
