"""The configuration document on its own: how an export is written (every field, a fixed
order, no key) and how a document is read (strict YAML, bad fields named by their path
in the document). Applying one to an engine is tested in test_config_apply.py."""

from __future__ import annotations

import pytest
import yaml

from engine.connector.records import (
    Connection,
    CustomerIdMapping,
    EventMapping,
    ParameterMapping,
    ProfileMapping,
)
from engine.errors import InvalidInputError
from engine.state.config_document import key_env_names, parse_document, render_document

SECRET = "ucd-secret-key-0123456789"
MAIN = Connection(
    id="insider-main",
    connector="insider",
    settings={"partner_name": "acme", "default_phone_region": "NO", "backfill": "true"},
    api_key=SECRET,
    customer_id_mapping=CustomerIdMapping("email", "email"),
    profile_mappings=(
        ProfileMapping("tier", "tier", "loyalty_tier", True),
        ProfileMapping("labels", "labels", "antavo_labels", True, "replace"),
    ),
    event_mappings=(
        EventMapping(
            "points",
            "point_add",
            "loyalty_points_earned",
            (ParameterMapping("points", "points", True),),
        ),
    ),
    display_name="Insider: EU",
    retry_window_seconds=3600.0,
)
KEYLESS = Connection("b-hook", "webhook", {}, "", CustomerIdMapping())

# Written by hand from the README's description of the format.
EXPECTED_EXPORT_BODY = """\
version: 1
connections:
  - id: b-hook
    connector: webhook
    display_name: ''
    retry_window_seconds: 0
    settings: {}
    customer_id_mapping:
      source_attribute: customer_id
      target_identifier: uuid
      custom: false
    profile_mappings: []
    event_mappings: []
  - id: insider-main
    connector: insider
    display_name: 'Insider: EU'
    api_key_env: TIDEGATE_API_KEY_INSIDER_MAIN
    retry_window_seconds: 3600
    settings:
      backfill: 'true'
      default_phone_region: 'NO'
      partner_name: acme
    customer_id_mapping:
      source_attribute: email
      target_identifier: email
      custom: false
    profile_mappings:
      - id: tier
        source_attribute: tier
        target_attribute: loyalty_tier
        custom: true
      - id: labels
        source_attribute: labels
        target_attribute: antavo_labels
        custom: true
        array_mode: replace
    event_mappings:
      - id: points
        source_event: point_add
        target_event: loyalty_points_earned
        parameters:
          - source_parameter: points
            target_parameter: points
            custom: true
"""


def body(document: str) -> str:
    """The document without its leading comment lines."""
    return "".join(line for line in document.splitlines(True) if not line.startswith("#"))


def refusal(document: str) -> str:
    with pytest.raises(InvalidInputError) as raised:
        parse_document(document)
    return str(raised.value)


def test_export_writes_every_field_in_a_fixed_order_and_no_key() -> None:
    document = render_document([MAIN, KEYLESS])

    assert body(document) == EXPECTED_EXPORT_BODY
    assert SECRET not in document
    assert document.startswith("# Tidegate configuration.")


def test_export_is_the_same_text_whatever_order_it_is_given() -> None:
    reordered = Connection(
        **{**MAIN.__dict__, "settings": dict(reversed(list(MAIN.settings.items())))}
    )

    assert render_document([KEYLESS, reordered]) == render_document([MAIN, KEYLESS])


def test_quoted_strings_that_yaml_would_read_otherwise_come_back_as_strings() -> None:
    [main] = parse_document(render_document([MAIN])).connections

    assert main.settings == {
        "partner_name": "acme",
        "default_phone_region": "NO",
        "backfill": "true",
    }
    assert main.display_name == "Insider: EU"


def test_reading_an_export_gives_back_every_field() -> None:
    [main] = parse_document(render_document([MAIN])).connections

    assert (main.id, main.connector, main.api_key_env) == (
        "insider-main",
        "insider",
        "TIDEGATE_API_KEY_INSIDER_MAIN",
    )
    assert main.retry_window_seconds == 3600
    assert main.customer_id_mapping == CustomerIdMapping("email", "email", False)
    assert [m.mapping for m in main.profile_mappings] == list(MAIN.profile_mappings)
    assert [m.mapping for m in main.event_mappings] == list(MAIN.event_mappings)
    assert [m.path for m in main.event_mappings] == ["connections[0].event_mappings[0]"]


def test_left_out_fields_have_their_defaults() -> None:
    [entry] = parse_document("connections:\n  - id: x\n    display_name:\n").connections

    assert (entry.connector, entry.display_name, entry.api_key_env) == ("", "", "")
    assert entry.retry_window_seconds == 0
    assert entry.settings == {}
    assert entry.customer_id_mapping == CustomerIdMapping("customer_id", "uuid", False)
    assert (entry.profile_mappings, entry.event_mappings) == ((), ())


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ("connections:\n  - display_name: x\n", "connections[0].id: required"),
        (
            "connections:\n  - id: a\n  - id: b\n    event_mappings:\n"
            "      - {source_event: point_add}\n",
            "connections[1].event_mappings[0].target_event: required",
        ),
        (
            "connections:\n  - id: a\n    event_mappings:\n      - source_event: x\n"
            "        target_event: y\n        parameters:\n          - target_parameter: z\n",
            "connections[0].event_mappings[0].parameters[0].source_parameter: required",
        ),
        (
            "connections:\n  - id: a\n    profile_mapings: []\n",
            "connections[0].profile_mapings: unknown field",
        ),
        (
            "connections:\n  - id: a\n    retry_window_seconds: 1.5\n",
            "connections[0].retry_window_seconds: must be a whole number",
        ),
        ("connections:\n  - id: a\n    settings: [a]\n", "connections[0].settings: must be"),
        (
            "connections:\n  - id: a\n    settings: {port: 8080}\n",
            "connections[0].settings.port: must be",
        ),
        (
            "connections:\n  - id: a\n    profile_mappings:\n      - source_attribute: a\n"
            "        target_attribute: b\n        custom: 'yes'\n",
            "connections[0].profile_mappings[0].custom: must be true or false",
        ),
        (
            "connections:\n  - id: a\n    profile_mappings:\n      - source_attribute: a\n"
            "        target_attribute: b\n        array_mode: merge\n",
            "connections[0].profile_mappings[0].array_mode: 'merge' is not allowed",
        ),
        ("connections:\n  - id: a\n    api_key_env: 1KEY\n", "connections[0].api_key_env"),
        ("version: 2\nconnections: []\n", "version: "),
        ("version: 1\n", "connections: required"),
        ("", "document: empty"),
        ("- id: a\n", "document: must be a mapping"),
    ],
)
def test_a_bad_field_is_named_by_its_path_in_the_document(document: str, field: str) -> None:
    assert refusal(document).startswith(field)


def test_an_unquoted_yaml_boolean_is_refused_with_a_hint_to_quote_it() -> None:
    message = refusal("connections:\n  - id: a\n    settings:\n      default_phone_region: NO\n")

    assert message.startswith("connections[0].settings.default_phone_region: must be a string")
    assert "quote it" in message


def test_a_key_written_twice_is_refused_with_its_line() -> None:
    message = refusal("connections:\n  - id: a\n    settings: {}\n    settings: {}\n")

    assert message.startswith("document: not valid YAML at line 4")
    assert "'settings' is written twice" in message


def test_aliases_are_refused() -> None:
    document = (
        "connections:\n  - id: a\n    settings: &s {partner_name: x}\n  - id: b\n    settings: *s\n"
    )

    assert "aliases (*name) are not allowed" in refusal(document)


def test_python_objects_are_never_built() -> None:
    message = refusal("connections: !!python/object/apply:os.system ['true']\n")

    assert message.startswith("document: not valid YAML at line 1")


def test_broken_yaml_is_refused_by_line_and_column_without_quoting_the_text() -> None:
    message = refusal(f"connections:\n  - id: a\n    display_name: [{SECRET}\n")

    assert message.startswith("document: not valid YAML at line")
    assert SECRET not in message


def test_an_api_key_in_the_document_is_refused_without_repeating_it() -> None:
    message = refusal(f"connections:\n  - id: a\n    api_key: {SECRET}\n")

    assert message.startswith("connections[0].api_key: a key is never written in the file")
    assert SECRET not in message


def test_the_variables_a_document_names_are_read_leniently() -> None:
    document = "connections:\n  - id: a\n    api_key_env: KEY_A\n  - id: b\n  - 7\n"

    assert key_env_names(document) == ["KEY_A"]
    assert key_env_names("connections: [") == []
    assert key_env_names("- a\n") == []


def test_an_export_is_plain_yaml_any_reader_reads() -> None:
    data = yaml.safe_load(render_document([MAIN]))

    assert data["connections"][0]["settings"]["default_phone_region"] == "NO"
    assert data["connections"][0]["event_mappings"][0]["parameters"][0]["custom"] is True
