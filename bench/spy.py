"""``bench/run.py --profile DIR``: py-spy on the agents while each workload runs.

For every workload, every Mirrorline agent process running during it (found by its
command line under the bench's work dir, rescanned every 0.25 s) is sampled with
``py-spy record --format raw`` at 100 Hz. When the workload ends the raw stacks are
written to ``DIR/<workload>-<agent>-<pid>.txt`` and a summary of the hottest frames
(by total and by self samples) to ``…-top.txt``: the evidence behind the "why" of a
missed goal in bench/RESULTS.md.

py-spy comes from the venv (the ``dev`` extra) or PATH; without it ``--profile`` says
so and the bench runs unprofiled. Sampling costs the agents a few per cent.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

_ACTIVE: Spy | None = None


def active() -> Spy | None:
    """The profiler of this bench run, if ``--profile`` was given."""
    return _ACTIVE


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Spy:
    def __init__(self, out: Path, exe: str) -> None:
        self.out = out
        self.exe = exe
        self.workload = "setup"
        self._procs: dict[int, tuple[str, Path, subprocess.Popen[bytes]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        out.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        global _ACTIVE
        _ACTIVE = self

    def begin(self, workload: str, workdir: Path) -> None:
        """A workload starts: sample every agent under ``workdir`` until :meth:`end`,
        also those started (or restarted) while it runs."""
        self.workload = workload
        self._stop.clear()
        self._scan(workdir)
        self._thread = threading.Thread(target=self._watch, args=(workdir,), daemon=True)
        self._thread.start()

    def _scan(self, workdir: Path) -> None:
        for pid, kind in agent_pids(workdir).items():
            self.attach(kind, pid)

    def _watch(self, workdir: Path) -> None:
        while not self._stop.wait(0.25):
            self._scan(workdir)

    def attach(self, name: str, pid: int) -> None:
        if pid in self._procs:
            return
        raw = self.out / f"{self.workload}-{name}-{pid}.txt"
        proc = subprocess.Popen([self.exe, "record", "--pid", str(pid), "--rate", "100",
                                 "--format", "raw", "--output", str(raw), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._procs[pid] = (name, raw, proc)

    def end(self) -> list[Path]:
        """Stop sampling; write the summaries; return the summary files."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        written = []
        for _pid, (_name, raw, proc) in list(self._procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if raw.exists() and raw.stat().st_size:
                top = raw.with_name(raw.stem + "-top.txt")
                top.write_text(summarize(raw))
                written.append(top)
        self._procs.clear()
        return written


def summarize(raw: Path, limit: int = 40) -> str:
    """The hottest frames of a py-spy raw file, by total and by self samples."""
    total: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        for frame in set(frames):
            total[frame] += n
        if frames:
            own[frames[-1]] += n
    lines = [f"{raw.name}: {samples} samples at 100 Hz", "", "by total (frame and callees):"]
    lines += [f"{100 * n / samples:6.1f}%  {f}" for f, n in total.most_common(limit)]
    lines += ["", "by self:"]
    lines += [f"{100 * n / samples:6.1f}%  {f}" for f, n in own.most_common(limit)]
    return "\n".join(lines) + "\n" if samples else f"{raw.name}: no samples\n"


def agent_pids(base: Path) -> dict[int, str]:
    """Mirrorline agent processes whose command line mentions ``base`` (pid → kind)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if not words or "python" not in os.path.basename(words[0]):
            continue
        text = " ".join(words)
        if str(base) not in text:
            continue
        for kind in ("source", "target"):
            if f"mirrorline-{kind}" in text:
                found[int(entry)] = kind
    return found
