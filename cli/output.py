"""What the CLI prints: human text by default, JSON lines with ``--json``.

Human mode: progress events go to stderr as lines; the result's message goes to stdout
(stderr when the command failed), followed by a rendering of its data for the commands
that have one (``status``, ``tasks``, ``orphans``). JSON mode: progress events go to
stderr as JSON lines and stdout gets exactly one line, the result object
``{"ok", "exit", "message", "data"}``.

Paths in control messages are ``str`` decoded with ``surrogateescape``; human output
shows undecodable bytes as ``\\xNN`` escapes, JSON output as ``\\udcNN`` escapes, so
neither can fail to encode.
"""

from __future__ import annotations

import json
import time

from protocol.control import Result

TYPE_CHECKING = False  # no typing import at run time: start-up time (see cli.grammar)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, Final, TextIO

_MISSING: Final = "-"


class Printer:
    """Writes progress events and results for one CLI invocation."""

    def __init__(self, *, json_mode: bool, out: TextIO, err: TextIO) -> None:
        self.json_mode = json_mode
        self.out = out
        self.err = err
        self._bar_open = False

    def _end_bar(self) -> None:
        if self._bar_open:
            self.err.write("\n")
            self._bar_open = False

    def progress(self, event: Mapping[str, Any]) -> None:
        """One progress event from the agent (or a note from the CLI itself).

        Events with a ``percent`` redraw one bar line on a terminal; elsewhere every
        event is its own plain line.
        """
        if self.json_mode:
            _write(self.err, _json_line(dict(event)))
            return
        percent = event.get("percent")
        if isinstance(percent, (int, float)) and self.err.isatty():
            filled = int(max(0.0, min(100.0, float(percent))) / 100 * 30)
            bar = "#" * filled + "." * (30 - filled)
            self.err.write(f"\r[{bar}] {float(percent):5.1f}% {event.get('message', '')}"[:200])
            self.err.flush()
            self._bar_open = True
            return
        self._end_bar()
        message = event.get("message")
        if not message:
            fields = {k: v for k, v in event.items() if k not in ("type", "message")}
            message = " ".join(f"{k}={_scalar(v)}" for k, v in fields.items()) or "..."
        _write(self.err, str(message))

    def note(self, message: str, **fields: Any) -> None:
        """A remark from the CLI (e.g. which script line failed), shaped like progress."""
        self.progress({"type": "progress", "message": message, **fields})

    def result(self, result: Result, command: str | None = None) -> None:
        """The final result of ``command`` (a control command name; None for local ones)."""
        self._end_bar()
        if self.json_mode:
            body = {
                "ok": result.ok,
                "exit": result.exit,
                "message": result.message,
                "data": result.data,
            }
            _write(self.out, _json_line(body))
            return
        stream = self.out if result.ok else self.err
        if result.message:
            _write(stream, result.message)
        render = _RENDERERS.get(command or "")
        lines = render(result.data) if render is not None and result.data else None
        if lines is None and not result.message:
            lines = _render_fields(result.data)
        for line in lines or ():
            _write(stream, line)
        if command == "connect" and result.ok and "id" in result.data:
            conid = str(result.data["id"])
            if conid not in result.message:
                _write(stream, f"connection {conid}")

    def text(self, text: str) -> None:
        """Plain text for stdout (help, a generated key)."""
        _write(self.out, text.rstrip("\n"))


# --- renderers ----------------------------------------------------------------------------


def render_status(data: Mapping[str, Any]) -> list[str] | None:
    """The ``status`` result data as lines (source or target role), None if unrecognised.

    A header (role, node, config file and its reloads, volumes), one table row per
    connection, then, per connection that has any, aligned detail lines: why a mirror
    is required, the mirror job, the bandwidth schedule in force, the last task and
    the last error with its time (kept after it cleared). Plain text only: times are
    local, with how long ago.
    """
    role = data.get("role")
    connections = data.get("connections")
    if role not in ("source", "target") or not isinstance(connections, list):
        return None
    lines = [f"{role} {_text(data.get('node'))}"]
    config = data.get("config")
    if isinstance(config, dict):
        lines += _config_lines(config)
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]
    if role == "source":
        for volume in _dicts(data.get("volumes")):
            mounted = "mounted" if volume.get("mounted") else "NOT MOUNTED"
            watch = volume.get("watch")
            if isinstance(watch, dict):
                mounted = f"watched ({_text(watch.get('backend'))}, {_text(watch.get('state'))})"
            line = (f"volume {_text(volume.get('name'))}  {_text(volume.get('path'))}  "
                    f"{mounted}  captured_seq {_text(volume.get('captured_seq'))}")
            if "journal_disk_bytes" in volume:
                line += (f"  queue {_bytes(volume.get('journal_memory_bytes'))} memory, "
                         f"{_bytes(volume.get('journal_disk_bytes'))} disk"
                         f" (limit {_bytes(volume.get('journal_disk_limit'))})")
            lines.append(line)
            if isinstance(watch, dict):
                # Said every time: what watch mode does not promise.
                lines.append(f"  watch mode: {_text(watch.get('guarantee'))}; "
                             f"overflows {_text(watch.get('overflows'))}, "
                             f"rescans {_text(watch.get('rescans'))}, "
                             f"lost watches {_text(watch.get('lost_watches'))}, "
                             f"pending events {_text(watch.get('pending_events'))}")
        headers = ("ID", "TARGET", "STATE", "DATA", "LAG-OPS", "LAG-BYTES", "LAG-TIME",
                   "UNSENT", "BANDWIDTH", "COMPRESSION")
        rows = [
            (
                _text(conn.get("id")),
                _text(conn.get("target")),
                _text(conn.get("state")),
                _data_state(conn),
                _text(conn.get("queue_ops")),
                _bytes(conn.get("queue_bytes")),
                _seconds(conn.get("lag_seconds")),
                _text(conn.get("unsent_ops")),
                _rate(conn.get("bandwidth_limit")) if "bandwidth_limit" in conn else _MISSING,
                _compression(conn),
            )
            for conn in _dicts(connections)
        ]
        right = {4, 5, 6, 7}
    else:
        headers = ("SOURCE", "ID", "STATE", "DATA", "APPLIED", "RECEIVED", "BACKLOG")
        rows = [
            (
                _text(conn.get("source")),
                _text(conn.get("id")),
                _text(conn.get("state")),
                _data_state(conn),
                _text(conn.get("applied_seq")),
                _text(conn.get("received_seq")),
                _backlog(conn),
            )
            for conn in _dicts(connections)
        ]
        right = {1, 4, 5, 6}
    if not rows:
        lines.append("no connections")
        return lines
    lines += table(headers, rows, right)
    for conn in _dicts(connections):
        details = _details(conn)
        if details:
            lines.append(f"connection {_text(conn.get('id'))}"
                         + (f" from {_text(conn.get('source'))}" if role == "target" else ""))
            width = max(len(label) for label, _ in details)
            lines += [f"  {label.ljust(width)}  {text}" for label, text in details]
    return lines


def _config_lines(config: Mapping[str, Any]) -> list[str]:
    lines = [f"config {_text(config.get('path'))}  loaded {_when(config.get('loaded_at'))}"]
    last = config.get("last_reload")
    if isinstance(last, dict):
        if last.get("ok"):
            changed = last.get("changed") or []
            lines.append(f"  last reload {_when(last.get('time'))}: ok"
                         + (f", changed {', '.join(map(_text, changed))}" if changed
                            else ", nothing changed live"))
        else:
            lines.append(f"  last reload {_when(last.get('time'))}: REJECTED, still running "
                         f"on the config loaded before")
            lines += [f"    {_text(error)}" for error in last.get("errors") or []]
    restart = config.get("restart_required")
    if isinstance(restart, list) and restart:
        lines.append(f"  restart required for {', '.join(map(_text, restart))} (changed in "
                     f"the file; the running values stay until a restart)")
    return lines


def _details(conn: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, text) lines about one connection, only the ones that have something."""
    details: list[tuple[str, str]] = []
    if conn.get("mirror_required") and conn.get("mirror_reason"):
        details.append(("mirror required", _text(conn.get("mirror_reason"))))
    job = conn.get("mirror")
    if isinstance(job, dict):
        pct = job.get("percent")
        details.append((
            _text(job.get("kind")),
            f"{_text(job.get('mode'))} {_text(job.get('state'))}"
            + (f" {pct}%" if pct is not None else "")
            + f", {_text(job.get('files_done'))} entries, "
              f"{_text(job.get('differences'))} differences"
            + (f" ({_text(job.get('reason'))})" if job.get("reason") else "")))
    if conn.get("bandwidth_window") is not None:
        details.append(("bandwidth", f"{_rate(conn.get('bandwidth_limit'))} from "
                        f"bandwidth_schedule window {_text(conn.get('bandwidth_window'))} "
                        f"(bandwidth = {_rate(conn.get('bandwidth_configured'))})"))
    task = conn.get("last_task")
    if isinstance(task, dict):
        details.append(("last task", _task_summary(task)))
    error = conn.get("recent_error")
    if isinstance(error, dict) and error.get("message"):
        count = error.get("count")
        last = error.get("last_seen")
        when = _when(last)
        if isinstance(count, int) and count > 1:
            when += f", {count} times since {_clock(error.get('first_seen'), last)}"
        if error.get("cleared_at") is not None:
            when += f", cleared {_clock(error.get('cleared_at'), last)}"
        details.append(("last error", f"{when}: {_text(error.get('message'))}"))
    elif conn.get("last_error"):   # an agent without recent_error
        details.append(("last error", _text(conn.get("last_error"))))
    return details


def render_tasks(data: Mapping[str, Any]) -> list[str] | None:
    """The ``tasks`` result data (``{"tasks": [...]}``) as a table."""
    tasks = data.get("tasks")
    if not isinstance(tasks, list):
        return None
    if not tasks:
        return ["no tasks"]
    headers = ("ID", "CONID", "SEQ", "TASK", "ON", "STATE", "EXIT")
    rows = [
        (
            _text(task.get("id")),
            _text(task.get("conid")),
            _text(task.get("seq")),
            " ".join([_text(task.get("name") or task.get("task")),
                      *map(_text, task.get("args") or [])]),
            _text(task.get("trigger")),
            _text(task.get("state")),
            _text(task.get("exit_code")),
        )
        for task in _dicts(tasks)
    ]
    return table(headers, rows, right={2, 6})


def render_orphans(data: Mapping[str, Any]) -> list[str] | None:
    """The ``orphans`` result data (``{"orphans": [...]}``): one path per line."""
    orphans = data.get("orphans")
    if not isinstance(orphans, list):
        return None
    return [_text(o.get("path") if isinstance(o, dict) else o) for o in orphans]


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int] | None = None
) -> list[str]:
    """Columns padded to their widest cell; ``right`` holds right-aligned column indexes."""
    right = right or set()
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return [line(headers), *(line(row) for row in rows)]


_RENDERERS: Final[dict[str, Callable[[Mapping[str, Any]], list[str] | None]]] = {
    "status": render_status,
    "tasks": render_tasks,
    "orphans": render_orphans,
}


def _render_fields(data: Mapping[str, Any]) -> list[str]:
    return [f"{key}: {_scalar(value)}" for key, value in data.items()]


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _data_state(conn: Mapping[str, Any]) -> str:
    """good / mirror required / restore required (…), as the agent names it."""
    if conn.get("data_state"):
        return _text(conn.get("data_state"))
    flags = [name.replace("_", " ") for name in ("restore_required", "mirror_required")
             if conn.get(name)]
    return ", ".join(flags) or _MISSING


def _backlog(conn: Mapping[str, Any]) -> str:
    applied, received = conn.get("applied_seq"), conn.get("received_seq")
    if isinstance(applied, int) and isinstance(received, int):
        return str(max(received - applied, 0))
    return _MISSING


def _compression(conn: Mapping[str, Any]) -> str:
    wanted = conn.get("compression")
    if wanted is None:
        return _MISSING
    active = conn.get("compression_active")
    if wanted != "none" and conn.get("state") == "replicating" and active != wanted:
        return f"{wanted} (declined)"
    return _text(wanted)


def _rate(value: Any) -> str:
    if value is None:
        return "unlimited"
    return _bytes(value) + "/s"


def _clock(value: Any, near: Any) -> str:
    """``value`` as local "HH:MM:SS" when on the same day as ``near``, else in full."""
    if not isinstance(value, int | float) or not isinstance(near, int | float):
        return _text(value)
    day = time.strftime("%Y-%m-%d", time.localtime(near))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return stamp.removeprefix(day + " ")


def _when(value: Any) -> str:
    """A wall-clock time as local "YYYY-MM-DD HH:MM:SS (5m ago)"."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _text(value)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    ago = max(time.time() - value, 0.0)
    for limit, unit, size in ((60, "s", 1), (3600, "m", 60), (86400, "h", 3600)):
        if ago < limit:
            return f"{stamp} ({int(ago // size)}{unit} ago)"
    return f"{stamp} ({int(ago // 86400)}d ago)"


def _task_summary(task: Mapping[str, Any]) -> str:
    summary = f"{_text(task.get('id'))} {_text(task.get('name') or task.get('task'))} " \
              f"{_text(task.get('state'))}"
    if task.get("exit_code") is not None:
        summary += f" (exit {task['exit_code']})"
    return summary


def _text(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _scalar(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value)
    return _text(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _text(value)
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _seconds(value: Any) -> str:
    """0.2s, 59.0s, 12m05s, 1h02m, 3d04h."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _text(value)
    if value < 60:
        return f"{value:.1f}s"
    whole = int(value)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _json_line(body: Mapping[str, Any]) -> str:
    # ensure_ascii: surrogate-escaped path bytes become \udcNN, never an encode error
    return json.dumps(body, separators=(",", ":"))


def _printable(text: str) -> str:
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no byte decoded to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _write(stream: TextIO, text: str) -> None:
    stream.write(_printable(text) + "\n")
    stream.flush()
