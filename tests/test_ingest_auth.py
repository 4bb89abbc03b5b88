"""Ingest authentication: Bearer, Basic and JWT (HS256, RS256) as Antavo's trusted sites
send them, checked by ``IngestVerifier`` and by the real HTTP endpoint, in-process and in
``tidegate serve``'s worker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.app import Engine, EngineConfig
from engine.errors import TidegateError
from engine.ingest.auth import IngestAuth, IngestVerifier, load_ingest_auth
from engine.ingest.settings import IngestSettings
from tests.conftest import FAST_DELIVERY
from tests.faultload import EngineProcess
from tests.test_ingest_worker import worker_pid

SECRET = "antavo-trusted-site-secret-" + "0123456789abcdef" * 3  # 74 bytes: HS512 too
EVENT = {"customer": "c1", "action": "point_add", "data": {"points": 5}}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def hs256(claims: dict[str, object], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return "Bearer " + jwt.encode(claims, secret, algorithm=algorithm)


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, str]:
    """(private key PEM, public key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


# -- the verifier ------------------------------------------------------------------------


def test_no_scheme_requires_nothing() -> None:
    verifier = IngestVerifier(IngestAuth())
    assert not verifier.configured
    assert verifier.check(None) and verifier.check("Bearer anything")


def test_bearer_accepts_only_its_token() -> None:
    verifier = IngestVerifier(IngestAuth.bearer("s3cret-token"))
    assert verifier.configured
    assert verifier.check("Bearer s3cret-token")
    assert verifier.check("bearer s3cret-token")  # the scheme is case-insensitive (RFC 9110)
    assert not verifier.check(None)
    assert not verifier.check("")
    assert not verifier.check("Bearer s3cret-toke")
    assert not verifier.check("Bearer s3cret-token2")
    assert not verifier.check("Basic s3cret-token")
    assert not verifier.check("s3cret-token")
    assert not verifier.check("Bearer s3cret-tokén")  # non-ASCII: refused, not an error
    assert not verifier.check("Bearer \udcff")  # a byte aiohttp could not decode
    assert not verifier.check("Bearer " + "x" * 100_000)


def test_basic_accepts_only_its_user_and_password() -> None:
    verifier = IngestVerifier(IngestAuth("basic", user="antavo", password="pa:ss wörd"))
    assert verifier.check(basic("antavo", "pa:ss wörd"))
    assert verifier.challenge.startswith("Basic ")
    assert not verifier.check(basic("antavo", "pa:ss word"))
    assert not verifier.check(basic("other", "pa:ss wörd"))
    assert not verifier.check("Basic not-base64!!")
    assert not verifier.check("Basic " + base64.b64encode(b"\xff\xfe").decode())
    assert not verifier.check("Bearer " + base64.b64encode(b"antavo:pa:ss w\xc3\xb6rd").decode())


def test_hs256_checks_signature_algorithm_and_times() -> None:
    verifier = IngestVerifier(IngestAuth("jwt", jwt_algorithm="HS256", jwt_key=SECRET))
    now = int(time.time())
    assert verifier.challenge.startswith("Bearer ")
    assert verifier.check(hs256({"iss": "antavo", "iat": now, "exp": now + 300}))
    assert verifier.check(hs256({"site": "tidegate"}))  # exp and iat optional by default
    assert not verifier.check(hs256({"iat": now}, secret=SECRET + "x"))
    assert not verifier.check(hs256({"iat": now}, algorithm="HS512"))  # pinned to HS256
    unsigned = jwt.encode({"iat": now}, None, algorithm="none")
    assert not verifier.check("Bearer " + unsigned)
    assert not verifier.check(hs256({"exp": now - 120}))  # expired beyond the leeway
    assert verifier.check(hs256({"exp": now - 30}))  # within the 60 s leeway
    assert not verifier.check(hs256({"iat": now + 600}))  # issued in the future
    assert verifier.check(hs256({"iat": now + 30}))
    assert not verifier.check(hs256({"nbf": now + 600}))
    assert not verifier.check("Bearer not.a.jwt")
    assert not verifier.check(basic("a", "b"))


def test_an_expired_jwt_is_refused_even_after_it_was_accepted() -> None:
    verifier = IngestVerifier(
        IngestAuth("jwt", jwt_algorithm="HS256", jwt_key=SECRET, jwt_leeway=0)
    )
    header = hs256({"exp": time.time() + 1.0})
    assert verifier.check(header) and verifier.check(header)
    time.sleep(1.2)
    assert not verifier.check(header)


def test_hs256_can_require_exp_audience_and_issuer() -> None:
    verifier = IngestVerifier(
        IngestAuth(
            "jwt",
            jwt_key=SECRET,
            jwt_require_exp=True,
            jwt_audience="tidegate",
            jwt_issuer="antavo",
        )
    )
    exp = int(time.time()) + 300
    assert verifier.check(hs256({"exp": exp, "aud": "tidegate", "iss": "antavo"}))
    assert not verifier.check(hs256({"aud": "tidegate", "iss": "antavo"}))
    assert not verifier.check(hs256({"exp": exp, "aud": "other", "iss": "antavo"}))
    assert not verifier.check(hs256({"exp": exp, "aud": "tidegate", "iss": "someone"}))


def test_rs256_checks_the_signature_with_the_public_key(rsa_keys: tuple[bytes, str]) -> None:
    private, public = rsa_keys
    verifier = IngestVerifier(IngestAuth("jwt", jwt_algorithm="RS256", jwt_key=public))
    claims = {"iat": int(time.time())}
    assert verifier.check("Bearer " + jwt.encode(claims, private, algorithm="RS256"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert not verifier.check("Bearer " + jwt.encode(claims, other, algorithm="RS256"))

    # The classic confusion: HS256 "signed" with the public key as the HMAC secret.
    # PyJWT refuses a PEM as an HMAC key, so it is signed by hand.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(b'{"iat":1}')
    mac = hmac.new(public.encode(), signing_input, hashlib.sha256).digest()
    assert not verifier.check("Bearer " + (signing_input + b"." + b64(mac)).decode())
    assert not verifier.check(hs256(claims, secret="x" * 40))


def test_secrets_stay_out_of_repr() -> None:
    text = repr(IngestSettings(IngestAuth("basic", user="antavo", password="hunter2-pw")))
    assert "hunter2-pw" not in text
    assert "tok-123456" not in repr(IngestAuth.bearer("tok-123456"))


# -- loading from the environment and files ----------------------------------------------


def test_secrets_come_from_the_environment_or_files(tmp_path: Path) -> None:
    assert load_ingest_auth(None, {}).scheme == "none"
    assert load_ingest_auth(None, {"TIDEGATE_INGEST_TOKEN": "t0k"}).token == "t0k"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    auth = load_ingest_auth(None, {}, token_file=token_file)
    assert (auth.scheme, auth.token) == ("bearer", "from-file")
    password = tmp_path / "password"
    password.write_text("pw-from-file\n")
    auth = load_ingest_auth("basic", {}, basic_user="antavo", basic_password_file=password)
    assert (auth.user, auth.password) == ("antavo", "pw-from-file")
    auth = load_ingest_auth(
        "basic",
        {"TIDEGATE_INGEST_BASIC_USER": "u", "TIDEGATE_INGEST_BASIC_PASSWORD": "p"},
    )
    assert (auth.user, auth.password) == ("u", "p")
    auth = load_ingest_auth("jwt", {"TIDEGATE_INGEST_JWT_SECRET": SECRET})
    assert (auth.jwt_algorithm, auth.jwt_key) == ("HS256", SECRET)


@pytest.mark.parametrize(
    ("scheme", "environ", "names"),
    [
        ("bearer", {}, "TIDEGATE_INGEST_TOKEN"),
        ("bearer", {"TIDEGATE_INGEST_TOKEN": "with space"}, "printable ASCII"),
        ("basic", {"TIDEGATE_INGEST_BASIC_PASSWORD": "p"}, "--ingest-basic-user"),
        ("basic", {"TIDEGATE_INGEST_BASIC_USER": "u"}, "TIDEGATE_INGEST_BASIC_PASSWORD"),
        ("jwt", {"TIDEGATE_INGEST_JWT_SECRET": "short"}, "at least 32 bytes"),
    ],
)
def test_a_missing_or_unusable_secret_is_a_clear_error(
    scheme: str, environ: dict[str, str], names: str
) -> None:
    with pytest.raises(TidegateError, match=names):
        load_ingest_auth(scheme, environ)


def test_rs256_needs_a_pem_public_key(tmp_path: Path, rsa_keys: tuple[bytes, str]) -> None:
    key_file = tmp_path / "antavo.pub"
    key_file.write_text("not a key")
    with pytest.raises(TidegateError, match="PEM"):
        load_ingest_auth("jwt", {}, jwt_algorithm="RS256", jwt_public_key_file=key_file)
    key_file.write_text(rsa_keys[1])
    auth = load_ingest_auth("jwt", {}, jwt_algorithm="RS256", jwt_public_key_file=key_file)
    assert auth.jwt_key.strip() == rsa_keys[1].strip()
    with pytest.raises(TidegateError, match="cannot read"):
        load_ingest_auth("jwt", {}, jwt_secret_file=tmp_path / "missing")


# -- the HTTP endpoint --------------------------------------------------------------------


@pytest.fixture
async def basic_engine(tmp_path: Path) -> AsyncIterator[Engine]:
    settings = IngestSettings(IngestAuth("basic", user="antavo", password="pw-1"))
    engine = Engine(
        EngineConfig(
            data_dir=tmp_path / "data",
            grpc_port=0,
            http_port=0,
            ingest=settings,
            delivery=FAST_DELIVERY,
        )
    )
    await engine.start()
    yield engine
    await engine.stop(grace=1.0)


async def test_a_wrong_credential_gets_401_with_a_challenge_and_a_fixed_body(
    basic_engine: Engine,
) -> None:
    url = f"http://127.0.0.1:{basic_engine.http_port}/v1/events"
    async with aiohttp.ClientSession() as http:
        bodies = []
        for headers in ({}, {"Authorization": basic("antavo", "nope")}, {"Authorization": "x"}):
            async with http.post(url, json=EVENT, headers=headers) as r:
                assert r.status == 401
                assert (
                    r.headers["WWW-Authenticate"]
                    == 'Basic realm="tidegate-ingest", charset="UTF-8"'
                )
                bodies.append(await r.read())
        assert bodies[0] == bodies[1] == bodies[2]
        assert b"unauthenticated" in bodies[0] and b"nope" not in bodies[0]
        async with http.post(
            url, json=EVENT, headers={"Authorization": basic("antavo", "pw-1")}
        ) as r:
            assert r.status == 202


async def raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def test_a_non_ascii_authorization_header_is_a_401(basic_engine: Engine) -> None:
    body = b'{"customer": "c1", "action": "x"}'
    for value in (b"Basic \xff\xfe", "Basic Zm9vOmLDpHI=ö".encode(), b"\xc3\xa9"):
        answer = await raw_request(
            basic_engine.http_port,
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: "
            + value
            + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body,
        )
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b"WWW-Authenticate: Basic" in answer


# -- tidegate serve: the worker gets the credential, never on its command line -----------


async def test_serve_with_jwt_checks_it_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "jwt-secret"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.delenv("TIDEGATE_INGEST_TOKEN", raising=False)
    monkeypatch.setenv("TIDEGATE_INGEST_BASIC_PASSWORD", "unused-password-xyz")
    engine = EngineProcess(tmp_path / "serve.out", tmp_path / "data")
    engine.extra_args = [
        "--ingest-auth",
        "jwt",
        "--ingest-jwt-secret-file",
        str(secret_file),
        "--ingest-jwt-require-exp",
    ]
    await asyncio.to_thread(engine.start)
    try:
        assert engine.process is not None
        worker = worker_pid(engine.process.pid)
        for pid in (engine.process.pid, worker):
            for what in ("cmdline", "environ"):  # ps shows these
                shown = await asyncio.to_thread(Path(f"/proc/{pid}/{what}").read_bytes)
                assert SECRET.encode() not in shown
        worker_env = await asyncio.to_thread(Path(f"/proc/{worker}/environ").read_bytes)
        assert b"unused-password-xyz" not in worker_env  # not passed on to the worker
        async with aiohttp.ClientSession() as http:
            good = hs256({"exp": int(time.time()) + 60})
            async with http.post(
                engine.ingest_url, json=EVENT, headers={"Authorization": good}
            ) as r:
                assert r.status == 202, await r.text()
            no_exp = hs256({"iat": int(time.time())})
            for headers in ({}, {"Authorization": no_exp}):
                async with http.post(engine.ingest_url, json=EVENT, headers=headers) as r:
                    assert r.status == 401
                    assert r.headers["WWW-Authenticate"].startswith("Bearer ")
        assert SECRET not in engine.tail(100_000)
    finally:
        await asyncio.to_thread(engine.close)


def test_serve_refuses_to_start_without_the_secret(tmp_path: Path) -> None:
    engine = EngineProcess(tmp_path / "serve.out", tmp_path / "data")
    engine.extra_args = ["--ingest-auth", "basic", "--ingest-basic-user", "antavo"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_INGEST")}
    done = subprocess.run(engine.command(), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "TIDEGATE_INGEST_BASIC_PASSWORD" in done.stderr
    assert "Traceback" not in done.stderr


# -- the verifier agrees with PyJWT's jwt.decode -----------------------------------------

OFFSETS = st.sampled_from([-7200, -600, -120, -30, 0, 30, 120, 600, 7200])  # leeway is 60
time_claims = st.one_of(
    OFFSETS, OFFSETS, OFFSETS.map(lambda o: o + 0.5), st.just("soon"), st.none()
)
claims_strategy = st.fixed_dictionaries(
    {},
    optional={
        "exp": time_claims,
        "iat": time_claims,
        "nbf": time_claims,
        "aud": st.sampled_from(["tidegate"] * 3 + ["other", ["other", "tidegate"], ["x"], 7, [1]]),
        "iss": st.sampled_from(["antavo", "someone", 3]),
        "sub": st.sampled_from(["customer", 5]),
        "jti": st.sampled_from(["j-1", 9]),
        "site": st.text(max_size=10),
    },
)


def sign_by_hand(header: dict[str, object], payload: dict[str, object], secret: str) -> str:
    """A JWS compact token, signed here: PyJWT's encode refuses odd claims (a numeric
    ``iss``, a numeric ``kid``) that a sender could still sign."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}.get(str(header["alg"]))
    if digest is None:  # alg none: no signature
        return signing_input + "."
    return (
        signing_input
        + "."
        + b64(hmac.new(secret.encode(), signing_input.encode(), digest).digest())
    )


@settings(max_examples=600, deadline=None)
@given(
    claims=claims_strategy,
    algorithm=st.sampled_from(["HS256"] * 6 + ["HS512", "none"]),
    right_secret=st.sampled_from([True] * 5 + [False]),
    kid=st.sampled_from([None, "k1", 5]),
    audience=st.sampled_from(["", "tidegate"]),
    issuer=st.sampled_from(["", "antavo"]),
    require_exp=st.booleans(),
)
def test_hs256_verdicts_match_pyjwt(
    claims: dict[str, Any],
    algorithm: str,
    right_secret: bool,
    kid: object,
    audience: str,
    issuer: str,
    require_exp: bool,
) -> None:
    now = time.time()
    payload = {
        k: now + v if k in ("exp", "iat", "nbf") and isinstance(v, int | float) else v
        for k, v in claims.items()
    }
    header: dict[str, object] = {"alg": algorithm, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    secret = SECRET if right_secret else SECRET[::-1]
    token = sign_by_hand(header, payload, secret)
    verifier = IngestVerifier(
        IngestAuth(
            "jwt",
            jwt_key=SECRET,
            jwt_require_exp=require_exp,
            jwt_audience=audience,
            jwt_issuer=issuer,
        )
    )
    try:
        jwt.decode(
            token,
            SECRET,
            algorithms=["HS256"],
            audience=audience or None,
            issuer=issuer or None,
            leeway=60,
            options={"require": ["exp"] if require_exp else [], "verify_aud": bool(audience)},
        )
        expected = True
    except jwt.PyJWTError:
        expected = False
    assert verifier.check("Bearer " + token) is expected


def test_critical_header_extensions_and_padding_are_refused() -> None:
    verifier = IngestVerifier(IngestAuth("jwt", jwt_key=SECRET))
    crit = jwt.encode({"a": 1}, SECRET, "HS256", {"crit": ["exp"], "exp": 1})
    assert not verifier.check("Bearer " + crit)
    good = jwt.encode({"a": 1}, SECRET, "HS256")
    assert verifier.check("Bearer " + good)
    header, payload, signature = good.split(".")
    assert not verifier.check(f"Bearer {header}.{payload}.{signature}=")
    assert not verifier.check(f"Bearer {header}.{payload}.{signature}.")
    assert not verifier.check(f"Bearer {header}.{payload}")
    assert not verifier.check(f"Bearer {header}.{payload}.{signature[:-2]}")
    # iat as a numeric string: PyJWT takes it (int("123")); a JSON number is required here.
    odd = jwt.encode({"iat": str(int(time.time()))}, SECRET, "HS256")
    assert not verifier.check("Bearer " + odd)


def test_an_hs256_secret_that_is_a_public_key_is_refused(rsa_keys: tuple[bytes, str]) -> None:
    with pytest.raises(TidegateError, match="looks like a public key"):
        load_ingest_auth("jwt", {"TIDEGATE_INGEST_JWT_SECRET": rsa_keys[1]})
