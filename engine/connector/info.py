"""What a plugin declares about itself: the connector it provides (``connector_info``) and
the ``tidegate`` subcommands it adds (``commands``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from engine.connector.records import CustomerIdMapping, EventMapping, ProfileMapping


def _accept(_: object) -> None:
    return None


@dataclass(frozen=True)
class CatalogEntry:
    """A name the destination knows, for people choosing mapping targets.

    ``kind`` is ``identifier``, ``attribute``, ``event`` or ``event_parameter``;
    ``type`` and ``format`` describe the value (e.g. ``string`` / ``E.164``);
    ``required_for`` lists the events that need this parameter.
    """

    kind: str
    name: str
    type: str = ""
    format: str = ""
    description: str = ""
    required_for: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConnectorInfo:
    """A connector: its name, request limits and validators.

    ``max_batch_items`` bounds the customers in one ``send`` (a customer's several items
    count once) and ``max_batch_bytes`` the JSON of what the hooks rendered for them plus
    a small envelope; an item over that alone is dead-lettered at stage ``map``.
    Validators raise ``InvalidInputError`` naming the field relative to what they check
    (``partner_name``); the admin API prefixes it (``connection.settings.partner_name``)
    and answers ``INVALID_ARGUMENT``. ``secret_required``: a connection needs an API key.

    Where it sends (``engine.connector.destinations``): ``destination_hosts`` lists the
    destination's host names, exact or ``*.suffix``; requests go out over https to them
    only, unless the operator allowed another destination at start-up.
    ``url_settings`` names the settings that hold a destination URL: the engine checks
    them when a connection is written and before it sends (and every request's URL as
    it goes out), so a connector writes no check of its own. Changing a setting of
    ``url_settings`` or ``key_bound_settings`` (those that decide who receives the key,
    such as an account name) requires the API key in the same request, so a changed
    destination never receives a stored key. The values of ``secret_settings``, like
    the API key, are taken out of request and response bodies before they are logged.
    """

    name: str
    max_batch_items: int
    max_batch_bytes: int
    secret_required: bool = True
    validate_settings: Callable[[Mapping[str, str]], None] = _accept
    validate_customer_id_mapping: Callable[[CustomerIdMapping], None] = _accept
    validate_profile_mapping: Callable[[ProfileMapping], None] = _accept
    validate_event_mapping: Callable[[EventMapping], None] = _accept
    catalog: tuple[CatalogEntry, ...] = ()
    """Optional: the destination's default attributes, events and parameters."""
    destination_hosts: tuple[str, ...] = ()
    url_settings: tuple[str, ...] = ()
    key_bound_settings: tuple[str, ...] = ()
    secret_settings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Command:
    """A ``tidegate`` subcommand. ``configure`` adds its arguments to the subcommand's
    parser; ``run`` gets the parsed arguments and returns the exit status."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def tcp_port(text: str) -> int:
    """An ``argparse`` type for a command's TCP port argument (0 asks for any free one)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535)")
    return value
