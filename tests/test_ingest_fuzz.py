"""Property-based fuzzing of ``POST /v1/events`` on a real ``tidegate serve`` (its ingest
worker): generated bodies, headers and encodings, sent over a raw socket so any byte can
go in a header. Every request gets a whole HTTP answer below 500, and the worker that
answered the first request answers the last one."""

from __future__ import annotations

import gzip
import json
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faultload import HOST, EngineProcess, create_connection
from tests.test_ingest_worker import worker_pid

TOKEN = "fuzz-token-0123456789"

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
timestamps = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e20, -1e13, 0, 253402300799, 253402300800, "0001-01-01T00:00:00+01:00"]),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.text(max_size=40),
)
actions = st.sampled_from(["point_add", "profile", "opt_in", "checkout", "x"]) | st.text(
    max_size=20
)
events = st.fixed_dictionaries(
    {"customer": st.text(min_size=0, max_size=20) | st.integers(), "action": actions},
    optional={
        "data": st.dictionaries(st.text(max_size=12), json_values, max_size=6) | json_values,
        "timestamp": timestamps,
        "id": st.text(max_size=20) | st.integers(),
        "external_id": st.sampled_from(["", "email", "loyalty_id"]) | json_scalars,
        "account": json_scalars,
    },
)


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(min_value=1, max_value=1100))
    opener, closer = draw(st.sampled_from([('{"k": ', "}"), ("[", "]")]))
    data = opener * depth + "1" + closer * depth
    if opener == "[":
        data = '{"k": ' + data + "}"
    return b'{"customer": "c1", "action": "point_add", "data": ' + data.encode() + b"}"


bodies = st.one_of(
    events.map(lambda e: json.dumps(e).encode()),
    st.lists(events, min_size=0, max_size=5).map(lambda es: json.dumps({"events": es}).encode()),
    deep(),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda t: t.encode()),
)
header_values = st.binary(min_size=0, max_size=40).filter(
    lambda b: b"\r" not in b and b"\n" not in b
)
authorizations = st.one_of(
    st.none(),
    st.just(f"Bearer {TOKEN}".encode()),
    st.just(b"Bearer wrong"),
    st.just(b"Basic Zm9vOmJhcg=="),
    st.text(max_size=30).map(lambda t: ("Bearer " + t).encode()),
    header_values,
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=utf-8",
            b"text/plain",
            b"application/x-www-form-urlencoded",
            b"",
        ]
    ),
    header_values,
)
encodings = st.sampled_from(["", "gzip", "gzip-label-only", "deflate", "br", "identity"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    """``tidegate serve`` with a Bearer token and a mapped connection (no sandbox: its
    deliveries fail and retry, which is not what is fuzzed here)."""
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    engine = EngineProcess(tmp / "serve.out", tmp / "data")
    engine.extra_args = ["--ingest-token-file", str(token_file)]
    engine.start()
    try:
        yield engine
    finally:
        engine.close()


def request(
    port: int, body: bytes, authorization: bytes | None, content_type: bytes | None, encoding: str
) -> bytes:
    """One request over a raw socket; the whole answer (the server closes after it)."""
    headers = [b"POST /v1/events HTTP/1.1", b"Host: fuzz", b"Connection: close"]
    if authorization is not None:
        headers.append(b"Authorization: " + authorization)
    if content_type is not None:
        headers.append(b"Content-Type: " + content_type)
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    if encoding:
        headers.append(b"Content-Encoding: " + encoding.removesuffix("-label-only").encode())
    headers.append(b"Content-Length: %d" % len(body))
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(b"\r\n".join(headers) + b"\r\n\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def status_of(answer: bytes) -> int:
    assert answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), f"no HTTP answer: {answer[:200]!r}"
    return int(answer[9:12])


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(
    body=bodies,
    authorization=authorizations,
    content_type=content_types,
    encoding=encodings,
)
def test_ingest_never_answers_5xx_nor_drops_the_connection(
    served: EngineProcess,
    body: bytes,
    authorization: bytes | None,
    content_type: bytes | None,
    encoding: str,
) -> None:
    answer = request(served.http_port, body, authorization, content_type, encoding)
    status = status_of(answer)
    assert status < 500, answer[:500]
    if authorization != f"Bearer {TOKEN}".encode():
        # Our endpoint answers 401; aiohttp's parser refuses a malformed request first.
        assert status == 401 or (status == 400 and answer.startswith(b"HTTP/1.0")), answer[:300]


async def test_fuzzed_records_that_were_accepted_reach_routing(served: EngineProcess) -> None:
    """Events the fuzzer got through are routed and queued like any other: a connection
    that maps ``point_add`` queues them (nothing upstream of delivery chokes on them)."""
    await create_connection(served.target, "http://127.0.0.1:9")
    odd: list[dict[str, Any]] = [
        {"customer": "c1", "action": "point_add", "timestamp": 253402300799, "data": {"seq": 1}},
        {"customer": "c2", "action": "point_add", "timestamp": "1970-01-01T00:00:00Z"},
        {"customer": "c3", "action": "point_add", "data": {"seq": 2, "n": [[[{"a": None}]]]}},
    ]
    answer = request(
        served.http_port,
        json.dumps({"events": odd}).encode(),
        f"Bearer {TOKEN}".encode(),
        b"application/json",
        "",
    )
    assert status_of(answer) == 202, answer
    assert b'"deliveries_queued":3' in answer


def test_the_worker_survived_the_fuzzing(served: EngineProcess) -> None:
    """Runs after the fuzz test in this module: the same worker still answers, and the
    output has no traceback."""
    assert served.process is not None
    before = worker_pid(served.process.pid)
    good = json.dumps({"customer": "c1", "action": "point_add", "data": {"points": 1}})
    answer = request(
        served.http_port, good.encode(), f"Bearer {TOKEN}".encode(), b"application/json", ""
    )
    assert status_of(answer) == 202
    assert worker_pid(served.process.pid) == before
    output = served.tail(1_000_000)
    assert "Traceback" not in output
    assert "ingest_worker_exited" not in output
