"""Delivery calls identify/map_profile/map_event without pluggy's per-call machinery; the
answers must be pluggy's own: the first result that is not None, in pluggy's order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pluggy

from engine.hookspecs import hookimpl
from engine.plugins import PipelineHooks, plugin_manager
from engine.records import Connection, Customer, CustomerIdMapping

OTHER = Connection("o-1", "other", {}, "", CustomerIdMapping())
INSIDER = Connection("i-1", "insider", {"partner_name": "acme"}, "key", CustomerIdMapping())
CUSTOMER = Customer("c-1", {"first_name": "Anna"})


class OtherConnector:
    """A second connector: answers only for its own connections."""

    @hookimpl
    def identify(self, connection: Connection, customer: Customer) -> dict[str, Any] | None:
        if connection.connector != "other":
            return None
        return {"other_id": customer.id}


class Wrapper:
    @hookimpl(wrapper=True)
    def identify(self, connection: Connection, customer: Customer) -> Iterator[None]:
        result = yield
        return {"wrapped": result}


def both_ways(pm: pluggy.PluginManager, connection: Connection) -> tuple[object, object]:
    direct = PipelineHooks(pm).identify(connection=connection, customer=CUSTOMER)
    return direct, pm.hook.identify(connection=connection, customer=CUSTOMER)


def test_one_installed_connector_answers_as_through_pluggy() -> None:
    pm = plugin_manager()
    direct, pluggy_answer = both_ways(pm, INSIDER)
    assert direct == pluggy_answer == {"uuid": "c-1"}
    assert both_ways(pm, OTHER) == (None, None)


def test_with_two_connectors_each_connection_gets_its_own_connectors_answer() -> None:
    pm = plugin_manager([OtherConnector()])
    assert both_ways(pm, INSIDER) == ({"uuid": "c-1"}, {"uuid": "c-1"})
    assert both_ways(pm, OTHER) == ({"other_id": "c-1"}, {"other_id": "c-1"})


def test_a_hook_wrapper_is_honoured() -> None:
    pm = plugin_manager([Wrapper()])
    direct, pluggy_answer = both_ways(pm, INSIDER)
    assert direct == pluggy_answer == {"wrapped": {"uuid": "c-1"}}
