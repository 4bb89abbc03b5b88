"""Ingest settings: the credential ingest requires (``auth``) and its limits, as
``tidegate serve`` configures them. The engine hands them to its ingest worker over their
socket pair, never on the worker's command line or in its environment (``ps`` shows
both)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import TidegateError
from engine.ingest.auth import IngestAuth, validate
from engine.ingest.limits import DEFAULT_LIMITS, IngestLimits


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

    def to_dict(self) -> dict[str, Any]:
        return {"auth": self.auth.to_dict(), "limits": self.limits.to_dict()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> IngestSettings:
        return cls(IngestAuth.from_dict(values["auth"]), IngestLimits.from_dict(values["limits"]))
