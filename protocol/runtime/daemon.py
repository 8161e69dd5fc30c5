"""The command-line entry shared by both agents: parse, load config, log, run, exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from protocol.config_util import ConfigError
from protocol.runtime.logging import setup_logging
from protocol.runtime.sdnotify import notify

#: sysexits.h EX_CONFIG: the units set RestartPreventExitStatus=78, so systemd does not
#: restart an agent whose config is wrong; it would only fail again.
EX_CONFIG = 78


def run_daemon(role: str, load: Callable[[str], Any],
               run: Callable[[Any], Awaitable[None]], argv: list[str] | None) -> int:
    """``mirrorline-<role> --config FILE [--log-level L] [--check-config]``.

    ``--check-config`` (alias ``--check``) validates the config and exits, as the
    units' ExecStartPre= does. Exit codes: 0 after a clean stop (or a valid config
    under ``--check-config``), 78 (EX_CONFIG) for a bad config, with one
    "FILE: KEY: problem" line per problem on stderr, 1 when the agent failed, 2 for
    a usage error, 130 on ^C.
    """
    prog = f"mirrorline-{role}"
    parser = argparse.ArgumentParser(
        prog=prog, description=f"Mirrorline {role} agent",
        epilog="exit codes: 0 ok, 1 agent failed, 2 usage error, "
               "78 bad config (one line per problem), 130 interrupted")
    parser.add_argument("--config", required=True, help=f"path of the {role} TOML config")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    parser.add_argument("--check-config", "--check", dest="check", action="store_true",
                        help="validate the config, print its problems and exit "
                             "(0 valid, 78 invalid)")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{prog}: {problem}", file=sys.stderr)
        notify(f"STATUS=invalid config {args.config}")
        return EX_CONFIG
    if args.check:
        print(f"{args.config}: ok")
        return 0
    setup_logging(args.log_level or config.log_level)
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
