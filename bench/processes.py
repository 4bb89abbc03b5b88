"""The processes a benchmark drives: the engine (``tidegate serve``) and the bench sink,
each in its own process, plus what /proc says about them (CPU time, memory)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0
SERVING = re.compile(
    r"tidegate serving: gRPC admin on [^:]+:(\d+), ingest on http://[^:]+:(\d+)/v1/events"
)
SINK_LISTENING = re.compile(r"sink listening on (http://\S+)")


def _stat(pid: int) -> list[str]:
    """Fields 3 on of /proc/<pid>/stat (after the command name, which may hold spaces)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def family(pid: int) -> list[int]:
    """``pid`` and its live child processes: ``tidegate serve`` runs its ingest worker as
    a child, and the engine's cost is both processes' cost."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(pid):
            try:
                if int(_stat(int(entry.name))[1]) == pid:  # field 4: the parent's pid
                    children.append(int(entry.name))
            except (OSError, ValueError, IndexError):  # it exited meanwhile
                continue
    return [pid, *sorted(children)]


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """User plus system CPU time the process and (unless ``children`` is false) its live
    children have used so far (10 ms resolution)."""
    total = 0
    for member in family(pid) if children else [pid]:
        with contextlib.suppress(OSError):
            fields = _stat(member)
            # Fields 14 and 15 of proc(5), counted from 1; ``fields`` starts at field 3.
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak resident set) in KiB, summed over the process and its
    live children (a sum of peaks: at most what was ever resident at once)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    for member in family(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                name, _, rest = line.partition(":")
                if name in values:
                    values[name] += int(rest.split()[0])
    return values


@dataclass
class Process:
    """A child process; ``stop()`` (or leaving a ``with`` block) sends SIGTERM and waits,
    then kills."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def cpu(self, *, children: bool = True) -> float:
        return cpu_seconds(self.pid, children=children)

    def stop(self, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _wait_for(process: Process, pattern: re.Pattern[str]) -> re.Match[str]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = pattern.search(process.log_path.read_text(errors="replace"))
        if match:
            return match
        if process.popen.poll() is not None:
            break
        time.sleep(0.05)
    process.stop(timeout=2)
    raise RuntimeError(f"{process.name} did not start:\n{process.log_tail()}")


def _spawn(name: str, argv: list[str], log_path: Path, src: Path = REPO) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TIDEGATE_INGEST_TOKEN"}
    # Put ``src`` first on the path (ahead of the editable install), so ``--engine-src``
    # can run the engine of another checkout, e.g. the commit before a fix.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            argv, cwd=src, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    return Process(name, popen, log_path)


def start_sink(log_path: Path) -> Process:
    """The bench sink on a free loopback port; ``extra["url"]`` is its base URL."""
    process = _spawn("sink", [sys.executable, "-m", "bench.sink", "--port", "0"], log_path)
    process.extra["url"] = _wait_for(process, SINK_LISTENING).group(1)
    return process


ENGINE_SRC = REPO
"""The checkout whose engine is measured; ``python -m bench --engine-src`` changes it."""


ENGINE_ARGS: list[str] = []
"""Extra ``tidegate serve`` arguments for every engine the bench starts."""


def start_engine(data_dir: Path, log_path: Path) -> Process:
    """``tidegate serve`` from ``ENGINE_SRC`` on free loopback ports with JSON logs (the
    production format); ``extra`` holds ``grpc`` ("host:port"), ``ingest`` (the URL) and
    ``token``: the admin token the engine wrote to the data folder ("" for an engine from
    before tokens)."""
    argv = [
        sys.executable, "-m", "engine.cli", "--log-format", "json",
        "serve", "--grpc-port", "0", "--http-port", "0", "--data-dir", str(data_dir),
        *_metrics_args(ENGINE_SRC), *_ui_args(ENGINE_SRC), *_allow_args(ENGINE_SRC),
        *ENGINE_ARGS,
    ]  # fmt: skip
    process = _spawn("engine", argv, log_path, ENGINE_SRC)
    match = _wait_for(process, SERVING)
    process.extra["grpc"] = f"127.0.0.1:{match.group(1)}"
    process.extra["ingest"] = f"http://127.0.0.1:{match.group(2)}/v1/events"
    token_file = data_dir / "admin-token"
    process.extra["token"] = token_file.read_text().strip() if token_file.exists() else ""
    return process


def _ui_args(src: Path) -> list[str]:
    """The outbound-log page on a free port, for an engine that has one."""
    return ["--ui-port", "0"] if (src / "engine" / "ui").exists() else []


def _metrics_args(src: Path) -> list[str]:
    """The metrics endpoint on a free port, for an engine that has one (measured with its
    counting on; ``--engine-src`` may name a checkout from before it)."""
    return ["--metrics-port", "0"] if (src / "engine" / "metrics_server.py").exists() else []


def _allow_args(src: Path) -> list[str]:
    """Lets an engine that checks destinations send to the loopback sink (``--engine-src``
    may name a checkout from before the check)."""
    if (src / "engine" / "connector" / "destinations.py").exists():
        return ["--allow-destination", "127.0.0.1"]
    return []


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released): a destination that is down."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
