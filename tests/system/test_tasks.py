"""Task command processing end to end: real agents, real mount, real task processes."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.system.harness import Agent, Cluster, diff_trees, replica_of, wait_synced, wait_until

pytestmark = [pytest.mark.system, pytest.mark.fuse]

TASKS = {
    # Point-in-time copy of the replica (cwd) into $SNAPDIR/<name>.
    "snap": '#!/bin/sh\nset -e\nmkdir -p "$SNAPDIR"\ncp -a . "$SNAPDIR/$1"\n',
    # Says it started, then sleeps; the marker lets the test know it is running.
    "hold": '#!/bin/sh\necho "$MIRRORLINE_TASK_ID $MIRRORLINE_SEQ" >> "$SNAPDIR/hold.log"\n'
            'sleep "$1"\necho done >> "$SNAPDIR/hold.log"\n',
    "exit7": '#!/bin/sh\necho "about to fail"\nexit 7\n',
    "record": '#!/bin/sh\necho "$MIRRORLINE_CONID $MIRRORLINE_SOURCE $MIRRORLINE_SEQ '
              '$MIRRORLINE_TASK_ID $MIRRORLINE_TARGET_PATH $(pwd) $*" >> "$SNAPDIR/record.log"\n',
}



def _install_tasks(agent: Agent, snapdir: Path) -> Path:
    task_dir = agent.config_path.parent / "tasks.d"
    task_dir.mkdir(exist_ok=True)
    for name, body in TASKS.items():
        path = task_dir / name
        path.write_text(body.replace('"$SNAPDIR', f'"{snapdir}'))
        path.chmod(0o755)
    (task_dir / "notexec").write_text("#!/bin/sh\ntouch /tmp/should-not-run\n")
    return task_dir


def _setup(cluster: Cluster, tmp_path: Path, targets: int = 1
           ) -> tuple[Path, Agent, list[Agent], Path]:
    snapdir = tmp_path / "snaps"
    snapdir.mkdir()
    tgts = [cluster.target(f"tgt{i + 1}") for i in range(targets)]
    for t in tgts:
        _install_tasks(t, snapdir)
        t.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume,
                            [(i + 1, t, "data") for i, t in enumerate(tgts)])
    _install_tasks(source, snapdir)
    source.start()
    wait_until(lambda: all(c["state"] == "replicating" for c in source.status()["connections"]),
               30, what="connections up")
    return volume, source, tgts, snapdir


def _queue(source: Agent, *words: str, check: bool = True) -> dict[str, object]:
    res = source.cli("queuetask", *words, check=check)
    out: dict[str, object] = json.loads(res.stdout)
    out["returncode"] = res.returncode
    return out


def test_point_in_time_snapshots(cluster: Cluster, tmp_path: Path) -> None:
    volume, source, (target,), snapdir = _setup(cluster, tmp_path)
    for i in range(20):
        (volume / f"a{i}").write_bytes(os.urandom(2000) * (i + 1))
    (volume / "sub").mkdir()
    (volume / "sub" / "shared").write_text("version A")
    state_a = tmp_path / "state-a"
    shutil.copytree(volume, state_a, symlinks=True)
    _queue(source, "1", "snap", "after-a")
    # Immediately: set B, overwriting A's files while the first task is in flight.
    for i in range(0, 20, 2):
        (volume / f"a{i}").write_bytes(b"B" * 5000)
    (volume / "sub" / "shared").write_text("version B, longer than A")
    (volume / "a1").unlink()
    (volume / "b-new").write_text("only in B")
    state_b = tmp_path / "state-b"
    shutil.copytree(volume, state_b, symlinks=True)
    out = _queue(source, "1", "snap", "after-b", "--wait", "--timeout", "60")
    assert out["returncode"] == 0, out
    assert diff_trees(state_a, snapdir / "after-a", mtimes=False) == []
    assert diff_trees(state_b, snapdir / "after-b", mtimes=False) == []
    wait_synced(source)
    assert diff_trees(volume, replica_of(target, "src1", "data")) == []


def test_execute_task_holds_later_writes(cluster: Cluster, tmp_path: Path) -> None:
    volume, source, (target,), snapdir = _setup(cluster, tmp_path)
    replica = replica_of(target, "src1", "data")
    _queue(source, "1", "hold", "3")
    (volume / "later").write_text("written while the task runs")
    wait_until(lambda: (snapdir / "hold.log").exists(), 20, what="the task to start")
    started = time.monotonic()
    while time.monotonic() - started < 2.0:
        assert not (replica / "later").exists(), "a held write landed while the task ran"
        time.sleep(0.05)
    wait_until(lambda: (replica / "later").exists(), 20, what="the held write to land")
    assert (snapdir / "hold.log").read_text().endswith("done\n")

    # timeout=1: the held write lands after about a second, while the task still runs.
    (snapdir / "hold.log").unlink()
    _queue(source, "1", "hold", "8", "timeout=1")
    (volume / "after-timeout").write_text("x")
    wait_until(lambda: (snapdir / "hold.log").exists(), 20, what="the task to start")
    t0 = time.monotonic()
    wait_until(lambda: (replica / "after-timeout").exists(), 20, interval=0.02,
               what="the write after the timeout")
    waited = time.monotonic() - t0
    assert 0.5 < waited < 6, waited
    assert "done" not in (snapdir / "hold.log").read_text()   # the task is still running
    tasks = json.loads(source.cli("tasks", "1").stdout)["data"]["tasks"]
    assert tasks[-1]["state"] == "timed-out"
    wait_until(lambda: json.loads(source.cli("tasks", "1").stdout)["data"]["tasks"][-1]
               ["exit_code"] == 0, 20, what="the timed-out task's final result")


def test_exit_codes_and_refusals(cluster: Cluster, tmp_path: Path) -> None:
    _, source, (target,), snapdir = _setup(cluster, tmp_path)
    out = _queue(source, "1", "exit7", "--wait", "--timeout", "30", check=False)
    assert out["returncode"] == 7, out
    tasks = json.loads(source.cli("tasks", "1").stdout)["data"]["tasks"]
    assert tasks[-1]["exit_code"] == 7 and "about to fail" in tasks[-1]["output"]
    before = source.status()["volumes"][0]["captured_seq"]
    n_tasks = len(tasks)
    for bad in ["../exit7", "sub/exit7", "missing", "notexec", "/bin/true"]:
        out = _queue(source, "1", bad, check=False)
        assert out["returncode"] != 0, (bad, out)
        assert "nothing was queued" in str(out["message"]) or out["returncode"] == 2, out
    for trigger in ("on=queue", "on=transmit"):
        out = _queue(source, "1", "notexec", trigger, check=False)
        assert out["returncode"] == 1 and "not executable" in str(out["message"]), out
    assert source.status()["volumes"][0]["captured_seq"] == before
    assert len(json.loads(source.cli("tasks", "1").stdout)["data"]["tasks"]) == n_tasks
    assert not Path("/tmp/should-not-run").exists()
    # The task's environment and working directory.
    _queue(source, "1", "record", "arg one", "two", "--wait", "--timeout", "30")
    line = (snapdir / "record.log").read_text().split()
    replica = str(replica_of(target, "src1", "data"))
    assert line[0] == "1" and line[1] == "src1" and line[4] == replica and line[5] == replica
    assert line[6:] == ["arg", "one", "two"]


def test_queuetask_star_one_to_many(cluster: Cluster, tmp_path: Path) -> None:
    volume, source, _targets, snapdir = _setup(cluster, tmp_path, targets=2)
    (volume / "x").write_text("before")
    out = _queue(source, "*", "record", "--wait", "--timeout", "60")
    assert out["returncode"] == 0, out
    data = out["data"]
    assert isinstance(data, dict)
    seqs = [t["seq"] for t in data["tasks"]]
    assert len(set(seqs)) == 2 and len(set(data["task_ids"])) == 2
    lines = sorted((snapdir / "record.log").read_text().splitlines())
    assert [ln.split()[0] for ln in lines] == ["1", "2"]   # once per connection
    assert sorted(int(ln.split()[2]) for ln in lines) == sorted(seqs)


def test_task_survives_target_outage_and_interrupted_is_not_rerun(
        cluster: Cluster, tmp_path: Path) -> None:
    _volume, source, (target,), snapdir = _setup(cluster, tmp_path)
    target.stop()
    _queue(source, "1", "record", "while-down")
    source.stop()           # and the source restarts too: the task is in the journal
    source.start()
    target.start()
    wait_synced(source)
    wait_until(lambda: (snapdir / "record.log").exists(), 30, what="the queued task to run")
    time.sleep(1)
    assert len((snapdir / "record.log").read_text().splitlines()) == 1
    # kill -9 of the target while a task runs: interrupted, never re-run.
    _queue(source, "1", "hold", "4")
    wait_until(lambda: (snapdir / "hold.log").exists(), 20, what="the task to start")
    target.kill()
    target.start()
    wait_synced(source)

    def interrupted() -> bool:
        tasks = json.loads(source.cli("tasks", "1").stdout)["data"]["tasks"]
        return bool(tasks[-1]["state"] == "interrupted")

    wait_until(interrupted, 30, what="the source to hear the task was interrupted")
    ttasks = json.loads(target.cli("tasks").stdout)["data"]["tasks"]
    assert ttasks[-1]["state"] == "interrupted"
    time.sleep(5)      # the orphaned first run finishes; nothing starts it again
    starts = [ln for ln in (snapdir / "hold.log").read_text().splitlines() if ln != "done"]
    assert len(starts) == 1


def test_task_processing_disabled(cluster: Cluster, tmp_path: Path) -> None:
    _volume, source, (target,), snapdir = _setup(cluster, tmp_path)
    target.cli("taskprocessing", "disable")
    wait_until(lambda: source.status()["connections"][0]["target_task_processing"] is False,
               20, what="the source to learn task processing is off on the target")
    out = _queue(source, "1", "record", check=False)
    assert out["returncode"] == 1 and "taskprocessing enable" in str(out["message"])
    target.cli("taskprocessing", "enable")
    source.cli("taskprocessing", "disable")
    wait_until(lambda: source.status()["connections"][0]["target_task_processing"] is True, 20)
    out = _queue(source, "1", "record", "on=queue", check=False)
    assert out["returncode"] == 1 and "disabled on this source" in str(out["message"])
    out = _queue(source, "1", "record", "target-side", "--wait", "--timeout", "30")
    assert out["returncode"] == 0
    assert "target-side" in (snapdir / "record.log").read_text()
    # Persisted across a restart.
    source.stop()
    source.start()
    assert source.status()["task_processing"] is False
