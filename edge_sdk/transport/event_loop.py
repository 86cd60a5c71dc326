"""One ``selectors`` loop in the caller's thread that drives many MQTT connections.

Why not paho's ``loop_start()``: one network thread per client does not scale. 1000 clients
each with its own thread in one process delivered 338 of 1000 messages in 120 s here, while the
simulator needs hundreds of devices per process. Here each connection's socket is registered
in one selector; readable sockets get ``loop_read``, writable ones (only while paho
``want_write()``s, through its register/unregister-write callbacks) ``loop_write``, and every
connection gets ``loop_misc`` (keepalive) about once a second and its reconnect attempt when
its backoff expires. Nothing here sleeps longer than the caller's timeout.

``passes`` counts the loop's passes, so a connection polled with timeout 0 right after a pass
(the simulator drains 100 connections after one ``run_once``) need not select all sockets again:
that per-connection select was most of the simulator's per-step cost.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import selectors
import socket
import time
from collections.abc import Callable
from typing import Protocol

MISC_INTERVAL_S = 1.0  # keepalive bookkeeping; paho's own loop calls loop_misc about as often


class LoopConnection(Protocol):
    """What the loop needs from a connection (``MqttTransport`` implements it)."""

    def handle_readable(self) -> None: ...

    def handle_writable(self) -> None: ...

    def handle_misc(self) -> None: ...

    def handle_reconnect_due(self) -> None: ...

    def has_buffered_input(self) -> bool: ...

    @property
    def may_buffer_input(self) -> bool:
        """True for TLS connections, whose decrypted bytes can wait in the SSL object unseen by select."""
        ...


class MqttLoop:
    """Drives any number of connections from one thread; call ``run`` or a transport's ``poll``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._selector = selectors.DefaultSelector()
        self._clock = clock
        self._connections: dict[int, LoopConnection] = {}
        self._buffering: dict[int, LoopConnection] = {}  # TLS connections: checked for pending input every pass
        self._reconnects: list[tuple[float, int, LoopConnection]] = []  # heap of (due, tiebreak, connection)
        self._tiebreak = itertools.count()
        self._next_misc = clock()
        self._closed = False
        self.passes = 0  # completed run_once calls

    # -- registration, called by connections from paho's socket callbacks ------------------------

    def attach(self, connection: LoopConnection) -> None:
        self._connections[id(connection)] = connection
        if connection.may_buffer_input:
            self._buffering[id(connection)] = connection

    def detach(self, connection: LoopConnection) -> None:
        self._connections.pop(id(connection), None)
        self._buffering.pop(id(connection), None)
        self._reconnects = [item for item in self._reconnects if item[2] is not connection]
        heapq.heapify(self._reconnects)

    def watch_socket(self, sock: socket.socket, connection: LoopConnection) -> None:
        self._selector.register(sock, selectors.EVENT_READ, connection)

    def forget_socket(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):  # already closed or never registered
            self._selector.unregister(sock)

    def want_write(self, sock: socket.socket, wanted: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
        try:
            key = self._selector.get_key(sock)
        except (KeyError, ValueError):
            return
        if key.events != events:
            self._selector.modify(sock, events, key.data)

    def schedule_reconnect(self, connection: LoopConnection, delay_s: float) -> None:
        due = self._clock() + max(0.0, delay_s)
        heapq.heappush(self._reconnects, (due, next(self._tiebreak), connection))

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- running ---------------------------------------------------------------------------------

    def run_once(self, timeout: float) -> None:
        """Wait at most ``timeout`` s for socket events, handle them, then due timers."""
        now = self._clock()
        wait = max(0.0, timeout)
        if self._reconnects:
            wait = min(wait, max(0.0, self._reconnects[0][0] - now))
        wait = min(wait, max(0.0, self._next_misc - now))
        if any(c.has_buffered_input() for c in self._buffering.values()):
            wait = 0.0  # TLS records already decrypted into the SSL object: select would not see them
        events = self._selector.select(wait) if self._selector.get_map() else self._sleep(wait)
        for key, mask in events:
            connection: LoopConnection = key.data
            if mask & selectors.EVENT_READ:
                connection.handle_readable()
            if mask & selectors.EVENT_WRITE:
                connection.handle_writable()
        for connection in list(self._buffering.values()):
            if connection.has_buffered_input():
                connection.handle_readable()
        now = self._clock()
        while self._reconnects and self._reconnects[0][0] <= now:
            _, _, connection = heapq.heappop(self._reconnects)
            if id(connection) in self._connections:
                connection.handle_reconnect_due()
        if now >= self._next_misc:
            self._next_misc = now + MISC_INTERVAL_S
            for connection in list(self._connections.values()):
                connection.handle_misc()
        self.passes += 1

    def run(self, timeout: float, until: Callable[[], bool] | None = None) -> bool:
        """Run for up to ``timeout`` s, returning early (True) as soon as ``until()`` holds."""
        deadline = self._clock() + max(0.0, timeout)
        while True:
            if until is not None and until():
                return True
            remaining = deadline - self._clock()
            self.run_once(max(0.0, remaining))  # at least one pass, so poll(0) still reads the sockets
            if remaining <= 0:
                return until is not None and until()

    def _sleep(self, seconds: float) -> list:
        time.sleep(seconds)
        return []

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._selector.close()
