"""One delivery contract, two backends: a Hypothesis state machine at the level where the
embedded engine and the JetStream path promise the same thing, events in and deliveries
out. Random sequences of acknowledged requests for a few customers, destination faults
(5xx, 429, a reset connection), time passing and restarts; at the end every acknowledged
event has been delivered and no customer's events were reordered among first deliveries
(the checker of ``tests.faultload``).

A restart is a graceful stop of the engine. Embedded, the same data folder starts again.
On JetStream, a new worker with a data folder of its own takes the partitions over (the
takeover path: epoch consumers, the redelivered suffix). The queue-level machine
(``tests/test_queue_properties.py``) still covers the lane barrier and crashes of the
local queue both backends share; SIGKILL of a worker or a node is covered by the fault
trials (``tests/test_broker_end_to_end.py``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from engine.app import Engine, EngineConfig
from engine.broker.cluster import LocalCluster
from engine.state.secrets import SECRET_KEY_ENV
from plugins.insider.sandbox import RunningSandbox, SandboxConfig, start_sandbox
from tests.conftest import embedded_config, engine_client
from tests.faultload import (
    API_KEY,
    CONNECTION_ID,
    PARTNER,
    SOURCE_EVENT,
    TARGET_EVENT,
    SandboxControl,
    check,
)
from tests.natscluster import nats_cluster
from tests.test_broker_cluster import reset_broker
from tests.test_broker_log import config

__all__ = ["nats_cluster"]

CUSTOMERS = st.sampled_from(["ana", "bo", "cy", "dee"])


class DeliveryContract(RuleBasedStateMachine):
    backend: ClassVar[str] = "embedded"
    cluster: ClassVar[LocalCluster | None] = None

    @initialize()
    def open(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="tidegate-contract-"))
        self.run_id = uuid.uuid4().hex[:8]
        self.sandbox: RunningSandbox = self._run(
            start_sandbox(config=SandboxConfig(partner_name=PARTNER, api_key=API_KEY))
        )
        self.control = SandboxControl(self.sandbox.url)
        self.key_before = os.environ.get(SECRET_KEY_ENV)
        if self.cluster is not None:
            self._run(reset_broker(self.cluster))
            # The workers of a cluster share one secret key (engine.broker.config_sync).
            os.environ[SECRET_KEY_ENV] = Fernet.generate_key().decode()
        self.generation = 0
        self.engine: Engine | None = self._run(self._start())
        self.acknowledged: dict[str, list[int]] = {}
        self.sent: dict[str, int] = {}

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _config(self, data_dir: Path) -> EngineConfig:
        if self.backend == "jetstream":
            assert self.cluster is not None
            return replace(config(data_dir, self.cluster, "all"), takeover_wait=0.3)
        return replace(embedded_config(data_dir), data_dir=data_dir)

    async def _start(self) -> Engine:
        if self.backend == "jetstream":  # another worker, with a folder of its own
            self.generation += 1
        data_dir = self.dir / f"data{self.generation}"
        # On JetStream only the first worker creates the connection: the later ones get
        # it from the cluster's configuration.
        first = not data_dir.exists() and self.generation <= 1
        engine = Engine(self._config(data_dir))
        await engine.start()
        if first:
            async with engine_client(engine) as client:
                await client.create_connection(
                    CONNECTION_ID,
                    api_key=API_KEY,
                    settings={"partner_name": PARTNER, "base_url": self.sandbox.url},
                )
                await client.create_event_mapping(
                    CONNECTION_ID,
                    SOURCE_EVENT,
                    TARGET_EVENT,
                    [("points", "points", True), ("seq", "seq", True)],
                )
        return engine

    @rule(customer=CUSTOMERS, count=st.integers(1, 6))
    def send(self, customer: str, count: int) -> None:
        name = f"{self.run_id}-{customer}"
        first = self.sent.get(name, 0) + 1
        seqs = list(range(first, first + count))
        self.sent[name] = seqs[-1]
        events = [
            {
                "customer": name,
                "action": SOURCE_EVENT,
                "id": f"{name}-{seq}",
                "data": {"points": 1, "seq": seq},
            }
            for seq in seqs
        ]
        assert self.engine is not None
        status = self._run(self._post(self.engine, events))
        assert status == 202
        self.acknowledged.setdefault(name, []).extend(seqs)

    @staticmethod
    async def _post(engine: Engine, events: list[dict[str, Any]]) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{engine.http_port}/v1/events", json={"events": events}
            ) as response,
        ):
            await response.read()
            return response.status

    @rule(status=st.sampled_from([500, 503, 429, 0]), count=st.integers(1, 30))
    def destination_fails(self, status: int, count: int) -> None:
        retry_after = "0" if status == 429 else None
        self._run(self.control.fault(status, count, retry_after=retry_after))

    @rule(seconds=st.sampled_from([0.1, 1.0, 2.5]))
    def time_passes(self, seconds: float) -> None:
        """The engine runs (delivers, acks) only while a rule awaits: let it."""
        self._run(asyncio.sleep(seconds))

    @rule()
    def restart(self) -> None:
        assert self.engine is not None
        self._run(self.engine.stop(grace=0.2))
        self.engine = None
        self.engine = self._run(self._start())

    def teardown(self) -> None:
        try:
            if self.engine is not None:
                report = self._run(self._settle())
                assert (report.missing, report.reordered, report.unexpected) == (0, 0, 0), (
                    report.summary() + "\n" + report.details()
                )
        finally:
            if self.engine is not None:
                self._run(self.engine.stop(grace=0.2))
            self._run(self.sandbox.close())
            self.loop.close()
            if self.key_before is None:
                os.environ.pop(SECRET_KEY_ENV, None)
            else:
                os.environ[SECRET_KEY_ENV] = self.key_before
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _settle(self) -> Any:
        deadline = time.monotonic() + 30
        while True:
            report = check(self.acknowledged, await self.control.delivered(), self.sent)
            if report.missing == 0 or time.monotonic() > deadline:
                return report
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("backend", ["embedded", "jetstream"])
def test_every_acknowledged_event_is_delivered_in_order_per_customer(
    backend: str, nats_cluster: LocalCluster
) -> None:
    machine = type(
        f"DeliveryContract_{backend}",
        (DeliveryContract,),
        {"backend": backend, "cluster": nats_cluster if backend == "jetstream" else None},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=6,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        ),
    )


@pytest.mark.parametrize("backend", ["embedded", "jetstream"])
def test_events_held_by_a_down_destination_survive_a_restart(
    backend: str, nats_cluster: LocalCluster
) -> None:
    """The sequence the machine finds only sometimes, run every time: events queued
    while the destination fails, time for the engine to pull (and, on JetStream, to be
    tempted to ack), a restart (a takeover by another worker), then delivery."""
    machine = type(
        f"DeliveryContract_{backend}",
        (DeliveryContract,),
        {"backend": backend, "cluster": nats_cluster if backend == "jetstream" else None},
    )()
    machine.open()
    machine.destination_fails(503, 30)
    machine.send("ana", 5)
    machine.time_passes(2.5)
    machine.restart()
    machine.teardown()
