"""``tidegate sandbox`` and ``tidegate demo``: the Insider sandbox on its own, and the
engine with the sandbox, sample mappings and traffic. A plugin of its own (entry point
``insider-tools``), apart from the connector, through the ``commands`` hook.

Every ``tidegate`` process loads it, the ingest worker included: it imports what the
commands run only when they run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from engine.connector import Command, hookimpl, tcp_port


@hookimpl
def commands() -> Sequence[Command]:
    """``sandbox`` and ``demo``."""
    return [
        Command("sandbox", "run the Insider UCD API stand-in", _sandbox_arguments, _run_sandbox),
        Command(
            "demo",
            "run the engine and the Insider sandbox with sample mappings and traffic",
            _demo_arguments,
            _run_demo,
        ),
    ]


def _sandbox_arguments(sandbox: argparse.ArgumentParser) -> None:
    sandbox.add_argument("--port", type=tcp_port, default=8090, help="port (default 8090)")
    sandbox.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    sandbox.add_argument("--partner-name", default="tidegate", help="expected X-PARTNER-NAME")
    sandbox.add_argument("--api-key", default="sandbox-key", help="expected X-REQUEST-TOKEN")
    sandbox.add_argument("--latency-ms", type=float, default=0.0, help="delay before each answer")
    sandbox.add_argument("--retry-after", default=None, help="Retry-After value sent with 429s")


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--data-dir", type=Path, default=None, help="default: a temporary folder")
    demo.add_argument(
        "--grpc-port", type=tcp_port, default=0, help="admin API port (default: any free)"
    )
    demo.add_argument(
        "--http-port", type=tcp_port, default=0, help="ingest port (default: any free)"
    )
    demo.add_argument("--customers", type=int, default=40, help="simulated customers (default 40)")
    demo.add_argument(
        "--keep-running", action="store_true", help="keep serving after the traffic, for grpcurl"
    )


def _run_sandbox(args: argparse.Namespace) -> int:
    from plugins.insider.sandbox import SandboxConfig, run_sandbox

    try:
        config = SandboxConfig(
            partner_name=args.partner_name,
            api_key=args.api_key,
            latency_ms=args.latency_ms,
            rate_limit_retry_after=args.retry_after,
        )
    except ValueError as exc:
        raise SystemExit(f"tidegate sandbox: {exc}") from None
    run_sandbox(args.host, args.port, config)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from engine.logconfig import configure_logging
    from plugins.insider.tools.demo import run_demo

    # The demo prints its own view of the log; engine lines would only interleave with it.
    configure_logging(args.log_format, "warning")
    if args.customers < 1:
        raise SystemExit("tidegate demo: --customers must be at least 1")
    return run_demo(args)
