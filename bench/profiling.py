"""Sampling the engine with py-spy (the ``bench`` extra) and summarising where its CPU
time goes.

py-spy attaches to the running ``tidegate serve`` process and its ingest worker from
outside (``--subprocesses``; ``--nonblocking``: it never pauses the engine), records
collapsed stacks per process and thread, and the summary ranks
functions by the share of samples they were on CPU in.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import processes
from bench.processes import REPO

RATE = 100  # samples per second
FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")
PROJECT_DIRS = ("engine/", "plugins/")
ENTRY = "engine/cli.py"  # on every main-thread stack: it says nothing about where time goes


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


@dataclass
class Profiler:
    popen: subprocess.Popen[bytes]
    out: Path

    @classmethod
    def start(cls, pid: int, seconds: float, out: Path) -> Profiler:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", str(RATE), "--format", "raw", "--threads", "--nonblocking",
            "--full-filenames", "--subprocesses", "--output", str(out),
        ]  # fmt: skip
        log = out.with_suffix(".log").open("wb")
        return cls(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), out)

    def wait(self, timeout: float = 60.0) -> None:
        self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(10)


def _short(path: str) -> str:
    for root in (f"{processes.ENGINE_SRC}/", f"{REPO}/"):
        if path.startswith(root):
            return path[len(root) :]
    marker = "site-packages/"
    if marker in path:
        return path[path.index(marker) + len(marker) :]
    return path.rsplit("/lib/python3", 1)[-1].split("/", 1)[-1] if "/lib/python3" in path else path


def _frame(text: str) -> tuple[str, str]:
    """(function, short path) of one collapsed-stack frame."""
    match = FRAME.match(text)
    if match is None:
        return text, ""
    return match.group("function"), _short(match.group("path"))


@dataclass
class Summary:
    samples: int
    threads: Counter[str]
    leaf: Counter[str]  # function on top of the stack
    inclusive: Counter[str]  # project functions anywhere on the stack
    nearest: Counter[str]  # samples charged to the innermost project frame

    def share(self, count: int) -> str:
        return f"{100 * count / self.samples:.1f}%" if self.samples else "n/a"


def summarise(raw: Path) -> Summary:
    threads: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    nearest: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        process = ""
        if frames[0].startswith("process "):  # --subprocesses: which process, by command
            process = "ingest worker " if "engine.ingest.worker" in frames.pop(0) else ""
        thread = process + "?"
        if frames and frames[0].startswith("thread ("):
            thread = process + (frames.pop(0).partition(": ")[2] or "?")
        threads[thread] += count
        parsed = [_frame(f) for f in frames]
        if not parsed:
            continue
        function, path = parsed[-1]
        leaf[f"{function} ({path})"] += count
        project = [f"{fn} ({p})" for fn, p in parsed if p.startswith(PROJECT_DIRS) and p != ENTRY]
        for name in set(project):
            inclusive[name] += count
        outside = f"(no Tidegate frame: event loop, aiohttp, grpc) [{thread}]"
        nearest[project[-1] if project else outside] += count
    return Summary(total, threads, leaf, inclusive, nearest)


def markdown(summary: Summary, top: int = 15) -> str:
    def table(title: str, counter: Counter[str], what: str) -> list[str]:
        lines = [f"### {title}", "", f"| Share | {what} |", "|---:|---|"]
        lines += [f"| {summary.share(n)} | `{name}` |" for name, n in counter.most_common(top)]
        return [*lines, ""]

    lines = [
        f"{summary.samples:,} samples at {RATE}/s of threads py-spy saw as active (on CPU or"
        " in a blocking call such as a commit), across all threads. Shares are of those"
        " samples, not of CPU time.",
        "",
    ]
    lines += table("By thread", summary.threads, "Thread")
    lines += table(
        "Self time charged to the innermost Tidegate frame (includes the libraries it calls)",
        summary.nearest,
        "Function (file)",
    )
    lines += table("Inclusive time of Tidegate functions", summary.inclusive, "Function (file)")
    lines += table("Self time by leaf function", summary.leaf, "Function (file)")
    return "\n".join(lines)
