"""``mirrorline run <script>`` (issue 7, test f): a script stops at its first failing command.

The agent is the canned control-socket server of ``test_cli_client``: what is under test is
the CLI, which lines it sends, in which order, and the exit code and message it ends with.
One test runs the installed CLI as a process, so the exit code is the process's own.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_cli_client import (
    CannedServer,
    Handler,
    Reply,
    cli,
    result,
    serve,
    short_dir,
)

# the fixtures are used by parameter name; listing them marks the imports as used
__all__ = ["serve", "short_dir"]

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """\
# nightly: pause, snapshot on the target, resume
replication stop 1

queuetask 1 "snap shot.sh" 'two words' --wait   # the task fails with its exit code 7
replication start 1
"""


def task_fails_with_7(request: dict[str, Any]) -> list[Reply]:
    if request["command"] == "queuetask":
        return [result(ok=False, exit=7, message="task snap shot.sh exited with 7")]
    return [result(message=f"{request['command']} ok")]


def test_f_second_command_fails_so_the_script_stops_there_with_its_exit_code(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str],
    short_dir: Path,
) -> None:
    server = serve(task_fails_with_7)
    script = short_dir / "nightly.txt"
    script.write_text(SCRIPT)
    code, out, err = cli(capsys, "--socket", server.path, "run", str(script))
    assert code == 7
    assert [r["command"] for r in server.requests] == ["replication_stop", "queuetask"]
    queued = server.requests[1]["args"]
    assert (queued["task"], queued["args"], queued["wait"]) == ("snap shot.sh", ["two words"],
                                                                True)
    assert out.splitlines() == ["replication_stop ok"]
    assert "task snap shot.sh exited with 7" in err
    assert err.splitlines()[-1] == (
        f"{script}:4: failed with exit 7: "
        "queuetask 1 \"snap shot.sh\" 'two words' --wait   # the task fails with its exit code 7"
    )


def test_f_as_a_process(serve: Callable[[Handler], CannedServer], short_dir: Path) -> None:
    server = serve(task_fails_with_7)
    script = short_dir / "nightly.txt"
    script.write_text(SCRIPT)
    env = {**os.environ, "MIRRORLINE_SOCKET": server.path}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "run", str(script)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 7, done.stderr
    assert [r["command"] for r in server.requests] == ["replication_stop", "queuetask"]
    assert f"{script}:4: failed with exit 7" in done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr + done.stdout


def test_unreachable_second_command_stops_with_exit_3(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str],
    short_dir: Path,
) -> None:
    server = serve(lambda request: [result(message="ok")])
    script = short_dir / "s.txt"
    script.write_text(f"status\nstatus --socket {short_dir / 'gone.sock'}\nstatus\n")
    code, _, err = cli(capsys, "--socket", server.path, "run", str(script))
    assert code == 3
    assert len(server.requests) == 1
    assert "cannot reach" in err and f"{script}:2: failed with exit 3" in err


def test_json_run_prints_one_result_line_per_command_that_ran(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str],
    short_dir: Path,
) -> None:
    server = serve(task_fails_with_7)
    script = short_dir / "nightly.txt"
    script.write_text(SCRIPT)
    code, out, err = cli(capsys, "--json", "--socket", server.path, "run", str(script))
    assert code == 7
    results = [json.loads(line) for line in out.splitlines()]
    assert [(r["ok"], r["exit"]) for r in results] == [(True, 0), (False, 7)]
    failure = json.loads(err.splitlines()[-1])
    assert (failure["script"], failure["line"], failure["exit"]) == (str(script), 4, 7)


def test_a_script_that_succeeds_exits_0_and_reads_stdin(
    serve: Callable[[Handler], CannedServer], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = serve(lambda request: [result(message="done")])
    stdin = io.TextIOWrapper(io.BytesIO(b"# only comments and one command\n\nSTATUS *\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, _ = cli(capsys, "--socket", server.path, "run", "-")
    assert code == 0
    assert out.splitlines() == ["done"]
    assert [r["command"] for r in server.requests] == ["status"]
