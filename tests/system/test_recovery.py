"""Crashes and refusals with real processes: kill -9 of the target, source restart,
bad peers. The replica must converge and never go backwards."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.system.harness import Agent, Cluster, diff_trees, replica_of, wait_synced, wait_until
from tests.system.workload import Churn

pytestmark = [pytest.mark.system, pytest.mark.fuse]



def _durable_seq(target: Agent) -> int:
    """The applied seq persisted on the target's disk (what survives a crash)."""
    path = Path(target.config_path).parent / "state" / "connections" / "src1" / "1.json"
    try:
        return int(json.loads(path.read_text())["applied_seq"])
    except (FileNotFoundError, ValueError):
        return 0


def test_kill_target_five_times_during_workload(cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    source.start()
    stop = threading.Event()
    errors: list[BaseException] = []
    log_lines = 0

    def workload() -> None:
        nonlocal log_lines
        (volume / "churn").mkdir()
        churn = Churn(volume / "churn", seed=99)   # never touches append.log
        try:
            with open(volume / "append.log", "ab") as log:
                while not stop.is_set():
                    churn.step()
                    log.write(b"line %08d\n" % log_lines)  # doubled or lost lines would show
                    log.flush()
                    log_lines += 1
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    thread = threading.Thread(target=workload)
    thread.start()
    seen = 0
    try:
        for kill in range(5):
            time.sleep(0.6)
            if kill == 2:
                # Land one kill right after a rename reached the target.
                (volume / "renamed-src").write_text("moving")
                os.rename(volume / "renamed-src", volume / "renamed-dst")
                wait_until(lambda: (replica_of(target, "src1", "data") / "renamed-dst").exists(),
                           20, interval=0.002, what="the rename to reach the replica")
            target.kill()
            durable = _durable_seq(target)
            assert durable >= seen, f"applied seq went backwards: {durable} < {seen}"
            seen = durable
            time.sleep(0.3)
            target.start()
            durable = _durable_seq(target)
            assert durable >= seen
            seen = durable
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    wait_synced(source, timeout=120)
    problems = diff_trees(volume, replica_of(target, "src1", "data"))
    assert problems == [], "\n".join(problems)
    lines = (replica_of(target, "src1", "data") / "append.log").read_bytes().splitlines()
    assert lines == [b"line %08d" % i for i in range(log_lines)]
    assert _durable_seq(target) >= seen
    assert "moving" == (replica_of(target, "src1", "data") / "renamed-dst").read_text()


def test_source_sigterm_while_target_down_resumes_without_full_resend(
        cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    source.start()
    (volume / "big").write_bytes(os.urandom(4 << 20))     # replicated before the outage
    wait_synced(source)
    applied_before = _durable_seq(target)
    target.stop()
    (volume / "while-down").write_bytes(os.urandom(100_000))
    with open(volume / "big", "r+b") as f:
        f.seek(1000)
        f.write(b"changed while the target was down")
    captured = source.status()["volumes"][0]["captured_seq"]
    assert source.stop() == 0           # SIGTERM: journal flushed, unmounted
    source.start()
    assert source.status()["volumes"][0]["captured_seq"] == captured   # journal survived
    target.start()
    wait_synced(source)
    assert diff_trees(volume, replica_of(target, "src1", "data")) == []
    conn = source.status()["connections"][0]
    # Only the ops after the target's durable seq were sent: ~100 KB, not the 4 MiB file.
    assert conn["bytes_sent"] < 1_000_000, conn
    log = target.log_text()
    resumes = [int(m) for m in re.findall(r'"resume_from": (\d+)', log)]
    assert resumes and resumes[-1] == applied_before + 1


def test_bad_peers_are_refused_and_good_source_keeps_replicating(
        cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.target("tgt1", sources=["src1", "src2"])
    target.start()
    volume = tmp_path / "vol"
    good = cluster.source("src1", volume, [(1, target, "data")])
    good.start()
    # Wrong key: src2 is known to the target, but this source holds another key.
    wrong = cluster.source("src2", tmp_path / "vol2", [(1, target, "data")],
                           key_name="not-src2")
    wrong.start()
    # Unknown node.
    unknown = cluster.source("stranger", tmp_path / "vol3", [(1, target, "data")])
    unknown.start()
    # Garbage on the port: a bad frame, and bytes that look like a TLS ClientHello
    # (this target has tls = false, and says so).
    for garbage, expected in ((b"this is not mirrorline" * 10, b"frame"),
                              (b"\x16\x03\x01 this is not mirrorline" * 10, b"tls = false")):
        with socket.create_connection(("127.0.0.1", target.extra["port"])) as s:
            s.sendall(garbage)
            s.settimeout(5)
            reply = s.recv(4096)
        assert reply.startswith(b"ML") and expected in reply, reply
    for i in range(50):
        (volume / f"f{i}").write_text(str(i))
    wait_synced(good)
    assert diff_trees(volume, replica_of(target, "src1", "data")) == []

    def refused(agent: Agent, word: str) -> bool:
        conn = agent.status()["connections"][0]
        return conn["state"] == "error" and word in conn["last_error"]

    wait_until(lambda: refused(wrong, "auth"), 30, what="wrong key to be refused")
    wait_until(lambda: refused(unknown, "unknown source"), 30, what="unknown node refused")
    log = target.log_text()
    assert "wrong key" in log and "unknown source node 'stranger'" in log
    assert "bad frame magic" in log
    assert not (Path(target.extra["root"]) / "stranger").exists()
    assert not (Path(target.extra["root"]) / "src2" / "data").exists() or not os.listdir(
        Path(target.extra["root"]) / "src2" / "data")
