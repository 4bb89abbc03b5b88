"""Benchmark results: rows of (section, measure, result, goal), rendered as one Markdown
table with the machine they were measured on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SECTIONS = {
    "ceiling": "1. HTTP ceiling",
    "naive": "2. Naive baseline",
    "e2e": "3. End to end",
    "latency": "4. Latency",
    "logsearch": "5. Log search",
    "memory": "6. Memory",
    "ui": "7. The page",
    "scaleout": "8. Scale-out",
}


@dataclass
class Row:
    section: str
    measure: str
    result: str
    goal: str = ""
    met: bool | None = None  # None: no goal for this row


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(
        self, section: str, measure: str, result: str, goal: str = "", met: bool | None = None
    ) -> None:
        self.rows.append(Row(SECTIONS[section], measure, result, goal, met))

    def note(self, text: str) -> None:
        self.notes.append(text)


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0-100); NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    value = seconds * 1000
    return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"


def rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}/s"


def ratio(numerator: float, denominator: float) -> str:
    if not denominator:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def markdown(report: Report, header: Sequence[str]) -> str:
    lines = [*header, ""]
    lines.append("| Section | Measure | Result | Goal | Met |")
    lines.append("|---|---|---|---|---|")
    for row in report.rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.section} | {row.measure} | {row.result} | {row.goal} | {met} |")
    if report.notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"
