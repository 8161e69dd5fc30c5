"""How a config reload sorts changes into live and restart-required (protocol/runtime/daemon.py).

The agents' own lists of live keys and config models, the real file loader, no agent:
what the reload hands to the agent, and what it records for status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from protocol.runtime.daemon import ConfigFile, config_changes, read_config
from source_agent.agent import LIVE_KEYS as SOURCE_LIVE
from source_agent.config import SourceConfig, load_source_config
from target_agent.agent import LIVE_KEYS as TARGET_LIVE
from target_agent.config import TargetConfig, load_target_config

SOURCE = """\
node = "src1"
state_dir = "/var/lib/mirrorline/source"
{top}
[[volume]]
name = "data"
path = "/srv/data"

[[connection]]
id = 1
volume = "data"
target = "10.0.0.2:7100"
target_path = "data"
key_file = "/etc/mirrorline/keys/src1.key"
bandwidth = "{bandwidth}"
{more}
"""

TARGET = """\
node = "tgt1"
state_dir = "/var/lib/mirrorline/target"
{top}
[[source]]
node = "src1"
key_file = "{key}"
root = "/replica/src1"
{more}
"""


def source_file(tmp_path: Path, *, top: str = "", bandwidth: str = "1MiB",
                more: str = "") -> Path:
    path = tmp_path / "source.toml"
    path.write_text(SOURCE.format(top=top, bandwidth=bandwidth, more=more))
    return path


def target_file(tmp_path: Path, *, top: str = "", key: str = "/k/src1.key",
                more: str = "") -> Path:
    path = tmp_path / "target.toml"
    path.write_text(TARGET.format(top=top, key=key, more=more))
    return path


class Agent:
    """Stands in for the agent's side of a reload: keeps what it was told to run on."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.applied: list[Any] = []

    def apply(self, config: Any) -> None:
        self.applied.append(config)
        self.config = config


async def test_source_live_and_restart_keys(tmp_path: Path) -> None:
    path = source_file(tmp_path)
    agent = Agent(load_source_config(str(path)))
    cf = ConfigFile(path=str(path), load=load_source_config)
    source_file(tmp_path, top='mirror_on_connect = "different"\ncontrol_uids = [1000]',
                bandwidth="4MiB",
                more="[[connection]]\nid = 2\nvolume = \"data\"\ntarget = \"h:1\"\n"
                     "target_path = \"x\"\nkey_file = \"/k\"")
    path.write_text(path.read_text().replace("/var/lib/mirrorline/source", "/elsewhere"))
    assert await cf.reload(agent.config, SOURCE_LIVE, agent.apply)
    running: SourceConfig = agent.config
    assert running.mirror_on_connect == "different"
    assert running.connection[0].bandwidth == "4MiB"
    assert running.state_dir == "/var/lib/mirrorline/source"       # not live
    assert running.control_uids == [] and [c.id for c in running.connection] == [1]
    assert cf.last_reload is not None and cf.last_reload["ok"] is True
    assert cf.last_reload["changed"] == ["connection[id=1].bandwidth", "mirror_on_connect"]
    assert cf.restart_required == ["connection[id=2] (added)", "control_uids", "state_dir"]
    # The same file again: nothing new is live, the same keys still need a restart.
    assert await cf.reload(agent.config, SOURCE_LIVE, agent.apply)
    assert cf.last_reload["changed"] == []
    assert cf.restart_required == ["connection[id=2] (added)", "control_uids", "state_dir"]
    assert cf.status()["restart_required"] == cf.restart_required


async def test_rejected_file_changes_nothing_and_names_each_problem(tmp_path: Path) -> None:
    path = source_file(tmp_path)
    agent = Agent(load_source_config(str(path)))
    cf = ConfigFile(path=str(path), load=load_source_config, loaded_at=1.0)
    source_file(tmp_path, top='colour = "blue"\nbatch_bytes = "big"', bandwidth="4MiB")
    assert not await cf.reload(agent.config, SOURCE_LIVE, agent.apply)
    assert agent.applied == []
    assert cf.loaded_at == 1.0
    assert cf.last_reload is not None and cf.last_reload["ok"] is False
    assert sorted(cf.last_reload["errors"]) == [
        f"{path}: batch_bytes: Input should be a valid integer, unable to parse string as "
        f"an integer (got 'big')",
        f"{path}: colour: unknown key",
    ]


async def test_a_bad_log_level_is_a_config_problem(tmp_path: Path) -> None:
    path = source_file(tmp_path, top='log_level = "loud"')
    with pytest.raises(Exception, match="log_level: not a log level"):
        read_config(str(path), load_source_config)
    source_file(tmp_path)
    agent = Agent(read_config(str(path), load_source_config))
    cf = ConfigFile(path=str(path), load=load_source_config)
    source_file(tmp_path, top='log_level = "loud"')
    assert not await cf.reload(agent.config, SOURCE_LIVE, agent.apply)
    assert cf.last_reload is not None
    assert cf.last_reload["errors"] == [
        f"{path}: log_level: not a log level, use one of debug, info, warning, error, "
        f"critical (got 'loud')"]


async def test_target_sources_added_live_removed_after_a_restart(tmp_path: Path) -> None:
    path = target_file(tmp_path)
    agent = Agent(load_target_config(str(path)))
    cf = ConfigFile(path=str(path), load=load_target_config)
    target_file(tmp_path, key="/k/new.key", top="checkpoint_interval = 1.5",
                more='[[source]]\nnode = "src2"\nkey_file = "/k/2"\nroot = "/replica/src2"')
    assert await cf.reload(agent.config, TARGET_LIVE, agent.apply)
    running: TargetConfig = agent.config
    assert running.checkpoint_interval == 1.5
    assert [(s.node, s.key_file) for s in running.source] == [("src1", "/k/new.key"),
                                                              ("src2", "/k/2")]
    assert cf.restart_required == []
    path.write_text(TARGET.format(top='listen = "0.0.0.0:7100"', key="/k/new.key", more="")
                    .replace("/replica/src1", "/replica/moved"))
    assert await cf.reload(agent.config, TARGET_LIVE, agent.apply)
    assert [s.node for s in agent.config.source] == ["src1", "src2"]   # kept until restart
    assert agent.config.source[0].root == "/replica/src1"
    assert cf.restart_required == ["listen", "source[node=src1].root",
                                   "source[node=src2] (removed)"]


def test_changes_match_entries_by_key_not_position() -> None:
    def config(*ids: int, bandwidth: str | None = None) -> SourceConfig:
        return SourceConfig.model_validate({
            "node": "n", "state_dir": "/s", "volume": [{"name": "v", "path": "/v"}],
            "connection": [{"id": i, "volume": "v", "target": "h:1", "target_path": f"p{i}",
                            "key_file": "/k", "bandwidth": bandwidth if i == 2 else None}
                           for i in ids]})
    assert config_changes(config(1, 2), config(2, 1)) == []
    changes = config_changes(config(1, 2), config(2, 3, bandwidth="2M"))
    assert [(c.key, c.pattern) for c in changes] == [
        ("connection[id=1] (removed)", "connection[-]"),
        ("connection[id=2].bandwidth", "connection[*].bandwidth"),
        ("connection[id=3] (added)", "connection[+]"),
    ]


async def test_no_config_file_refuses_the_reload() -> None:
    cf = ConfigFile()
    agent = Agent(None)
    assert not await cf.reload(SourceConfig.model_validate(
        {"node": "n", "state_dir": "/s", "volume": [{"name": "v", "path": "/v"}]}),
        SOURCE_LIVE, agent.apply)
    assert cf.last_reload is not None and "not started with --config" in \
        cf.last_reload["errors"][0]
