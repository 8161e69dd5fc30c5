"""The command-line entry shared by both agents: parse, load config, log, run, exit; and
the config reload on SIGHUP that both agents do the same way.

Reload (issue 7, item 2)
------------------------
:class:`ConfigFile` remembers where the running config came from. On SIGHUP an agent
calls :meth:`ConfigFile.reload`, which tells systemd ``RELOADING=1``, reads the file
again with the loader of the start-up and of ``--check-config`` (:func:`read_config`,
in a worker thread), and then either

* rejects it: every problem is logged in the "FILE: KEY: why" wording of
  ``--check-config``, the agent keeps running on its config, and status shows the
  failed reload with its problems; or
* compares it with the running config key by key (:func:`config_changes`; entries of
  ``[[connection]]``, ``[[volume]]`` and ``[[source]]`` are matched by id, name and
  node, not by position). Keys the agent can change live (its own list of patterns)
  are handed to it to apply; every other change is logged as needing a restart, keeps
  its running value and is listed in status (``restart_required``)

and then sends ``READY=1``. The running config is what the next reload compares
with, so ``restart_required`` always lists exactly the keys whose value in the file
differs from what runs (a change undone in the file drops out of it).

``log_level`` is live on both agents. ``--log-level`` on the command line wins over
the file, at start and on every reload. The level is a filter in front of the
structlog processors (:func:`set_log_level`), so loggers that were already used or
bound (a session's logger) follow a change too.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from pydantic import BaseModel

from protocol.config_util import ConfigError
from protocol.runtime.logging import setup_logging
from protocol.runtime.sdnotify import notify, notify_reloading

log = structlog.get_logger("config")

#: sysexits.h EX_CONFIG: the units set RestartPreventExitStatus=78, so systemd does not
#: restart an agent whose config is wrong; it would only fail again.
EX_CONFIG = 78

#: Arrays of tables whose entries a reload matches by this key, not by position.
KEYED_LISTS: Mapping[str, str] = {"connection": "id", "volume": "name", "source": "node"}

#: structlog method name → level (``exception`` logs at error, ``msg`` at info).
_METHOD_LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG, "info": logging.INFO, "msg": logging.INFO,
    "warning": logging.WARNING, "warn": logging.WARNING, "error": logging.ERROR,
    "err": logging.ERROR, "exception": logging.ERROR, "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}
_LEVEL_NAMES = ("debug", "info", "warning", "error", "critical")


def log_level_number(name: str) -> int | None:
    """The ``logging`` level called ``name`` (any case), or None when there is none."""
    number = logging.getLevelName(name.strip().upper())
    return number if isinstance(number, int) else None


class _LevelFilter:
    """The first structlog processor: drops events below a level a reload may change."""

    def __init__(self) -> None:
        self.name = "info"
        self.level = logging.INFO

    def __call__(self, logger: Any, method: str, event: Any) -> Any:
        if _METHOD_LEVELS.get(method, logging.INFO) < self.level:
            raise structlog.DropEvent
        return event


_LEVEL = _LevelFilter()


def setup_reloadable_logging(level: str) -> None:
    """:func:`~protocol.runtime.logging.setup_logging`, with the level in
    :func:`set_log_level`'s hands instead of fixed in the logger class.

    Loggers are cached on first use with the class of the level configured then, so
    configuring again would not reach them; a filter processor in front does.
    """
    setup_logging("debug")
    processors = list(structlog.get_config()["processors"])
    structlog.configure(processors=[_LEVEL, *processors])
    set_log_level(level)


def set_log_level(level: str) -> None:
    """Log events at ``level`` and above from now on (after
    :func:`setup_reloadable_logging`).

    Raises:
        ValueError: ``level`` is not a log level.
    """
    number = log_level_number(level)
    if number is None:
        raise ValueError(f"{level!r} is not a log level")
    _LEVEL.name, _LEVEL.level = level.strip().lower(), number


def read_config(path: str, load: Callable[[str], Any]) -> Any:
    """Load ``path`` with ``load`` and check what the models leave open (``log_level``).

    The one reader of config files: start-up, ``--check-config`` and reload.
    Raises:
        ConfigError: one "FILE: KEY: why" line per problem.
    """
    config = load(path)
    level = getattr(config, "log_level", None)
    if isinstance(level, str) and log_level_number(level) is None:
        raise ConfigError([f"{path}: log_level: not a log level, use one of "
                           f"{', '.join(_LEVEL_NAMES)} (got {level!r})"])
    return config


# -- reload -------------------------------------------------------------------------------

_MISSING = object()


def _flatten(value: Any, key: str, values: dict[str, Any], entries: set[str]) -> None:
    name = key.rsplit(".", 1)[-1]
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{key}.{k}" if key else str(k), values, entries)
    elif (isinstance(value, list) and name in KEYED_LISTS and value
          and all(isinstance(v, dict) for v in value)):
        by = KEYED_LISTS[name]
        for item in value:
            entry = f"{key}[{by}={item.get(by)}]"
            entries.add(entry)
            for k, v in item.items():
                _flatten(v, f"{entry}.{k}", values, entries)
    elif not (isinstance(value, list) and not value and name in KEYED_LISTS):
        values[key] = value


def _pattern(key: str) -> str:
    """``connection[id=3].bandwidth`` → ``connection[*].bandwidth``."""
    return re.sub(r"\[[a-z_]+=[^\]]*\]", "[*]", key)


@dataclass(frozen=True)
class Change:
    """One difference between two configs.

    ``key`` names it for people: ``log_level``, ``queue.disk``,
    ``connection[id=3].bandwidth``, ``source[node=b] (added)``. ``pattern`` is what
    an agent's list of live keys holds: ``connection[*].bandwidth``, and
    ``source[+]`` / ``source[-]`` for an entry added or removed.
    """

    key: str
    pattern: str


def config_changes(old: BaseModel, new: BaseModel) -> list[Change]:
    """Every key whose value differs between ``old`` and ``new`` (sorted).

    Entries of the arrays of tables in :data:`KEYED_LISTS` are matched by their key
    field; an entry only on one side is one change (added or removed), not one per
    field. Other lists (``control_uids``, ``bandwidth_schedule``) compare whole.
    """
    old_values: dict[str, Any] = {}
    new_values: dict[str, Any] = {}
    old_entries: set[str] = set()
    new_entries: set[str] = set()
    _flatten(old.model_dump(), "", old_values, old_entries)
    _flatten(new.model_dump(), "", new_values, new_entries)
    changes = [Change(f"{e} (added)", _pattern(e)[:-3] + "[+]")
               for e in new_entries - old_entries]
    changes += [Change(f"{e} (removed)", _pattern(e)[:-3] + "[-]")
                for e in old_entries - new_entries]
    whole = tuple(e + "." for e in old_entries ^ new_entries)
    for key in old_values.keys() | new_values.keys():
        if key.startswith(whole):
            continue
        if old_values.get(key, _MISSING) != new_values.get(key, _MISSING):
            changes.append(Change(key, _pattern(key)))
    return sorted(changes, key=lambda c: c.key)


@dataclass
class ConfigFile:
    """Where an agent's config came from, and what its reloads did (for status).

    Without a ``path`` (an agent built in a test, not by :func:`run_daemon`) a
    reload is refused, saying so.
    """

    path: str | None = None
    load: Callable[[str], Any] | None = None
    #: ``--log-level`` given on the command line: wins over ``log_level`` in the file.
    log_level_override: str | None = None
    #: Wall time the running config was read (start-up, or the last good reload).
    loaded_at: float = field(default_factory=time.time)
    last_reload: dict[str, Any] | None = None
    #: Keys changed in the file that the running agent cannot take on until a restart.
    restart_required: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        """The ``config`` block of an agent's status."""
        return {"path": self.path, "loaded_at": self.loaded_at,
                "last_reload": self.last_reload,
                "restart_required": list(self.restart_required),
                "log_level": _LEVEL.name, "log_level_override": self.log_level_override}

    async def reload(self, running: BaseModel, live: Collection[str],
                     apply: Callable[[Any], None]) -> bool:
        """Read the config file again and apply what may change while running.

        Args:
            running: the config the agent runs on.
            live: patterns of the keys (see :class:`Change`) ``apply`` takes on live;
                ``log_level`` is handled here.
            apply: called with the config to run on from now: the new file's values
                for the live keys, ``running``'s for every other. Not called when
                the file is rejected.

        Returns True when the file was valid (even if some changes need a restart).
        Never raises (a bug in ``apply`` is logged and reported as a failed reload).
        Cancellation: the file read finishes in its thread; nothing is applied.
        """
        started = time.time()
        notify_reloading(f"reloading {self.path}")
        log.info("reloading the config", path=self.path)
        problems: list[str] = []
        changed: list[str] = []
        restart = list(self.restart_required)
        try:
            new = await self._read()
            changes = config_changes(running, new)
            changed = [c.key for c in changes if c.pattern in live or c.key == "log_level"]
            restart = [c.key for c in changes if c.key not in changed]
            apply(_merge(running, new, [c for c in changes if c.key in changed]))
            self._apply_log_level(new)
        except ConfigError as exc:
            problems = exc.problems
        except Exception as exc:   # a bug here must not take the agent down
            log.exception("config reload failed", path=self.path)
            problems = [f"{self.path}: internal error while reloading: {exc}"]
        ok = not problems
        self.last_reload = {"time": started, "ok": ok, "errors": problems,
                            "changed": changed if ok else [],
                            "restart_required": restart}
        if ok:
            self.loaded_at = started
            self.restart_required = restart
            log.info("config reloaded", path=self.path, changed=changed,
                     restart_required=restart)
            if restart:
                log.warning("config changes need a restart to take effect; the running "
                            "values stay until then", path=self.path, keys=restart)
            status = "running; config reloaded" + (
                f", restart needed for {', '.join(restart)}" if restart else "")
        else:
            log.error("config reload rejected; still running on the previous config",
                      path=self.path, problems=problems)
            status = (f"running on the previous config: reload rejected "
                      f"({len(problems)} problem(s), see the log)")
        notify("READY=1", status=status)
        return ok

    async def _read(self) -> Any:
        if self.path is None or self.load is None:
            raise ConfigError(["(no config file): this agent was not started with "
                               "--config, so there is nothing to reload"])
        return await trio.to_thread.run_sync(read_config, self.path, self.load)

    def _apply_log_level(self, new: Any) -> None:
        level = getattr(new, "log_level", None)
        if self.log_level_override is not None:
            if isinstance(level, str) and level.lower() != self.log_level_override.lower():
                log.info("log_level in the config is not used: --log-level on the command "
                         "line wins", config=level, used=self.log_level_override)
            return
        if isinstance(level, str) and level.strip().lower() != _LEVEL.name:
            log.info("log level changed", old=_LEVEL.name, new=level.strip().lower())
            set_log_level(level)


def _merge(running: BaseModel, new: BaseModel, live: list[Change]) -> BaseModel:
    """``running`` with the values of the ``live`` changes taken from ``new``.

    Works on the dumped data and validates the result, so nested entries (a
    connection's bandwidth) are merged into the right entry of the running list.
    """
    data = running.model_dump()
    source = new.model_dump()
    for change in live:
        _assign(data, source, change.key)
    return type(running).model_validate(data)


def _assign(data: dict[str, Any], source: dict[str, Any], key: str) -> None:
    """Copy ``key`` (a :class:`Change` key) from ``source`` into ``data``."""
    entry = re.fullmatch(r"([a-z_]+)\[([a-z_]+)=([^\]]*)\] \((added|removed)\)", key)
    if entry is not None:
        name, by, ident, kind = entry.groups()
        items = [i for i in data.get(name, []) if str(i.get(by)) != ident]
        if kind == "added":
            items += [i for i in source.get(name, []) if str(i.get(by)) == ident]
        data[name] = items
        return
    *path, last = re.split(r"\.(?![^\[]*\])", key)
    for part in path:
        data, source = _step(data, part), _step(source, part)
    data[last] = source[last]


def _step(data: dict[str, Any], part: str) -> dict[str, Any]:
    m = re.fullmatch(r"([a-z_]+)\[([a-z_]+)=([^\]]*)\]", part)
    if m is None:
        found: dict[str, Any] = data[part]
        return found
    name, by, ident = m.groups()
    return next(i for i in data[name] if str(i.get(by)) == ident)


_CONFIG_FILE: ContextVar[ConfigFile | None] = ContextVar("mirrorline_config_file", default=None)


def current_config_file() -> ConfigFile:
    """The :class:`ConfigFile` :func:`run_daemon` runs this agent from (an empty one,
    which refuses reloads, when the agent was started some other way)."""
    return _CONFIG_FILE.get() or ConfigFile()


def run_daemon(role: str, load: Callable[[str], Any],
               run: Callable[[Any], Awaitable[None]], argv: list[str] | None) -> int:
    """``mirrorline-<role> --config FILE [--log-level L] [--check-config]``.

    ``--check-config`` (alias ``--check``) validates the config and exits, as the
    units' ExecStartPre= does. Exit codes: 0 after a clean stop (or a valid config
    under ``--check-config``), 78 (EX_CONFIG) for a bad config, with one
    "FILE: KEY: problem" line per problem on stderr, 1 when the agent failed, 2 for
    a usage error, 130 on ^C. While it runs, SIGHUP reloads the config (see above).
    """
    prog = f"mirrorline-{role}"
    parser = argparse.ArgumentParser(
        prog=prog, description=f"Mirrorline {role} agent; SIGHUP reloads the config",
        epilog="exit codes: 0 ok, 1 agent failed, 2 usage error, "
               "78 bad config (one line per problem), 130 interrupted")
    parser.add_argument("--config", required=True, help=f"path of the {role} TOML config")
    parser.add_argument("--log-level", default=None,
                        help="debug, info, warning, error (wins over log_level in the config)")
    parser.add_argument("--check-config", "--check", dest="check", action="store_true",
                        help="validate the config, print its problems and exit "
                             "(0 valid, 78 invalid)")
    args = parser.parse_args(argv)
    if args.log_level is not None and log_level_number(args.log_level) is None:
        parser.error(f"--log-level: {args.log_level!r} is not one of {', '.join(_LEVEL_NAMES)}")
    loaded_at = time.time()
    try:
        config = read_config(args.config, load)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{prog}: {problem}", file=sys.stderr)
        notify(f"STATUS=invalid config {args.config}")
        return EX_CONFIG
    if args.check:
        print(f"{args.config}: ok")
        return 0
    setup_reloadable_logging(args.log_level or config.log_level)
    _CONFIG_FILE.set(ConfigFile(path=args.config, load=load,
                                log_level_override=args.log_level, loaded_at=loaded_at))
    notify(f"STATUS=starting the {role} agent")
    try:
        trio.run(run, config)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        structlog.get_logger(role).exception(f"{role} agent failed", error=str(exc))
        notify(f"STATUS=failed: {exc}")
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    notify(f"STATUS={role} agent stopped")
    return 0
