"""Parse ``mirrorline`` command words into control requests. Pure: no I/O.

The grammar follows the Storage Mirroring scripting guide (DESIGN §8): keywords are
case-insensitive, values (volume names, paths, hosts, task names and arguments) keep their
case, and ``*`` means every connection. :func:`parse_argv` handles the global options and
returns an :class:`Invocation`; :func:`parse_command` turns the words of one command (as
typed after ``mirrorline``, or as a line of a ``run`` script) into a :class:`Command`:
either a :class:`Remote` control request for an agent, or a local command (``keygen``,
``run``, ``help``, ``version``) that needs no daemon. ``<command> --help`` (or ``-h`` as its
only word) is ``help <command>``; ``--version`` is ``version``.

Our own ``--options`` are recognised anywhere in a command, before a ``--`` word;
``queuetask`` passes every other word through as a task argument, so a task argument that
looks like one of our options goes after ``--``.
"""

from __future__ import annotations

import math
import posixpath
import re

from protocol.control import Request

# Start-up time is every scripted command's latency (issue 5, W9): nothing is imported
# at run time for type hints only, and the commands below are small hand-written value
# classes rather than dataclasses (which import inspect and ast).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any, Final

ConId = int | str  # an integer conid, or "*" for every connection

ALL: Final = "*"
TRIGGERS: Final = ("queue", "transmit", "receive", "execute")
MIRROR_MODES: Final = ("full", "different", "checksum")
FOREVER: Final = -1.0

_UNITS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)", re.IGNORECASE)
_CONID: Final = re.compile(r"[0-9]+")
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_IPV6: Final = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?")

# One synopsis per command: the usage text, and the hint printed under a usage error.
SYNOPSIS: Final[dict[str, tuple[str, ...]]] = {
    "status": ("status [<conid>|*]",),
    "connect": ("connect <volume> to <host:port> map <target_path> [key <file>]",),
    "disconnect": ("disconnect <conid>|*",),
    "replication": (
        "replication start <conid>|* [clearrestorerequired]",
        "replication stop <conid>|*",
    ),
    "wait": ("wait queue <conid>|* [--timeout S]",),
    "failover": ("failover <source-node> <conid>|*      (on the target)",),
    "mirror": (
        "mirror start <conid>|* [full|different|checksum] [newer] [orphans=remove]",
        "             [--wait [--timeout S]]",
        "mirror stop|pause <conid>|*",
        "mirror resume <conid>|* [--wait [--timeout S]]",
    ),
    "verify": ("verify <conid>|* [remirror] [--wait [--timeout S]]",),
    "orphans": (
        "orphans list|remove <conid> [olderthan=<days>]",
        "orphans move <conid> [olderthan=<days>]   (to the target's holding area)",
    ),
    "restore": (
        "restore <conid> [overwrite|newer|checksum] [orphans=remove|keep]",
        "        [--wait [--timeout S]]",
    ),
    "failback": ("failback <source-node> <conid>|*      (on the target; restore required stays)",),
    "queuetask": (
        "queuetask <conid>|* <task> [<arg>...] [on=queue|transmit|receive|execute]",
        "          [timeout=<n>[s|m|h|d]|forever] [--wait [--timeout S]] [-- <arg>...]",
    ),
    "tasks": ("tasks [<conid>]",),
    "taskprocessing": ("taskprocessing enable|disable",),
    "keygen": ("keygen [<file>] [--force]",),
    "run": ("run <script>|-",),
    "help": ("help [<command>]", "<command> --help"),
    "version": ("version   (also: mirrorline --version)",),
}

# What each command does, for ``help <command>`` and ``<command> --help``.
DESCRIPTION: Final[dict[str, str]] = {
    "status": "Show the agent's volumes and connections: state, acked and captured seq, "
              "queue, lag and the restore-required / mirror-required flags.",
    "connect": "Create a connection from a protected volume to a target and print its conid "
               "(never reused). A relative key file is made absolute here.",
    "disconnect": "Remove a connection (or every connection with '*').",
    "replication": "Start or stop sending ops to the target; stopped connections keep "
                   "journaling. 'start' is refused (exit 1) while restore required is set, "
                   "unless clearrestorerequired is given.",
    "wait": "Return when the target has made durable every op captured before the call.",
    "failover": "On the target: stop applying the connection so the replica becomes the "
                "live copy; sets restore required.",
    "mirror": "Bring the target in sync in the stream, while applications keep writing. "
              "--wait waits for the mirror to finish.",
    "verify": "Compare source and target in the stream; fails (exit 1) listing what "
              "differs. remirror copies the differences.",
    "orphans": "List, remove or move entries that exist only on the target.",
    "restore": "Copy the target's data back to the source (replication stopped); clears "
               "restore required.",
    "failback": "On the target: end a failover without restoring.",
    "queuetask": "Queue a task (an executable in the target's task_dir) at this point of "
                 "the stream. With --wait, wait for it and exit with its own exit code.",
    "tasks": "List recent task records.",
    "taskprocessing": "Turn task processing on or off (persisted).",
    "keygen": "Write a new random connection key to <file> (mode 0600), or print it. "
              "An existing file is only replaced with --force.",
    "run": "Run a script of commands, one per line, split like a shell would (quotes "
           "work); '#' starts a comment, blank lines are skipped, a leading 'mirrorline' "
           "and per-line --socket are allowed. Every line is checked first; nothing runs "
           "if one is invalid. Stops at the first failing command and exits with its "
           "code; stderr names the line (file:line) and the command. '-' reads stdin.",
    "help": "Show every command, or one command's usage, description and exit codes.",
    "version": "Print the installed mirrorline version.",
}

_EXIT_OK: Final = (0, "ok")
_EXIT_USAGE: Final = (2, "usage error (nothing was sent)")
_EXIT_UNREACHABLE: Final = (3, "daemon unreachable (no socket, refused, or it went away)")
_EXIT_TIMEOUT: Final = (4, "timed out (--timeout passed; the operation may go on)")
_REMOTE_EXITS: Final = (_EXIT_OK, (1, "the command failed on the agent"), _EXIT_USAGE,
                        _EXIT_UNREACHABLE)
_WAITING_EXITS: Final = (*_REMOTE_EXITS, _EXIT_TIMEOUT)

# The exit codes of each command, for its help text.
EXIT_CODES: Final[dict[str, tuple[tuple[int | str, str], ...]]] = {
    "status": _REMOTE_EXITS,
    "connect": _REMOTE_EXITS,
    "disconnect": _REMOTE_EXITS,
    "replication": _REMOTE_EXITS,
    "wait": _WAITING_EXITS,
    "failover": _REMOTE_EXITS,
    "mirror": _WAITING_EXITS,
    "verify": (_EXIT_OK, (1, "differences found, or the command failed"), _EXIT_USAGE,
               _EXIT_UNREACHABLE, _EXIT_TIMEOUT),
    "orphans": _REMOTE_EXITS,
    "restore": _WAITING_EXITS,
    "failback": _REMOTE_EXITS,
    "queuetask": (*_WAITING_EXITS, ("N", "with --wait: the task's own exit code")),
    "tasks": _REMOTE_EXITS,
    "taskprocessing": _REMOTE_EXITS,
    "keygen": (_EXIT_OK, (1, "the file exists (without --force) or cannot be written"),
               _EXIT_USAGE),
    "run": (_EXIT_OK, (1, "a command failed, or the script cannot be read"),
            (2, "a line is not a valid command (nothing was run)"),
            ("N", "otherwise the exit code of the first failing command (3, 4, a task's)")),
    "help": (_EXIT_OK, (2, "no such command")),
    "version": (_EXIT_OK,),
}

_SECTIONS: Final = (
    ("Replication", ("status", "connect", "disconnect", "replication", "wait", "failover",
                     "failback")),
    ("Mirror, verify, restore", ("mirror", "verify", "orphans", "restore")),
    ("Tasks", ("queuetask", "tasks", "taskprocessing")),
    ("Local (no daemon)", ("keygen", "run", "help", "version")),
)

_FOOTER: Final = """\
Keywords are case-insensitive. '*' means every connection; quote it in a shell.
--timeout S takes seconds, or a number with s, m, h or d.
The socket defaults to $MIRRORLINE_SOCKET, then /run/mirrorline/source.sock;
use --socket /run/mirrorline/target.sock for commands served by the target.
Exit codes: 0 ok, 1 failed, 2 usage error, 3 daemon unreachable, 4 timed out
(queuetask --wait exits with the task's own code).
'mirrorline help <command>' or 'mirrorline <command> --help' shows one command in full."""


class UsageError(Exception):
    """The words do not form a valid command (exit 2). ``str()`` is the full message."""

    def __init__(self, message: str, command: str | None = None) -> None:
        self.reason = message
        self.command = command
        lines = [message]
        if command in SYNOPSIS:
            lines += _usage_lines(command)
        elif command is None:
            lines.append("run 'mirrorline help' for the list of commands")
        super().__init__("\n".join(lines))


class _Frozen:
    """A frozen value: equality, hash and repr from ``_fields`` (a frozen dataclass's)."""

    _fields: tuple[str, ...] = ()

    def __init__(self, *values: object) -> None:
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Frozen)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"


class Remote(_Frozen):
    """A request for an agent, and how long the client waits for its result.

    ``deadline`` is the client-side limit in seconds from ``--timeout`` on a waiting
    command (``wait queue``, ``--wait``), or None to wait for the result indefinitely.
    """

    _fields = ("request", "deadline")
    request: Request
    deadline: float | None

    def __init__(self, request: Request, deadline: float | None = None) -> None:
        super().__init__(request, deadline)


class Keygen(_Frozen):
    _fields = ("path", "force")
    path: str | None
    force: bool

    def __init__(self, path: str | None, force: bool = False) -> None:
        super().__init__(path, force)


class RunScript(_Frozen):
    _fields = ("path",)
    path: str  # "-" reads standard input

    def __init__(self, path: str) -> None:
        super().__init__(path)


class Version(_Frozen):
    _fields = ()

    def __init__(self) -> None:
        super().__init__()


class Help(_Frozen):
    _fields = ("topic",)
    topic: str | None

    def __init__(self, topic: str | None = None) -> None:
        super().__init__(topic)


Command = Remote | Keygen | RunScript | Help | Version


class Invocation(_Frozen):
    _fields = ("command", "socket", "json")
    command: Command
    socket: str | None
    json: bool

    def __init__(self, command: Command, socket: str | None = None,
                 json: bool = False) -> None:
        super().__init__(command, socket, json)


def usage(topic: str | None = None) -> str:
    """The usage text: every command, or one command's synopsis, description and exit codes.

    Raises:
        UsageError: ``topic`` is not a command.
    """
    if topic is not None:
        name = topic.lower()
        if name not in SYNOPSIS:
            raise UsageError(f"no such command: {topic!r}", "help")
        lines = [*_usage_lines(name), "", *_wrap(DESCRIPTION[name]), "", "Exit codes:"]
        lines += [f"  {code!s:>2}  {meaning}" for code, meaning in EXIT_CODES[name]]
        return "\n".join(lines)
    lines = ["usage: mirrorline [--socket PATH] [--json] COMMAND ...", ""]
    for title, names in _SECTIONS:
        lines.append(f"{title}:")
        lines += [f"  {line}" for name in names for line in SYNOPSIS[name]]
        lines.append("")
    lines.append(_FOOTER)
    return "\n".join(lines)


def _wrap(text: str, width: int = 79) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def _usage_lines(name: str) -> list[str]:
    prefix = "usage: mirrorline "
    return [
        " " * len(prefix) + line if line.startswith(" ") else prefix + line
        for line in SYNOPSIS[name]
    ]


def parse_argv(argv: Sequence[str], cwd: str | None = None) -> Invocation:
    """Parse a whole command line: global options and one command.

    ``--json`` and ``--socket PATH`` (or ``--socket=PATH``) may come before the command or
    anywhere in it before a ``--`` word. ``cwd``, when given, makes a relative ``key`` file
    of ``connect`` absolute (the agent does not share the CLI's working directory).

    Raises:
        UsageError: not a valid command line.
    """
    words, socket, json_mode = _take_globals(argv)
    return Invocation(parse_command(words, cwd), socket, json_mode)


def parse_command(words: Sequence[str], cwd: str | None = None) -> Command:
    """Parse the words of one command (no global options).

    Raises:
        UsageError: not a valid command.
    """
    if not words:
        raise UsageError("no command given")
    name = words[0].lower()
    if name in ("--help", "-h"):
        name = "help"
    elif name == "--version":
        name = "version"
    if name in SYNOPSIS and _asks_help(words[1:]):
        return Help(name)
    parser = _PARSERS.get(name)
    if parser is None:
        import difflib  # only for this message: the CLI's start-up is every command's latency

        close = difflib.get_close_matches(name, list(_PARSERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown command {words[0]!r}{hint}")
    command = parser(_Words(name, words[1:]))
    if cwd is not None and isinstance(command, Remote) and command.request.command == "connect":
        key_file = command.request.args["key_file"]
        if key_file is not None and not posixpath.isabs(key_file):
            args = {**command.request.args, "key_file": posixpath.join(cwd, key_file)}
            command = Remote(Request(command="connect", args=args), command.deadline)
    return command


def _asks_help(words: Sequence[str]) -> bool:
    """``--help`` anywhere before ``--``, or ``-h`` as the only word."""
    if [word.lower() for word in words] == ["-h"]:
        return True
    for word in words:
        if word == "--":
            return False
        if word.lower() == "--help":
            return True
    return False


def parse_request(words: Sequence[str]) -> Request:
    """Parse one agent command into its request.

    Raises:
        UsageError: not a valid command, or a local one (keygen, run, help, version).
    """
    command = parse_command(words)
    if not isinstance(command, Remote):
        raise UsageError(f"{words[0].lower()} runs locally; it has no control request")
    return command.request


def parse_duration(text: str) -> float:
    """Seconds in ``30``, ``30s``, ``5m``, ``2h``, ``1d``, ``1.5m``, ``0``; ``forever`` is -1.

    Raises:
        ValueError: anything else (negative numbers included).
    """
    if text.lower() == "forever":
        return FOREVER
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30, 30s, 5m, 2h, 1d or forever)")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_conid(text: str, *, allow_all: bool = True) -> ConId:
    """An integer conid, or ``"*"`` when ``allow_all``.

    Raises:
        ValueError: anything else.
    """
    if allow_all and text == ALL:
        return ALL
    if _CONID.fullmatch(text) is None:
        expected = "a connection id (a number) or '*'" if allow_all else "a connection id"
        raise ValueError(f"expected {expected}, got {text!r}")
    return int(text)


def check_host_port(text: str) -> tuple[str, int]:
    """Split and check ``host:port`` (``[v6addr]:port`` for IPv6).

    Raises:
        ValueError: no port, port out of range, or an invalid host.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected <host:port>, got {text!r}")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {text!r}: expected a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        if ":" not in host or _IPV6.fullmatch(host[1:-1]) is None:
            raise ValueError(f"bad IPv6 address in {text!r}")
        return host[1:-1], int(port_text)
    if ":" in host:
        raise ValueError(f"bad host in {text!r}: write an IPv6 address as [addr]:port")
    if len(host) > 253 or _HOSTNAME.fullmatch(host) is None:
        raise ValueError(f"bad host name in {text!r}")
    return host, int(port_text)


# --- parsing machinery -------------------------------------------------------------------


def _take_globals(argv: Sequence[str]) -> tuple[list[str], str | None, bool]:
    words: list[str] = []
    socket: str | None = None
    json_mode = False
    it = iter(argv)
    literal = False
    for word in it:
        lowered = word.lower()
        if literal:
            words.append(word)
        elif word == "--":
            literal = True
            words.append(word)
        elif lowered == "--json":
            json_mode = True
        elif lowered == "--socket":
            socket = next(it, None)
            if socket is None or not socket:
                raise UsageError("--socket needs a path")
        elif lowered.startswith("--socket="):
            socket = word.split("=", 1)[1]
            if not socket:
                raise UsageError("--socket needs a path")
        else:
            words.append(word)
    return words, socket, json_mode


class _Words:
    """The words after a command name, with our options taken out."""

    def __init__(self, command: str, words: Sequence[str]) -> None:
        self.command = command
        self.words = list(words)

    def error(self, message: str) -> UsageError:
        return UsageError(f"{self.command}: {message}", self.command)

    def take_flags(self, *allowed: str) -> dict[str, str | bool]:
        """Remove our ``--flag`` and ``--timeout S`` words; any other ``--word`` is an error."""
        flags: dict[str, str | bool] = {}
        kept: list[str] = []
        words = iter(self.words)
        for word in words:
            if not word.startswith("--") or word == "--":
                kept.append(word)
                continue
            name, value = _take_flag(self, word, words, allowed, flags)
            flags[name] = value
        self.words = kept
        return flags

    def take(self, what: str) -> str:
        if not self.words:
            raise self.error(f"missing {what}")
        return self.words.pop(0)

    def take_keyword(self, *choices: str) -> str:
        expected = "|".join(choices)
        word = self.take(expected).lower()
        if word not in choices:
            raise self.error(f"expected {expected}, got {word!r}")
        return word

    def take_conid(self, *, allow_all: bool = True) -> ConId:
        word = self.take("<conid>|*" if allow_all else "<conid>")
        try:
            return parse_conid(word, allow_all=allow_all)
        except ValueError as exc:
            raise self.error(str(exc)) from None

    def optional_conid(self, *, allow_all: bool = True) -> ConId | None:
        return self.take_conid(allow_all=allow_all) if self.words else None

    def done(self) -> None:
        if self.words:
            raise self.error(f"unexpected {' '.join(map(repr, self.words))}")


def _take_flag(
    words: _Words,
    word: str,
    rest: Iterator[str],
    allowed: Sequence[str],
    seen: dict[str, str | bool],
) -> tuple[str, str | bool]:
    """Read one ``--name`` / ``--timeout S`` / ``--timeout=S`` option; ``rest`` supplies S."""
    name, eq, value = word.partition("=")
    name = name[2:].lower()
    if name not in allowed:
        raise words.error(f"unknown option {word!r}")
    if name in seen:
        raise words.error(f"--{name} given twice")
    if name != "timeout":
        if eq:
            raise words.error(f"--{name} takes no value")
        return name, True
    if not eq:
        value = next(rest, "")
    if not value:
        raise words.error("--timeout needs a number of seconds")
    return name, value


def _timeout_flag(words: _Words, flags: dict[str, str | bool]) -> float | None:
    value = flags.get("timeout")
    if value is None:
        return None
    if not flags.get("wait") and words.command != "wait":
        raise words.error("--timeout only applies with --wait")
    try:
        seconds = parse_duration(str(value))
    except ValueError as exc:
        raise words.error(f"--timeout: {exc}") from None
    if seconds == FOREVER:
        return None
    return seconds


def _remote(command: str, args: dict[str, Any], deadline: float | None = None) -> Remote:
    return Remote(Request(command=command, args=args), deadline)


def _parse_status(words: _Words) -> Command:
    words.take_flags()
    conid = words.optional_conid()
    words.done()
    return _remote("status", {"conid": conid})


def _parse_replication(words: _Words) -> Command:
    words.take_flags()
    action = words.take_keyword("start", "stop")
    conid = words.take_conid()
    if action == "stop":
        words.done()
        return _remote("replication_stop", {"conid": conid})
    clear = False
    if words.words:
        words.take_keyword("clearrestorerequired")
        clear = True
    words.done()
    return _remote("replication_start", {"conid": conid, "clear_restore_required": clear})


def _parse_connect(words: _Words) -> Command:
    words.take_flags()
    volume = words.take("<volume>")
    words.take_keyword("to")
    target = words.take("<host:port>")
    try:
        check_host_port(target)
    except ValueError as exc:
        raise words.error(str(exc)) from None
    words.take_keyword("map")
    target_path = words.take("<target_path>")
    _check_target_path(words, target_path)
    key_file: str | None = None
    if words.words:
        words.take_keyword("key")
        key_file = words.take("<file> after key")
        if not key_file:
            raise words.error("key needs a file name")
    words.done()
    if not volume:
        raise words.error("the volume name is empty")
    return _remote(
        "connect",
        {"volume": volume, "target": target, "target_path": target_path, "key_file": key_file},
    )


def _check_target_path(words: _Words, path: str) -> None:
    if "\0" in path:
        raise words.error("target_path contains a NUL byte")
    if path.startswith("/"):
        raise words.error(
            f"target_path {path!r} is absolute; it is relative to the root the target "
            "grants this source (e.g. 'data')"
        )
    if ".." in path.split("/"):
        raise words.error(f"target_path {path!r} may not contain '..'")


def _parse_disconnect(words: _Words) -> Command:
    words.take_flags()
    conid = words.take_conid()
    words.done()
    return _remote("disconnect", {"conid": conid})


def _parse_wait(words: _Words) -> Command:
    flags = words.take_flags("timeout")
    words.take_keyword("queue")
    conid = words.take_conid()
    words.done()
    timeout = _timeout_flag(words, flags)
    return _remote("wait_queue", {"conid": conid, "timeout": timeout}, timeout)


def _parse_failover(words: _Words) -> Command:
    words.take_flags()
    source = words.take("<source-node>")
    conid = words.take_conid()
    words.done()
    return _remote("failover", {"source": source, "conid": conid})


def _parse_queuetask(words: _Words) -> Command:
    conid = words.take_conid()
    flags: dict[str, str | bool] = {}
    options: dict[str, str] = {}
    positional: list[str] = []
    rest = iter(words.words)
    for word in rest:
        if word == "--":
            positional += rest
            break
        key, eq, value = word.partition("=")
        key = key.lower()
        if key in ("--wait", "--timeout"):
            name, flag = _take_flag(words, word, rest, ("wait", "timeout"), flags)
            flags[name] = flag
        elif eq and key in ("on", "timeout"):
            if key in options:
                raise words.error(f"{key}= given twice")
            options[key] = value
        else:
            positional.append(word)  # the task, then its arguments (even "-x" or "--x")
    if not positional or not positional[0]:
        raise words.error("missing <task>")
    trigger = options.get("on", "execute").lower()
    if trigger.startswith("on") and trigger[2:] in TRIGGERS:
        trigger = trigger[2:]  # the scripting guide's spelling: onexecute
    if trigger not in TRIGGERS:
        raise words.error(f"on= must be one of {', '.join(TRIGGERS)}, got {options['on']!r}")
    try:
        timeout = parse_duration(options.get("timeout", "forever"))
    except ValueError as exc:
        raise words.error(f"timeout=: {exc}") from None
    wait_timeout = _timeout_flag(words, flags)
    return _remote(
        "queuetask",
        {
            "conid": conid,
            "task": positional[0],
            "args": positional[1:],
            "trigger": trigger,
            "timeout": timeout,
            "wait": bool(flags.get("wait")),
            "wait_timeout": wait_timeout,
        },
        wait_timeout,
    )


def _parse_tasks(words: _Words) -> Command:
    words.take_flags()
    conid = words.optional_conid()
    words.done()
    return _remote("tasks", {"conid": None if conid == ALL else conid})


def _parse_taskprocessing(words: _Words) -> Command:
    words.take_flags()
    action = words.take_keyword("enable", "disable")
    words.done()
    return _remote("taskprocessing", {"enabled": action == "enable"})


def _parse_mirror(words: _Words) -> Command:
    flags = words.take_flags("wait", "timeout")
    action = words.take_keyword("start", "stop", "pause", "resume")
    conid = words.take_conid()
    mode: str | None = None
    newer = False
    orphans: str | None = None
    if action != "start":
        if action != "resume" and flags:
            raise words.error(f"mirror {action} takes no options")
        words.done()
    for word in words.words:
        lowered = word.lower()
        if lowered in MIRROR_MODES:
            if mode is not None:
                raise words.error(f"choose one mode of {', '.join(MIRROR_MODES)}")
            mode = lowered
        elif lowered == "newer" and not newer:
            newer = True
        elif lowered == "orphans=remove" and orphans is None:
            orphans = "remove"
        else:
            raise words.error(f"unexpected {word!r}")
    if action == "start" and mode is None:
        mode = "full"
    wait = bool(flags.get("wait"))
    deadline = _timeout_flag(words, flags)
    return _remote(
        "mirror",
        {
            "action": action,
            "conid": conid,
            "mode": mode,
            "newer": newer,
            "orphans": orphans,
            "wait": wait,
        },
        deadline,
    )


def _parse_verify(words: _Words) -> Command:
    flags = words.take_flags("wait", "timeout")
    conid = words.take_conid()
    remirror = False
    if words.words:
        words.take_keyword("remirror")
        remirror = True
    words.done()
    deadline = _timeout_flag(words, flags)
    return _remote(
        "verify", {"conid": conid, "remirror": remirror, "wait": bool(flags.get("wait"))}, deadline
    )


def _parse_orphans(words: _Words) -> Command:
    words.take_flags()
    action = words.take_keyword("list", "remove", "move")
    conid = words.take_conid(allow_all=False)
    older_than: float | None = None
    to: str | None = None
    for word in words.words:
        key, eq, value = word.partition("=")
        key = key.lower()
        if eq and key == "olderthan" and older_than is None:
            try:
                older_than = float(value)
            except ValueError:
                older_than = math.nan
            if not value.isascii() or not math.isfinite(older_than) or older_than < 0:
                raise words.error(f"olderthan= takes a number of days, got {value!r}")
        elif eq and key == "to" and to is None:
            if action != "move":
                raise words.error("to= only applies to orphans move")
            if not value:
                raise words.error("to= needs a directory")
            to = value
        else:
            raise words.error(f"unexpected {word!r}")
    return _remote(
        "orphans", {"action": action, "conid": conid, "older_than_days": older_than, "to": to}
    )


def _parse_restore(words: _Words) -> Command:
    flags = words.take_flags("wait", "timeout")
    conid = words.take_conid(allow_all=False)
    mode, orphans = "overwrite", "remove"
    while words.words:
        word = words.take("option").lower()
        if word in ("overwrite", "newer", "checksum"):
            mode = word
        elif word in ("orphans=remove", "orphans=keep"):
            orphans = word.split("=", 1)[1]
        else:
            raise words.error(f"unexpected {word!r} (overwrite|newer|checksum, "
                              "orphans=remove|keep)")
    deadline = _timeout_flag(words, flags)
    return _remote("restore", {"conid": conid, "mode": mode, "orphans": orphans,
                               "wait": bool(flags.get("wait"))}, deadline)


def _parse_failback(words: _Words) -> Command:
    words.take_flags()
    source = words.take("<source-node>")
    conid = words.take_conid()
    words.done()
    return _remote("failback", {"source": source, "conid": conid})


def _parse_keygen(words: _Words) -> Command:
    flags = words.take_flags("force")
    path = words.take("<file>") if words.words else None
    words.done()
    if path == "":
        raise words.error("the file name is empty")
    return Keygen(path, bool(flags.get("force")))


def _parse_run(words: _Words) -> Command:
    words.take_flags()
    path = words.take("<script>")
    words.done()
    return RunScript(path)


def _parse_help(words: _Words) -> Command:
    topic = words.take("<command>") if words.words else None
    words.done()
    if topic is not None and topic.lower() not in SYNOPSIS:
        raise words.error(f"no such command: {topic!r}")
    return Help(topic.lower() if topic else None)


def _parse_version(words: _Words) -> Command:
    words.take_flags()
    words.done()
    return Version()


_PARSERS: Final[dict[str, Callable[[_Words], Command]]] = {
    "status": _parse_status,
    "connect": _parse_connect,
    "disconnect": _parse_disconnect,
    "replication": _parse_replication,
    "wait": _parse_wait,
    "failover": _parse_failover,
    "mirror": _parse_mirror,
    "verify": _parse_verify,
    "orphans": _parse_orphans,
    "restore": _parse_restore,
    "failback": _parse_failback,
    "queuetask": _parse_queuetask,
    "tasks": _parse_tasks,
    "taskprocessing": _parse_taskprocessing,
    "keygen": _parse_keygen,
    "run": _parse_run,
    "help": _parse_help,
    "version": _parse_version,
}


def split_script_line(line: str) -> list[str]:
    """The words of one ``run`` script line, shell-quoted; ``#`` starts a comment where
    a shell would start one (at the start of a word, outside quotes).

    Raises:
        UsageError: an unclosed quote or a trailing backslash.
    """
    import shlex  # only ``run`` needs it (start-up time, see parse_command)

    try:
        return shlex.split(_strip_comment(line))
    except ValueError as exc:
        raise UsageError(f"cannot split the line into words: {exc}") from None


def _strip_comment(line: str) -> str:
    quote: str | None = None
    escaped = False
    word_start = True  # after unquoted, unescaped whitespace (or at the start)
    for i, char in enumerate(line):
        literal = escaped or quote is not None
        if escaped:
            escaped = False
        elif quote is not None:
            if char == quote:
                quote = None
            elif char == "\\" and quote == '"':
                escaped = True
        elif char == "#" and word_start:
            return line[:i]
        elif char == "\\":
            escaped = True
        elif char in "'\"":
            quote = char
        word_start = not literal and char.isspace()
    return line
