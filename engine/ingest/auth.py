"""Ingest authentication: the credential Antavo's trusted site sends, checked per request.

A deployment picks one scheme (``tidegate serve --ingest-auth``):

- ``bearer``: ``Authorization: Bearer <token>``, a static token (``TIDEGATE_INGEST_TOKEN``);
- ``basic``: ``Authorization: Basic base64(user:password)``, Antavo's "Basic" trusted site;
- ``jwt``: ``Authorization: Bearer <JWT>`` signed HS256 (a shared secret) or RS256 (Antavo
  holds the private key, Tidegate the public one), Antavo's "JWT" trusted site. The
  algorithm is pinned to the configured one (never ``none``, never the other), ``exp`` is
  checked when present (required with ``require_exp``), ``iat`` and ``nbf`` may not lie in
  the future, each with ``leeway`` seconds for clock skew.

Secrets are compared in constant time (``hmac.compare_digest``). ``IngestVerifier`` holds
no aiohttp types: the HTTP endpoint and the gRPC ``IngestEvents`` check alike.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import Algorithm, HMACAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from engine.errors import TidegateError

SCHEME_NONE = "none"
SCHEME_BEARER = "bearer"
SCHEME_BASIC = "basic"
SCHEME_JWT = "jwt"
SCHEMES = (SCHEME_NONE, SCHEME_BEARER, SCHEME_BASIC, SCHEME_JWT)
JWT_ALGORITHMS = ("HS256", "RS256")

TOKEN_ENV = "TIDEGATE_INGEST_TOKEN"
BASIC_USER_ENV = "TIDEGATE_INGEST_BASIC_USER"
BASIC_PASSWORD_ENV = "TIDEGATE_INGEST_BASIC_PASSWORD"
JWT_SECRET_ENV = "TIDEGATE_INGEST_JWT_SECRET"
JWT_PUBLIC_KEY_ENV = "TIDEGATE_INGEST_JWT_PUBLIC_KEY"

REALM = "tidegate-ingest"
MIN_HS256_SECRET_BYTES = 32
"""RFC 7518 §3.2: an HS256 key at least as long as the hash output (256 bits)."""
MIN_RSA_BITS = 2048
MAX_AUTHORIZATION_LENGTH = 8192
"""Longer ``Authorization`` values are refused unread (aiohttp caps a header at 8190)."""
JWT_CACHE_SIZE = 256
"""JWTs verified lately, kept with their expiry so a token Antavo sends again is not
verified again (an RS256 signature check costs far more than the rest of a request)."""
DEFAULT_JWT_LEEWAY = 60.0


@dataclass(frozen=True)
class IngestAuth:
    """Which credential ingest requires. Secrets never show in ``repr``."""

    scheme: str = SCHEME_NONE
    token: str = field(default="", repr=False)
    user: str = ""
    password: str = field(default="", repr=False)
    jwt_algorithm: str = "HS256"
    jwt_key: str = field(default="", repr=False)
    """The HS256 secret, or the RS256 public key in PEM."""
    jwt_require_exp: bool = False
    jwt_leeway: float = DEFAULT_JWT_LEEWAY
    jwt_audience: str = ""
    jwt_issuer: str = ""

    @property
    def configured(self) -> bool:
        """True when ingest requires a credential."""
        return self.scheme != SCHEME_NONE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> IngestAuth:
        return cls(**values)

    @classmethod
    def bearer(cls, token: str) -> IngestAuth:
        """A static bearer token; an empty one requires nothing."""
        return cls(SCHEME_BEARER, token=token) if token else cls()


class IngestVerifier:
    """Checks an ``Authorization`` value against the configured ``IngestAuth``."""

    def __init__(self, auth: IngestAuth) -> None:
        validate(auth)
        self.auth = auth
        self.configured = auth.configured
        self._scheme = auth.scheme
        if auth.scheme == SCHEME_BASIC:
            self._expected = f"{auth.user}:{auth.password}".encode()
            self.challenge = f'Basic realm="{REALM}", charset="UTF-8"'
            self._prefix = "basic"
        else:
            self._expected = auth.token.encode()
            self.challenge = f'Bearer realm="{REALM}"'
            self._prefix = "bearer"
        self._algorithm: Algorithm = HMACAlgorithm(HMACAlgorithm.SHA256)
        if auth.jwt_algorithm == "RS256":
            self._algorithm = RSAAlgorithm(RSAAlgorithm.SHA256)
        self._prepared_key: Any = None
        if auth.scheme == SCHEME_JWT:
            self._prepared_key = self._algorithm.prepare_key(auth.jwt_key)
        self._jwt_cache: dict[str, float] = {}
        self._headers_seen: dict[str, bool] = {}

    def check(self, authorization: str | None) -> bool:
        """True when ``authorization`` (the header's value, None when absent) carries the
        configured credential, or when none is configured."""
        if not self.configured:
            return True
        if (
            authorization is None
            or len(authorization) > MAX_AUTHORIZATION_LENGTH
            or not authorization.isascii()
        ):
            return False
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != self._prefix:
            return False
        credentials = credentials.strip()
        if self._scheme == SCHEME_BEARER:
            return hmac.compare_digest(credentials.encode(), self._expected)
        if self._scheme == SCHEME_BASIC:
            try:
                decoded = base64.b64decode(credentials, validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(decoded, self._expected)
        return self._check_jwt(credentials)

    def _check_jwt(self, token: str) -> bool:
        now = time.time()
        expires = self._jwt_cache.get(token)
        if expires is not None:
            if now <= expires + self.auth.jwt_leeway:
                return True
            del self._jwt_cache[token]
        claims = self._verified_claims(token, now)
        if claims is None:
            return False
        exp = claims.get("exp")
        if len(self._jwt_cache) >= JWT_CACHE_SIZE:
            self._jwt_cache.clear()
        self._jwt_cache[token] = float(exp) if exp is not None else float("inf")
        return True

    def _verified_claims(self, token: str, now: float) -> dict[str, Any] | None:
        """The claims of a JWS compact token whose signature PyJWT's algorithm verifies
        with the configured key and whose claims hold at ``now``; None otherwise.

        Hot path (bench.ingest_cpu --auth jwt-fresh): ``jwt.decode`` costs about 300,000
        instructions a token, more than half of ingesting one event, so the token is
        taken apart here with C-level base64 and orjson and only the signature goes
        through PyJWT (``HMACAlgorithm`` / ``RSAAlgorithm``). The rules are PyJWT's,
        stricter where noted; tests/test_ingest_auth.py checks both agree."""
        parts = _JWS.fullmatch(token)
        if parts is None:
            return None
        # One translation of the whole token to the standard alphabet, then each part.
        standard = token.encode().translate(_TO_STANDARD_ALPHABET)
        header_end, payload_end = parts.end(1), parts.end(2)
        header_segment = token[:header_end]
        header_ok = self._headers_seen.get(header_segment)
        if header_ok is None:  # a sender's header is the same on every token
            header_ok = self._header_ok(standard[:header_end])
            if len(self._headers_seen) < JWT_CACHE_SIZE:
                self._headers_seen[header_segment] = header_ok
        if not header_ok:
            return None
        try:
            payload = orjson.loads(_b64(standard[header_end + 1 : payload_end]))
            signature = _b64(standard[payload_end + 1 :])
        except (ValueError, binascii.Error):  # orjson.JSONDecodeError is a ValueError
            return None
        signing_input = token[:payload_end].encode()
        if not self._algorithm.verify(signing_input, self._prepared_key, signature):
            return None
        if type(payload) is not dict or not self._claims_hold(payload, now):
            return None
        return payload

    def _header_ok(self, encoded: bytes) -> bool:
        try:
            header = orjson.loads(_b64(encoded))
        except (ValueError, binascii.Error):
            return False
        if type(header) is not dict or header.get("alg") != self.auth.jwt_algorithm:
            return False
        # No critical extension is understood (RFC 7515 §4.1.11), so none is accepted;
        # b64=false (RFC 7797) PyJWT accepts only with a detached payload, never here.
        if "crit" in header or "b64" in header:
            return False
        return "kid" not in header or type(header["kid"]) is str

    def _claims_hold(self, claims: dict[str, Any], now: float) -> bool:
        auth = self.auth
        leeway = auth.jwt_leeway
        if "exp" in claims:
            exp = claims["exp"]
            if not _is_number(exp) or exp <= now - leeway:
                return False
        elif auth.jwt_require_exp:
            return False
        for name in ("iat", "nbf"):  # not in the future
            if name in claims:
                value = claims[name]
                if not _is_number(value) or value > now + leeway:
                    return False
        for name in ("sub", "jti"):  # PyJWT's checks: strings when present
            if name in claims and type(claims[name]) is not str:
                return False
        if auth.jwt_issuer and claims.get("iss") != auth.jwt_issuer:
            return False
        if auth.jwt_audience:
            aud = claims.get("aud")
            if type(aud) is str:
                aud = [aud]
            if type(aud) is not list or any(type(a) is not str for a in aud):
                return False
            if auth.jwt_audience not in aud:
                return False
        return True


_JWS = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
"""A JWS compact token in unpadded base64url (RFC 7515 §2, §7.1); PyJWT also accepts
``=`` padding."""
_TO_STANDARD_ALPHABET = bytes.maketrans(b"-_", b"+/")


def _b64(segment: bytes) -> bytes:
    """One part of a token already checked by ``_JWS`` and translated to base64's
    standard alphabet."""
    if len(segment) % 4 == 1:
        raise ValueError("not base64url")
    return binascii.a2b_base64(segment + b"=" * (-len(segment) % 4))


def _is_number(value: object) -> bool:
    """A JSON number (PyJWT also takes what ``int()`` takes, such as ``"123"``)."""
    kind = type(value)
    return (kind is int or kind is float) and value == value  # not NaN


def validate(auth: IngestAuth) -> None:
    """Raises ``TidegateError`` naming what to fix in an unusable ``auth``."""
    if auth.scheme not in SCHEMES:
        raise TidegateError(
            f"--ingest-auth: {auth.scheme!r:.40} is not one of {', '.join(SCHEMES)}"
        )
    if auth.scheme == SCHEME_BEARER:
        if not auth.token:
            raise TidegateError(
                f"--ingest-auth bearer needs a token: set {TOKEN_ENV} or --ingest-token-file"
            )
        if not (auth.token.isascii() and auth.token.isprintable()) or " " in auth.token:
            raise TidegateError(
                "the ingest bearer token must be printable ASCII without spaces"
                f" ({TOKEN_ENV} or --ingest-token-file)"
            )
    elif auth.scheme == SCHEME_BASIC:
        if not auth.user or ":" in auth.user:
            raise TidegateError(
                "--ingest-auth basic needs a user name without ':': set --ingest-basic-user"
                f" or {BASIC_USER_ENV}"
            )
        if not auth.password:
            raise TidegateError(
                f"--ingest-auth basic needs a password: set {BASIC_PASSWORD_ENV} or"
                " --ingest-basic-password-file"
            )
    elif auth.scheme == SCHEME_JWT:
        _validate_jwt(auth)


def _validate_jwt(auth: IngestAuth) -> None:
    if auth.jwt_algorithm not in JWT_ALGORITHMS:
        raise TidegateError(
            f"--ingest-jwt-algorithm: {auth.jwt_algorithm!r:.40} is not one of"
            f" {', '.join(JWT_ALGORITHMS)}"
        )
    if auth.jwt_leeway < 0:
        raise TidegateError("--ingest-jwt-leeway-seconds must be 0 or more")
    if auth.jwt_algorithm == "HS256":
        if len(auth.jwt_key.encode()) < MIN_HS256_SECRET_BYTES:
            raise TidegateError(
                f"--ingest-auth jwt with HS256 needs a secret of at least"
                f" {MIN_HS256_SECRET_BYTES} bytes: set {JWT_SECRET_ENV} or"
                " --ingest-jwt-secret-file (the same secret as Antavo's trusted site)"
            )
        try:
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(auth.jwt_key)
        except InvalidKeyError:
            raise TidegateError(
                "the ingest HS256 secret looks like a public key; for RS256 pass"
                " --ingest-jwt-algorithm RS256 and --ingest-jwt-public-key-file"
            ) from None
        return
    try:
        key = load_pem_public_key(auth.jwt_key.encode())
    except (ValueError, TypeError):
        raise TidegateError(
            "--ingest-auth jwt with RS256 needs the RSA public key in PEM"
            f" (-----BEGIN PUBLIC KEY-----): set --ingest-jwt-public-key-file or"
            f" {JWT_PUBLIC_KEY_ENV}"
        ) from None
    if not isinstance(key, RSAPublicKey) or key.key_size < MIN_RSA_BITS:
        raise TidegateError(
            f"the ingest JWT public key must be an RSA key of at least {MIN_RSA_BITS} bits"
        )


def read_secret_file(path: Path, flag: str) -> str:
    """A secret from a file named by ``flag``, without its trailing newline."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise TidegateError(f"{flag}: cannot read {path}: {reason}") from None
    return text.rstrip("\r\n")


def load_ingest_auth(
    scheme: str | None,
    environ: Mapping[str, str],
    *,
    token_file: Path | None = None,
    basic_user: str | None = None,
    basic_password_file: Path | None = None,
    jwt_algorithm: str = "HS256",
    jwt_secret_file: Path | None = None,
    jwt_public_key_file: Path | None = None,
    jwt_require_exp: bool = False,
    jwt_leeway: float = DEFAULT_JWT_LEEWAY,
    jwt_audience: str = "",
    jwt_issuer: str = "",
) -> IngestAuth:
    """The ingest credential from ``tidegate serve``'s flags: secrets come from ``environ``
    or from files the flags name, never from a flag's value (flags show in ``ps``).
    Without ``scheme``: ``bearer`` when a token is given, else ``none``. Raises
    ``TidegateError`` naming what to fix."""

    def secret(env: str, path: Path | None, flag: str) -> str:
        if path is not None:
            return read_secret_file(path, flag)
        return environ.get(env, "")

    token = secret(TOKEN_ENV, token_file, "--ingest-token-file")
    if scheme is None:
        scheme = SCHEME_BEARER if token else SCHEME_NONE
    if scheme == SCHEME_BEARER:
        auth = IngestAuth(SCHEME_BEARER, token=token)
    elif scheme == SCHEME_BASIC:
        auth = IngestAuth(
            SCHEME_BASIC,
            user=basic_user if basic_user is not None else environ.get(BASIC_USER_ENV, ""),
            password=secret(
                BASIC_PASSWORD_ENV, basic_password_file, "--ingest-basic-password-file"
            ),
        )
    elif scheme == SCHEME_JWT:
        if jwt_algorithm == "RS256":
            key = secret(JWT_PUBLIC_KEY_ENV, jwt_public_key_file, "--ingest-jwt-public-key-file")
        else:
            key = secret(JWT_SECRET_ENV, jwt_secret_file, "--ingest-jwt-secret-file")
        auth = IngestAuth(
            SCHEME_JWT,
            jwt_algorithm=jwt_algorithm,
            jwt_key=key,
            jwt_require_exp=jwt_require_exp,
            jwt_leeway=jwt_leeway,
            jwt_audience=jwt_audience,
            jwt_issuer=jwt_issuer,
        )
    else:
        auth = IngestAuth(scheme)
    validate(auth)
    return auth
