"""Every pattern validator checks the whole value: ``^...$`` with ``re.match`` accepts a
trailing newline (``$`` matches before it), which let ``"purchase\\n"`` skip Insider's
required-parameter check. One test per validator family, each with the trailing newline
that used to pass."""

from __future__ import annotations

import grpc
import pytest

from clients.client import TidegateClient
from engine.admin.paging import Pager
from engine.connector.records import EventMapping, ParameterMapping, ProfileMapping
from engine.errors import InvalidInputError
from engine.pb import mappings_pb2
from engine.state.config_document import parse_document
from plugins.insider.events import line_path
from plugins.insider.settings import validate_settings
from plugins.insider.validation import validate_event_mapping, validate_profile_mapping
from plugins.insider.values import custom_value
from tests.conftest import API_KEY, PARTNER


def test_an_insider_event_name_with_a_newline_is_refused_not_spared_its_required_parameters() -> (
    None
):
    mapping = EventMapping(
        "m", "checkout", "purchase\n", (ParameterMapping("transaction_id", "event_group_id"),)
    )

    with pytest.raises(InvalidInputError) as refused:
        validate_event_mapping(mapping)

    assert refused.value.field == "target_event"
    with pytest.raises(InvalidInputError) as required:
        validate_event_mapping(EventMapping("m", "checkout", "purchase", mapping.parameters))
    assert required.value.field == "parameters"


def test_a_custom_name_with_a_newline_is_refused() -> None:
    with pytest.raises(InvalidInputError) as refused:
        validate_profile_mapping(ProfileMapping("m", "tier", "loyalty_tier\n", custom=True))

    assert refused.value.field == "target_attribute"


def test_a_per_line_source_with_a_newline_is_not_a_per_line_source() -> None:
    assert line_path("items[].sku") == ("items", "sku")
    assert line_path("items[].sku\n") is None


def test_a_partner_name_with_a_newline_is_refused() -> None:
    with pytest.raises(InvalidInputError) as refused:
        validate_settings({"partner_name": "acme\n"})

    assert refused.value.field == "partner_name"


def test_a_custom_value_with_a_newline_is_not_read_as_an_antavo_date() -> None:
    assert custom_value("2026-01-15") == "2026-01-15T00:00:00Z"
    assert custom_value("2026-01-15\n") == "2026-01-15\n"


def test_a_page_token_with_a_newline_is_refused() -> None:
    pager = Pager[tuple[str]]("ListConnections", (str,))
    token = pager.token(("conn-1",))
    assert pager.cursor(token) == ("conn-1",)

    with pytest.raises(InvalidInputError) as refused:
        pager.cursor(token + "\n")

    assert refused.value.field == "page_token"


def test_an_api_key_variable_name_with_a_newline_is_refused() -> None:
    document = 'version: 1\nconnections:\n  - id: c\n    api_key_env: "KEY\\n"\n'

    with pytest.raises(InvalidInputError) as refused:
        parse_document(document)

    assert refused.value.field == "connections[0].api_key_env"


async def test_a_connection_id_with_a_newline_is_refused(client: TidegateClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.create_connection(
            "insider-main\n", api_key=API_KEY, settings={"partner_name": PARTNER}
        )

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("connection.id: ")


async def test_a_mapping_id_with_a_newline_is_refused(client: TidegateClient) -> None:
    await client.create_connection("c", api_key=API_KEY, settings={"partner_name": PARTNER})

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.mappings.CreateProfileMapping(
            mappings_pb2.CreateProfileMappingRequest(
                mapping=mappings_pb2.ProfileMapping(
                    id="email\n", connection_id="c", source_attribute="email",
                    target_attribute="email",
                )
            )
        )  # fmt: skip

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("mapping.id: ")
