"""Real daemons as processes, real loopback TCP, real FUSE mounts, for system tests.

Nothing here is a stand-in: a :class:`Cluster` writes TOML configs and key files
into a temp dir, starts ``mirrorline-source`` / ``mirrorline-target`` as child
processes, drives them with the real CLI, and compares trees byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def is_mounted(path: str | Path) -> bool:
    target = os.path.realpath(path).encode()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mount_point = line.split(b" ")[4].replace(b"\\040", b" ")
            if mount_point == target:
                return True
    return False


def abort_fuse(path: str | Path) -> None:
    """Abort the FUSE connection mounted at ``path`` (found through mountinfo)."""
    control = "/sys/fs/fuse/connections"
    if os.path.isdir(control) and not os.path.ismount(control):
        subprocess.run(["mount", "-t", "fusectl", "none", control], capture_output=True)
    target = os.path.realpath(path).encode()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if fields[4].replace(b"\\040", b" ") == target and b"fuse" in line:
                minor = fields[2].split(b":")[1].decode()
                try:
                    Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
                except OSError:
                    pass


@dataclass
class Agent:
    """One daemon process and its config."""

    kind: str                       # "source" or "target"
    config_path: Path
    socket_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self, wait: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / f"mirrorline-{self.kind}"), "--config", str(self.config_path),
             "--log-level", "debug"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            wait_until(self._ready, 30, what=f"{self.kind} agent to be ready "
                                              f"(log: {self.log_path})")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} agent exited with {self.proc.returncode}:\n"
                                 + self.log_path.read_text(errors="replace")[-4000:])
        if not self.socket_path.exists():
            return False
        result = self.cli("status", check=False)
        return result.returncode == 0 and (self.kind != "source" or all(
            v.get("ready", v["mounted"]) for v in json.loads(result.stdout)["data"]["volumes"]))

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait (clean shutdown)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        return rc

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        assert self.proc is not None
        self.proc.kill()
        if self.kind == "source":
            # A thread of the dying agent may be inside a request to its own mount (a
            # restore writes through it), which no one will answer: abort the FUSE
            # connection, as an operator (or the unit's ExecStopPost) would, then unmount.
            for vol in self.extra.get("volumes", []):
                abort_fuse(vol)
        self.proc.wait(10)
        if self.kind == "source":
            for vol in self.extra.get("volumes", []):
                subprocess.run(["fusermount3", "-u", "-z", vol], capture_output=True)

    def cli(self, *args: str, check: bool = True, timeout: float = 60,
            json_output: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / "mirrorline"), "--socket", str(self.socket_path)]
        if json_output:
            cmd.append("--json")
        result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"mirrorline {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status").stdout)["data"]  # type: ignore[no-any-return]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    """Sources and targets on this host, in one temp dir."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.agents: list[Agent] = []
        (base / "keys").mkdir(parents=True, exist_ok=True)

    def key(self, name: str) -> Path:
        path = self.base / "keys" / f"{name}.key"
        if not path.exists():
            path.write_text(os.urandom(32).hex() + "\n")
            path.chmod(0o600)
        return path

    def target(self, node: str = "tgt1", sources: list[str] | None = None,
               port: int | None = None, extra: str = "") -> Agent:
        d = self.base / node
        d.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        lines = [f'node = "{node}"', f'listen = "127.0.0.1:{port}"',
                 f'state_dir = "{d}/state"', f'control_socket = "{d}/target.sock"',
                 f'task_dir = "{d}/tasks.d"', extra]
        for src in sources or ["src1"]:
            lines += ["[[source]]", f'node = "{src}"', f'key_file = "{self.key(src)}"',
                      f'root = "{d}/replica/{src}"']
        cfg = d / "target.toml"
        cfg.write_text("\n".join(lines) + "\n")
        agent = Agent("target", cfg, d / "target.sock", d / "target.log",
                      extra={"port": port, "root": d / "replica"})
        self.agents.append(agent)
        return agent

    def source(self, node: str, volume: Path, connections: list[tuple[int, Agent, str]],
               extra: str = "", key_name: str | None = None,
               via: dict[int, str] | None = None, volume_extra: str = "") -> Agent:
        """A source protecting ``volume`` with (conid, target agent, target_path) connections.

        ``volume_extra``: more keys of the ``[[volume]]`` table (``mode = "watch"`` …).

        ``via``: conid → "host:port" to dial instead of the target's listen address
        (a chaos proxy in front of it, see tests/faults/proxy.py).
        """
        d = self.base / node
        d.mkdir(parents=True, exist_ok=True)
        volume.mkdir(parents=True, exist_ok=True)
        lines = [f'node = "{node}"', f'state_dir = "{d}/state"',
                 f'control_socket = "{d}/source.sock"', f'task_dir = "{d}/tasks.d"', extra,
                 "[[volume]]", 'name = "data"', f'path = "{volume}"', volume_extra]
        for conid, target, tpath in connections:
            address = (via or {}).get(conid, f"127.0.0.1:{target.extra['port']}")
            lines += ["[[connection]]", f"id = {conid}", 'volume = "data"',
                      f'target = "{address}"',
                      f'target_path = "{tpath}"', f'key_file = "{self.key(key_name or node)}"']
        cfg = d / "source.toml"
        cfg.write_text("\n".join(lines) + "\n")
        agent = Agent("source", cfg, d / "source.sock", d / "source.log",
                      extra={"volumes": [str(volume)]})
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        for agent in reversed(self.agents):
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
                try:
                    agent.proc.wait(20)
                except subprocess.TimeoutExpired:
                    agent.proc.kill()
                    agent.proc.wait(5)
            for vol in agent.extra.get("volumes", []):
                if is_mounted(vol):
                    subprocess.run(["fusermount3", "-u", "-z", vol], capture_output=True)


def replica_of(target: Agent, source_node: str, target_path: str) -> Path:
    return Path(target.extra["root"]) / source_node / target_path


def wait_synced(source: Agent, conid: int | str = "*", timeout: float = 60) -> None:
    """`mirrorline wait queue` until the target has everything captured so far."""
    source.cli("wait", "queue", str(conid), "--timeout", str(timeout), timeout=timeout + 10)


# -- tree comparison --------------------------------------------------------------------

def snapshot_tree(root: Path, *, mtimes: bool = True,
                  links: bool = True) -> dict[bytes, tuple[Any, ...]]:
    """Everything the replica must reproduce, keyed by relative path (bytes).

    Per entry: type, mode bits, uid, gid, content (files), target (symlinks),
    file mtime ns, user xattrs, and the hardlink group (the sorted names sharing
    its inode), so two trees compare equal only if all of it matches.
    """
    out: dict[bytes, tuple[Any, ...]] = {}
    inodes: dict[int, list[bytes]] = {}
    broot = os.fsencode(root)
    entries: list[tuple[bytes, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            entries.append((full, os.lstat(full)))
    for full, st in entries:
        rel = os.path.relpath(full, broot)
        kind = stat.S_IFMT(st.st_mode)
        detail: Any = None
        if stat.S_ISREG(kind):
            with open(full, "rb") as f:
                detail = f.read()
            if st.st_nlink > 1 and links:
                inodes.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(kind):
            detail = os.readlink(full)
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if not stat.S_ISLNK(kind):
            names = sorted(n for n in os.listxattr(full) if n.startswith("user."))
            xattrs = tuple((n, os.getxattr(full, n)) for n in names)
        mtime = st.st_mtime_ns if (mtimes and not stat.S_ISDIR(kind)) else None
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, detail, mtime,
                    xattrs)
    for names in inodes.values():
        group = tuple(sorted(names))
        for name in names:
            out[name] = (*out[name], group)
    return out


def diff_trees(a: Path, b: Path, *, mtimes: bool = True, links: bool = True) -> list[str]:
    """Human-readable differences between two trees (empty when identical); without
    ``links``, which names share an inode is not compared."""
    sa = snapshot_tree(a, mtimes=mtimes, links=links)
    sb = snapshot_tree(b, mtimes=mtimes, links=links)
    problems = []
    for path in sorted(set(sa) | set(sb)):
        if path not in sa:
            problems.append(f"only in replica: {path!r}")
        elif path not in sb:
            problems.append(f"missing from replica: {path!r}")
        elif sa[path] != sb[path]:
            fields = ["type", "mode", "uid", "gid", "content", "mtime", "xattrs", "links"]
            bad = [f for f, x, y in zip(fields, sa[path], sb[path], strict=False) if x != y]
            if len(sa[path]) != len(sb[path]):
                bad.append("links")
            problems.append(f"differs: {path!r}: {', '.join(bad)}")
    return problems
