"""SIGHUP reloads the config of a running agent (issue 7, item 2).

Real agent processes: the config file is rewritten and the process gets SIGHUP, as
``systemctl reload`` (``ExecReload=/bin/kill -HUP $MAINPID``) does. An invalid file is
rejected, naming the problem, and the agent goes on with its old config; a valid one
takes effect for the keys that can change live, and the others are listed as needing
a restart.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.system.harness import Agent, Cluster, replica_of, wait_synced, wait_until

pytestmark = pytest.mark.system

MiB = 1024 * 1024


def reload(agent: Agent) -> dict[str, Any]:
    """SIGHUP ``agent`` and return its status once the reload is recorded."""
    before = (agent.status()["config"]["last_reload"] or {}).get("time")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)

    def reloaded() -> dict[str, Any] | None:
        assert agent.proc is not None and agent.proc.poll() is None, agent.log_text()[-4000:]
        status = agent.status()
        last = status["config"]["last_reload"]
        return status if last is not None and last["time"] != before else None
    result: dict[str, Any] = wait_until(reloaded, 30, what="the reload to be recorded")
    return result


def rewrite(agent: Agent, old: str, new: str) -> None:
    text = agent.config_path.read_text()
    assert old in text, text
    agent.config_path.write_text(text.replace(old, new, 1))


@pytest.mark.fuse
def test_source_reload_rejects_a_bad_file_and_applies_a_good_one(
        cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.target()
    target.start()
    volume = tmp_path / "vol"
    source = cluster.source("src1", volume, [(1, target, "data")])
    with source.config_path.open("a") as cfg:        # into the [[connection]] table
        cfg.write('bandwidth = "1MiB"\n')
    source.start()
    wait_until(lambda: source.status()["connections"][0]["state"] == "replicating", 30,
               what="the connection to come up")
    status = source.status()
    config = status["config"]
    assert config["path"] == str(source.config_path)
    assert config["last_reload"] is None and config["restart_required"] == []
    assert 0 < config["loaded_at"] <= time.time()
    assert status["connections"][0]["bandwidth_limit"] == MiB
    good = source.config_path.read_text()

    # An unknown key: rejected, the agent goes on with the old config.
    rewrite(source, 'bandwidth = "1MiB"', 'bandwidth = "4MiB"\ncolour = "blue"')
    status = reload(source)
    last = status["config"]["last_reload"]
    assert last["ok"] is False, last
    assert last["errors"] == [f"{source.config_path}: connection[0].colour: unknown key"], last
    assert status["connections"][0]["bandwidth_limit"] == MiB
    assert status["config"]["loaded_at"] == config["loaded_at"]
    assert "config reload rejected" in source.log_text()
    (volume / "during").write_bytes(b"still replicating\n")
    wait_synced(source)
    assert (replica_of(target, "src1", "data") / "during").read_bytes() == b"still replicating\n"

    # The same change without the bad key: the new limit paces the next frames.
    source.config_path.write_text(good.replace('bandwidth = "1MiB"', 'bandwidth = "4MiB"'))
    status = reload(source)
    last = status["config"]["last_reload"]
    assert last["ok"] is True and last["errors"] == [], last
    assert last["changed"] == ["connection[id=1].bandwidth"], last
    assert status["config"]["restart_required"] == []
    assert status["config"]["loaded_at"] > config["loaded_at"]
    conn = status["connections"][0]
    assert conn["bandwidth_limit"] == conn["bandwidth_configured"] == 4 * MiB
    data = os.urandom(8 * MiB)
    started = time.monotonic()
    (volume / "big").write_bytes(data)
    wait_synced(source, timeout=60)
    elapsed = time.monotonic() - started
    # 8 MiB: about 2 s at 4 MiB/s, at least 7.5 s under the old 1 MiB/s.
    assert 1.2 <= elapsed <= 5.5, f"8 MiB at 4 MiB/s took {elapsed:.1f} s"
    assert (replica_of(target, "src1", "data") / "big").read_bytes() == data

    # state_dir cannot change under a running agent: reported, not applied.
    source.config_path.write_text(
        source.config_path.read_text().replace("/state", "/state-moved", 1))
    status = reload(source)
    last = status["config"]["last_reload"]
    assert last["ok"] is True and last["changed"] == [], last
    assert status["config"]["restart_required"] == ["state_dir"]
    assert "need a restart" in source.log_text()
    assert not (tmp_path / "src1" / "state-moved").exists()
    (volume / "after").write_bytes(b"x")
    wait_synced(source)
    # Undone in the file: nothing needs a restart any more.
    source.config_path.write_text(
        source.config_path.read_text().replace("/state-moved", "/state", 1))
    assert reload(source)["config"]["restart_required"] == []
    assert source.stop() == 0


def test_target_reload_rejects_a_bad_file_and_applies_a_good_one(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        target = cluster.target()
        target.start()
        rewrite(target, "[[source]]", 'checkpoint_interval = "often"\n[[source]]')
        status = reload(target)
        last = status["config"]["last_reload"]
        assert last["ok"] is False, last
        assert len(last["errors"]) == 1, last
        assert last["errors"][0].startswith(f"{target.config_path}: checkpoint_interval: ")
        assert status["config"]["restart_required"] == []

        # Valid: the checkpoint interval changes live, a new listen address would not.
        rewrite(target, 'checkpoint_interval = "often"', "checkpoint_interval = 0.5")
        rewrite(target, f"127.0.0.1:{target.extra['port']}", "127.0.0.1:1")
        status = reload(target)
        last = status["config"]["last_reload"]
        assert last["ok"] is True and last["changed"] == ["checkpoint_interval"], last
        assert status["config"]["restart_required"] == ["listen"]
        # The old address still serves; the process is the same one.
        assert target.proc is not None and target.proc.poll() is None
        assert status["listen"] == f"127.0.0.1:{target.extra['port']}"
        assert target.stop() == 0
    finally:
        cluster.close()
