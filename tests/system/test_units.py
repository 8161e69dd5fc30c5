"""The agents under systemd's notify protocol (issue 7, test a).

The agent is started the way ``deploy/mirrorline-target.service`` starts it: its
``ExecStartPre=`` config check first, then ``ExecStart=`` with ``$NOTIFY_SOCKET`` naming
a Unix datagram socket this test bound (as systemd binds its own) and
``$WATCHDOG_USEC`` set, then SIGTERM (``KillSignal=``). The datagrams must say
READY=1, then WATCHDOG=1 (repeatedly, at half the period), then STOPPING=1.
``systemd-analyze verify`` of the units is in tests/unit/test_deploy.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.harness import BIN, Cluster

pytestmark = pytest.mark.system

WATCHDOG_USEC = 400_000  # WATCHDOG=1 every 0.2 s


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # sun_path holds 108 bytes: pytest's tmp_path can be longer, /tmp is short.
    with tempfile.TemporaryDirectory(prefix="ml-notify-") as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        try:
            yield sock, path
        finally:
            sock.close()


def receive(sock: socket.socket, until: float) -> list[str]:
    """Every datagram that arrives before ``until`` (monotonic), as text."""
    messages = []
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return messages


def states(messages: list[str]) -> list[str]:
    """The assignments in order, one per line of each datagram."""
    return [line for message in messages for line in message.splitlines()]


def test_target_agent_speaks_sd_notify_in_order(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    cluster = Cluster(tmp_path)
    target = cluster.target()
    command = [str(BIN / "mirrorline-target"), "--config", str(target.config_path)]
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    check = subprocess.run([*command, "--check-config"], env=env, capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr

    with open(target.log_path, "ab") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while "READY=1" not in seen and time.monotonic() < deadline:
            assert proc.poll() is None, target.log_text()
            seen += states(receive(sock, min(deadline, time.monotonic() + 0.5)))
        assert "READY=1" in seen, f"no READY=1 in {seen}\n{target.log_text()}"
        # Several watchdog periods: the pings keep coming while the agent runs.
        seen += states(receive(sock, time.monotonic() + 1.5))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, target.log_text()
        seen += states(receive(sock, time.monotonic() + 0.5))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    ready = seen.index("READY=1")
    stopping = seen.index("STOPPING=1")
    pings = [i for i, state in enumerate(seen) if state == "WATCHDOG=1"]
    assert ready < stopping, seen
    assert len([i for i in pings if ready < i < stopping]) >= 3, seen
    # STATUS= lines are free text for `systemctl status`; anything else is a protocol bug.
    known = {"READY=1", "STOPPING=1", "WATCHDOG=1"}
    assert all(s in known or s.startswith("STATUS=") for s in seen), seen
    assert seen.count("READY=1") == 1 and seen.count("STOPPING=1") == 1, seen


def test_no_watchdog_pings_when_systemd_asks_for_none(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    target = Cluster(tmp_path).target()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    env["NOTIFY_SOCKET"] = path
    with open(target.log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(BIN / "mirrorline-target"), "--config", str(target.config_path)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while "READY=1" not in seen and time.monotonic() < deadline:
            assert proc.poll() is None, target.log_text()
            seen += states(receive(sock, min(deadline, time.monotonic() + 0.5)))
        seen += states(receive(sock, time.monotonic() + 0.5))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, target.log_text()
        seen += states(receive(sock, time.monotonic() + 0.5))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "READY=1" in seen and "STOPPING=1" in seen, seen
    assert "WATCHDOG=1" not in seen, seen


def test_reload_says_reloading_then_ready_and_changes_the_log_level(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    # As `systemctl reload` runs ExecReload=/bin/kill -HUP $MAINPID: RELOADING=1 (with
    # MONOTONIC_USEC) while the file is read, READY=1 after, whether or not it was valid.
    sock, path = notify_socket
    target = Cluster(tmp_path).target()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    env["NOTIFY_SOCKET"] = path
    with open(target.log_path, "ab") as log:    # no --log-level: the file's log_level rules
        proc = subprocess.Popen(
            [str(BIN / "mirrorline-target"), "--config", str(target.config_path)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while "READY=1" not in seen and time.monotonic() < deadline:
            assert proc.poll() is None, target.log_text()
            seen += states(receive(sock, min(deadline, time.monotonic() + 0.5)))
        assert "READY=1" in seen, target.log_text()

        def reload() -> list[str]:
            proc.send_signal(signal.SIGHUP)
            got: list[str] = []
            until = time.monotonic() + 30
            while "READY=1" not in got and time.monotonic() < until:
                got += states(receive(sock, min(until, time.monotonic() + 0.5)))
            return got

        text = target.config_path.read_text()
        target.config_path.write_text('log_level = "warning"\n' + text)
        first = reload()
        assert [s for s in first if not s.startswith(("STATUS=", "MONOTONIC_USEC="))] == [
            "RELOADING=1", "READY=1"], first
        reloading = first.index("RELOADING=1")
        assert first[reloading + 1].startswith("MONOTONIC_USEC="), first
        assert int(first[reloading + 1].split("=", 1)[1]) > 0
        assert "STATUS=running; config reloaded" in first, first

        # At warning, info lines stop and the rejected reload's error still shows.
        lines = len(target.log_text().splitlines())
        target.config_path.write_text('log_level = "warning"\nbogus = 1\n' + text)
        second = reload()
        assert "READY=1" in second and any(
            s.startswith("STATUS=running on the previous config") for s in second), second
        assert proc.poll() is None
        new = target.log_text().splitlines()[lines:]
        assert len(new) == 1 and '"level": "error"' in new[0], new
        assert "bogus: unknown key" in new[0], new
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
