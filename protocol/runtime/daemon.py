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


def run_daemon(role: str, load: Callable[[str], Any],
               run: Callable[[Any], Awaitable[None]], argv: list[str] | None) -> int:
    """``mirrorline-<role> --config FILE [--log-level L] [--check]``.

    Exit codes: 0 after a clean stop (or a valid ``--check``), 2 for a bad config
    (the message names file, key and problem), 1 when the agent failed, 130 on ^C.
    """
    prog = f"mirrorline-{role}"
    parser = argparse.ArgumentParser(prog=prog, description=f"Mirrorline {role} agent")
    parser.add_argument("--config", required=True, help=f"path of the {role} TOML config")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: ok")
        return 0
    setup_logging(args.log_level or config.log_level)
    try:
        trio.run(run, config)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        structlog.get_logger(role).exception(f"{role} agent failed", error=str(exc))
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
