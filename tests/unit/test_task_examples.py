"""The shipped example tasks in deploy/tasks (issue 3 item 6), run as real processes.

``snapshot`` and ``manifest`` run the way the target's task runner runs them: no shell,
the replica as working directory, the MIRRORLINE_* environment set. ``backup-quiesced.sh``
runs against a fake ``systemctl`` (MIRRORLINE_SYSTEMCTL) and a fake ``mirrorline`` first
on PATH, both of which log their arguments to one file, so the order of stop, queue and
start and the script's exit status can be checked without systemd or agents.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "deploy" / "tasks"
SNAPSHOT = TASKS / "snapshot"
MANIFEST = TASKS / "manifest"
BACKUP = TASKS / "backup-quiesced.sh"

NON_UTF8 = b"caf\xe9.txt"
NEWLINE = b"new\nline"
BACKSLASH = b"back\\slash"


# --- the replica ----------------------------------------------------------------------


@pytest.fixture
def replica(tmp_path: Path) -> Path:
    """A small replica at <tmp>/root/data with awkward names, symlinks and a FIFO."""
    top = tmp_path / "root" / "data"
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / "emptydir").mkdir()
    (top / "a.txt").write_text("hello\n")
    (top / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (top / "sub" / "deeper" / "empty").write_bytes(b"")
    (top / "with space").write_text("spaced")
    (top / "run.sh").write_text("#!/bin/sh\n")
    (top / "run.sh").chmod(0o751)
    base = bytes(top)
    for name, data in ((NON_UTF8, b"latin-1 name"), (NEWLINE, b"nl"), (BACKSLASH, b"bs")):
        with open(os.path.join(base, name), "wb") as fh:
            fh.write(data)
    os.symlink("a.txt", top / "link")
    os.symlink("nowhere", top / "dangling")
    os.symlink("sub", top / "sublink")
    os.symlink(NON_UTF8, os.path.join(base, b"link-to-" + NON_UTF8))
    os.mkfifo(top / "fifo")
    return top


def task_env(replica: Path | None, seq: int = 42) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORLINE_")}
    env.update({"MIRRORLINE_CONID": "1", "MIRRORLINE_SOURCE": "src1",
                "MIRRORLINE_SEQ": str(seq), "MIRRORLINE_TASK_ID": "t-1"})
    if replica is not None:
        env["MIRRORLINE_TARGET_PATH"] = str(replica)
    return env


def run_task(script: Path, replica: Path, *args: str | bytes,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Like the task runner: no shell, cwd = the replica."""
    cwd = replica if replica.is_dir() else replica.parent
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, timeout=60,
                          env=task_env(replica) if env is None else env, check=False)


def describe(top: Path) -> dict[bytes, tuple[Any, ...]]:
    """Every entry below ``top`` (not following links): type, mode, owner and content."""
    result: dict[bytes, tuple[Any, ...]] = {}
    base = bytes(top)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                content: Any = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    content = fh.read()
            else:
                content = None
            mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns
            result[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime,
                           content)
    return result


# --- snapshot -------------------------------------------------------------------------


def test_snapshot_default_destination_equals_the_replica(replica: Path) -> None:
    before = describe(replica)
    proc = run_task(SNAPSHOT, replica)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode().strip()
    snapdir = replica.parent / ".mirrorline-snapshots"
    assert re.fullmatch(re.escape(str(snapdir)) + r"/data-\d{8}T\d{6}Z-seq42", out), out
    snap = Path(out)
    assert describe(snap) == before
    assert stat.S_IMODE(snap.stat().st_mode) == stat.S_IMODE(replica.stat().st_mode)
    assert os.listdir(snapdir) == [snap.name]        # no temporary directory left over
    assert describe(replica) == before               # the replica is untouched


def test_snapshot_explicit_dir_and_name(replica: Path, tmp_path: Path) -> None:
    dest = tmp_path / "snaps" / "nested"
    proc = run_task(SNAPSHOT, replica, str(dest), "before-upgrade")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == str(dest / "before-upgrade")
    assert describe(dest / "before-upgrade") == describe(replica)


def test_snapshot_dir_from_environment(replica: Path, tmp_path: Path) -> None:
    env = task_env(replica, seq=7)
    env["MIRRORLINE_SNAPSHOT_DIR"] = str(tmp_path / "envsnaps")
    proc = run_task(SNAPSHOT, replica, env=env)
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.decode().strip())
    assert out.parent == tmp_path / "envsnaps"
    assert out.name.endswith("-seq7")
    assert describe(out) == describe(replica)


def test_snapshot_never_overwrites(replica: Path, tmp_path: Path) -> None:
    existing = tmp_path / "snaps" / "taken"
    existing.mkdir(parents=True)
    (existing / "keep").write_text("old")
    proc = run_task(SNAPSHOT, replica, str(tmp_path / "snaps"), "taken")
    assert proc.returncode != 0
    assert b"already exists" in proc.stderr
    assert os.listdir(existing) == ["keep"]
    assert os.listdir(tmp_path / "snaps") == ["taken"]


@pytest.mark.parametrize("where", ["inside", "relative"])
def test_snapshot_refuses_a_destination_in_the_replica(replica: Path, where: str) -> None:
    before = describe(replica)
    dest = str(replica / "snaps") if where == "inside" else "snaps"
    proc = run_task(SNAPSHOT, replica, dest)
    assert proc.returncode != 0
    assert (b"inside the replica" if where == "inside" else b"absolute") in proc.stderr
    assert describe(replica) == before


def test_snapshot_refuses_a_symlink_leading_into_the_replica(replica: Path,
                                                            tmp_path: Path) -> None:
    (tmp_path / "sneaky").symlink_to(replica / "sub")
    proc = run_task(SNAPSHOT, replica, str(tmp_path / "sneaky"))
    assert proc.returncode != 0
    assert b"inside the replica" in proc.stderr


@pytest.mark.parametrize("script", [SNAPSHOT, MANIFEST], ids=["snapshot", "manifest"])
def test_missing_or_bad_target_path(script: Path, replica: Path, tmp_path: Path) -> None:
    proc = run_task(script, replica, env=task_env(None))
    assert proc.returncode != 0
    assert b"MIRRORLINE_TARGET_PATH is not set" in proc.stderr
    assert proc.stdout == b""

    missing = tmp_path / "gone"
    proc = run_task(script, missing, env=task_env(missing))
    assert proc.returncode != 0
    assert b"not a directory" in proc.stderr

    env = task_env(replica)
    env["MIRRORLINE_TARGET_PATH"] = "relative/path"
    proc = run_task(script, replica, env=env)
    assert proc.returncode != 0
    assert b"absolute" in proc.stderr


# --- manifest -------------------------------------------------------------------------


def parse_manifest(text: bytes) -> list[tuple[bytes, str, int]]:
    entries = []
    assert text.endswith(b"\n")
    for line in text[:-1].split(b"\n"):
        escaped = line.startswith(b"\\")
        if escaped:
            line = line[1:]
        digest, size, path = line.split(b"  ", 2)
        if escaped:
            path = re.sub(rb"\\(.)", lambda m: {b"\\": b"\\", b"n": b"\n", b"r": b"\r"}
                          [m.group(1)], path)
        entries.append((path, digest.decode(), int(size)))
    return entries


def regular_files(top: Path) -> dict[bytes, bytes]:
    return {rel: content for rel, (kind, *_, content) in describe(top).items()
            if kind == stat.S_IFREG}


def test_manifest_lists_every_regular_file(replica: Path) -> None:
    proc = run_task(MANIFEST, replica)
    assert proc.returncode == 0, proc.stderr
    out = Path(os.fsdecode(proc.stdout.rstrip(b"\n")))
    assert out == replica.parent / ".mirrorline-manifests" / "data-seq42.sha256"
    text = out.read_bytes()
    entries = parse_manifest(text)

    paths = [path for path, _, _ in entries]
    assert paths == sorted(paths)
    files = regular_files(replica)
    assert set(paths) == set(files)              # no symlinks, FIFO or directories
    for path, digest, size in entries:
        assert digest == hashlib.sha256(files[path]).hexdigest(), path
        assert size == len(files[path])
    assert NON_UTF8 in paths and b"sub/b.bin" in paths and b"sub/deeper/empty" in paths
    raw_lines = text.split(b"\n")           # escaped as sha256sum does
    assert any(line.startswith(b"\\") and line.endswith(b"  2  new\\nline")
               for line in raw_lines)
    assert any(line.startswith(b"\\") and line.endswith(b"  2  back\\\\slash")
               for line in raw_lines)
    assert os.listdir(out.parent) == [out.name]  # no temporary file left over


def test_manifest_agrees_with_sha256sum(replica: Path) -> None:
    proc = run_task(MANIFEST, replica)
    assert proc.returncode == 0, proc.stderr
    entries = parse_manifest(Path(os.fsdecode(proc.stdout.rstrip(b"\n"))).read_bytes())
    plain = [path for path, _, _ in entries if b"\n" not in path and b"\\" not in path]
    listed = subprocess.run(["sha256sum", "--", *plain], cwd=replica, capture_output=True,
                            check=True).stdout
    expected = {line.split(b"  ", 1)[1]: line.split(b"  ", 1)[0].decode()
                for line in listed.splitlines()}
    assert {p: d for p, d, _ in entries if p in expected} == expected


def test_manifest_explicit_file_and_no_overwrite(replica: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "m.sha256"
    proc = run_task(MANIFEST, replica, str(target))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == str(target)
    first = target.read_bytes()
    assert len(parse_manifest(first)) == len(regular_files(replica))

    proc = run_task(MANIFEST, replica, str(target))
    assert proc.returncode != 0
    assert b"already exists" in proc.stderr
    assert target.read_bytes() == first


@pytest.mark.parametrize("where", ["inside", "relative"])
def test_manifest_refuses_a_file_in_the_replica(replica: Path, where: str) -> None:
    before = describe(replica)
    dest = str(replica / "m" / "x.sha256") if where == "inside" else "x.sha256"
    proc = run_task(MANIFEST, replica, dest)
    assert proc.returncode != 0
    assert (b"inside the replica" if where == "inside" else b"absolute") in proc.stderr
    assert describe(replica) == before


# --- backup-quiesced.sh -----------------------------------------------------------------

FAKE_SYSTEMCTL = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["systemctl", *sys.argv[1:]]) + "\\n")
sys.exit(int(os.environ.get("FAKE_" + sys.argv[1].upper() + "_RC", "0")))
"""

# Answers queuetask and tasks from the JSON in $FAKE_CONFIG: {"queue": {"rc", "result"},
# "tasks": [result, ...]}; successive `tasks` calls get successive results (the last
# repeats).
FAKE_MIRRORLINE = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["mirrorline", *args]) + "\\n")
with open(os.environ["FAKE_CONFIG"]) as fh:
    config = json.load(fh)
words = []
it = iter(args)
for word in it:
    if word == "--socket":
        next(it)
    elif word != "--json":
        words.append(word)
if words[0] == "queuetask":
    answer = config["queue"]
    print(json.dumps(answer["result"]))
    sys.exit(answer["rc"])
if words[0] == "tasks":
    counter = os.environ["FAKE_CONFIG"] + ".count"
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    answer = config["tasks"][min(n, len(config["tasks"]) - 1)]
    print(json.dumps(answer))
    sys.exit(0 if answer.get("ok", True) else answer.get("exit", 1))
sys.exit(2)
"""


def result(data: dict[str, Any], ok: bool = True, exit: int = 0,
           message: str = "") -> dict[str, Any]:
    return {"ok": ok, "exit": exit, "message": message, "data": data}


def tasks_result(*tasks: dict[str, Any]) -> dict[str, Any]:
    return result({"tasks": list(tasks)})


FINAL = ("done", "failed", "timed-out", "interrupted", "refused")


def task(state: str, exit_code: int | None = None, task_id: str = "t-9", output: str = "",
         message: str = "", ended: float | None = None) -> dict[str, Any]:
    """A task record as `mirrorline --json tasks` lists it."""
    if ended is None and state in FINAL:
        ended = 1700000000.0
    return {"id": task_id, "conid": 3, "source": "src1", "seq": 1234, "name": "snapshot",
            "args": [], "trigger": "execute", "timeout": -1.0, "side": "target",
            "state": state, "exit_code": exit_code, "output": output, "message": message,
            "queued": 1699999999.0, "started": 1699999999.5, "ended": ended}


QUEUED_OK = {"rc": 0, "result": result({"task_id": "t-9", "conid": 3})}


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.log = tmp / "calls.log"
        self.config = tmp / "fake.json"
        for path, text in ((self.bin / "mirrorline", FAKE_MIRRORLINE),
                           (tmp / "fake-systemctl", FAKE_SYSTEMCTL)):
            path.write_text(text.replace("{python}", sys.executable))
            path.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORLINE_")}
        self.env.update({
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "MIRRORLINE_SYSTEMCTL": str(tmp / "fake-systemctl"),
            "MIRRORLINE_POLL_INTERVAL": "0.05",
            "FAKE_LOG": str(self.log),
            "FAKE_CONFIG": str(self.config),
        })

    def configure(self, queue: dict[str, Any], tasks: list[dict[str, Any]]) -> None:
        self.config.write_text(json.dumps({"queue": queue, "tasks": tasks}))

    def args(self, *extra: str) -> list[str]:
        return [str(BACKUP), "--service", "db.service", "--conid", "3", "--task", "snapshot",
                "--settle", "0", *extra]

    def run(self, *extra: str, timeout: float = 30,
            **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.args(*extra), capture_output=True, text=True,
                              timeout=timeout, env={**self.env, **env}, check=False)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def steps(self) -> list[str]:
        """The calls as 'stop', 'queuetask', 'start', 'tasks'."""
        steps = []
        for who, *args in self.calls():
            words = [a for a in args if a != "--json"]
            steps.append(words[0] if who == "systemctl" else
                         next(w for w in words if w in ("queuetask", "tasks")))
        return steps


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield Harness(tmp_path)


def test_backup_success_order_and_arguments(harness: Harness) -> None:
    harness.configure(QUEUED_OK, [tasks_result(task("queued")), tasks_result(task("running")),
                                  tasks_result(task("done", 0))])
    proc = harness.run("--socket", "/run/x.sock", "--", "/snaps", "--name", "on=1")
    assert proc.returncode == 0, proc.stderr
    steps = harness.steps()
    assert steps[:3] == ["stop", "queuetask", "start"]
    assert steps[3:] == ["tasks"] * 3
    calls = harness.calls()
    assert calls[0] == ["systemctl", "stop", "db.service"]
    assert calls[2] == ["systemctl", "start", "db.service"]
    queued = calls[1][1:]
    assert "--wait" not in queued
    assert queued == ["--json", "--socket", "/run/x.sock", "queuetask", "3", "snapshot",
                      "--", "/snaps", "--name", "on=1"]
    assert calls[3][1:] == ["--json", "--socket", "/run/x.sock", "tasks", "3"]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert "t-9" in lines[0] and "done" in lines[0] and "db.service was down" in lines[0]


def test_backup_passes_trigger_and_task_timeout(harness: Harness) -> None:
    harness.configure(QUEUED_OK, [tasks_result(task("done", 0))])
    proc = harness.run("--on", "receive", "--task-timeout=10m")
    assert proc.returncode == 0, proc.stderr
    queued = harness.calls()[1][1:]
    assert queued == ["--json", "queuetask", "3", "snapshot", "on=receive", "timeout=10m", "--"]


@pytest.mark.parametrize(("final", "expected"), [
    (task("done", 0), 0),
    (task("failed", 7, output="disk full"), 7),
    (task("failed", 300), 1),
    (task("failed", -9), 1),
    (task("refused", message="task processing is disabled on the target"), 1),
    (task("interrupted"), 1),
    (task("timed-out", 0), 1),
], ids=["done", "exit7", "exit300", "signal", "refused", "interrupted", "timed-out"])
def test_backup_exit_mirrors_the_task(harness: Harness, final: dict[str, Any],
                                      expected: int) -> None:
    other = task("done", 0, task_id="t-8")  # another task on the connection: not ours
    harness.configure(QUEUED_OK, [tasks_result(other, task("running")),
                                  tasks_result(other, final)])
    proc = harness.run()
    assert proc.returncode == expected, (proc.stdout, proc.stderr)
    assert harness.steps() == ["stop", "queuetask", "start", "tasks", "tasks"]
    assert final["state"] in proc.stdout
    if final["output"]:
        assert final["output"] in proc.stderr
    if final["message"]:
        assert final["message"] in proc.stdout


def test_backup_waits_for_a_timed_out_task_to_end(harness: Harness) -> None:
    """timed-out means op processing stopped waiting; the task's result comes later."""
    running_on = {**task("timed-out"), "ended": None}
    harness.configure(QUEUED_OK, [tasks_result(task("running")), tasks_result(running_on),
                                  tasks_result(running_on), tasks_result(task("timed-out", 0))])
    proc = harness.run()
    assert proc.returncode == 1, proc.stderr
    assert harness.steps() == ["stop", "queuetask", "start"] + ["tasks"] * 4
    assert "timed-out, exit code 0" in proc.stdout


def test_backup_keeps_polling_while_the_task_is_not_listed(harness: Harness) -> None:
    harness.configure(QUEUED_OK, [tasks_result(), tasks_result(task("failed", 7))])
    proc = harness.run()
    assert proc.returncode == 7
    assert harness.steps() == ["stop", "queuetask", "start", "tasks", "tasks"]


def test_backup_refused_at_queue_time_still_restarts(harness: Harness) -> None:
    refusal = result({}, ok=False, exit=1,
                     message="task 'snapshot' is not an executable file in task_dir")
    harness.configure({"rc": 1, "result": refusal}, [])
    proc = harness.run()
    assert proc.returncode == 1
    assert harness.steps() == ["stop", "queuetask", "start"]
    assert "not an executable file in task_dir" in proc.stdout


def test_backup_daemon_unreachable_still_restarts(harness: Harness) -> None:
    harness.configure({"rc": 3, "result": result({}, ok=False, exit=3,
                                                 message="cannot connect")}, [])
    proc = harness.run()
    assert proc.returncode == 1
    assert harness.steps() == ["stop", "queuetask", "start"]
    assert "unreachable" in proc.stdout


def test_backup_missing_cli_still_restarts(harness: Harness) -> None:
    harness.configure(QUEUED_OK, [])
    proc = harness.run(MIRRORLINE_CLI=str(harness.tmp / "no-such-cli"))
    assert proc.returncode == 1
    assert harness.steps() == ["stop", "start"]


def test_backup_stop_failure_queues_nothing(harness: Harness) -> None:
    harness.configure(QUEUED_OK, [tasks_result(task("done", 0))])
    proc = harness.run(FAKE_STOP_RC="5")
    assert proc.returncode == 1
    assert harness.steps() == ["stop", "start"]
    assert "could not stop" in proc.stdout


def test_backup_start_failure_is_an_error(harness: Harness) -> None:
    harness.configure(QUEUED_OK, [tasks_result(task("done", 0))])
    proc = harness.run(FAKE_START_RC="1")
    assert proc.returncode == 1
    assert harness.steps() == ["stop", "queuetask", "start", "tasks"]
    assert "FAILED TO START" in proc.stdout
    assert "DOWN" in proc.stderr


def test_backup_timeout_exits_4(harness: Harness) -> None:
    harness.configure(QUEUED_OK, [tasks_result(task("running"))])
    started = time.monotonic()
    proc = harness.run("--timeout", "1")
    elapsed = time.monotonic() - started
    assert proc.returncode == 4, proc.stderr
    assert 0.9 <= elapsed < 10
    assert harness.steps()[:3] == ["stop", "queuetask", "start"]
    assert "still running" in proc.stdout


def test_backup_interrupted_during_settle_restarts(harness: Harness) -> None:
    harness.configure(QUEUED_OK, [tasks_result(task("done", 0))])
    args = harness.args()
    args[args.index("--settle") + 1] = "60"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=harness.env)
    try:
        deadline = time.monotonic() + 20
        while harness.steps() != ["stop"]:
            assert time.monotonic() < deadline, "the script never stopped the service"
            time.sleep(0.02)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    assert harness.steps() == ["stop", "start"]
    assert "terminated" in out


@pytest.mark.parametrize("args", [
    ["--conid", "3", "--task", "x"],
    ["--service", "u", "--task", "x"],
    ["--service", "u", "--conid", "*", "--task", "x"],
    ["--service", "u", "--conid", "3", "--task", "x", "--settle", "soon"],
    ["--service", "u", "--conid", "3", "--task", "x", "--timeout", "1.5"],
    ["--service", "u", "--conid", "3", "--task", "x", "stray"],
    ["--service", "u", "--conid", "3", "--task", "x", "--bogus", "1"],
])
def test_backup_usage_errors_touch_nothing(harness: Harness, args: list[str]) -> None:
    harness.configure(QUEUED_OK, [])
    proc = subprocess.run([str(BACKUP), *args], capture_output=True, text=True, timeout=30,
                          env=harness.env, check=False)
    assert proc.returncode == 2
    assert harness.calls() == []


# --- static checks ----------------------------------------------------------------------


@pytest.mark.parametrize("script", [SNAPSHOT, MANIFEST, BACKUP], ids=lambda p: p.name)
def test_scripts_are_executable(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", [SNAPSHOT, BACKUP], ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout


def test_manifest_compiles() -> None:
    compile(MANIFEST.read_text(), str(MANIFEST), "exec")
