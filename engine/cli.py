"""The ``tidegate`` command. ``serve`` runs the engine; plugins add more commands
(the Insider plugin adds ``sandbox`` and ``demo``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from pathlib import Path

import uvloop

from engine import __version__
from engine.app import (
    DEFAULT_DATA_DIR,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    Engine,
    EngineConfig,
)
from engine.connector.info import tcp_port
from engine.delivery.worker import DeliverySettings
from engine.errors import TidegateError
from engine.gc_settings import settle_collector
from engine.ingest.http import INGEST_TOKEN_ENV
from engine.ingest.ingestor import DEFAULT_MAX_BACKLOG
from engine.logconfig import configure_logging
from engine.metrics import inherited_multiprocess_dir_problem
from engine.plugins import plugin_commands, plugin_manager


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def metrics_port(text: str) -> int | None:
    """``--metrics-port``: a TCP port (0: any free one), or ``off`` for no endpoint."""
    if text.strip().lower() == "off":
        return None
    try:
        return tcp_port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is neither a TCP port nor off") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidegate", description="Outbound sync engine: Antavo to customer data platforms."
    )
    parser.add_argument("--version", action="version", version=f"tidegate {__version__}")
    parser.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default="auto",
        help="log lines as console text or JSON (default: console on a terminal)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the engine: ingest HTTP, delivery, gRPC admin API")
    serve.add_argument(
        "--grpc-port",
        type=tcp_port,
        default=DEFAULT_GRPC_PORT,
        help=f"admin API port (default {DEFAULT_GRPC_PORT})",
    )
    serve.add_argument(
        "--http-port",
        type=tcp_port,
        default=DEFAULT_HTTP_PORT,
        help=f"ingest port (default {DEFAULT_HTTP_PORT})",
    )
    serve.add_argument(
        "--metrics-port",
        type=metrics_port,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus GET /metrics port, or off (default {DEFAULT_METRICS_PORT})",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"state, log and key files (default ./{DEFAULT_DATA_DIR})",
    )
    defaults = DeliverySettings()
    serve.add_argument(
        "--retry-base-seconds",
        type=positive,
        default=defaults.base_backoff,
        help=f"first retry delay ceiling, doubled per attempt (default {defaults.base_backoff:g})",
    )
    serve.add_argument(
        "--retry-max-seconds",
        type=positive,
        default=defaults.max_backoff,
        help=f"longest retry delay (default {defaults.max_backoff:g})",
    )
    serve.add_argument(
        "--max-backlog",
        type=int,
        default=DEFAULT_MAX_BACKLOG,
        help=f"queued items past which ingest answers 503 (default {DEFAULT_MAX_BACKLOG})",
    )
    serve.add_argument(
        "--ingest-in-process",
        action="store_true",
        help="serve ingest HTTP from the engine process instead of a worker process of its"
        " own (uses one core instead of two)",
    )
    serve.set_defaults(func=run_serve)
    for command in plugin_commands(plugin_manager()):
        added = sub.add_parser(command.name, help=command.help)
        command.configure(added)
        added.set_defaults(func=command.run)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    problem = inherited_multiprocess_dir_problem()
    if problem is not None:
        print(f"tidegate: cannot start: {problem}", file=sys.stderr)
        return 1
    config = EngineConfig(
        data_dir=args.data_dir,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        ingest_token=os.environ.get(INGEST_TOKEN_ENV, ""),
        max_backlog=args.max_backlog,
        metrics_port=args.metrics_port,
        ingest_worker=not args.ingest_in_process,
        log_format=args.log_format,
        log_level=args.log_level,
        delivery=DeliverySettings(
            base_backoff=args.retry_base_seconds,
            max_backoff=max(args.retry_max_seconds, args.retry_base_seconds),
        ),
    )
    # uvloop: the libuv event loop serves aiohttp and grpc.aio with less CPU per request.
    return uvloop.run(_serve(config))


async def _serve(config: EngineConfig) -> int:
    engine = Engine(config)
    try:
        await engine.start()
    except (OSError, TidegateError) as exc:
        print(f"tidegate: cannot start: {exc}", file=sys.stderr)
        return 1
    settle_collector()
    print(
        f"tidegate serving: gRPC admin on {config.host}:{engine.grpc_port}, "
        f"ingest on http://{config.host}:{engine.http_port}/v1/events, data in {config.data_dir}"
        f"{_metrics_address(config, engine)}",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("tidegate: stopping (finishing in-flight deliveries)", file=sys.stderr, flush=True)
    await engine.stop()
    gc.unfreeze()  # let the interpreter's exit release them (DuckDB reports any it cannot)
    return 0


def _metrics_address(config: EngineConfig, engine: Engine) -> str:
    """The start line's ending: where Prometheus scrapes (the line's other parts keep
    their order; bench and tests read them)."""
    if config.metrics_port is None:
        return ", metrics off"
    return f", metrics on http://{config.host}:{engine.metrics_port}/metrics"


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except TidegateError as exc:  # a plugin that breaks the contract
        print(f"tidegate: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args) or 0)
    except TidegateError as exc:
        print(f"tidegate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
