"""Hook specifications of the ``tidegate`` pluggy project.

A connector plugin implements these for its own destination. Every hook receives the
connection it acts for and must return ``None`` for connections of other connectors, so
several connector plugins can be installed at once. ``identify`` and the ``map_*`` hooks
are synchronous and pure. ``send`` returns an awaitable (the engine awaits it) or ``None``.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import pluggy

from engine.connectors import ConnectorInfo
from engine.records import (
    AntavoEvent,
    Connection,
    Customer,
    Delivery,
    ProfileChange,
    SendResult,
    Transport,
)

PROJECT_NAME = "tidegate"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def connector_info() -> ConnectorInfo:  # type: ignore[empty-body]
    """Describe the connector this plugin provides: name, batch limits, validation."""


@hookspec(firstresult=True)
def identify(connection: Connection, customer: Customer) -> Mapping[str, Any] | None:
    """Return the destination identifiers of ``customer``; raise ``MappingError`` if none."""


@hookspec(firstresult=True)
def map_profile(
    connection: Connection, customer: Customer, change: ProfileChange
) -> Mapping[str, Any] | None:
    """Return destination attributes for a profile change ({} when nothing is mapped)."""


@hookspec(firstresult=True)
def map_event(
    connection: Connection, customer: Customer, event: AntavoEvent
) -> Sequence[Mapping[str, Any]] | None:
    """Return destination events for an Antavo event ([] when it is not mapped)."""


@hookspec(firstresult=True)
def send(
    connection: Connection, deliveries: Sequence[Delivery], transport: Transport
) -> Awaitable[SendResult] | None:
    """Return an awaitable that sends ``deliveries`` in one request and reports outcomes."""


@hookspec
def register_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``tidegate`` subcommands; each sets ``func`` (taking the parsed args) as default."""
