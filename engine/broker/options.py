"""``tidegate serve``'s broker flags (``--broker``, ``--role``, ``--partitions`` ...) and
their checks: a bad URL, a role that needs a broker without one, are clear errors."""

from __future__ import annotations

import argparse
from typing import Any

from engine.broker.logs import DEFAULT_LOG_STREAM_DAYS
from engine.broker.streams import (
    DEFAULT_DUPLICATE_WINDOW,
    DEFAULT_LEASE_TTL,
    DEFAULT_MAX_BYTES,
    DEFAULT_PARTITIONS,
    BrokerError,
    BrokerSettings,
    parse_servers,
)

ROLES = ("ingest", "worker", "log", "all")


def add_broker_options(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "scale-out on NATS JetStream (see the README: Scale-out on NATS JetStream)"
    )
    group.add_argument(
        "--broker",
        metavar="nats://HOST:PORT[,...]",
        help="run on this JetStream cluster instead of the embedded queue alone",
    )
    group.add_argument(
        "--role",
        choices=ROLES,
        default=None,
        help="with --broker: ingest (publish only), worker (own partitions, deliver), log (keep"
        " the outbound log, serve its reads and the page) or all (default all)",
    )
    group.add_argument(
        "--partitions",
        type=int,
        default=None,
        help=f"with --broker: partitions of the event stream (default {DEFAULT_PARTITIONS});"
        " fixed when the stream is created",
    )
    group.add_argument(
        "--lease-seconds",
        type=float,
        default=None,
        help=f"with --broker: partition lease TTL (default {DEFAULT_LEASE_TTL:g})",
    )
    group.add_argument(
        "--takeover-wait",
        type=float,
        default=None,
        help="with --broker: seconds a worker waits before pulling a partition whose earlier"
        " owner had events pending (default: lease TTL plus the request timeout)",
    )
    group.add_argument(
        "--broker-max-bytes",
        type=int,
        default=None,
        help=f"with --broker: size limit of a new event stream in bytes (default"
        f" {DEFAULT_MAX_BYTES}); past it ingest answers 503",
    )

    group.add_argument(
        "--log-stream-days",
        type=float,
        default=None,
        help=f"with --broker: days the log-row stream keeps rows for a log service that is"
        f" down (default {DEFAULT_LOG_STREAM_DAYS:g}); fixed when the stream is created",
    )


def broker_config(args: argparse.Namespace) -> dict[str, Any]:
    """``EngineConfig`` fields for the broker flags; raises ``BrokerError``."""
    extras = {
        "--role": args.role,
        "--partitions": args.partitions,
        "--lease-seconds": args.lease_seconds,
        "--takeover-wait": args.takeover_wait,
        "--broker-max-bytes": args.broker_max_bytes,
        "--log-stream-days": args.log_stream_days,
    }
    if args.broker is None:
        given = [flag for flag, value in extras.items() if value is not None]
        if given:
            raise BrokerError(
                f"{', '.join(given)} needs --broker nats://HOST:PORT (without --broker the"
                " engine runs embedded, with every role in this process)"
            )
        return {}
    for flag, value in extras.items():
        if flag != "--role" and value is not None and not value > 0:
            raise BrokerError(f"{flag}: {value} is not above 0")
    settings = BrokerSettings(
        servers=tuple(parse_servers(args.broker)),
        partitions=args.partitions or DEFAULT_PARTITIONS,
        max_bytes=args.broker_max_bytes or DEFAULT_MAX_BYTES,
        duplicate_window=DEFAULT_DUPLICATE_WINDOW,
        lease_ttl=args.lease_seconds or DEFAULT_LEASE_TTL,
    )
    settings.check()
    return {
        "broker": settings,
        "role": args.role or "all",
        "takeover_wait": args.takeover_wait,
        "log_stream_days": args.log_stream_days or DEFAULT_LOG_STREAM_DAYS,
    }
