"""``tidegate sandbox`` and ``tidegate demo``, added through the ``register_commands`` hook."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.hookspecs import hookimpl


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535)")
    return value


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sandbox = subparsers.add_parser("sandbox", help="run the Insider UCD API stand-in")
    sandbox.add_argument("--port", type=_port, default=8090, help="port (default 8090)")
    sandbox.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    sandbox.add_argument("--partner-name", default="tidegate", help="expected X-PARTNER-NAME")
    sandbox.add_argument("--api-key", default="sandbox-key", help="expected X-REQUEST-TOKEN")
    sandbox.add_argument("--latency-ms", type=float, default=0.0, help="delay before each answer")
    sandbox.add_argument("--retry-after", default=None, help="Retry-After value sent with 429s")
    sandbox.set_defaults(func=_run_sandbox)

    demo = subparsers.add_parser(
        "demo", help="run the engine and the Insider sandbox with sample mappings and traffic"
    )
    demo.add_argument("--data-dir", type=Path, default=None, help="default: a temporary folder")
    demo.add_argument(
        "--grpc-port", type=_port, default=0, help="admin API port (default: any free)"
    )
    demo.add_argument("--http-port", type=_port, default=0, help="ingest port (default: any free)")
    demo.add_argument("--customers", type=int, default=40, help="simulated customers (default 40)")
    demo.add_argument(
        "--keep-running", action="store_true", help="keep serving after the traffic, for grpcurl"
    )
    demo.set_defaults(func=_run_demo)


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
    from plugins.insider.demo import run_demo

    # The demo prints its own view of the log; engine lines would only interleave with it.
    configure_logging(args.log_format, "warning")
    if args.customers < 1:
        raise SystemExit("tidegate demo: --customers must be at least 1")
    return run_demo(args)
