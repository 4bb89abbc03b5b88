"""``tidegate sandbox``: the Insider sandbox on its own. A plugin of its own (entry point
``insider-tools``), apart from the connector, through the ``commands`` hook. (``tidegate
demo``, which shows Insider and Braze side by side, lives in ``plugins.demo``.)

Every ``tidegate`` process loads it, the ingest worker included: it imports what the
commands run only when they run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from engine.connector import Command, hookimpl, tcp_port


@hookimpl
def commands() -> Sequence[Command]:
    """``sandbox``."""
    return [
        Command("sandbox", "run the Insider UCD API stand-in", _sandbox_arguments, _run_sandbox),
    ]


def _sandbox_arguments(sandbox: argparse.ArgumentParser) -> None:
    sandbox.add_argument("--port", type=tcp_port, default=8090, help="port (default 8090)")
    sandbox.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    sandbox.add_argument("--partner-name", default="tidegate", help="expected X-PARTNER-NAME")
    sandbox.add_argument("--api-key", default="sandbox-key", help="expected X-REQUEST-TOKEN")
    sandbox.add_argument("--latency-ms", type=float, default=0.0, help="delay before each answer")
    sandbox.add_argument("--retry-after", default=None, help="Retry-After value sent with 429s")


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
