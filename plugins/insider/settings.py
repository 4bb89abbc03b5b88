"""Settings of an Insider connection (the connection's free ``settings`` map), validated.

=====================  =====================================================  ==========
key                    meaning                                                 default
=====================  =====================================================  ==========
partner_name           Insider account name, sent as X-PARTNER-NAME            (required)
base_url               UCD API host (a sandbox in tests)                       Insider's
default_phone_region   ISO 3166-1 alpha-2 region of phone numbers written      (none)
                       without +country, e.g. HU
array_mode             append | replace: array attributes add to Insider's     append
                       values (Insider's default) or replace them
                       (``not_append``); a profile mapping may override it
profile_scope          changed | all: send only the changed mapped             changed
                       attributes, or every mapped attribute on any change
backfill               true | false: sends carry ``skip_hook`` so historical   false
                       data triggers no Insider journey, and are tagged
                       ``backfill`` in the outbound log
=====================  =====================================================  ==========
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import phonenumbers

from engine.connector import InvalidInputError, echo

DEFAULT_BASE_URL = "https://unification.useinsider.com"
DESTINATION_HOSTS = ("*.useinsider.com", "*.insiderone.com")
"""Where a connection may send: Insider's own domains. The UCD API's one known host is
unification.useinsider.com; regional hosts are unconfirmed, and the company also uses
insiderone.com, so both domains are declared rather than the one host."""

PARTNER_NAME = "partner_name"
BASE_URL = "base_url"
DEFAULT_PHONE_REGION = "default_phone_region"
ARRAY_MODE = "array_mode"
PROFILE_SCOPE = "profile_scope"
BACKFILL = "backfill"
ALLOWED_SETTINGS = (
    ARRAY_MODE,
    BACKFILL,
    BASE_URL,
    DEFAULT_PHONE_REGION,
    PARTNER_NAME,
    PROFILE_SCOPE,
)

ARRAY_APPEND = "append"
ARRAY_REPLACE = "replace"
ARRAY_MODES = (ARRAY_APPEND, ARRAY_REPLACE)
SCOPE_CHANGED = "changed"
SCOPE_ALL = "all"
PROFILE_SCOPES = (SCOPE_CHANGED, SCOPE_ALL)
BOOLEANS = {"true": True, "false": False}

PARTNER_NAME_PATTERN = re.compile(r"[a-z0-9_-]+")


@dataclass(frozen=True)
class InsiderSettings:
    """The settings of one connection with defaults applied."""

    partner_name: str = ""
    base_url: str = DEFAULT_BASE_URL
    default_phone_region: str = ""
    array_mode: str = ARRAY_APPEND
    profile_scope: str = SCOPE_CHANGED
    backfill: bool = False


def parse_settings(settings: Mapping[str, str]) -> InsiderSettings:
    """Settings as the hooks use them. Assumes ``validate_settings`` passed; a value it
    would refuse falls back to the default."""
    array_mode = settings.get(ARRAY_MODE, ARRAY_APPEND)
    scope = settings.get(PROFILE_SCOPE, SCOPE_CHANGED)
    return InsiderSettings(
        partner_name=settings.get(PARTNER_NAME, ""),
        base_url=(settings.get(BASE_URL) or DEFAULT_BASE_URL).rstrip("/"),
        default_phone_region=settings.get(DEFAULT_PHONE_REGION, "").upper(),
        array_mode=array_mode if array_mode in ARRAY_MODES else ARRAY_APPEND,
        profile_scope=scope if scope in PROFILE_SCOPES else SCOPE_CHANGED,
        backfill=BOOLEANS.get(settings.get(BACKFILL, "false"), False),
    )


def validate_settings(settings: Mapping[str, str]) -> None:
    """Raises ``InvalidInputError`` naming the first setting that is unknown or invalid
    and saying what is allowed."""
    for key in settings:
        if key not in ALLOWED_SETTINGS:
            raise InvalidInputError(
                key, f"unknown Insider setting; allowed: {', '.join(ALLOWED_SETTINGS)}"
            )
    partner_name = settings.get(PARTNER_NAME)
    if not partner_name:
        raise InvalidInputError(PARTNER_NAME, "required: the name of the Insider account")
    if not PARTNER_NAME_PATTERN.fullmatch(partner_name):
        raise InvalidInputError(
            PARTNER_NAME,
            f"{echo(partner_name)} is not valid: Insider requires the partner name in lowercase; "
            "allowed characters are a-z, 0-9, '_' and '-'",
        )
    base_url = settings.get(BASE_URL)
    if base_url is not None:
        _check_base_url(base_url)
    region = settings.get(DEFAULT_PHONE_REGION)
    if region is not None and region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise InvalidInputError(
            DEFAULT_PHONE_REGION,
            f"{region!r} is not a region phone numbers can be read for; use an ISO 3166-1 "
            "alpha-2 code such as HU, SG or US",
        )
    _check_choice(settings, ARRAY_MODE, ARRAY_MODES)
    _check_choice(settings, PROFILE_SCOPE, PROFILE_SCOPES)
    _check_choice(settings, BACKFILL, tuple(BOOLEANS))


def _check_choice(settings: Mapping[str, str], key: str, allowed: tuple[str, ...]) -> None:
    value = settings.get(key)
    if value is not None and value not in allowed:
        raise InvalidInputError(key, f"{value!r} is not allowed; use one of: {', '.join(allowed)}")


def _check_base_url(base_url: str) -> None:
    if not _is_http_url(base_url):
        raise InvalidInputError(
            BASE_URL, f"{base_url!r} is not an http(s) URL, e.g. {DEFAULT_BASE_URL}"
        )
    parts = urlsplit(base_url)
    # Credentials in the URL would end up in the outbound log, which redacts headers only.
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError(BASE_URL, "must not contain credentials")
    if parts.query or parts.fragment:
        raise InvalidInputError(BASE_URL, "must not contain a query or fragment")


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
