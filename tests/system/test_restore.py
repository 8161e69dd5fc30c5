"""Restore and failback end to end: the target's data comes back to the source."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.system.harness import Agent, Cluster, diff_trees, replica_of, wait_synced, wait_until

pytestmark = [pytest.mark.system, pytest.mark.fuse]



def _failed_over(cluster: Cluster, tmp_path: Path) -> tuple[Path, Agent, Agent, Path]:
    """A replicated tree, then failover; the source has learnt restore required."""
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    source.start()
    (volume / "docs").mkdir()
    for i in range(30):
        (volume / "docs" / f"d{i}").write_bytes(os.urandom(3000 + i))
    (volume / "big").write_bytes(os.urandom(3 << 20))
    os.symlink("docs/d1", volume / "link")
    wait_synced(source)
    target.cli("failover", "src1", "1")
    source.cli("replication", "start", "1", check=False)   # makes it learn at once

    def knows() -> bool:
        return bool(source.status()["connections"][0]["restore_required"])

    wait_until(knows, 30, what="the source to learn restore required")
    return volume, source, target, replica_of(target, "src1", "data")


def _work_on_target(replica: Path) -> None:
    """What users do on the failed-over copy: new, modified, deleted, renamed, metadata."""
    (replica / "new-on-target").write_text("created during failover")
    (replica / "docs" / "d1").write_bytes(b"modified during failover")
    (replica / "docs" / "d2").unlink()
    os.rename(replica / "docs" / "d3", replica / "docs" / "d3-renamed")
    os.chmod(replica / "docs" / "d4", 0o600)
    os.setxattr(replica / "docs" / "d5", "user.state", b"touched")
    with open(replica / "big", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"changed in the middle")


def test_restore_brings_target_changes_back_and_replication_resumes(
        cluster: Cluster, tmp_path: Path) -> None:
    volume, source, target, replica = _failed_over(cluster, tmp_path)
    _work_on_target(replica)
    states = {source.status()["connections"][0]["data_state"],
              target.status()["connections"][0]["data_state"]}
    assert states == {"restore required", "failed over"}
    res = source.cli("restore", "1", "--wait", "--timeout", "120")
    assert json.loads(res.stdout)["ok"]
    problems = diff_trees(replica, volume)
    assert problems == [], "\n".join(problems)
    conn = source.status()["connections"][0]
    tconn = target.status()["connections"][0]
    assert not conn["restore_required"] and conn["data_state"] == "good"
    assert not tconn["restore_required"] and tconn["data_state"] == "good"
    # Replication resumes from there and converges; verify passes.
    source.cli("replication", "start", "1")
    (volume / "after-restore").write_text("replicated again")
    (volume / "docs" / "d6").write_bytes(b"and changed again")
    wait_synced(source)
    assert diff_trees(volume, replica) == []
    res = source.cli("verify", "1", "--wait", "--timeout", "120", check=False)
    assert res.returncode == 0, res.stdout


def test_restore_refused_while_replicating_newer_and_orphans_keep(
        cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    source.start()
    (volume / "a").write_text("a")
    wait_synced(source)
    res = source.cli("restore", "1", check=False)
    assert res.returncode == 1 and "replication stop" in json.loads(res.stdout)["message"]
    source.cli("replication", "stop", "1")
    replica = replica_of(target, "src1", "data")
    (replica / "from-target").write_text("t")
    # An older copy of "a" on the target, a newer one and a source-only file here.
    (replica / "a").write_text("older on the target")
    os.utime(replica / "a", (time.time() - 3600, time.time() - 3600))
    (volume / "only-on-source").write_text("keep me")
    (volume / "a").write_text("newer on the source")
    res = source.cli("restore", "1", "newer", "orphans=keep", "--wait", "--timeout", "60")
    assert json.loads(res.stdout)["ok"], res.stdout
    assert (volume / "a").read_text() == "newer on the source"       # newer kept
    assert (volume / "only-on-source").read_text() == "keep me"      # orphans=keep
    assert (volume / "from-target").read_text() == "t"
    # orphans=remove (the default) removes it.
    source.cli("restore", "1", "--wait", "--timeout", "60")
    assert not (volume / "only-on-source").exists()
    assert (volume / "a").read_text() == "older on the target"       # overwrite


@pytest.mark.parametrize("victim", ["source", "target"])
def test_killed_restore_keeps_the_flag_and_completes_later(
        cluster: Cluster, tmp_path: Path, victim: str) -> None:
    volume, source, target, replica = _failed_over(cluster, tmp_path)
    _work_on_target(replica)
    for i in range(120):   # enough data that the kill lands mid-restore
        (replica / f"bulk{i}").write_bytes(os.urandom(1 << 20))
    source.cli("restore", "1")
    # Under load the restore can take a while to start (the target sizes the replica
    # first); the kill must land after its first file.
    wait_until(lambda: (volume / "bulk0").exists() or (volume / "new-on-target").exists(),
               120, interval=0.01, what="the restore to begin")
    agent = source if victim == "source" else target
    agent.kill()
    agent.start()
    conn = source.status()["connections"][0]
    tconn = target.status()["connections"][0]
    assert conn["restore_required"] or tconn["restore_required"]   # not cleared half-way
    assert tconn["restore_required"]
    res = source.cli("restore", "1", "--wait", "--timeout", "120", check=False)
    assert res.returncode == 0, res.stdout
    assert diff_trees(replica, volume) == []
    assert not source.status()["connections"][0]["restore_required"]
    assert not target.status()["connections"][0]["restore_required"]


def test_checksum_restore_sends_only_differing_blocks(cluster: Cluster, tmp_path: Path) -> None:
    volume, source, _, replica = _failed_over(cluster, tmp_path)
    _work_on_target(replica)          # one block changed in the middle of the 3 MiB file
    res = source.cli("restore", "1", "checksum", "--wait", "--timeout", "120")
    data = json.loads(res.stdout)
    assert data["ok"], data
    assert diff_trees(replica, volume) == []
    # The unchanged 3 MiB of "big" and the unchanged docs did not cross the link again.
    assert data["data"]["restore"]["bytes_received"] < 1_000_000, data["data"]["restore"]
    assert not source.status()["connections"][0]["restore_required"]
