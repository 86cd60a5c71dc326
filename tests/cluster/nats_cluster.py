"""A real NATS cluster with MQTT listeners: N nats-server processes on free ports, started and killed by the tests.

Why real processes: failover is about what a broker does when its node dies (routes drop, the
JetStream meta leader moves, MQTT sessions and retained messages live in replicated streams), so
each node is its own ``nats-server`` with its own JetStream store, killed with real signals. The
system NATS on 4222 is shared with other work and is never used.

NATS MQTT needs ``server_name`` and JetStream (it keeps sessions, QoS 1 messages awaiting
acknowledgement and retained messages in streams); a clustered JetStream needs a cluster name.
``stream_replicas`` is set to the cluster size (at most 3): see ``write_config``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from transport.mosquitto_process import free_port

NATS_SERVER = "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else (shutil.which("nats-server")
                                                                                         or "")
CLUSTER_NAME = "fleetlearn"


@dataclass
class NatsNode:
    """One node: its ports, its config file and JetStream store, and its process while it runs."""

    name: str
    directory: Path
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    replicas: int = 3
    process: subprocess.Popen | None = None
    log_path: Path = field(init=False)
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.directory / f"{self.name}.log"
        self.config_path = self.directory / f"{self.name}.conf"

    @property
    def url(self) -> str:
        """The node's MQTT listener, as the transport takes it."""
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self, routes: list[str]) -> None:
        store = self.directory / f"{self.name}-js"
        store.mkdir(exist_ok=True)
        self.config_path.write_text("\n".join([
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.client_port}",
            f"http: 127.0.0.1:{self.http_port}",
            f"log_file: \"{self.log_path}\"",
            f"jetstream {{ store_dir: \"{store}\" }}",
            "cluster {",
            f"  name: {CLUSTER_NAME}",
            f"  listen: 127.0.0.1:{self.cluster_port}",
            "  routes: [" + ", ".join(routes) + "]",
            "}",
            # every MQTT stream on all three nodes: by default NATS picks the replicas from the routes it
            # sees when the first MQTT client arrives (2 here, once), and a 2-replica stream that loses a
            # node has no quorum: sessions, retained messages and QoS 1 stall on every node
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port}, stream_replicas: {self.replicas} }}",
            "",
        ]))

    def start(self) -> None:
        self.process = subprocess.Popen([NATS_SERVER, "-c", str(self.config_path)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def signal(self, signum: int) -> None:
        if self.running:
            self.process.send_signal(signum)
            self.process.wait(15)

    def monitor(self, endpoint: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/{endpoint}", timeout=2) as response:
            return json.loads(response.read())

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


class NatsCluster:
    """``size`` nodes routed to each other, JetStream on, an MQTT listener each; ``start`` waits until all serve."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.nodes = [NatsNode(f"n{i + 1}", directory, free_port(), free_port(), free_port(), free_port(),
                               replicas=min(size, 3)) for i in range(size)]
        routes = [f"nats-route://127.0.0.1:{node.cluster_port}" for node in self.nodes]
        for node in self.nodes:
            node.write_config([r for r in routes if not r.endswith(f":{node.cluster_port}")])

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 60.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_formed(timeout)
        return self

    def wait_formed(self, timeout: float = 60.0) -> None:
        """Every running node routed to every other running one, a JetStream meta leader, MQTT answering on each."""
        deadline = time.monotonic() + timeout
        running = [node for node in self.nodes if node.running]
        problem = "not checked yet"
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None and node in running:
                    raise RuntimeError(f"nats-server {node.name} exited with {node.process.returncode}: {node.log()}")
            problem = self._formation_problem(running)
            if problem is None:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the NATS cluster did not form within {timeout} s: {problem}\n"
                           + "\n".join(f"--- {n.name}\n{n.log()[-3000:]}" for n in running))

    def _formation_problem(self, running: list[NatsNode]) -> str | None:
        for node in running:
            try:
                routes = node.monitor("routez").get("num_routes", 0)
                meta = node.monitor("jsz").get("meta_cluster", {})
            except OSError as exc:
                return f"{node.name} monitoring: {exc}"
            if routes < len(running) - 1:
                return f"{node.name} has {routes} routes of {len(running) - 1}"
            if not meta.get("leader"):
                return f"{node.name} sees no JetStream meta leader"
        for node in running:
            if not mqtt_answers(node.url):
                return f"{node.name} MQTT at {node.url} does not take a session yet"
        return None

    def kill(self, index: int) -> NatsNode:
        """SIGKILL node ``index``: its connections die without DISCONNECT, as a crashed machine's would."""
        node = self.nodes[index]
        node.signal(signal.SIGKILL)
        return node

    def restart(self, index: int, timeout: float = 60.0) -> NatsNode:
        node = self.nodes[index]
        node.start()
        self.wait_formed(timeout)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(15)
                except subprocess.TimeoutExpired:
                    node.signal(signal.SIGKILL)


def mqtt_answers(url: str, timeout: float = 5.0) -> bool:
    """A persistent-session QoS 1 subscribe is acknowledged: NATS has made its MQTT streams and can serve sessions."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_sdk.transport.mqtt import BrokerAddress

    address = BrokerAddress.parse(url)
    acknowledged = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:12]}", clean_session=True)
    client.on_subscribe = lambda *args: acknowledged.append(True)
    client.on_connect = lambda c, *args: c.subscribe("fleetlearn/probe", qos=1)
    try:
        client.connect(address.host, address.port, keepalive=10)
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    try:
        while not acknowledged and time.monotonic() < deadline:
            client.loop(0.1)
    finally:
        client.disconnect()
    return bool(acknowledged)
