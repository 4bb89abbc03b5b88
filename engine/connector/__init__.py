"""The connector kit: everything a connector plugin imports, from this one package.

A connector is a pluggy plugin of the project ``tidegate``, found through the
``tidegate`` entry-point group. It declares itself with ``connector_info`` and implements
``identify``, ``map_profile``, ``map_event`` and ``send`` (and, optionally, ``prepare``),
each marked with ``hookimpl``. It expresses the destination's answers as the engine's
errors. ``engine.connector.testing`` is the kit's test half: a scripted transport, record
builders and ``check_connector``. CONTRIBUTING.md ("Adding a connector") walks through it.
"""

from engine.connector.destinations import (
    Allowance,
    DestinationError,
    check_destination,
    echo,
)
from engine.connector.hookspecs import PROJECT_NAME, hookimpl
from engine.connector.info import CatalogEntry, Command, ConnectorInfo, tcp_port
from engine.connector.records import (
    ANTAVO_CUSTOMER_ID,
    ARRAY_MODE_INHERIT,
    DELIVERED,
    PROFILE_ACTIONS,
    AntavoEvent,
    Connection,
    Customer,
    CustomerIdMapping,
    Delivery,
    EventMapping,
    HttpResponse,
    ItemOutcome,
    ParameterMapping,
    ProfileChange,
    ProfileMapping,
    SendResult,
    Transport,
)
from engine.errors import (
    AuthError,
    DeliveryError,
    InvalidInputError,
    MappingError,
    PayloadTooLargeError,
    PermanentError,
    RetryableError,
)

__all__ = [
    "ANTAVO_CUSTOMER_ID",
    "ARRAY_MODE_INHERIT",
    "DELIVERED",
    "PROFILE_ACTIONS",
    "PROJECT_NAME",
    "Allowance",
    "AntavoEvent",
    "AuthError",
    "CatalogEntry",
    "Command",
    "Connection",
    "ConnectorInfo",
    "Customer",
    "CustomerIdMapping",
    "Delivery",
    "DeliveryError",
    "DestinationError",
    "EventMapping",
    "HttpResponse",
    "InvalidInputError",
    "ItemOutcome",
    "MappingError",
    "ParameterMapping",
    "PayloadTooLargeError",
    "PermanentError",
    "ProfileChange",
    "ProfileMapping",
    "RetryableError",
    "SendResult",
    "Transport",
    "check_destination",
    "echo",
    "hookimpl",
    "tcp_port",
]
