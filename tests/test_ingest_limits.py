"""Ingest limits and the fuzz findings: every bad request gets a clear 4xx naming what to
fix, before anything is stored; slow and idle connections are closed; an aborted upload
is one log line. HTTP and gRPC ``IngestEvents`` refuse the same records alike."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import timestamp_pb2

from engine.app import Engine, EngineConfig
from engine.cli import build_parser
from engine.ingest.limits import IngestLimits
from engine.ingest.parse import parse_request
from engine.ingest.settings import IngestSettings
from engine.ingest.source_catalog import (
    MAX_NAME_LENGTH,
    MAX_NAMES,
    MAX_NAMES_PER_GROUP,
    SeenNames,
)
from engine.pb import catalog_pb2, catalog_pb2_grpc, ingest_pb2
from tests.conftest import FAST_DELIVERY, engine_client
from tests.faultload import EngineProcess

LIMITS = IngestLimits(
    max_body_bytes=20_000,
    max_events=3,
    max_depth=5,
    max_string_length=50,
    max_key_length=20,
    max_keys=30,
    idle_timeout=1.0,
    body_timeout=1.0,
)


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[Engine]:
    engine = Engine(
        EngineConfig(
            data_dir=tmp_path / "data",
            grpc_port=0,
            http_port=0,
            ingest=IngestSettings(limits=LIMITS),
            delivery=FAST_DELIVERY,
        )
    )
    await engine.start()
    yield engine
    await engine.stop(grace=1.0)


async def post(
    engine: Engine, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{engine.http_port}/v1/events"
    sent = {"Content-Type": "application/json"} if headers is None else headers
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.post(url, data=body, headers=sent) as r,
    ):
        return r.status, json.loads(await r.read())


def nested(depth: int) -> dict[str, Any]:
    """``data`` of ``depth`` levels: {"k": {"k": ... {"k": 1}}}."""
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value  # type: ignore[no-any-return]


def event(**data: Any) -> dict[str, Any]:
    return {"customer": "c1", "action": "point_add", "data": data}


async def test_default_depth_refuses_what_orjson_cannot_write_again(engine: Engine) -> None:
    # 253-1,000 levels once answered 500: orjson reads 1,024 levels and writes 254.
    for depth in (33, 253, 300, 1000):
        data = '{"k": ' * depth + "1" + "}" * depth  # json.dumps would recurse too deep
        body = '{"customer": "c1", "action": "x", "data": ' + data + "}"
        status, answer = await post(engine, body.encode())
        assert status == 400, (depth, answer)
        assert answer["error"]["field"].startswith("event.data.k.k.k")
        assert "deeper than 32 levels" in answer["error"]["message"]
    status, _ = await post(engine, json.dumps(event(**nested(32))).encode())
    assert status == 202


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (nested(6), "events[1].data.k.k.k.k.k", "deeper than 5 levels"),
        ({"list": [[[[["deep"]]]]]}, "events[1].data.list[0][0][0][0]", "deeper than 5"),
        ({"note": "x" * 51}, "events[1].data.note", "at most 50"),
        ({"items": [{"name": "ok"}, {"name": "y" * 51}]}, "events[1].data.items[1].name", "50"),
        ({"k" * 21: 1}, "events[1].data." + "k" * 21, "at most 20"),
        ({f"key{i}": i for i in range(31)}, "events[1].data", "more than 30 keys"),
        ({"a": [{f"k{i}": i for i in range(20)}, {f"j{i}": i for i in range(20)}]}, "", "30 keys"),
    ],
)
async def test_data_past_a_limit_is_refused_naming_the_field(
    limited: Engine, data: dict[str, Any], field: str, words: str
) -> None:
    body = json.dumps({"events": [event(ok=1), {**event(), "id": "e2", "data": data}]})
    status, answer = await post(limited, body.encode())
    assert status == 400
    assert answer["error"]["code"] == "invalid_event"
    assert answer["error"]["field"].startswith(field or "events[1].data.a[1]")
    assert words in answer["error"]["message"]


async def test_a_long_key_is_echoed_truncated(limited: Engine) -> None:
    body = json.dumps(event(**{"q" * 5000: 1})).encode()
    status, answer = await post(limited, body)
    assert status == 400
    assert len(json.dumps(answer)) < 600
    assert "4900 more characters" in answer["error"]["field"]


async def test_events_per_request_and_body_size_are_limited(limited: Engine) -> None:
    four = json.dumps({"events": [event(n=i) for i in range(4)]}).encode()
    status, answer = await post(limited, four)
    assert (status, answer["error"]["field"]) == (400, "events")
    assert "at most 3 events" in answer["error"]["message"]
    big = json.dumps(event(**{f"s{i}": "x" * 40 for i in range(25)} | {"pad": "y" * 50})) * 20
    status, answer = await post(limited, big.encode())
    assert status == 413
    assert "20000 bytes" in answer["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while read
        for _ in range(30):
            yield b" " * 1000

    url = f"http://127.0.0.1:{limited.http_port}/v1/events"
    async with aiohttp.ClientSession() as http:
        headers = {"Content-Type": "application/json"}
        async with http.post(url, data=chunks(), headers=headers) as r:
            assert r.status == 413


@pytest.mark.parametrize(
    "stamp", [1e20, -1e13, -1, "0001-01-01T00:00:00+01:00", "1969-12-31T23:59:59Z", "x" * 500]
)
async def test_an_out_of_range_timestamp_is_a_400_naming_the_field(
    engine: Engine, stamp: object
) -> None:
    body = {"customer": "c1", "action": "point_add", "timestamp": stamp}
    status, answer = await post(engine, json.dumps(body).encode())
    assert status == 400
    assert answer["error"]["field"] == "event.timestamp"
    assert len(answer["error"]["message"]) < 300


async def test_grpc_ingest_refuses_the_same_records(engine: Engine) -> None:
    async with engine_client(engine) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.send_events([event(**nested(33))])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The admin API's own Struct limit (32 levels, about what protobuf decodes) answers
        # first over gRPC, naming the event's data.
        assert "events[0].data" in str(refused.value.details())
        assert "deeper than 32 levels" in str(refused.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.send_events([event(note="x" * 70_000)])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for seconds in (-62135596800, 10**15, -(10**13)):  # year 1, past 9999, before 1970
            message = ingest_pb2.AntavoEvent(customer="c1", action="point_add")
            message.timestamp.CopyFrom(timestamp_pb2.Timestamp(seconds=seconds))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.ingest.IngestEvents(ingest_pb2.IngestEventsRequest(events=[message]))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "events[0].timestamp" in str(refused.value.details())


async def test_grpc_ingest_applies_the_configured_limits(limited: Engine) -> None:
    async with engine_client(limited) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.send_events([event(n=i) for i in range(4)])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 3 events" in str(refused.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.send_events([event(**nested(6))])
        assert "deeper than 5 levels" in str(refused.value.details())
        assert (await client.send_events([event(**nested(5))])).accepted == 1


async def test_a_request_without_content_type_is_read_as_json(engine: Engine) -> None:
    body = json.dumps(event(points=1)).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", engine.http_port)
    try:  # raw: aiohttp's client would add Content-Type: application/octet-stream
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        answer = await closed_within(reader, 15)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    assert b'"accepted":1' in answer


async def test_a_compressed_body_is_refused_clearly(engine: Engine) -> None:
    plain = json.dumps(event(points=1)).encode()
    for body in (plain, gzip.compress(plain)):
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        status, answer = await post(engine, body, headers=headers)
        assert status == 415
        assert answer["error"]["code"] == "unsupported_encoding"
        assert "uncompressed" in answer["error"]["message"]
    headers = {"Content-Type": "application/json", "Content-Encoding": "identity"}
    assert (await post(engine, plain, headers=headers))[0] == 202


# -- slow and idle connections --------------------------------------------------------------


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent until it closed the connection."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_an_idle_connection_is_closed(limited: Engine) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.http_port)
    try:
        assert await closed_within(reader, 15) == b""  # idle_timeout 1 s
    finally:
        writer.close()


async def test_headers_sent_slowly_are_cut_off(limited: Engine) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.http_port)
    request = b"POST /v1/events HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 40
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionError):  # a byte every 0.1 s would take 40 s
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
                if reader.at_eof():
                    raise ConnectionResetError
    finally:
        writer.close()
    assert time.monotonic() - started < 30


async def test_a_body_sent_slowly_gets_408(limited: Engine) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.http_port)
    try:
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n{"
        )
        await writer.drain()
        answer = b""
        for _ in range(100):  # a byte every 0.1 s: 20 s for the whole body
            if reader.at_eof():
                break
            writer.write(b" ")
            await writer.drain()
            try:
                answer += await asyncio.wait_for(reader.read(4096), 0.1)
            except TimeoutError:
                pass
        answer += await closed_within(reader, 15)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"body_timeout" in answer and b"1 seconds" in answer


async def test_a_good_request_on_a_kept_alive_connection_still_works(limited: Engine) -> None:
    url = f"http://127.0.0.1:{limited.http_port}/v1/events"
    async with aiohttp.ClientSession() as http:
        for n in range(3):
            async with http.post(url, json=event(n=n)) as r:
                assert r.status == 202


# -- tidegate serve: limits reach the worker; an aborted upload is one log line ----------


async def test_serve_limits_and_an_aborted_upload(tmp_path: Path) -> None:
    engine = EngineProcess(tmp_path / "serve.out", tmp_path / "data")
    engine.extra_args = ["--ingest-max-depth", "3", "--ingest-max-body-size", "5KB"]
    await asyncio.to_thread(engine.start)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(engine.ingest_url, json=event(**nested(4))) as r:
                assert r.status == 400
                assert "deeper than 3 levels" in (await r.json())["error"]["message"]
            async with http.post(engine.ingest_url, json=event(pad="x" * 6000)) as r:
                assert r.status == 413
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", engine.http_port)
            writer.write(
                b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 4000\r\n\r\n{"customer": "c1", '
            )
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
        async with aiohttp.ClientSession() as http:
            async with http.post(engine.ingest_url, json=event(points=1)) as r:
                assert r.status == 202  # the worker is still up
        await asyncio.sleep(0.5)
        output = engine.tail(200_000)
        assert output.count("ingest_upload_aborted") == 3, output
        assert "Traceback" not in output
    finally:
        await asyncio.to_thread(engine.close)


def test_serve_refuses_limits_it_cannot_keep(tmp_path: Path) -> None:
    engine = EngineProcess(tmp_path / "serve.out", tmp_path / "data")
    engine.extra_args = ["--ingest-max-depth", "500"]
    done = subprocess.run(engine.command(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "--ingest-max-depth must be from 1 to 200" in done.stderr


# -- the source catalog: what traffic can make it remember --------------------------------


async def test_the_source_catalog_remembers_a_bounded_number_of_names(engine: Engine) -> None:
    common = event(transaction_id="T1", total=9.5, currency="EUR")
    common["action"] = "checkout"
    assert (await post(engine, json.dumps(common).encode()))[0] == 202
    long_key = "L" * (MAX_NAME_LENGTH + 1)
    for n in range(3):  # 3,000 random keys on one action: it keeps 1,000
        flood = {f"r{n}-{i}": i for i in range(999)}
        flood[long_key] = 1  # accepted (at most 256), not remembered
        body = {"customer": "c1", "action": "checkout", "data": flood}
        assert (await post(engine, json.dumps(body).encode()))[0] == 202
    for n in range(25):  # 25,000 keys over 25 actions: 20,000 names in all
        body = {
            "customer": "c1",
            "action": f"flood{n:02}",
            "data": {f"k{i}": i for i in range(1000)},
        }
        assert (await post(engine, json.dumps(body).encode()))[0] == 202
    late = {"customer": "c1", "action": "late_action", "data": {"late_key": 1}}
    assert (await post(engine, json.dumps(late).encode()))[0] == 202

    seen = await engine.ingestor.seen_names()
    assert len(seen) == MAX_NAMES
    checkout = {s.name for s in seen if s.kind == "parameter" and s.parent == "checkout"}
    assert len(checkout) == MAX_NAMES_PER_GROUP
    assert {"transaction_id", "total", "currency"} <= checkout  # seen first, kept
    assert long_key not in checkout
    assert not any(s.name in ("late_action", "late_key") for s in seen)

    async with engine_client(engine) as client:
        first = await catalog_pb2_grpc.CatalogServiceStub(client.channel).ListSourceCatalog(
            catalog_pb2.ListSourceCatalogRequest(
                page_size=1000, kind=catalog_pb2.CATALOG_KIND_EVENT
            )
        )
    events = {e.name for e in first.entries}
    assert {"checkout", "flood00"} <= events

    # A restart counts what is stored: the caps still hold.
    reloaded = SeenNames()
    await reloaded.load(engine.db)
    again = {"customer": "c1", "action": "checkout", "data": {"another": 1, "total": 2}}
    assert reloaded.new_in(parse_request(again)) == set()


def test_the_readme_lists_every_ingest_flag_of_serve() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = [o for a in serve._actions for o in a.option_strings if o.startswith("--ingest-")]
    assert len(flags) > 15
    assert [f for f in flags if f"`{f}`" not in readme] == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"cus\r\nZZ\r\nxx\r\n0\r\n\r\n',
        b'Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\n{"cus\r\n0\r\n\r\n',
        b'Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\n{"cus\r\n0\r\nTrailer: x\r\n\r\n',
        b"Content-Length: -1\r\n\r\n{}",
        b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ],
)
async def test_a_malformed_body_framing_gets_a_400(engine: Engine, request_bytes: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", engine.http_port)
    try:
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + request_bytes
        )
        answer = await closed_within(reader, 15)
    finally:
        writer.close()
    assert answer[9:12] == b"400", answer[:200]
