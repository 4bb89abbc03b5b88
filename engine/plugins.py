"""Plugin loading: connector plugins come from the ``tidegate`` entry-point group."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pluggy

from engine import hookspecs
from engine.connectors import ConnectorInfo
from engine.errors import InvalidInputError


def plugin_manager(
    extra_plugins: Iterable[object] = (), load_entry_points: bool = True
) -> pluggy.PluginManager:
    """A plugin manager with the hook specs, installed plugins and ``extra_plugins``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
    for plugin in extra_plugins:
        pm.register(plugin)
    return pm


class Connectors:
    """Connector infos by name, as the installed plugins declare them."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._by_name: dict[str, ConnectorInfo] = {}
        for info in pm.hook.connector_info():
            if info.name in self._by_name:
                raise RuntimeError(f"two plugins declare connector {info.name!r}")
            self._by_name[info.name] = info

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> ConnectorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            allowed = ", ".join(self.names()) or "(no connector plugin installed)"
            raise InvalidInputError(
                "connector", f"unknown connector {name!r}; installed: {allowed}"
            ) from None


class FirstResultCaller:
    """Calls a ``firstresult`` hook's implementations directly, in pluggy's order, and
    returns the first answer that is not ``None``.

    Delivery calls three hooks per item; pluggy's general machinery (wrappers, result
    objects) costs more per call than the mapping itself. Implementations are resolved
    once, when the engine starts, after every plugin is registered.
    """

    def __init__(self, caller: pluggy.HookCaller) -> None:
        impls = list(reversed(caller.get_hookimpls()))  # pluggy calls the last added first
        if any(i.hookwrapper or i.wrapper for i in impls):
            raise ValueError(f"{caller.name}: hook wrappers need pluggy's own call path")
        self._impls = [(i.function, tuple(i.argnames)) for i in impls]

    def __call__(self, **kwargs: object) -> object:
        for function, argnames in self._impls:
            result = function(*[kwargs[name] for name in argnames])
            if result is not None:
                return result
        return None


def first_result_caller(caller: pluggy.HookCaller) -> Callable[..., object]:
    """The cheapest callable with ``caller``'s firstresult semantics, for keyword calls
    that pass exactly the hookspec's arguments.

    With a single implementation that takes exactly those arguments, that is the
    implementation itself: its answer is the first result, ``None`` included. Otherwise
    a ``FirstResultCaller``. Raises ``ValueError`` when a wrapper needs pluggy's own path.
    """
    general = FirstResultCaller(caller)
    impls = caller.get_hookimpls()
    spec_args = set(caller.spec.argnames) if caller.spec is not None else None
    if len(impls) == 1 and set(impls[0].argnames) == spec_args:
        return impls[0].function
    return general


class PipelineHooks:
    """``identify``, ``map_profile`` and ``map_event`` as direct callers; falls back to
    pluggy's own call path when a plugin wraps one of them."""

    identify: Callable[..., object]
    map_profile: Callable[..., object]
    map_event: Callable[..., object]

    def __init__(self, pm: pluggy.PluginManager) -> None:
        for name in ("identify", "map_profile", "map_event"):
            caller = getattr(pm.hook, name)
            try:
                setattr(self, name, first_result_caller(caller))
            except ValueError:
                setattr(self, name, caller)
