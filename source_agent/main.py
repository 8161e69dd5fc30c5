"""``mirrorline-source --config FILE``: run the source agent in the foreground."""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from protocol.runtime.daemon import run_daemon
    from source_agent.config import load_source_config

    async def run(config: Any) -> None:
        from source_agent.agent import run_source

        await run_source(config)

    return run_daemon("source", load_source_config, run, argv)


if __name__ == "__main__":
    sys.exit(main())
