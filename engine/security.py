"""Transport security of ``tidegate serve``: the TLS files of its gRPC and ingest ports,
and the exposure guard that refuses to serve a non-loopback address unprotected."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from engine.errors import TidegateError

INSECURE_FLAG = "--insecure-no-tls-i-know-the-risk"
"""The flag that lets ``serve`` bind a non-loopback address without TLS."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key, and optionally the CA whose
    client certificates are required (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """The three files' contents; ``TidegateError`` naming the flag of one that
        cannot be read."""
        return (
            _read(self.cert, "--tls-cert"),
            _read(self.key, "--tls-key"),
            None if self.client_ca is None else _read(self.client_ca, "--tls-client-ca"),
        )

    def server_context(self) -> ssl.SSLContext:
        """An ``ssl`` context for the ingest HTTP server (TLS 1.2 or newer)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise TidegateError(
                f"cannot use --tls-cert {self.cert} with --tls-key {self.key}: {exc}"
            ) from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise TidegateError(f"cannot use --tls-client-ca {self.client_ca}: {exc}") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TidegateError(f"cannot read {flag} {path}: {exc.strerror}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (what ``--host`` binds) accepts only local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def exposure_problem(
    host: str, *, tls: bool, insecure_allowed: bool, ingest_auth_configured: bool
) -> str | None:
    """Why ``serve`` must not bind ``host`` with these settings, or None. A non-loopback
    address needs TLS (or ``INSECURE_FLAG``) and an ingest credential, since the ingest
    port would otherwise take anyone's events. Admin tokens are always required."""
    if is_loopback(host):
        return None
    if not tls and not insecure_allowed:
        return (
            f"--host {host} accepts remote connections, and without TLS tokens and customer"
            " data cross the network in clear text: pass --tls-cert and --tls-key, bind"
            f" 127.0.0.1, or pass {INSECURE_FLAG} if a proxy in front terminates TLS"
        )
    if not ingest_auth_configured:
        return (
            f"--host {host} accepts remote connections, and ingest has no credential, so"
            " anyone who reaches the ingest port could send events: choose a credential"
            " with --ingest-auth (or set TIDEGATE_INGEST_TOKEN), or bind 127.0.0.1"
        )
    return None
