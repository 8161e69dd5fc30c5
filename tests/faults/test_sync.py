"""``sync = "replicated"`` (issue 6): an application fsync returns only once every target
holds the data durable; bounded by ``sync_timeout``, then it degrades with a warning and
a counter.

Real agents, real FUSE: the application is this test, calling os.fsync on the mount.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.stats import count
from tests.system.harness import Agent, Cluster, replica_of, wait_synced, wait_until

pytestmark = [pytest.mark.system, pytest.mark.fuse]

SYNC_TIMEOUT = 2.0


def _replicated_source(cluster: Cluster, volume: Path, targets: list[Agent],
                       timeout: float = SYNC_TIMEOUT) -> Agent:
    source = cluster.source("src1", volume,
                            [(i + 1, t, "data") for i, t in enumerate(targets)])
    # Volume options go inside its [[volume]] table (the harness writes only name/path).
    text = source.config_path.read_text()
    line = f'path = "{volume}"'
    assert line in text
    source.config_path.write_text(text.replace(
        line, f'{line}\nsync = "replicated"\nsync_timeout = {timeout}', 1))
    return source


def _volume_status(source: Agent) -> dict[str, Any]:
    vol: dict[str, Any] = source.status()["volumes"][0]
    return vol


def _append_fsync(path: Path, data: bytes) -> float:
    """Append ``data`` and fsync through the mount; returns how long the fsync took."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        started = time.monotonic()
        os.fsync(fd)
        return time.monotonic() - started
    finally:
        os.close(fd)


def test_fsync_returns_with_the_data_on_every_replica(cluster: Cluster, tmp_path: Path) -> None:
    t1, t2 = cluster.target("tgt1"), cluster.target("tgt2")
    t1.start()
    t2.start()
    volume = tmp_path / "vol"
    source = _replicated_source(cluster, volume, [t1, t2], timeout=10.0)
    source.start()
    wait_until(lambda: all(c["state"] == "replicating"
                           for c in source.status()["connections"]), 30,
               what="both connections to come up")
    assert _volume_status(source)["sync"] == "replicated"
    replicas = [replica_of(t, "src1", "data") / "log" for t in (t1, t2)]
    expected = b""
    rounds = 20
    for i in range(rounds):
        record = b"record %04d %s\n" % (i, os.urandom(8).hex().encode())
        took = _append_fsync(volume / "log", record)
        expected += record
        # Read at once, without any wait: fsync returned, so both replicas have it.
        for replica in replicas:
            got = replica.read_bytes() if replica.exists() else b""
            assert got == expected, (
                f"round {i}: fsync returned after {took:.3f} s but {replica} holds "
                f"{len(got)} of {len(expected)} bytes")
    vol = _volume_status(source)
    assert vol["sync_replicated"] >= rounds and vol["sync_degraded"] == 0, vol
    count("bytes_compared", 2 * len(expected))
    count("scenarios")


def test_fsync_degrades_after_timeout_or_at_once_when_a_target_is_away(
        cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = _replicated_source(cluster, volume, [target])
    source.start()
    wait_until(lambda: source.status()["connections"][0]["state"] == "replicating", 30,
               what="the connection to come up")
    assert _append_fsync(volume / "f", b"a\n") < SYNC_TIMEOUT
    assert _volume_status(source)["sync_degraded"] == 0

    # A target that stops answering while the link stays up: the fsync waits
    # sync_timeout, then returns anyway.
    assert target.proc is not None
    target.proc.send_signal(signal.SIGSTOP)
    try:
        took = _append_fsync(volume / "f", b"b\n")
    finally:
        target.proc.send_signal(signal.SIGCONT)
    assert 0.8 * SYNC_TIMEOUT <= took <= SYNC_TIMEOUT + 2.0, (
        f"fsync with a stalled target took {took:.2f} s, expected about {SYNC_TIMEOUT} s")
    vol = _volume_status(source)
    assert vol["sync_degraded"] == 1, vol
    assert "replicated sync degraded" in source.log_text()

    # A target that is down: the connection is not replicating, so no wait at all.
    target.stop()
    wait_until(lambda: source.status()["connections"][0]["state"] != "replicating", 30,
               what="the source to notice the target is down")
    took = _append_fsync(volume / "f", b"c\n")
    assert took < 0.5 * SYNC_TIMEOUT, f"fsync waited {took:.2f} s for a target known away"
    assert _volume_status(source)["sync_degraded"] == 2

    # Back: replicated again, and what was written meanwhile arrives.
    target.start()
    wait_until(lambda: source.status()["connections"][0]["state"] == "replicating", 30,
               what="the connection to come back")
    took = _append_fsync(volume / "f", b"d\n")
    assert (replica_of(target, "src1", "data") / "f").read_bytes() == b"a\nb\nc\nd\n", took
    wait_synced(source, timeout=30)
    assert _volume_status(source)["sync_degraded"] == 2
    count("scenarios")
