"""``mirrorline``: the command-line interface to the Mirrorline agents.

``main`` parses the command line (:mod:`cli.grammar`), then either runs a local command
(``help``, ``version``, ``keygen``, ``run``) or sends one request to an agent's control socket
(:mod:`cli.client`) and prints what comes back (:mod:`cli.output`). Exit codes: 0 ok,
1 failed (or the code the agent's result carries, e.g. a task's own exit code), 2 usage,
3 daemon unreachable, 4 timed out.
"""

from __future__ import annotations

import os
import sys

from cli.client import (
    ClientError,
    ResponseError,
    TimedOutError,
    default_socket_path,
    exchange,
)
from cli.grammar import (
    Command,
    Help,
    Keygen,
    Remote,
    RunScript,
    UsageError,
    Version,
    parse_argv,
    split_script_line,
    usage,
)
from cli.output import Printer
from protocol.control import ControlError, Exit, Result, failed, ok

TYPE_CHECKING = False  # no typing import at run time: start-up time (see cli.grammar)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Final

# Extra time the client gives the agent past a --timeout the agent also enforces, so that
# the agent's own timeout answer (exit 4 with its reason) arrives before ours.
DEADLINE_GRACE: Final = 0.5
KEY_BYTES: Final = 32
_INTERRUPTED: Final = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    printer = Printer(json_mode=_wants_json(words), out=sys.stdout, err=sys.stderr)
    try:
        try:
            invocation = parse_argv(words, cwd=os.getcwd())
        except UsageError as exc:
            printer.result(failed(str(exc), Exit.USAGE))
            return Exit.USAGE
        socket_path = invocation.socket or default_socket_path()
        return execute(invocation.command, socket_path, printer)
    except KeyboardInterrupt:
        printer.result(failed("interrupted", Exit.FAILED))
        return _INTERRUPTED


def execute(command: Command, socket_path: str, printer: Printer) -> int:
    """Run one parsed command; print its output; return its exit code."""
    if isinstance(command, Help):
        text = usage(command.topic)
        if printer.json_mode:
            printer.result(ok(text))
        else:
            printer.text(text)
        return Exit.OK
    if isinstance(command, Version):
        version = package_version()
        if printer.json_mode:
            printer.result(ok(f"mirrorline {version}", version=version))
        else:
            printer.text(f"mirrorline {version}")
        return Exit.OK
    if isinstance(command, Keygen):
        return _keygen(command, printer)
    if isinstance(command, RunScript):
        return _run_script(command, socket_path, printer)
    return call(command, socket_path, printer)


def call(command: Remote, socket_path: str, printer: Printer) -> int:
    """Send ``command`` to the agent at ``socket_path``; print progress and the result."""
    timeout = None if command.deadline is None else command.deadline + DEADLINE_GRACE
    result: Result | None = None
    try:
        for response in exchange(socket_path, command.request, timeout=timeout):
            if response.get("type") != "result":
                printer.progress(response)
                continue
            try:
                result = Result.from_json(response)
            except ControlError as exc:
                raise ResponseError(f"bad result from the daemon at {socket_path}: {exc}") from exc
    except TimedOutError:
        # say the user's --timeout, not the grace-extended one the client waited
        after = "" if command.deadline is None else f" after {command.deadline:g} s"
        result = failed(
            f"timed out{after} waiting for {command.request.command}; "
            "the operation may still be running on the agent",
            Exit.TIMEOUT,
        )
    except ClientError as exc:
        result = failed(str(exc), exc.exit)
    assert result is not None  # exchange() ends with a result or raises
    printer.result(result, command.request.command)
    return exit_code(result)


def package_version() -> str:
    """The installed distribution's version (importlib.metadata), or ``unknown``."""
    # imported here: only --version pays for importlib.metadata (email, zipfile, ...)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mirrorline")
    except PackageNotFoundError:
        return "unknown (not installed as a package)"


def exit_code(result: Result) -> int:
    """0 for an ok result, else its ``exit`` (1 when that is not a failing code)."""
    if result.ok:
        return Exit.OK
    return result.exit if 1 <= result.exit <= 255 else Exit.FAILED


def _wants_json(words: Sequence[str]) -> bool:
    for word in words:
        if word == "--":
            return False
        if word.lower() == "--json":
            return True
    return False


# --- keygen -------------------------------------------------------------------------------


def _keygen(command: Keygen, printer: Printer) -> int:
    key = os.urandom(KEY_BYTES).hex()  # what secrets.token_hex does, without its imports
    if command.path is None:
        if printer.json_mode:
            printer.result(ok("", key=key))
        else:
            printer.text(key)
        return Exit.OK
    try:
        write_key_file(command.path, key + "\n", force=command.force)
    except FileExistsError:
        printer.result(failed(f"keygen: {command.path} exists; --force replaces it"))
        return Exit.FAILED
    except OSError as exc:
        printer.result(failed(f"keygen: cannot write {command.path}: {exc.strerror or exc}"))
        return Exit.FAILED
    printer.result(ok(f"wrote a new key to {command.path}", path=os.path.abspath(command.path)))
    return Exit.OK


def write_key_file(path: str, text: str, *, force: bool) -> None:
    """Write ``text`` to a new file at ``path`` with mode 0600, durably.

    Without ``force`` an existing ``path`` is never touched (``FileExistsError``). With it
    the key goes to a temporary file beside ``path`` that then replaces it, so the old
    file's mode or a half-written key never show.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is false.
        OSError: the directory is missing or not writable, or the disk is full.
    """
    directory = os.path.dirname(os.path.abspath(path))
    target = path
    if force:
        target = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(target, flags, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken bits away, never added them
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(target, path)
    except BaseException:
        os.unlink(target)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- run <script> -------------------------------------------------------------------------


def _run_script(command: RunScript, socket_path: str, printer: Printer) -> int:
    """Check every line of the script, then run them in order; stop at the first failure."""
    name = "<stdin>" if command.path == "-" else command.path
    try:
        if command.path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(command.path, "rb") as script:
                raw = script.read()
    except OSError as exc:
        printer.result(failed(f"run: cannot read {name}: {exc.strerror or exc}"))
        return Exit.FAILED
    steps: list[tuple[int, str, Command, str]] = []
    for number, line in enumerate(raw.decode("utf-8", "surrogateescape").splitlines(), 1):
        try:
            words = split_script_line(line)
            if words and words[0].lower() == "mirrorline":
                words = words[1:]
            if not words:
                continue
            invocation = parse_argv(words, cwd=os.getcwd())
            if isinstance(invocation.command, RunScript):
                raise UsageError("run cannot be used inside a script", "run")
        except UsageError as exc:
            printer.result(failed(f"{name}:{number}: {exc}\nnothing was run", Exit.USAGE))
            return Exit.USAGE
        steps.append((number, line.strip(), invocation.command, invocation.socket or socket_path))
    for number, line, step, step_socket in steps:
        code = execute(step, step_socket, printer)
        if code != Exit.OK:
            printer.note(f"{name}:{number}: failed with exit {code}: {line}",
                         script=name, line=number, exit=code)
            return code
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
