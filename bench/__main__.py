"""``python -m bench``: run the benchmarks, print the table, write it to bench/results/.

python -m bench                    # everything (about 10 minutes; the first run also
                                   # generates the 10M-row log, cached in bench/.cache)
python -m bench --quick            # a small version of every section, in seconds
python -m bench --only e2e,latency
python -m bench --profile          # also sample the engine with py-spy (the bench extra)
python -m bench --engine-src DIR   # measure the engine of another checkout (before/after)
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
import traceback
from pathlib import Path

from bench import processes, profiling
from bench.machine import describe
from bench.report import SECTIONS, Report, markdown
from bench.sections import FULL, QUICK, SECTION_RUNNERS, Context

BENCH_DIR = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Tidegate benchmarks against this machine's limits."
    )
    parser.add_argument("--quick", action="store_true", help="a small run of every section")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated sections to run: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample the engine with py-spy in sections 3-4"
    )
    parser.add_argument(
        "--engine-src",
        type=Path,
        default=processes.REPO,
        help="checkout whose engine to run (default: this one)",
    )
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    return parser


def _sections(only: str) -> list[str]:
    if not only:
        return list(SECTIONS)
    chosen = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        raise SystemExit(
            f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}"
        )
    return [name for name in SECTIONS if name in chosen]  # baselines first, whatever the order


async def run(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else FULL
    processes.ENGINE_SRC = args.engine_src.resolve()
    machine = describe(processes.ENGINE_SRC)
    stamp = f"{machine.date:%Y-%m-%d}-{machine.host}" + ("-quick" if args.quick else "")
    workdir = args.cache_dir / "runs" / f"{machine.date:%Y%m%d-%H%M%S}"
    report = Report()
    profile_dir = None
    if args.profile:
        if profiling.py_spy() is None:
            raise SystemExit("--profile needs py-spy: pip install -e '.[bench]'")
        profile_dir = workdir / "profiles"
    ctx = Context(settings, report, workdir, args.cache_dir, profile_dir)
    failed = []
    started = time.monotonic()
    for name in _sections(args.only):
        print(f"== {SECTIONS[name]}", flush=True)
        section_started = time.monotonic()
        try:
            await SECTION_RUNNERS[name](ctx)
        except Exception as exc:  # one broken section must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            report.add(name, "section failed", f"{exc.__class__.__name__}: {exc}"[:300])
        print(f"   ({time.monotonic() - section_started:.0f} s)", flush=True)
    elapsed = time.monotonic() - started
    command = "python -m bench " + " ".join(sys.argv[1:])
    header = [
        f"# Tidegate benchmarks, {machine.date:%Y-%m-%d}",
        "",
        *machine.lines(),
        f"- Command: `{command.strip()}` ({'quick' if args.quick else 'full'} settings), "
        f"{elapsed:.0f} s",
        "- Destination: the bench sink (`bench/sink.py`, its own process): it checks the "
        "auth headers, parses and shape-checks each upsert body and answers Insider's "
        "success body. The Insider sandbox keeps every request in memory and rate-limits, "
        "so it cannot take a throughput run.",
    ]
    if args.only:
        report.note("Only some sections ran: ratios need their baselines in the same run.")
    table = markdown(report, header)
    print()
    print(table)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{stamp}.md"
    out.write_text(table)
    print(f"written to {out}")
    if profile_dir is not None:
        _write_profiles(profile_dir, args.results_dir / f"{stamp}-profile.md", header)
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"failed sections: {', '.join(failed)}; their logs are in {workdir}")
    return 1 if failed else 0


def _write_profiles(profile_dir: Path, out: Path, header: list[str]) -> None:
    parts = [header[0].replace("benchmarks", "engine profiles"), "", *header[2:], ""]
    for raw in sorted(profile_dir.glob("*.txt")):
        parts += [f"## {raw.stem}", "", profiling.markdown(profiling.summarise(raw)), ""]
    out.write_text("\n".join(parts))
    print(f"profiles written to {out}")


def main() -> None:
    sys.exit(asyncio.run(run(build_parser().parse_args())))


if __name__ == "__main__":
    main()
