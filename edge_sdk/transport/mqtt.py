"""The MQTT transport: one paho-mqtt 2.x connection, driven by an ``MqttLoop``.

Why these choices:
- MQTT 3.1.1 by default, because the whole protocol must run on it (amqtt, the embedded broker,
  refuses MQTT 5). ``protocol="5"`` adds message expiry and user properties to every publish and
  a session expiry interval to the connect; nothing depends on them.
- QoS 1 and a persistent session (``clean_session=False`` / ``clean_start=False``): the broker
  keeps a device's subscriptions and queues QoS 1 messages for it while it is away, as Mosquitto
  documents. Delivery is still not guaranteed (a full queue drops), which is why
  ``edge_sdk.transport.reliable`` adds receipts on top.
- A retained last will ``offline`` on the status topic, and a retained ``online`` after every
  connect, so the aggregator learns of a dropout the moment the broker notices the socket died.
- Reconnection with exponential backoff and full jitter, so a restarted broker is not hit by the
  whole fleet in the same millisecond; every connect resubscribes.
- Failover: ``url`` may list several nodes of one broker cluster (``URL,URL,...``). A lost or
  refused connection moves to the next node, round robin, after the backoff (which grows once
  per full turn over the nodes, so a dead node costs one short wait, not a long one); the new
  connection carries the same last will, resubscribes and says ``online`` again. A cluster that
  replicates sessions (NATS JetStream, EMQX) keeps the QoS 1 queue; one that does not (two
  unbridged Mosquittos) loses it, which the receipts and the round's abort-and-retry absorb.
- ``on_message`` only appends to a queue: decoding, signature checks and training happen in the
  caller's ``poll``, never inside paho's network callbacks.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_sdk.errors import ConfigError
from edge_sdk.transport.base import TransportError
from edge_sdk.transport.event_loop import MqttLoop

log = logging.getLogger(__name__)

QOS = 1
STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
_SCHEMES = {"mqtt": (False, 1883), "mqtts": (True, 8883)}
_PROTOCOLS = {"3.1.1": MQTTProtocolVersion.MQTTv311, "5": MQTTProtocolVersion.MQTTv5}


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens, parsed from ``mqtt://host:port`` or ``mqtts://host:port``."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://, got {parts.scheme!r}")
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r} has no host; write e.g. mqtt://localhost:1883")
        tls, default_port = _SCHEMES[parts.scheme]
        try:
            port = parts.port or default_port
        except ValueError:
            raise ConfigError(f"broker URL {url!r}: the port must be a number from 1 to 65535") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"broker URL {url!r}: only scheme://[user:password@]host:port is understood")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, tls, username, password)


def parse_broker_urls(text: str) -> tuple[str, ...]:
    """``URL[,URL...]``: the nodes of one broker cluster, in the order the transport tries them.

    All must be ``mqtt://`` or all ``mqtts://``: one client has one TLS set-up for every node.
    """
    urls = tuple(part.strip() for part in text.split(","))
    if not urls or any(not url for url in urls):
        raise ConfigError(f"broker URL list {text!r} has an empty entry; write URL or URL,URL,... without blanks")
    schemes = {BrokerAddress.parse(url).tls for url in urls}
    if len(schemes) > 1:
        raise ConfigError(f"broker URL list {text!r} mixes mqtt:// and mqtts://; every node must use the same one")
    return urls


@dataclass(frozen=True)
class ReconnectBackoff:
    """Exponential backoff with jitter: attempt n waits up to min(maximum, initial * multiplier^n)."""

    initial_s: float = 0.5
    maximum_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5  # fraction of the delay drawn at random, so a fleet does not reconnect in step

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.maximum_s) or self.multiplier < 1 or not (0 <= self.jitter <= 1):
            raise ConfigError(
                f"reconnect backoff needs 0 < initial_s <= maximum_s, multiplier >= 1 and 0 <= jitter <= 1; got {self}"
            )

    def delay(self, attempt: int, draw: float) -> float:
        """The wait before reconnect ``attempt`` (0-based); ``draw`` is uniform in [0, 1)."""
        ceiling = min(self.maximum_s, self.initial_s * self.multiplier ** min(attempt, 64))
        return ceiling * (1.0 - self.jitter * draw)


@dataclass(frozen=True, repr=False)
class MqttSettings:
    """Everything one connection needs; ``password`` is never shown in a repr."""

    url: str  # one broker URL, or several nodes of one cluster: "URL,URL,..." (failover, round robin)
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate for mTLS
    key_file: str | None = None
    protocol: str = "3.1.1"
    keepalive_s: int = 60
    persistent_session: bool = True
    session_expiry_s: int = 24 * 3600  # MQTT 5: how long the broker keeps the session while we are away
    message_expiry_s: int | None = None  # MQTT 5: the broker discards undelivered messages after this
    user_properties: tuple[tuple[str, str], ...] = ()  # MQTT 5: added to every publish
    status_topic: str | None = None  # retained "online"; last will "offline"
    connect_timeout_s: float = 5.0
    max_inflight: int = 20
    backoff: ReconnectBackoff = field(default_factory=ReconnectBackoff)

    def __post_init__(self) -> None:
        if self.protocol not in _PROTOCOLS:
            raise ConfigError(f"MQTT protocol must be one of {sorted(_PROTOCOLS)}, got {self.protocol!r}")
        if not self.client_id or len(self.client_id.encode()) > 128:
            raise ConfigError(f"MQTT client id must be 1 to 128 bytes, got {self.client_id!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("mTLS needs both cert_file and key_file (or neither)")
        if self.keepalive_s < 5:
            raise ConfigError(f"keepalive_s must be at least 5 s, got {self.keepalive_s}")
        urls = parse_broker_urls(self.url)
        if (self.cert_file or self.ca_file) and not BrokerAddress.parse(urls[0]).tls:
            raise ConfigError(f"TLS files given but the broker URL {self.url!r} is not mqtts://")

    @property
    def urls(self) -> tuple[str, ...]:
        """The broker nodes, in failover order."""
        return parse_broker_urls(self.url)

    def __repr__(self) -> str:
        return f"MqttSettings(url={self.url!r}, client_id={self.client_id!r}, protocol={self.protocol!r})"


class MqttTransport:
    """A ``Transport`` over one MQTT connection; many of them may share one ``MqttLoop``.

    Without a ``loop`` argument the transport makes its own, so ``poll`` alone drives it.
    Publishing while disconnected is fine: paho keeps QoS 1 messages and sends them after the
    next connect.
    """

    def __init__(self, settings: MqttSettings, loop: MqttLoop | None = None, *, rng: random.Random | None = None):
        self.settings = settings
        self._addresses = tuple(BrokerAddress.parse(url) for url in settings.urls)
        self._node = 0  # index of the node the client is pointed at
        self._address = self._addresses[0]
        self._owns_loop = loop is None
        self._loop = loop if loop is not None else MqttLoop()
        self._rng = rng or random.Random()
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._patterns: list[str] = []
        self._pending_subscriptions: set[int] = set()
        self._subscription_mids: dict[int, str] = {}  # SUBSCRIBE mid -> its pattern, to retry a refused one
        self._refused: dict[str, tuple[int, float]] = {}  # pattern -> (refusals in a row, when to subscribe again)
        self._unacknowledged: set[int] = set()
        self._attempt = 0
        self._polled_at_pass = 0
        self._closing = False
        self._closed = False
        self._connected = False
        self.last_error: str | None = None
        self.connects = 0
        self.failovers = 0  # times the transport moved to another node
        # called after every connect but the first, once subscriptions are re-sent: a broker that restarted
        # without persistence lost the retained messages, which only their publisher can put back
        self.on_reconnect: Callable[[], None] | None = None
        self._client = self._make_client()
        self._loop.attach(self)
        self._try_connect()

    # -- Transport -------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Queue a QoS 1 publish; returns its message id, for ``left``."""
        if self._closing:
            raise TransportError(f"MQTT transport {self.settings.client_id!r} is closed; open a new one")
        info = self._client.publish(topic, payload, qos=QOS, retain=retain, properties=self._publish_properties())
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(
                f"MQTT client {self.settings.client_id!r}: outgoing queue full (65535 messages awaiting PUBACK); "
                "poll the loop so the broker can acknowledge them"
            )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(f"MQTT publish on {topic!r} failed: {paho.error_string(info.rc)}")
        self._unacknowledged.add(info.mid)
        return info.mid

    def left(self, mid: int) -> bool:
        """The broker acknowledged publish ``mid``: it is no longer waiting in this client's own queue."""
        return mid not in self._unacknowledged

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        """What arrived; ``poll(0)`` right after a pass of the shared loop takes that pass's reading."""
        fresh = timeout <= 0 and self._loop.passes != self._polled_at_pass  # the loop read every socket since
        if not self._inbox and not fresh:
            self._loop.run(timeout, until=lambda: bool(self._inbox))
        self._polled_at_pass = self._loop.passes
        received = list(self._inbox)
        self._inbox.clear()
        return received

    def subscribe(self, pattern: str) -> None:
        if self._closing:
            raise TransportError(f"MQTT transport {self.settings.client_id!r} is closed")
        if pattern in self._patterns:
            return
        self._patterns.append(pattern)
        if self._connected:
            self._send_subscribe(pattern)

    def close(self, timeout: float = 2.0) -> None:
        """Say ``offline`` (a clean disconnect suppresses the will), flush, disconnect."""
        if self._closed:
            return
        if self._connected and self.settings.status_topic:
            self.publish(self.settings.status_topic, STATUS_OFFLINE, retain=True)
        self._closing = True
        if self._connected:
            self._loop.run(timeout, until=lambda: not self._unacknowledged)
            self._client.disconnect()
            self._loop.run(0.0)
        self._closed = True
        self._connected = False
        self._client._sock_close()  # noqa: SLF001 - paho has no public close for a never-looped client
        self._loop.detach(self)
        if self._owns_loop:
            self._loop.close()

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a crash or a lost network would: the broker publishes the will.

        For fault injection (the simulator); ``close`` is the clean way out. The transport is closed after it.
        """
        if self._closed:
            return
        self._closing = True
        self._closed = True
        self._connected = False
        self._client._sock_close()  # noqa: SLF001 - no DISCONNECT packet: that is the point
        self._loop.detach(self)
        if self._owns_loop:
            self._loop.close()

    # -- state the caller may wait on ----------------------------------------------------------

    @property
    def loop(self) -> MqttLoop:
        return self._loop

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def node_url(self) -> str:
        """The broker node this transport is connected (or connecting) to."""
        return self.settings.urls[self._node]

    @property
    def ready(self) -> bool:
        """Connected with every subscription acknowledged: messages published now will reach us."""
        return self._connected and not self._pending_subscriptions and not self._refused

    @property
    def has_input(self) -> bool:
        """Messages wait in the inbox: a ``poll`` now returns them without touching the socket."""
        return bool(self._inbox)

    @property
    def unacknowledged(self) -> int:
        """QoS 1 messages published but not yet PUBACKed by the broker."""
        return len(self._unacknowledged)

    def wait_ready(self, timeout: float) -> bool:
        return self._loop.run(timeout, until=lambda: self.ready)

    def flush(self, timeout: float) -> bool:
        """Drive the loop until the broker acknowledged everything published so far."""
        return self._loop.run(timeout, until=lambda: not self._unacknowledged)

    # -- paho client set-up ----------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=_PROTOCOLS[s.protocol],
            clean_session=None if v5 else not s.persistent_session,
        )
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        client.suppress_exceptions = False
        self._set_credentials(client)
        if self._address.tls:
            context = ssl.create_default_context(cafile=s.ca_file)
            if s.cert_file and s.key_file:
                context.load_cert_chain(s.cert_file, s.key_file)
            client.tls_set_context(context)
        if s.status_topic:
            client.will_set(s.status_topic, STATUS_OFFLINE, qos=QOS, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        connect_properties = None
        if v5:
            connect_properties = Properties(PacketTypes.CONNECT)
            connect_properties.SessionExpiryInterval = s.session_expiry_s if s.persistent_session else 0
        client.connect_timeout = s.connect_timeout_s
        self._connect_properties = connect_properties
        self._point_at(client, self._address)
        return client

    def _set_credentials(self, client: paho.Client) -> None:
        s = self.settings
        username = s.username if s.username is not None else self._address.username
        password = s.password if s.password is not None else self._address.password
        if username is not None:
            client.username_pw_set(username, password)

    def _point_at(self, client: paho.Client, address: BrokerAddress) -> None:
        """Aim the (disconnected) client at ``address``; paho's connect_async is the public way to change host."""
        s = self.settings
        client.connect_async(
            address.host,
            address.port,
            keepalive=s.keepalive_s,
            clean_start=not s.persistent_session if s.protocol == "5" else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=self._connect_properties,
        )

    def _move_to_next_node(self) -> None:
        """Round robin over the nodes: the next connect attempt (``_try_connect``) goes to the next one."""
        self._node = (self._node + 1) % len(self._addresses)
        self._address = self._addresses[self._node]
        self.failovers += 1

    def _publish_properties(self) -> Properties | None:
        s = self.settings
        if s.protocol != "5" or (s.message_expiry_s is None and not s.user_properties):
            return None
        properties = Properties(PacketTypes.PUBLISH)
        if s.message_expiry_s is not None:
            properties.MessageExpiryInterval = s.message_expiry_s
        if s.user_properties:
            properties.UserProperty = list(s.user_properties)
        return properties

    def _send_subscribe(self, pattern: str) -> None:
        rc, mid = self._client.subscribe(pattern, qos=QOS)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subscriptions.add(mid)
            self._subscription_mids[mid] = pattern

    def _retry_refused_subscriptions(self) -> None:
        """Subscribe again to every refused pattern whose backoff has run out."""
        if not self._connected or self._closing:
            return
        now = time.monotonic()
        for pattern, (refusals, due) in list(self._refused.items()):
            if now >= due:
                log.info("MQTT %s: subscribing to %r again (refused %d time(s))", self.settings.client_id, pattern,
                         refusals)
                self._refused[pattern] = (refusals, float("inf"))  # until its SUBACK answers
                self._send_subscribe(pattern)

    def _try_connect(self) -> None:
        if (self._client.host, self._client.port) != (self._address.host, self._address.port):
            # re-aimed here, outside paho's callbacks, where the client is between connections
            self._set_credentials(self._client)
            self._point_at(self._client, self._address)
            log.info("MQTT %s: failing over to %s", self.settings.client_id, self.node_url)
        try:
            self._client.reconnect()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.last_error = f"connect to {self._address.host}:{self._address.port} failed: {exc}"
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._closing:
            return
        nodes = len(self._addresses)
        delay = self.settings.backoff.delay(self._attempt // nodes, self._rng.random())  # grows once per turn
        self._attempt += 1
        if nodes > 1:
            self._move_to_next_node()
        log.info("MQTT %s: %s; reconnecting to %s in %.2f s", self.settings.client_id, self.last_error,
                 self.node_url, delay)
        self._loop.schedule_reconnect(self, delay)

    # -- paho callbacks: bookkeeping only ------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.warning("MQTT %s: %s", self.settings.client_id, self.last_error)
            return  # the broker closes the socket; _on_disconnect schedules the retry
        self._connected = True
        self._attempt = 0
        self.connects += 1
        self.last_error = None
        self._pending_subscriptions.clear()
        self._subscription_mids.clear()
        self._refused = {p: (n, float("inf")) for p, (n, _) in self._refused.items()}  # sent again below
        for pattern in self._patterns:
            self._send_subscribe(pattern)
        if self.settings.status_topic:
            self.publish(self.settings.status_topic, STATUS_ONLINE, retain=True)
        if self.connects > 1 and self.on_reconnect is not None:
            self.on_reconnect()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected = False
        if self._closing:
            return
        if self.last_error is None or "refused" not in self.last_error:
            self.last_error = f"connection lost: {reason}"
        self._schedule_reconnect()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._inbox.append((message.topic, message.payload))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._unacknowledged.discard(mid)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        # Why retry: a refusal may be transient (NATS answers 0x80 when creating the subscription's
        # JetStream consumer times out on a loaded cluster); a device that silently lacks its plan or
        # down subscription would never take part again until it reconnected.
        self._pending_subscriptions.discard(mid)
        pattern = self._subscription_mids.pop(mid, None)
        failed = [r for r in reasons if r.is_failure]
        if not failed:
            if pattern is not None and self._refused.pop(pattern, None) is not None:
                log.info("MQTT %s: subscribed to %r after all", self.settings.client_id, pattern)
            return
        self.last_error = f"broker refused a subscription: {failed[0]}"
        if pattern is None:
            log.warning("MQTT %s: %s", self.settings.client_id, self.last_error)
            return
        refusals = self._refused.get(pattern, (0, 0.0))[0] + 1
        delay = self.settings.backoff.delay(refusals - 1, self._rng.random())
        self._refused[pattern] = (refusals, time.monotonic() + delay)
        log.warning("MQTT %s: broker refused the subscription to %r (%s); subscribing again in %.2f s",
                    self.settings.client_id, pattern, failed[0], delay)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # MQTT's small packets (PUBACKs, receipts) must not wait for Nagle + delayed ACK: 88 ms per round trip here
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.watch_socket(sock, self)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.forget_socket(sock)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.want_write(sock, True)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.want_write(sock, False)

    # -- LoopConnection: called by MqttLoop ----------------------------------------------------

    def handle_readable(self) -> None:
        self._client.loop_read()

    def handle_writable(self) -> None:
        self._client.loop_write()

    def handle_misc(self) -> None:
        self._client.loop_misc()
        if self._refused:
            self._retry_refused_subscriptions()

    def handle_reconnect_due(self) -> None:
        if not self._closing and not self._connected:
            self._try_connect()

    @property
    def may_buffer_input(self) -> bool:
        return self._address.tls

    def has_buffered_input(self) -> bool:
        sock = self._client.socket()
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
