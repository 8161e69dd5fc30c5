"""The Mirrorline side: a real target and source agent, started by the system-test harness.

:class:`Replicator` builds on ``tests.system.harness.Cluster`` (configs and keys in a
temp dir, the daemons as child processes, the real FUSE mount). Two things differ
from the tests:

- The agents log at ``info``, as deployed: the harness starts them with
  ``--log-level debug``, so :func:`use_log_level` points the harness at a directory of
  wrappers that exec the real console scripts with the level replaced (``exec``
  keeps the pid, so ``Agent.proc.pid`` is still the agent's Python process).
- Commands inside a timed region (``wait queue``, ``mirror start --wait``) are sent
  from this process with the CLI's own grammar and socket client
  (:meth:`Replicator.control`): the same request the ``mirrorline`` command sends,
  without the ~0.2 s of starting a Python process, which is not replication time.
  W9 measures the real CLI process as well, and the report gives the CLI's start-up
  cost.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.procs import Processes
from cli.client import exchange
from cli.grammar import Remote as RemoteCommand
from cli.grammar import parse_command
from tests.system import harness
from tests.system.harness import Agent, Cluster, replica_of

NOOP_TASK = "#!/bin/sh\nexit 0\n"
REAL_BIN = harness.BIN


class ControlFailedError(Exception):
    """An agent answered a control request with a failure."""

    def __init__(self, words: tuple[str, ...], result: dict[str, Any]) -> None:
        super().__init__(f"mirrorline {' '.join(words)}: exit {result.get('exit')}: "
                         f"{result.get('message')}")
        self.result = result


def use_log_level(workdir: Path, level: str) -> None:
    """Make the harness start agents at ``level`` (see the module docstring)."""
    wrappers = workdir / "bin"
    wrappers.mkdir(parents=True, exist_ok=True)
    for kind in ("source", "target"):
        script = wrappers / f"mirrorline-{kind}"
        script.write_text(
            "#!/bin/sh\n"
            "# the bench's log level instead of the harness's --log-level debug\n"
            f'for a do shift; [ "$a" = debug ] && a={level}; set -- "$@" "$a"; done\n'
            f'exec "{REAL_BIN}/mirrorline-{kind}" "$@"\n')
        script.chmod(0o755)
    cli = wrappers / "mirrorline"
    if not cli.exists():
        cli.symlink_to(REAL_BIN / "mirrorline")
    harness.BIN = wrappers


def agents_installed() -> str | None:
    """Why the agents cannot be started from this interpreter, or None."""
    for name in ("mirrorline", "mirrorline-source", "mirrorline-target"):
        if not (REAL_BIN / name).exists():
            return (f"{REAL_BIN / name} not found: run the bench with the project's venv "
                    f"python (.venv/bin/python bench/run.py, or make bench)")
    return None


def control(agent: Agent, *words: str, timeout: float | None = None) -> dict[str, Any]:
    """Send one command to ``agent`` from this process; return its result dict.

    Raises:
        cli.grammar.UsageError: the words are not a command the CLI knows.
        cli.client.ClientError: no result (daemon unreachable, timed out).
    """
    command = parse_command(list(words))
    assert isinstance(command, RemoteCommand), words
    result: dict[str, Any] = {}
    for response in exchange(str(agent.socket_path), command.request, timeout=timeout):
        if response.get("type") == "result":
            result = response
    return result


def check(agent: Agent, *words: str, timeout: float | None = None) -> dict[str, Any]:
    """:func:`control`, raising :class:`ControlFailedError` unless the result is ok."""
    result = control(agent, *words, timeout=timeout)
    if not result.get("ok"):
        raise ControlFailedError(words, result)
    return result


class Replicator:
    """One target and one source agent replicating ``volume`` over connection 1."""

    def __init__(self, procs: Processes, base: Path, source_extra: str = "") -> None:
        self.procs = procs
        self.base = base
        self.cluster = Cluster(base)
        procs.adopt(self.cluster)
        self.volume = base / "vol"
        self.target = self.cluster.target("tgt1")
        self.source = self.cluster.source("src1", self.volume, [(1, self.target, "data")],
                                          extra=source_extra)
        for agent in (self.target, self.source):
            _install_noop(agent)

    @property
    def replica(self) -> Path:
        return replica_of(self.target, "src1", "data")

    def start(self) -> None:
        self.target.start()
        self.source.start()
        self.wait_connected()

    def wait_connected(self, timeout: float = 60.0) -> float:
        """Wait until connection 1 is replicating; return when (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = check(self.source, "status").get("data", {})
            conns = status.get("connections", [])
            if conns and all(c.get("state") == "replicating" for c in conns):
                return time.monotonic()
            time.sleep(0.02)
        raise TimeoutError(f"connection 1 not replicating after {timeout} s "
                           f"(source log: {self.source.log_path})")

    def wait_synced(self, timeout: float = 3600.0) -> None:
        """Return once the target holds durably every op captured before the call."""
        check(self.source, "wait", "queue", "1", "--timeout", f"{timeout:g}",
              timeout=timeout + 10)

    def source_pid(self) -> int:
        assert self.source.proc is not None
        return self.source.proc.pid

    def close(self) -> None:
        self.procs.release(self.cluster)


def _install_noop(agent: Agent) -> None:
    tasks = agent.config_path.parent / "tasks.d"
    tasks.mkdir(parents=True, exist_ok=True)
    noop = tasks / "noop"
    noop.write_text(NOOP_TASK)
    noop.chmod(0o755)


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of ``pid`` in KiB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


def cli_seconds(agent: Agent, *words: str, timeout: float = 120.0,
                ) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run the real ``mirrorline`` command against ``agent``; return (wall seconds, result).

    Python may write its bytecode cache, as in an installed venv (pip compiles there):
    a PYTHONDONTWRITEBYTECODE in the developer's environment would make every start
    recompile the CLI, which no deployed CLI does.
    """
    cmd = [str(REAL_BIN / "mirrorline"), "--socket", str(agent.socket_path), "--json", *words]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0, done
