"""The deployment files: systemd units, example configs, install and CI scripts.

Units are checked by ``systemd-analyze verify`` when it is installed (with ExecStart
pointed at an existing binary, since the agents are not installed here), and always
by a small parser of the unit format for the keys the contract and DESIGN §9 require.
The example configs must be exactly the contract's (issue 2) and load with the agents'
own config models.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from source_agent.config import load_source_config
from target_agent.config import load_target_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ROLES = ("source", "target")

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections → (key, value) pairs in order; keys may repeat, as systemd allows."""
    unit: Unit = {}
    section: str | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"bad section header {line!r}"
            section = line[1:-1]
            assert section not in unit, f"section [{section}] repeated"
            unit[section] = []
            continue
        assert section is not None, f"{line!r} is outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{line!r} is not key=value"
        assert key.strip() and key.strip() == key.strip().replace(" ", ""), line
        unit[section].append((key.strip(), value.strip()))
    assert not pending, "file ends in a line continuation"
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times"
    return found[0]


def words(unit: Unit, section: str, key: str) -> set[str]:
    """Space-separated list settings; an empty assignment resets the list, as in systemd."""
    result: set[str] = set()
    for v in values(unit, section, key):
        result = set() if not v else result | set(v.split())
    return result


def load_unit(role: str) -> Unit:
    return parse_unit((DEPLOY / f"mirrorline-{role}.service").read_text())


def load_example(role: str) -> dict[str, Any]:
    with open(DEPLOY / f"{role}.toml.example", "rb") as f:
        return tomllib.load(f)


# -- units --------------------------------------------------------------------------

@pytest.mark.parametrize("role", ROLES)
def test_unit_has_the_contract_service_settings(role: str) -> None:
    unit = load_unit(role)
    assert set(unit) == {"Unit", "Service", "Install"}
    expected = {
        "Type": "notify",
        "ExecStart": f"/usr/local/bin/mirrorline-{role} --config /etc/mirrorline/{role}.toml",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RuntimeDirectory": "mirrorline",
        "StateDirectory": f"mirrorline/{role}",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "60",
    }
    for key, want in expected.items():
        assert value(unit, "Service", key) == want, key
    assert value(unit, "Install", "WantedBy") == "multi-user.target"
    assert value(unit, "Unit", "Description")
    # Two agents on one host share /run/mirrorline: one stopping must not remove it.
    assert value(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
    assert value(unit, "Service", "NoNewPrivileges") == "yes"
    # Issue 7: the config is checked before the start, and a bad one (exit 78,
    # EX_CONFIG) is not restarted in a loop.
    check = f"/usr/local/bin/mirrorline-{role} --config /etc/mirrorline/{role}.toml --check-config"
    assert value(unit, "Service", "ExecStartPre") == check
    assert value(unit, "Service", "RestartPreventExitStatus") == "78"
    assert value(unit, "Service", "ConfigurationDirectory") == "mirrorline"
    assert value(unit, "Service", "NotifyAccess") == "main"
    # SIGHUP reloads the config (issue 7, item 2); the agent says RELOADING=1 / READY=1.
    assert value(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"


# Settings that give a unit its own mount namespace: a FUSE mount made inside it would
# never reach the applications, so the source unit must set none of them.
MOUNT_NAMESPACE_SETTINGS = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
    "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "MountFlags", "RootDirectory", "RootImage", "ProtectHostname",
    "ProtectClock", "PrivateNetwork", "DynamicUser",
}


def test_source_unit_can_mount_fuse_for_the_whole_host() -> None:
    unit = load_unit("source")
    keys = {k for k, _ in unit["Service"]}
    assert not keys & MOUNT_NAMESPACE_SETTINGS
    assert "/dev/fuse rw" in values(unit, "Service", "DeviceAllow")
    caps = words(unit, "Service", "CapabilityBoundingSet")
    assert {"CAP_SYS_ADMIN", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE"} <= caps
    filters = words(unit, "Service", "SystemCallFilter")
    assert not filters or "@mount" in filters
    assert "RestrictSUIDSGID" not in keys  # applications' setuid bits must be replicable
    assert "User" not in keys  # mounting over arbitrary directories needs root


def test_target_unit_is_confined_to_its_replica_roots() -> None:
    unit = load_unit("target")
    assert value(unit, "Service", "ProtectSystem") == "strict"
    rw_paths = words(unit, "Service", "ReadWritePaths")
    assert rw_paths
    # The example config's replica roots are writable under the unit.
    for entry in load_example("target")["source"]:
        root = PurePosixPath(entry["root"])
        assert any(root == PurePosixPath(p.lstrip("-")) or PurePosixPath(p.lstrip("-"))
                   in root.parents for p in rw_paths), root
    for key in ("PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups", "RestrictNamespaces",
                "LockPersonality", "RestrictRealtime"):
        assert value(unit, "Service", key) == "yes", key
    caps = words(unit, "Service", "CapabilityBoundingSet")
    assert "CAP_SYS_ADMIN" not in caps and "CAP_CHOWN" in caps
    families = words(unit, "Service", "RestrictAddressFamilies")
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "RestrictSUIDSGID" not in {k for k, _ in unit["Service"]}


@pytest.mark.parametrize("role", ROLES)
def test_unit_paths_agree_with_the_example_config(role: str) -> None:
    unit, config = load_unit(role), load_example(role)
    assert config["state_dir"] == "/var/lib/" + value(unit, "Service", "StateDirectory")
    socket = PurePosixPath(config["control_socket"])
    assert socket.parent == PurePosixPath("/run") / value(unit, "Service", "RuntimeDirectory")


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
VENV_BIN = Path(sys.executable).parent


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    # verify insists that ExecStart='s binary exists: point a copy of the unit at the
    # console script of this venv when the agent is not installed in /usr/local/bin.
    files = []
    for role in ROLES:
        text = (DEPLOY / f"mirrorline-{role}.service").read_text()
        binary = f"/usr/local/bin/mirrorline-{role}"
        if not os.access(binary, os.X_OK):
            text = text.replace(binary, str(VENV_BIN / f"mirrorline-{role}"))
        path = tmp_path / f"mirrorline-{role}.service"
        path.write_text(text)
        files.append(str(path))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *files],
                            capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown or invalid settings are only warnings to systemd; here they are errors.
    ours = [line for line in output.splitlines() if "mirrorline-" in line]
    assert not ours, "\n".join(ours)


# -- example configs ------------------------------------------------------------------

CONTRACT_SOURCE = {
    "node": "src1",
    "state_dir": "/var/lib/mirrorline/source",
    "control_socket": "/run/mirrorline/source.sock",
    "task_dir": "/etc/mirrorline/tasks.d",
    "volume": [{"name": "data", "path": "/srv/data"}],
    "connection": [{"id": 1, "volume": "data", "target": "127.0.0.1:7100",
                    "target_path": "data", "key_file": "/etc/mirrorline/keys/src1.key"}],
}
CONTRACT_TARGET = {
    "node": "tgt1",
    "listen": "127.0.0.1:7100",
    "state_dir": "/var/lib/mirrorline/target",
    "control_socket": "/run/mirrorline/target.sock",
    "task_dir": "/etc/mirrorline/tasks.d",
    "source": [{"node": "src1", "key_file": "/etc/mirrorline/keys/src1.key",
                "root": "/replica/src1"}],
}


@pytest.mark.parametrize(("role", "contract"), [("source", CONTRACT_SOURCE),
                                                ("target", CONTRACT_TARGET)])
def test_example_config_is_the_contract(role: str, contract: dict[str, Any]) -> None:
    assert load_example(role) == contract


def test_example_configs_load_with_the_agents_models() -> None:
    source = load_source_config(str(DEPLOY / "source.toml.example"))
    assert source.node == "src1" and source.volume[0].path == "/srv/data"
    assert source.connection[0].id == 1
    target = load_target_config(str(DEPLOY / "target.toml.example"))
    assert target.node == "tgt1" and target.source[0].root == "/replica/src1"


def test_examples_pair_up() -> None:
    source, target = load_example("source"), load_example("target")
    connection = source["connection"][0]
    assert connection["target"] == target["listen"]
    (granted,) = [s for s in target["source"] if s["node"] == source["node"]]
    assert granted["key_file"] == connection["key_file"]


# -- scripts ----------------------------------------------------------------------------

BASH = shutil.which("bash")


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
@pytest.mark.parametrize("script", ["deploy/install.sh", ".ci/run"])
def test_scripts_are_executable_bash(script: str) -> None:
    assert BASH is not None
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    subprocess.run([BASH, "-n", str(path)], check=True, timeout=30)


def test_install_script_links_every_console_script() -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts = set(tomllib.load(f)["project"]["scripts"])
    text = (DEPLOY / "install.sh").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("scripts=(")]
    assert set(line.removeprefix("scripts=(").removesuffix(")").split()) == scripts
    for role in ROLES:
        assert f"mirrorline-{role}.service" in text or "mirrorline-$role.service" in text


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_target_unit_security_exposure_is_low(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    path = tmp_path / "mirrorline-target.service"
    path.write_text((DEPLOY / "mirrorline-target.service").read_text())
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(path)],
                            capture_output=True, text=True, timeout=120, check=False)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze security has no --offline (systemd < 250)")
    (line,) = [ln for ln in result.stdout.splitlines() if "Overall exposure level" in ln]
    exposure = float(line.split(":")[1].split()[0])
    # The unit's comment records 2.4 (systemd 252); "OK" ends below 5.
    assert exposure <= 3.0, line


# -- install.sh in a scratch root ---------------------------------------------------------

def cli_commands() -> set[str]:
    from cli.grammar import SYNOPSIS

    return set(SYNOPSIS)


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_install_script_lays_out_a_scratch_root(tmp_path: Path) -> None:
    assert BASH is not None
    root = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(root), "MIRRORLINE_INSTALL_SKIP_VENV": "1"}
    result = subprocess.run([BASH, str(DEPLOY / "install.sh")], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    assert (root / "opt/mirrorline").is_dir()
    for script in ("mirrorline", "mirrorline-source", "mirrorline-target"):
        link = root / "usr/local/bin" / script
        assert link.is_symlink()
        # The link names where the venv will be, not the scratch root.
        assert os.readlink(link) == f"/opt/mirrorline/venv/bin/{script}"
    for role in ROLES:
        installed = root / "etc/systemd/system" / f"mirrorline-{role}.service"
        assert installed.read_text() == (DEPLOY / f"mirrorline-{role}.service").read_text()
        assert installed.stat().st_mode & 0o777 == 0o644
        example = root / "etc/mirrorline" / f"{role}.toml.example"
        assert example.read_text() == (DEPLOY / f"{role}.toml.example").read_text()
        assert not (root / "etc/mirrorline" / f"{role}.toml").exists()
    assert (root / "etc/mirrorline/keys").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/mirrorline/tasks.d").is_dir()
    completions = root / "usr/local/share/bash-completion/completions"
    assert (completions / "mirrorline").read_text() == \
        (DEPLOY / "completions/mirrorline.bash").read_text()
    for agent in ("mirrorline-source", "mirrorline-target"):
        assert os.readlink(completions / agent) == "mirrorline"
    assert (root / "usr/local/share/zsh/site-functions/_mirrorline").read_text() == \
        (DEPLOY / "completions/_mirrorline").read_text()
    # Nothing outside the scratch root: every path the script printed is inside it.
    for line in result.stdout.splitlines():
        if line.startswith("== ") and (" into " in line or " under " in line):
            assert str(root) in line, line
    assert "Next steps" in result.stdout
    assert "--check-config" in result.stdout
    assert "systemctl enable --now mirrorline-source" in result.stdout

    # Run again: nothing changes and existing configs are kept.
    (root / "etc/mirrorline/target.toml.example").write_text("# edited\n")
    again = subprocess.run([BASH, str(DEPLOY / "install.sh")], env=env, capture_output=True,
                           text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert (root / "etc/mirrorline/target.toml.example").read_text() == "# edited\n"


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_install_script_honours_the_directory_flags(tmp_path: Path) -> None:
    assert BASH is not None
    root = tmp_path / "root"
    env = {**os.environ, "MIRRORLINE_INSTALL_SKIP_VENV": "1"}
    env.pop("DESTDIR", None)
    result = subprocess.run(
        [BASH, str(DEPLOY / "install.sh"), f"--destdir={root}", "--bindir", "/usr/bin",
         "--confdir", "/etc/ml", "--datadir", "/usr/share"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    unit = (root / "etc/systemd/system/mirrorline-target.service").read_text()
    assert "ExecStart=/usr/bin/mirrorline-target --config /etc/ml/target.toml\n" in unit
    assert "ExecStartPre=/usr/bin/mirrorline-target --config /etc/ml/target.toml " \
        "--check-config\n" in unit
    assert (root / "usr/bin/mirrorline").is_symlink()
    assert (root / "etc/ml/keys").is_dir()
    assert (root / "usr/share/zsh/site-functions/_mirrorline").is_file()


@pytest.mark.parametrize("name", ["mirrorline.bash", "_mirrorline"])
def test_completions_cover_every_cli_command(name: str) -> None:
    text = (DEPLOY / "completions" / name).read_text()
    for command in cli_commands():
        assert re.search(rf"(?<![\w-]){command}(?![\w-])", text), f"{command} missing in {name}"
    for option in ("--socket", "--json", "--check-config", "--config", "--log-level"):
        assert option in text, option


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_bash_completion_completes_commands_and_keywords() -> None:
    assert BASH is not None
    script = f"""
source {DEPLOY / "completions/mirrorline.bash"}
t() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=(); _mirrorline
      echo "${{COMPREPLY[*]}}"; }}
t mirrorline mi
t mirrorline --json mirror ''
t mirrorline --socket /run/x.sock taskprocessing e
t mirrorline help re
COMP_WORDS=(mirrorline-target --ch); COMP_CWORD=1; _mirrorline_agent; echo "${{COMPREPLY[*]}}"
"""
    out = subprocess.run([BASH, "--norc", "-c", script], capture_output=True, text=True,
                         timeout=30, check=True).stdout.splitlines()
    assert out == ["mirror", "start stop pause resume", "enable", "replication restore",
                   "--check-config"], out
