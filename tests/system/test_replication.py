"""End to end: real agents as processes, a real FUSE mount, real TCP, the real CLI."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from tests.system.harness import Agent, Cluster, diff_trees, replica_of, wait_synced, wait_until
from tests.system.workload import Churn

pytestmark = [pytest.mark.system, pytest.mark.fuse]



def _pair(cluster: Cluster, tmp_path: Path) -> tuple[Path, Agent, Agent]:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    source.start()
    return volume, source, target


def test_churn_replica_equals_source(cluster: Cluster, tmp_path: Path) -> None:
    volume, source, target = _pair(cluster, tmp_path)
    churn = Churn(volume, seed=20261127)
    for _ in range(1500):
        churn.step()
    # Every kind of op happened at least once.
    missing = {"write", "sparse", "truncate", "create", "mkdir", "unlink", "rmdir", "rename",
               "rename_over", "exchange", "noreplace", "link", "symlink", "chmod", "chown",
               "utime", "setxattr", "removexattr", "mkfifo", "fallocate"} - set(churn.counts)
    assert not missing, missing
    wait_synced(source)
    replica = replica_of(target, "src1", "data")
    problems = diff_trees(volume, replica)
    assert problems == [], "\n".join(problems[:30])
    st = source.status()
    conn = st["connections"][0]
    assert conn["acked_seq"] == conn["captured_seq"] == st["volumes"][0]["captured_seq"]
    assert conn["state"] == "replicating" and not conn["mirror_required"]


def test_order_every_sample_is_a_source_state(cluster: Cluster, tmp_path: Path) -> None:
    """A writer bumps a counter in files f0..f7 in turn; the replica never shows f(k+1)
    ahead of f(k), whatever the moment it is sampled (DESIGN §3 ordering)."""
    volume, source, target = _pair(cluster, tmp_path)
    files = [volume / f"f{k}" for k in range(8)]
    for f in files:
        f.write_bytes(b"%016d" % 0)
    wait_synced(source)
    replica = replica_of(target, "src1", "data")
    rfiles = [replica / f"f{k}" for k in range(8)]
    stop = threading.Event()
    rounds = 400

    def writer() -> None:
        fds = [os.open(f, os.O_WRONLY) for f in files]
        for i in range(1, rounds + 1):
            for fd in fds:
                os.pwrite(fd, b"%016d" % i, 0)
        for fd in fds:
            os.close(fd)
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    samples = 0
    distinct = set()
    while not stop.is_set() or samples < 50:
        # Read in reverse write order: a later read sees a later (never earlier) state,
        # so for an in-order replica the values are non-increasing from f0 to f7.
        values = [int(rf.read_bytes() or b"0") for rf in reversed(rfiles)][::-1]
        samples += 1
        distinct.add(tuple(values))
        assert all(values[k] >= values[k + 1] for k in range(7)), values
        if stop.is_set() and samples >= 50:
            break
    thread.join()
    wait_synced(source)
    assert [int(rf.read_bytes()) for rf in rfiles] == [rounds] * 8
    assert len(distinct) > 3, "the sampler never saw the replica move"


def test_restore_required_sequence(cluster: Cluster, tmp_path: Path) -> None:
    volume, source, target = _pair(cluster, tmp_path)
    (volume / "a").write_text("before failover")
    wait_synced(source)
    out = target.cli("failover", "src1", "1")
    assert json.loads(out.stdout)["ok"]
    (volume / "b").write_text("after failover: must not reach the failed-over replica")

    def source_knows() -> bool:
        source.cli("replication", "start", "1", check=False)
        conn = source.status()["connections"][0]
        return bool(conn["restore_required"])

    wait_until(source_knows, 30, what="source to learn restore required")
    replica = replica_of(target, "src1", "data")
    assert not (replica / "b").exists()
    tconn = target.status()["connections"][0]
    assert tconn["restore_required"] and tconn["state"] == "failed-over"
    # Refused, with a message saying how to override; also with `*`.
    for conid in ("1", "*"):
        res = source.cli("replication", "start", conid, check=False)
        assert res.returncode == 1
        msg = json.loads(res.stdout)["message"]
        assert "restore required" in msg and "clearrestorerequired" in msg
    res = source.cli("replication", "start", "*", "clearrestorerequired")
    assert res.returncode == 0
    # Clearing marks the connection mirror-required, and the automatic mirror runs.
    def mirrored() -> bool:
        m = source.status()["connections"][0]["mirror"]
        return bool(m and m["state"] == "done")

    wait_until(mirrored, 60, what="the automatic mirror after clearrestorerequired")
    conn = source.status()["connections"][0]
    assert "restore required was cleared" in conn["mirror"]["reason"]
    assert not conn["restore_required"] and not conn["mirror_required"]
    assert conn["state"] == "replicating"
    tconn = target.status()["connections"][0]
    assert not tconn["restore_required"] and not tconn["mirror_required"]
    assert diff_trees(volume, replica) == []
    (volume / "c").write_text("after clearing")
    wait_synced(source)
    assert (replica / "c").read_text() == "after clearing"
    # Persisted: a source restart keeps the flags.
    source.stop()
    source.start()
    conn = source.status()["connections"][0]
    assert not conn["restore_required"] and not conn["mirror_required"]


def test_one_to_many(cluster: Cluster, tmp_path: Path) -> None:
    t1 = cluster.target("tgt1")
    t2 = cluster.target("tgt2")
    t1.start()
    t2.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, t1, "data"), (2, t2, "copy")])
    source.start()
    churn = Churn(volume, seed=7)
    for _ in range(400):
        churn.step()
    # Stop one connection for a while: its cursor stays behind, the other goes on.
    source.cli("replication", "stop", "2")
    for _ in range(200):
        churn.step()
    wait_synced(source, 1)
    st = {c["id"]: c for c in source.status()["connections"]}
    assert st[1]["acked_seq"] == st[1]["captured_seq"]
    assert st[2]["acked_seq"] < st[2]["captured_seq"] and st[2]["state"] == "stopped"
    source.cli("replication", "start", "2")
    wait_synced(source)
    assert diff_trees(volume, replica_of(t1, "src1", "data")) == []
    assert diff_trees(volume, replica_of(t2, "src1", "copy")) == []


def test_many_to_one(cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.target("tgt1", sources=["srcA", "srcB"])
    target.start()
    va, vb = tmp_path / "va", tmp_path / "vb"
    sa = cluster.source("srcA", va, [(1, target, "data")])
    sb = cluster.source("srcB", vb, [(1, target, "data")])   # same conid, other node
    sa.start()
    sb.start()
    ca, cb = Churn(va, seed=1), Churn(vb, seed=2)
    for _ in range(300):
        ca.step()
        cb.step()
    wait_synced(sa)
    wait_synced(sb)
    assert diff_trees(va, replica_of(target, "srcA", "data")) == []
    assert diff_trees(vb, replica_of(target, "srcB", "data")) == []
    conns = {(c["source"], c["id"]) for c in target.status()["connections"]}
    assert conns == {("srcA", 1), ("srcB", 1)}


def test_cli_connect_disconnect_and_persisted_conids(cluster: Cluster, tmp_path: Path) -> None:
    volume, source, target = _pair(cluster, tmp_path)
    key = cluster.key("src1")
    port = target.extra["port"]
    res = source.cli("connect", "data", "to", f"127.0.0.1:{port}", "map", "second",
                     "key", str(key))
    conid = json.loads(res.stdout)["data"]["id"]
    assert conid == 2
    (volume / "x").write_text("to both")
    wait_synced(source)
    assert (replica_of(target, "src1", "second") / "x").read_text() == "to both"
    source.stop()
    source.start()
    ids = [c["id"] for c in source.status()["connections"]]
    assert ids == [1, 2]
    source.cli("disconnect", "2")
    res = source.cli("connect", "data", "to", f"127.0.0.1:{port}", "map", "third")
    assert json.loads(res.stdout)["data"]["id"] == 3      # never reused
    res = source.cli("status", "9", check=False)
    assert res.returncode == 1
    # Unreachable daemon: exit 3; usage error: exit 2.
    source.stop()
    assert source.cli("status", check=False).returncode == 3
    assert source.cli("replication", "frobnicate", check=False).returncode == 2


def test_nonempty_volume_says_mirror_required(cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "old").write_text("was here before protection")
    source = cluster.source("src1", volume, [(1, target, "data")],
                            extra='mirror_on_connect = "none"')
    source.start()
    conn = source.status()["connections"][0]
    assert conn["mirror_required"] and "held data" in conn["mirror_reason"]
    replica = replica_of(target, "src1", "data")
    wait_until(lambda: source.status()["connections"][0]["state"] == "replicating", 30)
    assert not (replica / "old").exists()
    assert source.status()["connections"][0]["mirror_required"]   # still true: no mirror ran
