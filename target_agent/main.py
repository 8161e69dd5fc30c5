"""``mirrorline-target --config FILE``: run the target agent in the foreground."""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from protocol.runtime.daemon import run_daemon
    from target_agent.config import load_target_config

    async def run(config: Any) -> None:
        from target_agent.agent import run_target

        await run_target(config)

    return run_daemon("target", load_target_config, run, argv)


if __name__ == "__main__":
    sys.exit(main())
