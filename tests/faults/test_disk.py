"""Full disks and torn journals (issue 6): nothing is lost, nothing blocks, status says why.

* the target's replica on a small tmpfs that fills up: the connection pauses with a
  clear status and resumes by itself when space is freed;
* the source journal's own file system fills up: every connection goes mirror
  required, status says why, and once space is back the mirror brings the replica
  up to date;
* the journal's disk bound (``[queue] disk``) is reached: only the lagging connection
  is dropped from the journal, the other keeps replicating, applications never wait;
  the dropped one mirrors when it comes back;
* a journal whose tail was damaged while the agent was down is cut back at start and
  followed by the restricted difference mirror.

Real agents, real FUSE, real tmpfs mounts (root only); trees compared byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.stats import count
from tests.system.harness import (
    Agent,
    Cluster,
    diff_trees,
    replica_of,
    snapshot_tree,
    wait_synced,
    wait_until,
)

pytestmark = [pytest.mark.system, pytest.mark.fuse]

MIB = 1 << 20


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def stop_all(*agents: Agent) -> None:
    """Stop agents before their tmpfs goes away (a lazy unmount would keep it busy)."""
    for agent in agents:
        if agent.proc is not None and agent.proc.poll() is None:
            try:
                agent.stop()
            except subprocess.TimeoutExpired:
                agent.kill()


def conn_of(source: Agent, conid: int = 1) -> dict[str, Any]:
    for conn in source.status()["connections"]:
        if conn["id"] == conid:
            return conn  # type: ignore[no-any-return]
    raise AssertionError(f"no connection {conid} in the source's status")


def write_files(volume: Path, prefix: str, files: int, size: int, pause: float = 0.0) -> None:
    """``files`` files of ``size`` random bytes, written (and closed) through the mount,
    ``pause`` seconds apart."""
    for i in range(files):
        with open(volume / f"{prefix}{i:03d}", "wb") as f:
            for _ in range(0, size, MIB):
                f.write(os.urandom(min(MIB, size)))
        time.sleep(pause)


def assert_converged(volume: Path, replica: Path, what: str) -> None:
    problems = diff_trees(volume, replica)
    assert not problems, f"{what}: replica differs from the source:\n" + "\n".join(problems[:20])
    count("bytes_compared", sum(len(v[4]) for v in snapshot_tree(volume).values()
                                if isinstance(v[4], bytes)))
    count("files_compared", len(snapshot_tree(volume)))


def wait_mirror_done(source: Agent, conid: int, timeout: float = 90) -> None:
    def done() -> bool:
        conn = conn_of(source, conid)
        mirror = conn["mirror"] or {}
        return not conn["mirror_required"] and mirror.get("state") == "done"
    wait_until(done, timeout, interval=0.2,
               what=f"connection {conid}'s automatic mirror to finish")


# -- target: replica file system full ---------------------------------------------------------

def test_target_enospc_pauses_then_resumes_when_space_is_freed(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    target = cluster.target()
    with tmpfs(Path(target.extra["root"]), "8m") as replica_fs:
        try:
            target.start()
            volume = tmp_path / "vol"
            source = cluster.source("src1", volume, [(1, target, "data")])
            source.start()
            wait_until(lambda: conn_of(source)["state"] == "replicating", 30,
                       what="the connection to come up")
            write_files(volume, "big", files=12, size=MIB)    # 12 MiB into 8 MiB

            def paused() -> dict[str, Any] | None:
                conns = target.status()["connections"]
                return conns[0] if conns and conns[0]["state"] == "paused" else None
            rep = wait_until(paused, 30, interval=0.1, what="the target to pause on ENOSPC")
            assert "ENOSPC" in rep["last_error"], rep
            assert rep["paused_since"] is not None, rep
            assert "connection paused" in target.log_text(), "no logged reason for the pause"

            # The source sees no progress: the acked seq stays behind and the lag grows.
            first = conn_of(source)
            time.sleep(1.5)
            second = conn_of(source)
            assert second["acked_seq"] < second["captured_seq"], second
            assert second["lag_seconds"] > first["lag_seconds"] > 0, (first, second)
            assert second["queue_ops"] > 0, second
            assert paused() is not None, "the pause ended while the disk was still full"

            resize(replica_fs, "64m")              # space is freed
            wait_synced(source, timeout=60)
            rep = target.status()["connections"][0]
            assert rep["state"] != "paused" and rep["last_error"] == "", rep
            assert rep["mirror_required"] is False, f"nothing was lost, yet: {rep}"
            assert conn_of(source)["mirror_required"] is False
            assert "apply resumed" in target.log_text()
            assert_converged(volume, replica_of(target, "src1", "data"), "after ENOSPC")
            count("enospc_pauses")
            count("scenarios")
        finally:
            stop_all(*cluster.agents)


# -- source: the journal's file system full ---------------------------------------------------

def test_journal_enospc_marks_mirror_required_and_recovers(cluster: Cluster,
                                                           tmp_path: Path) -> None:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")],
                            extra='mirror_on_connect = "different"\n'
                                  "[queue]\nsegment_bytes = 1048576")
    state = Path(source.config_path).parent / "state"
    with tmpfs(state, "20m"):
        try:
            source.start()
            wait_until(lambda: conn_of(source)["state"] == "replicating", 30,
                       what="the connection to come up")
            source.cli("replication", "stop", "1")      # nothing is released meanwhile
            started = time.monotonic()
            write_files(volume, "f", files=30, size=MIB)  # 30 MiB of ops into 20 MiB
            took = time.monotonic() - started
            vol = source.status()["volumes"][0]
            assert vol["journal_failures"] > 0, f"the journal never filled up: {vol}"
            assert "No space left on device" in vol["journal_error"], vol
            conn = conn_of(source)
            assert conn["mirror_required"] is True, conn
            assert "journal write failed" in conn["mirror_reason"], conn
            assert conn["data_state"] == "mirror required", conn
            assert took < 30, f"applications were held up: 30 MiB took {took:.1f} s"
            assert "journal append failed" in source.log_text()

            # Space comes back as the target acknowledges and segments are released;
            # the automatic mirror then repairs what the journal missed.
            source.cli("replication", "start", "1")
            wait_until(lambda: source.status()["volumes"][0]["journal_error"] == "", 60,
                       interval=0.2, what="the journal to be writable again")
            wait_mirror_done(source, 1, timeout=120)
            wait_synced(source, timeout=60)
            assert_converged(volume, replica_of(target, "src1", "data"),
                             "after the journal's disk filled up")
            (volume / "after").write_bytes(b"replicating again\n")
            wait_synced(source, timeout=30)
            assert (replica_of(target, "src1", "data") / "after").read_bytes() == \
                b"replicating again\n"
            count("scenarios")
        finally:
            stop_all(source)


# -- source: the journal's disk bound -------------------------------------------------------

def test_disk_bound_drops_only_the_lagging_connection(cluster: Cluster, tmp_path: Path) -> None:
    fast = cluster.target("tgt1")
    slow = cluster.target("tgt2")
    fast.start()
    slow.start()
    volume = tmp_path / "vol"
    limit = 16 * MIB
    source = cluster.source("src1", volume, [(1, fast, "data"), (2, slow, "data")],
                            extra='mirror_on_connect = "different"\n'
                                  f"[queue]\ndisk = {limit}\nsegment_bytes = 1048576")
    source.start()
    wait_until(lambda: all(c["state"] == "replicating"
                           for c in source.status()["connections"]), 30,
               what="both connections to come up")
    write_files(volume, "before", files=2, size=MIB)
    wait_synced(source, timeout=30)
    slow.stop()                                        # connection 2 lags from here on
    wait_until(lambda: conn_of(source, 2)["state"] != "replicating", 30,
               what="connection 2 to notice its target is gone")

    started = time.monotonic()
    # 24 MiB > the 16 MiB bound, at a pace connection 1 keeps up with.
    write_files(volume, "during", files=24, size=MIB, pause=0.1)
    took = time.monotonic() - started
    assert took < 30, f"applications were held up: 24 MiB took {took:.1f} s"
    wait_until(lambda: conn_of(source, 2)["journal_dropped"], 10, interval=0.2,
               what="connection 2 to be dropped from the journal")

    dropped = conn_of(source, 2)
    assert dropped["mirror_required"] is True, dropped
    assert dropped["journal_dropped"] is True, dropped
    assert "disk bound" in dropped["mirror_reason"], dropped
    kept = conn_of(source, 1)
    assert kept["mirror_required"] is False and kept["journal_dropped"] is False, kept
    vol = source.status()["volumes"][0]
    assert vol["journal_disk_bytes"] <= limit + 2 * MIB, f"journal over its bound: {vol}"
    wait_synced(source, 1, timeout=60)
    assert_converged(volume, replica_of(fast, "src1", "data"), "the connection that kept up")
    assert "journal disk bound reached" in source.log_text()

    slow.start()                                       # back: automatic difference mirror
    wait_mirror_done(source, 2, timeout=120)
    wait_synced(source, timeout=60)
    back = conn_of(source, 2)
    assert back["journal_dropped"] is False and back["mirror"]["mode"] == "different", back
    assert_converged(volume, replica_of(slow, "src1", "data"), "the dropped connection")
    assert_converged(volume, replica_of(fast, "src1", "data"), "the connection that kept up")
    count("scenarios")


# -- source: journal tail damaged while the agent was down ------------------------------------

def _damage_tail(state: Path, records_bytes: int) -> tuple[Path, int]:
    """Overwrite the last ``records_bytes`` of the newest non-empty segment with garbage,
    keeping its mtime (a crash does not touch it later). Returns (segment, its size)."""
    segs = sorted((state / "journal" / "data").glob("*.seg"))
    seg = next(s for s in reversed(segs) if s.stat().st_size > 0)
    st = seg.stat()
    with open(seg, "r+b") as f:
        f.seek(max(st.st_size - records_bytes, 0))
        f.write(os.urandom(min(records_bytes, st.st_size)))
    os.utime(seg, ns=(st.st_atime_ns, st.st_mtime_ns))
    return seg, st.st_size


def test_torn_journal_tail_is_cut_and_restricted_mirror_converges(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    source.start()
    old = volume / "old"
    old.mkdir()
    for i in range(50):
        (old / f"f{i:02d}").write_bytes(os.urandom(4096))
    wait_synced(source, timeout=30)
    # The restricted mirror looks at entries changed since the journal's last write
    # less 6 s: let the old tree age past that, so the mirror is seen to be restricted.
    time.sleep(7)
    target.stop()                  # the ops about to be torn never reach the target
    (volume / "new").mkdir()
    for i in range(20):
        (volume / "new" / f"g{i:02d}").write_bytes(os.urandom(30_000))
    (old / "f00").write_bytes(b"rewritten just before the crash\n")   # old/ keeps its ctime
    captured = source.status()["volumes"][0]["captured_seq"]
    source.stop()
    seg, size = _damage_tail(Path(source.config_path).parent / "state", 40_000)

    source.start()
    log = source.log_text()
    assert "journal tail torn by a crash" in log, "the damaged tail was not detected"
    assert seg.stat().st_size < size, "the damaged tail was not cut"
    vol = source.status()["volumes"][0]
    assert vol["captured_seq"] < captured, (vol, captured)
    conn = conn_of(source)
    assert conn["mirror_required"] is True or (conn["mirror"] or {}).get("restricted"), conn
    target.start()
    wait_until(lambda: ((conn_of(source)["mirror"] or {}).get("restricted") is True
                        and conn_of(source)["mirror"]["state"] == "done"), 90, interval=0.2,
               what="the restricted mirror after the torn journal")
    mirror = conn_of(source)["mirror"]
    assert mirror["files_total"] < 50, f"not restricted: walked {mirror['files_total']} entries"
    wait_synced(source, timeout=60)
    assert conn_of(source)["mirror_required"] is False
    assert_converged(volume, replica_of(target, "src1", "data"), "after the torn journal")
    count("scenarios")


@pytest.mark.faults_full
def test_torn_journal_tail_already_applied_by_the_target(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    """The torn ops had reached the target before the crash (the sender reads the memory
    tail before the fsync): the target is ahead of the cut journal, yet it must converge
    and new ops must not reuse the seqs it already applied."""
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    source.start()
    for i in range(20):
        (volume / f"g{i:02d}").write_bytes(os.urandom(30_000))
    wait_synced(source, timeout=30)
    source.stop()
    _damage_tail(Path(source.config_path).parent / "state", 40_000)
    source.start()
    (volume / "after").write_bytes(b"written after the restart\n")
    wait_until(lambda: ((conn_of(source)["mirror"] or {}).get("state") == "done"
                        and not conn_of(source)["mirror_required"]), 60, interval=0.2,
               what="the restricted mirror after the torn journal")
    wait_synced(source, timeout=30)
    assert_converged(volume, replica_of(target, "src1", "data"),
                     "after a torn journal the target had already applied")
    count("scenarios")
