"""What a result was measured on: the machine, the Python, the date and the code."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


@dataclass(frozen=True)
class Machine:
    host: str
    cores: int
    cpu: str
    memory_gib: float
    python: str
    system: str
    date: datetime
    load: tuple[float, float, float]  # 1/5/15-minute load average when the run started
    code: str  # the commit of the measured engine, and whether it had local changes

    def lines(self) -> list[str]:
        return [
            f"- Date: {self.date:%Y-%m-%d %H:%M} UTC",
            f"- Machine: {self.host}, {self.cores} cores ({self.cpu}), "
            f"{self.memory_gib:.1f} GiB memory, {self.system}",
            f"- Python: {self.python}",
            f"- Load average when the run started: {' / '.join(f'{x:.2f}' for x in self.load)} "
            "(the machine is shared: compare ratios, not absolute figures)",
            f"- Engine code: {self.code}",
        ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _git(src: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def describe_code(src: Path) -> str:
    commit = _git(src, "rev-parse", "--short=12", "HEAD")
    if not commit:
        return f"{src} (not a git checkout)"
    changed = _git(src, "status", "--porcelain", "--", "engine", "plugins", "pyproject.toml")
    count = len(changed.splitlines())
    state = f"plus uncommitted changes in {count} files" if count else "clean"
    return f"commit {commit} ({state}) from {src}"


def describe(src: Path) -> Machine:
    return Machine(
        host=socket.gethostname(),
        cores=os.cpu_count() or 0,
        cpu=_cpu_model(),
        memory_gib=_memory_gib(),
        python=f"{platform.python_implementation()} {platform.python_version()}",
        system=f"{platform.system()} {platform.release()}",
        date=datetime.now(UTC),
        load=os.getloadavg(),
        code=describe_code(src),
    )
