"""The benchmark harness runs from end to end in its quick form. No timing is asserted:
speed is what the full harness reports, not what a unit test decides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "1. HTTP ceiling",
    "2. Naive baseline",
    "3. End to end",
    "4. Latency",
    "5. Log search",
    "6. Memory",
    "7. The page",
    "8. Scale-out",
)


def test_quick_bench_completes_and_writes_a_table_with_every_section(tmp_path: Path) -> None:
    results = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--results-dir",
            str(results),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (table_file,) = results.glob("*-quick.md")
    table = table_file.read_text()
    assert "| Section | Measure | Result | Goal | Met |" in table
    for section in SECTIONS:
        rows = [line for line in table.splitlines() if line.startswith(f"| {section} |")]
        assert rows, f"no rows for {section}"
        assert not any("section failed" in row for row in rows), rows
    # Scale-out: every event reached the sink through the embedded engine and JetStream.
    scaleout = [line for line in table.splitlines() if line.startswith("| 8. Scale-out |")]
    assert not any("NOT drained" in row for row in scaleout), scaleout
    assert sum("first post -> every event at the sink" in row for row in scaleout) == 3
    assert "Machine:" in table and "Python:" in table and "Date:" in table


def test_the_marks_cost_measure_runs_and_reports_each_step() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.marks_cost", "--customers", "50"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if " customers in " in line]
    assert [line.split(":")[0] for line in lines] == [
        "flush, creating the keys",
        "flush, updating them",
        "load, 64 at a time",
    ]
