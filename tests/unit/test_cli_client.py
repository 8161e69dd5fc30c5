"""The real CLI ``main()`` against a small Unix-socket server that answers canned lines.

The server thread is test scaffolding: it records each request and replies with the lines
a test gives it. What is under test is the CLI: the request it sends, what it prints, and
its exit code.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.main import main

Reply = dict[str, Any] | bytes | float  # a response object, raw bytes, or a pause (seconds)
Handler = Callable[[dict[str, Any]], Iterable[Reply]]


def result(ok: bool = True, exit: int = 0, message: str = "", **data: Any) -> dict[str, Any]:
    return {"type": "result", "ok": ok, "exit": exit, "message": message, "data": data}


def progress(message: str, **fields: Any) -> dict[str, Any]:
    return {"type": "progress", "message": message, **fields}


class CannedServer:
    """Accepts connections one at a time; answers each request with ``handler(request)``."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        conn.settimeout(5)
        while b"\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        request = json.loads(data.split(b"\n", 1)[0])
        self.requests.append(request)
        try:
            for reply in self.handler(request):
                if isinstance(reply, float):
                    if self.stop.wait(reply):
                        return
                elif isinstance(reply, bytes):
                    conn.sendall(reply)
                else:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass  # the client went away (a client-side timeout)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="ml-cli-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(short_dir: Path) -> Iterator[Callable[[Handler], CannedServer]]:
    servers: list[CannedServer] = []

    def start(handler: Handler) -> CannedServer:
        server = CannedServer(str(short_dir / f"ctl{len(servers)}.sock"), handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


SOURCE_STATUS: dict[str, Any] = {
    "role": "source",
    "node": "src1",
    "volumes": [{"name": "data", "path": "/srv/data", "mounted": True, "captured_seq": 1234}],
    "connections": [
        {"id": 1, "volume": "data", "target": "127.0.0.1:7100", "state": "replicating",
         "restore_required": False, "mirror_required": True, "acked_seq": 1200,
         "captured_seq": 1234, "queue_bytes": 4096, "lag_seconds": 0.25},
        {"id": 2, "volume": "data", "target": "10.0.0.2:7100", "state": "stopped",
         "restore_required": True, "mirror_required": False, "acked_seq": 17,
         "captured_seq": 1234, "queue_bytes": 5 * 1024 * 1024, "lag_seconds": None},
    ],
}
TARGET_STATUS: dict[str, Any] = {
    "role": "target",
    "node": "tgt1",
    "connections": [
        {"source": "src1", "id": 1, "applied_seq": 99, "state": "applying",
         "restore_required": True},
    ],
}
#: 2024-05-01 12:00:00 UTC: the tests render times with TZ=UTC.
NOON = 1714564800.0


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def full_source_status(now: float) -> dict[str, Any]:
    """What a source agent of this version says, one connection per data state."""
    return {
        "role": "source", "node": "src1",
        "config": {"path": "/etc/mirrorline/source.toml", "loaded_at": now - 7200,
                   "last_reload": {"time": now - 90, "ok": False, "changed": [],
                                   "restart_required": [],
                                   "errors": ["/etc/mirrorline/source.toml: "
                                              "connection[0].colour: unknown key"]},
                   "restart_required": ["state_dir"], "log_level": "info",
                   "log_level_override": None},
        "volumes": [{"name": "data", "path": "/srv/data", "mounted": True,
                     "captured_seq": 1234, "journal_memory_bytes": 3 * 1024 * 1024,
                     "journal_disk_bytes": 12 * 1024 * 1024,
                     "journal_disk_limit": 8 * 1024 ** 3}],
        "connections": [
            {"id": 1, "target": "127.0.0.1:7100", "state": "replicating",
             "data_state": "mirror required", "mirror_required": True,
             "mirror_reason": "the volume held data when the connection was made",
             "queue_ops": 34, "queue_bytes": 4096, "lag_seconds": 0.25, "unsent_ops": 0,
             "bandwidth_limit": 1024 * 1024, "bandwidth_configured": 4 * 1024 * 1024,
             "bandwidth_window": 0, "compression": "zstd", "compression_active": "",
             "last_task": {"id": "t-12", "name": "snap.sh", "state": "done", "exit_code": 0},
             "last_error": "",
             "last_error_time": now - 300,
             "recent_error": {"message": "connection refused", "first_seen": now - 400,
                              "last_seen": now - 300, "count": 3, "cleared_at": now - 250}},
            {"id": 2, "target": "10.0.0.2:7100", "state": "error",
             "data_state": "restore required", "restore_required": True,
             "queue_ops": 1034, "queue_bytes": 5 * 1024 * 1024, "lag_seconds": 3725.0,
             "unsent_ops": 1034, "bandwidth_limit": None, "bandwidth_configured": None,
             "bandwidth_window": None, "compression": "zstd", "compression_active": "",
             "last_task": None, "last_error": "target refused: wrong key (auth)",
             "last_error_time": now - 5,
             "recent_error": {"message": "target refused: wrong key (auth)",
                              "first_seen": now - 5, "last_seen": now - 5, "count": 1,
                              "cleared_at": None}},
        ],
    }


def test_status_prints_a_table_and_sends_the_request(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [result(**SOURCE_STATUS)])
    code, out, err = cli(capsys, "--socket", server.path, "STATUS")
    assert code == 0
    assert server.requests == [{"command": "status", "args": {"conid": None}}]
    lines = out.splitlines()
    assert lines[0] == "source src1"
    assert "volume data  /srv/data  mounted  captured_seq 1234" in lines
    header = next(line for line in lines if line.startswith("ID"))
    assert header.split() == ["ID", "TARGET", "STATE", "DATA", "LAG-OPS", "LAG-BYTES",
                              "LAG-TIME", "UNSENT", "BANDWIDTH", "COMPRESSION"]
    # An older agent's status (no data_state, lag ops or bandwidth): "-" where unknown.
    row1 = next(line for line in lines if line.startswith("1 "))
    assert row1.split() == ["1", "127.0.0.1:7100", "replicating", "mirror", "required", "-",
                            "4.0", "KiB", "0.2s", "-", "-", "-"]
    row2 = next(line for line in lines if line.startswith("2 "))
    assert "restore required" in row2 and "5.0 MiB" in row2 and "-" in row2.split()
    assert err == ""


def test_status_shows_everything_per_connection_aligned(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str], utc: None
) -> None:
    now = time.time()
    server = serve(lambda request: [result(**full_source_status(now))])
    code, out, err = cli(capsys, "--socket", server.path, "status")
    assert code == 0 and err == ""
    lines = out.splitlines()
    loaded = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now - 7200))
    assert lines[:5] == [
        "source src1",
        f"config /etc/mirrorline/source.toml  loaded {loaded} (2h ago)",
        f"  last reload {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(now - 90))} (1m ago): "
        "REJECTED, still running on the config loaded before",
        "    /etc/mirrorline/source.toml: connection[0].colour: unknown key",
        "  restart required for state_dir (changed in the file; the running values stay "
        "until a restart)",
    ]
    assert lines[5] == ("volume data  /srv/data  mounted  captured_seq 1234  queue 3.0 MiB "
                        "memory, 12.0 MiB disk (limit 8.0 GiB)")
    table = lines[6:9]
    assert table[0].split() == ["ID", "TARGET", "STATE", "DATA", "LAG-OPS", "LAG-BYTES",
                                "LAG-TIME", "UNSENT", "BANDWIDTH", "COMPRESSION"]
    assert table[1].split() == ["1", "127.0.0.1:7100", "replicating", "mirror", "required",
                                "34", "4.0", "KiB", "0.2s", "0", "1.0", "MiB/s", "zstd",
                                "(declined)"]     # the target did not take zstd
    assert table[2].split() == ["2", "10.0.0.2:7100", "error", "restore", "required", "1034",
                                "5.0", "MiB", "1h02m", "1034", "unlimited", "zstd"]
    # Columns line up: every cell starts where its header does (left-aligned ones) or
    # ends where it ends (the numbers).
    for name in ("TARGET", "STATE", "DATA", "BANDWIDTH", "COMPRESSION"):
        col = table[0].index(name)
        assert all(row[col - 2:col] == "  " and row[col] != " " for row in table[1:]), name
    for name in ("LAG-OPS", "LAG-BYTES", "LAG-TIME", "UNSENT"):
        end = table[0].index(name) + len(name)
        assert all(row[end - 1] != " " and row[end:end + 2] == "  " for row in table[1:]), name
    last_seen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now - 300))

    def clock(t: float) -> str:    # the time of day alone when on the day of last_seen
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
        return stamp.removeprefix(last_seen[:11])
    first_seen, cleared = clock(now - 400), clock(now - 250)
    details = lines[9:]
    assert details[:6] == [
        "connection 1",
        "  mirror required  the volume held data when the connection was made",
        "  bandwidth        1.0 MiB/s from bandwidth_schedule window 0 (bandwidth = "
        "4.0 MiB/s)",
        "  last task        t-12 snap.sh done (exit 0)",
        f"  last error       {last_seen} (5m ago), 3 times since {first_seen}, "
        f"cleared {cleared}: connection refused",
        "connection 2",
    ]
    failing = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now - 5))
    assert details[6:] == [
        f"  last error  {failing} (5s ago): target refused: wrong key (auth)"]


def test_status_output_is_plain_text_when_piped(
    serve: Callable[[Handler], CannedServer], short_dir: Path
) -> None:
    # The real CLI in a child process, its stdout a pipe: no escapes, no carriage returns.
    server = serve(lambda request: [result(**full_source_status(time.time()))])
    done = subprocess.run([str(Path(sys.executable).parent / "mirrorline"), "--socket",
                           server.path, "status"], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\r" not in done.stdout
    assert "last error" in done.stdout and "COMPRESSION" in done.stdout


def test_target_status_table(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [result(**TARGET_STATUS)])
    code, out, _ = cli(capsys, "--socket", server.path, "status", "1")
    assert code == 0
    assert server.requests[0]["args"] == {"conid": 1}
    lines = out.splitlines()
    assert lines[0] == "target tgt1"
    assert lines[1].split() == ["SOURCE", "ID", "STATE", "DATA", "APPLIED", "RECEIVED",
                                "BACKLOG"]
    assert lines[2].split() == ["src1", "1", "applying", "restore", "required", "99", "-",
                                "-"]


def test_target_status_shows_backlog_and_last_error(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str], utc: None
) -> None:
    now = time.time()
    status: dict[str, Any] = {"role": "target", "node": "tgt1", "connections": [
        {"source": "src1", "id": 3, "state": "paused", "data_state": "good",
         "applied_seq": 90, "received_seq": 120, "last_error": "ENOSPC: apply failed",
         "last_error_time": now - 30,
         "recent_error": {"message": "ENOSPC: apply failed", "first_seen": now - 30,
                          "last_seen": now - 30, "count": 1, "cleared_at": None}}]}
    server = serve(lambda request: [result(**status)])
    code, out, _ = cli(capsys, "--socket", server.path, "status")
    assert code == 0
    lines = out.splitlines()
    assert lines[2].split() == ["src1", "3", "paused", "good", "90", "120", "30"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now - 30))
    assert lines[3:] == ["connection 3 from src1",
                         f"  last error  {stamp} (30s ago): ENOSPC: apply failed"]


def test_json_prints_exactly_the_result_and_progress_as_json_lines(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [progress("connecting", step=1), progress("checking"),
                                    result(**SOURCE_STATUS)])
    code, out, err = cli(capsys, "status", "--json", "--socket", server.path)
    assert code == 0
    assert out.count("\n") == 1
    assert json.loads(out) == {"ok": True, "exit": 0, "message": "", "data": SOURCE_STATUS}
    events = [json.loads(line) for line in err.splitlines()]
    assert events == [progress("connecting", step=1), progress("checking")]


def test_progress_lines_and_message_in_human_mode(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [progress("mirroring 10%"), progress("", percent=50),
                                    result(message="mirror of 1 complete")])
    code, out, err = cli(capsys, "--socket", server.path, "mirror", "start", "1", "--wait")
    assert code == 0
    assert err.splitlines() == ["mirroring 10%", "percent=50"]
    assert out.splitlines() == ["mirror of 1 complete"]
    assert server.requests[0] == {
        "command": "mirror",
        "args": {"action": "start", "conid": 1, "mode": "full", "newer": False,
                 "orphans": None, "wait": True},
    }


def test_failure_exits_1_with_the_message_on_stderr(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    message = "restore required on 1; use 'replication start 1 clearrestorerequired'"
    server = serve(lambda request: [result(ok=False, exit=1, message=message)])
    code, out, err = cli(capsys, "--socket", server.path, "replication", "start", "1")
    assert code == 1
    assert out == ""
    assert err.strip() == message
    assert server.requests == [{"command": "replication_start",
                                "args": {"conid": 1, "clear_restore_required": False}}]


def test_task_exit_code_passes_through(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [result(ok=False, exit=7, message="task 3 exited 7")])
    code, out, _ = cli(capsys, "--json", "--socket", server.path, "queuetask", "1", "snap",
                       "--wait")
    assert code == 7
    assert json.loads(out)["exit"] == 7
    args = server.requests[0]["args"]
    assert (args["task"], args["wait"], args["wait_timeout"]) == ("snap", True, None)


def test_failed_result_without_a_failing_code_exits_1(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [result(ok=False, exit=0, message="odd")])
    assert cli(capsys, "--socket", server.path, "disconnect", "*")[0] == 1


def test_connect_shows_the_new_conid(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, short_dir: Path,
) -> None:
    server = serve(lambda request: [result(message="connected", id=5)])
    monkeypatch.chdir(short_dir)
    code, out, _ = cli(capsys, "--socket", server.path, "connect", "data", "to", "t:7100",
                       "map", "data", "key", "k.key")
    assert code == 0
    assert out.splitlines() == ["connected", "connection 5"]
    assert server.requests[0]["args"]["key_file"] == str(short_dir / "k.key")


def test_socket_comes_from_the_environment(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, short_dir: Path,
) -> None:
    server = serve(lambda request: [result(message="ok")])
    monkeypatch.setenv("MIRRORLINE_SOCKET", server.path)
    assert cli(capsys, "tasks")[0] == 0
    assert server.requests == [{"command": "tasks", "args": {"conid": None}}]
    # --socket wins over the environment
    code, _, err = cli(capsys, "--socket", str(short_dir / "none.sock"), "tasks")
    assert code == 3 and "none.sock" in err


def test_missing_socket_exits_3_naming_the_path(
    capsys: pytest.CaptureFixture[str], short_dir: Path
) -> None:
    path = str(short_dir / "source.sock")
    code, out, err = cli(capsys, "--socket", path, "status")
    assert code == 3
    assert out == ""
    assert path in err and "systemctl status mirrorline-source" in err
    code, out, _ = cli(capsys, "--json", "--socket", str(short_dir / "target.sock"), "status")
    body = json.loads(out)
    assert (code, body["ok"], body["exit"]) == (3, False, 3)
    assert "systemctl status mirrorline-target" in body["message"]


def test_refused_connection_exits_3(capsys: pytest.CaptureFixture[str], short_dir: Path) -> None:
    path = str(short_dir / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a socket file nobody listens on, as after a crash
    stale.close()
    code, _, err = cli(capsys, "--socket", path, "status")
    assert code == 3
    assert "connection refused" in err and path in err


def test_not_a_socket_exits_3(capsys: pytest.CaptureFixture[str], short_dir: Path) -> None:
    path = short_dir / "plain"
    path.write_text("")
    code, _, err = cli(capsys, "--socket", str(path), "status")
    assert code == 3 and str(path) in err


def test_permission_denied_exits_3(
    serve: Callable[[Handler], CannedServer], short_dir: Path
) -> None:
    server = serve(lambda request: [result()])
    os.chmod(short_dir, 0o755)
    os.chmod(server.path, 0o600)
    if os.geteuid() != 0:
        pytest.skip("needs a socket owned by another user: run as root to cover this")
    # Root bypasses the socket's mode: run main() in a child that has dropped to nobody.
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            stream = io.StringIO()
            import sys

            sys.stdout = sys.stderr = stream
            code = main(["--socket", server.path, "status"])
            os.write(write_fd, json.dumps([code, stream.getvalue()]).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    code, text = json.loads(data)
    assert code == 3
    assert "permission denied" in text and server.path in text
    assert server.requests == []


def test_client_deadline_exits_4(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [progress("waiting"), 30.0, result()])
    started = time.monotonic()
    code, _, err = cli(capsys, "--socket", server.path, "wait", "queue", "1",
                       "--timeout", "0.1")
    elapsed = time.monotonic() - started
    assert code == 4
    assert "timed out after 0.1 s" in err
    assert elapsed < 3
    assert server.requests == [{"command": "wait_queue", "args": {"conid": 1, "timeout": 0.1}}]


def test_agent_timeout_result_exits_4_with_its_message(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [result(ok=False, exit=4, message="queue not empty after 1 s")])
    code, _, err = cli(capsys, "--socket", server.path, "wait", "queue", "*", "--timeout", "1")
    assert code == 4 and "queue not empty" in err


def test_no_client_deadline_without_timeout(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [0.3, result(message="drained")])
    code, out, _ = cli(capsys, "--socket", server.path, "wait", "queue", "1")
    assert (code, out.strip()) == (0, "drained")


def test_connection_closed_before_result_exits_3(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [progress("working")])
    code, _, err = cli(capsys, "--socket", server.path, "verify", "1")
    assert code == 3
    assert "closed the connection before answering" in err


@pytest.mark.parametrize("reply", [b"not json\n", b'["list"]\n', b'{"type": "result"}\n'])
def test_garbage_response_exits_1(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str], reply: bytes
) -> None:
    server = serve(lambda request: [reply])
    code, _, err = cli(capsys, "--socket", server.path, "status")
    assert code == 1
    assert "bad res" in err


def test_usage_error_exits_2_without_contacting_the_daemon(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [result()])
    code, out, err = cli(capsys, "--socket", server.path, "replication", "begin", "1")
    assert code == 2
    assert "expected start|stop" in err and "usage: mirrorline replication" in err
    code, out, _ = cli(capsys, "--json", "--socket", server.path, "status", "x")
    assert code == 2 and json.loads(out)["exit"] == 2
    assert cli(capsys)[0] == 2
    assert server.requests == []


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and "queuetask" in out and "Exit codes" in out


def test_command_help_shows_its_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "wait", "--help")
    assert code == 0 and err == ""
    assert out.startswith("usage: mirrorline wait queue") and "\nExit codes:\n" in out
    assert "  4  timed out" in out
    assert cli(capsys, "help", "wait")[1] == out
    code, out, _ = cli(capsys, "--json", "status", "--help")
    assert code == 0 and "Exit codes" in json.loads(out)["message"]


def _version() -> str:
    from importlib.metadata import version

    return version("mirrorline")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--version")
    assert (code, out) == (0, f"mirrorline {_version()}\n")
    code, out, _ = cli(capsys, "--json", "--version")
    assert code == 0 and json.loads(out)["data"] == {"version": _version()}


def test_start_up_imports_stay_lean() -> None:
    # every scripted command pays the CLI's start-up (issue 5, W9): no pydantic, trio,
    # structlog, msgpack, nor typing/dataclasses on the way to parsing a command;
    # --version adds importlib.metadata (which imports typing), nothing of ours
    code = (
        "import sys\n"
        "from cli.main import main\n"
        "heavy = {'pydantic', 'trio', 'structlog', 'msgpack', 'typing', 'dataclasses'}\n"
        "main(['help', 'status'])\n"
        "main(['--json', 'status', '1', '--socket', '/nonexistent/ml.sock'])\n"
        "print(sorted(heavy & set(sys.modules)))\n"
        "main(['--version'])\n"
        "print(sorted(heavy - {'typing'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False, cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.splitlines()[-3:] == ["[]", "mirrorline " + _version(), "[]"], done


def test_piped_output_has_no_terminal_escapes(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(lambda request: [progress("copying", percent=12.5),
                                    progress("copying", percent=60.0),
                                    result(message="mirror done", files=3)])
    code, out, err = cli(capsys, "--socket", server.path, "mirror", "start", "1", "--wait")
    assert code == 0
    assert err.splitlines() == ["copying", "copying"]
    assert out.splitlines() == ["mirror done"]
    assert "\r" not in out + err and "\x1b" not in out + err


# --- run <script> ---------------------------------------------------------------------


def test_run_stops_at_the_first_failure(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str],
    short_dir: Path,
) -> None:
    def handler(request: dict[str, Any]) -> list[Reply]:
        if request["command"] == "replication_start":
            return [result(ok=False, exit=1, message="restore required on 2")]
        return [result(message=f"{request['command']} ok")]

    server = serve(handler)
    script = short_dir / "nightly.txt"
    script.write_text(
        "# nightly job\n"
        "\n"
        "replication stop 2   # pause it\n"
        "REPLICATION START 2\n"
        "queuetask 2 snap.sh\n"
    )
    code, out, err = cli(capsys, "--socket", server.path, "run", str(script))
    assert code == 1
    assert [r["command"] for r in server.requests] == ["replication_stop", "replication_start"]
    assert out.splitlines() == ["replication_stop ok"]
    assert "restore required on 2" in err
    assert f"{script}:4: failed with exit 1: REPLICATION START 2" in err


def test_run_checks_every_line_before_running_any(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str],
    short_dir: Path,
) -> None:
    server = serve(lambda request: [result()])
    script = short_dir / "bad.txt"
    script.write_text("status\nreplication start 1 now\n")
    code, _, err = cli(capsys, "--socket", server.path, "run", str(script))
    assert code == 2
    assert f"{script}:2:" in err and "nothing was run" in err
    assert server.requests == []


def test_run_passes_exit_codes_and_socket_per_line(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str],
    short_dir: Path,
) -> None:
    source = serve(lambda request: [result(message="source")])
    target = serve(lambda request: [result(ok=False, exit=4, message="slow")])
    script = short_dir / "s.txt"
    script.write_text(f"mirrorline status\n--socket {target.path} wait queue * --timeout 9\n")
    code, out, err = cli(capsys, "--json", "--socket", source.path, "run", str(script))
    assert code == 4
    assert [json.loads(line)["message"] for line in out.splitlines()] == ["source", "slow"]
    assert json.loads(err.splitlines()[-1])["line"] == 2
    assert len(source.requests) == len(target.requests) == 1


def test_run_unreadable_script_fails(capsys: pytest.CaptureFixture[str], short_dir: Path) -> None:
    code, _, err = cli(capsys, "run", str(short_dir / "missing.txt"))
    assert code == 1 and "cannot read" in err


def test_run_refuses_nested_run(capsys: pytest.CaptureFixture[str], short_dir: Path) -> None:
    script = short_dir / "loop.txt"
    script.write_text(f"run {script}\n")
    code, _, err = cli(capsys, "run", str(script))
    assert code == 2 and "inside a script" in err


# --- keygen -------------------------------------------------------------------------------


def test_keygen_writes_a_0600_hex_key(capsys: pytest.CaptureFixture[str], short_dir: Path) -> None:
    path = short_dir / "src1.key"
    old_umask = os.umask(0)
    try:
        code, _, _ = cli(capsys, "keygen", str(path))
    finally:
        os.umask(old_umask)
    assert code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_bytes()
    assert len(content) == 65 and content.endswith(b"\n")
    assert len(bytes.fromhex(content[:64].decode())) == 32


def test_keygen_refuses_to_overwrite_without_force(
    capsys: pytest.CaptureFixture[str], short_dir: Path
) -> None:
    path = short_dir / "k.key"
    path.write_text("precious\n")
    path.chmod(0o644)
    code, _, err = cli(capsys, "keygen", str(path))
    assert code == 1 and "--force" in err
    assert path.read_text() == "precious\n"
    code, _, _ = cli(capsys, "keygen", str(path), "--force")
    assert code == 0
    assert path.read_text() != "precious\n" and len(path.read_text()) == 65
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in short_dir.iterdir()) == ["k.key"]  # no temporary left


def test_keygen_to_stdout_differs_each_time(capsys: pytest.CaptureFixture[str]) -> None:
    code, first, _ = cli(capsys, "keygen")
    _, second, _ = cli(capsys, "keygen")
    assert code == 0
    assert len(first) == 65 and first.endswith("\n") and first != second
    bytes.fromhex(first.strip())
    _, out, _ = cli(capsys, "--json", "keygen")
    assert len(json.loads(out)["data"]["key"]) == 64


def test_keygen_into_a_missing_directory_fails(
    capsys: pytest.CaptureFixture[str], short_dir: Path
) -> None:
    code, _, err = cli(capsys, "keygen", str(short_dir / "no" / "k.key"))
    assert code == 1 and "cannot write" in err
