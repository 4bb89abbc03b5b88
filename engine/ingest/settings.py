"""Ingest settings: the credential ingest requires (``auth``) and its limits, as
``tidegate serve`` configures them; the engine hands them to its ingest worker in the
worker's environment (``SETTINGS_ENV``), never on its command line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.errors import TidegateError
from engine.ingest.auth import IngestAuth, validate
from engine.ingest.limits import DEFAULT_LIMITS, IngestLimits

SETTINGS_ENV = "TIDEGATE_INGEST_SETTINGS"
"""The worker's copy of the settings (JSON); read once and removed from its environment."""


@dataclass(frozen=True)
class IngestSettings:
    auth: IngestAuth = field(default_factory=IngestAuth)
    limits: IngestLimits = DEFAULT_LIMITS

    @property
    def configured(self) -> bool:
        """True when ingest requires a credential. The exposure guard of ``serve``
        refuses non-loopback ingest while this is False."""
        return self.auth.configured

    @classmethod
    def bearer(cls, token: str) -> IngestSettings:
        """Default limits and a static bearer token (none when empty)."""
        return cls(IngestAuth.bearer(token))

    def check(self) -> None:
        """Raises ``TidegateError`` naming what to fix."""
        validate(self.auth)
        problem = self.limits.problem()
        if problem is not None:
            raise TidegateError(f"ingest limits: {problem}")

    def to_json(self) -> str:
        return orjson.dumps({"auth": self.auth.to_dict(), "limits": self.limits.to_dict()}).decode()

    @classmethod
    def from_json(cls, text: str) -> IngestSettings:
        values: dict[str, Any] = orjson.loads(text)
        return cls(IngestAuth.from_dict(values["auth"]), IngestLimits.from_dict(values["limits"]))

    @classmethod
    def take_from_environment(cls) -> IngestSettings:
        """The settings the engine passed to this worker; removes them from the
        environment so nothing this process starts inherits the secrets."""
        text = os.environ.pop(SETTINGS_ENV, "")
        return cls.from_json(text) if text else cls()
