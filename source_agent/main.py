"""``mirrorline-source --config FILE``: run the source agent in the foreground."""

from __future__ import annotations

import argparse
import sys

import trio

from protocol.config_util import ConfigError
from protocol.runtime.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mirrorline-source",
                                     description="Mirrorline source agent")
    parser.add_argument("--config", required=True, help="path of the source TOML config")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    args = parser.parse_args(argv)
    from source_agent.config import load_source_config

    try:
        config = load_source_config(args.config)
    except ConfigError as exc:
        print(f"mirrorline-source: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: ok")
        return 0
    setup_logging(args.log_level or config.log_level)
    from source_agent.agent import run_source

    try:
        trio.run(run_source, config)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        import structlog

        structlog.get_logger("source").exception("source agent failed", error=str(exc))
        print(f"mirrorline-source: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
