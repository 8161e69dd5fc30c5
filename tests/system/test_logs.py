"""Agents write JSON lines when stdout is not a terminal (issue 7 c).

The harness starts both agents with stdout and stderr redirected to a log file,
as systemd does to the journal, so every line there must be one JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.system.harness import Agent, Cluster, wait_synced

pytestmark = [pytest.mark.system, pytest.mark.fuse]


def json_lines(agent: Agent) -> list[dict[str, object]]:
    records = []
    for number, line in enumerate(agent.log_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{agent.log_path}:{number} is not JSON: {line!r}") from exc
        assert isinstance(record, dict), line
        for key in ("event", "level", "timestamp"):
            assert key in record, f"{agent.log_path}:{number} lacks {key!r}: {line!r}"
        records.append(record)
    return records


def test_logs_are_json_lines(cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    source.start()
    (volume / "a").write_bytes(b"hello\n")
    wait_synced(source)
    # A reconnect makes warnings (with a reason) as well as info lines.
    target.stop()
    (volume / "b").write_bytes(b"again\n")
    target.start()
    wait_synced(source)
    source.stop()
    target.stop()
    for agent, ready in ((source, "source agent ready"), (target, "target agent ready")):
        records = json_lines(agent)
        events = [r["event"] for r in records]
        assert ready in events, events
        assert {r["level"] for r in records} >= {"info"}
    assert any(r["level"] == "warning" for r in json_lines(source))
