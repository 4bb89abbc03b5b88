"""Plugins: loading, the start-up contract checks, and the dispatch of a connection's hooks
to the one plugin that declares its connector.

Connector plugins come from the ``tidegate`` entry-point group (and, in tests and tools,
from objects passed in). At start-up ``Connectors`` asks each plugin for its
``connector_info`` and refuses, with a ``PluginError`` naming the plugin:

- a hook name the specs do not know (a misspelling would otherwise never be called);
- two plugins declaring one connector;
- a connector plugin missing ``identify``, ``map_profile``, ``map_event`` or ``send``;
- a synchronous hook written as ``async def``;
- a plugin implementing connector hooks without declaring a connector;
- a ``ConnectorInfo`` whose ``destination_hosts`` hold anything but host names and
  ``*.suffix`` patterns, or whose ``url_settings``, ``key_bound_settings`` or
  ``secret_settings`` are not tuples of setting names.

``Connectors`` also holds the destinations the operator allowed at start-up
(``--allow-destination``), and checks a connection's destination URLs against them and
its connector's ``destination_hosts``: when a connection is written
(``check_settings``), when its hooks are bound for delivery, and for each request
(``ConnectionHooks.check_url``).

For a connection, ``Connectors.hooks`` returns ``ConnectionHooks``: that connection's
hooks on its connector's plugin only, bound to the connection and to what the plugin's
``prepare`` made of it, with what they return checked (``ContractError`` names the
plugin). Hook wrappers of other plugins (``wrapper=True``) still wrap every connector's
hooks, through pluggy's own call path.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy
import structlog

from engine.connector import hookspecs
from engine.connector.destinations import (
    Allowance,
    DestinationError,
    check_destination,
    check_host_pattern,
)
from engine.connector.info import Command, ConnectorInfo
from engine.connector.records import (
    AntavoEvent,
    Connection,
    Customer,
    Delivery,
    ItemOutcome,
    ProfileChange,
    SendResult,
    Transport,
)
from engine.errors import (
    ConnectorCrashError,
    ContractError,
    DeliveryError,
    InvalidInputError,
    MappingError,
    PluginError,
)

log = structlog.get_logger("tidegate.plugins")

PIPELINE_HOOKS = ("identify", "map_profile", "map_event", "send")
"""Hooks every connector implements."""
CONNECTOR_HOOKS = ("prepare", *PIPELINE_HOOKS, "erase")
"""Hooks called for a connection, on its connector's plugin only."""
SYNCHRONOUS_HOOKS = ("connector_info", "prepare", "identify", "map_profile", "map_event")
CONTEXT = ("connection", "plan")
"""Arguments the engine binds once per connection; the rest are passed per call."""
HOOK_SPECS = frozenset(
    name
    for name, fn in vars(hookspecs).items()
    if inspect.isfunction(fn) and hasattr(fn, f"{hookspecs.PROJECT_NAME}_spec")
)


def plugin_manager(
    extra_plugins: Iterable[object] = (), load_entry_points: bool = True
) -> pluggy.PluginManager:
    """A plugin manager with the hook specs, installed plugins and ``extra_plugins``.

    Raises ``PluginError`` when a plugin implements a hook the specs do not know, or one
    whose arguments do not match its spec.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    try:
        if load_entry_points:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
        for plugin in extra_plugins:
            pm.register(plugin, name=_free_name(pm, plugin))
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {_name_of(pm, exc.plugin)!r} breaks a hook spec: {exc}"
        ) from None
    _refuse_unknown_hooks(pm)
    return pm


def plugin_commands(pm: pluggy.PluginManager) -> list[Command]:
    """The ``tidegate`` subcommands every plugin adds, in pluggy's order."""
    return [command for commands in pm.hook.commands() for command in commands]


def _free_name(pm: pluggy.PluginManager, plugin: object) -> str:
    base = getattr(plugin, "__name__", None) or type(plugin).__name__
    name, n = base, 1
    while pm.has_plugin(name):
        n += 1
        name = f"{base}#{n}"
    return name


def _name_of(pm: pluggy.PluginManager, plugin: object) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", None) or type(plugin).__name__


def _refuse_unknown_hooks(pm: pluggy.PluginManager) -> None:
    for name in vars(pm.hook):
        caller = getattr(pm.hook, name)
        if not isinstance(caller, pluggy.HookCaller) or caller.spec is not None:
            continue
        for impl in caller.get_hookimpls():
            close = difflib.get_close_matches(name, sorted(HOOK_SPECS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PluginError(
                f"plugin {impl.plugin_name!r} implements {name!r}, which is not a tidegate "
                f"hook{hint} The hooks are: {', '.join(sorted(HOOK_SPECS))}"
            )


def _impls(pm: pluggy.PluginManager, hook: str) -> list[pluggy.HookImpl]:
    caller: pluggy.HookCaller = getattr(pm.hook, hook)
    return caller.get_hookimpls()


def _check_destination_fields(plugin_name: str, info: ConnectorInfo) -> None:
    """Refuses (``PluginError``) a ``ConnectorInfo`` whose destination fields are not
    what the engine needs to check where the connector sends."""
    for name in ("destination_hosts", "url_settings", "key_bound_settings", "secret_settings"):
        value = getattr(info, name)
        if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
            raise PluginError(
                f"plugin {plugin_name!r}: ConnectorInfo.{name} must be a tuple of non-empty strings"
            )
    for pattern in info.destination_hosts:
        try:
            check_host_pattern(pattern)
        except DestinationError as exc:
            raise PluginError(
                f"plugin {plugin_name!r}: ConnectorInfo.destination_hosts: {exc}"
            ) from None


class Connectors:
    """The installed connectors by name, checked when the engine starts. ``allowed``:
    the destinations the operator allowed besides what connectors declare."""

    def __init__(self, pm: pluggy.PluginManager, allowed: Sequence[Allowance] = ()) -> None:
        self.allowed = tuple(allowed)
        self._by_name: dict[str, Connector] = {}
        self._bound: dict[str, ConnectionHooks] = {}
        by_plugin: dict[object, Connector] = {}
        for impl in _impls(pm, "connector_info"):
            if inspect.iscoroutinefunction(impl.function):
                raise PluginError(f"plugin {impl.plugin_name!r}: connector_info must not be async")
            info = impl.function()
            if not isinstance(info, ConnectorInfo):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: connector_info returned "
                    f"{type(info).__name__}, not a ConnectorInfo"
                )
            known = self._by_name.get(info.name)
            if known is not None:
                raise PluginError(
                    f"plugins {known.plugin_name!r} and {impl.plugin_name!r} both declare "
                    f"connector {info.name!r}; uninstall one of them"
                )
            _check_destination_fields(impl.plugin_name, info)
            connector = Connector(pm, impl.plugin, impl.plugin_name, info, self.allowed)
            self._by_name[info.name] = by_plugin[impl.plugin] = connector
        for hook in CONNECTOR_HOOKS:
            for impl in _impls(pm, hook):
                if impl.plugin not in by_plugin and not (impl.wrapper or impl.hookwrapper):
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} implements {hook!r} but declares no "
                        "connector: add a connector_info hook to it"
                    )
        for connector in by_plugin.values():
            connector.resolve(pm, others=[p for p in by_plugin if p is not connector.plugin])

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> Connector:
        """The connector called ``name``; ``InvalidInputError`` names the installed ones."""
        try:
            return self._by_name[name]
        except KeyError:
            allowed = ", ".join(self.names()) or "(no connector plugin installed)"
            raise InvalidInputError(
                "connector", f"unknown connector {name!r}; installed: {allowed}"
            ) from None

    def only(self) -> str:
        """The name of the one installed connector: what a connection without a
        connector gets. ``InvalidInputError`` when several (or none) are installed."""
        if len(self._by_name) == 1:
            return next(iter(self._by_name))
        installed = ", ".join(self.names()) or "(no connector plugin installed)"
        raise InvalidInputError(
            "connection.connector", f"required: name one of the installed connectors: {installed}"
        )

    def info(self, name: str) -> ConnectorInfo:
        return self.get(name).info

    def check_settings(self, info: ConnectorInfo, settings: Mapping[str, str]) -> None:
        """Refuses (``InvalidInputError`` naming the setting) a destination URL in
        ``settings`` that the connection may not send to, and control characters in any
        setting (they would break a request header)."""
        check_settings(info, settings, self.allowed)

    def hooks(self, connection: Connection) -> ConnectionHooks:
        """The hooks of ``connection``, bound to this very object: a changed connection is
        a new object, which its connector's ``prepare`` sees first.

        Raises ``InvalidInputError`` for a connector that is not installed and
        ``ContractError`` (stage ``prepare``) when ``prepare`` fails.
        """
        bound = self._bound.get(connection.id)
        if bound is None or bound.connection is not connection:
            bound = self.get(connection.connector).bind(connection)
            self._bound[connection.id] = bound
        return bound

    def forget(self, connection_id: str) -> None:
        """Drops what was bound for a connection that no longer exists."""
        self._bound.pop(connection_id, None)


class Connector:
    """One installed connector: what its plugin declared, and its hook implementations."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        plugin: object,
        plugin_name: str,
        info: ConnectorInfo,
        allowed: Sequence[Allowance] = (),
    ) -> None:
        self.allowed = tuple(allowed)
        self.plugin = plugin
        self.plugin_name = plugin_name
        self.info = info
        self.name = info.name
        self._calls: dict[str, _Direct | _ThroughPluggy | None] = {}
        own = {
            hook: [i for i in _impls(pm, hook) if i.plugin is plugin and not _wraps(i)]
            for hook in CONNECTOR_HOOKS
        }
        missing = [hook for hook in PIPELINE_HOOKS if not own[hook]]
        if missing:
            raise PluginError(
                f"plugin {plugin_name!r} declares connector {info.name!r} but does not "
                f"implement {', '.join(missing)}"
            )
        for hook, impls in own.items():
            if hook in SYNCHRONOUS_HOOKS and any(
                inspect.iscoroutinefunction(i.function) for i in impls
            ):
                raise PluginError(
                    f"plugin {plugin_name!r}: {hook} must be a plain function, not async "
                    "(only send and erase are awaited)"
                )

    def resolve(self, pm: pluggy.PluginManager, others: Sequence[object]) -> None:
        """Settles how each hook is called: the implementation itself, or pluggy's call
        path without the other connectors' plugins when some plugin wraps the hook."""
        for hook in CONNECTOR_HOOKS:
            impls = _impls(pm, hook)
            own = [i for i in impls if i.plugin is self.plugin and not _wraps(i)]
            if not own:
                self._calls[hook] = None
            elif len(own) == 1 and not any(_wraps(i) for i in impls):
                self._calls[hook] = _Direct(own[0].function, tuple(own[0].argnames))
            else:
                self._calls[hook] = _ThroughPluggy(pm.subset_hook_caller(hook, others))

    def bind(self, connection: Connection) -> ConnectionHooks:
        """The hooks of ``connection``; runs ``prepare`` (``ContractError`` if it fails).

        Raises ``InvalidInputError`` for a destination URL in its settings that it may
        not send to: one stored by an older release, or allowed by an earlier start."""
        check_settings(self.info, connection.settings, self.allowed, "connection.settings")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in connection.api_key):
            raise InvalidInputError(
                "connection.api_key",
                "holds a control character (a line break?) and cannot be sent in a header; "
                "set the key again",
            )
        plan: Any = None
        prepare = self._calls.get("prepare")
        if prepare is not None:
            try:
                plan = _bind(prepare, {"connection": connection}, ())()
            except Exception as exc:
                raise ContractError(
                    self.plugin_name, f"prepare failed: {_describe(exc, connection)}", "prepare"
                ) from exc
        return ConnectionHooks(self, connection, plan)

    def call(self, hook: str) -> _Direct | _ThroughPluggy:
        call = self._calls[hook]
        assert call is not None  # PIPELINE_HOOKS are required at start-up
        return call

    def optional(self, hook: str) -> _Direct | _ThroughPluggy | None:
        """How an optional hook is called, or None when the connector lacks it."""
        return self._calls.get(hook)


def _wraps(impl: pluggy.HookImpl) -> bool:
    return bool(impl.wrapper or impl.hookwrapper)


@dataclass(frozen=True)
class _Direct:
    """A hook called as its one implementation, with the arguments it names."""

    function: Callable[..., Any]
    argnames: tuple[str, ...]


@dataclass(frozen=True)
class _ThroughPluggy:
    """A hook called through pluggy (some plugin wraps it), every argument by keyword."""

    caller: pluggy.HookCaller


def _bind(
    call: _Direct | _ThroughPluggy, fixed: Mapping[str, Any], free: tuple[str, ...]
) -> Callable[..., Any]:
    """``function(*values)`` for the ``free`` arguments in order, the ``fixed`` ones bound.

    An implementation may take any subset of its spec's arguments, in any order. One that
    takes the bound arguments first and then every free one in spec order is called
    straight through ``functools.partial``; others through a small adapter.
    """
    if isinstance(call, _ThroughPluggy):
        caller, context = call.caller, dict(fixed)

        def through_pluggy(*values: Any) -> Any:
            return caller(**context, **dict(zip(free, values, strict=True)))

        return through_pluggy
    function, argnames = call.function, call.argnames
    bound = [name for name in argnames if name in fixed]
    if argnames == (*bound, *free):
        return functools.partial(function, *[fixed[name] for name in bound])
    sources = [
        (name in fixed, fixed.get(name), free.index(name) if name in free else -1)
        for name in argnames
    ]

    def adapted(*values: Any) -> Any:
        return function(*[value if is_fixed else values[i] for is_fixed, value, i in sources])

    return adapted


def check_settings(
    info: ConnectorInfo,
    settings: Mapping[str, str],
    allowed: Sequence[Allowance],
    prefix: str = "",
) -> None:
    """See ``Connectors.check_settings``; ``prefix`` goes before the setting's name."""
    lead = f"{prefix}." if prefix else ""
    for name, value in settings.items():
        if isinstance(value, str) and any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise InvalidInputError(
                f"{lead}{name}", "must not hold control characters (a line break, a tab)"
            )
    for name in info.url_settings:
        url = settings.get(name)
        if url is None:
            continue
        try:
            check_destination(url, info.destination_hosts, allowed, connector=info.name)
        except DestinationError as exc:
            raise InvalidInputError(f"{lead}{name}", str(exc)) from None


def key_bound_changes(
    info: ConnectorInfo, old: Mapping[str, str], new: Mapping[str, str]
) -> list[str]:
    """The settings that decide who receives the API key (``url_settings`` and
    ``key_bound_settings``) whose value differs between ``old`` and ``new``."""
    bound = dict.fromkeys((*info.url_settings, *info.key_bound_settings))
    return [name for name in bound if old.get(name) != new.get(name)]


def connection_secrets(info: ConnectorInfo, connection: Connection) -> tuple[str, ...]:
    """The values to take out of logged bodies: the API key and every secret setting."""
    values = [connection.api_key, *(connection.settings.get(n, "") for n in info.secret_settings)]
    return tuple(v for v in dict.fromkeys(values) if v)


def _describe(exc: BaseException, connection: Connection) -> str:
    """An exception as one line, with the connection's key taken out."""
    text = f"{exc.__class__.__name__}: {exc}"
    return text.replace(connection.api_key, "[redacted]") if connection.api_key else text


class ConnectionHooks:
    """One connection's hooks on its connector's plugin, bound to the connection and its
    plan, with what they return checked against the contract."""

    def __init__(self, connector: Connector, connection: Connection, plan: Any) -> None:
        self.connector = connector
        self.connection = connection
        self.plan = plan
        self.plugin = connector.plugin_name
        self.info: ConnectorInfo = connector.info
        fixed = {"connection": connection, "plan": plan}
        self._identify = _bind(connector.call("identify"), fixed, ("customer",))
        self._map_profile = _bind(connector.call("map_profile"), fixed, ("customer", "change"))
        self._map_event = _bind(connector.call("map_event"), fixed, ("customer", "event"))
        self._send = _bind(connector.call("send"), fixed, ("deliveries", "transport"))
        erase = connector.optional("erase")
        self._erase = (
            None if erase is None else _bind(erase, fixed, ("customer", "identifiers", "transport"))
        )

    @property
    def can_erase(self) -> bool:
        """Whether the connector deletes a customer at its destination (``erase``)."""
        return self._erase is not None

    async def erase(
        self, customer: Customer, identifiers: Mapping[str, Any], transport: Transport
    ) -> None:
        """Deletes ``customer`` at the destination. Raises the engine's ``DeliveryError``s;
        a plugin's own exception is a ``ConnectorCrashError``."""
        assert self._erase is not None, "can_erase first"
        try:
            result = self._erase(customer, identifiers, transport)
            if inspect.isawaitable(result):
                await result
        except DeliveryError:
            raise
        except Exception as exc:
            log.exception("plugin_erase_failed", plugin=self.plugin, connection=self.connection.id)
            raise ConnectorCrashError(self.plugin, _describe(exc, self.connection), exc) from None

    def check_url(self, url: str) -> None:
        """Raises ``DestinationError`` unless this connection may send to ``url``."""
        info = self.info
        check_destination(url, info.destination_hosts, self.connector.allowed, connector=info.name)

    def secrets(self) -> tuple[str, ...]:
        """What the outbound log must not show: the API key and the secret settings."""
        return connection_secrets(self.info, self.connection)

    def broken(self, message: str, stage: str = "map") -> ContractError:
        """The error for a hook that broke the contract, naming the plugin."""
        return ContractError(self.plugin, message, stage)

    def _failed(self, hook: str, exc: Exception) -> ContractError:
        return self.broken(f"{hook} raised {_describe(exc, self.connection)}")

    def identify(self, customer: Customer) -> Mapping[str, Any]:
        """The destination identifiers of ``customer``. Raises ``MappingError``."""
        try:
            identifiers = self._identify(customer)
        except MappingError:
            raise
        except Exception as exc:
            raise self._failed("identify", exc) from exc
        if type(identifiers) is not dict and not isinstance(identifiers, Mapping):
            raise self.broken(f"identify returned {_kind(identifiers)}, not a mapping")
        return identifiers

    def map_profile(self, customer: Customer, change: ProfileChange) -> Mapping[str, Any]:
        """Destination attributes for ``change``. Raises ``MappingError``."""
        try:
            attributes = self._map_profile(customer, change)
        except MappingError:
            raise
        except Exception as exc:
            raise self._failed("map_profile", exc) from exc
        if type(attributes) is not dict and not isinstance(attributes, Mapping):
            raise self.broken(f"map_profile returned {_kind(attributes)}, not a mapping")
        return attributes

    def map_event(self, customer: Customer, event: AntavoEvent) -> list[Mapping[str, Any]]:
        """Destination events for ``event`` ([] when unmapped). Raises ``MappingError``."""
        try:
            events = self._map_event(customer, event)
        except MappingError:
            raise
        except Exception as exc:
            raise self._failed("map_event", exc) from exc
        if type(events) is not list:
            if not isinstance(events, Sequence) or isinstance(events, str | bytes):
                raise self.broken(f"map_event returned {_kind(events)}, not a list of events")
            events = list(events)
        for one in events:
            if type(one) is not dict and not isinstance(one, Mapping):
                raise self.broken(f"map_event returned a list holding {_kind(one)}, not events")
        return events

    async def send(self, deliveries: Sequence[Delivery], transport: Transport) -> SendResult:
        """Sends ``deliveries``. Raises the engine's ``DeliveryError``s; a plugin's own
        exception is a ``ConnectorCrashError`` (retried within the retry window), and a
        result that is not a ``SendResult`` a ``ContractError`` at stage ``send``."""
        try:
            result = self._send(deliveries, transport)
            if inspect.isawaitable(result):
                result = await result
        except DeliveryError:
            raise
        except Exception as exc:
            log.exception("plugin_send_failed", plugin=self.plugin, connection=self.connection.id)
            raise ConnectorCrashError(self.plugin, _describe(exc, self.connection), exc) from None
        if not isinstance(result, SendResult):
            raise self.broken(f"send returned {_kind(result)}, not a SendResult", "send")
        for outcome in result.outcomes.values():
            if not isinstance(outcome, ItemOutcome) or not isinstance(outcome.error, str):
                # Settling it would fail on every try, and the batch would go out again.
                raise self.broken(
                    f"send reported {_kind(outcome)} as an outcome, not an ItemOutcome with "
                    "a text error",
                    "send",
                )
        return result


def _kind(value: object) -> str:
    return "None" if value is None else f"a {type(value).__name__}"
