"""CatalogService over a real gRPC server: source and destination catalogs, and previews.

Built-in Antavo names come from ``antavo-source.md`` §1.4 and §2.3; Insider's defaults,
types and formats from ``insider-ucd-api.md`` §3.3-3.7.
"""

from __future__ import annotations

import grpc
import orjson
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import TidegateClient
from engine.app import Engine
from engine.pb import catalog_pb2 as pb
from engine.pb import catalog_pb2_grpc, ingest_pb2
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import API_KEY, PARTNER, insider_connection

SETTINGS = {"partner_name": PARTNER, "base_url": "http://insider.test"}


@pytest.fixture
def catalog(client: TidegateClient) -> catalog_pb2_grpc.CatalogServiceStub:
    return catalog_pb2_grpc.CatalogServiceStub(client.channel)


def antavo_event(action: str, customer: str = "cust-1", **data: object) -> ingest_pb2.AntavoEvent:
    struct = struct_pb2.Struct()
    struct.update(data)
    return ingest_pb2.AntavoEvent(customer=customer, action=action, data=struct)


async def test_source_catalog_lists_antavo_built_ins(
    catalog: catalog_pb2_grpc.CatalogServiceStub,
) -> None:
    response = await catalog.ListSourceCatalog(pb.ListSourceCatalogRequest(page_size=1000))

    entries = {(e.kind, e.event, e.name): e for e in response.entries}
    birth_date = entries[(pb.CATALOG_KIND_ATTRIBUTE, "", "birth_date")]
    assert (birth_date.type, birth_date.built_in, birth_date.seen) == (
        "date YYYY-MM-DD",
        True,
        False,
    )
    assert entries[(pb.CATALOG_KIND_ATTRIBUTE, "", "spendable")].read_only
    assert (pb.CATALOG_KIND_EVENT, "", "checkout") in entries
    assert (pb.CATALOG_KIND_EVENT_PARAMETER, "checkout", "items[].product_id") in entries
    assert response.next_page_token == ""


async def test_source_catalog_marks_names_seen_in_traffic(
    catalog: catalog_pb2_grpc.CatalogServiceStub, client: TidegateClient
) -> None:
    await client.send_events(
        [
            {"customer": "c", "action": "opt_in", "data": {"email": "a@b.co", "shoe_size": 41}},
            {"customer": "c", "action": "tier_upgrade", "data": {"to": "gold"}},
        ]
    )

    response = await catalog.ListSourceCatalog(pb.ListSourceCatalogRequest(page_size=1000))

    entries = {(e.kind, e.event, e.name): e for e in response.entries}
    email = entries[(pb.CATALOG_KIND_ATTRIBUTE, "", "email")]
    assert (email.built_in, email.seen) == (True, True)
    shoe = entries[(pb.CATALOG_KIND_ATTRIBUTE, "", "shoe_size")]
    assert (shoe.built_in, shoe.seen) == (False, True)
    assert shoe.first_seen_time.seconds > 0
    assert entries[(pb.CATALOG_KIND_EVENT, "", "tier_upgrade")].seen
    assert (pb.CATALOG_KIND_EVENT_PARAMETER, "tier_upgrade", "to") in entries


async def test_source_catalog_pages_and_filters_by_kind(
    catalog: catalog_pb2_grpc.CatalogServiceStub,
) -> None:
    first = await catalog.ListSourceCatalog(
        pb.ListSourceCatalogRequest(page_size=5, kind=pb.CATALOG_KIND_EVENT)
    )
    second = await catalog.ListSourceCatalog(
        pb.ListSourceCatalogRequest(
            page_size=5, kind=pb.CATALOG_KIND_EVENT, page_token=first.next_page_token
        )
    )

    assert len(first.entries) == 5 and first.next_page_token
    assert {e.kind for e in (*first.entries, *second.entries)} == {pb.CATALOG_KIND_EVENT}
    assert not {e.name for e in first.entries} & {e.name for e in second.entries}


async def test_source_catalog_refuses_a_bad_page_token(
    catalog: catalog_pb2_grpc.CatalogServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.ListSourceCatalog(pb.ListSourceCatalogRequest(page_token="nope"))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (caught.value.details() or "")


async def test_destination_catalog_lists_insider_defaults_with_types(
    catalog: catalog_pb2_grpc.CatalogServiceStub, client: TidegateClient
) -> None:
    await client.create_connection("c1", api_key=API_KEY, settings=SETTINGS)

    response = await catalog.ListDestinationCatalog(
        pb.ListDestinationCatalogRequest(connection_id="c1")
    )

    assert response.connector == "insider"
    entries = {(e.kind, e.name): e for e in response.entries}
    phone = entries[(pb.CATALOG_KIND_ATTRIBUTE, "phone_number")]
    assert (phone.type, phone.format) == ("string", "E.164, e.g. +6598765432")
    assert entries[(pb.CATALOG_KIND_ATTRIBUTE, "birthday")].format.startswith("RFC 3339")
    assert entries[(pb.CATALOG_KIND_ATTRIBUTE, "list_id")].type == "array<number>"
    assert entries[(pb.CATALOG_KIND_ATTRIBUTE, "email_optin")].type == "boolean"
    currency = entries[(pb.CATALOG_KIND_EVENT_PARAMETER, "currency")]
    assert currency.format.startswith("ISO 4217")
    assert list(currency.required_for_events) == ["purchase", "cart_page_view"]
    assert (pb.CATALOG_KIND_IDENTIFIER, "uuid") in entries
    assert (pb.CATALOG_KIND_EVENT, "purchase") in entries
    # uuid is set through the customer-ID mapping, so it is offered as an identifier only.
    assert (pb.CATALOG_KIND_ATTRIBUTE, "uuid") not in entries


async def test_destination_catalog_of_an_unknown_connection_is_not_found(
    catalog: catalog_pb2_grpc.CatalogServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.ListDestinationCatalog(pb.ListDestinationCatalogRequest(connection_id="x"))

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_preview_returns_the_exact_upsert_without_sending_it(
    catalog: catalog_pb2_grpc.CatalogServiceStub,
    client: TidegateClient,
    sandbox: RunningSandbox,
) -> None:
    await insider_connection(client, sandbox)
    event = antavo_event("opt_in", email="ana@example.com", first_name="Ana", tier="gold")

    response = await catalog.PreviewDelivery(
        pb.PreviewDeliveryRequest(connection_id="insider-main", event=event)
    )

    assert list(response.problems) == []
    [request] = response.requests
    assert (request.method, request.url) == ("POST", f"{sandbox.url}/api/user/v1/upsert")
    assert orjson.loads(request.body) == {
        "users": [
            {
                "identifiers": {"uuid": "cust-1"},
                "attributes": {
                    "email": "ana@example.com",
                    "name": "Ana",
                    "custom": {"loyalty_tier": "gold"},
                },
            }
        ]
    }
    assert API_KEY not in str(response)
    assert sandbox.state.requests == []  # nothing was sent


async def test_preview_shows_the_attribute_delete_for_a_cleared_attribute(
    catalog: catalog_pb2_grpc.CatalogServiceStub,
    client: TidegateClient,
    sandbox: RunningSandbox,
) -> None:
    await insider_connection(client, sandbox)
    profile = struct_pb2.Struct()
    profile.update({"email": "ana@example.com", "tier": "gold"})
    event = antavo_event("profile", tier=None)

    response = await catalog.PreviewDelivery(
        pb.PreviewDeliveryRequest(connection_id="insider-main", event=event, profile=profile)
    )

    [request] = response.requests
    assert request.url.endswith("/api/user/v1/attribute/delete")
    assert orjson.loads(request.body) == {
        "users": [{"identifiers": {"uuid": "cust-1"}, "custom": {"whole": ["loyalty_tier"]}}]
    }


async def test_preview_reports_a_value_that_cannot_be_converted(
    catalog: catalog_pb2_grpc.CatalogServiceStub,
    client: TidegateClient,
    sandbox: RunningSandbox,
) -> None:
    await insider_connection(client, sandbox)
    await client.create_profile_mapping("insider-main", "gender", "gender")

    response = await catalog.PreviewDelivery(
        pb.PreviewDeliveryRequest(
            connection_id="insider-main", event=antavo_event("profile", gender="unknown")
        )
    )

    assert list(response.requests) == []
    [problem] = response.problems
    assert problem.stage == "map_profile"
    assert "gender value 'unknown' is not a gender Insider accepts" in problem.message


async def test_preview_of_an_unmapped_event_sends_nothing(
    catalog: catalog_pb2_grpc.CatalogServiceStub,
    client: TidegateClient,
    sandbox: RunningSandbox,
) -> None:
    await insider_connection(client, sandbox)

    response = await catalog.PreviewDelivery(
        pb.PreviewDeliveryRequest(
            connection_id="insider-main", event=antavo_event("review_submit", item="SKU-1")
        )
    )

    assert (list(response.requests), list(response.problems)) == ([], [])


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.PreviewDeliveryRequest(event=antavo_event("opt_in")), "connection_id"),
        (pb.PreviewDeliveryRequest(connection_id="insider-main"), "event"),
        (
            pb.PreviewDeliveryRequest(
                connection_id="insider-main", event=ingest_pb2.AntavoEvent(action="opt_in")
            ),
            "event.customer",
        ),
    ],
)
async def test_preview_refuses_an_incomplete_request_naming_the_field(
    catalog: catalog_pb2_grpc.CatalogServiceStub,
    client: TidegateClient,
    sandbox: RunningSandbox,
    request_: pb.PreviewDeliveryRequest,
    field: str,
) -> None:
    await insider_connection(client, sandbox)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.PreviewDelivery(request_)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(field)


async def test_catalog_service_is_listed_by_reflection_and_health(
    engine: Engine, client: TidegateClient
) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    answer = await health.Check(
        health_pb2.HealthCheckRequest(service="tidegate.admin.v1.CatalogService")
    )

    assert answer.status == health_pb2.HealthCheckResponse.SERVING
