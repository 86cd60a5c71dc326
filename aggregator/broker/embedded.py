"""The embedded MQTT broker: amqtt (MQTT 3.1.1) started by ``simulate`` and ``fleetlearn broker run``.

Why: with it a laptop needs nothing but Python to run a fleet; with ``--broker URL`` the same code
talks to Mosquitto or a clustered broker instead. amqtt is configured to keep the MQTT 3.1.1
semantics the transport relies on (``aggregator.broker.amqtt_server`` lists what differs and what
is done about it).

Why a child process by default: amqtt is pure-Python asyncio, so in a thread it would share the
GIL with the aggregator and the device workers it serves; in its own process it gets its own core
(``benchmarks/transport.py`` measures both). The child cannot outlive us: ``stop()`` (also run by
the context manager and, as a last resort, at garbage collection or interpreter exit) ends it,
and if this process dies without stopping it the child sees EOF on its stdin, or its re-parenting,
and exits by itself.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from edge_sdk.errors import FleetlearnError

MQTT_VERSION = "3.1.1"
_CHILD = "import sys; from aggregator.broker.amqtt_server import run_child; sys.exit(run_child(sys.argv[1:]))"
_STOP_GRACE_S = 5.0


class EmbeddedBrokerError(FleetlearnError):
    """The embedded broker could not start (address in use, bad address, amqtt missing) or died."""


def amqtt_version() -> str:
    """The installed amqtt's version; a clear error naming the extra to install when it is missing."""
    try:
        from amqtt import __version__
    except ModuleNotFoundError:
        raise EmbeddedBrokerError(
            "the embedded broker needs amqtt, which this install lacks; install it with: "
            "pip install 'fleetlearn[broker]' (or give --broker mqtt://HOST:PORT for an external broker)"
        ) from None
    return __version__


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


class EmbeddedBroker:
    """amqtt on ``host:port`` (port 0: a free one), in a child process, or a thread with ``in_thread=True``.

    ``start()`` returns once the broker accepts connections; ``url`` and ``description`` then say
    where. ``log_level`` is amqtt's (WARNING keeps its per-connection chatter out).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_connections: int = 0,
                 in_thread: bool = False, log_level: str = "WARNING"):
        if not 0 <= port <= 65535:
            raise EmbeddedBrokerError(f"port must be from 0 to 65535, got {port}")
        if max_connections < 0:
            raise EmbeddedBrokerError(f"max_connections must be 0 (no limit) or more, got {max_connections}")
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.in_thread = in_thread
        self.log_level = log_level
        self._process: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._thread: threading.Thread | None = None
        self._thread_stop = None  # (loop, asyncio.Event) of the broker thread
        self._version = ""

    # -- where it listens ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return self._thread is not None and self._thread.is_alive()

    @property
    def version(self) -> str:
        """The amqtt version serving (known once started)."""
        return self._version

    @property
    def url(self) -> str:
        self._check_started()
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @property
    def description(self) -> str:
        self._check_started()
        where = "thread" if self.in_thread else f"process {self._process.pid}"
        return f"embedded amqtt {self._version} (MQTT {MQTT_VERSION}) on {self.host}:{self.port}, own {where}"

    def _check_started(self) -> None:
        if not self.running:
            raise EmbeddedBrokerError("the embedded broker is not running; call start() first")

    # -- life cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        if self.running:
            return self
        self._version = amqtt_version()
        if self.in_thread:
            self._start_thread(timeout)
        else:
            self._start_process(timeout)
        return self

    def stop(self) -> None:
        """Stop the broker; idempotent. A child that does not exit within 5 s is killed."""
        if self._process is not None:
            process, self._process = self._process, None
            if process.poll() is None:
                try:
                    process.stdin.close()  # EOF: the child shuts down
                    process.send_signal(signal.SIGTERM)
                    process.wait(_STOP_GRACE_S)
                except (OSError, subprocess.TimeoutExpired):
                    _kill(process)
            process.stdout.close()
            if self._finalizer is not None:
                self._finalizer.detach()
        if self._thread is not None:
            thread, self._thread = self._thread, None
            loop, event = self._thread_stop
            if thread.is_alive():
                loop.call_soon_threadsafe(event.set)
                thread.join(_STOP_GRACE_S + 5)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- child process ---------------------------------------------------------------------

    def _start_process(self, timeout: float) -> None:
        import aggregator

        root = str(Path(aggregator.__file__).resolve().parents[1])  # the child imports the same fleetlearn
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-c", _CHILD, "--host", self.host, "--port", str(self.port),
                   "--max-connections", str(self.max_connections), "--log-level", self.log_level]
        # its own session: a Ctrl-C in the terminal reaches us, and we stop the broker after our clients
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                   start_new_session=True)
        self._finalizer = weakref.finalize(self, _kill, process)
        line = self._read_line(process, timeout)
        if line.startswith("listening "):
            self._process = process
            self.port = int(line.split()[1])
            return
        _kill(process)
        self._finalizer.detach()
        if line.startswith("error "):
            raise EmbeddedBrokerError(line[len("error "):])
        raise EmbeddedBrokerError(f"the embedded broker did not start within {timeout} s "
                                  f"(exit code {process.returncode}); see its messages above on stderr")

    @staticmethod
    def _read_line(process: subprocess.Popen, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = process.stdout.fileno()
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return data.decode(errors="replace")
            chunk = os.read(fd, 4096)
            if not chunk:  # the child exited
                break
            data += chunk
        return data.decode(errors="replace").strip()

    # -- thread ----------------------------------------------------------------------------

    def _start_thread(self, timeout: float) -> None:
        import asyncio

        from aggregator.broker.amqtt_server import ServerSettings, quiet_amqtt, serve

        quiet_amqtt(self.log_level)
        ready = threading.Event()
        outcome: dict = {}

        def ran(port: int) -> None:
            outcome["port"] = port
            ready.set()

        async def main() -> None:
            stop = asyncio.Event()
            self._thread_stop = (asyncio.get_running_loop(), stop)
            await serve(ServerSettings(self.host, self.port, self.max_connections), stop, ran)

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # reported by start() in the caller's thread
                outcome["error"] = exc
                ready.set()

        self._thread = threading.Thread(target=run, name="embedded-amqtt", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise EmbeddedBrokerError(f"the embedded broker did not start within {timeout} s")
        if "error" in outcome:
            self._thread.join(5)
            self._thread = None
            error = outcome["error"]
            raise error if isinstance(error, EmbeddedBrokerError) else EmbeddedBrokerError(str(error))
        self.port = outcome["port"]


def serve_forever(host: str, port: int, *, max_connections: int = 0, log_level: str = "WARNING",
                  on_ready=None) -> None:
    """Run the broker in this process, in the foreground, until SIGTERM or SIGINT (``fleetlearn broker run``).

    ``on_ready(url)`` is called once it accepts connections; a port in use or a bad address is an
    ``EmbeddedBrokerError`` naming it.
    """
    amqtt_version()
    import asyncio

    from aggregator.broker.amqtt_server import ServerSettings, quiet_amqtt, serve

    quiet_amqtt(log_level)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        shown = f"[{host}]" if ":" in host else host
        await serve(ServerSettings(host, port, max_connections), stop,
                    lambda bound: on_ready and on_ready(f"mqtt://{shown}:{bound}"))

    asyncio.run(main())
