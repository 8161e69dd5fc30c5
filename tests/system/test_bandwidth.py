"""Issue 7 e: a 2 MiB/s limit makes 10 MiB written through the mount take about 5 s."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.system.harness import Cluster, replica_of, wait_synced, wait_until

pytestmark = [pytest.mark.system, pytest.mark.fuse]

MiB = 1024 * 1024


def test_bandwidth_limit_paces_replication(cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    with source.config_path.open("a") as cfg:        # into the last [[connection]] table
        cfg.write('bandwidth = "2MiB"\n')
    source.start()
    wait_until(lambda: source.status()["connections"][0]["state"] == "replicating",
               timeout=30)
    conn = source.status()["connections"][0]
    assert conn["bandwidth_limit"] == 2 * MiB
    assert conn["bandwidth_configured"] == 2 * MiB and conn["bandwidth_window"] is None

    data = os.urandom(10 * MiB)
    started = time.monotonic()
    with (volume / "big").open("wb") as f:
        for i in range(0, len(data), MiB):
            f.write(data[i:i + MiB])
    written = time.monotonic() - started
    wait_synced(source, timeout=60)
    elapsed = time.monotonic() - started
    assert written < 2, f"writes through the mount are not throttled (took {written:.1f} s)"
    assert 4 <= elapsed <= 8, f"10 MiB at 2 MiB/s took {elapsed:.1f} s"
    assert (replica_of(target, "src1", "data") / "big").read_bytes() == data
    assert source.status()["connections"][0]["bandwidth_limit"] == 2 * MiB


def test_compression_reduces_bytes_sent_for_text(cluster: Cluster, tmp_path: Path) -> None:
    pytest.importorskip("zstandard")
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    with source.config_path.open("a") as cfg:
        cfg.write('compression = "zstd"\n')
    source.start()
    wait_until(lambda: source.status()["connections"][0]["state"] == "replicating",
               timeout=30)
    text = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % i
                    for i in range(10 * MiB // 58 + 1))[:10 * MiB]
    (volume / "log.txt").write_bytes(text)
    wait_synced(source, timeout=60)
    assert (replica_of(target, "src1", "data") / "log.txt").read_bytes() == text
    conn = source.status()["connections"][0]
    assert conn["compression"] == conn["compression_active"] == "zstd"
    # bytes_sent counts op bytes, wire_bytes_sent the (compressed) OPS frames.
    assert conn["wire_bytes_sent"] < 10 * MiB // 4, conn
    assert conn["wire_bytes_sent"] * 4 < conn["bytes_sent"], conn
