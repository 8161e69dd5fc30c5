"""The one results table, machine facts, and bench/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.profiles import Profile

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
COLUMNS = ("workload", "Mirrorline", "peer(s)", "ratio", "goal", "met?")


@dataclass
class Row:
    key: str
    workload: str
    mirrorline: str
    peers: str
    ratio: str
    goal: str
    met: str
    notes: list[str] = field(default_factory=list)

    def cells(self) -> tuple[str, ...]:
        return (f"{self.key} {self.workload}", self.mirrorline, self.peers, self.ratio,
                self.goal, self.met)


def seconds(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def rate(x: float, unit: str = "MB/s") -> str:
    return f"{x:,.0f} {unit}" if x >= 100 else f"{x:.1f} {unit}"


def table(rows: list[Row]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [COLUMNS, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]

    def line(values: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    out = [line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r.cells()) for r in rows]
    return "\n".join(out)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_facts(workdir: Path, versions: dict[str, str], load_start: str,
                  ) -> dict[str, str]:
    """nproc, RAM, kernel, CPU, the work dir's file system, Python and peer versions."""
    facts = {
        "nproc": str(len(os.sched_getaffinity(0))),
        "RAM": _meminfo(),
        "kernel": platform.release(),
        "CPU": _cpu_model(),
        "work dir file system": _fs_of(workdir),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load average (1/5/15 min)": f"{load_start} at the start, {load_average()} at the end "
                                     "(other work on the machine skews the figures)",
    }
    facts.update(versions)
    return facts


def git_commit(repo: Path) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench")
    return head + (" (+ uncommitted changes outside bench/)" if dirty else "")


def _meminfo() -> str:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _fs_of(path: Path) -> str:
    """File system type and device of the mount holding ``path``."""
    real = os.path.realpath(path)
    best = ("", "unknown", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split(" ")[4].replace("\\040", " ")
            fstype, source = right.split(" ")[:2]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[0]):
                best = (point, fstype, source)
    return f"{best[1]} on {best[2]} (mounted at {best[0]}; bench data in {real})"


def render_section(profile: Profile, commit: str, facts: dict[str, str], sizes: list[str],
                   rows: list[Row], notes: list[str], elapsed: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {profile.label}", "",
             f"- date: {now}; bench wall time {elapsed:.0f} s",
             f"- commit: {commit}"]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    lines += ["", "Sizes and runs: " + "; ".join(sizes) + ".", "", table(rows), ""]
    details = [(r.key, n) for r in rows for n in r.notes]
    if details or notes:
        lines += ["Details:", ""]
        lines += [f"- {k}: {n}" for k, n in details]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    return "\n".join(lines)


def update_results(profile: Profile, section: str, methods: str) -> None:
    """Replace this profile's section of RESULTS.md, keep the other's and the analysis
    block (``<!-- analysis -->``, written by hand), refresh methods."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    sections = {}
    for name in ("full", "quick"):
        m = re.search(rf"<!-- bench:{name} -->\n(.*?)<!-- /bench:{name} -->", old, re.S)
        sections[name] = m.group(1) if m else f"## {name} run\n\nNot run yet on this machine.\n"
    sections[profile.name] = section.rstrip("\n") + "\n"
    # The hand-written analysis (why a goal is missed, with its profile) survives reruns.
    m = re.search(r"<!-- analysis -->\n(.*?)<!-- /analysis -->", old, re.S)
    analysis = m.group(1).rstrip("\n") if m else ""
    text = ["# Mirrorline benchmark results", "",
            "Written by `bench/run.py`: `make bench` replaces the full section,",
            "`make bench-quick` the quick one. Issue 5 states the workloads and the goals;",
            "the methods are at the end. Ratios are what count; absolute figures are for",
            "the machine named in each section.", ""]
    for name in ("full", "quick"):
        text += [f"<!-- bench:{name} -->", sections[name].rstrip("\n"), f"<!-- /bench:{name} -->",
                 ""]
    if analysis:
        text += ["<!-- analysis -->", analysis, "<!-- /analysis -->", ""]
    text += [methods.rstrip("\n"), ""]
    RESULTS.write_text("\n".join(text))
