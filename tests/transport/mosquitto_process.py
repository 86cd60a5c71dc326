"""A real Mosquitto broker on a free port, started and killed by the tests.

Why a process per test: the transport's behaviour under a full queue, a SIGKILL, TLS or a
password file is the broker's, so nothing is mocked; the system Mosquitto on 1883 is shared with
other work and is never used.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else (shutil.which("mosquitto") or "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MosquittoBroker:
    """One broker process; ``config`` is extra lines for its listener (TLS, passwords, limits)."""

    def __init__(self, directory: Path, config: str = "", port: int | None = None, persistence: bool = False):
        self.directory = directory
        self.port = port or free_port()
        self.persistence = persistence
        self.config_path = directory / f"mosquitto-{self.port}.conf"
        self.log_path = directory / f"mosquitto-{self.port}.log"
        # stay the user running the tests: as root, mosquitto would switch to "mosquitto", which cannot
        # read pytest's private tmp_path (certificates, password file, persistence, log)
        lines = [f"user {pwd.getpwuid(os.geteuid()).pw_name}", f"listener {self.port} 127.0.0.1"]
        if "password_file" not in config:
            lines.append("allow_anonymous true")
        lines.append(config)
        if persistence:
            # save after every change, so a SIGKILL loses nothing that was acknowledged
            lines += ["persistence true", f"persistence_location {directory}/", "autosave_interval 1",
                      "autosave_on_changes true"]
        lines += [f"log_dest file {self.log_path}", "log_type error", "log_type warning", "log_type notice"]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config_path)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: "
                                   f"{self.process.stderr.read().decode()} {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s: {self.log()}")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no final persistence save."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process and self.process.stderr:
            self.process.stderr.close()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
