"""The peers Mirrorline is measured against: lsyncd (inotify + rsync) and an rsync daemon.

Both come from Debian packages. :func:`find_peers` looks them up on PATH and, when
allowed and running as root, installs what is missing with apt-get; a peer that is
still missing is reported as such and its columns say "missing".
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Processes

PEER_PACKAGES = {"rsync": "rsync", "lsyncd": "lsyncd"}


class PeerMissingError(Exception):
    """A peer program is not installed (its figures read "missing")."""


@dataclass
class Peers:
    paths: dict[str, str | None]
    messages: list[str] = field(default_factory=list)

    def path(self, name: str) -> str:
        found = self.paths.get(name)
        if found is None:
            raise PeerMissingError(f"{name} is missing")
        return found

    def version(self, name: str) -> str:
        found = self.paths.get(name)
        if found is None:
            return "missing"
        flag = "--version"
        try:
            out = subprocess.run([found, flag], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        text = (out.stdout + out.stderr).strip().splitlines()
        for line in text:
            if "version" in line.lower():
                return line.strip()
        return text[0] if text else "unknown"


def find_peers(install: bool, without: set[str]) -> Peers:
    """Locate rsync and lsyncd; install the missing ones with apt-get if ``install``."""
    paths: dict[str, str | None] = {n: None if n in without else shutil.which(n)
                                    for n in PEER_PACKAGES}
    messages = [f"{n}: treated as missing (--without)" for n in sorted(without)]
    missing = [n for n, p in paths.items() if p is None and n not in without]
    if missing and install:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            packages = [PEER_PACKAGES[n] for n in missing]
            messages.append(f"installing {' '.join(packages)} with apt-get")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            cmd = ["apt-get", "install", "-y", "-qq", *packages]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  stdin=subprocess.DEVNULL)
            if done.returncode != 0:  # stale or absent package lists: update once, retry
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env,
                               stdin=subprocess.DEVNULL)
                done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                      stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                messages.append(f"apt-get install failed: {done.stderr.strip()[-300:]}")
            for n in missing:
                paths[n] = shutil.which(n)
        else:
            messages.append("not root (or no apt-get): cannot install "
                            + " ".join(PEER_PACKAGES[n] for n in missing))
    for n in PEER_PACKAGES:
        if paths[n] is None and n not in without:
            messages.append(f"{n} is missing: its figures read 'missing' "
                            f"(apt-get install {PEER_PACKAGES[n]})")
    if paths["lsyncd"] is not None and paths["rsync"] is None:
        messages.append("lsyncd needs rsync: lsyncd counted as missing")
        paths["lsyncd"] = None
    return Peers(paths, messages)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lsyncd:
    """One lsyncd watching ``src`` and rsyncing it to ``dst`` on this host, delay 0."""

    def __init__(self, peers: Peers, procs: Processes, base: Path) -> None:
        self.binary = peers.path("lsyncd")
        peers.path("rsync")
        self.procs = procs
        self.base = base
        self.src = base / "src"
        self.dst = base / "dst"
        self.log = base / "lsyncd.log"
        for d in (self.src, self.dst):
            d.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300.0) -> None:
        """Start lsyncd and wait until its startup rsync of ``src`` has finished."""
        config = self.base / "lsyncd.lua"
        config.write_text(
            "settings {\n"
            "    nodaemon = true,\n"
            f"    logfile = {_lua(self.log)},\n"
            f"    statusFile = {_lua(self.base / 'lsyncd.status')},\n"
            "}\n"
            "sync {\n"
            "    default.rsync,\n"
            f"    source = {_lua(self.src)},\n"
            f"    target = {_lua(self.dst)},\n"
            "    delay = 0,\n"
            "}\n")
        self.proc = self.procs.spawn([self.binary, str(config)], self.base / "lsyncd.out")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lsyncd exited with {self.proc.returncode}: "
                                   + _tail(self.base / "lsyncd.out") + _tail(self.log))
            if self.log.exists() and "finished" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.02)
        raise RuntimeError(f"lsyncd did not finish its startup sync in {timeout} s")

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


class RsyncDaemon:
    """An rsync daemon on 127.0.0.1 with one writable module ``mod``."""

    def __init__(self, peers: Peers, procs: Processes, base: Path) -> None:
        self.binary = peers.path("rsync")
        self.procs = procs
        self.base = base
        self.module = base / "mod"
        self.module.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rsync://127.0.0.1:{self.port}/mod/"

    def start(self) -> None:
        config = self.base / "rsyncd.conf"
        who = "uid = 0\ngid = 0\n" if os.geteuid() == 0 else ""
        config.write_text(f"use chroot = no\n{who}log file = {self.base / 'rsyncd.log'}\n"
                          f"[mod]\npath = {self.module}\nread only = false\n")
        self.proc = self.procs.spawn(
            [self.binary, "--daemon", "--no-detach", "--address", "127.0.0.1",
             "--port", str(self.port), "--config", str(config)], self.base / "rsyncd.out")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("rsync daemon exited: " + _tail(self.base / "rsyncd.out"))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsync daemon did not listen within 20 s")

    def push(self, src: Path, *flags: str) -> float:
        """``rsync -a [flags] SRC/ rsync://…/mod/``; return the elapsed seconds."""
        t0 = time.perf_counter()
        done = subprocess.run([self.binary, "-a", *flags, f"{src}/", self.url],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"rsync exited {done.returncode}: {done.stderr.strip()[-500:]}")
        return elapsed

    def clear(self) -> None:
        shutil.rmtree(self.module)
        self.module.mkdir()

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


def _lua(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return ""
