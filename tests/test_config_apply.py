"""ConfigService over a real gRPC server: export, apply (all or nothing, idempotent, with
a diff), keys from the request's api_keys, prune, matching of mappings, and what the
engine does with an applied configuration. The CLI and grpcurl are tested against a
real ``tidegate serve`` in test_config_cli.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.errors import TidegateError
from engine.pb import config_pb2 as pb
from engine.state.config_apply import plan_apply
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    API_KEY,
    FAST_DELIVERY,
    TEST_DESTINATIONS,
    engine_client,
    eventually,
    insider_connection,
    post_events,
)

NOWHERE = "http://127.0.0.1:9"
MAIN_KEY = "main-key-aaaa-1111"
EU_KEY = "eu-key-bbbb-2222"
KEYS = {"MAIN_KEY": MAIN_KEY, "EU_KEY": EU_KEY}


def document(
    *,
    main_name: str = "Insider",
    points_target: str = "points",
    eu_event: str = "purchase",
    base_url: str = NOWHERE,
) -> str:
    return f"""\
version: 1
connections:
  - id: insider-main
    display_name: {main_name}
    connector: insider
    api_key_env: MAIN_KEY
    settings:
      partner_name: acme
      base_url: {base_url}
    profile_mappings:
      - id: email
        source_attribute: email
        target_attribute: email
      - id: tier
        source_attribute: tier
        target_attribute: loyalty_tier
        custom: true
    event_mappings:
      - id: points
        source_event: point_add
        target_event: loyalty_points_earned
        parameters:
          - source_parameter: points
            target_parameter: {points_target}
            custom: true
  - id: insider-eu
    connector: insider
    api_key_env: EU_KEY
    retry_window_seconds: 600
    settings:
      partner_name: acme-eu
      base_url: {base_url}
    event_mappings:
      - id: eu-checkout
        source_event: checkout
        target_event: {eu_event}
        parameters:
          - source_parameter: transaction_id
            target_parameter: event_group_id
          - source_parameter: total
            target_parameter: unit_sale_price
          - source_parameter: currency
            target_parameter: currency
"""


CREATED = [
    ("CREATE", "CONNECTION", "insider-main", ""),
    ("CREATE", "PROFILE_MAPPING", "insider-main", "email"),
    ("CREATE", "PROFILE_MAPPING", "insider-main", "tier"),
    ("CREATE", "EVENT_MAPPING", "insider-main", "points"),
    ("CREATE", "CONNECTION", "insider-eu", ""),
    ("CREATE", "EVENT_MAPPING", "insider-eu", "eu-checkout"),
]


def summary(response: pb.ApplyConfigResponse) -> list[tuple[str, str, str, str]]:
    return [
        (
            pb.ChangeAction.Name(c.action).removeprefix("CHANGE_ACTION_"),
            pb.ConfigObjectKind.Name(c.object.kind).removeprefix("CONFIG_OBJECT_KIND_"),
            c.object.connection_id,
            c.object.mapping_id,
        )
        for c in response.changes
    ]


def fields(response: pb.ApplyConfigResponse, index: int) -> list[tuple[str, str, str]]:
    return [(f.field, f.old_value, f.new_value) for f in response.changes[index].fields]


async def refusal(client: TidegateClient, text: str, **kwargs: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.apply_config(text, **kwargs)  # type: ignore[arg-type]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(raised.value.details())


async def connection_ids(client: TidegateClient) -> list[str]:
    return [c.id for c in (await client.list_connections()).connections]


@pytest.fixture
async def other_engine(tmp_path: Path) -> AsyncIterator[Engine]:
    """A second, empty engine."""
    running = Engine(
        EngineConfig(
            data_dir=tmp_path / "other",
            grpc_port=0,
            http_port=0,
            delivery=FAST_DELIVERY,
            allowed_destinations=TEST_DESTINATIONS,
        )
    )
    await running.start()
    yield running
    await running.stop(grace=1.0)


async def test_export_apply_to_an_empty_engine_and_export_again_gives_the_same_document(
    client: TidegateClient, sandbox: RunningSandbox, other_engine: Engine
) -> None:
    await insider_connection(client, sandbox, display_name="Insider (EU)")
    exported = await client.export_config()
    assert API_KEY not in exported
    assert "api_key_env: TIDEGATE_API_KEY_INSIDER_MAIN" in exported

    async with engine_client(other_engine) as other:
        applied = await other.apply_config(
            exported, api_keys={"TIDEGATE_API_KEY_INSIDER_MAIN": API_KEY}
        )
        again = await other.export_config()
        copy = await other.get_connection("insider-main")

    assert applied.applied
    assert summary(applied)[0] == ("CREATE", "CONNECTION", "insider-main", "")
    assert len(applied.changes) == 1 + 4 + 2  # the connection, 4 profile and 2 event mappings
    assert again == exported
    assert copy.api_key_hint == "****" + API_KEY[-4:]
    assert copy.display_name == "Insider (EU)"


async def test_applying_the_export_changes_nothing_and_says_so(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox)
    before = await client.get_connection("insider-main")
    exported = await client.export_config()

    response = await client.apply_config(
        exported, api_keys={"TIDEGATE_API_KEY_INSIDER_MAIN": API_KEY}
    )

    assert (list(response.changes), response.applied) == ([], False)
    after = await client.get_connection("insider-main")
    assert after.mapping_version == before.mapping_version
    assert after.update_time == before.update_time


async def test_a_document_applies_to_an_empty_engine_in_document_order(
    client: TidegateClient,
) -> None:
    response = await client.apply_config(document(), api_keys=KEYS)

    assert summary(response) == CREATED and response.applied
    assert await connection_ids(client) == ["insider-eu", "insider-main"]
    eu = await client.get_connection("insider-eu")
    assert (eu.retry_window_seconds, eu.api_key_hint) == (600, "****2222")
    profile = await client.list_profile_mappings("insider-main")
    assert [(m.id, m.target_attribute, m.custom) for m in profile.mappings] == [
        ("email", "email", False),
        ("tier", "loyalty_tier", True),
    ]


async def test_one_bad_mapping_changes_nothing_and_names_the_field_by_its_path(
    client: TidegateClient,
) -> None:
    await client.apply_config(document(), api_keys=KEYS)
    before = await client.export_config()

    # A valid change to the first connection, and a bad event name on the second.
    message = await refusal(
        client, document(main_name="Renamed", eu_event="Purchase!"), api_keys=KEYS
    )

    assert message.startswith("connections[1].event_mappings[0].target_event: 'Purchase!'")
    assert await client.export_config() == before
    assert (await client.get_connection("insider-main")).display_name == "Insider"


async def test_a_bad_document_creates_nothing_on_an_empty_engine(client: TidegateClient) -> None:
    message = await refusal(client, document(eu_event="Purchase!"), api_keys=KEYS)

    assert message.startswith("connections[1].event_mappings[0].target_event: ")
    assert await connection_ids(client) == []


async def test_a_missing_environment_variable_is_refused_naming_it(
    client: TidegateClient,
) -> None:
    message = await refusal(client, document(), api_keys={"MAIN_KEY": MAIN_KEY})

    assert message.startswith("connections[1].api_key_env: ")
    assert "EU_KEY is not set" in message
    assert await connection_ids(client) == []


async def test_a_connection_created_without_a_key_variable_is_refused(
    client: TidegateClient,
) -> None:
    text = (
        "connections:\n  - id: new-one\n    connector: insider\n"
        "    settings: {partner_name: acme}\n"
    )

    message = await refusal(client, text)

    assert message.startswith("connections[0].api_key_env: required to create")


async def test_dry_run_changes_nothing_and_returns_the_changes_the_apply_makes(
    client: TidegateClient,
) -> None:
    text = document().replace(
        "      - id: email\n        source_attribute", "      - source_attribute"
    )

    dry = await client.apply_config(text, api_keys=KEYS, dry_run=True)

    assert not dry.applied
    assert await connection_ids(client) == []
    [email] = [c for c in summary(dry) if c[1] == "PROFILE_MAPPING" and c[3] != "tier"]
    assert re.fullmatch(r"pm-[0-9a-f]{10}", email[3])  # made from the connection and source
    applied = await client.apply_config(text, api_keys=KEYS)
    assert summary(applied) == summary(dry) and applied.applied
    profile = await client.list_profile_mappings("insider-main")
    assert [m.id for m in profile.mappings] == [email[3], "tier"]


async def test_an_update_lists_each_changed_field_and_raises_the_mapping_version_once(
    client: TidegateClient,
) -> None:
    await client.apply_config(document(), api_keys=KEYS)
    before = await client.get_connection("insider-main")
    text = document(main_name="Insider EU", points_target="amount").replace(
        "      base_url: http://127.0.0.1:9\n    profile_mappings",
        "      base_url: http://127.0.0.1:9\n      default_phone_region: HU\n    profile_mappings",
    )

    response = await client.apply_config(text, api_keys=KEYS)

    assert summary(response) == [
        ("UPDATE", "CONNECTION", "insider-main", ""),
        ("UPDATE", "EVENT_MAPPING", "insider-main", "points"),
    ]
    assert fields(response, 0) == [
        ("display_name", '"Insider"', '"Insider EU"'),
        ("settings.default_phone_region", "", '"HU"'),
    ]
    assert fields(response, 1) == [("parameters[0].target_parameter", '"points"', '"amount"')]
    after = await client.get_connection("insider-main")
    assert after.mapping_version == before.mapping_version + 1
    assert after.settings["default_phone_region"] == "HU"
    events = await client.list_event_mappings("insider-main")
    assert [p.target_parameter for p in events.mappings[0].parameters] == ["amount"]


async def test_a_new_key_is_an_api_key_change_shown_only_by_its_hints(
    client: TidegateClient,
) -> None:
    await client.apply_config(document(), api_keys=KEYS)
    new_key = "main-key-cccc-3333"

    response = await client.apply_config(document(), api_keys={**KEYS, "MAIN_KEY": new_key})

    assert summary(response) == [("UPDATE", "CONNECTION", "insider-main", "")]
    assert fields(response, 0) == [("api_key", '"****1111"', '"****3333"')]
    assert MAIN_KEY not in str(response) and new_key not in str(response)
    assert (await client.get_connection("insider-main")).api_key_hint == "****3333"
    same = await client.apply_config(document(), api_keys={**KEYS, "MAIN_KEY": new_key})
    assert list(same.changes) == []


async def test_without_api_key_env_an_existing_connection_keeps_its_key(
    client: TidegateClient,
) -> None:
    await client.apply_config(document(), api_keys=KEYS)
    text = document().replace("    api_key_env: MAIN_KEY\n", "")

    response = await client.apply_config(text, api_keys={"EU_KEY": EU_KEY})

    assert list(response.changes) == []
    assert (await client.get_connection("insider-main")).api_key_hint == "****1111"


async def test_without_prune_what_the_document_leaves_out_is_kept_and_listed(
    client: TidegateClient,
) -> None:
    await client.apply_config(document(), api_keys=KEYS)
    main_only = (
        document()
        .split("  - id: insider-eu")[0]
        .replace(
            "      - id: tier\n        source_attribute: tier\n"
            "        target_attribute: loyalty_tier\n        custom: true\n",
            "",
        )
    )

    response = await client.apply_config(main_only, api_keys=KEYS)

    assert list(response.changes) == [] and not response.applied
    assert [(u.connection_id, u.mapping_id) for u in response.unmentioned] == [
        ("insider-main", "tier"),
        ("insider-eu", ""),
    ]
    assert await connection_ids(client) == ["insider-eu", "insider-main"]

    pruned = await client.apply_config(main_only, api_keys=KEYS, prune=True)

    assert summary(pruned) == [
        ("DELETE", "PROFILE_MAPPING", "insider-main", "tier"),
        ("DELETE", "CONNECTION", "insider-eu", ""),
    ]
    assert list(pruned.unmentioned) == []
    assert await connection_ids(client) == ["insider-main"]
    profile = await client.list_profile_mappings("insider-main")
    assert [m.id for m in profile.mappings] == ["email"]


async def test_a_mapping_without_an_id_is_matched_by_its_source_and_updated_in_place(
    client: TidegateClient,
) -> None:
    await client.apply_config(document(), api_keys=KEYS)
    text = document().replace(
        "      - id: email\n        source_attribute: email\n        target_attribute: email\n",
        "      - source_attribute: email\n        target_attribute: email_address\n"
        "        custom: true\n",
    )

    response = await client.apply_config(text, api_keys=KEYS)

    assert summary(response) == [("UPDATE", "PROFILE_MAPPING", "insider-main", "email")]
    assert fields(response, 0) == [
        ("target_attribute", '"email"', '"email_address"'),
        ("custom", "false", "true"),
    ]
    profile = await client.list_profile_mappings("insider-main")
    assert [(m.id, m.target_attribute) for m in profile.mappings] == [
        ("email", "email_address"),
        ("tier", "loyalty_tier"),
    ]


async def test_a_source_kept_by_an_unmentioned_mapping_cannot_be_mapped_again(
    client: TidegateClient,
) -> None:
    await client.apply_config(document(), api_keys=KEYS)
    text = document().replace("      - id: email\n", "      - id: email-2\n")

    message = await refusal(client, text, api_keys=KEYS)

    assert message.startswith("connections[0].profile_mappings[0].source_attribute: 'email'")
    assert "profile mapping 'email'" in message and "prune" in message
    # With prune the old mapping goes and the new one takes its source.
    pruned = await client.apply_config(text, api_keys=KEYS, prune=True)
    assert ("CREATE", "PROFILE_MAPPING", "insider-main", "email-2") in summary(pruned)
    assert ("DELETE", "PROFILE_MAPPING", "insider-main", "email") in summary(pruned)


async def test_mapping_ids_are_unique_across_connections(client: TidegateClient) -> None:
    text = document().replace("      - id: eu-checkout\n", "      - id: points\n")

    message = await refusal(client, text, api_keys=KEYS)

    assert message.startswith("connections[1].event_mappings[0].id: 'points' is already")
    assert "connections[0].event_mappings[0]" in message


async def test_a_connection_id_listed_twice_is_refused(client: TidegateClient) -> None:
    text = document().replace("  - id: insider-eu\n", "  - id: insider-main\n")

    message = await refusal(client, text, api_keys=KEYS)

    assert message.startswith("connections[1].id: 'insider-main' is also the id of connections[0]")


async def test_the_connector_is_checked_and_cannot_change(client: TidegateClient) -> None:
    unknown = document().replace(
        "  - id: insider-eu\n    connector: insider\n", "  - id: insider-eu\n    connector: hook\n"
    )
    message = await refusal(client, unknown, api_keys=KEYS)
    assert message.startswith("connections[1].connector: unknown connector 'hook'")

    await client.apply_config(document(), api_keys=KEYS)
    message = await refusal(client, unknown, api_keys=KEYS)
    assert message.startswith("connections[1].connector: connection 'insider-eu' is served by")


async def test_settings_are_checked_by_the_connector_with_their_path(
    client: TidegateClient,
) -> None:
    text = document().replace("partner_name: acme-eu", "partner_name: ACME")

    message = await refusal(client, text, api_keys=KEYS)

    assert message.startswith("connections[1].settings.partner_name: ")


async def test_an_empty_request_is_refused_naming_the_document(client: TidegateClient) -> None:
    assert (await refusal(client, "  \n")).startswith("document: required")


async def test_applied_mappings_route_and_deliver_events(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    keys = {"MAIN_KEY": API_KEY, "EU_KEY": API_KEY}
    await client.apply_config(document(base_url=sandbox.url), api_keys=keys)

    status, answer = await post_events(
        http, engine, {"customer": "c-1", "action": "point_add", "id": "e-1", "data": {"points": 5}}
    )

    assert status == 202 and answer["deliveries_queued"] == 1  # only insider-main maps it

    async def delivered() -> bool:
        user = sandbox.state.lookup("uuid", "c-1")
        return user is not None and [e["event_name"] for e in user.events] == [
            "loyalty_points_earned"
        ]

    await eventually(delivered)


async def test_a_change_made_after_the_plan_makes_the_write_refuse_and_change_nothing(
    engine: Engine, client: TidegateClient
) -> None:
    await client.apply_config(document(), api_keys=KEYS)
    plan = plan_apply(
        engine.registry, engine.connectors, document(main_name="Planned"), KEYS, prune=False
    )
    # Another admin call lands between the plan and its write.
    await client.create_profile_mapping("insider-main", "first_name", "name")

    with pytest.raises(TidegateError, match="run it again"):
        await engine.registry.write_batch(plan.batch)

    assert (await client.get_connection("insider-main")).display_name == "Insider"
