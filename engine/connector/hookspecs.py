"""Hook specifications of the ``tidegate`` pluggy project.

A connector plugin declares its connector with ``connector_info`` and implements
``identify``, ``map_profile``, ``map_event`` and ``send`` (``prepare`` and ``erase`` are
optional). The
engine calls a connection's hooks only on the plugin that declares its connector, so a
hook never checks whose connection it got. ``prepare``, ``identify`` and the ``map_*``
hooks are synchronous and pure; ``send`` is a coroutine function. A hook implementation
takes any subset of its spec's arguments, in any order. One that takes the context it
needs (``connection``, ``plan``) first and then every other argument of its spec, in the
spec's order, is called without an adapter in between.

What the hooks return is checked where it is used: a wrong type, a value JSON cannot
carry or an item over the connector's limits dead-letters that item at stage ``map``,
naming the plugin. Start-up refuses unknown hook names, a connector declared twice, and
a connector that misses a hook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pluggy

from engine.connector.info import Command, ConnectorInfo
from engine.connector.records import (
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
    """Declare the connector this plugin provides: name, batch limits, validators."""


@hookspec(firstresult=True)
def prepare(connection: Connection) -> Any:
    """Work out once what the other hooks need for ``connection``; passed to them as
    ``plan`` until the connection changes (optional: ``plan`` is ``None`` without it)."""


@hookspec(firstresult=True)
def identify(  # type: ignore[empty-body]
    connection: Connection, plan: Any, customer: Customer
) -> Mapping[str, Any]:
    """Return the destination identifiers of ``customer``; raise ``MappingError`` if none."""


@hookspec(firstresult=True)
def map_profile(  # type: ignore[empty-body]
    connection: Connection, plan: Any, customer: Customer, change: ProfileChange
) -> Mapping[str, Any]:
    """Return destination attributes for a profile change ({} when nothing is mapped)."""


@hookspec(firstresult=True)
def map_event(  # type: ignore[empty-body]
    connection: Connection, plan: Any, customer: Customer, event: AntavoEvent
) -> Sequence[Mapping[str, Any]]:
    """Return destination events for an Antavo event ([] when it is not mapped)."""


@hookspec(firstresult=True)
async def send(  # type: ignore[empty-body]
    connection: Connection, plan: Any, deliveries: Sequence[Delivery], transport: Transport
) -> SendResult:
    """Send ``deliveries`` through ``transport`` (one or more requests) and report an
    outcome for every one; raise the engine's errors for what failed the whole send."""


@hookspec(firstresult=True)
async def erase(
    connection: Connection,
    plan: Any,
    customer: Customer,
    identifiers: Mapping[str, Any],
    transport: Transport,
) -> None:
    """Delete ``customer`` at the destination, where ``identifiers`` (from ``identify``)
    name them, through ``transport``; raise the engine's errors for a failure (optional:
    ``EraseCustomer`` with ``at_destinations`` skips a connector without it)."""


@hookspec
def commands() -> Sequence[Command]:  # type: ignore[empty-body]
    """Return ``tidegate`` subcommands this plugin adds."""
