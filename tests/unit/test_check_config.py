"""``mirrorline-source|target --config FILE --check-config`` (issue 7, item 2 and test b).

Runs the installed console scripts, as the units' ExecStartPre= does, on every config
under tests/data/config/: a valid one exits 0; each broken one exits 78 (EX_CONFIG)
with one line per problem that names the key and says why (the file's
``# expect:`` lines).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
DATA = Path(__file__).resolve().parents[1] / "data" / "config"
INVALID = sorted((DATA / "invalid").glob("*.toml"))
EX_CONFIG = 78


def check(role: str, config: Path,
          flag: str = "--check-config") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / f"mirrorline-{role}"), "--config", str(config), flag],
                          capture_output=True, text=True, timeout=60, check=False)


def expectations(path: Path) -> list[str]:
    return [line.removeprefix("# expect:").strip() for line in path.read_text().splitlines()
            if line.startswith("# expect:")]


def test_there_are_broken_configs_for_both_agents() -> None:
    roles = {path.name.split("-", 1)[0] for path in INVALID}
    assert roles == {"source", "target"}
    assert len(INVALID) >= 20
    for path in INVALID:
        assert expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("role", ["source", "target"])
@pytest.mark.parametrize("flag", ["--check-config", "--check"])
def test_valid_config_exits_0(role: str, flag: str) -> None:
    result = check(role, DATA / "valid" / f"{role}.toml", flag)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip().endswith(": ok")


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_broken_config_exits_78_naming_the_problem(path: Path) -> None:
    role = path.name.split("-", 1)[0]
    result = check(role, path)
    assert result.returncode == EX_CONFIG, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    # One line per problem, each naming the file; no traceback.
    assert lines and all(line.startswith(f"mirrorline-{role}: {path}: ") for line in lines), lines
    assert "Traceback" not in result.stderr
    expected = expectations(path)
    for text in expected:
        assert any(text in line for line in lines), f"{text!r} not in:\n{result.stderr}"
    if "not valid TOML" not in expected[0]:
        assert len(lines) == len(expected), f"expected {len(expected)} problems:\n{result.stderr}"


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    result = check("target", tmp_path / "absent.toml")
    assert result.returncode == EX_CONFIG
    assert "cannot read config" in result.stderr and "absent.toml" in result.stderr


def test_bad_config_exits_78_without_the_check_flag_too(tmp_path: Path) -> None:
    # The unit's RestartPreventExitStatus=78 depends on the agent itself exiting 78.
    result = subprocess.run([str(BIN / "mirrorline-target"), "--config",
                             str(DATA / "invalid" / "target-unknown-key.toml")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == EX_CONFIG
    assert "metrix: unknown key" in result.stderr
