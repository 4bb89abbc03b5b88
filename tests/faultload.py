"""Fault-injection harness: real ``tidegate serve`` and ``tidegate sandbox`` subprocesses,
a load generator that records what the engine acknowledged, and a checker that compares
it, per customer, with what the sandbox (the Insider stand-in) stored.

The load: Antavo ``point_add`` events posted in bulk (``{"events": [...]}``) to the
engine's ``/v1/events``. Every event has a unique ``id`` and carries its customer's
sequence number in ``data.seq`` (1, 2, 3, ... per customer); the connection maps ``seq``
as a custom event parameter, so the sandbox stores it with the event. Each worker owns a
disjoint set of customers and sends its requests one after the other, so a customer's
events are always sent in ``seq`` order. A request is *acknowledged* only when it got a
202. A request that fails (connection refused or reset by a killed engine, a timeout, a
503) is not acknowledged; the worker re-sends the same request, with the same event ids,
until it gets a 202, as Antavo re-sends a failed webhook; only then does it send that
customer's later events. When the load stops, a request still failing is abandoned: its
events may or may not arrive, and either is fine.

The checker rules, per customer (``check``):

* ``D``: the ``seq`` values of the customer's events in the order the sandbox stored them.
* missing: acknowledged seqs that never appear in ``D``. Must be zero.
* duplicates: ``len(D) - len(set(D))``, the stored events beyond the first of each seq.
  Allowed (at-least-once: a crash between send and settle, or a lost answer, re-sends a
  batch) and counted.
* reordered: keep only the first occurrence of each seq in ``D``; a seq is reordered when
  its first occurrence comes after the first occurrence of a greater seq. A repeated
  occurrence is never a reorder (it repeats what was already delivered, in order), so
  ``1 2 3 2 3 4`` is in order with 2 duplicates while ``1 3 2 4`` has 2 reordered.
  Must be zero. Unacknowledged seqs that arrived are judged the same way.
* unexpected: seqs in ``D`` the generator never sent. Must be zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from google.protobuf import field_mask_pb2

from clients.client import TidegateClient, read_token
from engine.pb import connections_pb2, logs_pb2

BIN = Path(sys.executable).parent
PARTNER = "faultload"
API_KEY = "faultload-key-0001"
CONNECTION_ID = "insider-fault"
SOURCE_EVENT = "point_add"
TARGET_EVENT = "points_earned"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}


class _Process:
    """A subprocess whose output is appended to ``log_path`` (a pipe nobody reads would
    stall a chatty process), started with a marker line so restarts are easy to find."""

    name = "process"

    def __init__(self, log_path: Path, ports: Sequence[int]) -> None:
        self.log_path = log_path
        self.ports = list(ports)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 20.0, attempts: int = 25) -> None:
        """Starts and waits until every port listens. A start that exits early (a port
        still busy right after a kill) is retried on the same ports."""
        for _ in range(attempts):
            self.starts += 1
            with self.log_path.open("ab") as out:
                out.write(f"--- faultload: {self.name} start #{self.starts} ---\n".encode())
                out.flush()
                self.process = subprocess.Popen(
                    self.command(), env=_env(), stdout=out, stderr=subprocess.STDOUT
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if all(listening(p) for p in self.ports):
                    return
                time.sleep(0.02)
            else:
                self.kill()
                raise AssertionError(
                    f"{self.name} not listening on {self.ports} after {timeout} s:\n" + self.tail()
                )
            output = self.tail().rsplit("--- faultload:", 1)[-1]
            if not any(m in output.lower() for m in ("address already in use", "cannot bind")):
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:{output}")
            time.sleep(0.2)  # a port is still busy right after a kill: retry on it
        raise AssertionError(f"{self.name} would not start after {attempts} tries:\n{self.tail()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; returns (exit code or None if still running after ``timeout``, seconds)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def close(self) -> None:
        """For fixture teardown: SIGTERM, then SIGKILL if it will not stop."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


class SandboxProcess(_Process):
    """``tidegate sandbox`` on its own port: it outlives engine kills."""

    name = "sandbox"

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(log_path, [self.port])
        self.url = f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        return [
            str(BIN / "tidegate"),
            "sandbox",
            "--port",
            str(self.port),
            "--partner-name",
            PARTNER,
            "--api-key",
            API_KEY,
        ]


class EngineProcess(_Process):
    """``tidegate serve`` on fixed ports and one data directory, across restarts."""

    name = "engine"

    def __init__(self, log_path: Path, data_dir: Path) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        super().__init__(log_path, [self.grpc_port, self.http_port, self.metrics_port])
        self.data_dir = data_dir
        self.target = f"{HOST}:{self.grpc_port}"
        DATA_DIRS[self.target] = data_dir
        self.ingest_url = f"http://{HOST}:{self.http_port}/v1/events"
        self.metrics_url = f"http://{HOST}:{self.metrics_port}/metrics"
        self.extra_args: list[str] = []  # more ``serve`` options, from the next start on

    def command(self) -> list[str]:
        return [
            str(BIN / "tidegate"),
            "--log-format",
            "json",
            "serve",
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--metrics-port",
            str(self.metrics_port),
            "--ui-port",
            "0",
            "--data-dir",
            str(self.data_dir),
            # Short retries: an outage of seconds then sees dozens of attempts, as a long
            # outage does with the production defaults, and recovery shows at once.
            "--retry-base-seconds",
            "0.05",
            "--retry-max-seconds",
            "0.25",
            "--allow-destination",
            HOST,
            *self.extra_args,
        ]


# -- the sandbox's control endpoints ----------------------------------------------------


class SandboxControl:
    """Fault injection and read-back over the sandbox's ``/sandbox/`` endpoints."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                self.url + path,
                json=body,
                timeout=aiohttp.ClientTimeout(total=30),
            ) as response,
        ):
            payload = await response.json()
            assert response.status == 200, (method, path, body, response.status, payload)
            return payload

    async def fault(
        self,
        status: int,
        count: int = 1,
        *,
        retry_after: str | None = None,
        apply: bool = False,
    ) -> None:
        """Queues ``count`` answers of ``status`` (0: the connection is reset)."""
        body: dict[str, Any] = {"status": status, "count": count, "apply": apply}
        if retry_after is not None:
            body["retry_after"] = retry_after
        await self._call("POST", "/sandbox/faults", body)

    async def clear_faults(self) -> None:
        await self._call("DELETE", "/sandbox/faults")

    async def pending_faults(self) -> int:
        """Answers still queued (a fault's remaining count)."""
        faults = (await self._call("GET", "/sandbox/faults"))["faults"]
        return sum(int(f["remaining"]) for f in faults)

    async def answered(self, status: int) -> int:
        """How many /api requests the sandbox answered with ``status`` so far."""
        return sum(1 for r in await self.requests() if r["status"] == status)

    async def configure(self, **changes: Any) -> None:
        await self._call("POST", "/sandbox/config", changes)

    async def users(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/sandbox/users"))["users"])

    async def requests(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/sandbox/requests"))["requests"])

    async def delivered(self) -> dict[str, list[int]]:
        """Per customer (its uuid), the ``seq`` of every stored event, in stored order."""
        return delivered_seqs(await self.users())


def delivered_seqs(users: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    result: dict[str, list[int]] = {}
    for user in users:
        uuid = user["identifiers"].get("uuid")
        seqs = result.setdefault(str(uuid), [])
        for event in user["events"]:
            if event.get("event_name") != TARGET_EVENT:
                continue
            seqs.append(int(event["event_params"]["custom"]["seq"]))
    return result


# -- the admin API ----------------------------------------------------------------------

DATA_DIRS: dict[str, Path] = {}
"""The data folder of each engine's admin address, for its admin token."""


def admin_client(target: str) -> TidegateClient:
    """A client with the admin token the engine at ``target`` wrote to its data folder."""
    return TidegateClient(target, read_token(DATA_DIRS[target]))


async def create_connection(target: str, sandbox_url: str, api_key: str = API_KEY) -> None:
    """The connection under test: customers identified by uuid, point_add mapped with
    ``points`` and ``seq`` as custom parameters. It persists across engine restarts."""
    async with admin_client(target) as client:
        await client.create_connection(
            CONNECTION_ID,
            api_key=api_key,
            settings={"partner_name": PARTNER, "base_url": sandbox_url},
        )
        await client.create_event_mapping(
            CONNECTION_ID,
            SOURCE_EVENT,
            TARGET_EVENT,
            [("points", "points", True), ("seq", "seq", True)],
        )


async def get_connection(target: str) -> connections_pb2.Connection:
    """GetConnection, retried while the engine is (re)starting."""
    deadline = time.monotonic() + 20
    while True:
        try:
            async with admin_client(target) as client:
                return await client.get_connection(CONNECTION_ID)
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def update_api_key(target: str, api_key: str) -> connections_pb2.Connection:
    async with admin_client(target) as client:
        response = await client.connections.UpdateConnection(
            connections_pb2.UpdateConnectionRequest(
                connection=connections_pb2.Connection(id=CONNECTION_ID, api_key=api_key),
                update_mask=field_mask_pb2.FieldMask(paths=["api_key"]),
            )
        )
        return response.connection


async def list_logs(target: str, **filters: Any) -> list[logs_pb2.LogEntry]:
    """Every outbound-log row of the connection that matches ``filters`` (all pages)."""
    entries: list[logs_pb2.LogEntry] = []
    token = ""
    async with admin_client(target) as client:
        while True:
            page = await client.list_logs(
                page_size=1000, page_token=token, connection_id=CONNECTION_ID, **filters
            )
            entries.extend(page.logs)
            token = page.next_page_token
            if not token:
                return entries


async def wait_drained(
    target: str, within: float, sandbox: SandboxControl | None = None
) -> connections_pb2.Connection:
    """Waits until the connection's queue is empty; fails with its state otherwise."""
    deadline = time.monotonic() + within
    while True:
        connection = await get_connection(target)
        if connection.queue_depth == 0:
            return connection
        if time.monotonic() > deadline:
            pending = await sandbox.requests() if sandbox else []
            raise AssertionError(
                f"queue not drained within {within} s: depth {connection.queue_depth}, "
                f"state {connections_pb2.ConnectionState.Name(connection.state)} "
                f"{connection.state_reason!r}, dead letters {connection.dead_letter_count}, "
                f"sandbox requests {len(pending)}, last statuses "
                f"{[r['status'] for r in pending[-10:]]}"
            )
        await asyncio.sleep(0.2)


# -- the load generator -----------------------------------------------------------------


@dataclass
class LoadStats:
    requests: int = 0
    """Request attempts, including re-sends."""
    acknowledged_requests: int = 0
    failed_attempts: int = 0
    abandoned_requests: int = 0
    engine_duplicates: int = 0
    """Events the engine answered as already stored: re-sends whose first try committed."""
    outcomes: Counter[str] = field(default_factory=Counter)


class LoadGenerator:
    """Posts ``batch``-event bulk requests from ``workers`` concurrent senders until
    ``stop``; ``acknowledged`` maps each customer to the seqs whose request got a 202.

    Each worker owns ``customers // workers`` customers. With ``churn``, every request
    of a worker brings that many new customers, and its events go to the worker's
    ``customers // workers`` newest ones: customers come and go, as in real traffic.
    """

    def __init__(
        self,
        ingest_url: str,
        *,
        customers: int = 20,
        workers: int = 4,
        batch: int = 50,
        pause: float = 0.0,
        churn: int = 0,
        run_id: str = "run",
        timeout: float = 10.0,
    ) -> None:
        assert customers >= workers >= 1
        self.ingest_url = ingest_url
        self.window = customers // workers
        self.workers = workers
        self.batch = batch
        self.pause = pause
        self.churn = churn
        self.run_id = run_id
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.acknowledged: dict[str, list[int]] = {}
        self.sent: dict[str, int] = {}
        self.stats = LoadStats()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pools = [[self._new_customer(w) for _ in range(self.window)] for w in range(workers)]

    def _new_customer(self, worker: int) -> str:
        name = f"{self.run_id}-w{worker}-c{len(self.sent):05d}"
        self.acknowledged[name] = []
        self.sent[name] = 0
        return name

    @property
    def customers(self) -> list[str]:
        return list(self.sent)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(self.workers)]

    async def stop(self) -> None:
        """Stops sending; a request still failing is abandoned after its current try."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    @property
    def acknowledged_events(self) -> int:
        return sum(len(seqs) for seqs in self.acknowledged.values())

    async def wait_acknowledged(self, events: int, within: float = 30.0) -> None:
        """Waits until at least ``events`` more events are acknowledged than now."""
        target = self.acknowledged_events + events
        deadline = time.monotonic() + within
        while self.acknowledged_events < target:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"load acknowledged {self.acknowledged_events} of {target} events"
                    f" within {within} s: {dict(self.stats.outcomes)}"
                )
            await asyncio.sleep(0.02)

    def _next_batch(self, worker: int) -> list[dict[str, Any]]:
        pool = self._pools[worker]
        pool.extend(self._new_customer(worker) for _ in range(self.churn))
        customers = pool[-self.window :]
        events = []
        for i in range(self.batch):
            customer = customers[i % len(customers)]
            self.sent[customer] += 1
            seq = self.sent[customer]
            events.append(
                {
                    "customer": customer,
                    "action": SOURCE_EVENT,
                    "id": f"{customer}-{seq}",
                    "data": {"points": 1, "seq": seq},
                }
            )
        return events

    async def _worker(self, worker: int) -> None:
        # force_close: a killed engine must not leave a dead keep-alive socket behind.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=self.timeout) as session:
            while not self._stopping.is_set():
                events = self._next_batch(worker)
                while True:
                    self.stats.requests += 1
                    outcome, body = await self._post(session, events)
                    self.stats.outcomes[outcome] += 1
                    if outcome == "202":
                        self.stats.acknowledged_requests += 1
                        self.stats.engine_duplicates += int(body.get("duplicates", 0))
                        for event in events:
                            self.acknowledged[event["customer"]].append(event["data"]["seq"])
                        break
                    self.stats.failed_attempts += 1
                    if self._stopping.is_set():
                        self.stats.abandoned_requests += 1
                        break
                    await asyncio.sleep(0.05)
                if self.pause:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self.pause)

    async def _post(
        self, session: aiohttp.ClientSession, events: list[dict[str, Any]]
    ) -> tuple[str, dict[str, Any]]:
        try:
            async with session.post(self.ingest_url, json={"events": events}) as response:
                if response.status == 202:
                    return "202", await response.json()
                await response.read()
                return str(response.status), {}
        except TimeoutError:
            return "timeout", {}
        except aiohttp.ClientError as exc:
            return exc.__class__.__name__, {}


# -- the checker ------------------------------------------------------------------------


@dataclass
class CustomerCheck:
    customer: str
    acknowledged: int
    delivered: int
    missing: list[int]
    reordered: list[int]
    duplicates: int
    unexpected: list[int]


@dataclass
class CheckReport:
    customers: list[CustomerCheck]

    @property
    def acknowledged(self) -> int:
        return sum(c.acknowledged for c in self.customers)

    @property
    def delivered(self) -> int:
        return sum(c.delivered for c in self.customers)

    @property
    def missing(self) -> int:
        return sum(len(c.missing) for c in self.customers)

    @property
    def reordered(self) -> int:
        return sum(len(c.reordered) for c in self.customers)

    @property
    def duplicates(self) -> int:
        return sum(c.duplicates for c in self.customers)

    @property
    def unexpected(self) -> int:
        return sum(len(c.unexpected) for c in self.customers)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.reordered == 0 and self.unexpected == 0

    def summary(self) -> str:
        return (
            f"acknowledged={self.acknowledged} delivered={self.delivered} "
            f"missing={self.missing} reordered={self.reordered} "
            f"duplicates={self.duplicates} unexpected={self.unexpected}"
        )

    def details(self, limit: int = 8) -> str:
        """The first problems per customer, for an assertion message."""
        lines = [self.summary()]
        for c in self.customers:
            if c.missing or c.reordered or c.unexpected:
                lines.append(
                    f"  {c.customer}: acknowledged {c.acknowledged}, delivered {c.delivered},"
                    f" missing {_runs(c.missing)[:limit]}, reordered {c.reordered[:limit]},"
                    f" unexpected {c.unexpected[:limit]}, duplicates {c.duplicates}"
                )
        return "\n".join(lines)


def _runs(values: Sequence[int]) -> list[str]:
    """``[1, 2, 3, 7]`` as ``["1-3", "7"]``."""
    runs: list[str] = []
    start = prev = None
    for v in sorted(values):
        if prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            runs.append(f"{start}-{prev}" if start != prev else str(start))
        start = prev = v
    if start is not None:
        runs.append(f"{start}-{prev}" if start != prev else str(start))
    return runs


def check_customer(
    customer: str, acknowledged: Sequence[int], delivered: Sequence[int], sent: int
) -> CustomerCheck:
    """Applies the module's rules to one customer; ``sent`` is the highest seq sent."""
    present = set(delivered)
    missing = [s for s in acknowledged if s not in present]
    reordered: list[int] = []
    seen: set[int] = set()
    highest = 0
    for s in delivered:
        if s in seen:
            continue  # a repeat: a duplicate, never a reorder
        seen.add(s)
        if s < highest:
            reordered.append(s)
        highest = max(highest, s)
    unexpected = sorted(s for s in present if not 1 <= s <= sent)
    return CustomerCheck(
        customer=customer,
        acknowledged=len(acknowledged),
        delivered=len(delivered),
        missing=missing,
        reordered=reordered,
        duplicates=len(delivered) - len(present),
        unexpected=unexpected,
    )


def check(
    acknowledged: Mapping[str, Sequence[int]],
    delivered: Mapping[str, Sequence[int]],
    sent: Mapping[str, int] | None = None,
) -> CheckReport:
    """Compares what was acknowledged with what was delivered, per customer. Customers
    that were delivered to but never sent to count every delivered seq as unexpected."""
    sent = sent or {c: max(seqs, default=0) for c, seqs in acknowledged.items()}
    customers = sorted(set(acknowledged) | set(delivered))
    return CheckReport(
        [
            check_customer(c, acknowledged.get(c, ()), delivered.get(c, ()), sent.get(c, 0))
            for c in customers
        ]
    )


async def check_load(load: LoadGenerator, sandbox: SandboxControl) -> CheckReport:
    return check(load.acknowledged, await sandbox.delivered(), load.sent)


# -- the whole setup --------------------------------------------------------------------


class Harness:
    """A sandbox and an engine as subprocesses, output in ``tmp_path``, for one test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.sandbox = SandboxProcess(tmp_path / "sandbox.out")
        self.engine = EngineProcess(tmp_path / "serve.out", tmp_path / "data")
        self.control = SandboxControl(self.sandbox.url)

    def start(self) -> None:
        self.sandbox.start()
        self.engine.start()

    async def create_connection(self, api_key: str = API_KEY) -> None:
        await create_connection(self.engine.target, self.sandbox.url, api_key)

    def load(self, **kwargs: Any) -> LoadGenerator:
        return LoadGenerator(self.engine.ingest_url, **kwargs)

    async def restart_engine(self) -> None:
        await asyncio.to_thread(self.engine.start)

    async def kill_engine(self) -> None:
        await asyncio.to_thread(self.engine.kill)

    def close(self) -> None:
        self.engine.close()
        self.sandbox.close()
