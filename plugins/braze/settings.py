"""Settings of a Braze connection (the connection's free ``settings`` map), validated.

=======================  ===================================================  ============
key                      meaning                                              default
=======================  ===================================================  ============
rest_endpoint            the workspace's REST endpoint URL, stored whole      (required)
                         (e.g. https://rest.fra-01.braze.eu); never built
                         from a region code
app_id                   Braze app identifier sent on events and purchases    (none)
alias_label              ``alias_label`` of a ``user_alias`` identifier       antavo_id
update_existing_only     true | false: ``_update_existing_only`` on every     false
                         object (true: never create a Braze profile)
profile_scope            changed | all: send the changed mapped attributes,   changed
                         or every mapped attribute on any change
array_mode               replace | append: a custom array attribute is sent   replace
                         whole, or as ``{"add": [...], "remove": [...]}``
batch_rule               total | per_array: 75 objects per request in total   total
                         (today's limit) or 75 per array (legacy contracts)
default_phone_region     ISO 3166-1 alpha-2 region of phone numbers written   (none)
                         without +country, e.g. HU
=======================  ===================================================  ============

The connector declares Braze's own hosts (``BRAZE_HOSTS``) as its destinations: the
engine refuses any other URL unless the operator allows it (``serve
--allow-destination``, as the tests and the demo do for the Braze sandbox on loopback).
A host under Braze's domains must be a REST host (``rest.<cluster>.braze.com``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import phonenumbers

from engine.connector import InvalidInputError

BRAZE_HOSTS = ("*.braze.com", "*.braze.eu")
"""The hosts a Braze connection may send to (exact host or ``*.suffix``): every Braze
cluster's REST host is ``rest.<cluster>.braze.com`` or ``rest.<cluster>.braze.eu``."""
REST_HOST = re.compile(r"rest\.[a-z0-9-]+\.braze\.(com|eu)")

REST_ENDPOINT = "rest_endpoint"
APP_ID = "app_id"
ALIAS_LABEL = "alias_label"
UPDATE_EXISTING_ONLY = "update_existing_only"
PROFILE_SCOPE = "profile_scope"
ARRAY_MODE = "array_mode"
BATCH_RULE = "batch_rule"
DEFAULT_PHONE_REGION = "default_phone_region"
ALLOWED_SETTINGS = (
    ALIAS_LABEL,
    APP_ID,
    ARRAY_MODE,
    BATCH_RULE,
    DEFAULT_PHONE_REGION,
    PROFILE_SCOPE,
    REST_ENDPOINT,
    UPDATE_EXISTING_ONLY,
)

DEFAULT_ALIAS_LABEL = "antavo_id"
SCOPE_CHANGED = "changed"
SCOPE_ALL = "all"
PROFILE_SCOPES = (SCOPE_CHANGED, SCOPE_ALL)
ARRAY_REPLACE = "replace"
ARRAY_APPEND = "append"
ARRAY_MODES = (ARRAY_REPLACE, ARRAY_APPEND)
BATCH_TOTAL = "total"
BATCH_PER_ARRAY = "per_array"
BATCH_RULES = (BATCH_TOTAL, BATCH_PER_ARRAY)
BOOLEANS = {"true": True, "false": False}
MAX_ECHO = 100


@dataclass(frozen=True)
class BrazeSettings:
    """The settings of one connection with defaults applied."""

    rest_endpoint: str = ""
    app_id: str = ""
    alias_label: str = DEFAULT_ALIAS_LABEL
    update_existing_only: bool = False
    profile_scope: str = SCOPE_CHANGED
    array_mode: str = ARRAY_REPLACE
    batch_rule: str = BATCH_TOTAL
    default_phone_region: str = ""


def parse_settings(settings: Mapping[str, str]) -> BrazeSettings:
    """Settings as the hooks use them. Assumes ``validate_settings`` passed; a value it
    would refuse falls back to the default."""
    scope = settings.get(PROFILE_SCOPE, SCOPE_CHANGED)
    array_mode = settings.get(ARRAY_MODE, ARRAY_REPLACE)
    rule = settings.get(BATCH_RULE, BATCH_TOTAL)
    return BrazeSettings(
        rest_endpoint=settings.get(REST_ENDPOINT, "").rstrip("/"),
        app_id=settings.get(APP_ID, ""),
        alias_label=settings.get(ALIAS_LABEL) or DEFAULT_ALIAS_LABEL,
        update_existing_only=BOOLEANS.get(settings.get(UPDATE_EXISTING_ONLY, "false"), False),
        profile_scope=scope if scope in PROFILE_SCOPES else SCOPE_CHANGED,
        array_mode=array_mode if array_mode in ARRAY_MODES else ARRAY_REPLACE,
        batch_rule=rule if rule in BATCH_RULES else BATCH_TOTAL,
        default_phone_region=settings.get(DEFAULT_PHONE_REGION, "").upper(),
    )


def echo(value: str) -> str:
    """``value`` quoted for an error message, cut at 100 characters with a count of the rest."""
    if len(value) <= MAX_ECHO:
        return repr(value)
    return f"{value[:MAX_ECHO]!r} (and {len(value) - MAX_ECHO} more characters)"


def validate_settings(settings: Mapping[str, str]) -> None:
    """Raises ``InvalidInputError`` naming the first setting that is unknown or invalid
    and saying what is allowed."""
    for key in settings:
        if key not in ALLOWED_SETTINGS:
            raise InvalidInputError(
                key[:MAX_ECHO], f"unknown Braze setting; allowed: {', '.join(ALLOWED_SETTINGS)}"
            )
    endpoint = settings.get(REST_ENDPOINT)
    if not endpoint:
        raise InvalidInputError(
            REST_ENDPOINT,
            "required: the REST endpoint of your Braze workspace, as shown under Settings > "
            "APIs and Identifiers (e.g. https://rest.iad-01.braze.com)",
        )
    check_rest_endpoint(endpoint)
    label = settings.get(ALIAS_LABEL)
    if label is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,255}", label):
        raise InvalidInputError(
            ALIAS_LABEL, f"{echo(label)} is not valid: use 1-255 letters, digits, _ . : -"
        )
    app_id = settings.get(APP_ID)
    if app_id is not None and not re.fullmatch(r"[A-Za-z0-9-]{1,64}", app_id):
        raise InvalidInputError(
            APP_ID, f"{echo(app_id)} is not a Braze app identifier (letters, digits and -)"
        )
    region = settings.get(DEFAULT_PHONE_REGION)
    if region is not None and region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise InvalidInputError(
            DEFAULT_PHONE_REGION,
            f"{echo(region)} is not a region phone numbers can be read for; use an ISO "
            "3166-1 alpha-2 code such as HU, SG or US",
        )
    _check_choice(settings, UPDATE_EXISTING_ONLY, tuple(BOOLEANS))
    _check_choice(settings, PROFILE_SCOPE, PROFILE_SCOPES)
    _check_choice(settings, ARRAY_MODE, ARRAY_MODES)
    _check_choice(settings, BATCH_RULE, BATCH_RULES)


def _check_choice(settings: Mapping[str, str], key: str, allowed: tuple[str, ...]) -> None:
    value = settings.get(key)
    if value is not None and value not in allowed:
        raise InvalidInputError(
            key, f"{echo(value)} is not allowed; use one of: {', '.join(allowed)}"
        )


def check_rest_endpoint(endpoint: str) -> None:
    """Raises ``InvalidInputError`` unless ``endpoint`` is an http(s) URL with no path,
    credentials, query or fragment, and, under Braze's domains, a REST host over https.
    Which hosts it may name is the engine's check (``destination_hosts``)."""
    try:
        parts = urlsplit(endpoint)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(
            REST_ENDPOINT, f"{echo(endpoint)} is not a URL, e.g. https://rest.iad-01.braze.com"
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError(REST_ENDPOINT, "must not contain credentials")
    if parts.query or parts.fragment or parts.path.strip("/"):
        raise InvalidInputError(
            REST_ENDPOINT, "must be the host alone, with no path, query or fragment"
        )
    host = parts.hostname
    if not host.endswith((".braze.com", ".braze.eu")):
        return  # not Braze's: the engine refuses it unless the operator allowed it
    if parts.scheme != "https" or not REST_HOST.fullmatch(host) or parts.port not in (None, 443):
        raise InvalidInputError(
            REST_ENDPOINT,
            f"{echo(endpoint)} is not a Braze REST endpoint: use https://rest.<cluster>.braze.com "
            "or https://rest.<cluster>.braze.eu as shown in your Braze dashboard (e.g. "
            "https://rest.iad-01.braze.com, https://rest.fra-02.braze.eu)",
        )
