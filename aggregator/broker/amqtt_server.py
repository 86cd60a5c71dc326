"""amqtt configured to behave like the Mosquitto the protocol is written against, and the loop that serves it.

``aggregator.broker.embedded`` runs ``serve`` in a child process (or a thread); ``fleetlearn broker
run`` runs it in the foreground. What differs in amqtt 0.12 out of the box, and what is done here:

- **Persistent sessions.** amqtt's ``AnonymousAuthPlugin`` marks every client without a user name
  anonymous, and amqtt then neither keeps an anonymous session's subscriptions nor queues QoS 1
  messages for it while it is away (the session is dropped a second after the disconnect). Our
  devices connect without a user name to a local broker, and rely on the queue: ``_OpenAuth``
  accepts every client without marking it anonymous, so ``clean_session=False`` means what MQTT
  3.1.1 says.
- **Retained messages leak on connect.** On every CONNECT amqtt sends the connecting client the
  retained messages matching *any* client's subscription filter (``status/+`` of the aggregator,
  say), not only its own. ``_FleetBroker`` sends a client only those matching a filter it holds.
- **Keepalive.** amqtt never drops a client that stops talking (its read timeout is a no-op), so
  a client behind a dead link would never get its last will. ``_FleetBroker`` closes a connection
  silent for 1.5 keepalive periods, as MQTT 3.1.1 section 3.1.2.10 says, so the will is published.
- amqtt's ``$SYS`` publisher and its event and packet loggers are left out (CPU for nothing), and
  its loggers stay at WARNING unless asked.

Left as amqtt has it, because the round protocol does not depend on it: a QoS 1 message the broker
sent but whose PUBACK did not come within 5 s is not redelivered on reconnect, and offline-queued
messages arrive with the retain flag set; receipts and retransmission (``edge_sdk.transport.reliable``)
cover the first, the transport ignores the flag. Queues have no limit (Mosquitto drops past 1000).
There is no packet size limit below MQTT's 256 MB. MQTT 5 clients are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from amqtt import __version__ as AMQTT_VERSION  # noqa: N812 - amqtt names it so
from amqtt.broker import Broker
from amqtt.errors import BrokerError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin

from aggregator.broker.embedded import EmbeddedBrokerError

log = logging.getLogger(__name__)

_AMQTT_LOGGERS = ("amqtt", "transitions")
_SHUTDOWN_TIMEOUT_S = 3.0
__all__ = ["AMQTT_VERSION", "ServerSettings", "quiet_amqtt", "serve"]


@dataclass(frozen=True)
class ServerSettings:
    """Where the broker listens; ``port`` 0 lets the OS choose a free one."""

    host: str = "127.0.0.1"
    port: int = 0
    max_connections: int = 0  # 0: no limit; past it, new connections wait for a free slot (amqtt's semaphore)


class _OpenAuth(BaseAuthPlugin):
    """Accept every client as a named one, so amqtt keeps persistent sessions and queues QoS 1 for them."""

    async def authenticate(self, *, session) -> bool:
        return True


class _FleetBroker(Broker):
    """amqtt's broker with the retained-message leak on connect closed (see the module docstring)."""

    async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
        holders = self.subscriptions.get(subscription[0], ())
        if any(holder.client_id == session.client_id for holder, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def _close_when_silent(handler: BrokerProtocolHandler) -> None:
    """amqtt calls this when nothing arrived for the keepalive (+ the disconnect delay): end the connection."""
    asyncio.ensure_future(handler.handle_connection_closed())


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """A connection that had not sent CONNECT when the broker stopped is cancelled; asyncio would log a traceback."""
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


class _CoveredDeliveryFilter(logging.Filter):
    """Drop amqtt's reports of a QoS 1 delivery it gave up on or acknowledged twice.

    amqtt waits 5 s for a PUBACK and then skips that delivery without resending it ("Timeout waiting for
    PUBACK", "Task failed and will be skipped"), and a late PUBACK then arrives for nothing ("unknown
    pending message", "already done"). Under load this happens every round; fleetlearn's signed receipts
    and retransmission resend whatever was skipped, so these lines (with their tracebacks) say nothing
    an operator must act on, and they flooded the demo's terminal.
    """

    COVERED = ("Timeout waiting for PUBACK", "Received PUBACK for unknown pending message", "already done")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern in message for pattern in self.COVERED)


class _StartupFailureFilter(logging.Filter):
    """amqtt logs a failed start with a traceback; ``serve`` reports it as one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Broker startup failed"


def quiet_amqtt(level: int | str = logging.WARNING) -> None:
    """amqtt logs every connection and packet at INFO/DEBUG; keep its loggers at ``level``."""
    for name in _AMQTT_LOGGERS:
        logging.getLogger(name).setLevel(level)
    broker_log = logging.getLogger("amqtt.broker")
    if not any(isinstance(f, _StartupFailureFilter) for f in broker_log.filters):
        broker_log.addFilter(_StartupFailureFilter())
    for name in ("amqtt.mqtt.protocol.handler", "amqtt.broker"):
        covered = logging.getLogger(name)
        if not any(isinstance(f, _CoveredDeliveryFilter) for f in covered.filters):
            covered.addFilter(_CoveredDeliveryFilter())


def _config(settings: ServerSettings) -> dict:
    return {
        # "host:port" and not "[v6]:port": amqtt splits at the last colon and passes the host on unchanged
        "listeners": {"default": {"type": "tcp", "bind": f"{settings.host}:{settings.port}",
                                  "max_connections": settings.max_connections}},
        # amqtt's read times out after keep_alive + this: 90 s for our 60 s keepalive, MQTT's 1.5 x
        "timeout_disconnect_delay": 30,
        "plugins": {f"{__name__}._OpenAuth": {}},
    }


async def serve(settings: ServerSettings, stop: asyncio.Event, on_ready: Callable[[int], None]) -> None:
    """Run the broker until ``stop`` is set; ``on_ready(port)`` once it accepts connections."""
    BrokerProtocolHandler.handle_read_timeout = _close_when_silent  # amqtt's own is a no-op
    asyncio.get_running_loop().set_exception_handler(_ignore_cancelled)
    broker = _FleetBroker(_config(settings))
    try:
        await broker.start()
    except BrokerError as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, OSError) and cause.errno and cause.errno > 0:
            reason = os.strerror(cause.errno).lower()  # not asyncio's "error while attempting to bind on ..."
        else:
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        raise EmbeddedBrokerError(f"cannot listen on {settings.host}:{settings.port}: {reason}") from None
    try:
        server = broker._servers["default"].instance  # noqa: SLF001 - amqtt exposes no bound address
        on_ready(server.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):  # a shutdown stuck on a dead client must not keep us alive
            await asyncio.wait_for(broker.shutdown(), _SHUTDOWN_TIMEOUT_S)


def run_child(argv: list[str]) -> int:
    """The child process ``EmbeddedBroker`` starts: say ``listening PORT`` or ``error ...`` on stdout, then serve.

    It stops on SIGTERM, on EOF on stdin (the parent closed it, or died: the kernel closes its end)
    and when it is re-parented (a forked sibling may still hold the pipe open after the parent died).
    """
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="fleetlearn-embedded-broker")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-connections", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="embedded broker %(levelname)s %(name)s: %(message)s")
    quiet_amqtt(args.log_level)
    parent = os.getppid()

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)

        def stdin_readable() -> None:
            if not os.read(sys.stdin.fileno(), 4096):
                loop.remove_reader(sys.stdin.fileno())
                stop.set()

        loop.add_reader(sys.stdin.fileno(), stdin_readable)

        async def watch_parent() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(0.5)
            stop.set()

        watcher = asyncio.ensure_future(watch_parent())
        try:
            await serve(ServerSettings(args.host, args.port, args.max_connections), stop,
                        lambda port: say(f"listening {port}"))
        finally:
            watcher.cancel()

    try:
        asyncio.run(main())
    except EmbeddedBrokerError as exc:
        say(f"error {exc}")
        return 2
    return 0
