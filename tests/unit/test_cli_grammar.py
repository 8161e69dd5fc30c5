"""The CLI grammar: command words → control requests, and the usage errors."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from cli.grammar import (
    _PARSERS,
    SYNOPSIS,
    Help,
    Keygen,
    Remote,
    RunScript,
    UsageError,
    Version,
    check_host_port,
    parse_argv,
    parse_command,
    parse_duration,
    parse_request,
    split_script_line,
    usage,
)


def request(line: str) -> tuple[str, dict[str, Any]]:
    parsed = parse_request(shlex.split(line))
    return parsed.command, parsed.args


def usage_error(line: str) -> str:
    with pytest.raises(UsageError) as info:
        parse_command(shlex.split(line))
    return str(info.value)


QT_DEFAULTS: dict[str, Any] = {
    "args": [], "trigger": "execute", "timeout": -1.0, "wait": False, "wait_timeout": None,
}
MIRROR_DEFAULTS: dict[str, Any] = {
    "mode": None, "newer": False, "orphans": None, "wait": False,
}


@pytest.mark.parametrize(
    ("line", "command", "args"),
    [
        ("status", "status", {"conid": None}),
        ("status 3", "status", {"conid": 3}),
        ("STATUS *", "status", {"conid": "*"}),
        ("replication start 1", "replication_start", {"conid": 1, "clear_restore_required": False}),
        ("Replication START * ClearRestoreRequired", "replication_start",
         {"conid": "*", "clear_restore_required": True}),
        ("replication stop 12", "replication_stop", {"conid": 12}),
        ("connect data to 127.0.0.1:7100 map data", "connect",
         {"volume": "data", "target": "127.0.0.1:7100", "target_path": "data", "key_file": None}),
        ("CONNECT Data TO tgt-1.example.com:7100 MAP Sub/Dir KEY /etc/k.key", "connect",
         {"volume": "Data", "target": "tgt-1.example.com:7100", "target_path": "Sub/Dir",
          "key_file": "/etc/k.key"}),
        ("connect data to [::1]:7100 map data", "connect",
         {"volume": "data", "target": "[::1]:7100", "target_path": "data", "key_file": None}),
        ("disconnect *", "disconnect", {"conid": "*"}),
        ("disconnect 4", "disconnect", {"conid": 4}),
        ("wait queue 1", "wait_queue", {"conid": 1, "timeout": None}),
        ("WAIT QUEUE * --timeout 30", "wait_queue", {"conid": "*", "timeout": 30.0}),
        ("wait queue 1 --timeout=2.5", "wait_queue", {"conid": 1, "timeout": 2.5}),
        ("wait --timeout 5m queue 1", "wait_queue", {"conid": 1, "timeout": 300.0}),
        ("failover src1 2", "failover", {"source": "src1", "conid": 2}),
        ("FAILOVER Src1 *", "failover", {"source": "Src1", "conid": "*"}),
        ("queuetask 1 snap.sh", "queuetask", {"conid": 1, "task": "snap.sh", **QT_DEFAULTS}),
        ("queuetask * Snap.sh A b --x -y on=Receive timeout=5m --wait --timeout 60", "queuetask",
         {**QT_DEFAULTS, "conid": "*", "task": "Snap.sh", "args": ["A", "b", "--x", "-y"],
          "trigger": "receive", "timeout": 300.0, "wait": True, "wait_timeout": 60.0}),
        ("queuetask 1 --wait on=queue snap.sh timeout=0", "queuetask",
         {**QT_DEFAULTS, "conid": 1, "task": "snap.sh", "trigger": "queue", "timeout": 0.0,
          "wait": True}),
        ("queuetask 1 t ON=onTransmit TIMEOUT=FOREVER", "queuetask",
         {**QT_DEFAULTS, "conid": 1, "task": "t", "trigger": "transmit"}),
        ("queuetask 1 t a -- on=queue --wait timeout=1", "queuetask",
         {**QT_DEFAULTS, "conid": 1, "task": "t",
          "args": ["a", "on=queue", "--wait", "timeout=1"]}),
        ("queuetask 1 t timeout=2h", "queuetask",
         {**QT_DEFAULTS, "conid": 1, "task": "t", "timeout": 7200.0}),
        ("tasks", "tasks", {"conid": None}),
        ("tasks 2", "tasks", {"conid": 2}),
        ("tasks *", "tasks", {"conid": None}),
        ("taskprocessing enable", "taskprocessing", {"enabled": True}),
        ("TaskProcessing DISABLE", "taskprocessing", {"enabled": False}),
        ("mirror start 1", "mirror",
         {**MIRROR_DEFAULTS, "action": "start", "conid": 1, "mode": "full"}),
        ("mirror start * different newer orphans=remove --wait", "mirror",
         {"action": "start", "conid": "*", "mode": "different", "newer": True,
          "orphans": "remove", "wait": True}),
        ("MIRROR START 1 CHECKSUM ORPHANS=REMOVE", "mirror",
         {**MIRROR_DEFAULTS, "action": "start", "conid": 1, "mode": "checksum",
          "orphans": "remove"}),
        ("mirror stop 1", "mirror", {**MIRROR_DEFAULTS, "action": "stop", "conid": 1}),
        ("mirror pause *", "mirror", {**MIRROR_DEFAULTS, "action": "pause", "conid": "*"}),
        ("mirror resume 1", "mirror", {**MIRROR_DEFAULTS, "action": "resume", "conid": 1}),
        ("verify 1", "verify", {"conid": 1, "remirror": False, "wait": False}),
        ("VERIFY * REMIRROR --WAIT", "verify", {"conid": "*", "remirror": True, "wait": True}),
        ("orphans list 1", "orphans",
         {"action": "list", "conid": 1, "older_than_days": None, "to": None}),
        ("orphans REMOVE 1 OlderThan=7", "orphans",
         {"action": "remove", "conid": 1, "older_than_days": 7.0, "to": None}),
        ("orphans move 1 to=/srv/Orphans olderthan=0.5", "orphans",
         {"action": "move", "conid": 1, "older_than_days": 0.5, "to": "/srv/Orphans"}),
        ("restore 3", "restore",
         {"conid": 3, "mode": "overwrite", "orphans": "remove", "wait": False}),
        ("restore 3 --wait", "restore",
         {"conid": 3, "mode": "overwrite", "orphans": "remove", "wait": True}),
        ("RESTORE 3 Newer orphans=keep", "restore",
         {"conid": 3, "mode": "newer", "orphans": "keep", "wait": False}),
        ("failback src1 2", "failback", {"source": "src1", "conid": 2}),
    ],
)
def test_command_maps_to_request(line: str, command: str, args: dict[str, Any]) -> None:
    assert request(line) == (command, args)


@pytest.mark.parametrize(
    ("line", "deadline"),
    [
        ("status", None),
        ("wait queue 1", None),
        ("wait queue 1 --timeout 7", 7.0),
        ("queuetask 1 t --wait", None),
        ("queuetask 1 t --wait --timeout 1m", 60.0),
        ("mirror start 1 --wait --timeout 10", 10.0),
        ("verify 1 --wait --timeout 3", 3.0),
        ("restore 1 --wait --timeout 2", 2.0),
        ("restore 1 --wait --timeout forever", None),
    ],
)
def test_client_deadline_comes_from_timeout(line: str, deadline: float | None) -> None:
    command = parse_command(shlex.split(line))
    assert isinstance(command, Remote)
    assert command.deadline == deadline


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", "no command given"),
        ("statsu", "did you mean 'status'"),
        ("frobnicate 1", "unknown command 'frobnicate'"),
        ("status 1 2", "unexpected '2'"),
        ("status one", "expected a connection id"),
        ("status -1", "expected a connection id"),
        ("status 1.0", "expected a connection id"),
        ("status --wait", "unknown option '--wait'"),
        ("replication", "missing start|stop"),
        ("replication begin 1", "expected start|stop, got 'begin'"),
        ("replication start", "missing <conid>|*"),
        ("replication start 1 clear", "expected clearrestorerequired"),
        ("replication stop 1 clearrestorerequired", "unexpected"),
        ("connect data 127.0.0.1:7100 map data", "expected to, got '127.0.0.1:7100'"),
        ("connect data to 127.0.0.1 map data", "expected <host:port>"),
        ("connect data to 127.0.0.1:0 map data", "bad port"),
        ("connect data to 127.0.0.1:65536 map data", "bad port"),
        ("connect data to host:http map data", "bad port"),
        ("connect data to ::1:7100 map data", "[addr]:port"),
        ("connect data to bad_host!:7100 map data", "bad host name"),
        ("connect data to h:7100", "missing map"),
        ("connect data to h:7100 map", "missing <target_path>"),
        ("connect data to h:7100 map /abs", "is absolute"),
        ("connect data to h:7100 map a/../b", "may not contain '..'"),
        ("connect data to h:7100 map data key", "missing <file> after key"),
        ("connect data to h:7100 map data secret k", "expected key"),
        ("disconnect", "missing <conid>|*"),
        ("wait 1", "expected queue"),
        ("wait queue 1 --timeout", "--timeout needs"),
        ("wait queue 1 --timeout soon", "not a duration"),
        ("wait queue 1 --timeout -5", "not a duration"),
        ("wait queue 1 --timeout 1 --timeout 2", "given twice"),
        ("failover src1", "missing <conid>|*"),
        ("queuetask 1", "missing <task>"),
        ("queuetask 1 on=execute", "missing <task>"),
        ("queuetask x t", "expected a connection id"),
        ("queuetask 1 t on=later", "on= must be one of queue, transmit, receive, execute"),
        ("queuetask 1 t timeout=5x", "not a duration"),
        ("queuetask 1 t timeout=-1", "not a duration"),
        ("queuetask 1 t timeout=", "not a duration"),
        ("queuetask 1 t on=queue on=execute", "on= given twice"),
        ("queuetask 1 t --timeout 5", "--timeout only applies with --wait"),
        ("queuetask 1 t --wait=yes", "takes no value"),
        ("tasks 1 2", "unexpected"),
        ("taskprocessing", "missing enable|disable"),
        ("taskprocessing on", "expected enable|disable"),
        ("mirror start", "missing <conid>|*"),
        ("mirror go 1", "expected start|stop|pause|resume"),
        ("mirror pause 1 --wait", "takes no options"),
        ("mirror start 1 full checksum", "choose one mode"),
        ("mirror start 1 orphans=keep", "unexpected 'orphans=keep'"),
        ("mirror stop 1 full", "unexpected"),
        ("mirror stop 1 --wait", "takes no options"),
        ("mirror start 1 --timeout 5", "--timeout only applies with --wait"),
        ("verify", "missing <conid>|*"),
        ("verify 1 fix", "expected remirror"),
        ("orphans list *", "expected a connection id, got '*'"),
        ("orphans list", "missing <conid>"),
        ("orphans purge 1", "expected list|remove|move"),
        ("orphans list 1 to=/x", "to= only applies to orphans move"),
        ("orphans list 1 olderthan=week", "olderthan= takes a number of days"),
        ("orphans list 1 olderthan=-1", "olderthan= takes a number of days"),
        ("orphans list 1 olderthan=nan", "olderthan= takes a number of days"),
        ("restore *", "expected a connection id, got '*'"),
        ("restore 1 --timeout 3", "--timeout only applies with --wait"),
        ("keygen a b", "unexpected 'b'"),
        ("keygen --overwrite", "unknown option"),
        ("run", "missing <script>"),
        ("help nosuch", "no such command"),
    ],
)
def test_usage_errors(line: str, expected: str) -> None:
    assert expected in usage_error(line)


def test_usage_error_shows_the_commands_synopsis() -> None:
    message = usage_error("replication begin 1")
    assert "usage: mirrorline replication start <conid>|* [clearrestorerequired]" in message
    assert "usage: mirrorline replication stop <conid>|*" in message


def test_local_commands() -> None:
    assert parse_command(["keygen"]) == Keygen(None, False)
    assert parse_command(["KEYGEN", "/k", "--Force"]) == Keygen("/k", True)
    assert parse_command(["run", "Script.txt"]) == RunScript("Script.txt")
    assert parse_command(["run", "-"]) == RunScript("-")
    assert parse_command(["help"]) == Help(None)
    assert parse_command(["--help"]) == Help(None)
    assert parse_command(["HELP", "Mirror"]) == Help("mirror")
    with pytest.raises(UsageError, match="runs locally"):
        parse_request(["keygen"])


def test_global_options_anywhere_before_double_dash() -> None:
    invocation = parse_argv(["--socket", "/s.sock", "--json", "status"])
    assert (invocation.socket, invocation.json) == ("/s.sock", True)
    invocation = parse_argv(["status", "1", "--JSON", "--socket=/t.sock"])
    assert (invocation.socket, invocation.json) == ("/t.sock", True)
    assert invocation.command == Remote(parse_request(["status", "1"]))
    invocation = parse_argv(["queuetask", "1", "t", "--", "--json"])
    assert invocation.json is False
    assert isinstance(invocation.command, Remote)
    assert invocation.command.request.args["args"] == ["--json"]
    with pytest.raises(UsageError, match="--socket needs a path"):
        parse_argv(["status", "--socket"])
    with pytest.raises(UsageError, match="--socket needs a path"):
        parse_argv(["--socket=", "status"])


def test_relative_key_file_is_made_absolute_against_cwd() -> None:
    words = shlex.split("connect data to h:1 map data key keys/k.key")
    command = parse_argv(words, cwd="/home/op").command
    assert isinstance(command, Remote)
    assert command.request.args["key_file"] == "/home/op/keys/k.key"
    assert parse_request(words).args["key_file"] == "keys/k.key"  # pure: no cwd, untouched


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0),
     ("1.5M", 90.0), ("forever", -1.0), ("FOREVER", -1.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-1", "5w", "1e3", "m", "1 m", "inf", "٣"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_host_port() -> None:
    assert check_host_port("127.0.0.1:7100") == ("127.0.0.1", 7100)
    assert check_host_port("[fe80::1%eth0]:1") == ("fe80::1%eth0", 1)
    assert check_host_port("Target.Example:65535") == ("Target.Example", 65535)
    for bad in ("h:", ":7100", "h:7100x", "[::1:7100", "-h:1", "h:٣"):
        with pytest.raises(ValueError):
            check_host_port(bad)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("", []),
        ("   # a comment", []),
        ("status 1 # trailing comment", ["status", "1"]),
        ("queuetask 1 snap#1 'a # b' \"c#\" d\\ #e", ["queuetask", "1", "snap#1", "a # b", "c#",
                                                     "d #e"]),
        ("queuetask * t '*'", ["queuetask", "*", "t", "*"]),
    ],
)
def test_script_lines(line: str, words: list[str]) -> None:
    assert split_script_line(line) == words


def test_script_line_with_open_quote_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot split"):
        split_script_line("queuetask 1 'snap")


def test_usage_text_lists_every_command() -> None:
    text = usage()
    for name in ("status", "connect", "disconnect", "replication start", "replication stop",
                 "wait queue", "failover", "mirror start", "verify", "orphans", "restore",
                 "queuetask", "tasks", "taskprocessing", "keygen", "run", "help", "version",
                 "failback"):
        assert f"  {name}" in text
    assert "Exit codes" in text
    assert usage("WAIT").startswith("usage: mirrorline wait queue")


@pytest.mark.parametrize("name", sorted(_PARSERS))
def test_every_command_has_full_help_with_its_exit_codes(name: str) -> None:
    assert name in SYNOPSIS
    text = usage(name)
    assert text.startswith(f"usage: mirrorline {name}")
    assert "\nExit codes:\n" in text
    codes = text.split("\nExit codes:\n", 1)[1].splitlines()
    assert codes[0].split()[:2] == ["0", "ok"]
    if name not in ("help", "version"):
        assert any(line.split()[0] == "2" for line in codes)
    description = text.split("\n\n")[1]
    assert len(description) > 20
    assert all(len(line) <= 100 for line in text.splitlines())


@pytest.mark.parametrize("name", sorted(_PARSERS))
def test_command_help_option_is_help_for_that_command(name: str) -> None:
    assert parse_command([name, "--help"]) == Help(name)
    assert parse_command([name.upper(), "-h"]) == Help(name)
    assert parse_argv(["--json", name, "--HELP"]).command == Help(name)


def test_help_option_among_other_words_and_after_double_dash() -> None:
    assert parse_command(["mirror", "start", "1", "--help"]) == Help("mirror")
    # after "--" it is a task argument, and "-h" among other words is one too
    assert parse_command(["queuetask", "1", "t", "--", "--help"]) != Help("queuetask")
    assert parse_command(["queuetask", "1", "t", "-h"]) != Help("queuetask")


def test_remote_commands_that_wait_list_timed_out() -> None:
    for name in ("wait", "mirror", "verify", "restore", "queuetask"):
        assert "  4  timed out" in usage(name)
    assert "the task's own exit code" in usage("queuetask")
    assert "first failing command" in usage("run")


def test_version() -> None:
    assert parse_command(["--version"]) == Version()
    assert parse_command(["VERSION"]) == Version()
    assert parse_argv(["--json", "--version"]).json
    with pytest.raises(UsageError, match="unexpected"):
        parse_command(["version", "now"])
