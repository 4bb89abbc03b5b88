"""``tidegate braze-sandbox``: the Braze sandbox on its own. A plugin of its own (entry
point ``braze-tools``), apart from the connector, through the ``commands`` hook. It
imports the sandbox only when the command runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from engine.connector import Command, hookimpl, tcp_port


@hookimpl
def commands() -> Sequence[Command]:
    """``braze-sandbox``."""
    return [
        Command(
            "braze-sandbox",
            "run the Braze REST API stand-in (/users/track and the identity endpoints)",
            _arguments,
            _run,
        )
    ]


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=tcp_port, default=8091, help="port (default 8091)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--api-key", default="sandbox-key", help="expected Bearer key")
    parser.add_argument(
        "--rate-limit", type=int, default=3000, help="requests per 3 s per key (0: no limit)"
    )
    parser.add_argument(
        "--per-array-limit",
        action="store_true",
        help="legacy contract: 75 objects per array instead of 75 in total",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before each answer")


def _run(args: argparse.Namespace) -> int:
    from plugins.braze.sandbox import SandboxConfig, run_sandbox

    config = SandboxConfig(
        api_key=args.api_key,
        rate_limit=args.rate_limit,
        per_array_limit=args.per_array_limit,
        latency_ms=args.latency_ms,
    )
    try:
        config.check()
    except ValueError as exc:
        raise SystemExit(f"tidegate braze-sandbox: {exc}") from None
    run_sandbox(args.host, args.port, config)
    return 0
