"""Watch mode end to end (issue 9): no mount, kernel notifications, real agents.

Every test runs with both backends: fanotify (one mark on the file system, filtered
to the volume) and recursive inotify.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from pathlib import Path

import pytest

from tests.system.harness import (
    Agent,
    Cluster,
    diff_trees,
    is_mounted,
    replica_of,
    wait_synced,
    wait_until,
)
from tests.system.workload import Churn

pytestmark = [pytest.mark.system]

BACKENDS = ["fanotify", "inotify"]


def _pair(cluster: Cluster, tmp_path: Path, backend: str, *, start: bool = True,
          window: float = 0.05) -> tuple[Path, Agent, Agent]:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source(
        "src1", volume, [(1, target, "data")],
        volume_extra=f'mode = "watch"\nwatch_backend = "{backend}"\nwatch_window = {window}')
    if start:
        source.start()
    return volume, source, target


def _watch(source: Agent) -> dict[str, object]:
    watch: dict[str, object] = source.status()["volumes"][0]["watch"]
    return watch


def _synced(source: Agent, volume: Path, target: Agent, timeout: float = 120) -> None:
    """Every change is sent (``wait queue`` settles the watcher first) and the replica
    equals the source, mirror done."""
    wait_until(lambda: source.status()["connections"][0]["state"] == "replicating", 30,
               what="connection up")
    conn = wait_until(lambda: (c := source.status()["connections"][0])["mirror"] is None
                      or (c["mirror"]["state"] in ("done", "failed", "stopped") and c),
                      timeout, what="mirror to end")
    assert not isinstance(conn, dict) or conn["mirror"] is None \
        or conn["mirror"]["state"] == "done", conn
    wait_synced(source, timeout=timeout)
    problems = diff_trees(volume, replica_of(target, "src1", "data"), links=False)
    assert problems == [], "\n".join(problems[:30])


@pytest.mark.parametrize("backend", BACKENDS)
def test_churn_converges(cluster: Cluster, tmp_path: Path, backend: str) -> None:
    """The core churn, in watch mode: content, names and metadata converge (which names
    share an inode is not compared: see README, watch mode, hard links)."""
    volume = tmp_path / "vol"
    volume.mkdir()
    before = Churn(volume, seed=7)
    for _ in range(200):             # a tree that exists at first start: scanned, mirrored
        before.step()
    volume, source, target = _pair(cluster, tmp_path, backend)
    assert not is_mounted(volume)
    watch = _watch(source)
    assert watch["backend"] == backend
    assert watch["guarantee"] == "file-level, eventually consistent, not write-ordered"
    assert str(watch["startup"]).startswith("first start")
    _synced(source, volume, target)
    churn = Churn(volume, seed=20261128)
    for _ in range(1500):
        churn.step()
    missing = {"write", "truncate", "create", "mkdir", "unlink", "rmdir", "rename",
               "rename_over", "exchange", "link", "symlink", "chmod", "chown", "utime",
               "setxattr", "removexattr", "mkfifo"} - set(churn.counts)
    assert not missing, missing
    _synced(source, volume, target)
    conn = source.status()["connections"][0]
    assert conn["data_state"] == "good" and not conn["mirror_required"]
    assert _watch(source)["renames"], "renames were sent as renames, not as copies"


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_is_rescanned_and_said(cluster: Cluster, tmp_path: Path,
                                        backend: str) -> None:
    """The agent is stopped (SIGSTOP) while 20,000 files are created: more events than
    the kernel queue holds (16,384; fanotify merges a file's events into one, so one
    file must be one event too many). The rescan catches everything and says so."""
    volume, source, target = _pair(cluster, tmp_path, backend)
    (volume / "keep").write_bytes(b"before")
    (volume / "flood").mkdir()        # watched before the flood (inotify: a watch of its own)
    _synced(source, volume, target)
    assert source.proc is not None
    source.proc.send_signal(signal.SIGSTOP)
    try:
        for i in range(20000):
            os.close(os.open(volume / "flood" / f"f{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
        (volume / "keep").write_bytes(b"after the flood")
        os.unlink(volume / "flood" / "f00000")
    finally:
        source.proc.send_signal(signal.SIGCONT)
    _synced(source, volume, target, timeout=180)
    watch = _watch(source)
    assert int(watch["overflows"]) >= 1, watch   # type: ignore[call-overload]
    assert int(watch["rescans"]) >= 1, watch     # type: ignore[call-overload]
    assert "watch events were lost" in source.log_text()
    assert (replica_of(target, "src1", "data") / "keep").read_bytes() == b"after the flood"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_created_in_one_burst(cluster: Cluster, tmp_path: Path, backend: str) -> None:
    """Directories created and filled at once, faster than a watch can be added to
    each (the race inotify tools lose): everything arrives."""
    volume, source, target = _pair(cluster, tmp_path, backend)
    rng = random.Random(9)
    for top in range(5):
        deep = volume / f"t{top}" / "a" / "b" / "c" / "d" / "e"
        os.makedirs(deep)
        level = deep
        while level != volume:
            for k in range(4):
                (level / f"f{k}").write_bytes(rng.randbytes(rng.randrange(1, 70000)))
            level = level.parent
    _synced(source, volume, target)
    replica = replica_of(target, "src1", "data")
    assert (replica / "t4" / "a" / "b" / "c" / "d" / "e" / "f3").exists()


def _fill(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    chunk = rng.randbytes(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            f.write(chunk[:-8] + i.to_bytes(8, "little"))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("backend", BACKENDS)
def test_big_file_sends_only_changed_blocks(cluster: Cluster, tmp_path: Path,
                                            backend: str) -> None:
    """A 1 GiB file already on both sides; five 4 KiB writes send a few blocks, not
    the file (bytes of ops on the wire, from the source's counters)."""
    size = 1 << 30
    volume, source, target = _pair(cluster, tmp_path, backend, start=False)
    volume.mkdir(parents=True, exist_ok=True)
    _fill(volume / "big.db", size, seed=3)
    replica = replica_of(target, "src1", "data")
    replica.mkdir(parents=True, exist_ok=True)
    _fill(replica / "big.db", size, seed=3)
    os.utime(replica / "big.db", ns=(os.stat(volume / "big.db").st_atime_ns,
                                     os.stat(volume / "big.db").st_mtime_ns))
    source.start()
    _synced(source, volume, target, timeout=300)
    sent_before = source.status()["connections"][0]["bytes_sent"]
    rng = random.Random(5)
    fd = os.open(volume / "big.db", os.O_WRONLY)
    try:
        for _ in range(5):
            os.pwrite(fd, rng.randbytes(4096), rng.randrange(0, size - 4096))
    finally:
        os.close(fd)
    wait_synced(source, timeout=120)
    sent = source.status()["connections"][0]["bytes_sent"] - sent_before
    # Five writes touch at most ten 64 KiB blocks; the whole file would be 1 GiB.
    print(f"five 4 KiB writes to a 1 GiB file: {sent} bytes of ops sent")
    assert 5 * 4096 <= sent <= 10 * 64 * 1024 + 64 * 1024, sent
    assert _digest(volume / "big.db") == _digest(replica / "big.db")


@pytest.mark.parametrize("backend", BACKENDS)
def test_restart_resumes_from_the_index(cluster: Cluster, tmp_path: Path,
                                        backend: str) -> None:
    """After a clean stop, a restart compares stat with the index (no mirror, no
    whole-tree read) and sends what changed while the agent was down."""
    volume, source, target = _pair(cluster, tmp_path, backend)
    for i in range(50):
        (volume / f"f{i}").write_bytes(b"v1-%d" % i * 100)
    _synced(source, volume, target)
    assert source.stop() == 0
    (volume / "f3").write_bytes(b"changed while stopped")
    (volume / "new").write_bytes(b"created while stopped")
    os.unlink(volume / "f7")
    source.start()
    watch = _watch(source)
    assert str(watch["startup"]).startswith("resumed from the index"), watch
    conn = source.status()["connections"][0]
    assert not conn["mirror_required"], conn
    assert int(watch["files_read"]) <= 10, watch    # type: ignore[call-overload]
    _synced(source, volume, target)
    assert source.status()["connections"][0]["mirror"] is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_runs_after_the_changes_before_it(cluster: Cluster, tmp_path: Path,
                                               backend: str) -> None:
    """A task queued right after a write runs on the target after that write is applied
    (the watcher sends pending changes before the TASK op), with a long window."""
    snapdir = tmp_path / "snaps"
    snapdir.mkdir()
    volume, source, target = _pair(cluster, tmp_path, backend, start=False, window=2.0)
    task_dir = target.config_path.parent / "tasks.d"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "snap").write_text(f'#!/bin/sh\nset -e\ncp -a . "{snapdir}/$1"\n')
    (task_dir / "snap").chmod(0o755)
    source.start()
    _synced(source, volume, target)
    for i in range(20):
        (volume / f"n{i}").write_bytes(b"%d" % i * 1000)
    source.cli("queuetask", "1", "snap", "s1", "--wait", "--timeout", "60")
    problems = diff_trees(volume, snapdir / "s1")
    assert problems == [], problems


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_and_remirror_on_a_watch_volume(cluster: Cluster, tmp_path: Path,
                                               backend: str) -> None:
    """Verify finds a replica file damaged behind the agent's back; a checksum mirror
    repairs it; verify is then clean."""
    volume, source, target = _pair(cluster, tmp_path, backend)
    for i in range(30):
        (volume / f"f{i}").write_bytes(os.urandom(3000 + i))
    _synced(source, volume, target)

    def verify() -> dict[str, object]:
        res = source.cli("verify", "1", "--wait", "--timeout", "60", check=False, timeout=90)
        report: dict[str, object] = json.loads(res.stdout)["data"]["verify"][0]
        return report

    assert verify()["in_sync"] is True
    (replica_of(target, "src1", "data") / "f7").write_bytes(b"damaged on the target")
    report = verify()
    assert report["in_sync"] is False
    assert [d["path"] for d in report["differences"]] == ["f7"], report  # type: ignore[attr-defined]
    source.cli("mirror", "start", "1", "checksum", "--wait", "--timeout", "60", timeout=90)
    wait_synced(source)
    assert diff_trees(volume, replica_of(target, "src1", "data"), links=False) == []
    assert verify()["in_sync"] is True
